"""What every pass shares: the context it records into, and graph surgery helpers.

A pass is a function `(gm, ctx) -> gm`. It never mutates its input: it works
on `clone(gm)`. It records each candidate region (fused or rejected, with the
reason) in `ctx`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from einfuse.ir.lower import Lowered, lower_graph, meta_value
from einfuse.ir.node import Node, Op, toposort
from einfuse.report import Region, Report

log = logging.getLogger("einfuse")


@dataclass
class PassContext:
    config: Any
    report: Report
    graph_index: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def new_region(self, kind: str, fused: bool, nodes: list[str], anchor: str, reason: str = "",
                   **kw) -> Region:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        r = Region(f"g{self.graph_index}/{kind}/{n}", kind, fused, nodes, reason, anchor, **kw)
        self.report.regions.append(r)
        if fused:
            log.debug("pass %s: fused %s at %s", kind, r.id, anchor)
        else:
            log.debug("pass %s: rejected candidate at %s: %s", kind, anchor, reason)
        return r


def clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph (sharing the module's attributes)."""
    g = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, val_map)
    g.output(out)
    for old, new in val_map.items():
        new.meta = dict(old.meta)
    new_gm = fx.GraphModule(gm, g)
    new_gm.meta = dict(getattr(gm, "meta", {}))
    return new_gm


def covered_fx_nodes(low: Lowered, covered: list[Node], bound: list[Node]) -> list[fx.Node]:
    """FX nodes whose values the match covered (bound inputs excluded)."""
    bound_ids = {id(b) for b in bound}
    ids = {id(n) for n in covered if id(n) not in bound_ids}
    out = [f for f, c in low.of.items() if id(c) in ids]
    # casts/views that canonicalise to a covered node or a bound one sit between them too
    return out


def value_of(low: Lowered, n: Node) -> fx.Node | None:
    """An FX node that already computes canonical node n (the earliest one)."""
    return low.fx_node(n)


def insert_call(gm: fx.GraphModule, root: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None,
                after: list[fx.Node] | None = None) -> fx.Node:
    """Insert target(*args) right before root, make root's users use it, and return it.

    The new node must come after every FX node it reads: we insert before root,
    which is after all of root's inputs in topological order.
    """
    g = gm.graph
    with g.inserting_before(root):
        new = g.call_function(target, args, kwargs or {})
    new.meta = dict(root.meta)
    want = meta_value(root)
    root.replace_all_uses_with(new)
    return new


def cast_like(gm: fx.GraphModule, n: fx.Node, like: fx.Node, value_dtype: torch.dtype) -> fx.Node:
    """Insert n.to(like's dtype) if the fused op's dtype differs from what the graph had."""
    want = meta_value(like)
    if isinstance(want, torch.Tensor) and want.dtype != value_dtype:
        with gm.graph.inserting_after(n):
            c = gm.graph.call_method("to", (n, want.dtype))
        n.replace_all_uses_with(c)
        c.args = (n, want.dtype)
        c.meta = dict(like.meta)
        return c
    return n


import operator as _operator

_INPLACE_OPERATORS = {_operator.iadd, _operator.isub, _operator.imul, _operator.itruediv, _operator.ipow,
                      _operator.setitem}


def _pure(n: fx.Node) -> bool:
    """Safe to drop when unused: no in-place method or operator, no side-effectful function."""
    if n.op == "call_method":
        return not str(n.target).endswith("_")
    if n.op == "call_function":
        if n.target in _INPLACE_OPERATORS or getattr(n.target, "__name__", "").endswith("_"):
            return False
        return not n.is_impure()
    return False


def erase_dead(gm: fx.GraphModule, candidates: list[fx.Node]) -> None:
    """Erase the replaced region's nodes, and then their inputs, once nothing uses them.

    The sweep starts at the region and walks up through inputs, so intermediate
    values the match never visited (canonicalisation flattens `(x*r)*w`, so the
    FX node for `x*r` is not a canonical node of its own) go too. Only pure
    nodes are erased: a global dead-code sweep could drop user ops with side
    effects (in-place updates whose result is unused).
    """
    pending = list(dict.fromkeys(candidates))
    erased: set[fx.Node] = set()
    while pending:
        n = pending.pop()
        # _erased: erased by an earlier call (a shared cos/sin feeding two regions of one pass)
        if n in erased or getattr(n, "_erased", False) or n.graph is not gm.graph or n.users or not _pure(n):
            continue
        inputs = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        erased.add(n)
        pending.extend(i for i in inputs if i.op in ("call_function", "call_method"))


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    return gm


def tensor_meta(n: Any) -> torch.Tensor | None:
    v = meta_value(n)
    return v if isinstance(v, torch.Tensor) else None
