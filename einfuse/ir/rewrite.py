"""The one rewrite driver.

Rules are data: a list of `(Op, callback)` pairs. `graph_rewrite` visits nodes
bottom-up; for a node whose op has rules, each callback is tried in order and
the first non-None result replaces the node, after which the replacement is
itself rewritten, to a fixed point. No pass writes its own graph walk.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

from .node import Node, Op, node, toposort

Rule = tuple[Op, Callable[[Node], "Node | None"]]


class RuleTable:
    def __init__(self, rules: Iterable[Rule], name: str):
        self.name = name
        self.rules = list(rules)
        self.by_op: dict[Op, list] = defaultdict(list)
        for op, fn in self.rules:
            self.by_op[op].append(fn)

    def __add__(self, other: "RuleTable") -> "RuleTable":
        return RuleTable(self.rules + other.rules, f"{self.name}+{other.name}")


def graph_rewrite(roots: list[Node], table: RuleTable, max_steps: int = 100_000) -> list[Node]:
    """Rewrite every node reachable from roots to a fixed point; return the new roots."""
    # id -> (node, rewritten): holding the node keeps its id from being recycled by a new node
    memo: dict[int, tuple[Node, Node]] = {}
    steps = 0

    def rewrite_one(n: Node) -> Node:
        nonlocal steps
        while True:
            for fn in table.by_op.get(n.op, ()):
                out = fn(n)
                if out is not None and out is not n:
                    steps += 1
                    if steps > max_steps:
                        raise RuntimeError(f"graph_rewrite({table.name}) did not reach a fixed point")
                    # the replacement's sources may be new: rewrite them first
                    n = rebuild(out)
                    break
            else:
                return n

    def rebuild(n: Node) -> Node:
        for m in toposort(n):
            if id(m) in memo:
                continue
            src = tuple(memo[id(s)][1] if id(s) in memo else s for s in m.src)
            base = m if src == m.src else node(m.op, src, m.arg, m.shape)
            memo[id(m)] = (m, rewrite_one(base))
        return memo[id(n)][1]

    return [rebuild(r) for r in roots]
