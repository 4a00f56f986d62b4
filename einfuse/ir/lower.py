"""Lowering FX graphs to canonical expression DAGs.

Per-op behaviour lives in `lower_rules`, keyed by a normalised op name, so a
method call (`x.pow(2)`), a function (`torch.pow`) and an operator (`x ** 2`)
all take the same entry. An op with no entry becomes an INPUT leaf: opaque,
a region boundary; the passes report it when it sits where a pattern needed
something else. After lowering, `canonical_rules` run to a fixed point.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .canonical import canonical_rules
from .node import Node, Op, const, node, broadcast_shape
from .rewrite import graph_rewrite

_OPERATOR_NAMES = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.neg: "neg", operator.pow: "pow", operator.getitem: "getitem", operator.matmul: "matmul",
    operator.iadd: "add", operator.imul: "mul", operator.isub: "sub", operator.itruediv: "div",
}
_ALIASES = {
    "true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub", "negative": "neg",
    "reciprocal": "recip", "float": "to_float", "half": "to_half", "bfloat16": "to_bfloat16",
    "type_as": "to", "type": "to", "contiguous": "identity", "clone": "identity",
    "view": "reshape", "permute": "permute", "swapaxes": "transpose", "swapdims": "transpose",
    "masked_fill_": "masked_fill", "mul_": "mul", "add_": "add", "div_": "div", "sub_": "sub",
    "bmm": "matmul", "mm": "matmul", "special_erf": "erf", "greater": "gt", "less": "lt",
}


def op_name(n: fx.Node) -> str:
    """Normalised name of the operation an FX node performs."""
    if n.op == "call_method":
        name = n.target
    elif n.op == "call_function":
        t = n.target
        name = _OPERATOR_NAMES.get(t) or getattr(t, "__name__", str(t))
        if hasattr(t, "_schema") or isinstance(t, torch._ops.OpOverload):
            name = str(t).split("::")[-1].split(".")[0]
    else:
        return n.op
    return _ALIASES.get(name, name)


def meta_value(n: Any):
    if isinstance(n, fx.Node):
        return n.meta.get("example_value", n.meta.get("val"))
    return None


def meta_shape(n: Any):
    v = meta_value(n)
    if isinstance(v, torch.Tensor):
        return tuple(int(s) if isinstance(s, int) else str(s) for s in v.shape)
    return None


@dataclass
class Lowered:
    """An FX graph as canonical nodes: `of[fx_node]` is the node computing its value."""
    of: dict[fx.Node, Node] = field(default_factory=dict)
    producer: dict[int, fx.Node] = field(default_factory=dict)  # id(canonical node) -> FX node
    unknown: dict[fx.Node, str] = field(default_factory=dict)   # FX nodes left opaque, with why

    def fx_node(self, n: Node) -> fx.Node | None:
        return self.producer.get(id(n))


class LoweringError(Exception):
    pass


def _neg_dim(d: int, ndim: int | None) -> int:
    if d >= 0 and ndim is not None:
        return d - ndim
    return d


class _Ctx:
    def __init__(self, pattern: bool):
        self.pattern = pattern

    def dim(self, d, x_shape):
        return _neg_dim(int(d), len(x_shape) if x_shape is not None else None)


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _reduce(op: Op):
    def rule(ctx, n, x, *args, **kwargs):
        dim = _arg(args, kwargs, 0, "dim")
        keep = bool(_arg(args, kwargs, 1, "keepdim", False))
        if dim is None:
            raise LoweringError("full reduction")
        dims = tuple(sorted(ctx.dim(d, x.shape) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))))
        out = node(op, (x,), (dims, keep), meta_shape(n))
        if op is Op.MAX and not isinstance(dim, (tuple, list)) and n.op != "call_method" and False:
            pass
        return out
    return rule


def _mean(ctx, n, x, *args, **kwargs):
    s = _reduce(Op.SUM)(ctx, n, x, *args, **kwargs)
    dims, _ = s.arg
    if ctx.pattern:
        count = node(Op.VAR, (), "__inv_count", ())
    else:
        if x.shape is None or any(not isinstance(x.shape[d], int) for d in dims):
            raise LoweringError("mean over a dynamic dimension")
        count = const(1.0 / math.prod(x.shape[d] for d in dims))
    return node(Op.MUL, (s, count), None, s.shape)


def _amax(ctx, n, x, *args, **kwargs):
    # torch.max(x, dim, keepdim) returns (values, indices); only .values/[0] is lowered
    return _reduce(Op.MAX)(ctx, n, x, *args, **kwargs)


def _ew(op: Op):
    def rule(ctx, n, *srcs, **kwargs):
        return node(op, tuple(srcs), None, meta_shape(n) or broadcast_shape(*(s.shape for s in srcs)))
    return rule


def _sub(ctx, n, a, b, **kw):
    alpha = kw.get("alpha", 1)
    neg = node(Op.NEG, (b if alpha == 1 else node(Op.MUL, (b, const(alpha)), None, b.shape),), None, b.shape)
    return node(Op.ADD, (a, neg), None, meta_shape(n))


def _add(ctx, n, a, b, **kw):
    alpha = kw.get("alpha", 1)
    if alpha != 1:
        b = node(Op.MUL, (b, const(alpha)), None, b.shape)
    return node(Op.ADD, (a, b), None, meta_shape(n))


def _div(ctx, n, a, b, **kw):
    if kw.get("rounding_mode") is not None:
        raise LoweringError("division with rounding")
    return node(Op.MUL, (a, node(Op.RECIP, (b,), None, b.shape)), None, meta_shape(n))


def _pow(ctx, n, x, e, **kw):
    if isinstance(e, Node):
        if e.op is Op.CONST and e.arg is not None:
            e = e.arg
        else:
            raise LoweringError("pow with a tensor exponent")
    shape = meta_shape(n) or x.shape
    if e == 2:
        return node(Op.MUL, (x, x), None, shape)  # x**2 -> x*x
    if e == 0.5:
        return node(Op.SQRT, (x,), None, shape)
    if e == -0.5:
        return node(Op.RSQRT, (x,), None, shape)
    if e == -1:
        return node(Op.RECIP, (x,), None, shape)
    if e == 1:
        return x
    raise LoweringError(f"pow with exponent {e}")


def _silu(ctx, n, x, *a, **k):
    return node(Op.MUL, (x, node(Op.SIGMOID, (x,), None, x.shape)), None, x.shape)  # silu(x) -> x*sigmoid(x)


def _gelu(ctx, n, x, *a, **k):
    approx = _arg(a, k, 0, "approximate", "none")
    return node(Op.GELU, (x,), approx, x.shape)


def _cast(ctx, n, x, *a, **k):
    dtypes = [v for v in list(a) + list(k.values()) if isinstance(v, torch.dtype)]
    return node(Op.CAST, (x,), str(dtypes[0]) if dtypes else "same", meta_shape(n) or x.shape)


def _identity(ctx, n, x, *a, **k):
    return x


def _softmax(op: Op):
    def rule(ctx, n, x, *a, **k):
        dim = _arg(a, k, 0, "dim")
        if dim is None:
            raise LoweringError("softmax without dim")
        return node(op, (x,), ctx.dim(dim, x.shape), meta_shape(n) or x.shape)
    return rule


def _matmul(ctx, n, a, b, **k):
    return node(Op.MATMUL, (a, b), None, meta_shape(n))


def _einsum(ctx, n, eq, *operands, **k):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq or not all(isinstance(o, Node) for o in operands):
        raise LoweringError("einsum needs an explicit '->' and no ellipsis")
    return node(Op.EINSUM, tuple(operands), eq, meta_shape(n))


def _linear(ctx, n, x, w, b=None, **k):
    b = k.get("bias", b)
    srcs = (x, w) if b is None or (isinstance(b, Node) and b.op is Op.CONST and b.arg is None) else (x, w, b)
    return node(Op.LINEAR, srcs, None, meta_shape(n))


def _quantized_linear(ctx, n, x, qweight, *a, **k):
    # quantized_linear(x, codes, scales, ...) -> linear(x, W): W an opaque leaf of the logical [out, in] shape
    out = meta_shape(n)
    w_shape = (out[-1], x.shape[-1]) if out and x.shape else None
    w = node(Op.INPUT, (), f"{n.name}:dequantized_weight", w_shape)
    b = k.get("bias", a[2] if len(a) > 2 else None)
    return node(Op.LINEAR, (x, w, b) if isinstance(b, Node) else (x, w), None, out)


def _transpose(ctx, n, x, d0, d1, **k):
    nd = len(x.shape) if x.shape is not None else None
    dims = tuple(sorted((_neg_dim(int(d0), nd), _neg_dim(int(d1), nd))))
    return node(Op.TRANSPOSE, (x,), dims, meta_shape(n))


def _t(ctx, n, x, **k):
    return node(Op.TRANSPOSE, (x,), (-2, -1), meta_shape(n))


def _reshape(ctx, n, x, *shape, **k):
    out = meta_shape(n)
    if out is not None and x.shape == out:
        return x  # no-op view
    return node(Op.RESHAPE, (x,), out, out)


def _expand(ctx, n, x, *shape, **k):
    out = meta_shape(n)
    if out is not None and x.shape == out:
        return x
    return node(Op.EXPAND, (x,), out, out)


def _index_repr(idx) -> Any:
    if isinstance(idx, slice):
        return ("slice", idx.start, idx.stop, idx.step)
    if isinstance(idx, tuple):
        return tuple(_index_repr(i) for i in idx)
    if idx is None or idx is Ellipsis or isinstance(idx, int):
        return "..." if idx is Ellipsis else idx
    raise LoweringError("tensor index")


def _getitem(ctx, n, x, idx, **k):
    if not isinstance(x, Node):
        raise LoweringError("getitem of a non-tensor")
    src = n.args[0] if n.args else None
    if isinstance(src, fx.Node) and isinstance(idx, int) and op_name(src) in _SPLITS:
        return _split_piece(ctx, n, src, idx)
    return node(Op.INDEX, (x,), _index_repr(idx), meta_shape(n))


_SPLITS = ("chunk", "split", "split_with_sizes")


def _split_piece(ctx, n, src, i):
    """chunk(x, c, d)[i] / split(x, s, d)[i] -> x[..., a:b] (a slice of x along d)."""
    base = src.args[0] if src.args else src.kwargs.get("input", src.kwargs.get("self"))
    pieces = meta_value(src)
    x = getattr(ctx, "env", {}).get(base)
    if x is None or not isinstance(pieces, (tuple, list)) or x.shape is None:
        raise LoweringError("split of an unknown tensor")
    dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
    nd = len(x.shape)
    d = int(dim) % nd
    sizes = [p.shape[d] for p in pieces]
    if not all(isinstance(s, int) for s in sizes):
        raise LoweringError("split into dynamic sizes")
    a = sum(sizes[:i % len(sizes)])
    b = a + sizes[i % len(sizes)]
    idx = (slice(None),) * d + (slice(a, b),)
    return node(Op.INDEX, (x,), _index_repr(idx), meta_shape(n))


def _mul(ctx, n, a, b, **k):
    v = meta_value(n)
    if isinstance(v, torch.Tensor) and v.is_complex():
        return node(Op.CMUL, (a, b), None, meta_shape(n))  # complex product
    return node(Op.MUL, (a, b), None, meta_shape(n) or broadcast_shape(a.shape, b.shape))


def _view_as(op: Op):
    def rule(ctx, n, x, **k):
        return node(op, (x,), None, meta_shape(n))  # view_as_complex / view_as_real
    return rule


def _unsqueeze(ctx, n, x, d, **k):
    return node(Op.INDEX, (x,), ("unsqueeze", int(d)), meta_shape(n))


def _cat(ctx, n, tensors, dim=0, **k):
    dim = k.get("dim", dim)
    shape = meta_shape(n)
    return node(Op.CAT, tuple(tensors), _neg_dim(int(dim), len(shape) if shape else None), shape)


def _where(ctx, n, c, a, b, **k):
    return node(Op.WHERE, (c, a, b), None, meta_shape(n))


def _masked_fill(ctx, n, x, mask, value, **k):
    return node(Op.WHERE, (mask, value if isinstance(value, Node) else const(value), x), None, meta_shape(n))


def _dropout(ctx, n, x, *a, **k):
    p = _arg(a, k, 0, "p", 0.5)
    training = _arg(a, k, 1, "training", True)
    if isinstance(p, Node) or isinstance(training, Node):
        raise LoweringError("dropout with a tensor argument")
    return node(Op.DROPOUT, (x,), (float(p), bool(training)), x.shape)


def _maximum(ctx, n, a, b, **k):
    return node(Op.MAX2, (a, b), None, meta_shape(n))


lower_rules: dict[str, Callable] = {
    "add": _add, "sub": _sub, "rsub": lambda c, n, a, b, **k: _sub(c, n, b, a, **k),
    "mul": _mul, "div": _div, "neg": _ew(Op.NEG), "recip": _ew(Op.RECIP), "pow": _pow,
    "square": lambda ctx, n, x, **k: node(Op.MUL, (x, x), None, meta_shape(n) or x.shape),  # x.square() -> x*x
    "sqrt": _ew(Op.SQRT), "rsqrt": _ew(Op.RSQRT), "exp": _ew(Op.EXP), "log": _ew(Op.LOG),
    "tanh": _ew(Op.TANH), "sigmoid": _ew(Op.SIGMOID), "silu": _silu, "gelu": _gelu,
    "maximum": _maximum, "where": _where, "masked_fill": _masked_fill,
    "sum": _reduce(Op.SUM), "mean": _mean, "amax": _amax,
    "to": _cast, "to_float": _cast, "to_half": _cast, "to_bfloat16": _cast, "identity": _identity,
    "softmax": _softmax(Op.SOFTMAX), "log_softmax": _softmax(Op.LOG_SOFTMAX),
    "matmul": _matmul, "linear": _linear, "einsum": _einsum,
    "quantized_linear": _quantized_linear, "transpose": _transpose, "t": _t,
    "reshape": _reshape, "expand": _expand, "getitem": _getitem, "unsqueeze": _unsqueeze,
    "cat": _cat, "concat": _cat, "dropout": _dropout,
    "view_as_complex": _view_as(Op.COMPLEX), "view_as_real": _view_as(Op.REAL),
    "flatten": _reshape, "unflatten": _reshape,
}


def _to_node(a: Any, env: dict, ctx) -> Any:
    if isinstance(a, fx.Node):
        if a not in env:
            raise LoweringError(f"{a.name} has no tensor value")
        return env[a]
    if isinstance(a, (list, tuple)):
        vals = [_to_node(x, env, ctx) for x in a]
        return type(a)(vals) if isinstance(a, tuple) else vals
    if isinstance(a, bool) or a is None or isinstance(a, (str, torch.dtype, torch.device, slice)):
        return a
    if isinstance(a, (int, float)):
        return a
    return a


def _wrap_scalar(v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return const(v)
    return v


_SCALAR_OPERANDS = {"add", "sub", "rsub", "mul", "div", "maximum", "where"}


def multi_use_values(graph: fx.Graph) -> set[fx.Node]:
    """Tensor values with more than one user (counting through casts): materialised anyway,
    so they are natural region boundaries (e.g. the residual stream feeding a norm)."""
    out = set()
    for n in graph.nodes:
        if n.op in ("call_function", "call_method") and len(n.users) > 1 and isinstance(meta_value(n), torch.Tensor):
            out.add(n)
    return out


def lower_graph(graph: fx.Graph, pattern: bool = False, opaque: set[fx.Node] | frozenset = frozenset()) -> Lowered:
    """Lower every FX node to a canonical node; unknown ops become INPUT leaves.

    Nodes in `opaque` are lowered as INPUT leaves too: a pass that fails to match
    because canonicalisation merged an input's own arithmetic into the region
    (x = a * c flattens into x * r) retries with its multi-use values opaque.
    """
    out = Lowered()
    env: dict[fx.Node, Node] = {}
    ctx = _Ctx(pattern)
    ctx.env = env  # split/chunk pieces look up their source
    raw: dict[fx.Node, Node] = {}
    for n in graph.nodes:
        if n.op == "output":
            continue
        shape = meta_shape(n)
        leaf = node(Op.VAR if (pattern and n.op == "placeholder") else Op.INPUT, (), n.name, shape)
        if n.op in ("placeholder", "get_attr") or n in opaque:
            raw[n] = env[n] = leaf
            continue
        name = op_name(n)
        rule = lower_rules.get(name)
        value = meta_value(n)
        if rule is None or (value is not None and not isinstance(value, torch.Tensor)):
            if rule is None:
                out.unknown[n] = f"no lowering rule for '{name}'"
            raw[n] = env[n] = leaf
            continue
        try:
            args = _to_node(list(n.args), env, ctx)
            kwargs = _to_node(dict(n.kwargs), env, ctx)
            if name in _SCALAR_OPERANDS:  # python numbers in arithmetic are constants
                args = [_wrap_scalar(a) for a in args]
            elif not args or not isinstance(args[0], Node) and name not in ("cat", "concat", "einsum"):
                raise LoweringError(f"'{name}' on a non-tensor")
            raw[n] = env[n] = rule(ctx, n, *args, **kwargs)
        except (LoweringError, TypeError, ValueError, IndexError) as e:
            out.unknown[n] = f"'{name}': {e}"
            raw[n] = env[n] = leaf
    # canonicalise everything at once, sharing work across the graph
    keys = list(raw)
    canon = graph_rewrite([raw[k] for k in keys], canonical_rules)
    for fxn, c in zip(keys, canon):
        out.of[fxn] = c
        # the last FX node computing a value is its producer (reuse what the graph already has)
        if c.op not in (Op.CONST,):
            out.producer.setdefault(id(c), fxn)
    # keep nodes alive while the Lowered lives (the cache is weak)
    out._keep = list(canon)  # type: ignore[attr-defined]
    return out


def lower_function(fn: Callable, n_inputs: int | None = None, concrete_args: dict | None = None) -> tuple[list[Node], list[str]]:
    """Lower a reference function to canonical pattern nodes (placeholders become VARs)."""
    gm = fx.symbolic_trace(fn, concrete_args=concrete_args)
    low = lower_graph(gm.graph, pattern=True)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    res = out_node.args[0]
    res = list(res) if isinstance(res, (tuple, list)) else [res]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return [low.of[r] for r in res], names
