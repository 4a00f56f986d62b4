"""Canonicalisation: spellings of the same math become the same node.

Each rule is `(Op, callback)` with a `# before -> after` note. Casts are
stripped here (the passes read dtypes from the FX graph, and every fused op
computes in fp32 and casts back, which is Hugging Face's upcast semantics).
"""

from __future__ import annotations

import math

from .node import Node, Op, const, node, broadcast_shape
from .rewrite import RuleTable


def _is_const(n: Node, value: float | None = None) -> bool:
    return n.op is Op.CONST and n.arg is not None and (value is None or n.arg == value)


def _nary(op: Op, srcs: list[Node], shape) -> Node:
    return srcs[0] if len(srcs) == 1 else node(op, tuple(sorted(srcs, key=lambda s: s.key)), None, shape)


def flatten_and_fold(n: Node) -> Node | None:
    """a*(b*c) -> a*b*c, 2*3*x -> 6*x, 1*x -> x, operands sorted (same for +)."""
    flat: list[Node] = []
    for s in n.src:
        flat.extend(s.src if s.op is n.op else (s,))
    consts = [s for s in flat if _is_const(s)]
    rest = [s for s in flat if not _is_const(s)]
    identity = 1.0 if n.op is Op.MUL else 0.0
    value = identity
    for c in consts:
        value = value * c.arg if n.op is Op.MUL else value + c.arg
    if n.op is Op.MUL and value == 0.0 and rest:
        value = 0.0  # keep 0*x as is: x may be inf/nan, so it is not folded away
    srcs = rest + ([const(value, ())] if (value != identity or not rest) else [])
    out = _nary(n.op, srcs, n.shape)
    return None if out is n else out


def neg_to_mul(n: Node) -> Node:
    return node(Op.MUL, (const(-1.0), n.src[0]), None, n.shape)  # -x -> (-1)*x


def recip_rules(n: Node) -> Node | None:
    (x,) = n.src
    if x.op is Op.SQRT:
        return node(Op.RSQRT, x.src, None, n.shape)  # 1/sqrt(x) -> rsqrt(x)
    if x.op is Op.RSQRT:
        return node(Op.SQRT, x.src, None, n.shape)  # 1/rsqrt(x) -> sqrt(x)
    if x.op is Op.RECIP:
        return x.src[0]  # 1/(1/x) -> x
    if _is_const(x) and x.arg != 0:
        return const(1.0 / x.arg, n.shape)  # 1/c -> c'
    return None


def fold_unary_const(n: Node) -> Node | None:
    (x,) = n.src
    if not _is_const(x):
        return None
    f = {Op.SQRT: math.sqrt, Op.EXP: math.exp, Op.TANH: math.tanh,
         Op.RSQRT: lambda v: 1 / math.sqrt(v), Op.LOG: math.log}.get(n.op)
    try:
        return const(f(x.arg), n.shape) if f else None  # f(c) -> c'
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def strip_cast(n: Node) -> Node:
    return n.src[0]  # x.to(dtype) -> x  (dtype noted by the FX graph, not matched)


def drop_inactive_dropout(n: Node) -> Node | None:
    p, training = n.arg
    return n.src[0] if (p == 0 or not training) else None  # dropout(x, p=0 | eval) -> x


def _softmax_parts(e: Node):
    """exp(x - max(x)) or exp(x) -> (x, dim) for a reduction dim found later."""
    if e.op is not Op.EXP:
        return None
    a = e.src[0]
    if a.op is Op.ADD and len(a.src) == 2:
        for x, m in (a.src, a.src[::-1]):
            if (m.op is Op.MUL and len(m.src) == 2 and _is_const(m.src[0], -1.0)
                    and m.src[1].op is Op.MAX and m.src[1].src[0] is x):
                return x, m.src[1].arg
    return a, None


def spelled_softmax(n: Node) -> Node | None:
    """exp(x - max x) * 1/sum(exp(x - max x)) -> softmax(x)."""
    if len(n.src) != 2:
        return None
    for e, r in (n.src, n.src[::-1]):
        if r.op is Op.RECIP and r.src[0].op is Op.SUM and r.src[0].src[0] is e:
            dims, keep = r.src[0].arg
            parts = _softmax_parts(e)
            if parts and keep and len(dims) == 1 and (parts[1] is None or parts[1] == (dims, True)):
                return node(Op.SOFTMAX, (parts[0],), dims[0], n.shape)
    return None


def _index_items(arg) -> list | None:
    """An INDEX arg as a list of per-position items (None for unsqueeze forms)."""
    if isinstance(arg, tuple) and arg and isinstance(arg[0], str) and arg[0] != "...":
        return [arg] if arg[0] == "slice" else None
    return list(arg) if isinstance(arg, tuple) else [arg]


def _norm_slice(item, size):
    _, a, b, c = item
    a = None if a == 0 else a
    c = None if c == 1 else c
    if isinstance(size, int) and (c is None or c > 0):
        a0, b0, _ = slice(a, b, c).indices(size)
        a = a0 or None
        b = None if b0 >= size else b0
    return ("slice", a, b, c)


def normalise_index(n: Node) -> Node | None:
    """x[:, :, a:b] -> x[..., a:b]; x[:, 0:] -> x; x[..., -2:] -> x[..., D-2:] (slices only)."""
    items = _index_items(n.arg)
    if items is None or any(not (i == "..." or (isinstance(i, tuple) and i[0] == "slice")) for i in items):
        return None
    if items.count("...") > 1:
        return None
    x = n.src[0]
    if x.shape is None:
        new = [i if i == "..." else _norm_slice(i, None) for i in items]
    else:
        nd = len(x.shape)
        explicit = [i for i in items if i != "..."]
        if len(explicit) > nd:
            return None
        e = items.index("...") if "..." in items else len(items)
        full = ("slice", None, None, None)
        per_dim = items[:e] + [full] * (nd - len(explicit)) + items[e + 1:]
        per_dim = [_norm_slice(i, s) for i, s in zip(per_dim, x.shape)]
        first = next((d for d, i in enumerate(per_dim) if i != full), None)
        if first is None:
            return x  # x[:, 0:] -> x
        new = ["..."] + per_dim[first:]
    arg = tuple(new)
    return None if arg == n.arg else node(Op.INDEX, (x,), arg, n.shape)


def real_rules(n: Node) -> Node | None:
    (z,) = n.src
    if z.op is Op.COMPLEX:
        return z.src[0]  # view_as_real(view_as_complex(x)) -> x
    if z.op is not Op.CMUL:
        return None
    for c, f in (z.src, z.src[::-1]):
        if c.op is Op.COMPLEX and c.src[0].shape is not None and c.src[0].shape[-1] == 2:
            break
    else:
        return None
    # view_as_real(view_as_complex(a) * f) -> cat(ar*fr - ai*fi, ar*fi + ai*fr)  (real two-component form)
    a = c.src[0]
    y = node(Op.REAL, (f,), None, tuple(f.shape) + (2,) if f.shape is not None else None)
    lo, hi = ("...", ("slice", None, 1, None)), ("...", ("slice", 1, None, None))
    one = lambda t: tuple(t.shape[:-1]) + (1,) if t.shape is not None else None
    ar, ai = node(Op.INDEX, (a,), lo, one(a)), node(Op.INDEX, (a,), hi, one(a))
    yr, yi = node(Op.INDEX, (y,), lo, one(y)), node(Op.INDEX, (y,), hi, one(y))
    half = one(n) if n.shape is not None else None
    re = node(Op.ADD, (node(Op.MUL, (ar, yr), None, half), node(Op.MUL, (const(-1.0), ai, yi), None, half)), None, half)
    im = node(Op.ADD, (node(Op.MUL, (ar, yi), None, half), node(Op.MUL, (ai, yr), None, half)), None, half)
    return node(Op.CAT, (re, im), -1, n.shape)


def complex_of_real(n: Node) -> Node | None:
    (x,) = n.src
    return x.src[0] if x.op is Op.REAL else None  # view_as_complex(view_as_real(z)) -> z


def drop_empty_cat_operands(n: Node) -> Node | None:
    """cat(x, x[..., D:]) with an empty operand -> x (Phi-3's pass-through part at full rotary)."""
    d = n.arg
    if not isinstance(d, int) or d >= 0:
        return None
    keep = [s for s in n.src if not (s.shape is not None and len(s.shape) >= -d and s.shape[d] == 0)]
    if len(keep) == len(n.src) or not keep:
        return None
    return keep[0] if len(keep) == 1 else node(Op.CAT, tuple(keep), d, n.shape)


def sigmoid_from_exp(n: Node) -> Node | None:
    """1/(1 + exp(-x)) -> sigmoid(x)."""
    (d,) = n.src
    if d.op is not Op.ADD or len(d.src) != 2:
        return None
    for one, e in (d.src, d.src[::-1]):
        if _is_const(one, 1.0) and e.op is Op.EXP and e.src[0].op is Op.MUL:
            m = e.src[0]
            negs = [s for s in m.src if _is_const(s, -1.0)]
            if len(negs) == 1:
                rest = [s for s in m.src if s is not negs[0]]
                x = _nary(Op.MUL, rest, m.shape)
                return node(Op.SIGMOID, (x,), None, n.shape)
    return None


canonical_rules = RuleTable([
    (Op.CAST, strip_cast),              # x.to(dtype) -> x
    (Op.DROPOUT, drop_inactive_dropout),  # dropout(x, p=0) -> x
    (Op.NEG, neg_to_mul),               # -x -> (-1)*x
    (Op.RECIP, recip_rules),            # 1/sqrt(x) -> rsqrt(x), 1/(1/x) -> x
    (Op.ADD, flatten_and_fold),         # a+(b+c) -> a+b+c, sorted, constants folded
    (Op.MUL, flatten_and_fold),         # a*(b*c) -> a*b*c, sorted, constants folded
    (Op.MUL, spelled_softmax),          # exp(x-max)/sum(exp(x-max)) -> softmax(x)
    (Op.INDEX, normalise_index),        # x[:, :, a:b] -> x[..., a:b]; x[:, 0:] -> x
    (Op.REAL, real_rules),              # view_as_real(view_as_complex(a) * f) -> real two-component form
    (Op.COMPLEX, complex_of_real),      # view_as_complex(view_as_real(z)) -> z
    (Op.RECIP, sigmoid_from_exp),       # 1/(1 + exp(-x)) -> sigmoid(x)
    (Op.CAT, drop_empty_cat_operands),  # cat(x, <empty>) -> x
] + [(op, fold_unary_const) for op in (Op.SQRT, Op.EXP, Op.TANH, Op.RSQRT, Op.LOG)],  # f(c) -> c'
    name="canonical")


def binop_shape(*srcs: Node):
    return broadcast_shape(*(s.shape for s in srcs))
