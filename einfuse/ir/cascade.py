"""The einsum-cascade IR (FuseMax's extended Einsums), its printer and interpreter.

A cascade is an ordered list of Einsums over named ranks. Each Einsum writes
one tensor from a map expression over its inputs (a `Node` tree whose leaves
are READ(tensor, ranks) and CONST), optionally reduced over some ranks with
SUM or MAX. An *iterative* Einsum carries running state over a rank: it
writes `T[k+1]` from `T[k]` (ranks spelled "k+1" / "k"), starting from
`init`; the interpreter runs it as a loop over k.

    QK[p,m] = sum_e Q[p,e] * K[m,e]
    GM[p]   = max_m QK[p,m]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import torch

from .node import Node, Op, node, const


@dataclass(frozen=True)
class Einsum:
    out: str
    ranks: tuple[str, ...]            # output ranks; "k+1" marks a running-state write
    expr: Node                        # map expression over READ/CONST leaves
    reduce: Op | None = None          # Op.SUM | Op.MAX | None
    over: tuple[str, ...] = ()        # reduced ranks
    init: float | None = None         # initial value of running state (iterative Einsums)


@dataclass(frozen=True)
class Cascade:
    name: str
    inputs: tuple[tuple[str, tuple[str, ...]], ...]   # (tensor, ranks) read from outside
    einsums: tuple[Einsum, ...]
    outputs: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())
    # rank splits (rank, outer, inner): rank m read as (m1, m0) means index m1*M0 + m0, where
    # M0 is the tile size (sizes[inner] at run time); the last tile may be ragged
    splits: tuple[tuple[str, str, str], ...] = field(default=())

    # -- structure ---------------------------------------------------------------
    def key(self) -> str:
        """Structural hash: tensor and rank names are renamed by first use."""
        return hashlib.sha256(canonical_text(self).encode()).hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return isinstance(other, Cascade) and canonical_text(self) == canonical_text(other)

    def __hash__(self) -> int:
        return hash(canonical_text(self))

    def __str__(self) -> str:
        return format_cascade(self)


def read(tensor: str, *ranks: str) -> Node:
    return node(Op.READ, (), (tensor, tuple(ranks)))


# ---------------------------------------------------------------------------------
# printer

_INFIX = {Op.ADD: " + ", Op.MUL: " * "}
_FUNC = {Op.EXP: "exp", Op.LOG: "log", Op.SQRT: "sqrt", Op.RSQRT: "rsqrt", Op.TANH: "tanh",
         Op.SIGMOID: "sigmoid", Op.MAX2: "max", Op.WHERE: "where", Op.GELU: "gelu"}


def format_expr(n: Node, rename=lambda s: s) -> str:
    if n.op is Op.READ:
        t, ranks = n.arg
        return f"{rename(t)}[{','.join(rename(r) for r in ranks)}]" if ranks else rename(t)
    if n.op is Op.CONST:
        return f"{n.arg:g}"
    if n.op in _INFIX:
        parts = []
        for s in n.src:
            txt = format_expr(s, rename)
            if s.op in _INFIX and s.op is not n.op:
                txt = f"({txt})"
            parts.append(txt)
        if n.op is Op.ADD:  # a + (-1)*b prints as a - b (positive terms first)
            def negative(s):
                return s.op is Op.MUL and s.src[0].op is Op.CONST and s.src[0].arg == -1.0
            pairs = sorted(zip(n.src, parts), key=lambda p: negative(p[0]))
            srcs, parts = [p[0] for p in pairs], [p[1] for p in pairs]
            out = parts[0]
            for s, txt in zip(srcs[1:], parts[1:]):
                if s.op is Op.MUL and s.src[0].op is Op.CONST and s.src[0].arg == -1.0:
                    out += " - " + _wrap(format_expr(node(Op.MUL, s.src[1:]) if len(s.src) > 2 else s.src[1], rename))
                else:
                    out += " + " + txt
            return out
        return _INFIX[n.op].join(parts)
    if n.op is Op.NEG:
        return f"-{_wrap(format_expr(n.src[0], rename))}"
    if n.op is Op.RECIP:
        return f"1/{_wrap(format_expr(n.src[0], rename))}"
    name = _FUNC.get(n.op, n.op.name.lower())
    return f"{name}({', '.join(format_expr(s, rename) for s in n.src)})"


def _wrap(t: str) -> str:
    return t if t.replace("_", "").replace("[", "").replace("]", "").replace(",", "").replace("+", "").isalnum() else f"({t})"


def format_einsum(e: Einsum, rename=lambda s: s) -> str:
    lhs = f"{rename(e.out)}[{','.join(rename(r) for r in e.ranks)}]" if e.ranks else rename(e.out)
    rhs = format_expr(e.expr, rename)
    if e.reduce is not None:
        op = "sum" if e.reduce is Op.SUM else "max"
        rhs = f"{op}_{''.join(rename(r) for r in e.over)} {rhs}"
    init = f"    (from {e.init:g})" if e.init is not None else ""
    return f"{lhs} = {rhs}{init}"


def format_cascade(c: Cascade, rename=lambda s: s) -> str:
    lines = [f"split {rename(r)} -> {rename(o)},{rename(i)}" for r, o, i in c.splits]
    lines += [format_einsum(e, rename) for e in c.einsums]
    return "\n".join(lines)


def canonical_text(c: Cascade) -> str:
    """The cascade printed with tensors and ranks renamed in order of first use."""
    names: dict[str, str] = {}

    def rename(s: str) -> str:
        base, plus, off = s.partition("+")
        if base not in names:
            names[base] = f"t{len(names)}"
        return names[base] + (plus + off if plus else "")
    body = format_cascade(c, rename)
    outs = ",".join(rename(o) for o in c.outputs)
    return f"{body}\n-> {outs}"


# ---------------------------------------------------------------------------------
# reference interpreter

def _rank_base(r: str) -> tuple[str, int]:
    base, _, off = r.partition("+")
    return base, int(off) if off else 0


class CascadeInterpreter:
    """Evaluates a cascade with torch (fp64 by default): the executable meaning of the IR.

    Non-iterative Einsums are evaluated at once over all their ranks (broadcast
    map, then reduce). If some Einsum writes running state over a rank k
    (ranks spelled "k+1"), every Einsum with k among its ranks runs inside one
    sequential loop over k, in cascade order: this is what makes a 1-pass
    cascade run in one pass with a buffer independent of the iterated rank.
    Inside the loop a read of state at "k" is the previous value (`init` on
    the first iteration) and a read at "k+1" is the value written in this
    iteration. Einsums that need none of the loop run before it; the others
    run after it and read the final state (a read may spell the final index
    as the capitalised rank, `RNV[M1,p,f]`).

    A rank split (`Cascade.splits`, rank m -> (m1, m0)) lets a cascade read an
    m-indexed input as `K[m1,m0,e]`: iteration m1 sees the tile
    m1*M0 ... m1*M0 + M0 - 1 (M0 = sizes[m0]); the last tile may be shorter.
    """

    def __init__(self, cascade: Cascade):
        self.c = cascade

    def run(self, inputs: dict[str, torch.Tensor], sizes: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
        env: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {}
        sizes = dict(sizes or {})
        for name, ranks in self.c.inputs:
            t = inputs[name]
            if t.dim() != len(ranks):
                raise ValueError(f"input {name} has {t.dim()} dims, cascade expects ranks {ranks}")
            for r, s in zip(ranks, t.shape):
                if sizes.setdefault(r, s) != s and s != 1:
                    raise ValueError(f"rank {r}: size {s} vs {sizes[r]}")
            env[name] = (t, ranks)
        for rank, outer, inner in self.c.splits:
            if inner not in sizes:
                raise ValueError(f"rank {rank} is split into ({outer}, {inner}): give sizes[{inner!r}] (the tile)")
            sizes[outer] = -(-sizes[rank] // sizes[inner])
        loop_rank = self._loop_rank()
        if loop_rank is None:
            for e in self.c.einsums:
                self._eval(e, env, sizes)
        else:
            self._run_loop(loop_rank, env, sizes)
        return {o: env[o][0] for o in self.c.outputs}

    # -- iterative execution ---------------------------------------------------------
    def _loop_rank(self) -> str | None:
        for e in self.c.einsums:
            for r in e.ranks:
                base, off = _rank_base(r)
                if off:
                    return base
        return None

    def _run_loop(self, k: str, env, sizes):
        es = self.c.einsums
        inside = [e for e in es if any(_rank_base(r)[0] == k for r in e.ranks)]
        if any(k in e.over for e in es):
            raise NotImplementedError(f"a reduction over the iterated rank {k} (use running state instead)")
        state_names = {e.out for e in inside if any(_rank_base(r)[1] for r in e.ranks)}
        # Einsums outside the loop that (transitively) read a loop result run after it
        late = {e.out for e in inside}
        after = []
        for e in es:
            if e not in inside and reads(e.expr) & late:
                after.append(e)
                late.add(e.out)
        before = [e for e in es if e not in inside and e not in after]
        for e in before:
            self._eval(e, env, sizes)
        split = next(((r, i) for r, o, i in self.c.splits if o == k), None)
        if split is not None:
            rank, inner = split
            n_k, tile = sizes[k], sizes[inner]
        else:
            n_k = sizes[k]
        prev: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {}
        for e in inside:
            if e.out in state_names:
                other = tuple(r for r in e.ranks if _rank_base(r)[0] != k)
                init = e.init if e.init is not None else 0.0
                prev[e.out] = (torch.full([sizes[r] for r in other], init, dtype=self._dtype(env)), other)
        for i in range(n_k):
            lsizes = dict(sizes)
            if split is not None:
                t0, t1 = i * tile, min((i + 1) * tile, sizes[rank])
                lsizes[inner] = t1 - t0
                local = {name: self._tile(v, rank, inner, t0, t1) for name, v in env.items()}
            else:
                local = {name: self._slice(v, k, i) for name, v in env.items()}
            cur: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {}
            for e in inside:
                view = dict(local)
                view.update(prev)                                   # state read at k: previous value
                view.update({f"{n}@next": v for n, v in cur.items()})  # state read at k+1: this iteration's
                res = self._eval_expr(e, view, lsizes, drop_rank=k)
                if e.out in state_names:
                    cur[e.out] = res
                else:
                    local[e.out] = res
            prev.update(cur)
        for name, v in prev.items():
            env[name] = v
        for e in after:
            self._eval(e, env, sizes, final_rank=k)

    @staticmethod
    def _slice(v, k, i):
        t, ranks = v
        if k in ranks:
            d = ranks.index(k)
            return (t.select(d, i) if t.shape[d] > 1 else t.select(d, 0), tuple(r for r in ranks if r != k))
        return v

    @staticmethod
    def _tile(v, rank, inner, t0, t1):
        t, ranks = v
        if rank in ranks:
            d = ranks.index(rank)
            t = t.narrow(d, t0, t1 - t0) if t.shape[d] > 1 else t
            return t, tuple(inner if r == rank else r for r in ranks)
        return v

    @staticmethod
    def _dtype(env):
        for t, _ in env.values():
            if t.is_floating_point():
                return t.dtype
        return torch.float64

    # -- one Einsum ----------------------------------------------------------------------
    def _eval(self, e: Einsum, env, sizes, final_rank: str | None = None):
        env[e.out] = self._eval_expr(e, env, sizes, final_rank=final_rank)

    def _eval_expr(self, e: Einsum, env, sizes, drop_rank: str | None = None, final_rank: str | None = None):
        out_ranks = tuple(_rank_base(r)[0] for r in e.ranks if _rank_base(r)[0] != drop_rank)
        all_ranks = out_ranks + tuple(r for r in e.over if r not in out_ranks)
        value = self._value(e.expr, env, all_ranks, drop_rank, final_rank)
        value = value.expand(tuple(sizes.get(r, 1) for r in all_ranks))
        if e.reduce is not None and e.over:
            dims = [all_ranks.index(r) for r in e.over]
            value = value.sum(dims) if e.reduce is Op.SUM else value.amax(dims)
        return value, out_ranks

    def _value(self, n: Node, env, ranks, drop_rank, final_rank=None):
        if n.op is Op.READ:
            name, rr = n.arg
            dropped = {drop_rank, final_rank, final_rank.upper() if final_rank else None} - {None}
            if drop_rank is not None and any(_rank_base(r) == (drop_rank, 1) for r in rr):
                name = f"{name}@next"
                if name not in env:
                    raise ValueError(f"{n.arg[0]}[{drop_rank}+1] is read before it is written")
            t, have = env[name]
            want = tuple(_rank_base(r)[0] for r in rr if _rank_base(r)[0] not in dropped)
            if set(want) != set(have) and len(want) == len(have):
                have = want  # positional rename: a tensor read under other rank names
            perm = [have.index(r) for r in ranks if r in have]
            t = t.permute(*perm) if perm != list(range(len(perm))) else t
            shape = []
            j = 0
            for r in ranks:
                if r in have:
                    shape.append(t.shape[j])
                    j += 1
                else:
                    shape.append(1)
            return t.reshape(shape)
        if n.op is Op.CONST:
            return torch.tensor(n.arg, dtype=self._dtype(env))
        vals = [self._value(s, env, ranks, drop_rank, final_rank) for s in n.src]
        return _EVAL[n.op](*vals) if n.op not in (Op.GELU,) else _gelu(vals[0], n.arg)


def _gelu(x, approx):
    return torch.nn.functional.gelu(x, approximate=approx or "none")


def _prod(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


def _sum(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


_EVAL = {
    Op.ADD: _sum, Op.MUL: _prod, Op.NEG: torch.neg, Op.RECIP: torch.reciprocal, Op.SQRT: torch.sqrt,
    Op.RSQRT: torch.rsqrt, Op.EXP: torch.exp, Op.LOG: torch.log, Op.TANH: torch.tanh,
    Op.SIGMOID: torch.sigmoid, Op.MAX2: torch.maximum, Op.WHERE: torch.where,
}


def _leaves(n: Node) -> Iterable[Node]:
    stack = [n]
    while stack:
        m = stack.pop()
        if not m.src:
            yield m
        stack.extend(m.src)


def reads(n: Node) -> set[str]:
    return {m.arg[0] for m in _leaves(n) if m.op is Op.READ}
