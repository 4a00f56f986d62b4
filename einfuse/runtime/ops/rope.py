"""Fused rotary position embedding for q and k in one op; fusion key "rope".

``einfuse::rope(q, k, cos, sin, interleaved) -> (q_out, k_out)``, q [B, Hq, S, D],
k [B, Hk, S, D'] (head counts and head dims may differ).

Two layouts of the rotated feature pairs:

* rotate-half (Hugging Face, ``interleaved=False``): R = cos.shape[-1] (even),
  pairs are (x[i], x[i + R/2]);  out = x * cos + rotate_half(x) * sin with
  rotate_half(x) = cat(-x[R/2:], x[:R/2]).  For each half this is
      y1 = x1 * cos[:R/2] - x2 * sin[:R/2]
      y2 = x2 * cos[R/2:] + x1 * sin[R/2:]
  (cos halves need not be equal; the general formula is implemented).
* interleaved (Meta ``view_as_complex``, ``interleaved=True``): R = 2 * cos.shape[-1],
  pairs are (x[2i], x[2i+1]) rotated by the angle with cos[i], sin[i].

Only the first R <= D features rotate; the rest pass through (partial rotary).
cos/sin may be [S, r], [B, S, r] (HF's pre-``unsqueeze(1)`` form, treated as
[B, 1, S, r]) or 4-D broadcastable to [B, 1, S, r] (r = R or R/2).

The forward writes each half with one ``mul`` + one ``addcmul_`` into strided
slices of the output (no rotate_half / cat temporaries).  bf16/fp16 inputs are
computed in fp32 and rounded once; outputs keep the input dtypes.

Backward (``einfuse::rope_backward``) applies the transposed linear map
(dx1 = g1*c1 + g2*s2, dx2 = g2*c2 - g1*s1: the rotation by -angle) and needs
only cos and sin, so only cos and sin are saved -- q and k are saved only when
cos or sin themselves require grad (their gradients sum g * x terms over the
broadcast dims).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from einfuse.runtime import counters, dispatch
from einfuse.runtime.ops._checks import same_device

_LOW = (torch.bfloat16, torch.float16)


def _cs4(t: Tensor) -> Tensor:
    """cos/sin as a 4-D [B or 1, 1, S, r] view."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 4:
        return t
    raise ValueError(f"einfuse::rope: cos/sin must be 2-, 3- or 4-D, got shape {tuple(t.shape)}")


def _rot_dim(cos: Tensor, interleaved: bool) -> int:
    r = cos.shape[-1]
    return 2 * r if interleaved else r


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"einfuse::rope: q and k must be [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"einfuse::rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    if not (q.is_floating_point() and k.is_floating_point() and cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError("einfuse::rope: q, k, cos and sin must be floating point")
    R = _rot_dim(cos, interleaved)
    if not interleaved and R % 2:
        raise ValueError(f"einfuse::rope: rotate-half form needs an even rotary dim, got {R}")
    c4 = _cs4(cos)
    for name, x in (("q", q), ("k", k)):
        if R > x.shape[-1]:
            raise ValueError(f"einfuse::rope: rotary dim {R} exceeds {name} head dim {x.shape[-1]}")
        target = tuple(x.shape[:-1]) + (c4.shape[-1],)
        try:
            ok = tuple(torch.broadcast_shapes(c4.shape, target)) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"einfuse::rope: cos/sin of shape {tuple(cos.shape)} do not broadcast to {name} "
                f"{tuple(x.shape)} (expected [S, r], [B, S, r] or [B|1, 1, S, r])"
            )


def _pairs(t: Tensor, R: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The two members of each rotated pair, as views of t[..., :R]."""
    if interleaved:
        v = t[..., :R].unflatten(-1, (R // 2, 2))
        return v[..., 0], v[..., 1]
    h = R // 2
    return t[..., :h], t[..., h:R]


def _halves(c: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    """cos/sin entries multiplying the first / second member of each pair."""
    if interleaved:
        return c, c
    h = c.shape[-1] // 2
    return c[..., :h], c[..., h:]


def _apply(x: Tensor, c4: Tensor, s4: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    """Forward:  y1 = x1*c1 - x2*s1,  y2 = x2*c2 + x1*s2.
    Inverse (transpose, used for grads):  y1 = x1*c1 + x2*s2,  y2 = x2*c2 - x1*s1."""
    R = _rot_dim(c4, interleaved)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    low = x.dtype in _LOW
    if low:
        src = x[..., :R].float()
        dst = torch.empty(src.shape, dtype=torch.float32, device=x.device)
        c4, s4 = c4.float(), s4.float()
    else:
        src, dst = x, out
    x1, x2 = _pairs(src, R, interleaved)
    y1, y2 = _pairs(dst, R, interleaved)
    c1, c2 = _halves(c4, interleaved)
    s1, s2 = _halves(s4, interleaved)
    if inverse:
        p1, v1, p2, v2 = s2, 1.0, s1, -1.0
    else:
        p1, v1, p2, v2 = s1, -1.0, s2, 1.0
    torch.mul(x1, c1, out=y1).addcmul_(x2, p1, value=v1)
    torch.mul(x2, c2, out=y2).addcmul_(x1, p2, value=v2)
    if low:
        out[..., :R].copy_(dst)
    if R < x.shape[-1]:
        out[..., R:].copy_(x[..., R:])
    return out


@torch.library.custom_op("einfuse::rope", mutates_args=())
def rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    _check(q, k, cos, sin, interleaved)
    counters.bump("rope")
    out = dispatch.try_triton("rope_forward", q, k, cos, sin, interleaved)  # CUDA: generated kernel
    if out is not None:
        return out
    c4, s4 = _cs4(cos), _cs4(sin)
    return _apply(q, c4, s4, interleaved, False), _apply(k, c4, s4, interleaved, False)


@rope_op.register_fake
def _(q, k, cos, sin, interleaved):
    same_device("rope", q=q, k=k, cos=cos, sin=sin)
    _check(q, k, cos, sin, interleaved)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


@torch.library.custom_op("einfuse::rope_backward", mutates_args=())
def rope_backward_op(
    grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool
) -> tuple[Tensor, Tensor]:
    out = dispatch.try_triton("rope_backward", grad_q, grad_k, cos, sin, interleaved)
    if out is not None:
        return out
    c4, s4 = _cs4(cos), _cs4(sin)
    return _apply(grad_q, c4, s4, interleaved, True), _apply(grad_k, c4, s4, interleaved, True)


@rope_backward_op.register_fake
def _(grad_q, grad_k, cos, sin, interleaved):
    same_device("rope_backward", grad_q=grad_q, grad_k=grad_k, cos=cos, sin=sin)
    return torch.empty_like(grad_q, memory_format=torch.contiguous_format), torch.empty_like(
        grad_k, memory_format=torch.contiguous_format
    )


def _cs_grad_terms(g: Tensor, x: Tensor, R: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """Per-element d(out)/d(cos), d(out)/d(sin) contributions, in x's broadcast shape (opmath dtype)."""
    if x.dtype in _LOW:
        g, x = g.float(), x.float()
    g1, g2 = _pairs(g, R, interleaved)
    x1, x2 = _pairs(x, R, interleaved)
    if interleaved:
        dc = g1 * x1 + g2 * x2
        ds = g2 * x1 - g1 * x2
    else:
        dc = g[..., :R] * x[..., :R]
        ds = torch.cat([-(g1 * x2), g2 * x1], dim=-1)
    return dc, ds


def _setup(ctx, inputs, output) -> None:
    q, k, cos, sin, interleaved = inputs
    ctx.interleaved = interleaved
    ctx.cs_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    ctx.qk_meta = [(q.shape, q.dtype), (k.shape, k.dtype)]
    if ctx.cs_grad:
        ctx.save_for_backward(cos, sin, q, k)
    else:
        ctx.save_for_backward(cos, sin)


def _backward(ctx, grad_q: Optional[Tensor], grad_k: Optional[Tensor]):
    saved = ctx.saved_tensors
    cos, sin = saved[0], saved[1]
    grads = []
    for gr, (shape, dtype) in zip((grad_q, grad_k), ctx.qk_meta):
        grads.append(gr if gr is not None else cos.new_zeros(shape, dtype=dtype))
    grad_q, grad_k = grads
    dq = dk = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        dq, dk = torch.ops.einfuse.rope_backward(grad_q, grad_k, cos, sin, ctx.interleaved)
        dq = dq if ctx.needs_input_grad[0] else None
        dk = dk if ctx.needs_input_grad[1] else None
    dcos = dsin = None
    if ctx.cs_grad:
        q, k = saved[2], saved[3]
        R = _rot_dim(cos, ctx.interleaved)
        c4 = _cs4(cos)
        dcq, dsq = _cs_grad_terms(grad_q, q, R, ctx.interleaved)
        dck, dsk = _cs_grad_terms(grad_k, k, R, ctx.interleaved)
        dcos = (dcq.sum_to_size(c4.shape) + dck.sum_to_size(c4.shape)).reshape(cos.shape).to(cos.dtype)
        dsin = (dsq.sum_to_size(c4.shape) + dsk.sum_to_size(c4.shape)).reshape(sin.shape).to(sin.dtype)
        dcos = dcos if ctx.needs_input_grad[2] else None
        dsin = dsin if ctx.needs_input_grad[3] else None
    return dq, dk, dcos, dsin, None


rope_op.register_autograd(_backward, setup_context=_setup)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Apply rotary embeddings to q [B, Hq, S, D] and k [B, Hk, S, D] in one fused op.

    interleaved=False: HF rotate-half form, cos/sin [.., S, R] (R = rotary dim).
    interleaved=True: Meta complex form, cos/sin = freqs_cis.real/.imag [.., S, R/2].
    """
    return torch.ops.einfuse.rope(q, k, cos, sin, interleaved)
