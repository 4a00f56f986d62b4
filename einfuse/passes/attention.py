"""Softmax attention: recognised by what it computes, replaced by `einfuse::attention`.

Two sources of attention in a captured graph:

* **Spelled out** (eager attention): anchored at SOFTMAX nodes of the canonical DAG (a
  spelled-out exp/max/sum softmax is already SOFTMAX). From the anchor we walk back through
  optional masks -- additive terms (HF's 4-D float mask) and `masked_fill`/`where` with -inf
  or a dtype's minimum (a boolean mask; masked_fill's True means *masked*, where's True
  means *kept*) -- then an optional soft-cap `c * tanh(s * (1/c))`, then the scale (a
  constant factor; `/ sqrt(d)` is canonically `* (1/sqrt(d))`; a constant factor on q is
  folded in too), to `MATMUL(Q, TRANSPOSE(K, (-2, -1)))`. Forward, the probabilities (dropout
  with p = 0 or in eval is gone after canonicalisation) must feed exactly one `MATMUL(P, V)`.
* **`F.scaled_dot_product_attention`** calls (`torch._C._nn.scaled_dot_product_attention`):
  their arguments are read directly; the op is called with `sdpa_masked_rows=True` so fully
  masked rows behave as SDPA's do.

Head repetition for GQA/MQA -- HF's `repeat_kv` (`x[:, :, None].expand(...).reshape(...)`),
`repeat_interleave(n, dim=1)` and a broadcast `expand` of a single kv head -- is folded: the
un-repeated K and V are bound, and the op shares each kv head among its query heads.

Checks before rewriting (each failure is recorded in `report.unfused` with its reason):
softmax over the key axis (-1 of q @ k^T); a mask whose broadcast does not enlarge the scores
and whose last axis is the key axis (a mask with a size-1 last axis broadcasts along the keys:
it masks queries, which is almost always a layout bug); the probabilities have no other user;
dropout p > 0 in training (eager, or SDPA's dropout_p) is left alone, since the fused op has no
dropout; 2-D to 4-D operands only; SDPA's `is_causal` only where top-left and bottom-right
alignment agree (S == T).

Each fused region records the derivation of its cascade (`einfuse.ir.attention_cascades`):
the 3-pass cascade built from the bindings, the 2-pass and 1-pass cascades derived from it by
rewrites on the IR, and their pass counts.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from einfuse.ir.attention_cascades import derive, passes_per_rank
from einfuse.ir.lower import lower_graph, op_name
from einfuse.ir.match import describe
from einfuse.ir.node import Node, Op
from einfuse.runtime.ops.attention import attention
from .base import PassContext, clone, erase_dead, finish, tensor_meta

NEG_INF = float("-inf")
_INVERTS = {"invert", "bitwise_not", "logical_not"}


class _Reject(Exception):
    pass


@dataclass
class _Region:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    root: fx.Node                    # the FX node whose value the fused op replaces
    anchor: fx.Node
    nd: int
    scale: float
    group: int = 1
    softcap: float = 0.0
    is_causal: bool = False
    sdpa: bool = False
    adds: list[fx.Node] = field(default_factory=list)   # additive mask terms
    cond: Optional[fx.Node] = None   # boolean mask
    cond_masks: bool = False         # True: cond marks masked positions (masked_fill)
    fill: float = NEG_INF
    mask_dtype: Optional[torch.dtype] = None
    covered: list[fx.Node] = field(default_factory=list)

    @property
    def mask_kind(self) -> Optional[str]:
        """What the region masks with, as the cascade spells it."""
        if self.adds:
            return "additive"          # (a boolean mask next to it is folded into the sum)
        if self.cond is not None:
            return "bool"
        return "causal" if self.is_causal else None


# ---------------------------------------------------------------------------------------
# helpers the rewritten graph calls

def combine_masks(adds: list[torch.Tensor], cond: Optional[torch.Tensor], cond_masks: bool, fill: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """One mask for the fused op from the region's masks.

    Additive terms are summed; a boolean mask becomes `fill` where masked. For a finite fill
    (a dtype's minimum) this is additive -- s + finfo.min == finfo.min in floating point --
    which keeps eager's uniform weights on fully masked rows.
    """
    out: Optional[torch.Tensor] = None
    for a in adds:
        out = a if out is None else out + a
    if cond is not None:
        masked = cond if cond_masks else ~cond
        if out is None and fill == NEG_INF:
            return ~masked
        base = torch.zeros((), dtype=dtype, device=cond.device) if out is None else out.to(dtype)
        out = base.masked_fill(masked, fill)
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------
# the pass

def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm = clone(gm)
    low = lower_graph(gm.graph)
    st = _State(gm, low)
    for f in list(gm.graph.nodes):
        if f.op == "call_function" and op_name(f) == "scaled_dot_product_attention" and not f._erased:
            st.run(ctx, f, lambda f=f: st.match_sdpa(f))
    anchors: dict[int, Node] = {}
    for f, c in low.of.items():
        if c.op is Op.SOFTMAX:
            anchors.setdefault(id(c), c)
    for s in anchors.values():
        f = low.fx_node(s)
        if f is not None and not f._erased:
            st.run(ctx, f, lambda s=s: st.match_softmax(s))
    return finish(gm)


class _State:
    def __init__(self, gm: fx.GraphModule, low):
        self.gm, self.low = gm, low
        self.fx_of: dict[int, list[fx.Node]] = {}
        for f, c in low.of.items():
            self.fx_of.setdefault(id(c), []).append(f)
        self.extra: dict[fx.Node, Node] = {}  # inserted FX nodes -> canonical value they replaced

    # -- canonical <-> FX ----------------------------------------------------------------
    def canon(self, f: Any) -> Optional[Node]:
        if not isinstance(f, fx.Node):
            return None
        return self.low.of.get(f) or self.extra.get(f)

    def fx_nodes(self, n: Node) -> list[fx.Node]:
        return [f for f in self.fx_of.get(id(n), []) if not f._erased]

    def arg_fx(self, parent: Node, child: Node) -> fx.Node:
        """The FX node that a node computing `parent` actually reads as `child` (keeps its dtype)."""
        for fp in self.fx_nodes(parent):
            for a in fp.all_input_nodes:
                if self.canon(a) is child:
                    return a
        fs = self.fx_nodes(child)
        if fs:
            return fs[0]
        raise _Reject(f"{describe(child)} is not a value the graph computes")

    # -- one candidate ---------------------------------------------------------------------
    def run(self, ctx: PassContext, anchor: fx.Node, matcher) -> None:
        try:
            r = matcher()
        except _Reject as e:
            ctx.new_region("attention", False, [anchor.name], anchor.name, reason=str(e))
            return
        qt, kt = tensor_meta(r.q), tensor_meta(r.k)
        if r.nd == 4 and isinstance(qt.shape[1], int) and isinstance(kt.shape[1], int):
            r.group = qt.shape[1] // kt.shape[1]  # query heads per kv head, as the op will share them
        bindings, cascades = _describe(r)
        names = [n.name for n in r.covered]
        self.rewrite(r)
        ctx.new_region("attention", True, names, anchor.name, cascades=cascades, bindings=bindings)

    # -- GQA / MQA head repetition ----------------------------------------------------------
    def unrepeat(self, n: Node, f: fx.Node) -> tuple[Node, fx.Node, int, list[Node]]:
        """(base value, its FX node, group size, repeat nodes) for a K or V operand."""
        shape = lambda x: tuple(x.shape) if x.shape is not None else None  # noqa: E731
        if n.op is Op.RESHAPE and n.src[0].op in (Op.EXPAND, Op.INDEX):
            e = n.src[0]
            i = e.src[0] if e.op is Op.EXPAND else e
            if i.op is Op.INDEX and _is_unsqueeze(i.arg):
                x = i.src[0]
                xs, es, rs = shape(x), shape(e), shape(n)
                if xs and len(xs) == 4 and es and rs and shape(i) == xs[:2] + (1,) + xs[2:]:
                    g = es[2] if e.op is Op.EXPAND else 1
                    if (isinstance(g, int) and isinstance(xs[1], int) and es[:2] == xs[:2] and es[3:] == xs[2:]
                            and rs == (xs[0], xs[1] * g) + xs[2:]):
                        return x, self.arg_fx(i, x), g, [n, e, i] if e is not i else [n, i]
        if n.op is Op.EXPAND:
            x = n.src[0]
            xs, ns = shape(x), shape(n)
            if xs and ns and len(xs) == len(ns) == 4 and xs[1] == 1 and xs[0] == ns[0] and xs[2:] == ns[2:] \
                    and isinstance(ns[1], int):
                return x, self.arg_fx(n, x), ns[1], [n]
        if f.op in ("call_function", "call_method") and op_name(f) == "repeat_interleave":
            x_fx = f.args[0]
            reps = f.args[1] if len(f.args) > 1 else f.kwargs.get("repeats")
            dim = f.args[2] if len(f.args) > 2 else f.kwargs.get("dim")
            xt = tensor_meta(x_fx) if isinstance(x_fx, fx.Node) else None
            if xt is not None and xt.dim() == 4 and isinstance(reps, int) and dim in (1, -3) and self.canon(x_fx):
                return self.canon(x_fx), x_fx, reps, [n]
        return n, f, 1, []

    def fold_constant_factor(self, parent: Node, t: Node, covered: list[Node]) -> tuple[float, Node, Node]:
        """c * x as an operand of q @ k^T -> (c, the mul, x) when x is a value the graph has."""
        if t.op is Op.MUL and sum(u.op is not Op.CONST for u in t.src) == 1:
            inner = next(u for u in t.src if u.op is not Op.CONST)
            try:
                self.arg_fx(t, inner)
            except _Reject:
                return 1.0, parent, t
            covered.append(t)
            return math.prod(u.arg for u in t.src if u.op is Op.CONST), t, inner
        return 1.0, parent, t

    def fold_kv(self, r: _Region, k: Node, v: Node, covered: list[Node]) -> None:
        _, kf, gk, kc = self.unrepeat(k, r.k)
        _, vf, gv, vc = self.unrepeat(v, r.v)
        if gk == gv and gk > 1:
            r.k, r.v, r.group = kf, vf, gk
            covered += kc + vc
        elif gk != gv and 1 in (gk, gv):
            pass  # one side repeated, the other not: bind both as given (the op sees equal heads)
        elif gk != gv:
            raise _Reject(f"K and V heads are repeated differently ({gk} vs {gv})")

    # -- eager: softmax anchors -------------------------------------------------------------
    def match_softmax(self, s: Node) -> _Region:
        covered: list[Node] = [s]
        x = s.src[0]
        adds: list[tuple[Node, Node]] = []        # (parent ADD, mask term)
        where: Optional[tuple[Node, Node, bool, float]] = None
        while True:
            if x.op is Op.ADD:
                terms = [t for t in x.src if t.op is not Op.CONST]  # a constant shift: softmax ignores it
                scored = [t for t in terms if _has_matmul(t)]
                if len(scored) != 1:
                    raise _Reject(f"softmax input is a sum of {len(scored)} terms computed by matmuls, "
                                  "expected one q @ k^T")
                adds += [(x, t) for t in terms if t is not scored[0]]
                covered.append(x)
                x = scored[0]
                continue
            if x.op is Op.WHERE:
                cond, a, b = x.src
                if a.op is Op.CONST and _has_matmul(b):
                    fill, score, cond_masks = a.arg, b, True        # masked_fill(mask, v) / where(mask, v, s)
                elif b.op is Op.CONST and _has_matmul(a):
                    fill, score, cond_masks = b.arg, a, False       # where(keep, s, v)
                else:
                    raise _Reject("softmax input is a where() whose branches are not the scores and a constant")
                if not (fill == NEG_INF or fill <= -1e30):
                    raise _Reject(f"masked with {fill:g}: only -inf or a dtype's minimum masks exactly")
                if where is not None:
                    raise _Reject("more than one boolean mask")
                where = (x, cond, cond_masks, fill)
                covered.append(x)
                x = score
                continue
            break
        scores_shape = s.shape
        softcap = 0.0
        if x.op is Op.MUL and len(x.src) == 2 and x.src[0].op is Op.CONST and x.src[1].op is Op.TANH:
            softcap = x.src[0].arg
            if not softcap > 0:
                raise _Reject(f"soft-cap factor {softcap:g} is not positive")
            covered += [x, x.src[1]]
            x = x.src[1].src[0]
        scale = 1.0
        if x.op is Op.MUL:
            consts = [t for t in x.src if t.op is Op.CONST]
            rest = [t for t in x.src if t.op is not Op.CONST]
            if len(rest) != 1:
                what = ", ".join(describe(t) for t in rest)
                raise _Reject(f"the scores are multiplied by a tensor ({what}), not a constant")
            scale = math.prod(t.arg for t in consts)
            covered.append(x)
            x = rest[0]
        if x.op is not Op.MATMUL:
            raise _Reject(f"softmax input is not q @ k^T (found {describe(x)})")
        qk = x
        covered.append(qk)
        if softcap:
            scale *= softcap   # tanh's argument is s * (scale / c)
        q, kt = qk.src
        if kt.op is not Op.TRANSPOSE or kt.arg != (-2, -1):
            raise _Reject(f"the key operand of q @ k^T is {describe(kt)}, not a transpose of the last two dims")
        covered.append(kt)
        k = kt.src[0]
        if s.arg != -1:
            raise _Reject(f"softmax over dim {s.arg}, not the key axis (-1) of q @ k^T")
        # a constant factor on q or k is part of the scale
        q_parent, k_parent = qk, kt
        c, q_parent, q = self.fold_constant_factor(qk, q, covered)
        scale *= c
        c, k_parent, k = self.fold_constant_factor(kt, k, covered)
        scale *= c
        # forward: the probabilities feed exactly one matmul with V
        s_fx = self.fx_nodes(s)
        alias = set(s_fx)
        pv_fx: list[fx.Node] = []
        for f in s_fx:
            for u in f.users:
                if u in alias:
                    continue
                c = self.canon(u)
                if c is not None and c.op is Op.DROPOUT and c.src[0] is s:
                    p, training = c.arg
                    raise _Reject(f"attention dropout p={p:g} in training: the fused op has no dropout")
                if c is not None and c.op is Op.MATMUL and c.src[0] is s:
                    pv_fx.append(u)
                else:
                    raise _Reject(f"the attention probabilities are also used by {u.name}")
        pvs = {id(self.canon(u)): self.canon(u) for u in pv_fx}
        if len(pvs) != 1:
            raise _Reject(f"the attention probabilities feed {len(pvs)} matmuls, expected one P @ V")
        pv = next(iter(pvs.values()))
        covered.append(pv)
        v = pv.src[1]
        # shapes
        q_fx, k_fx, v_fx = self.arg_fx(q_parent, q), self.arg_fx(k_parent, k), self.arg_fx(pv, v)
        qt, kt_ = tensor_meta(q_fx), tensor_meta(k_fx)
        nd = _check_qkv(q_fx, k_fx, v_fx)
        if not _same_shape(scores_shape or (), _ishape(qt)[:-1] + (_idim(kt_.shape[-2]),)):
            raise _Reject(f"the scores {scores_shape} are not [..., S, T] of q {_ishape(qt)} and k {_ishape(kt_)}")
        root = self.fx_nodes(pv)[0]
        r = _Region(q_fx, k_fx, v_fx, root, self.low.fx_node(s) or s_fx[0], nd, float(scale), softcap=float(softcap))
        for parent, term in adds:
            m = self.arg_fx(parent, term)
            _check_mask(m, scores_shape, "additive mask", want_float=True)
            r.adds.append(m)
        bypassed: list[fx.Node] = []
        if where is not None:
            wnode, cond, cond_masks, fill = where
            cf = self.arg_fx(wnode, cond)
            _check_mask(cf, scores_shape, "boolean mask", want_float=False)
            r.cond, r.cond_masks, r.fill = cf, cond_masks, float(fill)
            if cond_masks and op_name(cf) in _INVERTS and cf.op != "placeholder":  # masked_fill(~keep, .)
                inner = cf.args[0]
                it = tensor_meta(inner) if isinstance(inner, fx.Node) else None
                if it is not None and it.dtype == torch.bool:  # (~ on integers is bitwise, not logical)
                    r.cond, r.cond_masks = inner, False
                    bypassed.append(cf)  # ~keep is dead once the masked_fill is gone
        r.mask_dtype = _dtype(r.anchor)
        if nd == 4:
            self.fold_kv(r, k, v, covered)
        r.covered = self._covered_fx(covered, self.bound_ids(r)) + bypassed
        return r

    # -- F.scaled_dot_product_attention ----------------------------------------------------------
    def match_sdpa(self, f: fx.Node) -> _Region:
        a, kw = list(f.args), dict(f.kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        defaults = (None, None, None, None, 0.0, False, None, False)
        arg = {n: (a[i] if i < len(a) else kw.get(n, d)) for i, (n, d) in enumerate(zip(names, defaults))}
        dropout_p = arg["dropout_p"]
        if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
            raise _Reject("SDPA dropout_p is not a constant")
        if dropout_p != 0:
            raise _Reject(f"SDPA with dropout_p={dropout_p:g}: the fused op has no dropout")
        for n in ("is_causal", "enable_gqa"):
            if not isinstance(arg[n], bool):
                raise _Reject(f"SDPA {n} is not a constant")
        q_fx, k_fx, v_fx, mask = arg["query"], arg["key"], arg["value"], arg["attn_mask"]
        qt, kt, vt = (tensor_meta(t) if isinstance(t, fx.Node) else None for t in (q_fx, k_fx, v_fx))
        if qt is None or kt is None or vt is None:
            raise _Reject("SDPA q, k or v has no tensor metadata")
        nd = _check_qkv(q_fx, k_fx, v_fx, gqa=arg["enable_gqa"])
        S, T, D = qt.shape[-2], kt.shape[-2], qt.shape[-1]
        scale = arg["scale"]
        if scale is None:
            if not isinstance(D, int):
                raise _Reject("SDPA head size is dynamic and no scale is given")
            scale = 1.0 / math.sqrt(D)
        if not isinstance(scale, (int, float)):
            raise _Reject("SDPA scale is not a constant")
        is_causal = arg["is_causal"]
        if is_causal and _idim(S) != _idim(T):
            raise _Reject(f"SDPA is_causal with {S} queries and {T} keys: SDPA aligns causal to the top left, "
                          "the fused op to the end of the keys")
        r = _Region(q_fx, k_fx, v_fx, f, f, nd, float(scale), is_causal=is_causal, sdpa=True)
        if isinstance(mask, fx.Node):
            mt = tensor_meta(mask)
            _check_mask(mask, tuple(_ishape(qt)[:-1]) + (_idim(T),), "SDPA attn_mask", want_float=None)
            if mt.dtype == torch.bool:
                r.cond, r.cond_masks = mask, False
            else:
                r.adds.append(mask)
        elif mask is not None:
            raise _Reject("SDPA attn_mask is not a tensor")
        r.mask_dtype = qt.dtype
        covered: list[Node] = []
        k, v = self.canon(k_fx), self.canon(v_fx)
        if nd == 4 and k is not None and v is not None:
            self.fold_kv(r, k, v, covered)
        if not arg["enable_gqa"] and r.group == 1 and nd == 4 and kt.shape[1] != qt.shape[1]:
            raise _Reject(f"SDPA without enable_gqa on {qt.shape[1]} query and {kt.shape[1]} kv heads")
        r.covered = [f] + self._covered_fx(covered, self.bound_ids(r))
        return r

    # -- graph surgery ----------------------------------------------------------------------------
    def bound_ids(self, r: _Region) -> set[int]:
        """The region's inputs (after head repetition is folded): never erased."""
        fs = [r.q, r.k, r.v, r.cond, *r.adds]
        return {id(self.canon(f)) for f in fs if f is not None and self.canon(f) is not None}

    def _covered_fx(self, covered: list[Node], bound: set[int]) -> list[fx.Node]:
        ids = {id(n) for n in covered if id(n) not in bound}
        return [f for f in self.gm.graph.nodes if id(self.canon(f)) in ids and f.op in ("call_function", "call_method")]

    def rewrite(self, r: _Region) -> None:
        g = self.gm.graph
        root = r.root
        want = tensor_meta(root)
        with g.inserting_before(root):
            q, k, v = r.q, r.k, r.v
            if r.nd < 4:
                lift = (None,) * (4 - r.nd)
                q, k, v = (g.call_function(operator.getitem, (t, lift)) for t in (q, k, v))
            mask: Optional[fx.Node] = None
            if len(r.adds) == 1 and r.cond is None:
                mask = r.adds[0]
            elif r.cond is not None and not r.adds and not r.cond_masks and r.fill == NEG_INF:
                mask = r.cond
            elif r.adds or r.cond is not None:
                mask = g.call_function(combine_masks, (list(r.adds), r.cond, r.cond_masks, r.fill,
                                                       r.mask_dtype or torch.float32))
            call = g.call_function(attention, (q, k, v, mask), {
                "scale": r.scale, "is_causal": r.is_causal, "softcap": r.softcap, "sdpa_masked_rows": r.sdpa})
            out = call
            if r.nd < 4:
                out = g.call_function(operator.getitem, (call, (0,) * (4 - r.nd)))
            qt = tensor_meta(r.q)
            if want is not None and qt is not None and want.dtype != qt.dtype:
                out = g.call_method("to", (out, want.dtype))
        out.meta = dict(root.meta)
        c = self.canon(root)
        root.replace_all_uses_with(out)
        if c is not None:
            self.extra[out] = c
        erase_dead(self.gm, list(dict.fromkeys([root] + r.covered)))


# ---------------------------------------------------------------------------------------
# checks and descriptions

def _is_unsqueeze(arg) -> bool:
    """An index that only inserts one new axis (None / unsqueeze) next to full slices."""
    if isinstance(arg, tuple) and len(arg) == 2 and arg[0] == "unsqueeze":
        return True
    if not isinstance(arg, tuple):
        return False
    nones = 0
    for a in arg:
        if a is None:
            nones += 1
        elif a == "...":
            continue
        elif isinstance(a, tuple) and a[:1] == ("slice",) and a[1] in (None, 0) and a[3] in (None, 1):
            continue  # full-size slices are checked through the shapes
        else:
            return False
    return nones == 1


def _has_matmul(n: Node, depth: int = 6) -> bool:
    if n.op is Op.MATMUL:
        return True
    if depth == 0 or n.op not in (Op.MUL, Op.ADD, Op.TANH, Op.WHERE):
        return False
    return any(_has_matmul(s, depth - 1) for s in n.src)


def _same(a, b) -> bool:
    """Equal sizes; a symbolic size (dynamic shapes: a str here) is trusted, the op checks at run time."""
    return a == b or not (isinstance(a, int) and isinstance(b, int))


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _idim(d):
    return int(d) if isinstance(d, int) else str(d)


def _ishape(t: torch.Tensor) -> tuple:
    return tuple(_idim(d) for d in t.shape)


def _dtype(f: fx.Node) -> Optional[torch.dtype]:
    t = tensor_meta(f)
    return t.dtype if t is not None else None


def _check_qkv(q: fx.Node, k: fx.Node, v: fx.Node, gqa: bool = True) -> int:
    """Shapes the fused op takes (before head repetition is folded); returns the rank."""
    qt, kt, vt = (tensor_meta(t) if isinstance(t, fx.Node) else None for t in (q, k, v))
    if qt is None or kt is None or vt is None:
        raise _Reject("q, k or v has no tensor metadata")
    nd = qt.dim()
    if not (2 <= nd <= 4) or kt.dim() != nd or vt.dim() != nd:
        raise _Reject(f"q, k, v are {qt.dim()}-D, {kt.dim()}-D, {vt.dim()}-D: the fused op takes 2-D to 4-D")
    qs, ks, vs = _ishape(qt), _ishape(kt), _ishape(vt)
    if not (_same(qs[-1], ks[-1]) and _same(ks[-2], vs[-2]) and _same_shape(ks[:-2], vs[:-2])):
        raise _Reject(f"q {qs}, k {ks}, v {vs} are not [.., S, D], [.., T, D], [.., T, Dv]")
    if nd == 4:
        hq, hk = qs[1], ks[1]
        heads_ok = _same(hq, hk) or (gqa and isinstance(hq, int) and isinstance(hk, int) and hk > 0 and hq % hk == 0)
        if not _same(qs[0], ks[0]) or not heads_ok:
            raise _Reject(f"q {qs} and k {ks}: batch or heads do not match (kv heads must divide query heads)")
    elif not _same_shape(qs[:-2], ks[:-2]):
        raise _Reject(f"q {qs} and k {ks} differ in batch dims")
    return nd


def _check_mask(m: fx.Node, scores_shape, what: str, want_float: Optional[bool]) -> None:
    t = tensor_meta(m)
    if t is None:
        raise _Reject(f"{what} has no tensor metadata")
    if want_float is True and not t.dtype.is_floating_point:
        raise _Reject(f"{what} has dtype {t.dtype}, expected a floating mask")
    if want_float is False and t.dtype != torch.bool:
        raise _Reject(f"{what} has dtype {t.dtype}, expected bool")
    if t.requires_grad:  # a learned bias (T5, ALiBi slopes being trained): the op has no mask gradient
        raise _Reject(f"{what} requires grad; the fused op does not differentiate its mask")
    ms = _ishape(t)
    ss = tuple(scores_shape or ())
    if len(ms) > len(ss) or len(ss) > 4 and len(ms) > 4:
        raise _Reject(f"{what} of shape {ms} has more dims than the scores {ss}")
    for a, b in zip(reversed(ms), reversed(ss)):
        if a != 1 and not _same(a, b):
            raise _Reject(f"{what} of shape {ms} does not broadcast to the scores {ss} without enlarging them")
    if ms and ms[-1] == 1 and ss and ss[-1] != 1:
        raise _Reject(f"{what} of shape {ms} is broadcast along the key axis (its last dim is 1, the scores "
                      f"have {ss[-1]} keys): it masks queries, not keys")


@functools.lru_cache(maxsize=64)
def _cascades(scale: float, kind: Optional[str], softcap: float, fill: float):
    cs = derive(scale, kind, softcap, fill)
    return cs, {label: passes_per_rank(c) for label, c in cs.items()}


def _describe(r: _Region) -> tuple[dict, dict]:
    kind = r.mask_kind
    fill = r.fill if kind == "bool" else NEG_INF
    cascades, passes = _cascades(r.scale, kind, r.softcap, fill)
    bindings = {"scale": r.scale, "mask": kind, "gqa_group": r.group, "softcap": r.softcap,
                "is_causal": r.is_causal, "source": "sdpa" if r.sdpa else "eager",
                "passes_per_rank": {label: p["m"] for label, p in passes.items()}}
    if kind == "bool" and r.fill != NEG_INF:
        bindings["mask_fill"] = r.fill
    return bindings, dict(cascades)
