"""Fused RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (w + offset), optionally on x = a + b.

Computed in fp32 and cast to result_type(x, w) at the end, which is Hugging
Face's upcast-then-cast-back semantics (and no worse for other spellings).
`offset` is 1.0 for Gemma's (1 + w) form. Saves for backward only the input
row (x, or the residual sum) and the per-row reciprocal RMS, as in
DESIGN.md's budget; the normalised row is recomputed in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from einfuse.runtime import counters, dispatch


def _forward(x: Tensor, weight: Tensor, eps: float, offset: float) -> tuple[Tensor, Tensor]:
    out_dtype = torch.result_type(x, weight)
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
    w = weight.float() + offset if offset else weight.float()
    y = (xf * rstd).mul_(w)
    return y.to(out_dtype), rstd.squeeze(-1)


@torch.library.custom_op("einfuse::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float, offset: float) -> tuple[Tensor, Tensor]:
    counters.bump("rmsnorm")
    out = dispatch.try_triton("rmsnorm_forward", x, weight, eps, offset)  # CUDA: generated kernel
    if out is not None:
        return out
    return _forward(x, weight, eps, offset)


@rms_norm_op.register_fake
def _(x, weight, eps, offset):
    out_dtype = torch.result_type(x, weight)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("einfuse::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float,
                         need_weight_grad: bool) -> tuple[Tensor, Tensor]:
    out = dispatch.try_triton("rmsnorm_backward", grad, x, weight, rstd, offset, need_weight_grad)
    if out is not None:
        return out
    g = grad.float()
    r = rstd.unsqueeze(-1)
    xhat = x.float() * r
    w = weight.float() + offset if offset else weight.float()
    gw = g * w
    dot = (gw * xhat).mean(-1, keepdim=True)
    dx = (gw - xhat * dot).mul_(r)
    if need_weight_grad:
        dw = (g * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    else:
        dw = torch.zeros_like(weight)
    return dx.to(x.dtype), dw


@rms_norm_backward_op.register_fake
def _(grad, x, weight, rstd, offset, need_weight_grad):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, eps, offset = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset


def _backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(grad_y, x, weight, rstd, ctx.offset, ctx.needs_input_grad[1])
    return dx, (dw if ctx.needs_input_grad[1] else None), None, None


rms_norm_op.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    """The graph rewrite's call target: the normalised output only."""
    return rms_norm_op(x, weight, eps, offset)[0]
