"""Logit-free fused linear + cross-entropy ("Cut Your Losses" / Liger fused linear CE).

loss = reduce_i [ lse_i - x_i[y_i] + z_loss * lse_i**2 ]  over rows with y_i != ignore_index,
x = hidden @ weight.T + bias  (then softcap * tanh(x / softcap) if softcap > 0),
lse_i = logsumexp_j x_ij.

Algorithm (CPU implementation; CUDA tensors, or EINFUSE_KERNELS=triton, take the generated
Triton kernels of `einfuse.codegen.ops.linear_cross_entropy` instead, via `einfuse.runtime.dispatch`)
-------------------------------------------------------------
The [N, V] logits are never materialised. Rows with an ignored label are dropped
up front (they cost nothing), then the remaining tokens are walked in chunks of
``C`` rows, ``C`` chosen so one fp32 [C, V] chunk is at most ``CHUNK_BYTES`` (32 MiB;
160 tokens at V=49152):

1. One fp32 matmul (oneDNN linear, else ``torch.addmm``) produces the chunk's logits
   (softcap: ``tanh`` in place, its derivative 1/cosh**2 kept in a second buffer
   for the gradient).
2. The target logit is gathered, then the native row-wise softmax kernel turns the
   buffer into probabilities P *in place* (one cache-friendly pass per row).
   The per-row loss is ``-log P[y]``, or ``-log1p(-q)`` with ``q = sum_{j != y} P_j``
   (one more row pass) where ``P[y] > 1/2``: a well-predicted row's ``P[y]`` is within
   eps of 1, so ``-log P[y]`` would keep only eps/q relative accuracy; ``lse = x[y] + loss``.  Where ``P[y]`` is too
   small to be represented accurately (loss > ~69, e.g. huge logits) the lse of
   just those rows is recomputed exactly with ``logsumexp`` on re-evaluated logits.
3. Because the loss is the end of the graph, the gradients are produced right
   here, chunk by chunk (only when an input requires grad).  With w the row's loss
   weight (1/n_valid for "mean", 1 for "sum") and a = w * (1 + 2 z_loss lse):
       dL/dx = a * G,   G = P - (w/a) * onehot(y)    (G *= 1/cosh**2 with softcap)
   The one-hot term touches only the C target entries of the buffer (``p_y - 1`` as in
   eager: the gradient is judged against eager's fp64 formula, which forms it the same way), and the row scale a is applied to the small
   [C, H] operands, never to the [C, V] buffer:
       grad_hidden[rows] = a * (G @ W)
       grad_weight      += G.T @ (a * h)
       grad_bias        += G.T @ a
   Accumulation is in fp32 regardless of the input dtype (bf16 inputs are computed
   in fp32 throughout).

Saved for backward: the three fp32 gradients (grad_hidden [N, H], grad_weight
[V, H], grad_bias [V]), held by the autograd node - never logits, probabilities or
log-probabilities - plus references to the inputs. They are the size of the inputs
(113 MB for a 49152 x 576 lm_head) versus N*V*4 bytes for the logits (805 MB at
N=4096). The backward only scales them by the incoming scalar grad_output (like
Liger-Kernel); when that is exactly 1 (eager ``loss.backward()``) it hands them over
without a copy, so backward allocates nothing. A second backward through a retained
graph recomputes them from the saved inputs. Nothing is computed or saved for
gradients when no input requires grad (inference / ``torch.no_grad``).

``return_logits=True`` additionally returns the (soft-capped) logits in the input
dtype.  Gradients flowing into those returned logits are supported: backward then
adds ``G @ W``, ``G.T @ h`` and ``G.sum(0)`` for that incoming G (hidden / weight
and, with softcap, the returned logits are saved for that purpose only when
``return_logits`` is set).

Limitations: reductions "mean" and "sum" only (per-row "none" losses cannot be
scaled into precomputed weight gradients); no double backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from einfuse.runtime import counters, dispatch
from einfuse.runtime.ops._checks import same_device

__all__ = ["linear_cross_entropy", "linear_cross_entropy_op", "CHUNK_BYTES"]

# Upper bound on the size of one fp32 chunk of logits. Read at call time, so tests
# can monkeypatch it to force many chunks.
CHUNK_BYTES: int = 32 * 2**20

# Rows whose target probability falls below this get their lse recomputed exactly
# (below it, fp32 -log(p) loses accuracy / underflows).
_P_TINY = 1e-30

_REDUCTIONS = ("mean", "sum")


def _chunk_rows(n: int, v: int) -> int:
    rows = max(1, CHUNK_BYTES // (4 * max(v, 1)))
    if rows >= 32:
        rows -= rows % 16  # friendlier matmul shapes
    return max(1, min(n, rows))


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], reduction: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden size mismatch {hidden.shape[1]} vs {weight.shape[1]}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: labels must be [N={hidden.shape[0]}], got {tuple(labels.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError("linear_cross_entropy: hidden, weight and bias must have the same dtype")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"linear_cross_entropy: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int64, got {labels.dtype}")


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except Exception:  # pragma: no cover - builds without oneDNN
        return False


# oneDNN's fp32 linear (full fp32, no reduced-precision math mode) ran the logits product
# [C, H] x [H, V] ~25-40% and P @ W ~10% faster than the MKL sgemm behind torch.mm on the
# 2-core AMD EPYC we measured on (CPU time, C = 128..320); torch.mm is the fallback.
# Monkeypatchable for tests.
_USE_ONEDNN: bool = _has_onednn_linear()


def _mm_nt(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a @ b.T (+ bias) as a new fp32 tensor; b may be a transposed view."""
    if (_USE_ONEDNN and a.device.type == "cpu" and a.dtype == torch.float32 and b.dtype == torch.float32
            and a.is_contiguous() and (b.stride(1) == 1 or b.stride(0) == 1) and a.numel() and b.numel()
            and (bias is None or bias.is_contiguous())):
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return torch.mm(a, b.t()) if bias is None else torch.addmm(bias, a, b.t())


def _chunk_logits(h: Tensor, w: Tensor, b: Optional[Tensor], softcap: float, dcap: Optional[Tensor]) -> Tensor:
    """(softcapped) h @ w.T + b as a new fp32 [c, V] tensor; dcap <- d cap / d logit if given."""
    out = _mm_nt(h, w, b)
    if softcap > 0.0:
        out.div_(softcap)
        if dcap is not None:
            # d/du tanh(u) = 1 / cosh(u)**2, accurate even where tanh saturates
            # (1 - tanh**2 would cancel catastrophically there); overflow gives 0.
            torch.cosh(out, out=dcap)
            dcap.square_().reciprocal_()
        out.tanh_().mul_(softcap)
    return out


@torch.library.custom_op("einfuse::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    z_loss: float,
    softcap: float,
    return_logits: bool,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, logits, grad_hidden, grad_weight, grad_bias).

    loss: [] in hidden.dtype. logits: [N, V] in hidden.dtype if return_logits else [0].
    grad_*: fp32 d(loss)/d(input) for grad_output == 1 when the matching need_grad_*
    flag is set, else an empty [0] fp32 tensor.
    """
    counters.bump("linear_cross_entropy")
    _check_inputs(hidden, weight, labels, bias, reduction)
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    if need_grad_bias and bias is None:
        raise ValueError("linear_cross_entropy: need_grad_bias set without a bias")

    labels = labels.long()
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        raise IndexError(f"linear_cross_entropy: label {int(labels[bad][0])} out of range for vocabulary size {v}")
    res = dispatch.try_triton("linear_cross_entropy", hidden, weight, labels, bias, ignore_index, reduction, z_loss,
                              softcap, return_logits, need_grad_hidden, need_grad_weight, need_grad_bias)
    if res is not None:  # CUDA (or EINFUSE_KERNELS=triton): the generated kernels
        return res
    n_valid = int(valid.sum())

    # fp32 views/copies of the operands (no copy for fp32 inputs).
    w32 = weight if weight.dtype == f32 else weight.to(f32)
    b32 = None if bias is None else (bias if bias.dtype == f32 else bias.to(f32))

    # Rows to process. Ignored rows are dropped (they neither count nor get gradient)
    # unless the caller wants every row's logits.
    if return_logits or n_valid == n:
        rows_h, rows_y, row_idx, all_rows = hidden, labels, None, True
        row_valid = None if n_valid == n else valid
    else:
        row_idx = valid.nonzero().squeeze(1)
        rows_h, rows_y, all_rows = hidden.index_select(0, row_idx), labels.index_select(0, row_idx), False
        row_valid = None  # every kept row is valid
    m = rows_h.shape[0]

    logits_out = hidden.new_empty((n, v)) if return_logits else hidden.new_empty((0,))
    if need_grad_hidden:
        # fully overwritten when every row is processed; ignored rows stay zero otherwise
        grad_hidden = (torch.empty if (return_logits or n_valid == n) else torch.zeros)((n, hdim), dtype=f32, device=dev)
    else:
        grad_hidden = hidden.new_empty((0,), dtype=f32)
    grad_weight = torch.zeros((v, hdim), dtype=f32, device=dev) if need_grad_weight else hidden.new_empty((0,), dtype=f32)
    grad_bias = torch.zeros((v,), dtype=f32, device=dev) if need_grad_bias else hidden.new_empty((0,), dtype=f32)
    # grad rows of the processed tokens (a separate buffer only when rows were compacted)
    gh_rows = None
    if need_grad_hidden:
        gh_rows = grad_hidden if all_rows else torch.empty((m, hdim), dtype=f32, device=dev)

    # Per-row weight of the loss (1/n_valid for mean; gradients use 1/max(n,1) so that
    # "all ignored" gives zero gradients like eager, while the loss itself is 0/0 = NaN).
    w_scale = (1.0 / max(n_valid, 1)) if reduction == "mean" else 1.0

    row_loss = torch.empty((m,), dtype=f32, device=dev)
    c_rows = _chunk_rows(m, v)
    dcap_buf = torch.empty((c_rows, v), dtype=f32, device=dev) if (m > 0 and softcap > 0.0 and need_grad) else None
    if need_grad:
        ones = torch.ones((c_rows,), dtype=f32, device=dev)
        neg_ones = torch.full((c_rows, 1), -1.0, dtype=f32, device=dev)

    for s in range(0, m, c_rows):
        e = min(s + c_rows, m)
        c = e - s
        dcap = None if dcap_buf is None else dcap_buf[:c]
        h = rows_h[s:e]
        h32 = h if h.dtype == f32 else h.to(f32)
        y = rows_y[s:e]
        if row_valid is not None:
            vmask = row_valid[s:e]
            y = torch.where(vmask, y, 0)  # safe gather index for ignored rows
        y2 = y.unsqueeze(1)

        x = _chunk_logits(h32, w32, b32, softcap, dcap)  # [c, V] fp32, the only big buffer
        if return_logits:
            logits_out[s:e].copy_(x)
        x_y = x.gather(1, y2).squeeze(1)
        torch._softmax(x, 1, False, out=x)  # x <- P, in place, one row-local pass
        p_y = x.gather(1, y2).squeeze(1)
        # q = 1 - p_y, summed from the other probabilities (no cancellation): for well-predicted rows
        # p_y rounds to within eps of 1 and -log(p_y) would keep only eps / q of relative accuracy;
        # -log1p(-q) keeps full precision (eager's log_softmax does not)
        x.scatter_(1, y2, 0.0)
        q = x.sum(1)
        x.scatter_(1, y2, p_y.unsqueeze(1))
        loss_c = torch.where(p_y > 0.5, torch.log1p(-q).neg_(), p_y.log().neg_())
        tiny = p_y < _P_TINY
        if bool(tiny.any()):
            # -log(p) is inaccurate here: recompute lse exactly for these rows only.
            ti = tiny.nonzero().squeeze(1)
            xt = _chunk_logits(h32.index_select(0, ti), w32, b32, softcap, None)
            loss_c.index_copy_(0, ti, torch.logsumexp(xt, 1) - x_y.index_select(0, ti))
            del xt
        lse = x_y + loss_c
        if z_loss != 0.0:
            loss_c = loss_c + z_loss * lse * lse
        if row_valid is not None:
            loss_c = loss_c.masked_fill(~vmask, 0.0)
        row_loss[s:e] = loss_c

        if not need_grad:
            del x
            continue
        # dL/dx_ij = a_i * (P_ij - r_i [j == y_i])  (times dcap_ij with softcap), with
        # a_i = wy_i (1 + 2 z_loss lse_i), r_i = wy_i / a_i and wy_i the row's loss weight.
        # The one-hot term is subtracted in the buffer at the c target entries only (as
        # eager does: p_y - 1 stays accurate for well-predicted rows); the row scale a is
        # applied to the small [c, H] operands / results, never to the [c, V] buffer.
        if z_loss == 0.0 and row_valid is None:
            a_vec = None  # uniform: a_i = r_i^-1 * wy_i = w_scale, r_i = 1
            x.scatter_add_(1, y2, neg_ones[:c])
        else:
            wy = torch.full((c,), w_scale, dtype=f32, device=dev)
            if row_valid is not None:
                wy = wy.masked_fill(~vmask, 0.0)
            # 1 - r = 2 z lse wy / a, formed directly: r itself is within eps of 1 for small z,
            # and p_y - r would cancel; (p_y - 1) + (1 - r) keeps eager's accuracy.
            zterm = wy * (2.0 * z_loss) * lse if z_loss != 0.0 else torch.zeros_like(wy)
            a_vec = wy + zterm
            nz = a_vec != 0
            one_minus_r = torch.where(nz, zterm / torch.where(nz, a_vec, 1.0), 1.0)
            deg = ~nz & (wy != 0)
            if bool(deg.any()):  # 1 + 2 z lse == 0 exactly: gradient is -wy * onehot only
                x.masked_fill_(deg.unsqueeze(1), 0.0)
                a_vec = torch.where(deg, 1.0, a_vec)
                one_minus_r = torch.where(deg, 1.0 - wy, one_minus_r)
            x.scatter_add_(1, y2, neg_ones[:c])
            x.scatter_add_(1, y2, one_minus_r.unsqueeze(1))
        if softcap > 0.0:
            x.mul_(dcap)  # chain rule through the cap
        if need_grad_hidden:
            torch.mul(_mm_nt(x, w32.t()), w_scale if a_vec is None else a_vec.unsqueeze(1), out=gh_rows[s:e])
        if need_grad_weight:
            if a_vec is None:
                grad_weight.addmm_(x.t(), h32, alpha=w_scale)
            else:
                grad_weight.addmm_(x.t(), h32 * a_vec.unsqueeze(1))
        if need_grad_bias:
            if a_vec is None:
                grad_bias.addmv_(x.t(), ones[:c], alpha=w_scale)
            else:
                grad_bias.addmv_(x.t(), a_vec)
        del x  # free this chunk's buffer before the next one is allocated

    if need_grad_hidden and not all_rows:
        grad_hidden.index_copy_(0, row_idx, gh_rows)

    total = row_loss.sum()
    loss = total / n_valid if reduction == "mean" else total
    if reduction == "mean" and n_valid == 0:
        loss = torch.full((), float("nan"), dtype=f32, device=dev)
    return loss.to(hidden.dtype), logits_out, grad_hidden, grad_weight, grad_bias


@linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, reduction, z_loss, softcap, return_logits,
      need_grad_hidden, need_grad_weight, need_grad_bias):
    same_device("linear_cross_entropy", hidden=hidden, weight=weight, labels=labels, bias=bias)
    n, hdim = hidden.shape
    v = weight.shape[0]
    f32 = torch.float32
    loss = hidden.new_empty(())
    logits = hidden.new_empty((n, v)) if return_logits else hidden.new_empty((0,))
    gh = hidden.new_empty((n, hdim), dtype=f32) if need_grad_hidden else hidden.new_empty((0,), dtype=f32)
    gw = hidden.new_empty((v, hdim), dtype=f32) if need_grad_weight else hidden.new_empty((0,), dtype=f32)
    gb = hidden.new_empty((v,), dtype=f32) if need_grad_bias else hidden.new_empty((0,), dtype=f32)
    return loss, logits, gh, gw, gb


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, ignore_index, reduction, z_loss, softcap, return_logits,
     need_gh, need_gw, need_gb) = inputs
    loss, logits, gh, gw, gb = output
    # The precomputed gradients are internal outputs: no gradient flows into them.
    ctx.mark_non_differentiable(gh, gw, gb)
    # An unused returned-logits output must not get a materialised [N, V] zero gradient.
    ctx.set_materialize_grads(False)
    ctx.flags = (need_gh, need_gw, need_gb)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.args = (ignore_index, reduction, z_loss, softcap)
    ctx.return_logits = return_logits
    # The precomputed gradients are held by the node itself (not save_for_backward, whose
    # saved outputs alias what they save) so the first backward can take sole ownership
    # and hand them to autograd without a copy. They have no grad_fn: no ref cycle.
    ctx.precomputed = [gh, gw, gb]
    # Inputs (references, no copies): for a second backward through a retained graph, and
    # for gradients flowing into the returned logits (which, with softcap, also need them).
    ctx.save_for_backward(hidden, weight, labels, bias,
                          logits if (return_logits and softcap > 0.0) else None)


def _backward(ctx, g_loss, g_logits, _g_gh, _g_gw, _g_gb):
    hidden, weight, labels, bias, logits = ctx.saved_tensors
    dt_h, dt_w, dt_b = ctx.dtypes
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    for wanted, computed, name in zip(need, ctx.flags, ("hidden", "weight", "bias")):
        if wanted and not computed:
            raise RuntimeError(
                f"einfuse::linear_cross_entropy: gradient for {name} requested but need_grad_{name} was False "
                "in the forward call (use the linear_cross_entropy wrapper)")

    grads = [None, None, None]
    if g_loss is not None:
        pre, ctx.precomputed = ctx.precomputed, None
        if pre is None:
            # Second backward through a retained graph: the first one handed the
            # precomputed gradients over, so recompute them (no logits kept).
            with torch.no_grad():
                ignore_index, reduction, z_loss, softcap = ctx.args
                pre = list(linear_cross_entropy_op(hidden, weight, labels, bias, ignore_index, reduction,
                                                   z_loss, softcap, False, *ctx.flags)[2:])
        # Eager loss.backward() passes exactly 1: the gradients (which nothing else now
        # references) are returned as they are and autograd adopts them as .grad, so the
        # backward allocates nothing. Otherwise (or in traced backwards: torch.compile's
        # fake/functional tensors) they are scaled out of place.
        unit = (type(g_loss) is torch.Tensor and not torch.compiler.is_compiling()
                and bool(g_loss == 1))
        for i in range(3):
            if need[i]:
                grads[i] = pre[i] if unit else pre[i] * g_loss
        del pre

    if g_logits is not None and ctx.return_logits:
        g = g_logits.to(torch.float32)
        if ctx.args[3] > 0.0:
            t = logits.to(torch.float32) / ctx.args[3]
            g = g * (1.0 - t * t)
        contrib = [
            (lambda: g @ weight.to(torch.float32)) if need[0] else None,
            (lambda: g.t() @ hidden.to(torch.float32)) if need[1] else None,
            (lambda: g.sum(0)) if need[2] else None,
        ]
        for i, fn in enumerate(contrib):
            if fn is not None:
                grads[i] = fn() if grads[i] is None else grads[i] + fn()

    out = []
    for gr, dt in zip(grads, (dt_h, dt_w, dt_b)):
        out.append(None if gr is None else gr.to(dt))
    gh, gw, gb = out
    return gh, gw, None, gb, None, None, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float = 0.0,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without materialising logits.

    hidden: [..., H] (leading dims are flattened), weight: [V, H], bias: [V] or None,
    labels: [...] int64, already shifted. Returns the loss in hidden's dtype, and with
    ``return_logits=True`` also the [..., V] (soft-capped) logits.
    """
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    grad_on = torch.is_grad_enabled()
    need_gh = grad_on and hidden.requires_grad
    need_gw = grad_on and weight.requires_grad
    need_gb = grad_on and bias is not None and bias.requires_grad
    loss, logits, _, _, _ = linear_cross_entropy_op(
        h2, weight, y, bias, int(ignore_index), str(reduction), float(z_loss), float(softcap),
        bool(return_logits), need_gh, need_gw, need_gb)
    if return_logits:
        return loss, logits.reshape(*lead, weight.shape[0])
    return loss
