"""RMSNorm: recognised by what it computes, replaced by `einfuse::rms_norm`.

The patterns are plain torch reference functions, lowered once to canonical
nodes. Canonicalisation makes `x.pow(2).mean(-1)` and `torch.mean(x*x, -1)`,
`x * rsqrt(v)` and `x / sqrt(v)`, methods and functions, with and without
fp32 upcasts, the same node, so one pattern per variant (plain, Gemma's
`1 + w`) covers every spelling. Anchors are rsqrt nodes (1/sqrt is
canonicalised to rsqrt); each anchor's enclosing product is matched.

Residual add: when a fused norm's input is an add of two same-shape, same-dtype
tensors (`h = x + residual; y = rmsnorm(h)`, h usually the residual stream the
graph keeps using), the add moves into the op: `einfuse::add_rms_norm` returns
(y, h) and h's other users read the op's h. The region stays an "rmsnorm" one,
with `bindings["residual"] = True`. An add that does not feed the norm is left
alone. Off under `layer_skip`, whose pass finds layers by their residual adds.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx

from einfuse.ir.from_dag import dag_to_cascade
from einfuse.ir.lower import lower_function, lower_graph, multi_use_values
from einfuse.ir.match import match
from einfuse.ir.node import Node, Op, toposort
from einfuse.runtime.ops.rmsnorm import add_rms_norm, rms_norm
from .base import PassContext, clone, covered_fx_nodes, cast_like, erase_dead, finish, insert_call, tensor_meta, value_of


def rms_norm_ref(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rms_norm_offset_ref(x, w, eps):  # Gemma: the weight is stored as w - 1
    return (1.0 + w) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# most specific first: the plain pattern would also match Gemma's, binding w to the graph's (1 + w)
PATTERNS = (("one_plus_weight", rms_norm_offset_ref, 1.0), ("weight", rms_norm_ref, 0.0))


@functools.cache
def _patterns():
    return [(name, lower_function(fn)[0][0], offset) for name, fn, offset in PATTERNS]


def _anchors(low) -> list[Node]:
    seen, out = set(), []
    for f, c in low.of.items():
        for m in toposort(c) if c.op is Op.MUL else ():
            if m.op is Op.RSQRT and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


def _check(b: dict, gm_low, shape_of) -> str:
    x, w, eps = b["x"], b["w"], b["eps"]
    if eps.op is not Op.CONST:
        return "eps is not a constant"
    xs, ws = shape_of(x), shape_of(w)
    if xs is None or ws is None:
        return "input shapes unknown"
    h = xs[-1]
    if not isinstance(h, int):
        return "normalised dimension is dynamic"
    inv = b["__inv_count"]
    if inv.op is not Op.CONST or abs(inv.arg * h - 1.0) > 1e-6:
        return f"mean divides by {1 / inv.arg if inv.op is Op.CONST and inv.arg else '?'}, not the row length {h}"
    if tuple(d for d in ws if d != 1) != (h,) or ws[-1] != h:
        return f"weight of shape {tuple(ws)} does not scale the normalised dimension {h}"
    return ""


def fuse_rmsnorm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm = clone(gm)
    # round 1 on the plain canonical form; round 2 retries the anchors that did not match with
    # multi-use values opaque (Gemma's residual stream is embed * sqrt(d): flattening would merge
    # that product into the norm's own products, hiding x)
    rejected: list = []
    made: list = []  # (fused node, its region)
    _fuse_round(gm, ctx, lower_graph(gm.graph), rejected, made)
    if rejected:
        retry: list = []
        before = len(ctx.report.regions)
        _fuse_round(gm, ctx, lower_graph(gm.graph, opaque=multi_use_values(gm.graph)), retry, made,
                    only={r["anchor"] for r in rejected})
        fused_now = {r.anchor for r in ctx.report.regions[before:] if r.fused}
        rejected = [r for r in rejected if r["anchor"] not in fused_now]
    for r in rejected:
        ctx.new_region("rmsnorm", False, r["nodes"], r["anchor"], reason=r["reason"])
    if not getattr(ctx.config, "layer_skip", 0.0):
        for node, region in made:
            if node.graph is gm.graph:
                _fuse_residual(gm, node, region)
    return finish(gm)


_ADDS = {operator.add, torch.add, torch.Tensor.add}


def _residual_add(a: fx.Node) -> str:
    """Why FX node a is not an add this op can absorb ("" when it is)."""
    if not ((a.op == "call_function" and a.target in _ADDS) or (a.op == "call_method" and a.target == "add")):
        return "the norm's input is not an add"
    if a.kwargs or len(a.args) != 2 or not all(isinstance(v, fx.Node) for v in a.args):
        return "the add has a scale (alpha) or a non-tensor operand"
    ts = [tensor_meta(v) for v in (*a.args, a)]
    if any(t is None for t in ts):
        return "the add's shapes are unknown"
    # shapes by their printed form: dynamic dims are unhashable SymInts, and comparing them would guard
    if len({(tuple(str(d) for d in t.shape), t.dtype) for t in ts}) != 1 or not ts[0].is_floating_point():
        return "the add broadcasts or mixes dtypes"
    return ""


def _fuse_residual(gm: fx.GraphModule, node: fx.Node, region) -> None:
    """node = rms_norm(a, w, eps, offset) with a = x + residual -> add_rms_norm(x, residual, w, eps, offset)."""
    a, w, eps, offset = node.args
    if not isinstance(a, fx.Node) or _residual_add(a):
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    others = [u for u in a.users if u is not node]
    if not isinstance(w, fx.Node) or order[w] < order[a]:
        where = a.next           # right after the add: w and the add's operands are all defined there
    elif all(order[u] > order[node] for u in others):
        where = node             # at the norm: the add's other users all come later
    elif w.op == "get_attr":
        a.append(w)  # a parameter read has no inputs: read it before the add
        where = w.next
    else:
        return
    g = gm.graph
    with g.inserting_before(where):
        new = g.call_function(add_rms_norm, (a.args[0], a.args[1], w, eps, offset))
        y = g.call_function(operator.getitem, (new, 0))
        h = g.call_function(operator.getitem, (new, 1))
    y.meta, h.meta = dict(node.meta), dict(a.meta)
    vy, vh = node.meta.get("val", node.meta.get("example_value")), a.meta.get("val", a.meta.get("example_value"))
    if vy is not None and vh is not None:
        new.meta["val"] = (vy, vh)
    node.replace_all_uses_with(y)
    g.erase_node(node)
    a.replace_all_uses_with(h)
    g.erase_node(a)
    region.nodes = list(dict.fromkeys([a.name, *region.nodes]))
    region.bindings["residual"] = True


def _fuse_round(gm: fx.GraphModule, ctx: PassContext, low, rejected: list, made: list,
                only: set | None = None) -> None:
    fx_of_root: dict[int, list[fx.Node]] = {}
    for f, c in low.of.items():
        fx_of_root.setdefault(id(c), []).append(f)

    def shape_of(n: Node):
        f = value_of(low, n)
        t = tensor_meta(f) if f is not None else None
        return tuple(t.shape) if t is not None else None

    for anchor in _anchors(low):
        # candidate roots: products that contain this rsqrt, largest first
        roots = [c for c in {id(c): c for c in low.of.values()}.values()
                 if c.op is Op.MUL and any(s is anchor or (s.op is Op.MUL and anchor in s.src) for s in c.src)]
        roots.sort(key=lambda c: -len(toposort(c)))
        best_reason, best_depth, fused = "", -1, False
        # 1/sqrt(v) has no FX node of its own once canonicalised to rsqrt: name the smallest product instead
        anchor_fx = value_of(low, anchor) or next(
            (value_of(low, r) for r in reversed(roots) if value_of(low, r) is not None), None)
        if only is not None and (anchor_fx is None or anchor_fx.name not in only):
            continue
        for root in roots:
            for name, pat, offset in _patterns():
                m = match(pat, root)
                if not m.ok:
                    if m.depth > best_depth:  # the pattern that got furthest explains best
                        best_reason, best_depth = m.reason, m.depth
                    continue
                why = _check(m.bindings, low, shape_of)
                x_fx, w_fx = value_of(low, m.bindings["x"]), value_of(low, m.bindings["w"])
                if not why and (x_fx is None or w_fx is None):
                    why = "an input is not a value the graph computes"
                if why:
                    best_reason, best_depth = why, 1 << 30
                    continue
                fused = True
                break
            if fused:
                break
        if not fused:
            name_ = anchor_fx.name if anchor_fx is not None else "?"
            if only is None:
                rejected.append({"nodes": [name_] if anchor_fx is not None else [], "anchor": name_,
                                 "reason": f"rsqrt is not part of an RMSNorm: {best_reason or 'no enclosing product'}"})
            continue
        b = m.bindings
        eps = float(b["eps"].arg)
        bound = [b["x"], b["w"], b["eps"], b["__inv_count"]]
        region_fx = covered_fx_nodes(low, m.covered, bound)
        root_fx = fx_of_root[id(root)]
        first = min(root_fx, key=lambda n: list(gm.graph.nodes).index(n)) if len(root_fx) > 1 else root_fx[0]
        new = insert_call(gm, first, rms_norm, (x_fx, w_fx, eps, offset))
        x_t, w_t = tensor_meta(x_fx), tensor_meta(w_fx)
        value_dtype = torch.result_type(x_t, w_t) if x_t is not None and w_t is not None else None
        # the fused node's metadata must describe what the op returns (dtype result_type(x, w)),
        # not the fp32 product HF computes before casting back: later passes read dtypes from it
        same = [f for f in root_fx if tensor_meta(f) is not None and tensor_meta(f).dtype == value_dtype]
        if same:
            new.meta = dict(same[-1].meta)
        for f in root_fx:
            if f is not first:
                f.replace_all_uses_with(new)
        out = cast_like(gm, new, root_fx[-1], value_dtype) if value_dtype is not None else new
        cascade = dag_to_cascade("rmsnorm", {"Y": root}, {id(b["x"]): "X", id(b["w"]): "W"})
        region = ctx.new_region("rmsnorm", True, [n.name for n in region_fx],
                                anchor_fx.name if anchor_fx else first.name, cascades={"reference": cascade},
                                bindings={"eps": eps, "variant": name, "hidden": shape_of(b["x"])[-1],
                                          "residual": False})
        made.append((new, region))
        erase_dead(gm, list(dict.fromkeys(region_fx + root_fx)))
