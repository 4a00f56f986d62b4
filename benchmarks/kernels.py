#!/usr/bin/env python
"""Benchmark: the generated Triton kernels of every fused op, on a CUDA GPU.

For each fused op (forward and backward): median time, achieved bandwidth (memory-bound ops)
or FLOP rate (attention, linear cross-entropy), and the ratio of the generated kernel's time to
eager torch, to torch's SDPA flash backend (attention) and to Liger-Kernel's equivalent (where
`liger_kernel` is importable). Shapes are Llama-3-8B-like: hidden 4096, intermediate 14336,
32 query heads and 8 kv heads of 128, vocabulary 128256, `--tokens` tokens (default 4096), bf16.

Contenders are timed interleaved (one call of each per round, CUDA events around each call,
`--rounds` rounds after a warm-up; medians reported), so clock or thermal drift hits them alike.
Targets (issue 4): every kernel at least as fast as Liger's, attention within 0.8x of SDPA flash.

Without a CUDA GPU it prints that it skipped and exits 0 (nothing is measured). `--smoke` runs
every contender once at tiny shapes under Triton's interpreter on the CPU, checking the kernels'
results against eager (not timed): that the script itself works, not how fast anything is.

    python benchmarks/kernels.py                 # on a GPU machine; writes benchmarks/results/kernels_<gpu>.{json,md}
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"   # before torch / triton are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from einfuse.codegen import ops as K  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def liger():
    try:
        import liger_kernel  # noqa: F401
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------
# eager references (the unfused torch a model runs without einfuse)

def eager_rmsnorm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def eager_rope(q, k, cos, sin):
    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)
    c, s = cos[:, None], sin[:, None]
    return q * c + rot(q) * s, k * c + rot(k) * s


def eager_attention(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    S, T = q.shape[2], k.shape[2]
    s = s.masked_fill(torch.ones(S, T, dtype=torch.bool, device=q.device).triu(T - S + 1), float("-inf"))
    return (s.softmax(-1).to(q.dtype) @ v)


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def eager_lce(x, w, y):
    return F.cross_entropy(F.linear(x, w).float(), y)


# ---------------------------------------------------------------------------------------
# the cases: name -> (inputs builder, {contender: fn}, bytes moved, flops)

def cases(n_tok: int, dev: str, dt, small: bool):
    H, I, NH, NK, D, V = (64, 96, 4, 2, 16, 300) if small else (4096, 14336, 32, 8, 128, 128256)
    S = n_tok
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        t = (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dt)
        return t.requires_grad_() if grad else t
    el = torch.tensor([], dtype=dt).element_size()
    out = {}
    # one function per op: each lambda closes over its own op's tensors
    for build in (_rmsnorm, _swiglu, _rope, _attention, _lce):
        out.update(build(rnd, g, dev, dt, el, S, H, I, NH, NK, D, V))
    return out


def _rmsnorm(rnd, g, dev, dt, el, S, H, I, NH, NK, D, V):
    out = {}
    x, w = rnd(S, H), rnd(H)
    gy = rnd(S, H)
    y, rstd = K.rmsnorm_forward(x, w, 1e-5, 0.0)
    c = {"einfuse": lambda: K.rmsnorm_forward(x, w, 1e-5, 0.0), "eager": lambda: eager_rmsnorm(x, w)}
    cb = {"einfuse": lambda: K.rmsnorm_backward(gy, x, w, rstd, 0.0, True)}
    xe, we = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ye = eager_rmsnorm(xe, we)
    cb["eager"] = lambda: torch.autograd.grad(ye, (xe, we), gy, retain_graph=True)
    if liger() and dev == "cuda":
        from liger_kernel.transformers.functional import liger_rms_norm
        c["liger"] = lambda: liger_rms_norm(x, w, 1e-5)
        xl, wl = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        yl = liger_rms_norm(xl, wl, 1e-5)
        cb["liger"] = lambda: torch.autograd.grad(yl, (xl, wl), gy, retain_graph=True)
    out["rmsnorm fwd"] = (c, 2 * S * H * el, None, lambda: (K.rmsnorm_forward(x, w, 1e-5, 0.0)[0], eager_rmsnorm(x, w)))
    out["rmsnorm bwd"] = (cb, 3 * S * H * el, None, None)
    return out


def _swiglu(rnd, g, dev, dt, el, S, H, I, NH, NK, D, V):
    out = {}
    a, b, gh = rnd(S, I), rnd(S, I), rnd(S, I)
    c = {"einfuse": lambda: K.glu_forward(a, b, "silu"), "eager": lambda: F.silu(a) * b}
    cb = {"einfuse": lambda: K.glu_backward(gh, a, b, "silu")}
    ae, be = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    he = F.silu(ae) * be
    cb["eager"] = lambda: torch.autograd.grad(he, (ae, be), gh, retain_graph=True)
    if liger() and dev == "cuda":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        c["liger"] = lambda: LigerSiLUMulFunction.apply(a, b)
        al, bl = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        hl = LigerSiLUMulFunction.apply(al, bl)
        cb["liger"] = lambda: torch.autograd.grad(hl, (al, bl), gh, retain_graph=True)
    out["swiglu fwd"] = (c, 3 * S * I * el, None, lambda: (K.glu_forward(a, b, "silu"), F.silu(a) * b))
    out["swiglu bwd"] = (cb, 5 * S * I * el, None, None)
    return out


def _rope(rnd, g, dev, dt, el, S, H, I, NH, NK, D, V):
    out = {}
    q, k = rnd(1, NH, S, D), rnd(1, NK, S, D)
    ang = torch.arange(S, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=g)[None]
    cos = torch.cat([ang.cos()] * 2, -1).to(dev, dt)[None]
    sin = torch.cat([ang.sin()] * 2, -1).to(dev, dt)[None]
    c = {"einfuse": lambda: K.rope_forward(q, k, cos, sin, False), "eager": lambda: eager_rope(q, k, cos, sin)}
    if liger() and dev == "cuda":
        from liger_kernel.ops.rope import LigerRopeFunction
        c["liger"] = lambda: LigerRopeFunction.apply(q.clone(), k.clone(), cos, sin)
    rope_bytes = 2 * (NH + NK) * S * D * el
    out["rope fwd"] = (c, rope_bytes, None, lambda: (K.rope_forward(q, k, cos, sin, False)[0], eager_rope(q, k, cos, sin)[0]))
    out["rope bwd"] = ({"einfuse": lambda: K.rope_backward(q, k, cos, sin, False)}, rope_bytes, None, None)
    return out


def _attention(rnd, g, dev, dt, el, S, H, I, NH, NK, D, V):
    out = {}
    q, k, v = rnd(1, NH, S, D), rnd(1, NK, S, D), rnd(1, NK, S, D)
    do = rnd(1, NH, S, D)
    scale = D ** -0.5
    fl = 2 * 2 * NH * S * S * D / 2          # two matmuls, causal half
    c = {"einfuse": lambda: K.attention(q, k, v, None, scale, True, -1, 0.0, False),
         "eager": lambda: eager_attention(q, k, v)}
    if dev == "cuda":
        c["sdpa_flash"] = lambda: sdpa_flash(q, k, v)
    o, lse = K.attention(q, k, v, None, scale, True, -1, 0.0, False)
    cb = {"einfuse": lambda: K.attention_backward(do, None, q, k, v, o, lse, None, scale, True, -1, 0.0, False)}
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    oe = eager_attention(qe, ke, ve)
    cb["eager"] = lambda: torch.autograd.grad(oe, (qe, ke, ve), do, retain_graph=True)
    if dev == "cuda":
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        os_ = sdpa_flash(qs, ks, vs)
        cb["sdpa_flash"] = lambda: torch.autograd.grad(os_, (qs, ks, vs), do, retain_graph=True)
    out["attention fwd"] = (c, None, fl, lambda: (K.attention(q, k, v, None, scale, True, -1, 0.0, False)[0],
                                                 eager_attention(q, k, v)))
    out["attention bwd"] = (cb, None, 2.5 * fl, None)
    return out


def _lce(rnd, g, dev, dt, el, S, H, I, NH, NK, D, V):
    out = {}
    xh, wv = rnd(S, H, scale=0.5), rnd(V, H, scale=0.02)
    yl = torch.randint(0, V, (S,), generator=g).to(dev)
    fl = 2 * S * V * H
    c = {"einfuse": lambda: K.linear_cross_entropy(xh, wv, yl, None, -100, "mean", 0.0, 0.0, False, False, False, False),
         "eager": lambda: eager_lce(xh, wv, yl)}
    cb = {"einfuse": lambda: K.linear_cross_entropy(xh, wv, yl, None, -100, "mean", 0.0, 0.0, False, True, True, False)}
    xe, we = xh.detach().clone().requires_grad_(), wv.detach().clone().requires_grad_()
    cb["eager"] = lambda: torch.autograd.grad(eager_lce(xe, we, yl), (xe, we))
    if liger() and dev == "cuda":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        c["liger"] = lambda: LigerFusedLinearCrossEntropyFunction.apply(xh, wv, yl)
        xl, wl = xh.detach().clone().requires_grad_(), wv.detach().clone().requires_grad_()
        cb["liger"] = lambda: torch.autograd.grad(LigerFusedLinearCrossEntropyFunction.apply(xl, wl, yl), (xl, wl))
    out["linear_cross_entropy fwd"] = (c, None, fl, lambda: (K.linear_cross_entropy(
        xh, wv, yl, None, -100, "mean", 0.0, 0.0, False, False, False, False)[0], eager_lce(xh, wv, yl).to(dt)))
    out["linear_cross_entropy fwd+bwd"] = (cb, None, 3 * fl, None)
    return out


# ---------------------------------------------------------------------------------------

def time_interleaved(contenders: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call, contenders interleaved within each round."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {n: [] for n in contenders}
    for _ in range(rounds):
        for n, fn in contenders.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times[n].append(a.elapsed_time(b))
    return {n: statistics.median(t) for n, t in times.items()}


def smoke() -> int:
    """Every contender once at tiny shapes under the interpreter; the kernels checked against eager."""
    bad = 0
    for name, (cont, _, _, check) in cases(24, "cpu", torch.float32, small=True).items():
        for n, fn in cont.items():
            fn()
        if check is not None:
            got, want = check()
            err = float((got.float() - want.float()).norm() / want.float().norm())
            ok = err < 1e-4
            bad += not ok
            print(f"smoke {name:32s} contenders {sorted(cont)}: kernel vs eager rel err {err:.2e} {'ok' if ok else 'FAIL'}")
        else:
            print(f"smoke {name:32s} contenders {sorted(cont)}: ran")
    print("smoke run under TRITON_INTERPRET=1 on the CPU: nothing was timed; GPU speed not measured")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter, untimed")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA GPU here. benchmarks/kernels.py measures the generated Triton kernels on a GPU "
              "only; nothing was measured (GPU speed not yet measured).")
        return 0
    dev_name = torch.cuda.get_device_name()
    print(f"device: {dev_name}; tokens {args.tokens}; bf16; liger_kernel {'installed' if liger() else 'not installed'}")
    rows = []
    for name, (cont, nbytes, flops, _) in cases(args.tokens, "cuda", torch.bfloat16, small=False).items():
        t = time_interleaved(cont, args.rounds)
        te = t["einfuse"]
        rate = (f"{nbytes / te / 1e6:.0f} GB/s" if nbytes else f"{flops / te / 1e9:.1f} TFLOP/s")
        row = {"op": name, "einfuse_ms": te, "rate": rate}
        for other in ("eager", "sdpa_flash", "liger"):
            if other in t:
                row[f"{other}_ms"] = t[other]
                row[f"speedup_vs_{other}"] = t[other] / te
        rows.append(row)
        print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    tag = "".join(ch if ch.isalnum() else "_" for ch in dev_name)
    (RESULTS / f"kernels_{tag}.json").write_text(json.dumps({"device": dev_name, "tokens": args.tokens,
                                                              "rounds": args.rounds, "rows": rows}, indent=1))
    lines = ["| op | einfuse ms | rate | eager ms | x eager | SDPA flash ms | x SDPA | Liger ms | x Liger |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(k, fmt="{:.3f}"):
            return fmt.format(r[k]) if k in r else "-"
        lines.append(f"| {r['op']} | {r['einfuse_ms']:.3f} | {r['rate']} | {cell('eager_ms')} | "
                     f"{cell('speedup_vs_eager', '{:.2f}')} | {cell('sdpa_flash_ms')} | {cell('speedup_vs_sdpa_flash', '{:.2f}')} | "
                     f"{cell('liger_ms')} | {cell('speedup_vs_liger', '{:.2f}')} |")
    (RESULTS / f"kernels_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
