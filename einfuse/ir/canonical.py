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


canonical_rules = RuleTable([
    (Op.CAST, strip_cast),              # x.to(dtype) -> x
    (Op.DROPOUT, drop_inactive_dropout),  # dropout(x, p=0) -> x
    (Op.NEG, neg_to_mul),               # -x -> (-1)*x
    (Op.RECIP, recip_rules),            # 1/sqrt(x) -> rsqrt(x), 1/(1/x) -> x
    (Op.ADD, flatten_and_fold),         # a+(b+c) -> a+b+c, sorted, constants folded
    (Op.MUL, flatten_and_fold),         # a*(b*c) -> a*b*c, sorted, constants folded
    (Op.MUL, spelled_softmax),          # exp(x-max)/sum(exp(x-max)) -> softmax(x)
] + [(op, fold_unary_const) for op in (Op.SQRT, Op.EXP, Op.TANH, Op.RSQRT, Op.LOG)],  # f(c) -> c'
    name="canonical")


def binop_shape(*srcs: Node):
    return broadcast_shape(*(s.shape for s in srcs))
