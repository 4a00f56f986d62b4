"""One training step (forward + backward) of the SmolLM2-135M architecture on CPU.

Contenders, each in its own fresh process: eager; einfuse.optimize; torch.compile
(Inductor, default and with auto_chunker); einfuse.optimize(inner="inductor").
Random weights (the architecture is what matters for time and memory), fp32,
attn_implementation="sdpa", batch x sequence tokens with labels.

Memory: peak RSS during the measured step (the kernel's high-water mark,
reset just before the step, minus the RSS just before it), and the tensor
high-water mark from a dispatch-mode tracker of live storages (measured in a
separate, untimed step, because the tracker slows execution).

RSS: glibc keeps the warm-up step's freed small and mid-sized blocks (below its
dynamic mmap threshold, up to 32 MB: most activations) resident in its heap, and
the measured step reuses them without raising the high-water mark, so without
care "peak minus RSS before the step" misses most of the step's memory (eager at
4 x 1024: 5.96 GB measured that way vs 8.73 GB of live tensors at the peak).
`malloc_trim(0)` before the step returns those free pages to the OS, so the step
has to fault in what it uses and the high-water mark sees it.

The tracker is a TorchDispatchMode, and Dynamo does not run compiled code under
a dispatch mode unless the mode declares `ignore_compile_internals()`: it skips
the frame and runs the model eagerly (convert_frame: "non-infra torch dispatch
mode present"). An earlier version of this script therefore measured plain
eager for every contender (identical tensor peaks); the tracker used here
declares it, and the fused-op calls seen during the tracked step are recorded
(`tracked_calls`) to show the optimized code ran. Inductor's generated code
allocates its buffers outside the dispatcher (`empty_strided_cpu`), so no
dispatch mode can see them: the tensor peak is reported only for contenders
that run aten ops (eager, einfuse with inner="eager").

    python benchmarks/bench_train_step.py                   # full size: 4 x 1024
    python benchmarks/bench_train_step.py --batch 1 --seq 128 --layers 4   # quick
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONTENDERS = ["eager", "einfuse", "inductor", "inductor_auto_chunker", "einfuse_inductor"]
TRACKABLE = {"eager", "einfuse"}  # Inductor's buffers are invisible to a dispatch mode


def _tracker_cls():
    from einfuse.analysis.memory import LiveStorageTracker  # follows storages inside fused ops too

    class CompiledCodeTracker(LiveStorageTracker):
        @classmethod
        def ignore_compile_internals(cls) -> bool:  # let Dynamo run the compiled code under the mode
            return True

    return CompiledCodeTracker


def worker(name: str, a) -> dict:
    import torch
    from common import malloc_trim, peak_rss_since_reset, reset_maxrss, rss_bytes
    from transformers import LlamaForCausalLM

    import einfuse
    from einfuse.models.smollm2 import smollm2_config
    from einfuse.runtime import counters

    torch.manual_seed(0)
    cfg = smollm2_config(num_hidden_layers=a.layers)
    model = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    if name == "eager":
        run = model
    elif name == "einfuse":
        run = einfuse.optimize(model)
    elif name == "einfuse_inductor":
        run = einfuse.optimize(model, inner="inductor")
    elif name.startswith("inductor"):
        if name == "inductor_auto_chunker":
            import torch._inductor.config as ic
            ic.auto_chunker.enable = True
        run = torch.compile(model)
    else:
        raise SystemExit(f"unknown contender {name}")

    def step():
        model.zero_grad(set_to_none=True)
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        return float(out.loss)

    t0 = time.perf_counter()
    with counters.counting() as calls:
        loss0 = step()  # warm-up: compiles
    warm = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    gc.collect()
    trimmed = malloc_trim()  # hand the warm-up's freed heap back to the OS (see the module docstring)
    base = rss_bytes()
    hwm_reset = reset_maxrss()
    t0 = time.perf_counter()
    loss = step()
    dt = time.perf_counter() - t0
    peak = peak_rss_since_reset() - base
    tensor_peak, tracked = None, {}
    if name in TRACKABLE and not a.no_tracker:
        model.zero_grad(set_to_none=True)
        gc.collect()
        tracker = _tracker_cls()()
        with counters.counting() as tracked_calls, tracker:
            step()
        tensor_peak, tracked = tracker.peak / 1e9, dict(tracked_calls)
        if name != "eager" and not tracked:
            raise SystemExit("the tracked step ran no fused op: the tracker measured eager code")
    return {"name": name, "step_s": dt, "warmup_s": warm, "peak_rss_gb": peak / 1e9,
            "tensor_peak_gb": tensor_peak, "loss": loss, "loss_warm": loss0,
            "fused_calls": dict(calls), "tracked_calls": tracked, "hwm_reset": hwm_reset, "malloc_trim": trimmed,
            "rss_before_step_gb": base / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--only", nargs="*", default=CONTENDERS)
    p.add_argument("--no-tracker", action="store_true", help="skip the (slow, untimed) tensor-peak step")
    p.add_argument("--merge", action="store_true",
                   help="add these rows to an earlier result at the same size (contenders run one per call)")
    p.add_argument("--worker")
    a, rest = p.parse_known_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    from common import run_in_fresh_process, save, table
    rows = []
    for name in a.only:
        print(f"running {name} ...", flush=True)
        r = run_in_fresh_process(__file__, name, ["--batch", str(a.batch), "--seq", str(a.seq),
                                                  "--layers", str(a.layers)] + ["--no-tracker"] * a.no_tracker)
        print("  ", r, flush=True)
        rows.append(r)
    tag = f"train_step_b{a.batch}_s{a.seq}_l{a.layers}"
    if a.merge:
        from common import RESULTS
        old = RESULTS / f"{tag}.json"
        if old.exists():
            prev = {r["name"]: r for r in json.loads(old.read_text())["rows"]}
            for r in rows:  # --no-tracker: keep the tensor peak an earlier run of this contender measured
                p_ = prev.get(r["name"], {})
                if r.get("tensor_peak_gb") is None and p_.get("tensor_peak_gb") is not None:
                    r["tensor_peak_gb"], r["tensor_peak_from_earlier_run"] = p_["tensor_peak_gb"], True
            new = {r["name"] for r in rows}
            rows = [r for r in prev.values() if r["name"] not in new] + rows
        rows.sort(key=lambda r: CONTENDERS.index(r["name"]) if r["name"] in CONTENDERS else 99)
    base = next((r for r in rows if r["name"] == "eager" and "error" not in r), None)
    md = table(rows, [("name", "contender"), ("step_s", "step (s)"), ("peak_rss_gb", "peak RSS (GB)"),
                      ("tensor_peak_gb", "tensor peak (GB)"), ("warmup_s", "warm-up (s)")], base,
               ratios=("step_s", "peak_rss_gb", "tensor_peak_gb"))
    title = (f"Training step, SmolLM2-135M architecture ({a.layers} layers), batch {a.batch} x {a.seq}, "
             f"fp32, CPU ({os.cpu_count()} cores, shared with other jobs: times are noisy). "
             f"Tensor peak: '-' where the code allocates outside the dispatcher (Inductor).")
    print("\n" + title + "\n\n" + md)
    path = save(tag, rows, f"{title}\n\n{md}", vars(a))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
