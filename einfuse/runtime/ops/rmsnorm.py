"""Fused RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (w + offset), optionally on x = a + b.

Computed in fp32 and cast to result_type(x, w) at the end, which is Hugging
Face's upcast-then-cast-back semantics (and no worse for other spellings).
`offset` is 1.0 for Gemma's (1 + w) form. Saves for backward only the input
row (x, or the residual sum) and the per-row reciprocal RMS, as in
DESIGN.md's budget; the normalised row is recomputed in backward.

`einfuse::add_rms_norm(x, residual, w, eps, offset) -> (y, h, rstd)` is the
residual-add variant: h = x + residual (the residual stream, which the graph
keeps using) and y = rmsnorm(h). It saves h (an output the graph holds anyway)
and rstd; its backward adds the gradient flowing into h from its other uses to
the norm's input gradient in fp32 before the one cast, and hands the sum to
both x and residual.
"""

from __future__ import annotations

import torch
from torch import Tensor

from einfuse.runtime import counters, dispatch
from einfuse.runtime.ops._checks import same_device


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
    same_device("rms_norm", x=x, weight=weight)
    out_dtype = torch.result_type(x, weight)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("einfuse::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float,
                         need_weight_grad: bool) -> tuple[Tensor, Tensor]:
    out = dispatch.try_triton("rmsnorm_backward", grad, x, weight, rstd, offset, need_weight_grad)
    if out is not None:
        return out
    dx, xhat = _dx_fp32(grad, x, weight, rstd, offset)
    if need_weight_grad:
        dw = (grad.float() * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
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


# -- residual-add variant --------------------------------------------------------------------------

def _dx_fp32(g: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, offset: float) -> tuple[Tensor, Tensor]:
    """(d rmsnorm / d h in fp32, x_hat in fp32) for output gradient g."""
    g = g.float()
    r = rstd.unsqueeze(-1)
    xhat = h.float() * r
    w = weight.float() + offset if offset else weight.float()
    gw = g * w
    dot = (gw * xhat).mean(-1, keepdim=True)
    return (gw - xhat * dot).mul_(r), xhat


@torch.library.custom_op("einfuse::add_rms_norm", mutates_args=())
def add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                    offset: float) -> tuple[Tensor, Tensor, Tensor]:
    counters.bump("rmsnorm")
    counters.bump("rmsnorm_residual")
    h = torch.add(x, residual)
    out = dispatch.try_triton("rmsnorm_forward", h, weight, eps, offset)  # CUDA: the plain kernel on h
    y, rstd = out if out is not None else _forward(h, weight, eps, offset)
    return y, h, rstd


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps, offset):
    same_device("add_rms_norm", x=x, residual=residual, weight=weight)
    h_dtype = torch.result_type(x, residual)
    out_dtype = torch.promote_types(h_dtype, weight.dtype)
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=h_dtype),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("einfuse::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward_op(grad_y: Tensor, grad_h: Tensor | None, h: Tensor, weight: Tensor, rstd: Tensor,
                             offset: float, need_weight_grad: bool) -> tuple[Tensor, Tensor]:
    """(gradient of h: the norm's plus grad_h, summed in fp32 and cast to h's dtype; weight gradient)."""
    out = dispatch.try_triton("rmsnorm_backward", grad_y, h, weight, rstd, offset, need_weight_grad)
    if out is not None:
        dh, dw = out
        return (dh + grad_h if grad_h is not None else dh), dw
    dh, xhat = _dx_fp32(grad_y, h, weight, rstd, offset)
    if grad_h is not None:
        dh.add_(grad_h)
    if need_weight_grad:
        dw = (grad_y.float() * xhat).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
    else:
        dw = torch.zeros_like(weight)
    return dh.to(h.dtype), dw


@add_rms_norm_backward_op.register_fake
def _(grad_y, grad_h, h, weight, rstd, offset, need_weight_grad):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_add(ctx, inputs, output):
    x, residual, weight, eps, offset = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.offset = offset
    ctx.dtypes = (x.dtype, residual.dtype)


def _backward_add(ctx, grad_y, grad_h, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    need_w = ctx.needs_input_grad[2]
    dh, dw = add_rms_norm_backward_op(grad_y, grad_h, h, weight, rstd, ctx.offset, need_w)
    dx = dh.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    dres = dh.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return dx, dres, (dw if need_w else None), None, None


add_rms_norm_op.register_autograd(_backward_add, setup_context=_setup_add)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                 offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """The residual rewrite's call target: (rmsnorm(x + residual), x + residual)."""
    y, h, _ = add_rms_norm_op(x, residual, weight, eps, offset)
    return y, h
