"""The one IR node type.

A `Node` is an immutable (op, src, arg, shape) record. Nodes are hash-consed:
building the same node twice returns the same object, so structural equality
is `is`, and a canonical expression can be used as a dict key.

The same node type serves two roles:
  * expression DAGs lowered from FX graphs (leaves are INPUT: a value the
    lowering treats as opaque, such as a parameter or a matmul output), which
    the passes match patterns against;
  * the map expressions inside the Einsums of a cascade (leaves are READ: a
    tensor indexed by named ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any
import hashlib
import weakref


class Op(Enum):
    # leaves
    INPUT = auto()     # opaque value from the FX graph; arg = FX node name
    VAR = auto()       # pattern variable (only in patterns); arg = variable name
    CONST = auto()     # a number; arg = float (None in a pattern: any constant)
    READ = auto()      # cascade only: tensor read; arg = (tensor name, ranks)
    # elementwise, n-ary and commutative after canonicalisation
    ADD = auto()       # a + b + ...
    MUL = auto()       # a * b * ...
    # elementwise unary
    NEG = auto()       # -a
    RECIP = auto()     # 1 / a
    SQRT = auto()      # sqrt(a)
    RSQRT = auto()     # 1 / sqrt(a)
    EXP = auto()       # e ** a
    LOG = auto()       # ln a
    TANH = auto()      # tanh a
    SIGMOID = auto()   # 1 / (1 + e ** -a)
    GELU = auto()      # gelu(a); arg = "none" | "tanh"
    CAST = auto()      # dtype change; arg = dtype name (stripped by canonicalisation, noted)
    # elementwise binary / ternary
    MAX2 = auto()      # max(a, b)
    WHERE = auto()     # cond ? a : b
    # reductions; arg = (dims as negative ints, keepdim) in DAGs, reduced ranks in cascades
    SUM = auto()
    MAX = auto()
    # structure (DAG only; cascades express these as rank renamings)
    MATMUL = auto()    # torch.matmul semantics
    LINEAR = auto()    # x @ w.T (+ b); src = (x, w) or (x, w, b)
    EINSUM = auto()    # torch.einsum; arg = equation (no spaces, explicit "->")
    TRANSPOSE = auto() # arg = (d0, d1) as negative ints
    RESHAPE = auto()   # view/reshape; arg = target shape
    EXPAND = auto()    # arg = target shape
    INDEX = auto()     # tensor[...] / slicing / unsqueeze / chunk pieces; arg = normalised index
    CAT = auto()       # arg = dim (negative)
    SOFTMAX = auto()   # arg = dim (negative); log=False
    LOG_SOFTMAX = auto()  # arg = dim (negative)
    DROPOUT = auto()   # arg = (p, training)
    COMPLEX = auto()   # view_as_complex; src = (x,)
    REAL = auto()      # view_as_real
    CMUL = auto()      # complex multiply (only through COMPLEX operands)


COMMUTATIVE = {Op.ADD, Op.MUL}
UNARY = {Op.NEG, Op.RECIP, Op.SQRT, Op.RSQRT, Op.EXP, Op.LOG, Op.TANH, Op.SIGMOID, Op.GELU, Op.CAST}
REDUCE = {Op.SUM, Op.MAX}


@dataclass(frozen=True, eq=False)
class Node:
    op: Op
    src: tuple["Node", ...] = ()
    arg: Any = None
    shape: tuple | None = None
    _key: str = field(default="", repr=False, compare=False)

    def __repr__(self) -> str:  # short, for error messages
        return f"Node({self.op.name}, arg={self.arg!r}, n_src={len(self.src)})"

    @property
    def key(self) -> str:
        """A deterministic structural key (stable across processes)."""
        return self._key


_cache: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()


def _freeze(a: Any) -> Any:
    if isinstance(a, list):
        return tuple(_freeze(x) for x in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in a.items()))
    return a


def node(op: Op, src: tuple[Node, ...] = (), arg: Any = None, shape: tuple | None = None) -> Node:
    """Build (or fetch) the unique node with these fields."""
    arg = _freeze(arg)
    shape = tuple(shape) if shape is not None else None
    ident = (op, tuple(id(s) for s in src), repr(arg), shape)
    hit = _cache.get(ident)
    if hit is not None and hit.src == src:
        return hit
    key = f"{op.name}({repr(arg)}|{','.join(s.key for s in src)})"
    if len(key) > 200:  # shared sub-DAGs would make keys grow exponentially with depth: hash long ones
        key = f"{op.name}#{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    n = Node(op, tuple(src), arg, shape, key)
    _cache[ident] = n
    return n


def const(value: float | None, shape: tuple | None = ()) -> Node:
    return node(Op.CONST, (), None if value is None else float(value), shape)


def toposort(roots: list[Node] | Node, stop: set[int] | frozenset = frozenset()) -> list[Node]:
    """Nodes reachable from roots, each after its sources; nodes whose id is in `stop` are leaves."""
    if isinstance(roots, Node):
        roots = [roots]
    seen: set[int] = set()
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        if id(n) in stop:
            continue
        for s in reversed(n.src):
            if id(s) not in seen:
                stack.append((s, False))
    return order


def broadcast_shape(*shapes: tuple | None) -> tuple | None:
    if any(s is None for s in shapes):
        return None
    nd = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(nd):
        dims = {s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0}
        dims.discard(1)
        out.append(dims.pop() if len(dims) == 1 else (1 if not dims else next(iter(dims))))
    return tuple(out)
