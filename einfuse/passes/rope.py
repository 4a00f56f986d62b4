"""RoPE: rotary position embeddings recognised by what they compute, replaced by `einfuse::rope`.

Two forms, each a plain torch reference function lowered once to canonical nodes:

* rotate-half (Hugging Face): ``x * cos + cat(-x[..., R/2:], x[..., :R/2]) * sin``.
  ``rotate_half`` spelled with slices or with ``chunk(2, -1)`` is the same node
  (chunk pieces lower to slices). Anchors are the rotate-half concatenations;
  the enclosing ``x*cos + rot(x)*sin`` sum is matched against the pattern for
  R/2 = half the rotated width. Partial rotary (Phi: only the first R features
  rotate, ``cat([rope(x[..., :R]), x[..., R:]], -1)``) fuses the whole
  concatenation (the op passes the tail through).
* interleaved (Meta): ``view_as_real(view_as_complex(x.reshape(..., -1, 2)) * freqs_cis).flatten(3)``.
  Canonicalisation turns the complex product into its real two-component form,
  ``cat(xr*fr - xi*fi, xr*fi + xi*fr)`` over the (real, imag) pairs, which is
  what the pattern spells; cos/sin are then ``view_as_real(freqs_cis)[..., 0 / 1]``.

cos and sin must be cos and sin of the same angles: the factor multiplying x
must trace back (through views, unsqueezes, scalings and gathers by position
ids) to a ``cos(a)`` and the one multiplying rotate_half(x) to ``sin(a)`` of the
same ``a`` through the same steps; otherwise (sin from other position ids,
``x*cos + rotate_half(x)*cos``, swapped cos and sin) the candidate is rejected.

q and k rotated with the same cos/sin are fused into one op call (the pairs
are taken in graph order, so each layer's q and k pair up); a lone rotation is
called with an empty k. Layouts: the op wants [B, H, S, D]; with cos/sin
varying along dim 1 ([B, S, H, D], Meta style) the inputs and outputs are
transposed around the call.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from einfuse.ir.lower import lower_function, lower_graph, meta_value, op_name
from einfuse.ir.match import describe, match
from einfuse.ir.node import Node, Op, toposort
from einfuse.runtime.ops.rope import rope
from .base import PassContext, clone, covered_fx_nodes, erase_dead, finish, tensor_meta, value_of


# -- graph-building helpers (also used by the swiglu and linear_cross_entropy passes) -----------

def fake_mode_of(*vals: Any):
    for v in torch.utils._pytree.tree_leaves(vals):
        m = getattr(v, "fake_mode", None)
        if m is not None:
            return m
    return None


def emit(gm: fx.GraphModule, kind: str, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Add a node at the graph's current insertion point and give it an example value.

    The example value is computed on the fake inputs (fused ops have fake
    implementations), so later passes see the shapes and dtypes of what we added.
    """
    kwargs = kwargs or {}
    g = gm.graph
    n = g.call_function(target, args, kwargs) if kind == "call_function" else g.call_method(target, args, kwargs)
    inputs: list = []
    fx.node.map_arg((args, kwargs), inputs.append)
    vals = [meta_value(a) for a in inputs]
    mode = fake_mode_of(*vals)
    if mode is not None and all(v is not None for v in vals):
        a, k = fx.node.map_arg((args, kwargs), meta_value)
        try:
            with mode:
                ev = target(*a, **k) if kind == "call_function" else getattr(a[0], target)(*a[1:], **k)
            n.meta["example_value"] = ev
        except Exception:  # metadata helps later passes; it is never required
            pass
    return n


def graph_order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def replace_value(gm: fx.GraphModule, olds: list[fx.Node], new: fx.Node) -> None:
    """Every FX node in `olds` computes the value `new` now computes: use new, cast to each one's dtype."""
    new_t = tensor_meta(new)
    for old in olds:
        want = tensor_meta(old)
        repl = new
        if want is not None and (new_t is None or want.dtype != new_t.dtype):
            with gm.graph.inserting_after(new):
                repl = emit(gm, "call_method", "to", (new, want.dtype))
        old.replace_all_uses_with(repl)


def aliases(low, n: Node) -> list[fx.Node]:
    """FX nodes whose canonical value is n (the op and its casts/contiguous copies), in graph order."""
    return [f for f, c in low.of.items() if c is n]


# -- patterns ------------------------------------------------------------------------------------

def _rotate_half_ref(h: int) -> Callable:
    def rope_ref(x, cos, sin):
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin
    return rope_ref


def rope_interleaved_ref(a, y):
    """a: x viewed as [..., R/2, 2] (real, imag) pairs; y: [..., R/2, 2] (cos, sin) pairs."""
    ar, ai = a[..., :1], a[..., 1:]
    c, s = y[..., :1], y[..., 1:]
    return torch.cat((ar * c - ai * s, ar * s + ai * c), dim=-1)


@functools.cache
def _half_pattern(h: int) -> Node:
    return lower_function(_rotate_half_ref(h))[0][0]


@functools.cache
def _interleaved_pattern() -> Node:
    return lower_function(rope_interleaved_ref)[0][0]


def _slice_of(n: Node) -> tuple[Node, Any, Any] | None:
    """x[..., a:b] -> (x, a, b) for a last-dim slice, else None."""
    if n.op is Op.INDEX and isinstance(n.arg, tuple) and len(n.arg) == 2 and n.arg[0] == "...":
        s = n.arg[1]
        if isinstance(s, tuple) and s[0] == "slice" and s[3] is None:
            return n.src[0], s[1], s[2]
    return None


def _strip_neg(n: Node) -> Node:
    if n.op is Op.MUL and len(n.src) == 2 and n.src[0].op is Op.CONST and n.src[0].arg == -1.0:
        return n.src[1]
    return n


def _looks_like_rotate_half(n: Node) -> Node | None:
    """cat of two last-dim slices of one x, one of them negated: the x, else None."""
    if n.op is not Op.CAT or n.arg != -1 or len(n.src) != 2:
        return None
    if sum(_strip_neg(s) is not s for s in n.src) != 1:
        return None
    parts = [_slice_of(_strip_neg(s)) for s in n.src]
    if None in parts or parts[0][0] is not parts[1][0]:
        return None
    return parts[0][0]


# -- cos/sin provenance ---------------------------------------------------------------------------

_VIEWS = (Op.INDEX, Op.RESHAPE, Op.EXPAND, Op.TRANSPOSE)


def _trig_source(low, n: Node) -> tuple[list, str | None, Any]:
    """Follow views, scalings and position gathers down to a cos()/sin() call.

    Returns (steps, "cos" | "sin" | None, the angle node or the leaf reached)."""
    steps: list = []
    for _ in range(64):
        if n.op in _VIEWS:
            steps.append((n.op.name, n.arg))
            n = n.src[0]
            continue
        if n.op is Op.MUL and len(n.src) == 2 and n.src[0].op is Op.CONST:
            steps.append(("scale", n.src[0].arg))
            n = n.src[1]
            continue
        if n.op is Op.INPUT:
            f = low.fx_node(n)
            if f is not None and f.op in ("call_function", "call_method"):
                name = op_name(f)
                if name in ("cos", "sin") and f.args and isinstance(f.args[0], fx.Node):
                    return steps, name, low.of.get(f.args[0])
                if name == "getitem" and len(f.args) == 2 and isinstance(f.args[0], fx.Node) \
                        and f.args[0] in low.of:
                    idx = f.args[1]
                    key = tuple(id(low.of.get(i)) if isinstance(i, fx.Node) else repr(i)
                                for i in (idx if isinstance(idx, tuple) else (idx,)))
                    steps.append(("gather", key))
                    n = low.of[f.args[0]]
                    continue
        break
    return steps, None, n


def _check_cos_sin(low, c: Node, s: Node) -> str:
    if c is s:
        return "cos and sin are the same tensor (x*cos + rotate_half(x)*cos is not a rotation)"
    cs, ck, ca = _trig_source(low, c)
    ss, sk, sa = _trig_source(low, s)
    if ck == "sin" or sk == "cos":
        return f"the factor of x is {ck or '?'}(...) and the factor of rotate_half(x) is {sk or '?'}(...): cos and sin are swapped"
    if (ck is None) != (sk is None):
        return ("cos is cos(angles) but sin is not traced to sin(...) of the same angles" if ck
                else "sin is sin(angles) but cos is not traced to cos(...) of the same angles")
    if ck is not None and ca is not sa:
        return f"cos and sin are taken of different angles ({describe(ca)} vs {describe(sa)})"
    if ck is None and ca is not sa:
        # neither traced to a trig call: accept only cos/sin that come from the same place
        same_shape = [st[0] for st in cs] == [st[0] for st in ss]
        if not same_shape or any(a != b for a, b in zip(cs, ss) if a[0] == "gather"):
            return "cos and sin are gathered/viewed differently (e.g. at different position ids)"
        return ""
    if cs != ss:
        diff = next((f"{a} vs {b}" for a, b in zip(cs, ss) if a != b), f"{len(cs)} vs {len(ss)} steps")
        return f"cos and sin reach their angles through different steps ({diff}), e.g. different position ids"
    return ""


# -- the pass ---------------------------------------------------------------------------------------

def _layout(x_shape: tuple, c_shape: tuple, r: int) -> tuple[str, str]:
    """('BHSD' | 'BSHD', reason) for q [B, A, C, D] and cos broadcastable to it."""
    if len(x_shape) != 4:
        return "", f"rotated tensor has {len(x_shape)} dims, not [B, H, S, D]"
    if len(c_shape) > 4:
        return "", f"cos/sin have {len(c_shape)} dims"
    c4 = (1,) * (4 - len(c_shape)) + tuple(c_shape)
    if c4[-1] != r:
        return "", f"cos/sin last dim {c4[-1]} is not the rotary width {r}"
    if c4[0] not in (1, x_shape[0]):
        return "", f"cos/sin batch {c4[0]} does not broadcast to {x_shape[0]}"
    if c4[1] == 1 and c4[2] in (1, x_shape[2]):
        return "BHSD", ""
    if c4[2] == 1 and c4[1] == x_shape[1]:
        return "BSHD", ""
    return "", f"cos/sin of shape {c4} vary along both middle dims of {tuple(x_shape)}"


class _Cand:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def fuse_rope(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm = clone(gm)
    low = lower_graph(gm.graph)
    nodes = {id(c): c for c in low.of.values()}
    parents: dict[int, list[Node]] = {}
    for n in toposort(list(nodes.values())):
        for s in n.src:
            parents.setdefault(id(s), []).append(n)
    fx_names = lambda ns: [f.name for f in ns]  # noqa: E731

    cands: list[_Cand] = []
    seen_roots: set[int] = set()

    def reject(anchor_fx: list[fx.Node], why: str):
        ctx.new_region("rope", False, fx_names(anchor_fx[:1]), anchor_fx[0].name if anchor_fx else "?", reason=why)

    # rotate-half form --------------------------------------------------------------------------
    for r_node in list(nodes.values()):
        x = _looks_like_rotate_half(r_node)
        if x is None:
            continue
        anchor_fx = aliases(low, r_node)
        if not anchor_fx:
            continue
        adds = [p for m in parents.get(id(r_node), []) if m.op is Op.MUL
                for p in parents.get(id(m), []) if p.op is Op.ADD]
        if not adds:
            reject(anchor_fx, "rotate_half(x) is not combined as x*cos + rotate_half(x)*sin")
            continue
        if x.shape is None or not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
            reject(anchor_fx, "the rotated width is unknown or odd")
            continue
        width = x.shape[-1]
        reason = ""
        for add in adds:
            m = match(_half_pattern(width // 2), add)
            if not m.ok:
                reason = reason or m.reason
                continue
            if m.bindings["x"] is not x:
                reason = reason or "x*cos and rotate_half(x) rotate different tensors"
                continue
            break
        else:
            reject(anchor_fx, f"rotate_half(x) is not part of x*cos + rotate_half(x)*sin: {reason}")
            continue
        if id(add) in seen_roots:
            continue
        b = m.bindings
        c, s = b["cos"], b["sin"]
        why = _check_cos_sin(low, c, s)
        # partial rotary: cat([rope(x[..., :R]), x[..., R:]], -1) over the full x
        root, full, extra = add, x, []
        sl = _slice_of(x)
        if sl is not None and sl[1] is None and isinstance(sl[2], int):
            for p in parents.get(id(add), []):
                if p.op is Op.CAT and p.arg == -1 and len(p.src) == 2 and p.src[0] is add:
                    tail = _slice_of(p.src[1])
                    if tail is not None and tail[0] is sl[0] and tail[1] == sl[2] and tail[2] is None:
                        root, full = p, sl[0]
                        extra = [p.src[1], x]
                        break
        if not why:
            if full.shape is None or c.shape is None or s.shape is None or c.shape != s.shape:
                why = f"cos/sin shapes {c.shape} and {s.shape} differ or are unknown"
            else:
                layout, why = _layout(tuple(full.shape), tuple(c.shape), width)
        root_fx = aliases(low, root)
        x_fx, c_fx, s_fx = value_of(low, full), value_of(low, c), value_of(low, s)
        if not why and (x_fx is None or c_fx is None or s_fx is None or not root_fx):
            why = "an input is not a value the graph computes"
        if not why and not tensor_meta(x_fx).is_floating_point():
            why = "rotated tensor is not floating point"
        if why:
            reject(anchor_fx, why)
            continue
        seen_roots.add(id(add))
        region = covered_fx_nodes(low, m.covered, [x, c, s]) + root_fx \
            + [f for e in extra for f in aliases(low, e)]
        cands.append(_Cand(root_fx=root_fx, x_fx=x_fx, cos=("fx", c_fx), sin=("fx", s_fx), key=("half", id(c), id(s)),
                           rotary=width, head=full.shape[-1], layout=layout, interleaved=False,
                           region=region, anchor=anchor_fx[0].name,
                           dead=aliases(low, c) + aliases(low, s) + aliases(low, full)))  # unused copies die

    # interleaved (complex) form ----------------------------------------------------------------
    pat = _interleaved_pattern()
    for f in gm.graph.nodes:
        if f.op != "call_function" or op_name(f) != "view_as_real" or f not in low.of:
            continue
        cat = low.of[f]
        if cat.op is Op.REAL:
            reject([f], "view_as_real of something other than view_as_complex(x.reshape(..., -1, 2)) * freqs_cis")
            continue
        m = match(pat, cat)
        if not m.ok:
            reject([f], f"complex product is not a rotation: {m.reason}")
            continue
        roots = [p for p in parents.get(id(cat), []) if p.op is Op.RESHAPE]
        # the real form is symmetric in the two complex factors: the rotated one is the
        # [..., D/2, 2] view of a tensor that the result is flattened back to the shape of
        why = ""
        for a, y in ((m.bindings["a"], m.bindings["y"]), (m.bindings["y"], m.bindings["a"])):
            why = ""
            if a.op is not Op.RESHAPE or a.shape is None or a.src[0].shape is None:
                why = f"rotated pairs are not a [..., D/2, 2] view of a tensor (found {describe(a)})"
                continue
            x = a.src[0]
            if tuple(a.shape) != tuple(x.shape[:-1]) + (a.shape[-2], 2) or not isinstance(x.shape[-1], int):
                why = f"rotated pairs {a.shape} are not the last dim of {x.shape} split in two"
                continue
            root = next((r for r in roots if r.shape is not None and tuple(r.shape) == tuple(x.shape)), None)
            if root is None:
                why = "the rotated pairs are not flattened back to the input's shape"
                continue
            if y.shape is None or y.shape[-1] != 2:
                why = f"cos/sin pairs of shape {y.shape}"
                continue
            layout, why = _layout(tuple(x.shape), tuple(y.shape[:-1]), x.shape[-1] // 2)
            if not why:
                break
        if why:
            reject([f], why)
            continue
        if id(root) in seen_roots:
            continue
        if y.op is Op.REAL and value_of(low, y.src[0]) is not None:
            pair = ("view_as_real", value_of(low, y.src[0]))
        else:
            pair = ("fx", value_of(low, y))
        root_fx = aliases(low, root)
        x_fx = value_of(low, x)
        if pair[1] is None or x_fx is None or not root_fx:
            reject([f], "an input is not a value the graph computes")
            continue
        seen_roots.add(id(root))
        region = covered_fx_nodes(low, m.covered, [a, y]) + root_fx + aliases(low, cat) + aliases(low, a) \
            + [g for g in gm.graph.nodes if g.op == "call_function" and op_name(g) == "view_as_complex"
               and g.args and g.args[0] in low.of and low.of[g.args[0]] is a]
        region += [u for g in region for u in g.users if op_name(u) == "mul" and u in low.of
                   and low.of[u].op is Op.CMUL]
        cands.append(_Cand(root_fx=root_fx, x_fx=x_fx, cos=("pair0", pair), sin=("pair1", pair),
                           key=("interleaved", id(y)), rotary=x.shape[-1], head=x.shape[-1], layout=layout,
                           interleaved=True, region=region, anchor=f.name,
                           dead=aliases(low, x)))  # the fp32 upcasts of x die with it

    # pair q and k rotated with the same cos/sin, in graph order -------------------------------
    order = graph_order(gm)
    cands.sort(key=lambda c: order[c.root_fx[0]])
    used: set[int] = set()
    for i, a in enumerate(cands):
        if i in used:
            continue
        used.add(i)
        partner = None
        for j in range(i + 1, len(cands)):
            bj = cands[j]
            if j in used or bj.key != a.key or bj.layout != a.layout:
                continue
            if _insertion_point(gm, [a, bj]) is not None:
                partner = j
            break
        group = [a] if partner is None else [a, cands[partner]]
        if partner is not None:
            used.add(partner)
        _rewrite(gm, group)
        region_names = list(dict.fromkeys(n.name for c in group for n in c.region))
        ctx.new_region("rope", True, region_names, a.anchor,
                       bindings={"form": "interleaved" if a.interleaved else "rotate_half",
                                 "rotary_dim": a.rotary, "head_dim": a.head, "layout": a.layout,
                                 "q_and_k": len(group) == 2})
        erase_dead(gm, list(dict.fromkeys(n for c in group for n in c.region + c.dead)))
    return finish(gm)


def _cos_sin_node(gm: fx.GraphModule, spec, cache: dict) -> fx.Node:
    kind, what = spec
    if kind == "fx":
        return what
    src_kind, src = what
    key = (src_kind, src)
    if key not in cache:
        cache[key] = emit(gm, "call_function", torch.view_as_real, (src,)) if src_kind == "view_as_real" else src
    return emit(gm, "call_function", operator.getitem, (cache[key], (Ellipsis, 0 if kind == "pair0" else 1)))


def _to4d(gm: fx.GraphModule, n: fx.Node, transpose: bool) -> fx.Node:
    t = tensor_meta(n)
    nd = t.dim() if t is not None else 4
    for _ in range(4 - nd):
        n = emit(gm, "call_method", "unsqueeze", (n, 0))
    if transpose:
        n = emit(gm, "call_method", "transpose", (n, 1, 2))
    return n


def _inputs(c: _Cand) -> list[fx.Node]:
    out = [c.x_fx]
    for spec in (c.cos, c.sin):
        out.append(spec[1] if spec[0] == "fx" else spec[1][1])
    return out


def _insertion_point(gm: fx.GraphModule, group: list[_Cand]) -> fx.Node | None:
    """The node to insert the fused call before: right after its last input, if that is
    before every use of every rotation it replaces (else None)."""
    order = graph_order(gm)
    last = max((n for c in group for n in _inputs(c)), key=order.__getitem__)
    at = last.next
    while at.op == "placeholder":
        at = at.next
    pos = order[at]
    if all(order[u] >= pos for c in group for r in c.root_fx for u in r.users):
        return at
    return None


def _rewrite(gm: fx.GraphModule, group: list[_Cand]) -> None:
    at = _insertion_point(gm, group)
    if at is None:  # a lone rotation is always placeable right before itself
        order = graph_order(gm)
        at = min(group[0].root_fx, key=order.__getitem__)
    tr = group[0].layout == "BSHD"
    cache: dict = {}
    with gm.graph.inserting_before(at):
        cos = _to4d(gm, _cos_sin_node(gm, group[0].cos, cache), tr)
        sin = _to4d(gm, _cos_sin_node(gm, group[0].sin, cache), tr)
        xs = []
        for c in group:
            x = c.x_fx
            xt, rt = tensor_meta(x), tensor_meta(min(c.root_fx, key=graph_order(gm).__getitem__))
            if xt is not None and rt is not None and rt.dtype != xt.dtype and rt.dtype.is_floating_point:
                x = emit(gm, "call_method", "to", (x, rt.dtype))  # compute in the dtype eager computed in
            xs.append(emit(gm, "call_method", "transpose", (x, 1, 2)) if tr else x)
        if len(xs) == 1:  # a lone rotation: k is an empty slice of q
            xs.append(emit(gm, "call_function", operator.getitem, (xs[0], (slice(None), slice(0, 0)))))
        call = emit(gm, "call_function", rope, (xs[0], xs[1], cos, sin), {"interleaved": group[0].interleaved})
        outs = []
        for i, c in enumerate(group):
            o = emit(gm, "call_function", operator.getitem, (call, i))
            outs.append(emit(gm, "call_method", "transpose", (o, 1, 2)) if tr else o)
    for c, o in zip(group, outs):
        replace_value(gm, c.root_fx, o)
