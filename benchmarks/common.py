"""Shared benchmark helpers: fresh-process runs, memory measurement, tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    """Current resident set size (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_maxrss() -> bool:
    """Reset the kernel's resident high-water mark for this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Hand glibc's freed heap back to the OS, so that a step measured after a warm-up raises the
    resident high-water mark instead of reusing the warm-up's pages unseen. False off glibc."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return maxrss_bytes()


class LiveStorageTracker(TorchDispatchMode):
    """Tensor high-water mark: bytes of distinct live storages created inside the mode.

    Every op output's storage is recorded with a weak reference; the live total
    is updated on each op, so the peak is exact at op granularity.
    """

    def __init__(self):
        super().__init__()
        import weakref
        self._weakref = weakref
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live or st.nbytes() == 0:
            return
        n = st.nbytes()
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        ptr = key

        def gone(_ref, ptr=ptr):
            self.current -= self.live.pop(ptr, 0)
        try:
            self._refs = getattr(self, "_refs", {})
            self._refs[ptr] = self._weakref.ref(st, gone)
        except TypeError:
            pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self._track(t)
        return out


def run_in_fresh_process(script: str, name: str, args: list[str], timeout: int = 3600) -> dict:
    """Run `script --worker name args...` in a new interpreter; it prints one JSON line last."""
    cmd = [sys.executable, script, "--worker", name, *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"name": name, "error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"],
                "wall_s": time.perf_counter() - t0}
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict], cols: list[tuple[str, str]], base: dict | None = None,
          ratios: tuple[str, ...] = ()) -> str:
    head = [c[1] for c in cols] + [f"{r} / eager" for r in ratios]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v if v is not None else r.get("error", "-")))
        for key in ratios:
            if base and isinstance(r.get(key), (int, float)) and base.get(key):
                cells.append(f"{r[key] / base[key]:.2f}x")
            else:
                cells.append("-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def save(name: str, rows: list[dict], md: str, meta: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{name}.md").write_text(md + "\n")
    return RESULTS / f"{name}.md"


def smollm2_fp32_dir() -> Path:
    """Where the SmolLM2 benchmarks keep the model converted once from its .gguf (config + safetensors)."""
    from einfuse.models.smollm2 import cache_dir as models_dir
    return models_dir() / "smollm2-135m-fp32"


def ensure_smollm2_fp32() -> Path:
    """Convert SmolLM2-135M's .gguf once (1-2 min) so that later processes load it in seconds.

    transformers' save_pretrained refuses a model loaded from a .gguf, so the config, the tokenizer and
    the weights (the tied lm_head once, as the embedding) are written here directly."""
    from safetensors.torch import save_file
    d = smollm2_fp32_dir()
    if not (d / "config.json").exists():
        from einfuse.models.smollm2 import load_smollm2
        print("converting SmolLM2-135M from .gguf (once; 1-2 min) ...", flush=True)
        model, tok = load_smollm2()
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.save_pretrained(d)
        tok.save_pretrained(d)
    return d
