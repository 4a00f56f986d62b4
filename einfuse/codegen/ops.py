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
# attention forward and linear cross-entropy forward at the kernel level (the fused ops' entry
# points, `attention` / `attention_backward` / `linear_cross_entropy`, are below)

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
    tiles, the hidden rank in tiles when wider than launch.MAX_FULL_BLOCK); x [N, E], weight [V, E].
    Returns (loss [N] fp32, 0 on ignored rows; lse [N] fp32)."""
    _floating(x, weight)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise Unsupported("x [N, E] and weight [V, E] expected")
    res = run_cascade(library.linear_cross_entropy_lse(), {"X": x[None, None], "W": weight[None, None]},
                      {"LSE": torch.float32}, compute="float32", config=config)
    lse = res["LSE"][0, 0]
    valid = target != ignore_index
    xt = (x.float() * weight[torch.where(valid, target, 0)].float()).sum(-1)
    return torch.where(valid, lse - xt, 0.0), lse


# ---------------------------------------------------------------------------------------
# the fused ops' entry points (same arguments and results as their CPU implementations)

def _attention_mask(q, k, mask, is_causal: bool, window: int):
    """One mask tensor and its cascade kind for the kernels: the caller's mask (bool or additive)
    combined with the causal / sliding-window band (queries aligned to the end of the keys)."""
    S, T = q.shape[2], k.shape[2]
    band = None
    if is_causal or window > 0:
        i = torch.arange(S, device=q.device)[:, None] + (T - S)
        j = torch.arange(T, device=q.device)[None, :]
        band = torch.ones(S, T, dtype=torch.bool, device=q.device)
        if is_causal:
            band &= j <= i
        if window > 0:
            band &= j > i - window
    if mask is not None and mask.dim() < 4:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask is None:
        return (None, None) if band is None else (band[None, None], "causal")
    if mask.dtype == torch.bool:
        return (mask if band is None else mask & band), "bool"
    if not mask.is_floating_point():
        raise Unsupported(f"mask of dtype {mask.dtype}")
    return (mask if band is None else mask.masked_fill(~band, float("-inf"))), "additive"


def _attention_supported(q, k, v):
    _floating(q, k, v)
    if q.dtype == torch.float64:
        raise Unsupported("fp64 attention (the kernels compute in fp32)")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise Unsupported("empty query or key rank")


def attention(q, k, v, mask, scale: float, is_causal: bool, window: int, softcap: float, sdpa_masked_rows: bool):
    """einfuse::attention on the generated kernel (attention_fwd): (out, lse fp32)."""
    _attention_supported(q, k, v)
    m, kind = _attention_mask(q, k, mask, is_causal, window)
    out, lse = attention_forward(q, k, v, scale, m, kind, softcap)
    if sdpa_masked_rows:  # fully masked rows: zeros (SDPA) instead of eager softmax's NaN
        out = out.masked_fill((lse == float("-inf"))[..., None], 0.0)
    return out, lse


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, mask, scale: float, is_causal: bool, window: int,
                       softcap: float, sdpa_masked_rows: bool):
    """einfuse::attention_backward on generated kernels: DELTA (a row program), then dQ
    (attention_bwd_dq, query rows in parallel) and dK, dV (attention_bwd_dkdv, keys in parallel,
    per query head; a GQA group's dK, dV are summed here)."""
    _attention_supported(q, k, v)
    m, kind = _attention_mask(q, k, mask, is_causal, window)
    B, H, S, _ = q.shape
    Hk, F = k.shape[1], v.shape[3]
    g = H // Hk
    dead = torch.isinf(lse)       # fully masked rows (lse = -inf): no gradient
    lse0 = lse.float().masked_fill(dead, 0.0)
    dlse = torch.zeros_like(lse0) if grad_lse is None else grad_lse.float()
    delta = run_cascade(library.attention_backward_delta(),
                        {"DO": grad_out.reshape(-1, F), "O": out.reshape(-1, F), "DLSE": dlse.reshape(-1)},
                        {"DELTA": torch.float32}, compute="float32")["DELTA"].view(B, H, S)
    delta = delta.masked_fill(dead, 0.0)
    ins = {"Q": q, "K": k, "V": v, "DO": grad_out, "LSE": lse0, "DELTA": delta}
    if m is not None:
        ins["M"] = m
    dq = run_cascade(library.attention_backward_dq(float(scale), kind, float(softcap)), ins, {"DQ": q.dtype},
                     compute="float32", head_div={"K": g, "V": g})["DQ"]
    r = run_cascade(library.attention_backward_dkdv(float(scale), kind, float(softcap)), ins,
                    {"DK": torch.float32, "DV": torch.float32}, compute="float32", head_div={"K": g, "V": g})
    dk = r["DK"].view(B, Hk, g, *k.shape[2:]).sum(2) if g > 1 else r["DK"]
    dv = r["DV"].view(B, Hk, g, *v.shape[2:]).sum(2) if g > 1 else r["DV"]
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _lce_inputs(x, weight, bias):
    ins = {"X": x[None, None], "W": weight[None, None]}
    if bias is not None:
        ins["B"] = bias[None, None]
    return ins


def linear_cross_entropy_grads(x, weight, bias, lse, a, coef, y, need_gx: bool, need_gw: bool, need_gb: bool,
                               softcap: float = 0.0, config: dict | None = None):
    """d loss / d (x, weight, bias) for dloss/dlogit[p,v] = (a[p] softmax[p,v] - coef[p] [v == y[p]])
    (times cap' under soft-capping; coef already includes it at the target): the soft part by the
    generated kernels (linear_cross_entropy_bwd_dx: rows in parallel, vocabulary iterated;
    linear_cross_entropy_bwd_dw: vocabulary rows in parallel, tokens iterated), the one-hot
    part here (a gather and an index_add). All fp32."""
    ins = _lce_inputs(x, weight, bias) | {"LSE": lse[None, None].float(), "A": a[None, None].float()}
    has_b = bias is not None
    gx = gw = gb = None
    if need_gx:
        gx = run_cascade(library.linear_cross_entropy_backward_dx(has_b, float(softcap)), ins,
                         {"DX": torch.float32}, compute="float32", config=config)["DX"][0, 0]
        gx -= coef[:, None] * weight.float()[y]
    if need_gw or need_gb:
        outs = {"DW": torch.float32} | ({"DB": torch.float32} if has_b else {})
        r = run_cascade(library.linear_cross_entropy_backward_dw(has_b, float(softcap)), ins, outs,
                        compute="float32", config=config)
        if need_gw:
            gw = r["DW"][0, 0].index_add_(0, y, -coef[:, None] * x.float())
        if need_gb:
            gb = r["DB"][0, 0].index_add_(0, y, -coef)
    return gx, gw, gb


def linear_cross_entropy(hidden, weight, labels, bias, ignore_index: int, reduction: str, z_loss: float,
                         softcap: float, return_logits: bool, need_grad_hidden: bool, need_grad_weight: bool,
                         need_grad_bias: bool, config: dict | None = None):
    """einfuse::linear_cross_entropy on generated kernels: (loss, logits [0], grad_hidden,
    grad_weight, grad_bias), the gradients fp32 for grad_output == 1 (empty when not needed).
    The caller (the op) has validated the inputs."""
    _floating(hidden, weight)
    if return_logits:
        raise Unsupported("return_logits materialises the logits (the CPU path does that)")
    if hidden.dtype == torch.float64:
        raise Unsupported("fp64 (the kernels compute in fp32)")
    f32 = torch.float32
    labels = labels.long()
    valid = labels != ignore_index
    n_valid = int(valid.sum())
    y = torch.where(valid, labels, 0)
    lse = run_cascade(library.linear_cross_entropy_lse(bias is not None, float(softcap)),
                      _lce_inputs(hidden, weight, bias), {"LSE": f32}, compute="float32", config=config)["LSE"][0, 0]
    zt = (hidden.float() * weight.float()[y]).sum(-1)       # the target logit: a gather and a row dot
    if bias is not None:
        zt = zt + bias.float()[y]
    cap_d = None
    if softcap > 0:
        t = torch.tanh(zt / softcap)
        zt, cap_d = softcap * t, 1.0 - t * t
    row = lse - zt
    if z_loss != 0.0:
        row = row + z_loss * lse * lse
    row = row.masked_fill(~valid, 0.0)
    loss = row.sum() / n_valid if reduction == "mean" else row.sum()
    if reduction == "mean" and n_valid == 0:
        loss = torch.full((), float("nan"), dtype=f32, device=hidden.device)
    empty = hidden.new_empty((0,), dtype=f32)
    gh = gw = gb = empty
    if need_grad_hidden or need_grad_weight or need_grad_bias:
        w_scale = (1.0 / max(n_valid, 1)) if reduction == "mean" else 1.0
        wy = torch.where(valid, w_scale, 0.0).to(f32)
        a = wy * (1.0 + 2.0 * z_loss * lse) if z_loss != 0.0 else wy
        coef = wy if cap_d is None else wy * cap_d
        gx_, gw_, gb_ = linear_cross_entropy_grads(hidden, weight, bias, lse, a, coef, y, need_grad_hidden,
                                                    need_grad_weight, need_grad_bias, softcap, config)
        gh = gx_ if gx_ is not None else empty
        gw = gw_ if gw_ is not None else empty
        gb = gb_ if gb_ is not None else empty
    return loss.to(hidden.dtype), hidden.new_empty((0,)), gh, gw, gb


IMPLS = {
    "attention": attention,
    "attention_backward": attention_backward,
    "linear_cross_entropy": linear_cross_entropy,
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
