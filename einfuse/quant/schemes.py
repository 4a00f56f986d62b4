"""Quantization schemes as data, and their weight formats: quantize, pack, unpack, dequantize.

Every scheme stores a linear's weight W [N, K] (N outputs, K inputs) as

    qweight   the codes, packed (layout below)
    scales    fp32, [N] per output channel, or [N, K / group_size] per group
    offsets   fp32 like scales, asymmetric int4/int6 only

and the dequantized weight is ``W[n, k] = scales[n, g] * u[n, k] + offsets[n, g]``
(g = k // group_size) for unsigned codes u, or ``scales[n] * q[n, k]`` for the
signed int8 codes. A symmetric grouped scheme stores signed codes shifted by
``zero = 2**(bits-1)`` and no offsets (its offset is ``-zero * scale``).

| scheme   | codes                  | scales          | activations                               |
|----------|------------------------|-----------------|-------------------------------------------|
| int8     | int8 [N, K]            | [N]             | unchanged (weight-only)                   |
| int4     | uint8 [N, K/2], 2/byte | [N, G] (+offs)  | unchanged (W4A16)                         |
| int6     | uint8 [N, 3K/4]        | [N, G] (+offs)  | unchanged (weight-only)                   |
| llm_int8 | int8 [N, K]            | [N]             | per-token int8, outlier columns in fp     |
| w8a8     | int8 [N, K]            | [N]             | per-token int8 (dynamic)                  |

Packed layouts (chosen so a kernel reads x contiguously and unpacks with one
mask or shift per code, no interleaving; h = group_size / 2, q = group_size / 4):

* int4: in group g, byte j holds u[g*gs + j] in its low nibble and
  u[g*gs + h + j] in its high nibble (GGUF's split-half order).
* int6 (FlexQ-style: uniform 6-bit codes in groups, weight-only): two planes per
  row. The first K/2 bytes are the low 4 bits of every code in the int4 layout
  above; the next K/4 bytes hold the high 2 bits: in group g, bits 2i..2i+1 of
  byte j belong to u[g*gs + i*q + j]. 0.75 bytes per weight.

All functions here are plain vectorised torch: they are the reference the
kernels in `cpu_kernels` are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int          # weight code width
    grouped: bool      # group-wise scales along K (else one scale per output channel)
    activations: str   # "none" (weight-only), "per_token" (dynamic int8), "llm_int8" (int8 + fp outliers)
    doc: str


SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int8", 8, False, "none", "int8 weights, per-output-channel scales, weight-only"),
    "int4": Scheme("int4", 4, True, "none", "int4 weights, group-wise scales (W4A16), symmetric or asymmetric"),
    "int6": Scheme("int6", 6, True, "none", "int6 weights (FlexQ-style), group-wise scales, weight-only"),
    "llm_int8": Scheme("llm_int8", 8, False, "llm_int8",
                       "LLM.int8(): vector-wise int8 weights and activations, outlier columns in fp"),
    "w8a8": Scheme("w8a8", 8, False, "per_token", "dynamic per-token int8 activations, per-channel int8 weights"),
}
GROUP_SIZES = (128, 64, 32)   # the listed sizes, largest first (the default is the largest that divides K)


def get_scheme(name: str) -> Scheme:
    s = SCHEMES.get(name) if isinstance(name, str) else None
    if s is None:
        raise ValueError(f"unknown quantization scheme {name!r}; schemes are {tuple(SCHEMES)}")
    return s


def packed_width(bits: int, k: int) -> int:
    """Bytes per row of the packed codes."""
    return {8: k, 4: k // 2, 6: 3 * k // 4}[bits]


def zero_point(bits: int) -> int:
    """The shift of a symmetric grouped scheme's signed codes (8 for int4, 32 for int6)."""
    return 1 << (bits - 1) if bits < 8 else 0


# ---------------------------------------------------------------- packing

def pack_codes(u: Tensor, bits: int, group_size: int) -> Tensor:
    """Unsigned codes u [N, K] (uint8, < 2**bits) -> packed uint8 rows (int8 codes are stored as is)."""
    n, k = u.shape
    if bits == 8:
        return u
    g = u.view(n, k // group_size, group_size)
    h = group_size // 2
    low = (g[..., :h] & 15) | ((g[..., h:] & 15) << 4)                     # int4 plane [N, G, h]
    if bits == 4:
        return low.reshape(n, k // 2).contiguous()
    q = group_size // 4
    hi = g >> 4                                                             # the high 2 bits of int6 codes
    crumbs = hi[..., :q] | (hi[..., q:2 * q] << 2) | (hi[..., 2 * q:3 * q] << 4) | (hi[..., 3 * q:] << 6)
    return torch.cat([low.reshape(n, k // 2), crumbs.reshape(n, k // 4)], dim=1).contiguous()


def unpack_codes(p: Tensor, bits: int, group_size: int, k: int) -> Tensor:
    """Packed rows -> unsigned codes [N, K] uint8 (int8 codes are returned as is)."""
    if bits == 8:
        return p
    n = p.shape[0]
    h = group_size // 2
    low = p[:, : k // 2].reshape(n, k // group_size, h)
    u = torch.cat([low & 15, low >> 4], dim=-1)                             # [N, G, gs]
    if bits == 6:
        q = group_size // 4
        c = p[:, k // 2:].reshape(n, k // group_size, q)
        hi = torch.cat([c & 3, (c >> 2) & 3, (c >> 4) & 3, c >> 6], dim=-1)
        u = u | (hi << 4)
    return u.reshape(n, k)


# ---------------------------------------------------------------- weights

def quantize_weight(w: Tensor, scheme: str, group_size: int = 0, symmetric: bool = True) -> dict[str, Tensor | None]:
    """W [N, K] -> {"qweight", "scales", "offsets"} in the scheme's format (computed in fp32)."""
    sch = get_scheme(scheme)
    w = w.detach().to(torch.float32)
    n, k = w.shape
    if not sch.grouped:  # symmetric per output channel, codes in [-127, 127]
        s = w.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q.contiguous(), "scales": s.contiguous(), "offsets": None}
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    wg = w.view(n, k // group_size, group_size)
    u, s, off = _fit_groups(wg, sch.bits, symmetric)
    u = u.to(torch.uint8).view(n, k)
    return {"qweight": pack_codes(u, sch.bits, group_size), "scales": s.contiguous(), "offsets": off}


SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)   # clipping ratios tried per group (range shrunk toward 0)


def _codes(wg: Tensor, s: Tensor, o: Tensor, top: int) -> Tensor:
    return torch.round((wg - o[..., None]) / s[..., None]).clamp_(0, top)


def _fit_groups(wg: Tensor, bits: int, symmetric: bool, refine: int = 2) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unsigned codes, scales and offsets (None when symmetric) for groups wg [N, G, gs].

    Round-to-nearest on the group's range, improved two ways, both per group and
    vectorised: (1) the range is shrunk by each of SHRINK and the ratio with the
    least squared error kept (clipping a rare large weight lets the others use more
    levels); (2) with the codes fixed, the scale (and offset) are refitted by least
    squares, and the codes recomputed (`refine` times; llama.cpp's k-quants do the
    same). Symmetric codes keep a zero point of 2**(bits-1) and fit the scale only.
    """
    top = (1 << bits) - 1
    z = 1 << (bits - 1)
    if symmetric:
        amax = wg.abs().amax(dim=-1)
        lo_all, hi_all = -amax, amax
    else:
        lo_all, hi_all = wg.amin(dim=-1), wg.amax(dim=-1)
    best = None
    for r in SHRINK:
        lo, hi = lo_all * r, hi_all * r
        if symmetric:
            s = hi / (z - 1)
            s = torch.where(s > 0, s, torch.ones_like(s))
            o = -z * s
        else:
            s = (hi - lo) / top
            s = torch.where(s > 0, s, torch.ones_like(s))
            o = lo
        u = _codes(wg, s, o, top)
        err = (u * s[..., None] + o[..., None] - wg).square_().sum(-1)
        if best is None:
            best = [err, s, o]
        else:
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, s, best[1]), torch.where(better, o, best[2])]
    err, s, o = best
    u = _codes(wg, s, o, top)
    for _ in range(refine):
        if symmetric:  # w ~ s * (u - z): s = <w, u - z> / <u - z, u - z>
            c = u - z
            den = c.square().sum(-1)
            s_new = torch.where(den > 0, (wg * c).sum(-1) / den.clamp_min(1e-30), s)
            s_new = torch.where(s_new > 0, s_new, s)
            o_new = -z * s_new
        else:  # w ~ s * u + o: least squares line through (u, w)
            g = wg.shape[-1]
            su, sw = u.sum(-1), wg.sum(-1)
            suu, suw = u.square().sum(-1), (u * wg).sum(-1)
            det = g * suu - su * su
            ok = det > 0
            s_new = torch.where(ok, (g * suw - su * sw) / torch.where(ok, det, torch.ones_like(det)), s)
            o_new = torch.where(ok, (sw - s_new * su) / g, o)
            ok = s_new > 0
            s_new, o_new = torch.where(ok, s_new, s), torch.where(ok, o_new, o)
        u_new = _codes(wg, s_new, o_new, top)
        e_new = (u_new * s_new[..., None] + o_new[..., None] - wg).square_().sum(-1)
        better = e_new < err
        err = torch.where(better, e_new, err)
        s, o = torch.where(better, s_new, s), torch.where(better, o_new, o)
        u = torch.where(better[..., None], u_new, u)
    return u, s.contiguous(), (None if symmetric else o.contiguous())


def dequantize_weight(qweight: Tensor, scales: Tensor, offsets: Tensor | None, scheme: str, group_size: int,
                      in_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dequantized weight [N, K] in `dtype` (the reference every kernel is checked against)."""
    sch = get_scheme(scheme)
    if not sch.grouped:
        return qweight.to(dtype) * scales.to(dtype)[:, None]
    k = in_features
    u = unpack_codes(qweight, sch.bits, group_size, k).to(dtype)
    n = u.shape[0]
    s = scales.to(dtype)[..., None]
    if offsets is None:
        w = (u.view(n, -1, group_size) - zero_point(sch.bits)) * s
    else:
        w = u.view(n, -1, group_size) * s + offsets.to(dtype)[..., None]
    return w.reshape(n, k)


# ---------------------------------------------------------------- activations

def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (per-token) symmetric int8: x [M, K] -> (codes int8 [M, K], scales fp32 [M])."""
    xf = x.to(torch.float32)
    s = xf.abs().amax(dim=-1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(xf / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def outlier_columns(x2d: Tensor, threshold: float, static: Tensor | None = None) -> Tensor:
    """Input columns holding an |x| > threshold anywhere in the batch, united with `static` (sorted int64)."""
    cols = torch.nonzero(x2d.abs().amax(dim=0) > threshold).flatten()
    if static is not None and static.numel():
        cols = torch.unique(torch.cat([cols, static.to(cols.device, torch.int64)]))
    return cols


def reference_linear(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None,
                     scheme: str, group_size: int, in_features: int, outliers: Tensor | None = None,
                     threshold: float = 6.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """The plain reference of the quantized linear, computed in `dtype` (default fp64).

    Weight-only schemes: x @ dequant(W)^T. w8a8: per-token int8 x (quantized in fp32,
    as the kernel does) times dequant(W). llm_int8: outlier columns of x times the
    matching dequantized weight columns, plus per-token int8 of the other columns.
    """
    sch = get_scheme(scheme)
    w = dequantize_weight(qweight, scales, offsets, scheme, group_size, in_features, dtype)
    x2 = x.reshape(-1, in_features)
    if sch.activations == "none":
        y = x2.to(dtype) @ w.t()
    elif sch.activations == "per_token":
        q, s = quantize_rows(x2)
        y = (q.to(dtype) * s.to(dtype)[:, None]) @ w.t()
    else:
        cols = outlier_columns(x2.float(), threshold, outliers)
        xr = x2.float().clone()
        xr[:, cols] = 0
        q, s = quantize_rows(xr)
        y = (q.to(dtype) * s.to(dtype)[:, None]) @ w.t() + x2[:, cols].to(dtype) @ w[:, cols].t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def fake_quantized_linear(x: Tensor, w: Tensor, scheme: str, group_size: int = 0, symmetric: bool = True) -> Tensor:
    """x @ dequant(quant(W))^T in x's dtype: what a quantized layer computes, for quick error studies."""
    st = quantize_weight(w, scheme, group_size, symmetric)
    return F.linear(x, dequantize_weight(st["qweight"], st["scales"], st["offsets"], scheme, group_size,
                                         w.shape[1], x.dtype))
