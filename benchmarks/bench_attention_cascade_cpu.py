"""CPU attention forward: the derived 1-pass cascade run by the tiled cascade executor vs the
hand-written tiled online-softmax loop it replaced (einfuse/runtime/ops/attention.py at commit
6a6c87f, loaded from git). Both are called directly (no custom-op dispatch), interleaved, warm;
prints medians and the ratio cascade / hand. Shapes are ones ATen's fused kernel cannot take
(soft-capping, sliding window, causal with S != T, masks with fully masked rows).

    flock /tmp/einfuse_bench.lock python benchmarks/bench_attention_cascade_cpu.py --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch

import einfuse.runtime.ops.attention as A

OLD_COMMIT = "6a6c87f3c59ab77aa2e1e983651d4f615e9264dd"


def load_old():
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:einfuse/runtime/ops/attention.py"], cwd=root,
                         check=True, capture_output=True, text=True).stdout
    src = src[:src.index("# --------------------------------------------------------------------------- native path")]
    mod = types.ModuleType("attention_hand_tiled")
    exec(compile(src, "attention_hand_tiled.py", "exec"), mod.__dict__)
    return mod


CASES = {
    # name: (B, Hq, Hkv, S, T, D, kwargs, mask)
    "B2 H8 S1024 D64 softcap": (2, 8, 8, 1024, 1024, 64, dict(softcap=30.0), None),
    "B2 H8 S1024 D64 softcap causal": (2, 8, 8, 1024, 1024, 64, dict(softcap=30.0, is_causal=True), None),
    "B1 H9/3 S1024 D64 window 256": (1, 9, 3, 1024, 1024, 64, dict(is_causal=True, window=256), None),
    "B2 H8 S1024 D64 bool mask, dead rows": (2, 8, 8, 1024, 1024, 64, {}, "dead"),
    "B4 H8/2 S1 T2048 D64 softcap (decode)": (4, 8, 2, 1, 2048, 64, dict(softcap=50.0, is_causal=True), None),
    "B1 H4 S64 D32 softcap (small)": (1, 4, 4, 64, 64, 32, dict(softcap=30.0), None),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default=None, help="substring of a case name")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    old = load_old()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {dtype}; "
          "machine shared with other jobs: medians of interleaved runs")
    print(f"{'case':42s} {'hand ms':>9s} {'cascade ms':>11s} {'ratio':>6s} {'max|diff|':>10s} {'reps':>5s}")
    for name, (B, Hq, Hkv, S, T, D, kw, mk) in CASES.items():
        if args.only and args.only not in name:
            continue
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, Hq, S, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
        mask = None
        if mk == "dead":
            mask = torch.rand(B, 1, S, T, generator=g) > 0.2
            mask[:, :, ::97] = False  # fully masked rows: eager gives NaN, ATen's kernel would give 0
        a = (q, k, v, mask, D ** -0.5, kw.get("is_causal", False), kw.get("window", -1), kw.get("softcap", 0.0), False)
        fns = {"hand": lambda: old._forward_tiled(*a), "cascade": lambda: A._forward_cascade(*a)}
        outs = {n: f() for n, f in fns.items()}  # warm-up
        diff = (outs["hand"][0] - outs["cascade"][0]).abs().nan_to_num(0.0).max().item()
        t0 = time.perf_counter()
        fns["hand"]()
        reps = max(args.reps, min(101, int(0.5 / max(1e-6, time.perf_counter() - t0))))  # >= ~0.5 s each
        times = {n: [] for n in fns}
        for r in range(reps):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for n in order:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
        h, c = statistics.median(times["hand"]) * 1e3, statistics.median(times["cascade"]) * 1e3
        print(f"{name:42s} {h:9.2f} {c:11.2f} {c / h:6.3f} {diff:10.2e} {reps:5d}", flush=True)


if __name__ == "__main__":
    main()
