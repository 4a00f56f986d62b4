"""The IO model: bytes moved between slow memory (HBM) and an on-chip memory of M bytes.

Each compute node is one kernel; views move nothing. Per op (`io_rules`, default:
streaming):
  * streaming (elementwise, reductions, copies): every input read once (a broadcast
    input's distinct elements), every output and internal result written once;
  * a row-wise op whose row does not fit on chip (row * 4 bytes > M) sweeps it in HBM
    once per pass of its cascade: softmax, log_softmax and cross_entropy 3 (max, sum,
    normalise), layer_norm and rms_norm 2 (statistics, normalise);
  * contractions: the tiled GEMM. With an fp32 accumulator tile of T x T on chip,
    T = floor(sqrt(M / 4)), an [m, k] x [k, n] product reads A once per column tile
    and B once per row tile: e * (m*k*max(1, n/T) + k*n*max(1, m/T)) per batch, and
    writes the output once;
  * attention (fused, and SDPA): the FlashAttention schedule. A query tile of Br rows
    and its output accumulator stay on chip, Br = M / (2 * (e*D + 4*Dv)) (half of M;
    the other half holds a key/value tile and the scores); K and V are read once per
    query tile, G*S/Br times for G query heads sharing a kv head; Q, O, lse and the
    mask once. For D = Dv this is e*B*Hkv*T*2D*G*S*2*(e+4)*D/M, i.e. Θ(N²d²/M);
  * linear_cross_entropy (fused): the logits GEMM with the logits tile kept on chip
    (never written), labels and the loss once; when it computes gradients in the
    forward, the two gradient GEMMs read the operands again (logits tile recomputed
    on chip) and write grad_hidden / grad_weight once;
  * glu_mlp (fused): gate and up as one GEMM against [2I, H], writing g, u and h,
    then the down GEMM reading h;
  * rms_norm and add_rms_norm (fused): the row read once when it fits on chip, twice
    otherwise (add_rms_norm: x and residual read, h = x + residual written, for backward
    and the residual stream).

Lower bounds (`lower_bound`): every op reads its inputs once and writes its outputs
(and the results it saves for backward) once -- the compulsory traffic; attention:
also Ω(N²d²/M) per (batch, head) for M >= d² ("The I/O Complexity of Attention, or How
Optimal is Flash Attention?", Saha and Ye 2024), in bytes e² * S*T*D*Dv / M, so the
bound is the larger of the two; linear_cross_entropy: hidden, weight and labels read
once and the loss (and the gradients it saves) written once -- the logits need never
leave the chip.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import sympy

from .symbolic import NodeCost, TVal, prod

__all__ = ["node_traffic", "node_compulsory", "node_lower_bound", "io_rules", "gemm_traffic"]


def _max1(x: Any) -> Any:
    x = sympy.sympify(x)
    if x.is_number:
        return x if x > 1 else sympy.Integer(1)
    return sympy.Max(1, x, evaluate=False)


def tile(M: int) -> int:
    return max(1, int(math.isqrt(max(1, M // 4))))


def gemm_traffic(batch, m, n, k, e: int, M: int) -> Any:
    T = sympy.Rational(1, tile(M))
    return batch * e * (m * k * _max1(T * n) + k * n * _max1(T * m))


def _streaming(nc: NodeCost) -> Any:
    """One streaming pass: every input read once, everything the op writes written once."""
    return nc.bytes_read + nc.bytes_written


def node_compulsory(nc: NodeCost) -> Any:
    """Inputs read once, outputs and the internal results kept for backward written once (the
    internal results an op writes and does not keep -- glu_mlp's g and u in inference -- are not
    compulsory)."""
    scratch = sum(b for b, saved, _ in nc.hidden if not saved)
    return nc.bytes_read + nc.bytes_written - scratch


def _out_bytes(nc: NodeCost) -> Any:
    return nc.bytes_written


def _row_passes(passes: int):
    def rule(nc: NodeCost, M: int):
        x = nc.ins[0] if nc.ins else None
        if x is None or not x.shape:
            return _streaming(nc)
        row = x.shape[-1]
        if isinstance(row, int) and row * 4 <= M:
            return _streaming(nc)
        n = passes if isinstance(row, int) else sympy.Piecewise((1, row * 4 <= M), (passes, True))
        return nc.bytes_read + (n - 1) * x.distinct_bytes + nc.bytes_written
    return rule


def _other_inputs(nc: NodeCost, exclude) -> Any:
    """Bytes of the inputs read once besides the given ones (ids of TVals)."""
    from .cost_rules import distinct_inputs
    return sum(t.distinct_bytes for t in distinct_inputs(nc.ins) if id(t) not in exclude)


def _gemm_rule(nc: NodeCost, M: int):
    gemms = nc.io.get("gemms", [])
    if not gemms:
        return _streaming(nc)
    # the tiled GEMMs' operand traffic replaces reading the operands once; a bias once
    others = _other_inputs(nc, nc.io.get("operands", set()))
    return sum(gemm_traffic(b, m, n, k, e, M) for b, m, n, k, e in gemms) + others + nc.bytes_written


def _attn_tiles(q: TVal, k: TVal, v: TVal, M: int):
    bh = prod(q.shape[:-2])
    bhk = prod(k.shape[:-2])
    s, t, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    e = q.itemsize
    br = max(1, M // (2 * (e * d + 4 * dv))) if isinstance(d, int) and isinstance(dv, int) else None
    return bh, bhk, s, t, d, dv, e, br


def _attention_rule(nc: NodeCost, M: int):
    if len(nc.ins) < 3:
        return _streaming(nc)
    q, k, v = nc.ins[:3]
    bh, bhk, s, t, d, dv, e, br = _attn_tiles(q, k, v, M)
    if br is None:
        return _streaming(nc)
    g = sympy.sympify(bh) / bhk
    reps = _max1(g * s * sympy.Rational(1, br))
    kv = bhk * t * (d + dv) * e
    rest = _other_inputs(nc, {id(k), id(v)})
    if k is q or v is q:          # q, k, v one tensor: q's single read is part of the K/V traffic
        rest = rest + q.distinct_bytes
    return rest + kv * reps + nc.bytes_written


def _lce_rule(nc: NodeCost, M: int):
    if len(nc.ins) < 2:
        return _streaming(nc)
    h, w = nc.ins[0], nc.ins[1]
    n, hd, v = prod(h.shape[:-1]), h.shape[-1], w.shape[0]
    e = h.itemsize
    passes = len(nc.io.get("gemms", [])) or 1
    gemm = gemm_traffic(1, n, v, hd, e, M)
    return passes * gemm + _other_inputs(nc, {id(h), id(w)}) + nc.bytes_written


def _glu_mlp_rule(nc: NodeCost, M: int):
    if len(nc.ins) < 4:
        return _streaming(nc)
    x, wg, wu, wd = nc.ins[:4]
    n, hd, i, h2 = prod(x.shape[:-1]), x.shape[-1], wg.shape[0], wd.shape[0]
    e = x.itemsize
    up = gemm_traffic(1, n, 2 * i, hd, e, M)
    down = gemm_traffic(1, n, h2, i, e, M)
    h_bytes = n * i * e
    return up + down + h_bytes + _other_inputs(nc, {id(x), id(wg), id(wu), id(wd)}) + nc.bytes_written


io_rules: dict[str, Callable[[NodeCost, int], Any]] = {
    "softmax": _row_passes(3), "log_softmax": _row_passes(3), "cross_entropy": _row_passes(3),
    "layer_norm": _row_passes(2), "rms_norm": _row_passes(2),
    "add_rms_norm": _row_passes(2),
    "linear": _gemm_rule, "matmul": _gemm_rule, "mm": _gemm_rule, "bmm": _gemm_rule, "addmm": _gemm_rule,
    "baddbmm": _gemm_rule, "addbmm": _gemm_rule, "einsum": _gemm_rule,
    "attention": _attention_rule, "scaled_dot_product_attention": _attention_rule,
    "linear_cross_entropy": _lce_rule, "glu_mlp": _glu_mlp_rule,
}


def node_traffic(nc: NodeCost, M: int) -> Any:
    """Bytes this node moves between HBM and on-chip memory of M bytes (our model)."""
    if nc.kind != "compute":
        return 0
    rule = io_rules.get(nc.op)
    return rule(nc, M) if rule is not None else _streaming(nc)


def node_lower_bound(nc: NodeCost, M: int) -> Any:
    """Compulsory traffic; for attention also the Saha-Ye Ω(N²d²/M) bound (the larger)."""
    if nc.kind != "compute":
        return 0
    comp = node_compulsory(nc)
    if nc.op in ("attention", "scaled_dot_product_attention") and len(nc.ins) >= 3:
        q, k, v = nc.ins[:3]
        bh, s, t, d, dv, e = prod(q.shape[:-2]), q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], q.itemsize
        if isinstance(d, int) and M >= d * d * e:
            bound = bh * e * e * s * t * d * dv * sympy.Rational(1, M)
            return _smax(comp, bound)
    return comp


def _smax(a, b):
    if not isinstance(a, sympy.Basic) and not isinstance(b, sympy.Basic):
        return max(a, b)
    from .liveness import max_expr
    return max_expr([a, b])
