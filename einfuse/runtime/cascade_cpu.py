"""Tiled CPU executor for einsum cascades: runs a cascade's Einsums with vectorised torch ops.

`CascadeInterpreter` (einfuse.ir.cascade) is the reference meaning of a cascade: fp64, one
element of the iterated rank per step. This executor runs the *same* cascade fast enough to be
an op's CPU implementation:

* **One tile of the iterated rank per step.** A 1-pass cascade splits a rank m into (m1, m0)
  and carries running state over m1 (Einsums writing ``X[m1+1, ...]``). Each step sees one
  tile m0 = [j0, j1) of every m-indexed input (a view, never a copy), evaluates the Einsums
  that carry m1 in cascade order, and keeps only the state (``X[m1]`` = previous value,
  ``X[m1+1]`` = this step's); Einsums that read the final state (``X[M1, ...]``) run after the
  loop. Nothing the size of the whole rank m is ever built: the largest temporary is one tile.
* **Chunks of a parallel rank.** ``chunks={"p": n}`` runs the whole cascade on n elements of p
  at a time (p must not be reduced); with the tile size this bounds every temporary.
* **Batch dims.** Every tensor carries ``batch_dims`` leading dims that no Einsum names (batch,
  heads); they broadcast (size 1 = shared, e.g. a K/V head for a group of query heads).
* **Vectorised Einsums.** A map is a broadcast torch expression; a SUM over ranks of a product
  of two operand groups is one batched matmul (a size-1 batch dim of one operand that is dense
  in the other is folded into the matrix rows, so GQA needs no K/V copies); other reductions
  are ``sum``/``amax`` over dims. Factor groups of a contraction that read nothing the loop
  changes (``0.125 * Q[p,e]``) are evaluated once per chunk. Intermediates that no later
  Einsum reads are updated in place (``exp_``, ``masked_fill_``, ``add_``), so a tile costs
  what a hand-written loop costs. Math is in ``dtype`` (fp32 for fp32/bf16/fp16 inputs).
* **Lazy inputs.** An input may be a callable ``fn(slices) -> Tensor | bool | float`` (slices:
  rank -> (start, stop)) that builds the tile it is asked for, e.g. a causal band from
  indices; a Python scalar means "this value over the whole tile" and is folded
  (``where(True, a, b)`` is ``a``).
* **Iteration range.** ``key_range(chunk_slices) -> (lo, hi)`` restricts the iterated rank per
  chunk. The caller promises that outside [lo, hi) the cascade's tiles would leave the state
  unchanged (for an online softmax: every score there is -inf, so LM = -inf, PRM = 1, SLN = 0);
  skipping them is then exact.

Every run bumps ``einfuse.runtime.counters`` under ``"cascade:" + cascade.key()`` (the
cascade's structural key), so tests can check which cascade an op really executed, and
`watching()` records each executed tile (its range and largest temporary).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.node import Node, Op
from einfuse.runtime import counters

__all__ = ["TiledExecutor", "TileRecord", "watching", "counter_name"]

Slices = dict[str, tuple[int, int]]
Lazy = Callable[[Slices], Union[Tensor, bool, float]]


def counter_name(cascade: Cascade) -> str:
    """The `counters` key a run of this cascade bumps."""
    return "cascade:" + cascade.key()


@dataclass(frozen=True)
class TileRecord:
    key: str                       # the cascade's structural key
    chunk: tuple[int, int] | None  # range of the chunked rank (None: not chunked)
    tile: tuple[int, int] | None   # range of the iterated (split) rank (None: no loop)
    biggest: int                   # elements of the largest value evaluated in this step


_watchers: list[list[TileRecord]] = []


@contextmanager
def watching():
    """Yield a list that receives a `TileRecord` for every step any executor runs inside."""
    rec: list[TileRecord] = []
    _watchers.append(rec)
    try:
        yield rec
    finally:
        _watchers.remove(rec)


def _base(r: str) -> str:
    return r.partition("+")[0]


def _reads(n: Node) -> list[Node]:
    out, stack = [], [n]
    while stack:
        m = stack.pop()
        if m.op is Op.READ:
            out.append(m)
        stack.extend(m.src)
    return out


class _Val:
    """A tensor whose dims after the batch dims are the ranks `ranks` (in that order)."""

    __slots__ = ("t", "ranks", "owned")

    def __init__(self, t: Tensor, ranks: tuple[str, ...], owned: bool):
        self.t, self.ranks, self.owned = t, ranks, owned


_UNARY = {
    Op.EXP: (torch.exp, "exp_", math.exp), Op.TANH: (torch.tanh, "tanh_", math.tanh),
    Op.LOG: (torch.log, "log_", math.log), Op.SQRT: (torch.sqrt, "sqrt_", math.sqrt),
    Op.RSQRT: (torch.rsqrt, "rsqrt_", lambda x: 1.0 / math.sqrt(x)), Op.NEG: (torch.neg, "neg_", lambda x: -x),
    Op.RECIP: (torch.reciprocal, "reciprocal_", lambda x: 1.0 / x),
    Op.SIGMOID: (torch.sigmoid, "sigmoid_", lambda x: 1.0 / (1.0 + math.exp(-x))),
}


class TiledExecutor:
    """Compiled once per cascade (cheap); `run` executes it on tensors. See the module docstring."""

    def __init__(self, cascade: Cascade):
        c = self.cascade = cascade
        self.key = cascade.key()
        self.counter = "cascade:" + self.key
        loops = {_base(r) for e in c.einsums for r in e.ranks if "+" in r}
        if len(loops) > 1:
            raise NotImplementedError(f"more than one iterated rank: {sorted(loops)}")
        self.loop = next(iter(loops), None)
        self.split: tuple[str, str] | None = None     # (rank, inner) of the iterated rank
        if self.loop is not None:
            sp = [(r, i) for r, o, i in c.splits if o == self.loop]
            if not sp:
                raise NotImplementedError(f"iterated rank {self.loop} is not the outer rank of a split")
            self.split = sp[0]
        self.inputs = dict(c.inputs)
        loop = self.loop
        self.inside = [e for e in c.einsums if loop is not None and any(_base(r) == loop for r in e.ranks)]
        if any(loop is not None and loop in e.over for e in c.einsums):
            raise NotImplementedError(f"a reduction over the iterated rank {loop}")
        self.state = {e.out for e in self.inside if any("+" in r for r in e.ranks)}
        late = {e.out for e in self.inside}
        self.after: list[Einsum] = []
        for e in c.einsums:
            if e not in self.inside and {r.arg[0] for r in _reads(e.expr)} & late:
                self.after.append(e)
                late.add(e.out)
        self.before = [e for e in c.einsums if e not in self.inside and e not in self.after]
        # declared ranks of each Einsum's value, without the iterated rank
        self.decl = {e.out: tuple(_base(r) for r in e.ranks if _base(r) != loop) for e in c.einsums}
        self.init = {e.out: (e.init if e.init is not None else 0.0) for e in self.inside if e.out in self.state}
        # in-place licences: (einsum index in its phase, tensor, kind) where that read is the last
        self._owned_inside = self._last_uses(self.inside, inside=True)
        self._owned_after = self._last_uses(self.after, inside=False)
        self._owned_before = self._last_uses(self.before, inside=False)
        self._plans: dict[tuple[str, str], object] = {}
        self._want: dict[tuple[int, str], tuple] = {}  # (READ node id, phase) -> how to resolve it
        self._negs: dict[int, object] = {}             # ADD node id -> b if it is a + (-1)*b, else False
        self._keep: list[Node] = []                    # keeps those nodes alive (ids stay unique)

    # -- compile-time analysis ---------------------------------------------------------------
    def _kind(self, r: Node, inside: bool) -> str:
        name, rr = r.arg
        if name in self.state:
            if not inside:
                return "final"
            return "next" if any("+" in x for x in rr) else "prev"
        if name in self.inputs:
            return "input"
        return "value"

    def _last_uses(self, es: list[Einsum], inside: bool) -> set[tuple[int, str]]:
        last: dict[tuple[str, str], int] = {}
        count: dict[tuple[int, str, str], int] = {}
        for i, e in enumerate(es):
            for r in _reads(e.expr):
                k = (r.arg[0], self._kind(r, inside))
                last[k] = i
                count[(i,) + k] = count.get((i,) + k, 0) + 1
        outs = set(self.cascade.outputs)
        ok = set()
        for (name, kind), i in last.items():
            if kind in ("prev", "value", "final") and name not in outs and count[(i, name, kind)] == 1:
                ok.add((i, name))
        return ok

    # -- running ----------------------------------------------------------------------------
    def run(self, inputs: dict[str, Union[Tensor, Lazy]], *, tile: int | None = None, batch_dims: int = 0,
            chunks: Optional[dict[str, int]] = None, key_range: Optional[Callable[[Slices], tuple[int, int]]] = None,
            dtype: torch.dtype = torch.float32, out: Optional[dict[str, Tensor]] = None,
            sizes: Optional[dict[str, int]] = None) -> dict[str, Tensor]:
        """Run the cascade; returns {output: tensor} ([*batch, *declared ranks], `dtype` unless
        given in `out`, which receives the results in place)."""
        counters.bump(self.counter)
        # per-run state lives on a shallow copy: a compiled executor may be shared and re-entered
        return copy.copy(self)._run(inputs, tile, batch_dims, chunks, key_range, dtype, out, sizes)

    def _run(self, inputs, tile, batch_dims, chunks, key_range, dtype, out, sizes) -> dict[str, Tensor]:
        nb = batch_dims
        sizes = dict(sizes or {})
        batch: list[torch.Size] = []
        for name, ranks in self.cascade.inputs:
            t = inputs[name]
            if not isinstance(t, Tensor):
                continue
            if t.dim() != nb + len(ranks):
                raise ValueError(f"input {name}: {t.dim()} dims, expected {nb} batch dims + ranks {ranks}")
            batch.append(t.shape[:nb])
            for r, s in zip(ranks, t.shape[nb:]):
                if s != 1 or r not in sizes:
                    if sizes.get(r, 1) not in (1, s):
                        raise ValueError(f"rank {r}: size {s} vs {sizes[r]}")
                    sizes[r] = s
        self._batch = _bshape(batch) if batch else ()
        self._sizes = sizes
        self._nb, self._dtype, self._inputs = nb, dtype, inputs
        chunks = dict(chunks or {})
        if len(chunks) > 1:
            raise NotImplementedError("chunking over more than one rank")
        crank = next(iter(chunks), None)
        if crank is not None and any(crank in e.over for e in self.cascade.einsums):
            raise ValueError(f"cannot chunk rank {crank}: it is reduced")
        if self.split is not None:
            if tile is None or tile < 1:
                raise ValueError(f"rank {self.split[0]} is split: give the tile size")
        results = dict(out or {})
        n = sizes.get(crank, 1) if crank else 1
        step = max(1, chunks[crank]) if crank else 1
        for c0 in range(0, n, step) if crank else [0]:
            c1 = min(n, c0 + step)
            csl = {crank: (c0, c1)} if crank else {}
            csizes = dict(sizes)
            if crank:
                csizes[crank] = c1 - c0
            vals = self._run_chunk(csl, csizes, tile, key_range, sizes)
            for o in self.cascade.outputs:
                v = vals[o]
                decl = self._decl_of(o)
                t = self._align(v, decl).t
                if o not in results:
                    shape = self._batch + tuple(sizes[r] if r != crank else n for r in decl)
                    results[o] = torch.empty(shape, dtype=dtype, device=t.device)
                dst = results[o]
                if crank and crank in decl:
                    dst = dst.narrow(nb + decl.index(crank), c0, c1 - c0)
                dst.copy_(t)
        return {o: results[o] for o in self.cascade.outputs}

    def _decl_of(self, name: str) -> tuple[str, ...]:
        return self.decl[name]

    def _run_chunk(self, csl: Slices, csizes: dict[str, int], tile, key_range, full_sizes) -> dict[str, _Val]:
        env: dict[str, _Val] = {}
        self._cslices = csl
        ins: dict[str, _Val] = {}
        self._chunk_inputs = ins
        for i, e in enumerate(self.before):
            env[e.out] = self._einsum(e, i, env, csizes, self._owned_before, phase="before")
        if self.loop is not None:
            rank, inner = self.split
            lo, hi = key_range(csl) if key_range is not None else (0, full_sizes[rank])
            prev: dict[str, _Val] = {}
            for e in self.inside:
                if e.out in self.state:
                    ranks = self.decl[e.out]
                    shape = self._batch + tuple(csizes[r] for r in ranks)
                    prev[e.out] = _Val(torch.full(shape, self.init[e.out], dtype=self._dtype, device=self._device()),
                                       ranks, True)
            self._hoisted: dict[tuple[int, int], _Val] = {}
            chunk = next(iter(csl.values()), None)
            for j0 in range(lo, hi, tile):
                j1 = min(hi, j0 + tile)
                lsizes = dict(csizes)
                lsizes[inner] = j1 - j0
                self._tile = (rank, inner, j0, j1)
                self._tile_inputs: dict[str, _Val] = {}
                local: dict[str, _Val] = {}
                cur: dict[str, _Val] = {}
                biggest = 0
                for i, e in enumerate(self.inside):
                    v = self._einsum(e, i, env, lsizes, self._owned_inside, phase="inside",
                                     local=local, prev=prev, cur=cur)
                    if e.out in self.state:
                        cur[e.out] = v
                    else:
                        local[e.out] = v
                    if _watchers:
                        biggest = max(biggest, v.t.numel())
                prev.update(cur)
                if _watchers:
                    rec = TileRecord(self.key, chunk, (j0, j1), biggest)
                    for w in _watchers:
                        w.append(rec)
            self._tile = None
            env.update(prev)
            for i, e in enumerate(self.after):
                env[e.out] = self._einsum(e, i, env, csizes, self._owned_after, phase="after")
        elif _watchers:
            rec = TileRecord(self.key, next(iter(csl.values()), None), None,
                             max((v.t.numel() for v in env.values()), default=0))
            for w in _watchers:
                w.append(rec)
        return env

    def _device(self):
        for t in self._inputs.values():
            if isinstance(t, Tensor):
                return t.device
        return torch.device("cpu")

    # -- inputs --------------------------------------------------------------------------------
    def _input(self, name: str, tiled: bool) -> Union[_Val, bool, float]:
        cache = self._tile_inputs if tiled else self._chunk_inputs
        hit = cache.get(name)
        if hit is not None:
            return hit
        declared = self.inputs[name]
        src = self._inputs[name]
        nb = self._nb
        sl = dict(self._cslices)
        ranks = declared
        if tiled:
            rank, inner, j0, j1 = self._tile
            sl[rank] = (j0, j1)
            ranks = tuple(inner if r == rank else r for r in declared)
        if isinstance(src, Tensor):
            t = src
            for r, (a, b) in sl.items():
                if r in declared:
                    d = nb + declared.index(r)
                    if t.shape[d] != 1:
                        t = t.narrow(d, a, b - a)
        else:
            t = src({r: sl.get(r, (0, self._sizes[r])) for r in declared})
            if not isinstance(t, Tensor):
                cache[name] = t
                return t
            while t.dim() < nb + len(declared):
                t = t.unsqueeze(0)
        if t.is_floating_point() and t.dtype != self._dtype:
            t = t.to(self._dtype)
        v = _Val(t, ranks, False)
        cache[name] = v
        return v

    # -- one Einsum ------------------------------------------------------------------------------
    def _local_ranks(self, rr: tuple[str, ...]) -> tuple[str, ...]:
        loop = self.loop
        return tuple(r for r in rr if _base(r) != loop and (loop is None or r != loop.upper()))

    def _read_plan(self, n: Node, phase: str):
        """(where, name, want, rename, nxt, tiled) of a READ in a phase; static, cached."""
        key = (id(n), phase)
        plan = self._want.get(key)
        if plan is None:
            name, rr = n.arg
            want = self._local_ranks(rr)
            nxt = any("+" in x for x in rr)
            if name in self.state and phase == "inside":
                where, decl = ("next" if nxt else "prev"), self.decl[name]
            elif name in self.inputs:
                where = "input"
                tiled = phase == "inside" and self.split is not None and self.split[0] in self.inputs[name]
                decl = tuple(self.split[1] if tiled and r == self.split[0] else r for r in self.inputs[name])
            else:
                where, decl = "value", self.decl.get(name, want)
            if len(decl) != len(want):
                raise ValueError(f"{name} read as {rr}, declared with {decl}")
            rename = dict(zip(decl, want)) if decl != want else None
            tiled = where == "input" and phase == "inside" and self.split is not None \
                and self.split[0] in self.inputs[name]
            plan = self._want[key] = (where, name, rename, tiled)
            self._keep.append(n)
        return plan

    def _read(self, n: Node, ctx) -> Union[_Val, bool, float]:
        env, phase, local, prev, cur, owned_ok, idx = ctx
        where, name, rename, tiled = self._read_plan(n, phase)
        if where == "prev":
            v = prev[name]
            owned = v.owned and (idx, name) in owned_ok
        elif where == "next":
            v, owned = cur[name], False
        elif where == "input":
            v = self._input(name, tiled)
            if not isinstance(v, _Val):
                return v
            owned = False
        elif local is not None and name in local:
            v = local[name]
            owned = v.owned and (idx, name) in owned_ok
        elif name in env:
            v = env[name]
            owned = phase != "inside" and v.owned and (idx, name) in owned_ok
        else:
            raise ValueError(f"{name} is read before it is written")
        have = v.ranks
        if rename is not None:
            have = tuple(rename.get(r, r) for r in have)
        return _Val(v.t, have, owned)

    def _einsum(self, e: Einsum, idx: int, env, sizes, owned_ok, phase, local=None, prev=None, cur=None) -> _Val:
        ctx = (env, phase, local, prev, cur, owned_ok, idx)
        over = tuple(r for r in e.over)
        if e.reduce is Op.SUM and over:
            v = self._contract(e, idx, ctx, sizes, phase)
            if v is not None:
                return v
        v = self._eval(e.expr, ctx)
        if not isinstance(v, _Val):  # a constant Einsum
            ranks = self.decl[e.out]
            t = torch.full(self._batch + tuple(sizes[r] for r in ranks), float(v), dtype=self._dtype,
                           device=self._device())
            v = _Val(t, ranks, True)
        if e.reduce is not None and over:
            v = self._reduce(v, e.reduce, over, sizes)
        if v.t.dtype != self._dtype and v.t.is_floating_point():
            v = _Val(v.t.to(self._dtype), v.ranks, True)
        return v

    def _reduce(self, v: _Val, op: Op, over, sizes) -> _Val:
        nb = self._nb
        dims = [nb + v.ranks.index(r) for r in over if r in v.ranks]
        t = v.t
        # a reduced dim that is broadcast (size 1): a sum counts it sizes[r] times
        factor = 1.0
        for r in over:
            if r not in v.ranks or t.shape[nb + v.ranks.index(r)] == 1 and sizes.get(r, 1) != 1:
                if op is Op.SUM:
                    factor *= sizes.get(r, 1)
        if dims:
            t = t.sum(dims) if op is Op.SUM else t.amax(dims)
        if factor != 1.0:
            t = t * factor
        return _Val(t, tuple(r for r in v.ranks if r not in over), True)

    # -- contractions --------------------------------------------------------------------------
    def _node_ranks(self, n: Node) -> set[str]:
        return {r for m in _reads(n) for r in self._local_ranks(m.arg[1])}

    def _invariant(self, n: Node) -> bool:
        """True if n reads nothing the loop changes (no state, no loop values, no tiled input)."""
        for m in _reads(n):
            name, rr = m.arg
            if name in self.state or any(e.out == name for e in self.inside):
                return False
            if name in self.inputs and self.split is not None and self.split[0] in self.inputs[name]:
                return False
        return True

    def _contraction_plan(self, e: Einsum, phase: str):
        """(operand expressions, loop-invariant flags) if e is a product of two operand groups
        summed over ranks they share; None otherwise (static: cached per Einsum and phase)."""
        key = (e.out, phase)
        if key in self._plans:
            return self._plans[key]
        plan = None
        factors = list(e.expr.src) if e.expr.op is Op.MUL else [e.expr]
        scalars = [f for f in factors if not _reads(f)]
        tensors = [f for f in factors if _reads(f)]
        over = set(e.over)
        groups: dict[frozenset, list[Node]] = {}
        for f in tensors:
            groups.setdefault(frozenset(self._node_ranks(f) - over), []).append(f)
        if len(groups) == 2:
            (fa, ga), (fb, gb) = groups.items()
            if not fa & fb and all(over <= self._node_ranks(_mul_nodes(g)) for g in (ga, gb)):
                # constants join a loop-invariant group (hoisted), else the first
                inv = [phase == "inside" and all(self._invariant(f) for f in g) for g in (ga, gb)]
                target = 1 if inv[1] and not inv[0] else 0
                parts = [list(ga), list(gb)]
                parts[target] = scalars + parts[target]
                plan = ([_mul_nodes(g) for g in parts], inv)
        self._plans[key] = plan
        return plan

    def _contract(self, e: Einsum, idx: int, ctx, sizes, phase) -> Optional[_Val]:
        plan = self._contraction_plan(e, phase)
        if plan is None:
            return None
        exprs, inv = plan
        over = set(e.over)
        vals = []
        for gi, g in enumerate(exprs):
            key = (idx, gi)
            if inv[gi] and key in self._hoisted:
                vals.append(self._hoisted[key])
                continue
            v = self._eval(g, ctx)
            if not isinstance(v, _Val):
                return None
            if inv[gi]:
                v = _Val(v.t.contiguous(), v.ranks, False)
                self._hoisted[key] = v
            vals.append(v)
        a, b = vals
        red = tuple(r for r in e.over)
        lfree = tuple(r for r in a.ranks if r not in over)
        rfree = tuple(r for r in b.ranks if r not in over)
        if len(red) != 1 or len(lfree) > 1 or len(rfree) > 1 or red[0] not in a.ranks or red[0] not in b.ranks:
            return self._einsum_fallback(a, b, red, lfree, rfree)
        nb = self._nb
        ta = self._align(a, lfree + red).t
        tb = self._align(b, red + rfree).t
        if not lfree:
            ta = ta.unsqueeze(-2)
        if not rfree:
            tb = tb.unsqueeze(-1)
        dt = self._dtype
        ta, tb = ta.to(dt), tb.to(dt)
        t = _bmm(ta, tb, nb)
        if not rfree:
            t = t.squeeze(-1)
        if not lfree:
            t = t.squeeze(-2)
        return _Val(t, lfree + rfree, True)

    def _einsum_fallback(self, a: _Val, b: _Val, red, lfree, rfree) -> _Val:
        letters = {}
        for r in a.ranks + b.ranks:
            letters.setdefault(r, chr(ord("a") + len(letters)))
        out = lfree + tuple(r for r in rfree if r not in lfree)
        eq = "...{},...{}->...{}".format("".join(letters[r] for r in a.ranks), "".join(letters[r] for r in b.ranks),
                                         "".join(letters[r] for r in out))
        return _Val(torch.einsum(eq, a.t.to(self._dtype), b.t.to(self._dtype)), out, True)

    # -- maps --------------------------------------------------------------------------------
    def _align(self, v: _Val, order: tuple[str, ...]) -> _Val:
        """v's tensor viewed with dims (*batch, *order); ranks v lacks become size-1 dims."""
        if v.ranks == order:
            return v
        nb = self._nb
        t = v.t
        present = [r for r in order if r in v.ranks]
        perm = [v.ranks.index(r) for r in present]
        if perm != list(range(len(perm))):
            t = t.permute(*range(nb), *(nb + p for p in perm))
        shape = list(t.shape[:nb])
        j = nb
        for r in order:
            if r in v.ranks:
                shape.append(t.shape[j])
                j += 1
            else:
                shape.append(1)
        if len(shape) != t.dim():
            t = t.view(shape) if t.is_contiguous() else t.reshape(shape)
        return _Val(t, order, v.owned)

    def _eval(self, n: Node, ctx) -> Union[_Val, bool, float]:
        op = n.op
        if op is Op.READ:
            return self._read(n, ctx)
        if op is Op.CONST:
            return float(n.arg)
        if op is Op.ADD:
            nb = self._negs.get(id(n))
            if nb is None:
                b = _negated(n.src[1]) if len(n.src) == 2 else None
                nb = self._negs[id(n)] = b if b is not None and _reads(b) else False
                self._keep.append(n)
            if nb is not False:
                return self._sub(self._eval(n.src[0], ctx), self._eval(nb, ctx))
        xs = [self._eval(s, ctx) for s in n.src]
        if op is Op.ADD or op is Op.MUL:
            return self._nary(op, xs)
        if op in _UNARY:
            fn, inplace, scalar = _UNARY[op]
            (x,) = xs
            if not isinstance(x, _Val):
                return scalar(x)
            if x.owned:
                getattr(x.t, inplace)()
                return x
            return _Val(fn(x.t), x.ranks, True)
        if op is Op.GELU:
            (x,) = xs
            return _Val(torch.nn.functional.gelu(x.t, approximate=n.arg or "none"), x.ranks, True)
        if op is Op.MAX2:
            return self._max2(*xs)
        if op is Op.WHERE:
            return self._where(*xs)
        raise NotImplementedError(f"op {op.name} in a cascade map")

    def _common(self, vals: list[_Val]) -> tuple[tuple[str, ...], list[_Val], torch.Size]:
        r0 = vals[0].ranks
        if all(v.ranks == r0 for v in vals):
            return r0, list(vals), _bshape([v.t.shape for v in vals])
        first = max(vals, key=lambda v: (len(v.ranks), v.owned))
        order = first.ranks + tuple(r for v in vals for r in v.ranks if r not in first.ranks)
        order = tuple(dict.fromkeys(order))
        al = [self._align(v, order) for v in vals]
        return order, al, _bshape([v.t.shape for v in al])

    def _nary(self, op: Op, xs) -> Union[_Val, float]:
        scal = [x for x in xs if not isinstance(x, _Val)]
        vals = [x for x in xs if isinstance(x, _Val)]
        c = sum(scal) if op is Op.ADD else math.prod(scal)
        if not vals:
            return c
        order, al, shape = self._common(vals)
        # accumulate into an owned operand of the full shape if there is one
        al.sort(key=lambda v: not (v.owned and v.t.shape == shape and v.t.dtype == self._dtype))
        acc = al[0]
        t, owned = acc.t, acc.owned and acc.t.shape == shape and acc.t.dtype == self._dtype
        for v in al[1:]:
            if owned:
                (t.add_ if op is Op.ADD else t.mul_)(v.t)
            else:
                t = t + v.t if op is Op.ADD else t * v.t
                owned = t.shape == shape
        if (op is Op.ADD and c != 0.0) or (op is Op.MUL and c != 1.0):
            if owned:
                (t.add_ if op is Op.ADD else t.mul_)(c)
            else:
                t = t + c if op is Op.ADD else t * c
                owned = True
        return _Val(t, order, owned or t is not acc.t)

    def _sub(self, a, b) -> Union[_Val, float]:
        """a - b (the map a + (-1)*b), in place in a when a is owned and has the full shape."""
        if not isinstance(a, _Val) or not isinstance(b, _Val):
            return self._nary(Op.ADD, [a, -b if not isinstance(b, _Val) else _Val(-b.t, b.ranks, True)])
        order, (x, y), shape = self._common([a, b])
        if x.owned and x.t.shape == shape and x.t.dtype == self._dtype:
            x.t.sub_(y.t)
            return _Val(x.t, order, True)
        return _Val(x.t - y.t, order, True)

    def _max2(self, a, b) -> Union[_Val, float]:
        if not isinstance(a, _Val) and not isinstance(b, _Val):
            return max(a, b)
        if not isinstance(a, _Val):
            a, b = b, a
        if not isinstance(b, _Val):
            if a.owned:
                a.t.clamp_min_(b)
                return a
            return _Val(torch.clamp_min(a.t, b), a.ranks, True)
        order, (x, y), shape = self._common([a, b])
        for o in (x, y):
            if o.owned and o.t.shape == shape:
                torch.maximum(x.t, y.t, out=o.t)
                return _Val(o.t, order, True)
        return _Val(torch.maximum(x.t, y.t), order, True)

    def _where(self, cond, a, b) -> Union[_Val, float]:
        if not isinstance(cond, _Val):
            return a if cond else b
        if isinstance(a, _Val) and not isinstance(b, _Val):
            order, (cc, x), shape = self._common([cond, a])
            if x.owned and x.t.shape == shape:
                x.t.masked_fill_(cc.t.logical_not(), b)
                return _Val(x.t, order, True)
            return _Val(torch.where(cc.t, x.t, b), order, True)
        if isinstance(b, _Val) and not isinstance(a, _Val):
            order, (cc, y), shape = self._common([cond, b])
            if y.owned and y.t.shape == shape:
                y.t.masked_fill_(cc.t, a)
                return _Val(y.t, order, True)
            return _Val(torch.where(cc.t, a, y.t), order, True)
        if not isinstance(a, _Val):  # both scalars
            order, (cc,), _ = self._common([cond])
            t = torch.where(cc.t, torch.tensor(a, dtype=self._dtype), torch.tensor(b, dtype=self._dtype))
            return _Val(t, order, True)
        order, (cc, x, y), _ = self._common([cond, a, b])
        return _Val(torch.where(cc.t, x.t, y.t), order, True)


def _bshape(shapes) -> tuple[int, ...]:
    """Broadcast shape of same-rank shapes (what `_align` produces), as a tuple."""
    out = list(shapes[0])
    for sh in shapes[1:]:
        if len(sh) != len(out):
            return tuple(torch.broadcast_shapes(*shapes))
        for i, d in enumerate(sh):
            if d != out[i]:
                if out[i] == 1:
                    out[i] = d
                elif d != 1:
                    raise RuntimeError(f"shapes {list(shapes)} do not broadcast")
    return tuple(out)


def _negated(n: Node) -> Optional[Node]:
    """b if n is (-1) * b, else None."""
    if n.op is Op.MUL and len(n.src) >= 2 and n.src[0].op is Op.CONST and n.src[0].arg == -1.0:
        return n.src[1] if len(n.src) == 2 else _mul_nodes(list(n.src[1:]))
    return None


def _mul_nodes(g: list[Node]) -> Node:
    from einfuse.ir.node import node
    return g[0] if len(g) == 1 else node(Op.MUL, tuple(g))


def _bmm(a: Tensor, b: Tensor, nb: int) -> Tensor:
    """a [*batch, M, K] @ b [*batch, K, N] with broadcast batch dims; trailing batch dims where b
    has size 1 and a does not are folded into a's rows (one matmul, no expanded copy of b)."""
    j = nb
    while j > 0 and b.shape[j - 1] == 1 and a.shape[j - 1] != 1:
        j -= 1
    if j == nb:
        return torch.matmul(a, b)
    lead = a.shape[:j]
    rows = math.prod(a.shape[j:nb]) * a.shape[-2]
    try:
        a2 = a.view(*lead, rows, a.shape[-1])
    except RuntimeError:
        a2 = a.reshape(*lead, rows, a.shape[-1])
    b2 = b.reshape(*b.shape[:j], *b.shape[nb:])
    out = torch.matmul(a2, b2)
    return out.view(*out.shape[:j], *a.shape[j:nb], a.shape[-2], b.shape[-1])
