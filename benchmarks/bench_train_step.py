"""One training step (forward + backward) of the SmolLM2-135M architecture on CPU.

Contenders, each in its own fresh process: eager; einfuse.optimize; torch.compile
(Inductor, default and with auto_chunker); einfuse.optimize(inner="inductor").
Random weights (the architecture is what matters for time and memory), fp32,
attn_implementation="sdpa", batch x sequence tokens with labels.

Memory: peak RSS during the measured step (the kernel's high-water mark,
reset just before the step, minus the RSS just before it), and the tensor
high-water mark from a dispatch-mode tracker of live storages (measured in a
separate, untimed step, because the tracker slows execution).

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


def worker(name: str, a) -> dict:
    import torch
    from common import peak_rss_since_reset, reset_maxrss, rss_bytes
    from einfuse.analysis.memory import LiveStorageTracker  # follows storages inside fused ops too
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
    base = rss_bytes()
    reset_maxrss()
    t0 = time.perf_counter()
    loss = step()
    dt = time.perf_counter() - t0
    peak = peak_rss_since_reset() - base
    model.zero_grad(set_to_none=True)
    gc.collect()
    tracker = LiveStorageTracker()
    with tracker:
        step()
    return {"name": name, "step_s": dt, "warmup_s": warm, "peak_rss_gb": peak / 1e9,
            "tensor_peak_gb": tracker.peak / 1e9, "loss": loss, "loss_warm": loss0,
            "fused_calls": dict(calls)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--only", nargs="*", default=CONTENDERS)
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
                                                  "--layers", str(a.layers)])
        print("  ", r, flush=True)
        rows.append(r)
    base = next((r for r in rows if r["name"] == "eager" and "error" not in r), None)
    md = table(rows, [("name", "contender"), ("step_s", "step (s)"), ("peak_rss_gb", "peak RSS (GB)"),
                      ("tensor_peak_gb", "tensor peak (GB)"), ("warmup_s", "warm-up (s)")], base,
               ratios=("step_s", "peak_rss_gb", "tensor_peak_gb"))
    title = (f"Training step, SmolLM2-135M architecture ({a.layers} layers), batch {a.batch} x {a.seq}, "
             f"fp32, CPU ({os.cpu_count()} cores)")
    print("\n" + title + "\n\n" + md)
    path = save(f"train_step_b{a.batch}_s{a.seq}_l{a.layers}", rows, f"{title}\n\n{md}", vars(a))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
