"""SwiGLU / GeGLU: gated MLPs recognised by what they compute, replaced by `einfuse::glu_mlp` / `einfuse::glu`.

The patterns are plain torch reference functions ``act(gate) * up`` for
act in SiLU, GELU and GELU-tanh, lowered once to canonical nodes.
Canonicalisation makes ``F.silu(a) * b``, ``a * torch.sigmoid(a) * b``,
``nn.SiLU()(a) * b``, ``a / (1 + exp(-a)) * b`` and fp32-upcast spellings the
same node (``silu(g)`` is ``g * sigmoid(g)``, products are flattened and sorted),
and which operand carries the activation decides which one is the gate.

A match is a gated linear unit only if both factors are projections of the
same input x: two linears ``gate(x)`` and ``up(x)``, or two equal-sized slices
of one fused ``gate_up(x)`` linear (``chunk(2, -1)`` pieces or explicit
slices, as in Phi-3). ``act(gate(x)) * x``, projections of different inputs,
or the same projection twice are rejected with the reason.

When the product feeds only a down-projection linear, the whole MLP
``down(act(gate(x)) * up(x))`` becomes one ``glu_mlp`` call (a fused gate_up
weight is passed as two views of the one parameter, so its gradient
accumulates into it); otherwise the elementwise ``glu(gate, up)`` replaces
the product.
"""

from __future__ import annotations

import functools
import operator

import torch.fx as fx
import torch.nn.functional as F

from einfuse.ir.from_dag import dag_to_cascade
from einfuse.ir.lower import lower_function, lower_graph, op_name
from einfuse.ir.match import describe, match
from einfuse.ir.node import Node, Op
from einfuse.runtime.ops.swiglu import glu, glu_mlp
from .base import PassContext, clone, covered_fx_nodes, erase_dead, finish, tensor_meta, value_of
from .rope import aliases, emit, graph_order, replace_value


def silu_glu_ref(gate, up):
    return F.silu(gate) * up


def gelu_glu_ref(gate, up):
    return F.gelu(gate) * up


def gelu_tanh_glu_ref(gate, up):
    return F.gelu(gate, approximate="tanh") * up


PATTERNS = {"silu": silu_glu_ref, "gelu": gelu_glu_ref, "gelu_tanh": gelu_tanh_glu_ref}


@functools.cache
def _pattern(act: str) -> Node:
    return lower_function(PATTERNS[act])[0][0]


def _activation(p: Node) -> tuple[str, list[Node], list[Node]] | None:
    """A product containing an activation: (act, the activation's factors, the other factors)."""
    if p.op is not Op.MUL:
        return None
    for s in p.src:
        if s.op is Op.SIGMOID and s.src[0] in p.src:
            g = s.src[0]
            parts = [s, g]
            rest = list(p.src)
            rest.remove(s)
            rest.remove(g)
            return "silu", parts, rest
    for s in p.src:
        if s.op is Op.GELU and s.arg in ("none", "tanh", None):
            rest = [t for t in p.src if t is not s]
            return ("gelu" if s.arg in ("none", None) else "gelu_tanh"), [s], rest
    return None


def _projection(n: Node) -> tuple[Node, int | None, int | None] | None:
    """linear(x, w) or a last-dim slice of one: (the LINEAR node, slice start, stop)."""
    if n.op is Op.LINEAR:
        return n, None, None
    if n.op is Op.INDEX and isinstance(n.arg, tuple) and len(n.arg) == 2 and n.arg[0] == "...":
        s = n.arg[1]
        lin = n.src[0]
        if isinstance(s, tuple) and s[0] == "slice" and s[3] is None and lin.op is Op.LINEAR:
            width = lin.shape[-1] if lin.shape is not None else None
            if not isinstance(width, int):
                return None
            a, b, _ = slice(s[1], s[2]).indices(width)
            return lin, a, b
    return None


def _linear_args(f: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    x = f.args[0] if f.args else f.kwargs.get("input")
    w = f.args[1] if len(f.args) > 1 else f.kwargs.get("weight")
    b = f.args[2] if len(f.args) > 2 else f.kwargs.get("bias")
    return x, w, b


def fuse_swiglu(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm = clone(gm)
    low = lower_graph(gm.graph)
    products = {id(c): c for c in low.of.values() if c.op is Op.MUL}
    mul_srcs = {frozenset(id(s) for s in c.src) for c in products.values()}
    done: set[int] = set()

    for p in products.values():
        found = _activation(p)
        if found is None or not found[2]:
            continue  # a bare activation, not a gated product
        act, parts, rest = found
        root_fx = aliases(low, p)
        if not root_fx:
            continue
        anchor = root_fx[0].name

        def reject(why: str):
            ctx.new_region("swiglu", False, [f.name for f in root_fx], anchor, reason=why)

        if len(rest) > 1:
            if any(frozenset(id(s) for s in parts + [o]) in mul_srcs for o in rest):
                continue  # a larger product over a gated product that is itself a candidate
            reject(f"act(gate) multiplies {len(rest)} other factors, not one up projection")
            continue
        m = match(_pattern(act), p)
        if not m.ok:
            reject(m.reason)
            continue
        gate, up = m.bindings["gate"], m.bindings["up"]
        gp, upj = _projection(gate), _projection(up)
        why = ""
        if gp is None:
            why = f"the gate operand of {act}(gate) * up is not a linear projection (found {describe(gate)})"
        elif upj is None:
            x = gp[0].src[0]
            what = "the gate projection's input itself" if up is x else describe(up)
            why = f"the other factor of {act}(gate(x)) * up is not a linear projection of x (found {what})"
        elif gp[0].src[0] is not upj[0].src[0]:
            why = "gate and up project different inputs"
        elif gp[0] is upj[0] and (gp[1], gp[2]) == (upj[1], upj[2]):
            why = "gate and up are the same projection"
        elif gp[0] is upj[0] and (gp[1] is None or upj[1] is None or not (gp[2] <= upj[1] or upj[2] <= gp[1])):
            why = "gate and up are overlapping parts of one projection"
        gate_fx, up_fx = value_of(low, gate), value_of(low, up)
        glin_fx, ulin_fx = value_of(low, gp[0]) if gp else None, value_of(low, upj[0]) if upj else None
        if not why and (gate_fx is None or up_fx is None or glin_fx is None or ulin_fx is None):
            why = "an input is not a value the graph computes"
        if not why:
            gt, ut = tensor_meta(gate_fx), tensor_meta(up_fx)
            if gt is None or ut is None or gt.shape != ut.shape or gt.dtype != ut.dtype:
                why = (f"gate {tuple(gt.shape) if gt is not None else '?'} and up "
                       f"{tuple(ut.shape) if ut is not None else '?'} differ in shape or dtype")
        if why:
            reject(why)
            continue
        if id(p) in done:
            continue
        done.add(id(p))

        # the whole MLP when the product feeds only a down projection
        consumers = list(dict.fromkeys(u for a in root_fx for u in a.users if u not in root_fx))
        down = consumers[0] if len(consumers) == 1 else None
        plain = all(op_name(t) == "linear" for t in (glin_fx, ulin_fx))  # not e.g. a quantized linear
        mlp = (plain and down is not None and down.op == "call_function" and op_name(down) == "linear"
               and _linear_args(down)[0] in root_fx and down in low.of and low.of[down].op is Op.LINEAR)
        if mlp:
            xg, wg, bg = _linear_args(glin_fx)
            xu, wu, bu = _linear_args(ulin_fx)
            _, wd, bd = _linear_args(down)
            ts = [tensor_meta(t) for t in (xg, xu, wg, wu, wd, down) + tuple(t for t in (bg, bu, bd) if t is not None)]
            inter = tensor_meta(gate_fx).shape[-1]
            mlp = (all(t is not None and t.dtype == ts[0].dtype for t in ts)
                   and ts[2].dim() == 2 and ts[4].dim() == 2 and ts[4].shape[1] == inter
                   and (xg is xu or low.of.get(xg) is low.of.get(xu)))
        fused_gate_up = gp[0] is upj[0]
        chunks = [f.args[0] for f in (gate_fx, up_fx)
                  if op_name(f) == "getitem" and isinstance(f.args[0], fx.Node)
                  and op_name(f.args[0]) in ("chunk", "split", "split_with_sizes")]
        region = covered_fx_nodes(low, m.covered, [gate, up]) + root_fx + aliases(low, gate) + aliases(low, up) \
            + chunks + aliases(low, gp[0]) + aliases(low, upj[0])
        if mlp:
            with gm.graph.inserting_before(down):
                def view(t, piece):
                    if t is None or piece[1] is None:
                        return t
                    return emit(gm, "call_function", operator.getitem, (t, slice(piece[1], piece[2])))
                args = (xg, view(wg, gp), view(wu, upj), wd, view(bg, gp), view(bu, upj), bd)
                new = emit(gm, "call_function", glu_mlp, args, {"act": act})
            replace_value(gm, [down], new)
            region.append(down)
        else:
            at = min(root_fx, key=graph_order(gm).__getitem__)
            with gm.graph.inserting_before(at):
                new = emit(gm, "call_function", glu, (gate_fx, up_fx), {"act": act})
            replace_value(gm, root_fx, new)
        region = list(dict.fromkeys(region))
        cascades = {}
        try:
            cascades["reference"] = dag_to_cascade("swiglu", {"H": p}, {id(gate): "G", id(up): "U"})
        except (ValueError, KeyError):
            pass
        ctx.new_region("swiglu", True, [f.name for f in region], anchor, cascades=cascades,
                       bindings={"act": act, "form": "mlp" if mlp else "elementwise",
                                 "fused_gate_up": fused_gate_up,
                                 "intermediate": tensor_meta(gate_fx).shape[-1]})
        erase_dead(gm, region)
    return finish(gm)
