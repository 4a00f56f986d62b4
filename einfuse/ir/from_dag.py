"""Lowering a matched expression region (canonical DAG) to an einsum cascade.

Ranks are named by position, aligned to the right as broadcasting aligns
them. Each reduction becomes its own Einsum (its output drops the reduced
ranks); maps are inlined into the Einsum that consumes them, so a cascade has
one Einsum per reduction plus one for each output.
"""

from __future__ import annotations

from .cascade import Cascade, Einsum, read
from .node import Node, Op, REDUCE, node, toposort

_NAMES = "bshdefgijklnopqrtuvwxyz"


def _rank_names(nd: int) -> tuple[str, ...]:
    # the last dims get the conventional names for a [batch, sequence, hidden] row program
    base = ("b", "s", "h") if nd <= 3 else tuple(_NAMES[i] for i in range(nd - 3)) + ("b", "s", "h")
    return base[-nd:] if nd else ()


def dag_to_cascade(name: str, outputs: dict[str, Node], inputs: dict[int, str]) -> Cascade:
    """`inputs` maps id(node) -> tensor name for the region's leaves."""
    order = toposort(list(outputs.values()), stop=set(inputs))
    nd = max((len(n.shape) for n in order if n.shape is not None), default=0)
    names = _rank_names(nd)
    pos: dict[int, tuple[str, ...]] = {}     # positional ranks (right-aligned)
    live: dict[int, tuple[str, ...]] = {}    # ranks actually carried (keepdim-reduced ones dropped)
    expr: dict[int, Node] = {}
    einsums: list[Einsum] = []
    decl: dict[str, tuple[str, ...]] = {}
    n_red = 0
    for n in order:
        if id(n) in inputs:
            r = names[nd - len(n.shape):] if n.shape else ()
            pos[id(n)] = live[id(n)] = r
            t = inputs[id(n)]
            decl[t] = r
            expr[id(n)] = read(t, *r)
            continue
        if n.op is Op.CONST:
            pos[id(n)], live[id(n)] = (), ()
            expr[id(n)] = n
            continue
        if n.op in REDUCE:
            (x,) = n.src
            dims, keep = n.arg
            if not keep:
                raise ValueError("reduction without keepdim is not representable here")
            xr = pos[id(x)]
            over = tuple(xr[d] for d in dims)
            out_live = tuple(r for r in live[id(x)] if r not in over)
            tname = f"R{n_red}"
            n_red += 1
            einsums.append(Einsum(tname, out_live, expr[id(x)], n.op, over))
            pos[id(n)], live[id(n)] = xr, out_live
            expr[id(n)] = read(tname, *out_live)
            continue
        if n.op in (Op.ADD, Op.MUL, Op.NEG, Op.RECIP, Op.SQRT, Op.RSQRT, Op.EXP, Op.LOG, Op.TANH,
                    Op.SIGMOID, Op.GELU, Op.MAX2, Op.WHERE):
            srcs = n.src
            p = max((pos[id(s)] for s in srcs), key=len)
            lv = tuple(r for r in p if any(r in live[id(s)] for s in srcs))
            pos[id(n)], live[id(n)] = p, lv
            parts = [expr[id(s)] for s in srcs]
            if n.op in (Op.ADD, Op.MUL):  # re-sort: operand order must not depend on FX node names
                parts.sort(key=lambda e: e.key)
            expr[id(n)] = node(n.op, tuple(parts), n.arg)
            continue
        raise ValueError(f"{n.op.name.lower()} is not representable as a row-program cascade")
    for oname, o in outputs.items():
        einsums.append(Einsum(oname, live[id(o)], expr[id(o)]))
    return Cascade(name, tuple(decl.items()), tuple(einsums), tuple(outputs))
