"""Fused gated-linear-unit ops (SwiGLU / GeGLU); fusion key "swiglu".

Two ops:

``einfuse::glu(gate, up, act) -> Tensor``
    Elementwise ``act(gate) * up``.  Backward (``einfuse::glu_backward``)
    recomputes ``act(gate)`` and ``act'(gate)`` from the saved ``gate`` and
    ``up``; the activation and the product are never saved.

``einfuse::glu_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act) -> (out, g, u)``
    The whole gated MLP ``down(act(x Wg^T + bg) * (x Wu^T + bu)) + bd``.
    ``g`` and ``u`` (the gate / up pre-activations) are returned only so that
    autograd can save them (they are marked non-differentiable); the wrapper
    ``glu_mlp`` returns ``out`` alone.  Saved for backward: ``x``, ``g``, ``u``
    (plus references to the weights, which cost no memory).  Eager autograd
    keeps ``x, g, act(g), u, h`` -- two more [tokens, I] activations.
    Backward (``einfuse::glu_mlp_backward``) recomputes ``a = act(g)`` and
    ``h = a * u`` (elementwise only), then
        dW_down = dOut^T h,  dh = dOut W_down,
        du = dh * a,  dg = act'(g) * (dh * u),
        dx = dg Wg + du Wu,  dWg = dg^T x,  dWu = du^T x,  biases by sums:
    5 matmuls, like eager (forward: 3).  Buffers are reused in place where safe.

Activations ``act``: "silu", "gelu" (exact erf GELU), "gelu_tanh"
(``F.gelu(approximate="tanh")``).  Matmuls run in the input dtype (torch
accumulates in fp32, as eager does); for bf16/fp16 the elementwise part
(act, act', products) is computed in fp32 and rounded once.  Derivatives use
the native ``aten.silu_backward`` / ``aten.gelu_backward`` kernels, which are
exactly eager's formulas.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from einfuse.runtime import counters, dispatch
from einfuse.runtime.ops._checks import same_device

_ACTS = ("silu", "gelu", "gelu_tanh")
_LOW = (torch.bfloat16, torch.float16)


def _check_act(act: str) -> None:
    if act not in _ACTS:
        raise ValueError(f"einfuse glu: unknown activation {act!r}; expected one of {_ACTS}")


def _opmath(t: Tensor) -> Tensor:
    """fp32 copy for low-precision dtypes, the tensor itself otherwise (do not mutate!)."""
    return t.float() if t.dtype in _LOW else t


def _act(x: Tensor, act: str) -> Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "gelu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


def _act_bwd(grad: Tensor, x: Tensor, act: str, out: Tensor) -> Tensor:
    """out = grad * act'(x); ``out`` may alias ``grad`` (full overlap is fine for TensorIterator)."""
    if act == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)
    approx = "none" if act == "gelu" else "tanh"
    return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate=approx, grad_input=out)


def _glu_fwd(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """act(gate) * up in gate.dtype, computed in fp32 for low-precision inputs."""
    if gate.dtype in _LOW:
        return _act(gate.float(), act).mul_(up.float()).to(gate.dtype)
    return _act(gate, act).mul_(up)


# --------------------------------------------------------------------------
# einfuse::glu  (elementwise)
# --------------------------------------------------------------------------


def _check_glu(gate: Tensor, up: Tensor, act: str) -> None:
    _check_act(act)
    same_device("glu", gate=gate, up=up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"einfuse::glu: gate and up must have the same shape and dtype, got "
            f"{tuple(gate.shape)}/{gate.dtype} and {tuple(up.shape)}/{up.dtype}"
        )


@torch.library.custom_op("einfuse::glu", mutates_args=())
def glu_op(gate: Tensor, up: Tensor, act: str) -> Tensor:
    _check_glu(gate, up, act)
    counters.bump("swiglu")
    out = dispatch.try_triton("glu_forward", gate, up, act)  # CUDA: generated kernel
    if out is not None:
        return out
    return _glu_fwd(gate, up, act)


@glu_op.register_fake
def _(gate: Tensor, up: Tensor, act: str) -> Tensor:
    _check_glu(gate, up, act)
    return torch.empty_like(gate)


@torch.library.custom_op("einfuse::glu_backward", mutates_args=())
def glu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, act: str) -> tuple[Tensor, Tensor]:
    out = dispatch.try_triton("glu_backward", grad, gate, up, act)
    if out is not None:
        return out
    dt = gate.dtype
    gc, uc, grc = _opmath(gate), _opmath(up), _opmath(grad)
    d_up = _act(gc, act).mul_(grc)  # act(gate) * grad  (fresh buffer)
    t = grc * uc  # fresh buffer
    d_gate = _act_bwd(t, gc, act, out=t)
    return d_gate.to(dt), d_up.to(dt)


@glu_backward_op.register_fake
def _(grad: Tensor, gate: Tensor, up: Tensor, act: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(gate), torch.empty_like(up)


def _glu_setup(ctx, inputs, output) -> None:
    gate, up, act = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _glu_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    d_gate, d_up = torch.ops.einfuse.glu_backward(grad, gate, up, ctx.act)
    return d_gate, d_up, None


glu_op.register_autograd(_glu_backward, setup_context=_glu_setup)


def glu(gate: Tensor, up: Tensor, act: str = "silu") -> Tensor:
    """act(gate) * up as one fused op (act: "silu", "gelu", "gelu_tanh")."""
    return torch.ops.einfuse.glu(gate, up, act)


# --------------------------------------------------------------------------
# einfuse::glu_mlp  (whole gated MLP)
# --------------------------------------------------------------------------


def _check_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, op: str = "glu_mlp") -> None:
    """Arguments of a gated MLP op (glu_mlp, and the sparse ops of sparse_mlp.py, named by `op`)."""
    _check_act(act)
    same_device(op, x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, b_gate=b_gate, b_up=b_up,
                b_down=b_down)
    if w_gate.dim() != 2 or w_up.dim() != 2 or w_down.dim() != 2 or x.dim() < 1:
        raise ValueError(f"einfuse::{op}: weights must be 2-D and x at least 1-D")
    H = x.shape[-1]
    inter = w_gate.shape[0]
    if tuple(w_gate.shape) != (inter, H) or tuple(w_up.shape) != (inter, H) or w_down.shape[1] != inter:
        raise ValueError(
            f"einfuse::{op}: shape mismatch: x[..., H] with w_gate/w_up [I, H] and w_down [H2, I], got "
            f"x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}, "
            f"w_down {tuple(w_down.shape)}"
        )
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down), ("b_gate", b_gate),
                    ("b_up", b_up), ("b_down", b_down)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"einfuse::{op}: {name} dtype {t.dtype} != x dtype {x.dtype}")
    for name, b, n in (("b_gate", b_gate, inter), ("b_up", b_up, inter), ("b_down", b_down, w_down.shape[0])):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"einfuse::{op}: {name} must have shape ({n},), got {tuple(b.shape)}")


def _linear2d(x2: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())


@torch.library.custom_op("einfuse::glu_mlp", mutates_args=())
def glu_mlp_op(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor],
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    act: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    counters.bump("swiglu")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    g = _linear2d(x2, w_gate, b_gate)
    u = _linear2d(x2, w_up, b_up)
    h = dispatch.run("glu_forward", _glu_fwd, g, u, act)  # the elementwise part: generated kernel on CUDA
    out = _linear2d(h, w_down, b_down)
    del h
    inter = w_gate.shape[0]
    return out.view(*lead, w_down.shape[0]), g.view(*lead, inter), u.view(*lead, inter)


@glu_mlp_op.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act):
    _check_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    lead = tuple(x.shape[:-1])
    inter = w_gate.shape[0]
    dt = x.dtype
    return (
        x.new_empty(lead + (w_down.shape[0],), dtype=dt),
        x.new_empty(lead + (inter,), dtype=dt),
        x.new_empty(lead + (inter,), dtype=dt),
    )


@torch.library.custom_op("einfuse::glu_mlp_backward", mutates_args=())
def glu_mlp_backward_op(
    grad_out: Tensor,
    x: Tensor,
    g: Tensor,
    u: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    act: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down); entries whose
    ``needs`` flag (same order) is False are empty tensors."""
    need_x, need_wg, need_wu, need_wd, need_bg, need_bu, need_bd = needs
    H, inter, H2 = x.shape[-1], g.shape[-1], grad_out.shape[-1]
    dt = g.dtype
    low = dt in _LOW
    go = grad_out.reshape(-1, H2)
    x2 = x.reshape(-1, H)
    g2 = g.reshape(-1, inter)
    u2 = u.reshape(-1, inter)
    # distinct empty placeholders for grads not needed (outputs may not alias each other)
    dx, dwg, dwu, dwd, dbg, dbu, dbd = (go.new_empty(0, dtype=dt) for _ in range(7))

    gc, uc = _opmath(g2), _opmath(u2)
    a = _act(gc, act)  # fresh buffer, opmath dtype
    h = None
    if need_wd:
        h = a * uc  # recomputed h (fresh), bit-identical to the forward's
        dwd = torch.mm(go.t(), h.to(dt) if low else h)
    if need_bd:
        dbd = go.sum(0)
    if need_x or need_wg or need_wu or need_bg or need_bu:
        dh = torch.mm(go, w_down)  # [N, I], fresh
        tri = dispatch.try_triton("glu_backward", dh, g2, u2, act)  # CUDA: the generated kernel
        if tri is not None:
            dg, du = (t.float() for t in tri) if low else tri
            del a, h, dh
            if low:
                x2 = x2.float()
                w_gate, w_up = w_gate.float(), w_up.float()
        elif low:
            # keep dg/du in fp32 through the weight-gradient matmuls and round once at the end:
            # rounding them to bf16 first adds an error eager does not have (and fp32 GEMM is
            # no slower than bf16 on most CPUs)
            dhc = dh.float()
            du = dhc * a
            del a, h
            dhc.mul_(uc)
            dg = _act_bwd(dhc, gc, act, out=dhc)
            del dhc
            x2 = x2.float()
            w_gate, w_up = w_gate.float(), w_up.float()
        else:
            du = torch.mul(dh, a, out=h) if h is not None else dh * a
            dh.mul_(u2)
            dg = _act_bwd(dh, g2, act, out=a)  # a is dead: reuse its buffer
        if tri is None:
            del dh
        if need_x:
            dx = torch.mm(dg, w_gate).addmm_(du, w_up).view(x.shape).to(dt)
        if need_wg:
            dwg = torch.mm(dg.t(), x2).to(dt)
        if need_wu:
            dwu = torch.mm(du.t(), x2).to(dt)
        if need_bg:
            dbg = dg.sum(0).to(dt)
        if need_bu:
            dbu = du.sum(0).to(dt)
    return dx, dwg, dwu, dwd, dbg, dbu, dbd


@glu_mlp_backward_op.register_fake
def _(grad_out, x, g, u, w_gate, w_up, w_down, act, needs):
    need_x, need_wg, need_wu, need_wd, need_bg, need_bu, need_bd = needs
    inter, H2 = g.shape[-1], grad_out.shape[-1]
    dt = g.dtype

    def mk(flag, shape):
        return grad_out.new_empty(tuple(shape) if flag else (0,), dtype=dt)

    return (
        mk(need_x, x.shape),
        mk(need_wg, w_gate.shape),
        mk(need_wu, w_up.shape),
        mk(need_wd, w_down.shape),
        mk(need_bg, (inter,)),
        mk(need_bu, (inter,)),
        mk(need_bd, (H2,)),
    )


def _glu_mlp_setup(ctx, inputs, output) -> None:
    x, w_gate, w_up, w_down, b_gate, b_up, b_down, act = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)
    ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)
    ctx.act = act


def _glu_mlp_backward(ctx, grad_out, _grad_g, _grad_u):
    # g and u are non-differentiable outputs (autograd-saving only): their grads are ignored.
    x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    if not any(needs):
        return (None,) * 8
    grads = torch.ops.einfuse.glu_mlp_backward(grad_out, x, g, u, w_gate, w_up, w_down, ctx.act, needs)
    return tuple(gr if n else None for gr, n in zip(grads, needs)) + (None,)


glu_mlp_op.register_autograd(_glu_mlp_backward, setup_context=_glu_mlp_setup)


def glu_mlp(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor] = None,
    b_up: Optional[Tensor] = None,
    b_down: Optional[Tensor] = None,
    act: str = "silu",
) -> Tensor:
    """Fused ``F.linear(act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)``.

    x [..., H], w_gate/w_up [I, H], w_down [H2, I]; returns [..., H2].
    """
    out, _, _ = torch.ops.einfuse.glu_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    return out
