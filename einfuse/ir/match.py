"""Matching a canonical pattern against a canonical expression DAG.

A pattern is the canonical form of a plain torch reference function: its
inputs are VAR leaves that bind to any node (the same variable must bind the
same node everywhere, which DAG sharing makes an identity check), and its
constants match equal constants. ADD and MUL are n-ary and commutative, so
their operands are matched under every permutation (patterns are small).
The deepest mismatch is kept as the reason a candidate was rejected.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .node import Node, Op, COMMUTATIVE

_OP_WORDS = {Op.INPUT: "an opaque value", Op.CONST: "a constant"}


def describe(n: Node) -> str:
    if n.op is Op.CONST:
        return f"constant {n.arg:g}"
    if n.op is Op.INPUT:
        return f"opaque value {n.arg}"
    if n.op is Op.VAR:
        return f"input {n.arg}"
    arg = "" if n.arg is None else f"[{n.arg}]"
    return f"{n.op.name.lower()}{arg}"


@dataclass
class MatchResult:
    bindings: dict[str, Node] | None
    reason: str = ""
    depth: int = -1
    covered: list[Node] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.bindings is not None


def match(pattern: Node, target: Node) -> MatchResult:
    best = MatchResult(None, "", -1)

    best_rank = [(-1, 0)]

    def fail(p: Node, t: Node, depth: int, why: str):
        # the deepest mismatch wins; at equal depth an opaque value explains more than a constant
        # (an op with the wrong argument explains more still: it is the near miss itself)
        rank = (depth, 2 if p.op is t.op else 1 if t.op is Op.INPUT else 0)
        if rank > best_rank[0]:
            best_rank[0] = rank
            best.depth, best.reason = depth, why

    def go(p: Node, t: Node, env: dict, depth: int, covered: list) -> dict | None:
        if p.op is Op.VAR:
            bound = env.get(p.arg)
            if bound is None:
                env = dict(env)
                env[p.arg] = t
                return env
            if bound is t:
                return env
            fail(p, t, depth, f"input {p.arg} is used as two different values ({describe(bound)} vs {describe(t)})")
            return None
        if p.op is not t.op:
            fail(p, t, depth, f"expected {describe(p)}, found {describe(t)}")
            return None
        if p.op is Op.CONST:
            if p.arg is None or p.arg == t.arg or abs(p.arg - t.arg) <= 1e-12 * max(1.0, abs(p.arg)):
                return env
            fail(p, t, depth, f"expected constant {p.arg:g}, found {t.arg:g}")
            return None
        if p.arg != t.arg:
            fail(p, t, depth, f"{p.op.name.lower()} over {t.arg}, expected {p.arg}")
            return None
        if len(p.src) != len(t.src):
            fail(p, t, depth, f"{describe(t)} has {len(t.src)} operands, expected {len(p.src)}")
            return None
        orders = itertools.permutations(t.src) if (p.op in COMMUTATIVE and len(t.src) <= 6) else [t.src]
        for order in orders:
            e = env
            mark = len(covered)
            for ps, ts in zip(p.src, order):
                e = go(ps, ts, e, depth + 1, covered)
                if e is None:
                    break
            if e is not None:
                covered.append(t)
                return e
            del covered[mark:]
        return None

    covered: list[Node] = []
    env = go(pattern, target, {}, 0, covered)
    if env is None:
        return MatchResult(None, best.reason or "no match", best.depth)
    return MatchResult(env, "", 0, covered)
