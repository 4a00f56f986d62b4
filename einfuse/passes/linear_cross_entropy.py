"""Logit-free loss: lm_head linear + cross-entropy, replaced by `einfuse::linear_cross_entropy`.

Anchors are the loss calls: ``F.cross_entropy(logits, labels)`` and
``F.nll_loss(log_softmax(logits, -1), labels)`` (``nn.CrossEntropyLoss``
inlines to the former). The logits operand is read in canonical form, so the
``logits.float()`` upcast and ``contiguous`` copies disappear, and peeled down
to the projection that makes it:

* reshapes that keep the class dim (``view(-1, V)``: token order is kept),
* row slices on the token dims (the older ``logits[..., :-1, :]`` shift),
* an optional final soft-capping ``c * tanh(x / c)`` (Gemma 2),
* the ``linear(hidden, W[, b])`` itself (tied or untied weight).

The same row slices are applied to the hidden states (a linear acts row by
row), and the op gets the hidden rows, W, b and the loss's own labels (already
shifted by the graph: Hugging Face pads with -100 and takes ``[..., 1:]``), with
its ignore_index and reduction ("mean" or "sum"). A z-loss added to the mean
loss as ``z * (logsumexp(logits, -1)**2 * mask).sum() / mask.sum()`` (or the
unnormalised sum with reduction="sum"), mask = labels != ignore_index, is
folded into the op's ``z_loss``.

Logits contract: after fusion the [N, V] logits are not computed. Where the
logits are also a graph output (Hugging Face returns them) that output is
replaced by an empty tensor (``hidden.new_empty(0)``) -- the one change to a
graph's outputs any einfuse pass makes -- unless ``config.return_logits`` is
set: then the op also returns them. Where the logits have other users, the op
returns them too (or, when the loss used a row slice of them, the original
projection is kept for those users). Without labels there is no loss and
nothing to fuse.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from einfuse.ir.lower import lower_graph, op_name
from einfuse.ir.match import describe
from einfuse.ir.node import Node, Op
from einfuse.runtime.ops.linear_cross_entropy import linear_cross_entropy
from .base import PassContext, clone, erase_dead, finish, tensor_meta, value_of
from .rope import aliases, emit, replace_value

_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
_NLL_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")
_DEFAULTS = {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
             "reduction": "mean", "label_smoothing": 0.0}


def _call_args(f: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    out = dict(_DEFAULTS)
    out.update(zip(names, f.args))
    out.update(f.kwargs)
    return out


def _index_items(arg) -> list | None:
    if isinstance(arg, tuple) and arg and isinstance(arg[0], str) and arg[0] != "...":
        return [arg] if arg[0] == "slice" else None
    return list(arg) if isinstance(arg, tuple) else [arg]


_FULL = ("slice", None, None, None)


def _row_index(n: Node) -> tuple | None:
    """The python index of an INDEX node that slices token dims only (class dim untouched)."""
    items = _index_items(n.arg)
    if items is None or n.src[0].shape is None:
        return None
    if any(not (i == "..." or (isinstance(i, tuple) and i[0] == "slice")) for i in items):
        return None
    nd = len(n.src[0].shape)
    explicit = [i for i in items if i != "..."]
    if len(explicit) > nd or items.count("...") > 1:
        return None
    touches_last = (items[-1] != "..." and ("..." in items or len(explicit) == nd))
    if touches_last and items[-1] != _FULL:
        return None
    return tuple(Ellipsis if i == "..." else slice(i[1], i[2], i[3]) for i in items)


def _softcap(n: Node) -> tuple[float, Node] | None:
    """c * tanh(x * (1/c)) -> (c, x)."""
    if n.op is not Op.MUL or len(n.src) != 2:
        return None
    for c, t in (n.src, n.src[::-1]):
        if c.op is Op.CONST and c.arg and t.op is Op.TANH:
            inner = t.src[0]
            if inner.op is Op.MUL and len(inner.src) == 2:
                for r, x in (inner.src, inner.src[::-1]):
                    if r.op is Op.CONST and r.arg and abs(r.arg * c.arg - 1.0) < 1e-6:
                        return float(c.arg), x
    return None


def _peel(logits: Node) -> tuple[list, float, Node | None, str]:
    """logits -> (steps outer-to-inner, softcap, the LINEAR node, why not)."""
    v = logits.shape[-1] if logits.shape else None
    steps: list = []
    cap = 0.0
    n = logits
    for _ in range(64):
        if n.op is Op.LINEAR:
            return steps, cap, n, ""
        if n.op is Op.RESHAPE:
            if n.shape is None or n.src[0].shape is None or n.shape[-1] != v or n.src[0].shape[-1] != v:
                return steps, cap, None, "a reshape of the logits mixes the class dim with token dims"
            steps.append(("reshape", n))
            n = n.src[0]
            continue
        if n.op is Op.INDEX:
            idx = _row_index(n)
            if idx is None:
                return steps, cap, None, f"the logits are indexed along the class dim or by tensors ({n.arg})"
            steps.append(("index", n, idx))
            n = n.src[0]
            continue
        sc = _softcap(n)
        if sc is not None and not cap:
            tanh = next(t for t in n.src if t.op is Op.TANH)
            steps.append(("softcap", n, tanh, tanh.src[0]))
            cap, n = sc
            continue
        if n.op is Op.INPUT and str(n.arg).startswith("l_"):
            return steps, cap, None, (f"the logits are an input of this graph ({n.arg}): a graph break "
                                      "separates the loss from the projection")
        return steps, cap, None, f"the logits are not a linear projection (found {describe(n)})"
    return steps, cap, None, "logits chain too long"


def _linear_args(f: fx.Node):
    x = f.args[0] if f.args else f.kwargs.get("input")
    w = f.args[1] if len(f.args) > 1 else f.kwargs.get("weight")
    b = f.args[2] if len(f.args) > 2 else f.kwargs.get("bias")
    return x, w, b


# -- z-loss: ce + z * (lse**2 * mask).sum() / mask.sum() -----------------------------------------------

def _binop(f: Any, name: str) -> tuple[Any, Any] | None:
    if isinstance(f, fx.Node) and f.op in ("call_function", "call_method") and op_name(f) == name and len(f.args) == 2:
        return f.args[0], f.args[1]
    return None


def _full_sum(f: Any) -> fx.Node | None:
    if isinstance(f, fx.Node) and f.op in ("call_function", "call_method") and op_name(f) == "sum" \
            and len(f.args) == 1 and not f.kwargs:
        return f.args[0]
    return None


def _strip_casts(f: Any) -> Any:
    while isinstance(f, fx.Node) and f.op == "call_method" and f.target in ("float", "to", "type_as", "contiguous") \
            and f.args and isinstance(f.args[0], fx.Node):
        f = f.args[0]
    return f


def _factors(f: Any, num: list, den: list, nodes: list, depth: int = 0) -> None:
    """Split a mul/div tree into numerator and denominator factors."""
    for name, flip in (("mul", False), ("div", True)):
        ab = _binop(f, name) if depth < 8 else None
        if ab is not None:
            nodes.append(f)
            _factors(ab[0], num, den, nodes, depth + 1)
            _factors(ab[1], den if flip else num, num if flip else den, nodes, depth + 1)
            return
    num.append(f)


def _z_term(low, z: Any, ce_input: fx.Node, target: fx.Node, ignore_index: int, reduction: str):
    """z * <mean or sum of lse^2 over valid rows> -> (z, FX nodes of the term), else None."""
    num: list = []
    den: list = []
    nodes: list = []
    _factors(z, num, den, nodes)
    coef = 1.0
    for c in [c for c in num if isinstance(c, (int, float)) and not isinstance(c, bool)]:
        coef *= c
        num.remove(c)
    for c in [c for c in den if isinstance(c, (int, float)) and not isinstance(c, bool)]:
        coef /= c
        den.remove(c)
    if len(num) != 1 or len(den) != (1 if reduction == "mean" else 0) or not nodes:
        return None
    s = num[0]
    mask_b = None
    if den:
        mask_b = _full_sum(den[0])
        if mask_b is None:
            return None
        nodes.append(den[0])
    q = _full_sum(s)
    pm = _binop(q, "mul")
    if pm is None:
        return None
    nodes += [s, q]
    for p, mask in (pm, pm[::-1]):
        if not isinstance(p, fx.Node) or not isinstance(mask, fx.Node) or p not in low.of:
            continue
        sq = low.of[p]
        if not (sq.op is Op.MUL and len(sq.src) == 2 and sq.src[0] is sq.src[1]):
            continue
        lse = _strip_casts(low.fx_node(sq.src[0]))
        if not (isinstance(lse, fx.Node) and op_name(lse) == "logsumexp" and lse.args
                and low.of.get(lse.args[0]) is low.of.get(ce_input)
                and (lse.args[1:2] or [lse.kwargs.get("dim")])[0] in (-1, 1, [-1], (-1,), [1], (1,))):
            continue
        ne = _strip_casts(mask)
        cmp = _binop(ne, "ne")
        if cmp is None or cmp[1] != ignore_index or low.of.get(cmp[0]) is not low.of.get(target):
            continue
        if mask_b is not None and low.of.get(mask_b) is not low.of.get(mask):
            continue
        return float(coef), nodes + [p, lse, mask, ne]
    return None


def fuse_linear_cross_entropy(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm = clone(gm)
    low = lower_graph(gm.graph)
    return_logits = bool(getattr(ctx.config, "return_logits", False))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for f in list(gm.graph.nodes):
        if f.op != "call_function" or op_name(f) not in ("cross_entropy", "nll_loss") or f.graph is not gm.graph:
            continue
        kind = op_name(f)

        def reject(why: str):
            ctx.new_region("linear_cross_entropy", False, [f.name], f.name, reason=why)

        a = _call_args(f, _CE_ARGS if kind == "cross_entropy" else _NLL_ARGS)
        inp, target = a["input"], a["target"]
        if not isinstance(inp, fx.Node) or not isinstance(target, fx.Node) or inp not in low.of:
            reject("loss input or target is not a tensor the graph computes")
            continue
        why = ""
        if a["weight"] is not None:
            why = "class weights are not supported"
        elif a["size_average"] is not None or a["reduce"] is not None:
            why = "legacy size_average/reduce arguments"
        elif a.get("label_smoothing", 0.0) not in (0, 0.0):
            why = f"label_smoothing={a['label_smoothing']} is not supported"
        elif a["reduction"] not in ("mean", "sum"):
            why = f"reduction={a['reduction']!r}: per-token losses are not fused (only 'mean' and 'sum')"
        elif not isinstance(a["ignore_index"], int):
            why = "ignore_index is not a constant"
        if why:
            reject(why)
            continue
        logits = low.of[inp]
        if kind == "nll_loss":
            if logits.op is not Op.LOG_SOFTMAX or logits.arg != -1:
                reject(f"nll_loss input is not log_softmax(logits, -1) (found {describe(logits)})")
                continue
            logits = logits.src[0]
        if logits.shape is None or len(logits.shape) != 2:
            reject(f"loss input of shape {logits.shape} is not [tokens, classes]")
            continue
        steps, cap, lin, why = _peel(logits)
        lin_fx = value_of(low, lin) if lin is not None else None
        if not why and lin_fx is None:
            why = "the projection is not a value the graph computes"
        elif not why and op_name(lin_fx) != "linear":
            why = f"the projection is a {op_name(lin_fx)}, not a plain linear"
        if not why:
            hidden, weight, bias = _linear_args(lin_fx)
            ht, wt, yt = tensor_meta(hidden), tensor_meta(weight), tensor_meta(target)
            bt = tensor_meta(bias) if bias is not None else None
            if ht is None or wt is None or yt is None or (bias is not None and bt is None):
                why = "operand shapes unknown"
            elif wt.dim() != 2 or ht.shape[-1] != wt.shape[1]:
                why = f"projection weight of shape {tuple(wt.shape)} is not [V, H]"
            elif ht.dtype != wt.dtype or (bt is not None and bt.dtype != ht.dtype):
                why = "hidden, weight and bias dtypes differ"
            elif yt.dtype not in (torch.int64, torch.int32) or yt.dim() != 1:
                why = f"labels of shape {tuple(yt.shape)} and dtype {yt.dtype} are not [tokens] integers"
        if why:
            reject(why)
            continue

        # z-loss folded in when the loss is ce + z * (...)
        z, z_nodes, root = 0.0, [], f
        users = list(f.users)
        if len(users) == 1 and _binop(users[0], "add") is not None:
            add = users[0]
            other = add.args[1] if add.args[0] is f else add.args[0]
            zt = _z_term(low, other, inp, target, a["ignore_index"], a["reduction"])
            if zt is not None:
                z, z_nodes = zt
                root = add

        # the hidden rows the loss reads: the loss's row slices (and the reshapes before them) replayed
        row_sliced = any(s_[0] == "index" for s_ in steps)
        h_steps: list = []
        if row_sliced:
            for s_ in reversed(steps):
                if s_[0] == "index":
                    h_steps.append(("index", s_[2]))
                elif s_[0] == "reshape":
                    shape = tuple(s_[1].shape)
                    if all(isinstance(d, int) for d in shape):
                        h_steps.append(("reshape", shape[:-1] + (ht.shape[-1],)))
                    elif len(shape) == 2:
                        h_steps.append(("reshape", (-1, ht.shape[-1])))
                    else:
                        why = "a dynamic reshape of the logits before their row slice"
        if why:
            reject(why)
            continue

        # the FX nodes of the logits chain: the projection, its casts, the cap and the views
        chain_canon = [lin] + [c for s_ in steps for c in s_[1:2 + (2 if s_[0] == "softcap" else 0)]
                               if isinstance(c, Node)]
        chain_fx = list(dict.fromkeys(x for c in chain_canon for x in aliases(low, c)))
        final = next((s_[1] for s_ in steps if s_[0] == "softcap"), lin)  # what the op can return
        region_set = set(chain_fx) | {f, root} | set(z_nodes)
        outside = {x: [u for u in x.users if u not in region_set] for x in chain_fx}
        plan: dict[fx.Node, str] = {}
        for x, us in outside.items():
            if not us:
                continue
            if all(u is out_node for u in us) and not return_logits:
                plan[x] = "empty"
            elif not row_sliced and low.of.get(x) is final:
                plan[x] = "returned"
            else:
                plan[x] = "kept"
        ret = "returned" in plan.values()

        with gm.graph.inserting_before(root):
            h = hidden
            for kind_, arg in h_steps:
                h = emit(gm, "call_function", operator.getitem, (h, arg)) if kind_ == "index" \
                    else emit(gm, "call_method", "reshape", (h, arg))
            kwargs = {"ignore_index": int(a["ignore_index"]), "reduction": a["reduction"], "z_loss": z,
                      "softcap": cap, "return_logits": ret}
            call = emit(gm, "call_function", linear_cross_entropy, (h, weight, target, bias), kwargs)
            loss = emit(gm, "call_function", operator.getitem, (call, 0)) if ret else call
            new_logits = emit(gm, "call_function", operator.getitem, (call, 1)) if ret else None
        replace_value(gm, [root], loss)
        empty = None
        for x, what in plan.items():
            if what == "returned":
                repl = new_logits
                xt, nt = tensor_meta(x), tensor_meta(new_logits)
                if xt is not None and nt is not None and xt.dtype != nt.dtype:
                    with gm.graph.inserting_after(new_logits):
                        repl = emit(gm, "call_method", "to", (new_logits, xt.dtype))
                for u in outside[x]:
                    u.replace_input_with(x, repl)
            elif what == "empty":
                if empty is None:
                    with gm.graph.inserting_before(out_node):
                        empty = emit(gm, "call_method", "new_empty", (hidden, (0,)))
                out_node.replace_input_with(x, empty)
        region = list(dict.fromkeys([f] + z_nodes + [root] + chain_fx))
        ctx.new_region("linear_cross_entropy", True, [n.name for n in region], f.name,
                       bindings={"loss": kind, "reduction": a["reduction"], "ignore_index": int(a["ignore_index"]),
                                 "softcap": cap, "z_loss": z, "bias": bias is not None,
                                 "vocab": tuple(wt.shape)[0], "row_slice": row_sliced,
                                 "logits": ("returned" if ret else "kept for other users" if "kept" in plan.values()
                                            else "empty output" if plan else "not computed")})
        erase_dead(gm, region)
    return finish(gm)
