"""The symbolic interpreter: run an FX graph over sympy sizes.

Every FX node's value is described by `TVal`s (one per tensor it returns): a shape
whose entries are Python ints (static dimensions) or sympy expressions (dynamic
ones), a dtype, whether it requires grad, and the identity of the storage it lives
in. Shapes come from Dynamo's `example_value` fake tensors; a dynamic dimension is a
SymInt there, mapped here to a sympy symbol (`SymEnv`). Storage identity also comes
from the fake tensors: a view's fake tensor shares its base's fake storage, so
"does this node allocate?" is read off the metadata rather than guessed. Nodes a
pass inserted without metadata get it by running their target on the fake inputs.

`CostInterpreter(gm).run()` walks the graph once and produces a `NodeCost` per node
by applying the per-op rules of `cost_rules` (FLOPs, bytes read/written, what the
op allocates internally, what autograd saves). Memory (`liveness`) and traffic
(`io_model`) are computed from the `NodeCost`s.

Dynamic dimensions get readable names where they can be identified: the first
symbolic dimension 0 of an integer input of rank 2 (token ids, attention masks) or
of a floating input of rank 3 (embeddings) is `batch`, its dimension 1 is `seq`.
Any other symbol keeps the SymInt's own name (`s0`, `s27`, ...).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from einfuse.ir.lower import op_name

Size = Any  # int | sympy.Expr

__all__ = ["SymEnv", "TVal", "OpCtx", "NodeCost", "CostInterpreter", "node_key", "prod", "is_symbolic"]


def prod(xs) -> Size:
    return functools.reduce(operator.mul, xs, 1)


def is_symbolic(x: Any) -> bool:
    return isinstance(x, sympy.Basic) and not x.is_number


def as_number(x: Any) -> Any:
    """A sympy number as a Python int/float; other values unchanged."""
    if isinstance(x, sympy.Basic) and x.is_number:
        return int(x) if x.is_integer else float(x)
    return x


# ----------------------------------------------------------------------------------------
# sizes

class SymEnv:
    """SymInt -> sympy, with readable names for the dynamic dimensions."""

    def __init__(self):
        self.names: dict[sympy.Symbol, sympy.Symbol] = {}   # ShapeEnv symbol -> our symbol
        self.hints: dict[str, int] = {}                    # our symbol name -> example value

    def name_inputs(self, gm: fx.GraphModule) -> None:
        taken: set[str] = set()
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            v = _meta(n)
            if not isinstance(v, torch.Tensor):
                continue
            role: tuple[str, ...] = ()
            if not v.dtype.is_floating_point and v.dim() == 2:
                role = ("batch", "seq")
            elif v.dtype.is_floating_point and v.dim() == 3:
                role = ("batch", "seq")
            for i, s in enumerate(v.shape):
                if i < len(role) and isinstance(s, torch.SymInt):
                    e = s.node.expr
                    if isinstance(e, sympy.Symbol) and e not in self.names and role[i] not in taken:
                        self.names[e] = sympy.Symbol(role[i], positive=True, integer=True)
                        taken.add(role[i])
                        self._hint(role[i], s)

    def _hint(self, name: str, s: torch.SymInt) -> None:
        try:
            h = s.node.hint
            if h is not None:
                self.hints[name] = int(h)
        except Exception:  # pragma: no cover - unbacked symbols have no hint
            pass

    def size(self, s: Any) -> Size:
        if isinstance(s, torch.SymInt):
            e = s.node.expr
            if e.is_number:
                return int(e)
            for sym in e.free_symbols:
                if sym not in self.names:
                    self.names[sym] = sympy.Symbol(str(sym), positive=True, integer=True)
                    shape_env = s.node.shape_env
                    val = getattr(shape_env, "var_to_val", {}).get(sym)
                    if val is not None:
                        self.hints[str(sym)] = int(val)
            return e.xreplace(self.names)
        if isinstance(s, (int, bool)):
            return int(s)
        if isinstance(s, torch.SymFloat):
            return s.node.expr.xreplace(self.names)
        return s

    @property
    def symbols(self) -> dict[str, sympy.Symbol]:
        return {str(v): v for v in self.names.values()}


# ----------------------------------------------------------------------------------------
# values

@dataclass
class TVal:
    """A tensor, symbolically."""
    shape: tuple
    dtype: torch.dtype
    strides: tuple
    storage: int            # identity of its (fake) storage: views share it
    storage_bytes: Size     # the storage's size (a view's is its base's)
    requires_grad: bool

    @property
    def numel(self) -> Size:
        return prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> Size:
        return self.numel * self.itemsize

    @property
    def distinct_bytes(self) -> Size:
        """Bytes of distinct elements (a broadcast/expanded dimension, stride 0, is read once)."""
        return prod(s for s, st in zip(self.shape, self.strides) if st != 0) * self.itemsize

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _meta(n: Any) -> Any:
    if isinstance(n, fx.Node):
        return n.meta.get("example_value", n.meta.get("val"))
    return None


def _fake_mode(vals) -> Any:
    for v in tree_flatten(vals)[0]:
        m = getattr(v, "fake_mode", None)
        if m is not None:
            return m
    return None


def node_key(n: fx.Node) -> str:
    """The op an FX node performs, normalised (`op_name`), with torch.ops overloads by schema name."""
    if n.op == "call_function":
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            return t._schema.name.split("::")[-1]
        if isinstance(t, torch._ops.OpOverloadPacket):
            return t._qualified_op_name.split("::")[-1]
    if n.op in ("call_function", "call_method"):
        return op_name(n)
    return n.op


# ----------------------------------------------------------------------------------------
# per-node results

@dataclass
class NodeCost:
    name: str
    op: str                      # normalised op name (the rule key)
    kind: str                    # "input" | "view" | "compute" | "output" | "none"
    outs: list[TVal] = field(default_factory=list)
    ins: list[TVal] = field(default_factory=list)        # tensor inputs, flattened, in argument order
    in_nodes: list[str] = field(default_factory=list)    # the FX node each input comes from
    flops: Size = 0              # all FLOPs (contractions included)
    matmul_flops: Size = 0       # contractions only
    read: dict = field(default_factory=dict)     # dtype -> bytes read (streaming model, one pass)
    written: dict = field(default_factory=dict)  # dtype -> bytes written
    transient: Size = 0          # bytes the op allocates internally and frees before returning
    hidden: list = field(default_factory=list)   # [(bytes, saved)] internal results kept for backward
    saved: list[TVal] = field(default_factory=list)  # tensors (inputs/outputs) autograd keeps
    allocs: dict = field(default_factory=dict)   # storage -> bytes: the new storages its outputs live in
    grad_needed: bool = False    # the output requires grad (the op is recorded by autograd)
    bwd: dict = field(default_factory=dict)      # backward model: see liveness.py
    io: dict = field(default_factory=dict)       # description for io_model (dims of contractions, ...)
    users: list[str] = field(default_factory=list)
    graph_output: bool = False

    @property
    def bytes_read(self) -> Size:
        return sum(self.read.values())

    @property
    def bytes_written(self) -> Size:
        return sum(self.written.values())


class OpCtx:
    """What a rule sees: the node, its arguments as `TVal`s / Python values, its outputs."""

    def __init__(self, node: fx.Node, name: str, args: tuple, kwargs: dict, outs: list[TVal],
                 ins: list[TVal], training: bool):
        self.node, self.name, self.args, self.kwargs = node, name, args, kwargs
        self.outs, self.ins, self.training = outs, ins, training

    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        return default

    @property
    def out(self) -> TVal | None:
        return self.outs[0] if self.outs else None

    @property
    def grad(self) -> bool:
        """Autograd records this op (its output requires grad)."""
        return any(o.requires_grad for o in self.outs)


# ----------------------------------------------------------------------------------------
# the interpreter

class CostInterpreter:
    """Run the graph over symbolic values; one `NodeCost` per FX node, in graph order.

    `training`: whether autograd records the graph (default: read off the metadata:
    some computed value requires grad).
    """

    def __init__(self, gm: fx.GraphModule, env: SymEnv | None = None, training: bool | None = None):
        self.gm = gm
        self.env = env or SymEnv()
        self.env.name_inputs(gm)
        self.values: dict[fx.Node, Any] = {}     # node -> example value (fake), ours if propagated
        self.tvals: dict[fx.Node, Any] = {}      # node -> TVal | list[TVal] | python value
        self._training = training
        self._grad_mode = training

    # -- values ------------------------------------------------------------------------------
    def example(self, n: fx.Node) -> Any:
        if n in self.values:
            return self.values[n]
        v = _meta(n)
        if v is None and n.op in ("call_function", "call_method"):
            v = self._propagate(n)
        self.values[n] = v
        return v

    def _propagate(self, n: fx.Node) -> Any:
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self.example)
        mode = _fake_mode((args, kwargs))
        if mode is None:
            return None
        try:
            with mode, torch.set_grad_enabled(bool(self._grad_mode)):
                if n.op == "call_function":
                    return n.target(*args, **kwargs)
                return getattr(args[0], n.target)(*args[1:], **kwargs)
        except Exception:
            return None

    def tval(self, t: torch.Tensor) -> TVal:
        env = self.env
        try:
            st = t.untyped_storage()
            key = st._cdata
            sbytes = env.size(st.nbytes())
        except Exception:  # pragma: no cover - tensor subclasses without storage
            key, sbytes = id(t), None
        shape = tuple(env.size(s) for s in t.shape)
        try:
            strides = tuple(env.size(s) for s in t.stride())
        except Exception:  # pragma: no cover
            strides = (1,) * len(shape)
        tv = TVal(shape, t.dtype, strides, key, sbytes, bool(t.requires_grad))
        if tv.storage_bytes is None:
            tv.storage_bytes = tv.nbytes
        return tv

    def _wrap(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return self.tval(v)
        if isinstance(v, (list, tuple)):
            return [self._wrap(x) for x in v]
        if isinstance(v, (torch.SymInt, torch.SymFloat)):
            return self.env.size(v)
        return v

    # -- the walk ------------------------------------------------------------------------------
    def run(self) -> list[NodeCost]:
        from . import cost_rules as R

        nodes = list(self.gm.graph.nodes)
        out_node = next((n for n in reversed(nodes) if n.op == "output"), None)
        outputs = set(out_node.all_input_nodes) if out_node is not None else set()
        training = self._training
        if training is None:   # autograd records the graph: a captured value requires grad
            computed = [n for n in nodes if n.op in ("call_function", "call_method")]
            captured = [n for n in computed if "source_fn_stack" in n.meta or "nn_module_stack" in n.meta]
            training = any(isinstance(t, torch.Tensor) and t.requires_grad
                           for n in (captured or computed) for t in tree_flatten(_meta(n))[0])
        self.training = self._grad_mode = training
        for n in nodes:
            if n.op != "output":
                self.tvals[n] = self._wrap(self.example(n))
                if not training and n.op != "placeholder":   # nothing is recorded without grad mode
                    for t in _flat(self.tvals[n]):
                        if isinstance(t, TVal):
                            t.requires_grad = False
        costs: list[NodeCost] = []
        for n in nodes:
            name = node_key(n)
            outs = [t for t in _flat(self.tvals.get(n)) if isinstance(t, TVal)] if n.op != "output" else []
            if n.op in ("placeholder", "get_attr"):
                costs.append(NodeCost(n.name, name, "input", outs=outs, users=[u.name for u in n.users]))
                continue
            if n.op == "output":
                nc = NodeCost(n.name, "output", "output")
                for a in n.all_input_nodes:
                    for t in _flat(self.tvals.get(a)):
                        if isinstance(t, TVal):
                            nc.ins.append(t)
                            nc.in_nodes.append(a.name)
                costs.append(nc)
                continue
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.tvals.get(a))
            refs = fx.node.map_arg((n.args, n.kwargs), lambda a: _Ref(a.name, self.tvals.get(a)))
            ins, in_nodes = [], []
            for r in _flat(refs):
                if isinstance(r, _Ref):
                    for t in _flat(r.val):
                        if isinstance(t, TVal):
                            ins.append(t)
                            in_nodes.append(r.name)
            ctx = OpCtx(n, name, tuple(args), dict(kwargs), outs, ins, training)
            c = R.apply_rules(ctx)
            c.in_nodes = in_nodes
            c.users = [u.name for u in n.users]
            c.graph_output = n in outputs
            costs.append(c)
        return costs


class _Ref:
    __slots__ = ("name", "val")

    def __init__(self, name: str, val: Any):
        self.name, self.val = name, val


def _flat(v: Any) -> list:
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            out.extend(_flat(x))
        return out
    if isinstance(v, dict):
        return _flat(list(v.values()))
    return [v]
