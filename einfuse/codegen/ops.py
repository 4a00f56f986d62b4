"""The fused ops' Triton implementations: an op call -> its cascade -> a generated kernel.

Each function takes the arguments of the op's CPU implementation and returns the same
outputs (dtypes, shapes), so `einfuse.runtime.dispatch` can route a call either way.
Compute is fp32 (fp64 when an input is fp64); outputs are rounded once to their dtype.
`IMPLS` maps dispatch names to these functions.
"""

from __future__ import annotations

from typing import Any

import torch

from einfuse.ir.cascade import Cascade
from einfuse.runtime import dispatch
from einfuse.runtime.dispatch import Unsupported
from . import library
from .launch import KernelFailure, get_kernel, launch_contraction, launch_row


def _compute(*ts: torch.Tensor) -> str:
    return "float64" if any(t.dtype == torch.float64 for t in ts) else "float32"


def run_cascade(c: Cascade, inputs: dict[str, torch.Tensor], outputs: dict[str, Any], *,
                name: str | None = None, compute: str | None = None, config: dict | None = None,
                head_div: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Generate (or fetch) the kernel for cascade c and run it; failures raise KernelFailure."""
    name = name or c.name
    compute = compute or _compute(*inputs.values())
    k = get_kernel(c, name, compute)
    if k.key in dispatch.failed_kernels():
        raise KernelFailure(name, k.key, "failed before in this process")
    try:
        if c.splits:
            return launch_contraction(k, inputs, outputs, head_div, config)
        return launch_row(k, inputs, outputs, config)
    except (Unsupported, KernelFailure):
        raise
    except Exception as e:
        raise KernelFailure(name, k.key, f"{type(e).__name__}: {e}") from e


def _floating(*ts: torch.Tensor) -> None:
    for t in ts:
        if not t.is_floating_point():
            raise Unsupported(f"non-floating input of dtype {t.dtype}")


# ---------------------------------------------------------------------------------------
# RMSNorm

def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    _floating(x, weight)
    H = x.shape[-1]
    if weight.numel() != H:
        raise Unsupported(f"weight of shape {tuple(weight.shape)} for rows of {H}")
    res = run_cascade(library.rmsnorm_forward(H, eps, offset), {"X": x.reshape(-1, H), "W": weight.reshape(H)},
                      {"Y": torch.result_type(x, weight), "RSTD": torch.float32})
    return res["Y"].view(x.shape), res["RSTD"].view(x.shape[:-1])


def rmsnorm_backward(grad, x, weight, rstd, offset: float, need_weight_grad: bool):
    _floating(grad, x, weight)
    H = x.shape[-1]
    c = library.rmsnorm_backward(H, offset, need_weight_grad)
    ins = {"G": grad.reshape(-1, H), "X": x.reshape(-1, H), "W": weight.reshape(H), "RSTD": rstd.reshape(-1)}
    res = run_cascade(c, ins, {"DX": x.dtype, "DW": weight.dtype})
    dw = res["DW"].view(weight.shape) if need_weight_grad else torch.zeros_like(weight)
    return res["DX"].view(x.shape), dw


# ---------------------------------------------------------------------------------------
# GLU

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, act: str):
    _floating(gate, up)
    if act not in library.ACTS:
        raise Unsupported(f"activation {act!r}")
    res = run_cascade(library.glu_forward(act), {"G": _rows(gate), "U": _rows(up)}, {"H": gate.dtype})
    return res["H"].view(gate.shape)


def glu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str):
    _floating(grad, gate, up)
    if act not in library.ACTS:
        raise Unsupported(f"activation {act!r}")
    res = run_cascade(library.glu_backward(act), {"DH": _rows(grad), "G": _rows(gate), "U": _rows(up)},
                      {"DG": gate.dtype, "DU": up.dtype})
    return res["DG"].view(gate.shape), res["DU"].view(up.shape)


# ---------------------------------------------------------------------------------------
# RoPE

def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool):
    from einfuse.runtime.ops.rope import _cs4, _halves, _pairs, _rot_dim
    _floating(x, cos, sin)
    c4, s4 = _cs4(cos), _cs4(sin)
    if c4.shape[1] != 1:
        raise Unsupported("cos/sin that vary over heads")
    R = _rot_dim(c4, interleaved)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = _pairs(x, R, interleaved)
    y1, y2 = _pairs(out, R, interleaved)
    c1, c2 = (h[:, 0] for h in _halves(c4, interleaved))
    s1, s2 = (h[:, 0] for h in _halves(s4, interleaved))
    if interleaved:
        ins = {"X1": x1, "X2": x2, "C": c1, "S": s1}
    else:
        ins = {"X1": x1, "X2": x2, "C1": c1, "C2": c2, "S1": s1, "S2": s2}
    run_cascade(library.rope(inverse, shared_halves=interleaved), ins, {"Y1": y1, "Y2": y2},
                compute=_compute(x))
    if R < x.shape[-1]:
        out[..., R:].copy_(x[..., R:])
    return out


def rope_forward(q, k, cos, sin, interleaved: bool):
    return _rope_one(q, cos, sin, interleaved, False), _rope_one(k, cos, sin, interleaved, False)


def rope_backward(grad_q, grad_k, cos, sin, interleaved: bool):
    return _rope_one(grad_q, cos, sin, interleaved, True), _rope_one(grad_k, cos, sin, interleaved, True)


# ---------------------------------------------------------------------------------------
# softmax and cross-entropy over given logits (no fused op calls these yet)

def softmax_forward(x: torch.Tensor):
    _floating(x)
    return run_cascade(library.softmax_forward(), {"X": _rows(x)}, {"Y": x.dtype})["Y"].view(x.shape)


def softmax_backward(grad: torch.Tensor, y: torch.Tensor):
    _floating(grad, y)
    return run_cascade(library.softmax_backward(), {"G": _rows(grad), "Y": _rows(y)}, {"DX": y.dtype})["DX"].view(y.shape)


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100):
    """Per-row loss (0 where target == ignore_index) and log-sum-exp (fp32), logits [N, V]."""
    _floating(logits)
    valid = target != ignore_index
    xt = logits.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    res = run_cascade(library.cross_entropy_forward(), {"X": logits, "XT": xt},
                      {"LOSS": torch.float32, "LSE": torch.float32})
    return torch.where(valid, res["LOSS"], 0.0), res["LSE"]


def cross_entropy_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                           ignore_index: int = -100):
    """d(sum_r grad_loss[r] * loss[r]) / d logits."""
    valid = target != ignore_index
    g = torch.where(valid, grad_loss.float(), 0.0)
    dx = run_cascade(library.cross_entropy_backward(), {"X": logits, "LSE": lse, "G": g}, {"DX": logits.dtype})["DX"]
    rows = torch.arange(logits.shape[0], device=logits.device)
    t = torch.where(valid, target, 0)
    dx[rows, t] = (dx[rows, t].float() - g).to(dx.dtype)  # minus the one-hot target (0 on ignored rows)
    return dx


# ---------------------------------------------------------------------------------------
# attention forward (contraction program; the fused attention op does not route here yet)

def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | None = None, mask_kind: str | None = None, softcap: float = 0.0,
                      config: dict | None = None):
    """softmax(q k^T * scale [softcap, mask]) v for q [B, H, S, E], k/v [B, Hk, T, E|F] (H % Hk == 0),
    mask [B|1, H|1, S, T]: mask_kind "additive" (float, added) or "bool"/"causal" (True = attend).
    Returns (out [B, H, S, F] in q's dtype, lse [B, H, S] fp32)."""
    _floating(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[1] % k.shape[1]:
        raise Unsupported("attention expects [B, H, S, D] tensors with H a multiple of K/V heads")
    if (mask is None) != (mask_kind is None):
        raise Unsupported("a mask needs its kind and a kind its mask")
    if mask is not None and mask.dim() != 4:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    c = library.attention_forward(float(scale), mask_kind, float(softcap))
    g = q.shape[1] // k.shape[1]
    ins = {"Q": q, "K": k, "V": v}
    if mask is not None:
        ins["M"] = mask
    res = run_cascade(c, ins, {"O": q.dtype, "LSE": torch.float32}, compute="float32", config=config,
                      head_div={"K": g, "V": g})
    return res["O"], res["LSE"]


def linear_cross_entropy_forward(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = -100, config: dict | None = None):
    """Per-row cross-entropy of the logits x @ weight^T, never materialised (1-pass over vocabulary
    tiles); x [N, E], weight [V, E]. Returns (loss [N] fp32, 0 on ignored rows; lse [N] fp32).
    The kernel keeps a [BLOCK_P, E] tile of x in registers, so E is limited to 256 here: a
    larger hidden size needs the contracted rank tiled too (not generated yet)."""
    _floating(x, weight)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise Unsupported("x [N, E] and weight [V, E] expected")
    if x.shape[1] > 256:
        raise Unsupported(f"hidden size {x.shape[1]} > 256: the contraction over it is not tiled yet")
    res = run_cascade(library.linear_cross_entropy_forward(), {"X": x[None, None], "W": weight[None, None]},
                      {"LSE": torch.float32}, compute="float32", config=config)
    lse = res["LSE"][0, 0]
    valid = target != ignore_index
    xt = (x.float() * weight[torch.where(valid, target, 0)].float()).sum(-1)
    return torch.where(valid, lse - xt, 0.0), lse


IMPLS = {
    "rmsnorm_forward": rmsnorm_forward,
    "rmsnorm_backward": rmsnorm_backward,
    "glu_forward": glu_forward,
    "glu_backward": glu_backward,
    "rope_forward": rope_forward,
    "rope_backward": rope_backward,
    "softmax_forward": softmax_forward,
    "softmax_backward": softmax_backward,
    "cross_entropy_forward": cross_entropy_forward,
    "cross_entropy_backward": cross_entropy_backward,
    "attention_forward": attention_forward,
    "linear_cross_entropy_forward": linear_cross_entropy_forward,
}

__all__ = ["IMPLS", "KernelFailure", "run_cascade"] + list(IMPLS)
