"""Liveness: the peak memory a graph needs, for inference and for training.

Memory is counted per *storage* (views are free) and only for what the graph
allocates: parameters and other graph inputs are alive anyway and not counted,
which is also what `memory.LiveStorageTracker` measures.

Inference (forward only): walking the nodes in order, a node's new storages are
allocated, plus its internal temporaries and internal results (`transient`,
`hidden`), which are gone when it returns; a storage is freed after the last node
that reads it (through any view), unless it is a graph output. The peak is the
largest total over the walk.

Training: the same forward walk, except that what autograd saves (`saved`, and the
internal results marked saved) stays alive until the backward of the node that
saved it. Then the backward is walked in reverse node order (the order autograd's
engine runs it): the gradient of a value is a buffer that exists from the first
consumer's backward until its producer's backward has run; a node's backward
allocates a gradient per input that requires grad (`alloc`), or passes a view of its
output's gradient on (`alias`: views, adds, cat), or hands the buffer it allocated for
one input to the next as well (`same`: add_rms_norm's x and residual), plus its
temporaries; a second contribution to a gradient is accumulated in place (a momentary
buffer). Gradients of graph inputs (parameters' `.grad`) stay alive to the end. After a node's backward its
saved tensors are released (freed when no other node holds them and no graph output
is them). The backward starts from the scalar loss outputs (or, if the graph has
none, from a gradient for every output that requires grad). Nodes no graph output
depends on (dead branches) keep nothing: autograd frees their saved tensors with their
outputs. The training peak is the largest total over both walks.

Checked against `LiveStorageTracker` on tiny Llama graphs (tests/test_analysis.py):
the unfused graphs to within a fraction of a percent, the fused ones within ~10%
(the fused ops' temporaries are modelled from their implementations, `cost_rules`).

Symbolic sizes make the peak a sympy `Max` of the candidates no other candidate
dominates (`max_expr`).
"""

from __future__ import annotations

from fractions import Fraction
from math import comb
from typing import Any

import sympy

from .symbolic import NodeCost


# -----------------------------------------------------------------------------------------
# symbolic max, fast: sizes as sparse polynomials over positive integer "generators"
# (the size symbols, and any non-polynomial subexpression such as Min(seq, 256), taken
# as an opaque generator >= 1). a >= b is decided by a sufficient condition: with every
# generator x = 1 + y (y >= 0), a - b has only non-negative coefficients in the y's.

_GENS: dict[Any, int] = {}
_GEN_LIST: list[Any] = []
_POLY_CACHE: dict[Any, dict] = {}


def _gen(g: Any) -> int:
    i = _GENS.get(g)
    if i is None:
        i = _GENS[g] = len(_GEN_LIST)
        _GEN_LIST.append(g)
    return i


def _num(c: Any):
    c = sympy.sympify(c)
    if c.is_Integer:
        return int(c)
    if c.is_Rational:
        return Fraction(int(c.p), int(c.q))
    return float(c)


def to_poly(x: Any) -> dict:
    """Sparse polynomial {((gen, exp), ...): coeff} of a size expression."""
    if isinstance(x, bool):
        x = int(x)
    if isinstance(x, (int, Fraction)):
        return {(): x} if x else {}
    if isinstance(x, float):
        return {(): x} if x else {}
    hit = _POLY_CACHE.get(x)
    if hit is not None:
        return hit
    e = sympy.expand(sympy.sympify(x))
    out: dict = {}
    if e.is_number:
        v = _num(e)
        out = {(): v} if v else {}
    else:
        p = e.as_poly() if not e.has(sympy.Piecewise) else None
        if p is None:
            out = {((_gen(e), 1),): 1}
        else:
            idx = [_gen(g) for g in p.gens]
            for monom, coeff in p.terms():
                key = tuple(sorted((idx[i], k) for i, k in enumerate(monom) if k))
                out[key] = out.get(key, 0) + _num(coeff)
    if len(_POLY_CACHE) < 100000:
        _POLY_CACHE[x] = out
    return out


def padd(a: dict, b: dict, sign: int = 1) -> dict:
    out = dict(a)
    for k, v in b.items():
        r = out.get(k, 0) + sign * v
        if r:
            out[k] = r
        else:
            out.pop(k, None)
    return out


def _shifted(d: dict) -> dict:
    """d with every generator x replaced by 1 + y."""
    out: dict = {}
    for key, c in d.items():
        terms = [((), c)]
        for g, k in key:
            terms = [(t + (((g, j),) if j else ()), tc * comb(k, j)) for t, tc in terms for j in range(k + 1)]
        for t, tc in terms:
            t = tuple(sorted(t))
            out[t] = out.get(t, 0) + tc
    return out


def pge(a: dict, b: dict) -> bool | None:
    """a >= b for all generators >= 1 (None: undecided)."""
    d = padd(a, b, -1)
    if not d:
        return True
    if all(k == () for k in d):
        return d[()] >= 0
    coeffs = [v for v in _shifted(d).values() if v]
    if all(v >= 0 for v in coeffs):
        return True
    if all(v <= 0 for v in coeffs):
        return False
    return None


def from_poly(d: dict) -> Any:
    terms = []
    for key, c in d.items():
        t = sympy.Rational(c.numerator, c.denominator) if isinstance(c, Fraction) else sympy.sympify(c)
        for g, k in key:
            t = t * _GEN_LIST[g] ** k
        terms.append(t)
    return sympy.Add(*terms)


class MaxTracker:
    """Keeps the candidates (polynomials) that no other candidate dominates."""

    def __init__(self):
        self.front: list[dict] = []

    def add(self, x: Any) -> None:
        self.add_poly(x if isinstance(x, dict) else to_poly(x))

    def add_poly(self, p: dict) -> None:
        for f in self.front:
            if pge(f, p) is True:
                return
        self.front = [f for f in self.front if pge(p, f) is not True]
        self.front.append(p)

    def value(self) -> Any:
        if not self.front:
            return sympy.Integer(0)
        vals = [from_poly(f) for f in self.front]
        if len(vals) == 1:
            return vals[0]
        return sympy.Max(*vals, evaluate=False)


def max_expr(xs) -> Any:
    m = MaxTracker()
    for x in xs:
        if isinstance(x, sympy.Max):
            for a in x.args:
                m.add(a)
        else:
            m.add(x)
    return m.value()


class _Pool:
    """Live buffers (key -> bytes as a polynomial) with their running total."""

    def __init__(self):
        self.items: dict[Any, dict] = {}
        self.total: dict = {}

    def add(self, key: Any, nbytes: Any) -> None:
        if key in self.items:
            return
        p = to_poly(nbytes)
        self.items[key] = p
        self.total = padd(self.total, p)

    def remove(self, key: Any) -> None:
        p = self.items.pop(key, None)
        if p is not None:
            self.total = padd(self.total, p, -1)

    def __contains__(self, key: Any) -> bool:
        return key in self.items


# -----------------------------------------------------------------------------------------
# the walks

def _external(costs: list[NodeCost]) -> set[int]:
    return {t.storage for c in costs if c.kind == "input" for t in c.outs}


def _last_use(costs: list[NodeCost]) -> dict[int, list]:
    last: dict[Any, int] = {}
    for i, c in enumerate(costs):
        for t in c.ins:
            last[t.storage] = i
        for st in c.allocs:       # allocated and never read: freed right away
            last.setdefault(st, i)
    by_node: dict[int, list] = {}
    for st, i in last.items():
        by_node.setdefault(i, []).append(st)
    return by_node


def _output_storages(costs: list[NodeCost]) -> set[int]:
    return {t.storage for c in costs if c.kind == "output" for t in c.ins}


def reaches_output(costs: list[NodeCost]) -> set[str]:
    """Nodes a graph output depends on. Autograd frees the saved tensors of the others with
    their outputs (dead branches never reach the backward)."""
    out: set[str] = set()
    for c in reversed(costs):
        if c.kind == "output" or any(u in out or u == "output" for u in c.users):
            out.add(c.name)
    return out


def inference_peak(costs: list[NodeCost]) -> Any:
    return _forward(costs, training=False)[0].value()


def _forward(costs: list[NodeCost], training: bool, timeline: list | None = None):
    external = _external(costs)
    frees = _last_use(costs)
    outputs = _output_storages(costs)
    live = _Pool()
    held: dict[Any, set[int]] = {}           # storage -> nodes whose backward needs it
    peak = MaxTracker()
    needed = reaches_output(costs) if training else set()
    for i, c in enumerate(costs):
        keeps = training and c.name in needed
        if c.kind == "compute":
            for st, b in c.allocs.items():
                if st not in external:
                    live.add(st, b)
            extra = to_poly(c.transient)
            for j, (b, saved, _dt) in enumerate(c.hidden):
                if keeps and saved:
                    key = ("hidden", c.name, j)
                    live.add(key, b)
                    held.setdefault(key, set()).add(i)
                else:
                    extra = padd(extra, to_poly(b))
            peak.add_poly(padd(live.total, extra))
            if keeps:
                for t in c.saved:
                    if t.storage not in external:
                        held.setdefault(t.storage, set()).add(i)
        for st in frees.get(i, ()):
            if st in live and st not in outputs and not held.get(st):
                live.remove(st)
        if timeline is not None:
            timeline.append((c.name, from_poly(live.total)))
    return peak, live, held, outputs


def training_peak(costs: list[NodeCost], timeline: list | None = None) -> Any:
    peak, live, held, outputs = _forward(costs, training=True)
    by_name = {c.name: c for c in costs}
    holds_of: dict[int, list] = {}
    for st, hs in held.items():
        for i in hs:
            holds_of.setdefault(i, []).append(st)

    # gradient buffers (a pool) with reference counts; grads: value name -> [buffer ids]
    bufs = _Pool()
    refs: dict[int, int] = {}
    grads: dict[str, list[int]] = {}
    nid = [0]

    def new_buf(b: Any) -> int:
        nid[0] += 1
        bufs.add(nid[0], b)
        refs[nid[0]] = 0
        return nid[0]

    def attach(name: str, buf: int) -> None:
        lst = grads.setdefault(name, [])
        if buf not in lst:
            lst.append(buf)
            refs[buf] += 1

    # seed: scalar loss outputs, else every output requiring grad
    out_cost = next((c for c in costs if c.kind == "output"), None)
    seeds = []
    if out_cost is not None:
        pairs = [(n, t) for n, t in zip(out_cost.in_nodes, out_cost.ins) if t.requires_grad and t.floating]
        scalars = [(n, t) for n, t in pairs if t.numel == 1]
        seeds = scalars or pairs
    for name, t in seeds:
        attach(name, new_buf(t.nbytes))
    peak.add_poly(padd(live.total, bufs.total))

    for i in range(len(costs) - 1, -1, -1):
        c = costs[i]
        if c.kind not in ("compute", "view") or not c.bwd or c.name not in grads:
            continue
        mine = grads[c.name]
        moment = to_poly(c.bwd.get("transient", 0))
        last = None                                          # the buffer this backward made last
        for pos, mode in c.bwd.get("grads", {}).items():
            if pos >= len(c.ins):
                continue
            src, t = c.in_nodes[pos], c.ins[pos]
            if src not in by_name or not t.requires_grad:
                continue
            have = [b for b in grads.get(src, []) if refs.get(b, 0) > 0]
            if mode == "alias" and mine:
                for b in mine:
                    attach(src, b)
            elif mode == "same" and last is not None and not have:
                attach(src, last)
            elif have:
                moment = padd(moment, to_poly(t.nbytes))     # computed, then added in place
            else:
                last = new_buf(t.nbytes)
                attach(src, last)
        now = padd(padd(live.total, bufs.total), moment)
        peak.add_poly(now)
        if timeline is not None:
            timeline.append((c.name, from_poly(now), from_poly(live.total), from_poly(bufs.total)))
        # this node's backward is done: release its output's gradient and its saved tensors
        for b in grads.pop(c.name, []):
            refs[b] -= 1
            if refs[b] <= 0:
                bufs.remove(b)
        for st in holds_of.get(i, ()):
            hs = held[st]
            hs.discard(i)
            if not hs and st in live and st not in outputs:
                live.remove(st)
    return peak.value()


def forward_peak(costs: list[NodeCost], training: bool) -> Any:
    """Peak during the forward alone (with saved activations kept, when training)."""
    return _forward(costs, training)[0].value()


def saved_bytes(costs: list[NodeCost]) -> Any:
    """Bytes autograd keeps from the forward for the backward (distinct storages + internal results)."""
    external = _external(costs)
    seen: dict[Any, Any] = {}
    for c in costs:
        for t in c.saved:
            if t.storage not in external:
                seen[t.storage] = t.storage_bytes
        for j, (b, saved, _dt) in enumerate(c.hidden):
            if saved:
                seen[("hidden", c.name, j)] = b
    return sympy.Add(*[sympy.sympify(v) for v in seen.values()])
