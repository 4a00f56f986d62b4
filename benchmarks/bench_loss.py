#!/usr/bin/env python
"""Benchmark: fused linear + cross-entropy (forward + backward), CPU.

Contenders (each in its OWN fresh subprocess, so allocator state, compile caches
and peak-RSS counters do not leak between them):

* ``eager``   - ``F.cross_entropy(F.linear(hidden, weight), labels)``
* ``einfuse`` - ``einfuse.runtime.ops.linear_cross_entropy.linear_cross_entropy``
* ``cce``     - Cut Cross-Entropy ``linear_cross_entropy(..., impl="torch_compile")``
                (skipped, with a note, when ``cut_cross_entropy`` is not importable)

Each child builds the inputs, runs one warm-up forward+backward at the same shapes,
then measures:

* time: wall time of forward+backward, ``--repeat`` runs (median and min reported),
  plus the process CPU time of the same runs (median), which is less sensitive to
  other load on a shared machine (the 1-minute load average is recorded too);
* tensor peak: high-water mark of the bytes of tensor storages created during one
  forward+backward and still alive (a ``TorchDispatchMode`` tracking live storages
  through weak references). Inputs are not counted; the produced ``.grad`` tensors
  are. einfuse custom ops are entered so their internal chunk buffers count too.
  Not available for ``cce``: torch.compile refuses to run under a dispatch mode;
* RSS peak: peak resident set size during one forward+backward minus the RSS just
  before it (``/proc/self/clear_refs`` resets the high-water mark and ``malloc_trim``
  returns freed heap first; read back through ``ru_maxrss``).

Usage:
    python benchmarks/bench_loss.py --tokens 4096 --hidden 576 --vocab 49152 --dtype fp32

Writes ``benchmarks/results/bench_loss_<N>x<H>x<V>_<dtype>.{json,md}``.
Not imported by the tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONTENDERS = ("eager", "einfuse", "cce")
RESULT_TAG = "BENCH_RESULT "
ROOT = Path(__file__).resolve().parent.parent
MB = 1e6


# ----------------------------------------------------------------------------- child side
def _make_tracker():
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # pragma: no cover
        _maybe_get_opdef = None

    class LiveStorageTracker(TorchDispatchMode):
        """High-water mark of bytes in tensor storages created while active."""

        def __init__(self, preexisting=()):
            super().__init__()
            self.pre = {self._key(t.untyped_storage()) for t in preexisting}
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        @staticmethod
        def _key(st):
            return st.data_ptr() if st.nbytes() else id(st)

        def _record(self, out):
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                key = self._key(st)
                if key in self.pre:
                    continue
                ent = self.live.get(key)
                if ent is None or ent[0].expired():
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
            for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                del self.live[k]
            cur = sum(n for _, n in self.live.values())
            self.peak = max(self.peak, cur)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            opdef = _maybe_get_opdef(func) if _maybe_get_opdef is not None else None
            if opdef is not None and getattr(opdef, "_init_fn", None) is not None:
                # run the custom op's Python implementation with the tracker active, so the
                # buffers it allocates internally are seen too
                with self:
                    out = opdef._init_fn(*args, **kwargs)
            else:
                out = func(*args, **kwargs)
            self._record(out)
            return out

    return LiveStorageTracker


def _build(name: str, args):
    import torch
    import torch.nn.functional as F

    if name == "eager":
        def fn(h, w, y):
            return F.cross_entropy(F.linear(h, w), y)
    elif name == "einfuse":
        sys.path.insert(0, str(ROOT))
        from einfuse.runtime.ops.linear_cross_entropy import linear_cross_entropy

        def fn(h, w, y):
            return linear_cross_entropy(h, w, y)
    elif name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_lce
        except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
            return None, f"cut_cross_entropy not importable ({type(exc).__name__}: {exc})"

        def fn(h, w, y):
            return cce_lce(h, w, y, impl="torch_compile")
    else:
        raise ValueError(name)
    return fn, None


def child(args) -> dict:
    import torch
    from common import malloc_trim, reset_maxrss, rss_bytes

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    fn, skip = _build(args.child, args)
    if fn is None:
        return {"name": args.child, "skipped": skip}

    gen = torch.Generator().manual_seed(0)
    n, hdim, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, hdim, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, hdim, generator=gen) * hdim**-0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen)
    inputs_bytes = sum(t.untyped_storage().nbytes() for t in (hidden, weight, labels))

    def step():
        hidden.grad = None
        weight.grad = None
        loss = fn(hidden, weight, labels)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    loss0 = step()  # warm-up at the same shapes (compiles CCE)
    warm_s = time.perf_counter() - t0

    times, cpu_times, rss_deltas, maxrss_deltas = [], [], [], []
    for _ in range(args.repeat):
        hidden.grad = None
        weight.grad = None
        gc.collect()
        malloc_trim()
        reset_ok = reset_maxrss()
        rss0 = rss_bytes()
        maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if reset_ok:
            maxrss_deltas.append(maxrss1 - rss0)
        else:  # without a reset, ru_maxrss only moves if this run beat every earlier peak
            maxrss_deltas.append(maxrss1 - maxrss0)
        rss_deltas.append(rss_bytes() - rss0)

    # one more run under the live-storage tracker (not timed: the tracker adds overhead)
    tracker_cls = _make_tracker()
    hidden.grad = None
    weight.grad = None
    gc.collect()
    tensor_peak, tracker_note = None, None
    try:
        with tracker_cls(preexisting=(hidden, weight, labels)) as tr:
            step()
        tensor_peak = tr.peak
    except Exception as exc:  # noqa: BLE001 - e.g. torch.compile refuses to run under a dispatch mode
        tracker_note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    return {
        "name": args.child,
        "loss": float(loss.float()),
        "loss_warm": float(loss0.float()),
        "warmup_s": warm_s,
        "times_s": times,
        "time_median_s": statistics.median(times),
        "time_min_s": min(times),
        "cpu_times_s": cpu_times,
        "cpu_time_median_s": statistics.median(cpu_times),
        "tensor_peak_bytes": tensor_peak,
        "tensor_peak_note": tracker_note,
        "rss_peak_delta_bytes": max(maxrss_deltas),
        "rss_reset_ok": reset_ok,
        "rss_end_delta_bytes": max(rss_deltas),
        "inputs_bytes": inputs_bytes,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- parent side
def _run_child(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name,
           "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--repeat", str(args.repeat)]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    load1 = os.getloadavg()[0]
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["loadavg_1m"] = [load0, load1]
            return res
    return {"name": name, "skipped": f"child failed (rc={proc.returncode}): {proc.stderr.strip()[-2000:]}"}


def _fmt_table(results: list[dict], args) -> str:
    base = next((r for r in results if r["name"] == "eager" and "skipped" not in r), None)
    lines = [
        f"fused linear + cross-entropy, forward+backward, N={args.tokens} H={args.hidden} V={args.vocab} "
        f"{args.dtype}, CPU ({platform.processor() or platform.machine()}), warm, "
        f"median of {args.repeat}; memory above the inputs",
        "",
        "| contender | time median (s) | time min (s) | vs eager | CPU time (s) | vs eager | "
        "tensor peak (GB) | vs eager | RSS peak (GB) | vs eager | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped'].splitlines()[0][:120]} | | | | | | | | | |")
            continue

        def ratio(key):
            return f"{r[key] / base[key]:.2f}x" if base and base[key] and r[key] is not None else "-"

        tpeak = "n/a" if r["tensor_peak_bytes"] is None else f"{r['tensor_peak_bytes'] / 1e9:.3f}"

        lines.append(
            f"| {r['name']} | {r['time_median_s']:.2f} | {r['time_min_s']:.2f} | {ratio('time_median_s')} | "
            f"{r['cpu_time_median_s']:.2f} | {ratio('cpu_time_median_s')} | "
            f"{tpeak} | {ratio('tensor_peak_bytes')} | "
            f"{r['rss_peak_delta_bytes'] / 1e9:.3f} | {ratio('rss_peak_delta_bytes')} | "
            f"{r['loadavg_1m'][0]:.1f}-{r['loadavg_1m'][1]:.1f} |")
    lines += ["", "CPU time: process CPU seconds of the step (all threads; less sensitive than wall time to "
              "other load on the machine, see the load average column). "
              "tensor peak: live tensor storages (TorchDispatchMode tracker). n/a for cce: torch.compile "
              "refuses to run under a dispatch mode, so only its RSS is measured. RSS peak: ru_maxrss "
              "after a high-water reset (/proc/self/clear_refs) and malloc_trim, minus the RSS before "
              "the step."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(RESULT_TAG + json.dumps(child(args)), flush=True)
        return 0

    results = []
    for name in args.contenders.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        r = _run_child(name.strip(), args)
        if "skipped" in r:
            print(f"  {name} skipped: {r['skipped']}", file=sys.stderr)
        results.append(r)
    table = _fmt_table(results, args)
    print(table)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_loss_{args.tokens}x{args.hidden}x{args.vocab}_{args.dtype}"
    meta = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
            "repeat": args.repeat, "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / f"{stem}.json").write_text(json.dumps({"config": meta, "results": results}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
    print(f"\nsaved {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
