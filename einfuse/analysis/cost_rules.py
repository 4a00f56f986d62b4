"""Per-op cost rules: FLOPs, internal allocations, what autograd saves, the backward.

Every table is a dict keyed by the normalised op name (`einfuse.ir.lower.op_name`;
`torch.ops` overloads by their schema name, so the fused ops' Python wrappers,
`einfuse.runtime.ops.rmsnorm.rms_norm`, and `torch.ops.einfuse.rms_norm` take the same
entry), with a default for ops that have none.

FLOP counting convention (forward, what the op executes):
  * contractions (linear, matmul, mm, bmm, addmm, baddbmm, einsum, the matmuls inside
    SDPA and the fused ops): 2*M*N*K per product, counted in `matmul_flops` (and in
    `flops`). This is what `torch.utils.flop_counter.FlopCounterMode` counts for
    mm/bmm/addmm; a bias add is an elementwise op (in `flops` only);
  * elementwise ops (arithmetic, comparisons producing floats, where/masked_fill,
    activations, transcendental functions): 1 per output element per op, when the op
    touches floating-point data (integer index arithmetic and boolean mask
    comparisons count 0); silu, gelu, sigmoid, exp, rsqrt... are 1 each;
  * reductions (sum, mean, amax, max, min, prod, ...): 1 per input element (mean's
    division is not counted); var/std 3, logsumexp 4 per input element;
  * softmax / log_softmax: 5 per element (max, subtract, exp, sum, divide/log);
    cross_entropy: log_softmax (5 per logit) + 1 per row (the pick and the sum);
  * layer_norm: 5 per element + 2 per row (+1 per element each for weight and bias);
    rms_norm: 3 per element + 2 per row (+1 per element for the weight);
  * dropout: 2 per element when active (mask and scale), 0 when p = 0 or eval;
  * data movement (views, reshape/contiguous copies, casts, cat, embedding, index,
    pad, creation ops): 0;
  * fused ops count what they compute, with the same convention, so FLOPs before and
    after a fusion are equal where the algorithm is the same: rms_norm as above
    (add_rms_norm: + 1 per element for the residual add);
    attention 2*S*T*(D + Dv) per (batch, head) in matmuls + (1 scale + 1 mask + 5
    softmax) per score; glu 2 per element; glu_mlp 3 matmuls + 2 per intermediate
    element; rope 3 per rotated element (the unfused rotate_half also negates half:
    3.5); linear_cross_entropy the logits matmul + 5 per logit + 1 per row, and when
    it computes gradients in the forward (training), the two gradient matmuls.

What autograd saves (`saved_rules`) is what derivatives.yaml saves for the op's
forward (linear: its input; matmul: both operands; mul: each operand the other's
gradient needs; softmax/log_softmax/rsqrt/exp/tanh/sigmoid: the output; silu, gelu,
pow, log: the input; ...), and for the fused ops what their `setup_context` saves
(module docstrings in einfuse/runtime/ops/): rms_norm x and rstd; add_rms_norm h = x + residual
and rstd; glu gate and up;
glu_mlp x, g, u; rope cos and sin; attention q, k, v, out, lse (and the mask);
linear_cross_entropy the gradients it computes in the forward. Parameters and other
graph inputs cost nothing there: they are alive anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .symbolic import NodeCost, OpCtx, TVal, prod

F32 = torch.float32

# ---------------------------------------------------------------------------------------
# helpers


def _t(x: Any) -> TVal | None:
    return x if isinstance(x, TVal) else None


def _first(c: OpCtx) -> TVal | None:
    return c.ins[0] if c.ins else None


def _float_involved(c: OpCtx) -> bool:
    return any(t.floating for t in c.outs) or any(t.floating for t in c.ins)


def _is_wrapper(c: OpCtx) -> bool:
    """A fused op called through its Python wrapper (vs torch.ops.einfuse.*)."""
    return not isinstance(c.node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


_INPLACE_FUNCS = {"iadd", "imul", "isub", "itruediv"}


def is_inplace(c: OpCtx) -> bool:
    t = c.node.target
    if c.node.op == "call_method":
        return isinstance(t, str) and t.endswith("_") and not t.startswith("_")
    name = getattr(t, "__name__", "")
    if name in _INPLACE_FUNCS:
        return True
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.endswith("_")
    return False


# ---------------------------------------------------------------------------------------
# FLOPs: rule(c) -> (flops, matmul_flops, io description for contractions)

def _ew(per: float = 1):
    def rule(c: OpCtx):
        if not c.outs or not _float_involved(c):
            return 0, 0
        return per * c.out.numel, 0
    return rule


def _reduce(per: float = 1):
    def rule(c: OpCtx):
        x = _first(c)
        if x is None or not x.floating:
            return 0, 0
        return per * x.numel, 0
    return rule


def _zero(c: OpCtx):
    return 0, 0


def _broadcast(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    return tuple(y if x == 1 else x for x, y in zip(a, b))


def matmul_dims(a: TVal, b: TVal) -> tuple[Any, Any, Any, Any]:
    """(batch, m, n, k) of torch.matmul(a, b)."""
    sa, sb = tuple(a.shape), tuple(b.shape)
    if len(sa) == 1 and len(sb) == 1:
        return 1, 1, 1, sa[0]
    if len(sa) == 1:
        return prod(sb[:-2]), 1, sb[-1], sa[0]
    if len(sb) == 1:
        return prod(sa[:-2]), sa[-2], 1, sa[-1]
    batch = prod(_broadcast(sa[:-2], sb[:-2]))
    return batch, sa[-2], sb[-1], sa[-1]


def _gemm(c: OpCtx, batch, m, n, k, a: TVal | None = None, b: TVal | None = None):
    c.io_gemms.append((batch, m, n, k, (a or b).itemsize if (a or b) else 4))
    c.io_operands.extend(id(t) for t in (a, b) if t is not None)
    return 2 * batch * m * n * k


def _matmul(c: OpCtx):
    a, b = _t(c.arg(0, "input")), _t(c.arg(1, "other"))
    if a is None or b is None:
        return 0, 0
    batch, m, n, k = matmul_dims(a, b)
    f = _gemm(c, batch, m, n, k, a, b)
    return f, f


def _linear(c: OpCtx):
    x, w, bias = _t(c.arg(0, "input")), _t(c.arg(1, "weight")), _t(c.arg(2, "bias"))
    if x is None or w is None:
        return 0, 0
    m = prod(x.shape[:-1])
    k = x.shape[-1]
    n = w.shape[0] if w.ndim == 2 else 1
    f = _gemm(c, 1, m, n, k, x, w)
    return f + (m * n if bias is not None else 0), f


def _addmm(c: OpCtx):  # addmm(bias, a, b) / baddbmm(bias, a, b) / addbmm
    a, b = _t(c.arg(1, "mat1" if c.name == "addmm" else "batch1")), _t(c.arg(2, "mat2" if c.name == "addmm" else "batch2"))
    if a is None or b is None:
        return 0, 0
    batch, m, n, k = matmul_dims(a, b)
    f = _gemm(c, batch, m, n, k, a, b)
    out = c.out.numel if c.out is not None else m * n
    return f + out, f


def _einsum_sizes(eq: str, ops: list[TVal]) -> tuple[dict, str, list[str]] | None:
    eq = eq.replace(" ", "")
    if "." in eq:
        return None
    lhs, _, rhs = eq.partition("->")
    specs = lhs.split(",")
    if not _:
        # implicit output: letters appearing once, sorted
        letters = "".join(specs)
        rhs = "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    size: dict[str, Any] = {}
    for spec, t in zip(specs, ops):
        for ch, s in zip(spec, t.shape):
            if size.get(ch, 1) == 1:
                size[ch] = s
    return size, rhs, specs


def _einsum(c: OpCtx):
    eq = c.arg(0, "equation")
    ops = [t for t in c.ins]
    if not isinstance(eq, str) or not ops:
        return 0, 0
    parsed = _einsum_sizes(eq, ops)
    if parsed is None:
        return 0, 0
    size, rhs, specs = parsed
    if len(specs) == 1:
        return prod(size[ch] for ch in specs[0]), 0
    total, mm = 0, 0
    cur = specs[0]
    for i, spec in enumerate(specs[1:], 1):
        later = set("".join(specs[i + 1:])) | set(rhs)
        letters = list(dict.fromkeys(cur + spec))
        keep = "".join(ch for ch in letters if ch in later)
        contracted = [ch for ch in letters if ch not in later and ch in cur and ch in spec]
        work = prod(size[ch] for ch in letters)
        if contracted:
            total += 2 * work
            mm += 2 * work
            batch = prod(size[ch] for ch in letters if ch in cur and ch in spec and ch in later)
            m = prod(size[ch] for ch in cur if ch not in spec)
            n = prod(size[ch] for ch in spec if ch not in cur)
            k = prod(size[ch] for ch in contracted)
            c.io_gemms.append((batch, m, n, k, ops[0].itemsize))
            c.io_operands.extend(id(t) for t in ops)
        else:
            total += work
        cur = keep
    return total, mm


def _attn_dims(q: TVal, k: TVal, v: TVal) -> tuple[Any, Any, Any, Any, Any, Any]:
    """(batch*query heads, S, T, D, Dv, kv heads*batch) for [.., H, S, D] operands."""
    bh = prod(q.shape[:-2])
    bhk = prod(k.shape[:-2])
    return bh, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], bhk


def _sdpa(c: OpCtx):
    q, k, v = _t(c.arg(0, "query")), _t(c.arg(1, "key")), _t(c.arg(2, "value"))
    if q is None or k is None or v is None:
        return 0, 0
    bh, s, t, d, dv, _ = _attn_dims(q, k, v)
    mm = _gemm(c, bh, s, t, d, q, k) + _gemm(c, bh, s, dv, t, q, v)
    mask = c.arg(3, "attn_mask") is not None or bool(c.arg(5, "is_causal", False))
    return mm + bh * s * t * (1 + 5 + (1 if mask else 0)), mm


def _softmax(c: OpCtx):
    x = _first(c)
    return (5 * x.numel if x is not None else 0), 0


def _cross_entropy(c: OpCtx):
    x = _first(c)
    if x is None:
        return 0, 0
    rows = prod(x.shape[:-1]) if x.ndim > 1 else 1
    return 5 * x.numel + rows, 0


def _layer_norm(c: OpCtx):
    x = _first(c)
    if x is None:
        return 0, 0
    shape = c.arg(1, "normalized_shape")
    nd = len(shape) if isinstance(shape, (list, tuple)) else 1
    rows = prod(x.shape[:-nd]) if nd < x.ndim else 1
    f = 5 * x.numel + 2 * rows
    f += x.numel if c.arg(2, "weight") is not None else 0
    f += x.numel if c.arg(3, "bias") is not None else 0
    return f, 0


def _rms_norm_fn(c: OpCtx):  # F.rms_norm(x, normalized_shape, weight, eps)
    x = _first(c)
    if x is None:
        return 0, 0
    rows = prod(x.shape[:-1])
    return 3 * x.numel + 2 * rows + (x.numel if c.arg(2, "weight") is not None else 0), 0


def _dropout(c: OpCtx):
    p, train = c.arg(1, "p", 0.5), c.arg(2, "training", True)
    if not train or p == 0 or c.out is None:
        return 0, 0
    return 2 * c.out.numel, 0


# -- fused ops ---------------------------------------------------------------------------------

def _fused_rms_norm(c: OpCtx):
    x = _first(c)
    if x is None:
        return 0, 0
    rows = prod(x.shape[:-1])
    offset = c.arg(3, "offset", 0.0)
    w = _t(c.arg(1, "weight"))
    return 4 * x.numel + 2 * rows + (w.numel if (offset and w is not None) else 0), 0


def _fused_add_rms_norm(c: OpCtx):
    """add_rms_norm(x, residual, w, eps, offset): the residual add (1 per element) + rms_norm."""
    x = _first(c)
    if x is None:
        return 0, 0
    rows = prod(x.shape[:-1])
    offset = c.arg(4, "offset", 0.0)
    w = _t(c.arg(2, "weight"))
    return 5 * x.numel + 2 * rows + (w.numel if (offset and w is not None) else 0), 0


def _fused_attention(c: OpCtx):
    q, k, v = _t(c.arg(0)), _t(c.arg(1)), _t(c.arg(2))
    if q is None or k is None or v is None:
        return 0, 0
    bh, s, t, d, dv, _ = _attn_dims(q, k, v)
    mm = _gemm(c, bh, s, t, d, q, k) + _gemm(c, bh, s, dv, t, q, v)
    mask = c.arg(3, "mask") is not None or bool(_attn_param(c, "is_causal"))
    softcap = _attn_param(c, "softcap") or 0.0
    per = 1 + 5 + (1 if mask else 0) + (3 if softcap else 0)
    return mm + bh * s * t * per, mm


_ATTN_PARAMS = ("scale", "is_causal", "window", "softcap", "sdpa_masked_rows")


def _attn_param(c: OpCtx, name: str):
    if name in c.kwargs:
        return c.kwargs[name]
    i = 4 + _ATTN_PARAMS.index(name)
    return c.args[i] if len(c.args) > i else None


def _fused_glu(c: OpCtx):
    g = _first(c)
    return (2 * g.numel if g is not None else 0), 0


def _fused_glu_mlp(c: OpCtx):
    x, wg, wu, wd = (_t(c.arg(i)) for i in range(4))
    if x is None or wg is None or wd is None:
        return 0, 0
    n = prod(x.shape[:-1])
    h, i, h2 = x.shape[-1], wg.shape[0], wd.shape[0]
    mm = _gemm(c, 1, n, i, h, x, wg) + _gemm(c, 1, n, i, h, x, wu) + _gemm(c, 1, n, h2, i, x, wd)
    bias = sum(n * (i if j < 2 else h2) for j, b in enumerate((c.arg(4), c.arg(5), c.arg(6))) if _t(b) is not None)
    return mm + 2 * n * i + bias, mm


def _fused_rope(c: OpCtx):
    q, k, cos = _t(c.arg(0)), _t(c.arg(1)), _t(c.arg(2))
    if q is None or k is None or cos is None:
        return 0, 0
    inter = c.kwargs.get("interleaved", c.args[4] if len(c.args) > 4 else False)
    r = cos.shape[-1] * (2 if inter else 1)
    rows = prod(q.shape[:-1]) + prod(k.shape[:-1])
    return 3 * rows * r, 0


def lce_needs(c: OpCtx) -> tuple[bool, bool, bool]:
    """(grad hidden, grad weight, grad bias) computed in the forward of linear_cross_entropy."""
    if not _is_wrapper(c):
        return tuple(bool(c.args[i]) if len(c.args) > i else False for i in (9, 10, 11))  # type: ignore
    h, w, b = _t(c.arg(0)), _t(c.arg(1)), _t(c.arg(3, "bias"))
    on = c.training
    return (on and h is not None and h.requires_grad, on and w is not None and w.requires_grad,
            on and b is not None and b.requires_grad)


def _fused_lce(c: OpCtx):
    h, w, b = _t(c.arg(0)), _t(c.arg(1)), _t(c.arg(3, "bias"))
    if h is None or w is None:
        return 0, 0
    n, hd, v = prod(h.shape[:-1]), h.shape[-1], w.shape[0]
    mm = _gemm(c, 1, n, v, hd, h, w)
    softcap = c.kwargs.get("softcap", c.args[7] if len(c.args) > 7 else 0.0) or 0.0
    ew = 5 * n * v + n + (n * v if b is not None else 0) + (3 * n * v if softcap else 0)
    gh, gw, _ = lce_needs(c)
    if gh or gw:
        ew += 2 * n * v                      # dL/dlogits = a * P - w * onehot
        if gh:
            mm += _gemm(c, 1, n, hd, v, h, w)  # grad_hidden = dL @ W
        if gw:
            mm += _gemm(c, 1, v, hd, n, h, w)  # grad_weight = dL^T @ h
    return mm + ew, mm


_ELEMENTWISE = (
    "add", "sub", "rsub", "mul", "div", "neg", "recip", "pow", "sqrt", "rsqrt", "exp", "exp2", "log", "log2",
    "log1p", "expm1", "tanh", "sigmoid", "silu", "gelu", "relu", "leaky_relu", "elu", "selu", "mish",
    "hardtanh", "hardswish", "hardsigmoid", "softplus", "abs", "sin", "cos", "tan", "erf", "erfc", "maximum",
    "minimum", "where", "masked_fill", "clamp", "clamp_min", "clamp_max", "clip", "square", "lt", "gt", "le",
    "ge", "eq", "ne", "floor", "ceil", "round", "trunc", "sign", "floor_divide", "remainder", "fmod",
    "logical_not", "logical_and", "logical_or", "bitwise_not", "invert", "and_", "or_", "lerp", "addcmul",
    "addcdiv", "nan_to_num", "atan", "asin", "acos", "sinh", "cosh", "reciprocal", "truediv", "mul_", "add_",
    "sigmoid_", "tanh_", "relu_", "combine_masks", "new_ones", "new_zeros",
)

flop_rules: dict[str, Callable[[OpCtx], tuple[Any, Any]]] = {name: _ew() for name in _ELEMENTWISE}
flop_rules.update({
    "addcmul": _ew(2), "addcdiv": _ew(2), "lerp": _ew(2), "new_ones": _zero, "new_zeros": _zero,
    "sum": _reduce(), "mean": _reduce(), "amax": _reduce(), "amin": _reduce(), "max": _reduce(),
    "min": _reduce(), "prod": _reduce(), "argmax": _reduce(), "argmin": _reduce(), "nansum": _reduce(),
    "cumsum": _reduce(), "norm": _reduce(2), "var": _reduce(3), "std": _reduce(3), "logsumexp": _reduce(4),
    "softmax": _softmax, "log_softmax": _softmax, "_softmax": _softmax, "_log_softmax": _softmax,
    "cross_entropy": _cross_entropy, "layer_norm": _layer_norm, "group_norm": _layer_norm,
    "dropout": _dropout,
    "linear": _linear, "matmul": _matmul, "mm": _matmul, "bmm": _matmul, "addmm": _addmm, "baddbmm": _addmm,
    "addbmm": _addmm, "einsum": _einsum, "scaled_dot_product_attention": _sdpa,
    # fused ops (wrapper function names == op names); rms_norm is F.rms_norm or einfuse's
    "rms_norm": lambda c: (_fused_rms_norm if _is_einfuse(c) else _rms_norm_fn)(c),
    "add_rms_norm": _fused_add_rms_norm,
    "attention": _fused_attention, "glu": _fused_glu, "glu_mlp": _fused_glu_mlp, "rope": _fused_rope,
    "linear_cross_entropy": _fused_lce,
})
FLOP_DEFAULT = _zero   # data movement, creation ops, unknown ops


def _flops(c: OpCtx):
    return flop_rules.get(c.name, FLOP_DEFAULT)(c)


def _is_einfuse(c: OpCtx) -> bool:
    t = c.node.target
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(getattr(t, "_schema", None) and t._schema.name or t._qualified_op_name).startswith("einfuse")
    return getattr(t, "__module__", "").startswith("einfuse")


# ---------------------------------------------------------------------------------------
# internal allocations: rule(c) -> (transient bytes, [(bytes, saved_for_backward, dtype)])
# transient: temporaries freed before the op returns; hidden: results the op keeps
# (saved for backward when autograd records it, else freed before it returns)

def _hid_none(c: OpCtx):
    return 0, []


def _hid_cross_entropy(c: OpCtx):
    x = _first(c)
    if x is None:
        return 0, []
    return 0, [(x.numel * x.itemsize, True, x.dtype)]   # log_softmax(x), read by nll_loss


def _hid_log_softmax_upcast(c: OpCtx):
    x = _first(c)
    dt = c.kwargs.get("dtype", c.arg(2))
    if x is not None and isinstance(dt, torch.dtype) and dt != x.dtype:
        return x.numel * dt.itemsize, []     # the input converted first
    return 0, []


def _hid_layer_norm(c: OpCtx):
    x = _first(c)
    if x is None:
        return 0, []
    shape = c.arg(1, "normalized_shape")
    nd = len(shape) if isinstance(shape, (list, tuple)) else 1
    rows = prod(x.shape[:-nd]) if nd < x.ndim else 1
    return 0, [(rows * 4, True, F32), (rows * 4, True, F32)]   # mean, rstd


def _hid_dropout(c: OpCtx):
    p, train = c.arg(1, "p", 0.5), c.arg(2, "training", True)
    if c.out is None or not train or p == 0:
        return 0, []
    return 0, [(c.out.numel, True, torch.bool)]       # the bool mask


def _hid_matmul(c: OpCtx):
    """torch.matmul expands and copies a batch-broadcast operand before bmm."""
    a, b = _t(c.arg(0)), _t(c.arg(1))
    if a is None or b is None or a.ndim < 3 and b.ndim < 3:
        return 0, []
    batch = _broadcast(a.shape[:-2], b.shape[:-2])
    out = []
    for t in (a, b):
        if t.ndim >= 3 and tuple(t.shape[:-2]) != tuple(batch) and prod(t.shape[:-2]) != prod(batch):
            out.append((prod(batch) * t.shape[-2] * t.shape[-1] * t.itemsize, True, t.dtype))
    return 0, out


def _hid_linear(c: OpCtx):
    """A linear on a non-contiguous N-D input folds it into a contiguous copy."""
    x = _t(c.arg(0))
    if x is None or x.ndim <= 2:
        return 0, []
    exp = 1
    for s, st in zip(reversed(x.shape), reversed(x.strides)):
        if s != 1 and st != exp:
            return 0, [(x.nbytes, True, x.dtype)]
        exp = exp * s
    return 0, []


def _hid_rms_norm(c: OpCtx):
    x = _first(c)
    if x is None:
        return 0, []
    rows = prod(x.shape[:-1])
    f32 = x.numel * 4
    if not _is_einfuse(c):
        return f32, [(rows * 4, True, F32)]
    # fp32: the x*x temporary is gone before y is allocated; low precision: fp32 copies of x and y
    tmp = 0 if x.dtype == torch.float32 else 2 * f32
    return tmp, ([(rows * 4, True, F32)] if _is_wrapper(c) else [])   # rstd (an output of the op itself)


def attention_plan(c: OpCtx, backward: bool = False) -> dict | None:
    """How einfuse::attention runs these inputs: ATen's fused kernel ("native") or the tile loop."""
    q, k, v = _t(c.arg(0)), _t(c.arg(1)), _t(c.arg(2))
    if q is None or k is None or v is None:
        return None
    from einfuse.runtime.ops import attention as A
    bh, s, t, d, dv, bhk = _attn_dims(q, k, v)
    mask = _t(c.arg(3, "mask"))
    causal = bool(_attn_param(c, "is_causal"))
    window = _attn_param(c, "window") or -1
    softcap = _attn_param(c, "softcap") or 0.0
    native = (A.USE_NATIVE and softcap <= 0 and window <= 0 and q.dtype == k.dtype == v.dtype
              and q.dtype in A._NATIVE_DTYPES and d == dv
              and (not causal or s == t or s == 1 or not (isinstance(s, int) and isinstance(t, int)))
              and (mask is None or mask.dtype in (torch.bool, q.dtype)))
    acc = 8 if q.dtype == torch.float64 else 4
    plan = {"native": native, "acc": acc, "bh": bh, "s": s, "t": t, "d": d, "dv": dv, "softcap": softcap,
            "mask": mask, "q": q}
    if not native:
        bk = _min(A.BLOCK_K, t)
        rows = bh
        if backward and all(isinstance(x, int) for x in (t, rows, s)) and t > bk \
                and A.MAX_TILE_ELEMS // max(1, rows * t) >= min(s, A.MIN_BLOCK_Q):
            bk = t          # the backward widens key tiles to the whole row when the cap allows
        if isinstance(bk, int) and isinstance(rows, int) and isinstance(s, int):
            bq = A._block_q(rows, s, bk)
            n_k = -(-t // bk) if isinstance(t, int) else 2
        else:
            bq, n_k = _min(A.BLOCK_Q, s), 2
        plan.update(bq=bq, bk=bk, tile=rows * bq * bk * acc, rows=rows * bq, n_k=n_k)
    return plan


def _hid_attention(c: OpCtx):
    p = attention_plan(c)
    if p is None:
        return 0, []
    acc, bh, s = p["acc"], p["bh"], p["s"]
    lse = bh * s * acc
    hidden = [(lse, True, F32)] if _is_wrapper(c) else []     # lse
    if p["native"]:
        # ATen's kernel returns lse transposed: a contiguous copy; a bool mask becomes a float one
        m = p["mask"]
        extra = m.numel * p["q"].itemsize if m is not None and m.dtype == torch.bool else 0
        return lse + extra, hidden
    # tile loop: score tiles alive at once (the previous tile's until the next is computed;
    # with a soft-cap also its tanh), plus the query tile and three row accumulators
    n_live = (2 if p["softcap"] else 1) * (2 if p["n_k"] != 1 else 1)
    rows = p["rows"]
    return n_live * p["tile"] + rows * (p["d"] + 3 * p["dv"]) * acc, hidden


def _min(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    import sympy
    return sympy.Min(a, b)


def _hid_glu(c: OpCtx):
    g = _first(c)
    if g is None or g.dtype == torch.float32:
        return 0, []
    return 2 * g.numel * 4, []


def _hid_glu_mlp(c: OpCtx):
    x, wg = _t(c.arg(0)), _t(c.arg(1))
    if x is None or wg is None:
        return 0, []
    n, i = prod(x.shape[:-1]), wg.shape[0]
    e = x.itemsize
    hidden = [(n * i * e, True, x.dtype), (n * i * e, True, x.dtype)] if _is_wrapper(c) else []   # g, u
    return n * i * e, hidden                                                    # h = act(g) * u


def _hid_lce(c: OpCtx):
    h, w, b = _t(c.arg(0)), _t(c.arg(1)), _t(c.arg(3, "bias"))
    if h is None or w is None:
        return 0, []
    from einfuse.runtime.ops import linear_cross_entropy as L
    n, hd, v = prod(h.shape[:-1]), h.shape[-1], w.shape[0]
    rows = L._chunk_rows(n, v) if isinstance(n, int) and isinstance(v, int) else _min(n, max(1, L.CHUNK_BYTES // (4 * v)))
    softcap = c.kwargs.get("softcap", c.args[7] if len(c.args) > 7 else 0.0) or 0.0
    gh, gw, gb = lce_needs(c)
    # the fp32 [rows, V] logits buffer (and the soft-cap derivative's), fp32 copies of
    # low-precision operands, and the rows with a label kept (labels padded with
    # ignore_index -- HF's shift -- make it a copy of hidden), plus per-row vectors
    transient = rows * v * 4 * (2 if softcap and (gh or gw or gb) else 1)
    if h.dtype != torch.float32:
        transient += (n * hd + v * hd) * 4
    transient += n * hd * h.itemsize + 8 * n * 4
    hidden = []
    if gh:
        hidden.append((n * hd * 4, True, F32))
    if gw:
        hidden.append((v * hd * 4, True, F32))
    if gb:
        hidden.append((v * 4, True, F32))
    return transient, hidden


hidden_rules: dict[str, Callable[[OpCtx], tuple[Any, list]]] = {
    "cross_entropy": _hid_cross_entropy, "softmax": _hid_log_softmax_upcast,
    "log_softmax": _hid_log_softmax_upcast, "layer_norm": _hid_layer_norm, "dropout": _hid_dropout,
    "matmul": _hid_matmul, "linear": _hid_linear, "rms_norm": _hid_rms_norm, "attention": _hid_attention,
    "add_rms_norm": _hid_rms_norm,
    "glu": _hid_glu, "glu_mlp": _hid_glu_mlp, "linear_cross_entropy": _hid_lce,
}
HIDDEN_DEFAULT = _hid_none


# ---------------------------------------------------------------------------------------
# saved for backward: rule(c) -> tensors (inputs or outputs) autograd keeps for this op
# (internal results it keeps are the `saved` entries of hidden_rules)

def _needs(t: Any) -> bool:
    return isinstance(t, TVal) and t.requires_grad


def _save_none(c: OpCtx):
    return []


def _save_inputs(*idx):
    def rule(c: OpCtx):
        return [t for i in idx if (t := _t(c.arg(i))) is not None]
    return rule


def _save_out(c: OpCtx):
    return c.outs[:1]


def _save_first_and_out(c: OpCtx):
    return [t for t in (_first(c), c.out) if t is not None]


def _save_mul(c: OpCtx):
    a, b = c.arg(0), c.arg(1)
    out = []
    if _needs(a) and isinstance(b, TVal):
        out.append(b)
    if _needs(b) and isinstance(a, TVal):
        out.append(a)
    return out


def _save_div(c: OpCtx):
    a, b = c.arg(0), c.arg(1)
    out = []
    if isinstance(b, TVal) and (_needs(a) or _needs(b)):
        out.append(b)
    if _needs(b) and isinstance(a, TVal):
        out.append(a)
    return out


def _save_pow(c: OpCtx):
    x, e = c.arg(0), c.arg(1)
    out = [x] if isinstance(x, TVal) else []
    if isinstance(e, TVal):
        out += [e, c.out]
    return out


def _save_matmul(c: OpCtx):
    a, b = _t(c.arg(0)), _t(c.arg(1))
    out = []
    if a is not None and _needs(b):
        out.append(a)
    if b is not None and _needs(a):
        out.append(b)
    return out


def _save_linear(c: OpCtx):
    x, w = _t(c.arg(0)), _t(c.arg(1))
    out = []
    if x is not None and _needs(w):
        out.append(x)
    if w is not None and _needs(x):
        out.append(w)
    return out


def _save_addmm(c: OpCtx):
    a, b = _t(c.arg(1)), _t(c.arg(2))
    out = []
    if a is not None and _needs(b):
        out.append(a)
    if b is not None and _needs(a):
        out.append(b)
    return out


def _save_where(c: OpCtx):
    cond = _t(c.arg(0))
    return [cond] if cond is not None else []


def _save_masked_fill(c: OpCtx):
    m = _t(c.arg(1, "mask"))
    return [m] if m is not None else []


def _save_sdpa(c: OpCtx):
    return [t for t in (_t(c.arg(0)), _t(c.arg(1)), _t(c.arg(2)), _t(c.arg(3, "attn_mask")), c.out) if t is not None]


def _save_fused_rms(c: OpCtx):
    x, w = _t(c.arg(0)), _t(c.arg(1))
    out = [t for t in (x, w) if t is not None]
    if not _is_wrapper(c) and len(c.outs) > 1:
        out.append(c.outs[1])
    return out


def _save_fused_add_rms(c: OpCtx):
    """h = x + residual (its second output), the weight, and rstd (an output of the op itself)."""
    out = c.outs[1:2] + [t for t in (_t(c.arg(2, "weight")),) if t is not None]
    if not _is_wrapper(c) and len(c.outs) > 2:
        out.append(c.outs[2])
    return out


def _save_fused_attention(c: OpCtx):
    out = [t for t in (_t(c.arg(0)), _t(c.arg(1)), _t(c.arg(2)), _t(c.arg(3, "mask"))) if t is not None]
    return out + (c.outs[:1] if _is_wrapper(c) else c.outs[:2])


def _save_fused_glu_mlp(c: OpCtx):
    out = [t for t in (_t(c.arg(0)), _t(c.arg(1)), _t(c.arg(2)), _t(c.arg(3))) if t is not None]
    return out + ([] if _is_wrapper(c) else c.outs[1:3])


def _save_fused_rope(c: OpCtx):
    cos, sin = _t(c.arg(2)), _t(c.arg(3))
    out = [t for t in (cos, sin) if t is not None]
    if _needs(cos) or _needs(sin):
        out += [t for t in (_t(c.arg(0)), _t(c.arg(1))) if t is not None]
    return out


def _save_lce(c: OpCtx):
    if _is_wrapper(c):
        return []      # its saved gradients are hidden allocations
    return [t for t in c.outs[2:5]]


saved_rules: dict[str, Callable[[OpCtx], list]] = {
    "add": _save_none, "sub": _save_none, "rsub": _save_none, "neg": _save_none, "sum": _save_none,
    "mean": _save_none, "cat": _save_none, "to": _save_none, "to_float": _save_none, "to_half": _save_none,
    "to_bfloat16": _save_none, "identity": _save_none,
    "mul": _save_mul, "div": _save_div, "pow": _save_pow, "square": _save_inputs(0),
    "rsqrt": _save_out, "sqrt": _save_out, "exp": _save_out, "tanh": _save_out, "sigmoid": _save_out,
    "recip": _save_out, "relu": _save_out, "softmax": _save_out, "log_softmax": _save_out,
    "silu": _save_inputs(0), "gelu": _save_inputs(0), "log": _save_inputs(0), "sin": _save_inputs(0),
    "cos": _save_inputs(0), "erf": _save_inputs(0), "abs": _save_inputs(0), "log1p": _save_inputs(0),
    "amax": _save_first_and_out, "amin": _save_first_and_out, "max": _save_first_and_out,
    "min": _save_first_and_out, "maximum": _save_inputs(0, 1), "minimum": _save_inputs(0, 1),
    "matmul": _save_matmul, "mm": _save_matmul, "bmm": _save_matmul, "linear": _save_linear,
    "addmm": _save_addmm, "baddbmm": _save_addmm, "einsum": lambda c: list(c.ins),
    "where": _save_where, "masked_fill": _save_masked_fill, "embedding": _save_inputs(0),
    "cross_entropy": _save_inputs(1), "layer_norm": _save_inputs(0, 2, 3),
    "scaled_dot_product_attention": _save_sdpa,
    "rms_norm": _save_fused_rms, "add_rms_norm": _save_fused_add_rms, "attention": _save_fused_attention,
    "glu": _save_inputs(0, 1),
    "glu_mlp": _save_fused_glu_mlp, "rope": _save_fused_rope, "linear_cross_entropy": _save_lce,
}
SAVED_DEFAULT = _save_none   # views, copies, casts, cat, index: only sizes/indices


# ---------------------------------------------------------------------------------------
# backward model: rule(c) -> {"grads": {input position in c.ins: "alloc" | "alias"},
#                             "transient": bytes the backward op allocates and frees}
# "alloc": the input's gradient is a new buffer of the input's size; "alias": it is a
# view of the output's gradient (no memory); "same": the buffer allocated for the
# previous input of this backward (one gradient handed to two inputs). Inputs that do not require grad get none.

def _bwd_alloc(transient_per_out: float = 0):
    def rule(c: OpCtx):
        t = transient_per_out * (c.out.nbytes if c.out is not None else 0)
        return {"grads": {i: "alloc" for i, x in enumerate(c.ins) if x.requires_grad}, "transient": t}
    return rule


def _bwd_alias(c: OpCtx):
    return {"grads": {i: "alias" for i, x in enumerate(c.ins) if x.requires_grad}, "transient": 0}


def _bwd_add(c: OpCtx):
    grads = {}
    for i, x in enumerate(c.ins):
        if not x.requires_grad:
            continue
        same = c.out is not None and tuple(x.shape) == tuple(c.out.shape)
        neg = c.name in ("sub",) and i == 1 or c.name == "rsub" and i == 0
        grads[i] = "alias" if same and not neg else "alloc"
    return {"grads": grads, "transient": 0}


def _bwd_mul(c: OpCtx):
    grads, t = {}, 0
    for i, x in enumerate(c.ins):
        if x.requires_grad:
            grads[i] = "alloc"
            if c.out is not None and tuple(x.shape) != tuple(c.out.shape):
                t += c.out.nbytes          # grad * other at full size, then summed down
    return {"grads": grads, "transient": t}


def _bwd_cross_entropy(c: OpCtx):
    x = _first(c)
    return {"grads": {0: "alloc"} if x is not None and x.requires_grad else {},
            "transient": x.nbytes if x is not None else 0}     # nll_loss_backward's [N, V]


def _bwd_view_like(c: OpCtx):
    """Pure views and no-op casts: the gradient is a view of the output's."""
    x = _first(c)
    if x is None or not x.requires_grad:
        return {"grads": {}, "transient": 0}
    return {"grads": {0: "alias"}, "transient": 0}


def _bwd_sliced(c: OpCtx):
    """getitem/narrow/expand: the gradient is a new tensor of the input's size."""
    x = _first(c)
    if x is None or not x.requires_grad:
        return {"grads": {}, "transient": 0}
    if c.out is not None and tuple(c.out.shape) == tuple(x.shape):
        return {"grads": {0: "alias"}, "transient": 0}
    return {"grads": {0: "alloc"}, "transient": 0}


def _bwd_cat(c: OpCtx):
    return {"grads": {i: "alias" for i, x in enumerate(c.ins) if x.requires_grad}, "transient": 0}


def _bwd_fused(transient: Callable[[OpCtx], Any] = lambda c: 0):
    def rule(c: OpCtx):
        return {"grads": {i: "alloc" for i, x in enumerate(c.ins) if x.requires_grad}, "transient": transient(c)}
    return rule


def _bwd_rms_transient(c: OpCtx):
    x = _first(c)
    return 3 * x.numel * 4 if x is not None else 0      # xhat, g*w, and one more row-sized temporary


def _bwd_add_rms(c: OpCtx):
    """One fp32-summed gradient of h, handed (cast, a no-op for equal dtypes) to x and residual."""
    grads: dict = {}
    for i, x in enumerate(c.ins):
        if x.requires_grad:
            grads[i] = "same" if i == 1 and 0 in grads and x.dtype == c.ins[0].dtype else "alloc"
    return {"grads": grads, "transient": _bwd_rms_transient(c)}


def _bwd_attention_transient(c: OpCtx):
    p = attention_plan(c, backward=True)
    if p is None:
        return 0
    lse = p["bh"] * p["s"] * p["acc"]
    q, k, v = c.ins[0], c.ins[1], c.ins[2]
    if p["native"]:
        # lse checks, a contiguous copy of the incoming gradient, ATen's dk/dv made contiguous
        return 2 * lse + q.nbytes + k.nbytes + v.nbytes
    # per query tile: the recomputed tiles kept for the second sweep (scores, tanh with a soft-cap,
    # dP), an fp64 copy for the row statistics, and the previous query tile's not yet released
    per = 3 if p["softcap"] else 2
    one_tile = isinstance(p["s"], int) and isinstance(p["bq"], int) and p["s"] <= p["bq"]
    n = per + 2 if one_tile else 2 * per + 2
    return n * p["tile"] + lse + p["rows"] * (2 * p["d"]) * p["acc"]


def _bwd_glu_mlp_transient(c: OpCtx):
    x, wg = _t(c.arg(0)), _t(c.arg(1))
    if x is None or wg is None:
        return 0
    return 3 * prod(x.shape[:-1]) * wg.shape[0] * 4       # act(g), h, dh (opmath)


_VIEWS = ("reshape", "view", "transpose", "permute", "t", "unsqueeze", "squeeze", "identity", "flatten",
          "unflatten", "contiguous", "clone", "to", "to_float", "to_half", "to_bfloat16", "view_as",
          "expand_as", "detach", "alias", "split", "chunk", "unbind", "movedim", "type_as")

backward_rules: dict[str, Callable[[OpCtx], dict]] = {name: _bwd_view_like for name in _VIEWS}
backward_rules.update({
    "getitem": _bwd_sliced, "narrow": _bwd_sliced, "select": _bwd_sliced, "expand": _bwd_sliced,
    "add": _bwd_add, "sub": _bwd_add, "rsub": _bwd_add, "mul": _bwd_mul, "div": _bwd_mul,
    "cat": _bwd_cat, "cross_entropy": _bwd_cross_entropy,
    "softmax": _bwd_alloc(0), "log_softmax": _bwd_alloc(0), "pow": _bwd_alloc(1), "rsqrt": _bwd_alloc(1),
    "rms_norm": _bwd_fused(_bwd_rms_transient), "add_rms_norm": _bwd_add_rms,
    "attention": _bwd_fused(_bwd_attention_transient),
    "glu": _bwd_fused(), "glu_mlp": _bwd_fused(_bwd_glu_mlp_transient), "rope": _bwd_fused(),
    "linear_cross_entropy": _bwd_fused(),
})
BACKWARD_DEFAULT = _bwd_alloc(0)


# ---------------------------------------------------------------------------------------
# applying the rules to one node

def distinct_inputs(ins: list[TVal]) -> list[TVal]:
    """The inputs a kernel reads, each tensor once (the same view passed twice is read once)."""
    seen: set = set()
    out = []
    for t in ins:
        ident = (t.storage, tuple(map(str, t.shape)), tuple(map(str, t.strides)))
        if ident not in seen:
            seen.add(ident)
            out.append(t)
    return out


_NO_COST = {"_set_grad_enabled", "_log_api_usage_once", "size", "dim", "numel", "stride", "item",
            "is_floating_point", "get_device", "_assert", "sym_size", "sym_numel"}


# ops that return their input in eager mode where the fake tensor says otherwise
def _dropout_inactive(c: OpCtx) -> bool:
    p, train = c.arg(1, "p", 0.5), c.arg(2, "training", True)
    return not train or p == 0


alias_rules: dict[str, Callable[[OpCtx], bool]] = {"dropout": _dropout_inactive}


def apply_rules(c: OpCtx) -> NodeCost:
    c.io_gemms = []  # type: ignore[attr-defined]
    c.io_operands = []  # type: ignore[attr-defined]
    if c.ins and c.outs and alias_rules.get(c.name, lambda c: False)(c):
        for o in c.outs:        # the output is the input: share its storage
            o.storage, o.storage_bytes = c.ins[0].storage, c.ins[0].storage_bytes
    in_storages = {t.storage for t in c.ins}
    allocs: dict[int, Any] = {}
    for o in c.outs:
        if o.storage not in in_storages and o.storage not in allocs:
            allocs[o.storage] = o.storage_bytes
    inplace = is_inplace(c)
    if not c.outs or c.name in _NO_COST:
        kind = "none"
    elif allocs or inplace:
        kind = "compute"
    else:
        kind = "view"
    nc = NodeCost(c.node.name, c.name, kind, outs=list(c.outs), ins=list(c.ins), allocs=allocs)
    if kind == "none":
        return nc
    if kind == "view":
        # a view moves nothing and computes nothing; its gradient is a view too
        rule = backward_rules.get(c.name, _bwd_view_like if c.name not in ("getitem", "expand", "narrow", "select")
                                  else backward_rules[c.name])
        nc.bwd = rule(c) if c.grad else {}
        return nc
    nc.flops, nc.matmul_flops = _flops(c)
    nc.io = {"gemms": list(c.io_gemms), "operands": set(c.io_operands)}
    for t in distinct_inputs(c.ins):
        nc.read[t.dtype] = nc.read.get(t.dtype, 0) + t.distinct_bytes
    for o in c.outs:
        if o.storage in allocs or inplace:
            nc.written[o.dtype] = nc.written.get(o.dtype, 0) + o.nbytes
    transient, hidden = hidden_rules.get(c.name, HIDDEN_DEFAULT)(c)
    nc.transient = transient
    nc.hidden = list(hidden)
    for b, _, dt in hidden:
        nc.written[dt] = nc.written.get(dt, 0) + b
    nc.grad_needed = c.grad
    if c.training and c.grad:
        nc.saved = [t for t in saved_rules.get(c.name, SAVED_DEFAULT)(c) if isinstance(t, TVal)]
        nc.bwd = backward_rules.get(c.name, BACKWARD_DEFAULT)(c)
    else:
        nc.hidden = [(b, False, dt) for b, _, dt in hidden]
    return nc
