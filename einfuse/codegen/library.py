"""The cascades the fused ops run, forward and backward, built from an op call's parameters.

These are IR data, not kernels (memoised: the same call gives the same Cascade object, which
is the launcher's fast path to a loaded kernel): `einfuse.codegen.generate` turns each into Triton source.
Rows are the flattened leading dimensions (rank r) unless an op needs them apart (RoPE's
cos/sin broadcast over batch and heads: ranks b, n, s). Constants (eps, 1/H) are literals
in the cascade, so the kernel is specialised on them, as the cascade a pass records is.

The exact-GELU derivative needs the normal CDF Phi, and the IR has no erf op; it is written
with GELU itself: Phi(x) = 1/2 + Phi(a) - Phi(b), a = max(x, d), b = max(-x, d), with
Phi(y) = gelu(y)/y (exact away from 0; |error| <= 0.4 d = 4e-21 for |x| < d). An `Op.ERF`
in the IR would make this `(1 + erf(x/sqrt 2))/2`.
"""

from __future__ import annotations

import functools
import math

from einfuse.ir.cascade import Cascade, Einsum, read
from einfuse.ir.node import Node, Op, const, node

ACTS = ("silu", "gelu", "gelu_tanh")


def _mul(*xs: Node) -> Node:
    return xs[0] if len(xs) == 1 else node(Op.MUL, tuple(xs))


def _add(*xs: Node) -> Node:
    return xs[0] if len(xs) == 1 else node(Op.ADD, tuple(xs))


def _neg(x: Node) -> Node:
    return node(Op.MUL, (const(-1.0), x))


def _f(op: Op, x: Node, arg=None) -> Node:
    return node(op, (x,), arg)


def _plus(x: Node, c: float) -> Node:
    return _add(x, const(c)) if c else x


# ---------------------------------------------------------------------------------------
# RMSNorm

@functools.lru_cache(maxsize=256)
def rmsnorm_forward(hidden: int, eps: float, offset: float = 0.0) -> Cascade:
    """Y = X * RSTD * (W + offset), RSTD = rsqrt(mean_h X^2 + eps); RSTD is saved for backward."""
    x, w = read("X", "r", "h"), read("W", "h")
    es = (
        Einsum("SS", ("r",), _mul(x, x), Op.SUM, ("h",)),
        Einsum("RSTD", ("r",), _f(Op.RSQRT, _add(_mul(const(1.0 / hidden), read("SS", "r")), const(eps)))),
        Einsum("Y", ("r", "h"), _mul(x, read("RSTD", "r"), _plus(w, offset))),
    )
    return Cascade("rmsnorm_fwd", (("X", ("r", "h")), ("W", ("h",))), es, ("Y", "RSTD"))


@functools.lru_cache(maxsize=256)
def rmsnorm_backward(hidden: int, offset: float = 0.0, weight_grad: bool = True) -> Cascade:
    """DX = RSTD * (G*W' - X*RSTD * mean_h(G*W'*X*RSTD)), DW = sum_r G*X*RSTD (W' = W + offset)."""
    g, x, rs = read("G", "r", "h"), read("X", "r", "h"), read("RSTD", "r")
    wo = _plus(read("W", "h"), offset)
    es = [
        Einsum("DOT", ("r",), _mul(g, wo, x, rs), Op.SUM, ("h",)),
        Einsum("DX", ("r", "h"), _mul(rs, _add(_mul(g, wo), _neg(_mul(const(1.0 / hidden), x, rs, read("DOT", "r")))))),
    ]
    outs = ("DX",)
    if weight_grad:
        es.append(Einsum("DW", ("h",), _mul(g, x, rs), Op.SUM, ("r",)))
        outs = ("DX", "DW")
    ins = (("G", ("r", "h")), ("X", ("r", "h")), ("W", ("h",)), ("RSTD", ("r",)))
    return Cascade("rmsnorm_bwd", ins, tuple(es), outs)


# ---------------------------------------------------------------------------------------
# gated linear units

def act(x: Node, kind: str) -> Node:
    if kind == "silu":
        return _mul(x, _f(Op.SIGMOID, x))
    if kind == "gelu":
        return _f(Op.GELU, x, "none")
    if kind == "gelu_tanh":
        return _f(Op.GELU, x, "tanh")
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTS}")


def _phi_cdf(x: Node, d: float = 1e-20) -> Node:
    """Phi(x) from GELU (see the module docstring)."""
    a = node(Op.MAX2, (x, const(d)))
    b = node(Op.MAX2, (_neg(x), const(d)))
    phi_a = _mul(_f(Op.GELU, a, "none"), _f(Op.RECIP, a))
    phi_b = _mul(_f(Op.GELU, b, "none"), _f(Op.RECIP, b))
    return _add(const(0.5), phi_a, _neg(phi_b))


def act_grad(x: Node, kind: str) -> Node:
    """d act(x) / dx, the formulas of aten.silu_backward / aten.gelu_backward."""
    if kind == "silu":
        s = _f(Op.SIGMOID, x)
        return _mul(s, _add(const(1.0), _mul(x, _add(const(1.0), _neg(s)))))
    if kind == "gelu":
        pdf = _mul(const(1.0 / math.sqrt(2.0 * math.pi)), _f(Op.EXP, _mul(const(-0.5), x, x)))
        return _add(_phi_cdf(x), _mul(x, pdf))
    if kind == "gelu_tanh":
        k, kappa = math.sqrt(2.0 / math.pi), 0.044715
        t = _f(Op.TANH, _mul(const(k), _add(x, _mul(const(kappa), x, x, x))))
        left = _mul(const(0.5), _add(const(1.0), t))
        right = _mul(const(0.5 * k), x, _add(const(1.0), _neg(_mul(t, t))),
                     _add(const(1.0), _mul(const(3.0 * kappa), x, x)))
        return _add(left, right)
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTS}")


@functools.lru_cache(maxsize=256)
def glu_forward(kind: str = "silu") -> Cascade:
    """H = act(G) * U."""
    g, u = read("G", "r", "i"), read("U", "r", "i")
    es = (Einsum("H", ("r", "i"), _mul(act(g, kind), u)),)
    return Cascade(f"glu_{kind}_fwd", (("G", ("r", "i")), ("U", ("r", "i"))), es, ("H",))


@functools.lru_cache(maxsize=256)
def glu_backward(kind: str = "silu") -> Cascade:
    """DG = DH * U * act'(G), DU = DH * act(G); act(G) and act'(G) are recomputed from G."""
    dh, g, u = read("DH", "r", "i"), read("G", "r", "i"), read("U", "r", "i")
    es = (Einsum("DG", ("r", "i"), _mul(dh, u, act_grad(g, kind))),
          Einsum("DU", ("r", "i"), _mul(dh, act(g, kind))))
    ins = (("DH", ("r", "i")), ("G", ("r", "i")), ("U", ("r", "i")))
    return Cascade(f"glu_{kind}_bwd", ins, es, ("DG", "DU"))


# ---------------------------------------------------------------------------------------
# RoPE

@functools.lru_cache(maxsize=256)
def rope(inverse: bool = False, shared_halves: bool = False) -> Cascade:
    """Rotate feature pairs (X1, X2) by the angles with cos (C1, C2) and sin (S1, S2):
        forward  Y1 = X1*C1 - X2*S1,  Y2 = X2*C2 + X1*S2
        inverse  Y1 = X1*C1 + X2*S2,  Y2 = X2*C2 - X1*S1   (the transpose, for gradients)
    The pairs are strided views chosen by the host (rotate-half or interleaved); cos/sin are
    indexed by (b, s, j), broadcast over heads n. shared_halves: C1 = C2 = C, S1 = S2 = S."""
    xr = ("b", "n", "s", "j")
    x1, x2 = read("X1", *xr), read("X2", *xr)
    if shared_halves:
        c1 = c2 = read("C", "b", "s", "j")
        s1 = s2 = read("S", "b", "s", "j")
        cs = (("C", ("b", "s", "j")), ("S", ("b", "s", "j")))
    else:
        c1, c2 = read("C1", "b", "s", "j"), read("C2", "b", "s", "j")
        s1, s2 = read("S1", "b", "s", "j"), read("S2", "b", "s", "j")
        cs = tuple((n, ("b", "s", "j")) for n in ("C1", "C2", "S1", "S2"))
    if inverse:
        y1 = _add(_mul(x1, c1), _mul(x2, s2))
        y2 = _add(_mul(x2, c2), _neg(_mul(x1, s1)))
    else:
        y1 = _add(_mul(x1, c1), _neg(_mul(x2, s1)))
        y2 = _add(_mul(x2, c2), _mul(x1, s2))
    es = (Einsum("Y1", xr, y1), Einsum("Y2", xr, y2))
    name = "rope_" + ("bwd" if inverse else "fwd") + ("_shared" if shared_halves else "")
    return Cascade(name, (("X1", xr), ("X2", xr)) + cs, es, ("Y1", "Y2"))


# ---------------------------------------------------------------------------------------
# softmax and cross-entropy over given logits

@functools.lru_cache(maxsize=256)
def softmax_forward() -> Cascade:
    x = read("X", "r", "v")
    es = (
        Einsum("GM", ("r",), x, Op.MAX, ("v",)),
        Einsum("SN", ("r", "v"), _f(Op.EXP, _add(x, _neg(read("GM", "r"))))),
        Einsum("SD", ("r",), read("SN", "r", "v"), Op.SUM, ("v",)),
        Einsum("Y", ("r", "v"), _mul(read("SN", "r", "v"), _f(Op.RECIP, read("SD", "r")))),
    )
    return Cascade("softmax_fwd", (("X", ("r", "v")),), es, ("Y",))


@functools.lru_cache(maxsize=256)
def softmax_backward() -> Cascade:
    g, y = read("G", "r", "v"), read("Y", "r", "v")
    es = (Einsum("DOT", ("r",), _mul(g, y), Op.SUM, ("v",)),
          Einsum("DX", ("r", "v"), _mul(y, _add(g, _neg(read("DOT", "r"))))))
    return Cascade("softmax_bwd", (("G", ("r", "v")), ("Y", ("r", "v"))), es, ("DX",))


@functools.lru_cache(maxsize=256)
def cross_entropy_forward() -> Cascade:
    """LOSS = LSE - XT, LSE = log sum_v exp(X) (max-shifted); XT[r] = X[r, target[r]] is
    gathered by the host (an index, not an Einsum)."""
    x = read("X", "r", "v")
    es = (
        Einsum("GM", ("r",), x, Op.MAX, ("v",)),
        Einsum("SE", ("r",), _f(Op.EXP, _add(x, _neg(read("GM", "r")))), Op.SUM, ("v",)),
        Einsum("LSE", ("r",), _add(read("GM", "r"), _f(Op.LOG, read("SE", "r")))),
        Einsum("LOSS", ("r",), _add(read("LSE", "r"), _neg(read("XT", "r")))),
    )
    return Cascade("cross_entropy_fwd", (("X", ("r", "v")), ("XT", ("r",))), es, ("LOSS", "LSE"))


@functools.lru_cache(maxsize=256)
def cross_entropy_backward() -> Cascade:
    """DX = softmax(X) * G = exp(X - LSE) * G; the host subtracts G at the target."""
    x = read("X", "r", "v")
    es = (Einsum("DX", ("r", "v"), _mul(_f(Op.EXP, _add(x, _neg(read("LSE", "r")))), read("G", "r"))),)
    return Cascade("cross_entropy_bwd", (("X", ("r", "v")), ("LSE", ("r",)), ("G", ("r",))), es, ("DX",))


# ---------------------------------------------------------------------------------------
# attention (contraction program)

@functools.lru_cache(maxsize=256)
def attention_forward(scale: float, mask: str | None = None, softcap: float = 0.0) -> Cascade:
    """The 1-pass cascade `einfuse.ir.attention_cascades.derive` gives (online softmax over key
    tiles m1), plus the per-row log-sum-exp LSE = RM + log RD that backward needs."""
    from einfuse.ir.attention_cascades import derive
    c = derive(scale, mask, softcap)["1-pass"]
    lse = Einsum("LSE", ("p",), _add(read("RM", "M1", "p"), _f(Op.LOG, read("RD", "M1", "p"))))
    return Cascade("attention_fwd", c.inputs, c.einsums + (lse,), c.outputs + ("LSE",), c.notes, c.splits)


@functools.lru_cache(maxsize=64)
def linear_cross_entropy_forward() -> Cascade:
    """Log-sum-exp of the logits X @ W^T without materialising them: the 2-pass cascade
    (max, then sum of exp) turned 1-pass by `online_softmax` over vocabulary tiles (v1, v0).
    The loss is LSE - X . W[target], which the host computes (a gather and a row dot)."""
    from einfuse.ir.attention_cascades import online_softmax
    x, w = read("X", "p", "e"), read("W", "v", "e")
    es = (
        Einsum("Z", ("p", "v"), _mul(x, w), Op.SUM, ("e",)),
        Einsum("GM", ("p",), read("Z", "p", "v"), Op.MAX, ("v",)),
        Einsum("SN", ("p", "v"), _f(Op.EXP, _add(read("Z", "p", "v"), _neg(read("GM", "p"))))),
        Einsum("SD", ("p",), read("SN", "p", "v"), Op.SUM, ("v",)),
        Einsum("LSE", ("p",), _add(read("GM", "p"), _f(Op.LOG, read("SD", "p")))),
    )
    c = Cascade("linear_cross_entropy_fwd", (("X", ("p", "e")), ("W", ("v", "e"))), es, ("LSE",))
    return online_softmax(c, rank="v", outer="v1", inner="v0")
