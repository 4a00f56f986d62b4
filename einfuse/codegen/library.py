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


def linear_cross_entropy_forward() -> Cascade:
    """Log-sum-exp of the logits X @ W^T without materialising them (no bias, no cap): see
    `linear_cross_entropy_lse`. The loss is LSE - X . W[target], which the host computes."""
    return linear_cross_entropy_lse()


# ---------------------------------------------------------------------------------------
# attention backward (contraction programs; no online softmax: LSE and DELTA come from
# the forward and a row program, so every sum over the iterated rank is a plain running sum)

def _running_sum(local: str, run: str, outer: str, ranks: tuple[str, ...], expr: Node, inner: str) -> tuple:
    """LOCAL[outer, *ranks] = sum_inner expr;  RUN[outer+1, *ranks] = RUN[outer, *ranks] + LOCAL (from 0)."""
    return (Einsum(local, (outer,) + ranks, expr, Op.SUM, (inner,)),
            Einsum(run, (f"{outer}+1",) + ranks, _add(read(run, outer, *ranks), read(local, outer, *ranks)), init=0.0))


def _scores(scale: float, mask: str | None, softcap: float, qk: Node, m_read: Node | None, tile: tuple) -> tuple:
    """The Einsums from the contraction BQK to the masked scores BMQK (and BT = tanh(BQK/cap)
    under soft-capping), indexed by `tile` (the loop ranks then the parallel rank)."""
    es = [Einsum("BQK", tile, _mul(const(scale), *qk.src) if scale != 1.0 else qk, Op.SUM, ("e",))]
    x = read("BQK", *tile)
    if softcap > 0:
        es.append(Einsum("BT", tile, _f(Op.TANH, _mul(x, const(1.0 / softcap)))))
        x = _mul(const(softcap), read("BT", *tile))
    if mask == "additive":
        x = _add(x, m_read)
    elif mask in ("bool", "causal"):
        x = node(Op.WHERE, (m_read, x, const(float("-inf"))))
    elif mask is not None:
        raise ValueError(f"mask kind {mask!r}")
    es.append(Einsum("BMQK", tile, x))
    return tuple(es)


def _ds(tile: tuple, lse: Node, delta: Node, softcap: float) -> tuple:
    """BP = exp(BMQK - LSE) (the probabilities, recomputed), BDS = BP * (BDP - DELTA) [* (1 - BT^2)]."""
    es = [Einsum("BP", tile, _f(Op.EXP, _add(read("BMQK", *tile), _neg(lse))))]
    ds = _mul(read("BP", *tile), _add(read("BDP", *tile), _neg(delta)))
    if softcap > 0:
        ds = _mul(ds, _add(const(1.0), _neg(_mul(read("BT", *tile), read("BT", *tile)))))
    return tuple(es), Einsum("BDS", tile, ds)


@functools.lru_cache(maxsize=256)
def attention_backward_dq(scale: float, mask: str | None = None, softcap: float = 0.0) -> Cascade:
    """dQ = scale * sum_m dS[p,m] K[m,e], dS = P * (dP - DELTA), P = exp(S - LSE), dP = dO V^T;
    query rows p in parallel, keys m iterated in tiles (m1, m0)."""
    tile = ("m1", "m0", "p")
    q, k, v, do = read("Q", "p", "e"), read("K", "m1", "m0", "e"), read("V", "m1", "m0", "f"), read("DO", "p", "f")
    es = list(_scores(scale, mask, softcap, _mul(q, k), read("M", "p", "m1", "m0"), tile))
    pe, ds = _ds(tile, read("LSE", "p"), read("DELTA", "p"), softcap)
    es += list(pe)
    es.append(Einsum("BDP", tile, _mul(do, v), Op.SUM, ("f",)))
    es.append(ds)
    es += _running_sum("LDQ", "RDQ", "m1", ("p", "e"), _mul(read("BDS", *tile), k), "m0")
    es.append(Einsum("DQ", ("p", "e"), _mul(const(scale), read("RDQ", "M1", "p", "e"))))
    ins = [("Q", ("p", "e")), ("K", ("m", "e")), ("V", ("m", "f")), ("DO", ("p", "f")), ("LSE", ("p",)),
           ("DELTA", ("p",))]
    if mask is not None:
        ins.append(("M", ("p", "m")))
    return Cascade("attention_bwd_dq", tuple(ins), tuple(es), ("DQ",), (), (("m", "m1", "m0"),))


@functools.lru_cache(maxsize=256)
def attention_backward_dkdv(scale: float, mask: str | None = None, softcap: float = 0.0) -> Cascade:
    """dK = scale * sum_p dS[p,m] Q[p,e], dV = sum_p P[p,m] dO[p,f]; keys m in parallel, query
    rows p iterated in tiles (p1, p0). Run per query head: the host sums a GQA group's dK, dV."""
    tile = ("p1", "p0", "m")
    q, k, v, do = read("Q", "p1", "p0", "e"), read("K", "m", "e"), read("V", "m", "f"), read("DO", "p1", "p0", "f")
    es = list(_scores(scale, mask, softcap, _mul(k, q), read("M", "p1", "p0", "m"), tile))
    pe, ds = _ds(tile, read("LSE", "p1", "p0"), read("DELTA", "p1", "p0"), softcap)
    es += list(pe)
    es += _running_sum("LDV", "RDV", "p1", ("m", "f"), _mul(read("BP", *tile), do), "p0")
    es.append(Einsum("BDP", tile, _mul(v, do), Op.SUM, ("f",)))
    es.append(ds)
    es += _running_sum("LDK", "RDK", "p1", ("m", "e"), _mul(read("BDS", *tile), q), "p0")
    es.append(Einsum("DK", ("m", "e"), _mul(const(scale), read("RDK", "P1", "m", "e"))))
    es.append(Einsum("DV", ("m", "f"), read("RDV", "P1", "m", "f")))
    ins = [("Q", ("p", "e")), ("K", ("m", "e")), ("V", ("m", "f")), ("DO", ("p", "f")), ("LSE", ("p",)),
           ("DELTA", ("p",))]
    if mask is not None:
        ins.append(("M", ("p", "m")))
    return Cascade("attention_bwd_dkdv", tuple(ins), tuple(es), ("DK", "DV"), (), (("p", "p1", "p0"),))


@functools.lru_cache(maxsize=8)
def attention_backward_delta() -> Cascade:
    """DELTA[r] = sum_f DO[r,f] O[r,f] - DLSE[r] (a row program): the row term of dS."""
    es = (Einsum("DOTS", ("r",), _mul(read("DO", "r", "f"), read("O", "r", "f")), Op.SUM, ("f",)),
          Einsum("DELTA", ("r",), _add(read("DOTS", "r"), _neg(read("DLSE", "r")))))
    return Cascade("attention_bwd_delta", (("DO", ("r", "f")), ("O", ("r", "f")), ("DLSE", ("r",))), es, ("DELTA",))


# ---------------------------------------------------------------------------------------
# linear cross-entropy with bias and soft-capping, and its backward

def _lce_logits(tile: tuple, x: Node, w: Node, b: Node | None, softcap: float) -> tuple:
    """BZ = sum_e X W (+ B), BT = tanh(BZ / cap), BZC = cap * BT: the (capped) logits of a tile."""
    es = [Einsum("BZ", tile, _mul(x, w), Op.SUM, ("e",))]
    z = read("BZ", *tile)
    if b is not None:
        es.append(Einsum("BZB", tile, _add(z, b)))
        z = read("BZB", *tile)
    if softcap > 0:
        es.append(Einsum("BT", tile, _f(Op.TANH, _mul(z, const(1.0 / softcap)))))
        es.append(Einsum("BZC", tile, _mul(const(softcap), read("BT", *tile))))
    return tuple(es)


def _lce_logit_name(bias: bool, softcap: float) -> str:
    return "BZC" if softcap > 0 else ("BZB" if bias else "BZ")


@functools.lru_cache(maxsize=64)
def linear_cross_entropy_lse(bias: bool = False, softcap: float = 0.0) -> Cascade:
    """LSE[p] = log sum_v exp(Z[p,v]), Z = cap * tanh((X W^T + B) / cap): the 2-pass cascade made
    1-pass by `online_softmax` over vocabulary tiles (v1, v0)."""
    from einfuse.ir.attention_cascades import online_softmax
    x, w = read("X", "p", "e"), read("W", "v", "e")
    es = [Einsum("Z", ("p", "v"), _mul(x, w), Op.SUM, ("e",))]
    z = read("Z", "p", "v")
    if bias:
        es.append(Einsum("ZB", ("p", "v"), _add(z, read("B", "v"))))
        z = read("ZB", "p", "v")
    if softcap > 0:
        es.append(Einsum("ZC", ("p", "v"), _mul(const(softcap), _f(Op.TANH, _mul(z, const(1.0 / softcap))))))
        z = read("ZC", "p", "v")
    es += [
        Einsum("GM", ("p",), z, Op.MAX, ("v",)),
        Einsum("SN", ("p", "v"), _f(Op.EXP, _add(z, _neg(read("GM", "p"))))),
        Einsum("SD", ("p",), read("SN", "p", "v"), Op.SUM, ("v",)),
        Einsum("LSE", ("p",), _add(read("GM", "p"), _f(Op.LOG, read("SD", "p")))),
    ]
    ins = (("X", ("p", "e")), ("W", ("v", "e"))) + ((("B", ("v",)),) if bias else ())
    name = "linear_cross_entropy_fwd" + ("_bias" if bias else "") + ("_softcap" if softcap > 0 else "")
    return online_softmax(Cascade(name, ins, tuple(es), ("LSE",)), rank="v", outer="v1", inner="v0")


def _lce_grad_tile(tile: tuple, lse: Node, a: Node, bias: bool, softcap: float) -> Einsum:
    """BG = A * exp(Z - LSE) [* (1 - BT^2)]: dloss/dlogit without the one-hot term (the host's)."""
    g = _mul(a, _f(Op.EXP, _add(read(_lce_logit_name(bias, softcap), *tile), _neg(lse))))
    if softcap > 0:
        g = _mul(g, _add(const(1.0), _neg(_mul(read("BT", *tile), read("BT", *tile)))))
    return Einsum("BG", tile, g)


@functools.lru_cache(maxsize=64)
def linear_cross_entropy_backward_dx(bias: bool = False, softcap: float = 0.0) -> Cascade:
    """DX[p,e] = sum_v G[p,v] W[v,e], G = A[p] softmax(Z)[p,v] (* cap'); rows p in parallel,
    the vocabulary iterated in tiles (v1, v0). The host subtracts the one-hot term."""
    tile = ("v1", "v0", "p")
    x, w = read("X", "p", "e"), read("W", "v1", "v0", "e")
    es = list(_lce_logits(tile, x, w, read("B", "v1", "v0") if bias else None, softcap))
    es.append(_lce_grad_tile(tile, read("LSE", "p"), read("A", "p"), bias, softcap))
    es += _running_sum("LDX", "RDX", "v1", ("p", "e"), _mul(read("BG", *tile), w), "v0")
    es.append(Einsum("DX", ("p", "e"), read("RDX", "V1", "p", "e")))
    ins = [("X", ("p", "e")), ("W", ("v", "e")), ("LSE", ("p",)), ("A", ("p",))] + ([("B", ("v",))] if bias else [])
    return Cascade("linear_cross_entropy_bwd_dx" + ("_bias" if bias else "") + ("_softcap" if softcap > 0 else ""),
                   tuple(ins), tuple(es), ("DX",), (), (("v", "v1", "v0"),))


@functools.lru_cache(maxsize=64)
def linear_cross_entropy_backward_dw(bias: bool = False, softcap: float = 0.0) -> Cascade:
    """DW[v,e] = sum_p G[p,v] X[p,e] and DB[v] = sum_p G[p,v]; vocabulary rows v in parallel, the
    tokens iterated in tiles (p1, p0). The host subtracts the one-hot term."""
    tile = ("p1", "p0", "v")
    x, w = read("X", "p1", "p0", "e"), read("W", "v", "e")
    es = list(_lce_logits(tile, w, x, read("B", "v") if bias else None, softcap))
    es.append(_lce_grad_tile(tile, read("LSE", "p1", "p0"), read("A", "p1", "p0"), bias, softcap))
    es += _running_sum("LDW", "RDW", "p1", ("v", "e"), _mul(read("BG", *tile), x), "p0")
    es.append(Einsum("DW", ("v", "e"), read("RDW", "P1", "v", "e")))
    outs = ("DW",)
    if bias:
        es += _running_sum("LDB", "RDB", "p1", ("v",), read("BG", *tile), "p0")
        es.append(Einsum("DB", ("v",), read("RDB", "P1", "v")))
        outs = ("DW", "DB")
    ins = [("X", ("p", "e")), ("W", ("v", "e")), ("LSE", ("p",)), ("A", ("p",))] + ([("B", ("v",))] if bias else [])
    return Cascade("linear_cross_entropy_bwd_dw" + ("_bias" if bias else "") + ("_softcap" if softcap > 0 else ""),
                   tuple(ins), tuple(es), outs, (), (("p", "p1", "p0"),))
