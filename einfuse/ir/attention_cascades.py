"""Attention as einsum cascades, and the softmax-into-attention derivation (FuseMax's taxonomy).

`attention_3pass` builds the cascade eager PyTorch computes from a matched region's bindings
(batch and head ranks left out; p = query, m = key, e = head dim, f = value dim). The scale is
linear, so it is folded into the contraction's map; a soft-cap and a mask are a map over the
contraction (`MQK`)::

    QK[p,m] = sum_e 0.125 * Q[p,e] * K[m,e]
    MQK[p,m] = QK[p,m] + M[p,m]                  (only with a mask or soft-cap)
    GM[p] = max_m MQK[p,m]
    SN[p,m] = exp(MQK[p,m] - GM[p])
    SD[p] = sum_m SN[p,m]
    A[p,m] = SN[p,m] * 1/SD[p]
    AV[p,f] = sum_m A[p,m] * V[m,f]

Then two rewrites on the IR, each a function Cascade -> Cascade:

* `defer_division` (3-pass -> 2-pass): inline a map that divides into the sum consuming it and
  hoist the factors that do not depend on the summed rank out of the sum
  (`sum_m SN*V/SD = (sum_m SN*V)/SD`): `AV = sum_m SN*V`, `O = AV * 1/SD`.
* `online_softmax` (2-pass -> 1-pass): split m into (m1, m0); the max becomes a per-tile max
  `LM` and a running max `RM[m1+1] = max(RM[m1], LM[m1])`; the exponentials use the running
  max; every sum of `exp(x - max) * y` becomes a per-tile sum plus running state rescaled by
  `PRM = exp(RM[m1] - RM[m1+1])` (`RD`, `RNV`); the output reads the final state,
  `O = RNV[M1] * 1/RD[M1]`.

`passes_per_rank` counts passes (defined in its docstring): 3, 2 and 1 for the key rank m.
`derive` runs the whole chain. The interpreter (`einfuse.ir.cascade.CascadeInterpreter`) runs
all three, which is how the tests check that the rewrites preserve meaning.

Masked rows. With -inf masks, a row whose *leading* key tiles are all masked has RM = -inf
there, and `exp(-inf - -inf)` is NaN in the plain 1-pass cascade (as in FuseMax's). Given
`lowest` (the dtype's most negative finite value), `online_softmax` also emits the guarded
running max `SM[m1,p] = max(RM[m1+1,p], lowest)`, read by the exponentials and the rescale
factor `PRM = exp(RM[m1] - SM[m1])` instead of `RM[m1+1]`: it equals RM wherever RM is finite
(every finite score is >= lowest), and where RM is still -inf the tile's exponentials are
exp(-inf) = 0 and PRM = 0 (the running sums are 0 there anyway), so a row gets what eager
gives: NaN only if every key is masked. The fused CPU op runs this guarded cascade
(`einfuse.runtime.cascade_cpu`), with `band=True` (a second bool mask W, causal/sliding
window) and `lse=True` (LSE[p] = GM + log SD, which the backward needs) where it needs them.
"""

from __future__ import annotations

from .cascade import Cascade, Einsum, reads, read
from .node import Node, Op, const, node

NEG_INF = float("-inf")
MASK_KINDS = (None, "additive", "bool", "causal")


# ---------------------------------------------------------------------------------
# small expression helpers

def _mul(*xs: Node) -> Node:
    flat: list[Node] = []
    for x in xs:
        flat.extend(x.src if x.op is Op.MUL else (x,))
    return flat[0] if len(flat) == 1 else node(Op.MUL, tuple(flat))


def _sub(a: Node, b: Node) -> Node:
    return node(Op.ADD, (a, node(Op.MUL, (const(-1.0), b))))


def _exp(x: Node) -> Node:
    return node(Op.EXP, (x,))


def _factors(n: Node) -> list[Node]:
    return list(n.src) if n.op is Op.MUL else [n]


def _base(r: str) -> str:
    return r.partition("+")[0]


def _read_ranks(n: Node) -> set[str]:
    """Base rank names read anywhere in n."""
    out: set[str] = set()
    stack = [n]
    while stack:
        m = stack.pop()
        if m.op is Op.READ:
            out.update(_base(r) for r in m.arg[1])
        stack.extend(m.src)
    return out


def _map_reads(n: Node, fn) -> Node:
    """Rebuild n with every READ leaf replaced by fn(read)."""
    if n.op is Op.READ:
        return fn(n)
    if not n.src:
        return n
    src = tuple(_map_reads(s, fn) for s in n.src)
    return n if src == n.src else node(n.op, src, n.arg, n.shape)


def _inline(expr: Node, producer: Einsum) -> Node:
    """Replace reads of a map Einsum's output by its expression (ranks renamed positionally)."""
    assert producer.reduce is None

    def fn(r: Node) -> Node:
        name, rr = r.arg
        if name != producer.out:
            return r
        ren = dict(zip(producer.ranks, rr))
        return _map_reads(producer.expr, lambda x: read(x.arg[0], *(ren.get(k, k) for k in x.arg[1])))
    return _map_reads(expr, fn)


def _rename_tensor(e: Einsum, old: str, new: str) -> Einsum:
    expr = _map_reads(e.expr, lambda r: read(new, *r.arg[1]) if r.arg[0] == old else r)
    return Einsum(e.out, e.ranks, expr, e.reduce, e.over, e.init)


def _drop_dead(einsums: list[Einsum], outputs: tuple[str, ...]) -> list[Einsum]:
    live = set(outputs)
    keep: list[Einsum] = []
    for e in reversed(einsums):
        if e.out in live:
            keep.append(e)
            live |= reads(e.expr)
    return keep[::-1]


# ---------------------------------------------------------------------------------
# the cascade eager attention computes

def attention_3pass(scale: float = 1.0, mask: str | None = None, softcap: float = 0.0,
                    fill: float = NEG_INF, name: str = "attention", band: bool = False,
                    lse: bool = False) -> Cascade:
    """The 3-pass cascade of softmax attention with these bindings.

    mask: None, "additive" (M[p,m] float, added), "bool" (M[p,m] True = attend, others get
    `fill`) or "causal" (a bool M[p,m] = m <= p + T - S). softcap c > 0 maps s to c*tanh(s/c)
    before the mask, as the fused op does. band: a second bool mask W[p,m] (True = attend,
    others -inf) after M: the fused op's causal / sliding-window band, which it computes per
    tile from indices. lse: also output LSE[p] = GM[p] + log(SD[p]), the row log-sum-exp.
    """
    if mask not in MASK_KINDS:
        raise ValueError(f"mask kind {mask!r} is not one of {MASK_KINDS}")
    q, k, v = read("Q", "p", "e"), read("K", "m", "e"), read("V", "m", "f")
    prod = _mul(q, k) if scale == 1.0 else _mul(const(scale), q, k)
    es = [Einsum("QK", ("p", "m"), prod, Op.SUM, ("e",))]
    inputs = [("Q", ("p", "e")), ("K", ("m", "e")), ("V", ("m", "f"))]
    notes = []
    s = read("QK", "p", "m")
    x = s
    if softcap > 0:
        x = _mul(const(softcap), node(Op.TANH, (_mul(x, const(1.0 / softcap)),)))
    if mask == "additive":
        x = node(Op.ADD, (x, read("M", "p", "m")))
    elif mask in ("bool", "causal"):
        x = node(Op.WHERE, (read("M", "p", "m"), x, const(fill)))
    if mask is not None:
        inputs.append(("M", ("p", "m")))
        notes.append(f"mask: {mask}" + (" (M[p,m] = m <= p + T - S)" if mask == "causal" else ""))
    if band:
        x = node(Op.WHERE, (read("W", "p", "m"), x, const(NEG_INF)))
        inputs.append(("W", ("p", "m")))
        notes.append("band: W[p,m] (causal / sliding window)")
    if x is not s:
        es.append(Einsum("MQK", ("p", "m"), x))
        s = read("MQK", "p", "m")
    es += [
        Einsum("GM", ("p",), s, Op.MAX, ("m",)),
        Einsum("SN", ("p", "m"), _exp(_sub(s, read("GM", "p")))),
        Einsum("SD", ("p",), read("SN", "p", "m"), Op.SUM, ("m",)),
        Einsum("A", ("p", "m"), _mul(read("SN", "p", "m"), node(Op.RECIP, (read("SD", "p"),)))),
        Einsum("AV", ("p", "f"), _mul(read("A", "p", "m"), v), Op.SUM, ("m",)),
    ]
    outputs = ("AV",)
    if lse:
        es.append(Einsum("LSE", ("p",), node(Op.ADD, (read("GM", "p"), node(Op.LOG, (read("SD", "p"),))))))
        outputs += ("LSE",)
    return Cascade(name, tuple(inputs), tuple(es), outputs, tuple(notes))


# ---------------------------------------------------------------------------------
# rewrite (a): defer the division

def defer_division(c: Cascade, out: str = "O") -> Cascade:
    """sum_r (x * 1/d) with d independent of r -> (sum_r x) * 1/d, for the first such sum.

    The map Einsum that divides (A = SN * 1/SD) is inlined into the sum that consumes it; the
    factors of the summand that read none of the summed ranks are hoisted into a new map
    Einsum `out` after the sum, which takes over the sum's readers and output slot.
    """
    by_name = {e.out: e for e in c.einsums}
    for idx, e in enumerate(c.einsums):
        if e.reduce is not Op.SUM:
            continue
        for f in _factors(e.expr):
            prod = by_name.get(f.arg[0]) if f.op is Op.READ else None
            if prod is None or prod.reduce is not None:
                continue
            factors = []
            for g in _factors(e.expr):
                factors.extend(_factors(_inline(g, prod)) if g is f else [g])
            dep = [g for g in factors if _read_ranks(g) & set(e.over)]
            indep = [g for g in factors if not _read_ranks(g) & set(e.over)]
            if not dep or not any(g.op is Op.RECIP for g in indep):
                continue
            es = list(c.einsums)
            es[idx] = Einsum(e.out, e.ranks, _mul(*dep), Op.SUM, e.over)
            final = Einsum(out, e.ranks, _mul(read(e.out, *e.ranks), *indep))
            es = es[:idx + 1] + [final] + [_rename_tensor(x, e.out, out) for x in es[idx + 1:]]
            outputs = tuple(out if o == e.out else o for o in c.outputs)
            return Cascade(c.name, c.inputs, tuple(_drop_dead(es, outputs)), outputs, c.notes, c.splits)
    raise ValueError("no sum reads a division by a value independent of the summed rank")


# ---------------------------------------------------------------------------------
# rewrite (b): split the key rank and carry running state

_RUNNING_NAMES = {"SD": ("SLD", "SPD", "RD"), "AV": ("SLNV", "SPNV", "RNV")}


def online_softmax(c: Cascade, rank: str = "m", outer: str = "m1", inner: str = "m0",
                   lowest: float | None = None) -> Cascade:
    """Split `rank` into (outer, inner) tiles and turn its reductions into running state.

    Preconditions (checked): one max over `rank` (G), one map SN = exp(x - G), and every other
    reduction over `rank` is a sum whose summand is SN times factors that read neither G nor SN.
    Einsums producing x (the contraction and its map) are tiled: their `rank` becomes
    (outer, inner), moved to the front. G becomes LM (per tile) and RM (running, from -inf);
    SN reads the running max; each sum X becomes a per-tile sum, the previous running value
    rescaled by PRM = exp(RM[outer] - RM[outer+1]), and the running sum (from 0). Einsums
    after the loop read the final state (rank spelled outer.upper()).

    With `lowest` (a finite float), the exponentials and PRM read the guarded running max
    SM[outer] = max(RM[outer+1], lowest) instead (see the module docstring: no NaN from
    exp(-inf - -inf) on rows whose leading tiles are fully masked).
    """
    es = list(c.einsums)
    maxes = [e for e in es if e.reduce is Op.MAX and e.over == (rank,)]
    if len(maxes) != 1:
        raise ValueError(f"expected one max over {rank}, found {len(maxes)}")
    g = maxes[0]

    def is_stabilised_exp(e: Einsum) -> bool:
        if e.reduce is not None or e.expr.op is not Op.EXP or e.expr.src[0].op is not Op.ADD:
            return False
        terms = e.expr.src[0].src
        return any(t.op is Op.MUL and len(t.src) == 2 and t.src[0].op is Op.CONST and t.src[0].arg == -1.0
                   and t.src[1].op is Op.READ and t.src[1].arg[0] == g.out for t in terms)
    exps = [e for e in es if is_stabilised_exp(e)]
    if len(exps) != 1:
        raise ValueError(f"expected one exp(x - {g.out}), found {len(exps)}")
    sn = exps[0]
    sums = [e for e in es if e.reduce is Op.SUM and rank in e.over]
    for e in sums:
        fs = _factors(e.expr)
        sn_reads = [f for f in fs if f.op is Op.READ and f.arg[0] == sn.out]
        others = [f for f in fs if f not in sn_reads]
        if e.over != (rank,) or len(sn_reads) != 1 or any(reads(f) & {sn.out, g.out} for f in others):
            raise ValueError(f"{e.out} is not a sum over {rank} of {sn.out} times other factors")
    readers_of_g = [e for e in es if g.out in reads(e.expr) and e is not sn]
    if any(rank in map(_base, e.ranks) for e in readers_of_g):
        raise ValueError(f"{g.out} is read inside the {rank} loop by something other than {sn.out}")

    tiled: dict[str, Einsum] = {}      # old name -> old Einsum, for tiled maps/contractions
    new_name: dict[str, str] = {sn.out: "SLN"}
    running: dict[str, tuple[str, ...]] = {g.out: ("RM", ("p",))}
    nxt = f"{outer}+1"

    def front(ranks: tuple[str, ...]) -> tuple[str, ...]:
        return (outer, inner) + tuple(r for r in ranks if r != rank)

    def tile_read(r: Node) -> Node:
        name, rr = r.arg
        if name in tiled or name == sn.out:
            old = tiled[name].ranks if name in tiled else sn.ranks
            assert rr[old.index(rank)] == rank, f"{name} read with {rr}"
            return read(new_name[name], outer, inner, *(x for o, x in zip(old, rr) if o != rank))
        if name == g.out:
            return read("RM", nxt, *rr) if lowest is None else read("SM", outer, *rr)
        if rank in rr:  # an input: the split happens in place
            return read(name, *(y for x in rr for y in ((outer, inner) if x == rank else (x,))))
        return r

    def final_read(r: Node) -> Node:
        name, rr = r.arg
        if name in running:
            return read(running[name][0], outer.upper(), *rr)
        return r

    out: list[Einsum] = []
    prm_done = False
    for e in es:
        if e is g:
            lm = Einsum("LM", (outer,) + g.ranks, _map_reads(g.expr, tile_read), Op.MAX, (inner,))
            prev_max = read("RM", outer, *g.ranks)
            rm = Einsum("RM", (nxt,) + g.ranks, node(Op.MAX2, (prev_max, read("LM", outer, *g.ranks))), init=NEG_INF)
            out += [lm, rm]
            if lowest is not None:
                out.append(Einsum("SM", (outer,) + g.ranks,
                                  node(Op.MAX2, (read("RM", nxt, *g.ranks), const(lowest)))))
            running[g.out] = ("RM", g.ranks)
        elif e is sn:
            out.append(Einsum("SLN", front(sn.ranks), _map_reads(sn.expr, tile_read)))
        elif e in sums:
            local, scaled, run = _RUNNING_NAMES.get(e.out, (f"L{e.out}", f"SP{e.out}", f"R{e.out}"))
            if not prm_done:
                new_max = read("RM", nxt, *g.ranks) if lowest is None else read("SM", outer, *g.ranks)
                out.append(Einsum("PRM", (outer,) + g.ranks, _exp(_sub(read("RM", outer, *g.ranks), new_max))))
                prm_done = True
            out.append(Einsum(local, (outer,) + e.ranks, _map_reads(e.expr, tile_read), Op.SUM, (inner,)))
            prev, prm = read(run, outer, *e.ranks), read("PRM", outer, *g.ranks)
            out.append(Einsum(scaled, (outer,) + e.ranks, _mul(prev, prm)))
            new = node(Op.ADD, (read(local, outer, *e.ranks), read(scaled, outer, *e.ranks)))
            out.append(Einsum(run, (nxt,) + e.ranks, new, init=0.0))
            running[e.out] = (run, e.ranks)
        elif rank in e.ranks:
            if e.reduce is not None and rank in e.over:
                raise ValueError(f"{e.out} reduces over {rank} and is not a softmax sum")
            tiled[e.out] = e
            new_name[e.out] = "B" + e.out
            out.append(Einsum("B" + e.out, front(e.ranks), _map_reads(e.expr, tile_read), e.reduce, e.over))
        elif rank in e.over:
            raise ValueError(f"{e.out} reduces over {rank} and is not a softmax sum")
        else:
            out.append(Einsum(e.out, e.ranks, _map_reads(e.expr, final_read), e.reduce, e.over, e.init))
    outputs = tuple(running[o][0] if o in running else o for o in c.outputs)
    return Cascade(c.name, c.inputs, tuple(_drop_dead(out, outputs)), outputs, c.notes,
                   c.splits + ((rank, outer, inner),))


# ---------------------------------------------------------------------------------
# pass counting

def passes_per_rank(cascade: Cascade) -> dict[str, int]:
    """FuseMax pass counting: how many times the cascade must traverse each rank's fiber.

    What counts as a pass over rank r: one sweep over r's fiber (for each fixed value of the
    other ranks). An Einsum *traverses* r if r is among its output or reduced ranks. It can
    run in the same sweep as its inputs, except that a value *reduced over r* (a sum or max
    over r) is known only after a whole sweep, so an Einsum that reads it and traverses r
    again needs the next sweep. So passes(r) = 1 + the largest number of reductions over r on
    any dependency chain that ends in an Einsum traversing r (0 if none traverses r).
    Consequences, written down on purpose:
      * writing an r-indexed intermediate during a sweep is part of that sweep (no pass of its
        own); reading it back in a later sweep is part of the later sweep;
      * Einsums that do not traverse r, such as the final O = AV/SD, add no pass;
      * running state carried across an iterated rank (reads at k or k+1) is not a reduction
        over it: a 1-pass cascade updates it within its single sweep;
      * for a split rank m -> (m1, m0), passes(m) = passes(m1): the m0 fibers are tiles of
        fixed size M0 held in a buffer, so sweeping a tile again (passes(m0) may be 2: the
        tile max, then the exponentials) does not re-read m.
    """
    es = cascade.einsums
    producer = {e.out: e for e in es}
    ranks: list[str] = []
    for e in es:
        for r in tuple(map(_base, e.ranks)) + e.over:
            if r not in ranks:
                ranks.append(r)
    result: dict[str, int] = {}
    for r in ranks:
        level: dict[str, int] = {}
        for e in es:
            lv = 0
            for name in reads(e.expr):
                d = producer.get(name)
                if d is None or d.out not in level or d is e:
                    continue  # an input, or state from the previous iteration (loop-carried)
                lv = max(lv, level[d.out] + (1 if r in d.over else 0))
            level[e.out] = lv
        involved = [e for e in es if r in map(_base, e.ranks) or r in e.over]
        result[r] = 1 + max(level[e.out] for e in involved) if involved else 0
    for rank, outer, _inner in cascade.splits:
        result[rank] = result.get(outer, 0)
    return result


# ---------------------------------------------------------------------------------
# the whole derivation

def derive(scale: float = 1.0, mask: str | None = None, softcap: float = 0.0,
           fill: float = NEG_INF, *, band: bool = False, lse: bool = False,
           lowest: float | None = None) -> dict[str, Cascade]:
    """{"3-pass": c3, "2-pass": c2, "1-pass": c1}: the eager cascade and its two rewrites.

    band, lse: see `attention_3pass`; lowest: the masked-row guard of `online_softmax`. The
    fused CPU op runs `derive(..., lse=True, lowest=finfo(acc dtype).min)["1-pass"]`.
    """
    c3 = attention_3pass(scale, mask, softcap, fill, band=band, lse=lse)
    c2 = defer_division(c3)
    c1 = online_softmax(c2, lowest=lowest)
    return {"3-pass": c3, "2-pass": c2, "1-pass": c1}
