"""Lowering a matched expression region (canonical DAG) to an einsum cascade.

Every dimension of every node gets a rank name. Names start fresh at the
region's inputs and are unified (union-find) where the math says two
dimensions are the same: broadcasting aligns ranks from the right, a
contraction (matmul, linear, einsum) joins the contracted ranks, a transpose
permutes names, and a view that only adds or drops size-1 dimensions keeps
them. Size-1 (broadcast) dimensions carry no rank.

Each reduction, contraction and softmax step becomes its own Einsum; maps are
inlined into the Einsum that consumes them, so a cascade has one Einsum per
reduction plus one for each output. Finally ranks get readable names: the
first output's ranks are named like a [batch, ..., sequence, hidden] row
program (b, s, h) and the others after FuseMax's attention (m, e, f, ...).
"""

from __future__ import annotations

from .cascade import Cascade, Einsum, read
from .node import Node, Op, const, node, toposort

_MAPS = {Op.ADD, Op.MUL, Op.NEG, Op.RECIP, Op.SQRT, Op.RSQRT, Op.EXP, Op.LOG, Op.TANH, Op.SIGMOID,
         Op.GELU, Op.MAX2, Op.WHERE}


class _Ranks:
    """Union-find over rank names."""

    def __init__(self):
        self.parent: dict[str, str] = {}
        self.n = 0

    def fresh(self) -> str:
        self.n += 1
        r = f"_r{self.n}"
        self.parent[r] = r
        return r

    def find(self, r: str) -> str:
        while self.parent[r] != r:
            self.parent[r] = self.parent[self.parent[r]]
            r = self.parent[r]
        return r

    def union(self, a: str, b: str) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a


class NotRepresentable(ValueError):
    pass


def dag_to_cascade(name: str, outputs: dict[str, Node], inputs: dict[int, str]) -> Cascade:
    """`inputs` maps id(node) -> tensor name for the region's leaves."""
    order = toposort(list(outputs.values()), stop=set(inputs))
    uf = _Ranks()
    dims: dict[int, list[str | None]] = {}   # per node: a rank per dimension, None for size 1
    expr: dict[int, Node] = {}                # per node: its value as a map over READs
    einsums: list[Einsum] = []
    decl: dict[str, list[str | None]] = {}
    counter = [0]

    def shape(n: Node) -> tuple:
        if n.shape is None:
            raise NotRepresentable(f"{n.op.name.lower()} has no known shape")
        return n.shape

    def live(n: Node) -> tuple[str, ...]:
        return tuple(r for r in dims[id(n)] if r is not None)

    def materialise(value: Node, ranks: list[str | None], reduce: Op | None = None,
                    over: tuple[str, ...] = ()) -> Node:
        """Write `value` to a new tensor (an Einsum) and return a READ of it."""
        tname = f"T{counter[0]}"
        counter[0] += 1
        out = tuple(r for r in ranks if r is not None)
        einsums.append(Einsum(tname, out, value, reduce, over))
        return read(tname, *out)

    def broadcast(srcs) -> list[str | None]:
        nd = max(len(dims[id(s)]) for s in srcs)
        out: list[str | None] = [None] * nd
        for s in srcs:
            d = dims[id(s)]
            for i, r in enumerate(d):
                j = nd - len(d) + i
                if r is None:
                    continue
                if out[j] is None:
                    out[j] = r
                else:
                    uf.union(out[j], r)
        return out

    for n in order:
        if id(n) in inputs:
            t = inputs[id(n)]
            rk = [None if s == 1 else uf.fresh() for s in shape(n)]
            dims[id(n)] = rk
            decl[t] = rk
            expr[id(n)] = ("READ", t)  # resolved after unification
            continue
        if n.op is Op.CONST:
            dims[id(n)], expr[id(n)] = [], n
            continue
        if n.op in _MAPS:
            dims[id(n)] = broadcast(n.src)
            expr[id(n)] = ("MAP", n)
            continue
        if n.op in (Op.SUM, Op.MAX):
            (x,) = n.src
            ds, keep = n.arg
            xr = dims[id(x)]
            over = tuple(xr[d] for d in ds if xr[d] is not None)
            rest = [None if i - len(xr) in ds else r for i, r in enumerate(xr)]
            dims[id(n)] = rest if keep else [r for i, r in enumerate(xr) if i - len(xr) not in ds]
            expr[id(n)] = ("RED", n, over, rest)
            continue
        if n.op in (Op.MATMUL, Op.LINEAR):
            a, b = n.src[0], n.src[1]
            ar, br = list(dims[id(a)]), list(dims[id(b)])
            if n.op is Op.LINEAR:
                br = br[::-1]  # w is [out, in]: contract x's last with w's last
            if len(ar) < 2 or len(br) < 2:
                raise NotRepresentable("matrix-vector products are not lowered")
            k_a, k_b = ar[-1], br[-2]
            if k_a is None or k_b is None:
                raise NotRepresentable("contraction over a size-1 dimension")
            uf.union(k_a, k_b)
            batch_a, batch_b = ar[:-2], br[:-2]
            nd = max(len(batch_a), len(batch_b))
            batch: list[str | None] = [None] * nd
            for bb in (batch_a, batch_b):
                for i, r in enumerate(bb):
                    j = nd - len(bb) + i
                    if r is not None:
                        if batch[j] is None:
                            batch[j] = r
                        else:
                            uf.union(batch[j], r)
            dims[id(n)] = batch + [ar[-2], br[-1]]
            expr[id(n)] = ("CONTRACT", n, k_a)
            continue
        if n.op is Op.EINSUM:
            lhs, rhs = n.arg.split("->")
            letters: dict[str, str] = {}
            for spec, s in zip(lhs.split(","), n.src):
                for ch, r in zip(spec, dims[id(s)]):
                    if r is None:
                        continue
                    if ch in letters:
                        uf.union(letters[ch], r)
                    else:
                        letters[ch] = r
            dims[id(n)] = [letters.get(ch) for ch in rhs]
            over = tuple(letters[ch] for ch in dict.fromkeys(lhs.replace(",", "")) if ch not in rhs and ch in letters)
            expr[id(n)] = ("EINSUM", n, over)
            continue
        if n.op is Op.TRANSPOSE:
            (x,) = n.src
            xr = list(dims[id(x)])
            i, j = n.arg
            xr[i], xr[j] = xr[j], xr[i]
            dims[id(n)], expr[id(n)] = xr, ("ALIAS", x)
            continue
        if n.op in (Op.RESHAPE, Op.EXPAND, Op.INDEX):
            (x,) = n.src
            xr = [r for r in dims[id(x)] if r is not None]
            big = [s for s in shape(n) if s != 1]
            xs = [s for s in shape(x) if s != 1]
            if n.op is Op.EXPAND:
                if big != xs:
                    raise NotRepresentable("expand that repeats data (a broadcast rank) is not lowered")
            elif big != xs:
                raise NotRepresentable(f"{n.op.name.lower()} that splits or merges ranks is not lowered")
            it = iter(xr)
            dims[id(n)] = [None if s == 1 else next(it) for s in shape(n)]
            expr[id(n)] = ("ALIAS", x)
            continue
        if n.op in (Op.SOFTMAX, Op.LOG_SOFTMAX):
            (x,) = n.src
            dims[id(n)] = list(dims[id(x)])
            expr[id(n)] = ("SOFTMAX", n)
            continue
        raise NotRepresentable(f"{n.op.name.lower()} is not representable as a cascade")

    # --- second walk: rank names are final now; build the Einsums -----------------------
    def R(rs) -> list[str | None]:
        return [None if r is None else uf.find(r) for r in rs]

    built: dict[int, Node] = {}

    def value(n: Node) -> Node:
        if id(n) in built:
            return built[id(n)]
        kind = expr[id(n)]
        if isinstance(kind, Node):
            out = kind
        elif kind[0] == "READ":
            out = read(kind[1], *[r for r in R(dims[id(n)]) if r is not None])
        elif kind[0] == "ALIAS":
            out = value(kind[1])
        elif kind[0] == "MAP":
            parts = [value(s) for s in n.src]
            if n.op in (Op.ADD, Op.MUL):  # operand order must not depend on FX node names
                parts.sort(key=lambda e: e.key)
            out = node(n.op, tuple(parts), n.arg)
        elif kind[0] == "RED":
            _, _, over, rest = kind
            out = materialise(value(n.src[0]), R(rest), n.op, tuple(uf.find(r) for r in over))
        elif kind[0] == "CONTRACT":
            a, b = value(n.src[0]), value(n.src[1])
            prod = node(Op.MUL, tuple(sorted((a, b), key=lambda e: e.key)))
            out = materialise(prod, R(dims[id(n)]), Op.SUM, (uf.find(kind[2]),))
            if n.op is Op.LINEAR and len(n.src) == 3:
                out = materialise(node(Op.ADD, (out, value(n.src[2]))), R(dims[id(n)]))
        elif kind[0] == "EINSUM":
            parts = [value(s) for s in n.src]
            prod = parts[0] if len(parts) == 1 else node(Op.MUL, tuple(sorted(parts, key=lambda e: e.key)))
            over = tuple(uf.find(r) for r in kind[2])
            out = materialise(prod, R(dims[id(n)]), Op.SUM if over else None, over)
        elif kind[0] == "SOFTMAX":
            x = value(n.src[0])
            ranks = R(dims[id(n)])
            m = ranks[n.arg]
            if m is None:
                raise NotRepresentable("softmax over a size-1 dimension")
            rest = [None if r == m else r for r in ranks]
            gm = materialise(x, rest, Op.MAX, (m,))                          # GM = max_m X
            shifted = node(Op.ADD, tuple(sorted((x, node(Op.MUL, (const(-1.0), gm))), key=lambda e: e.key)))
            sn = materialise(node(Op.EXP, (shifted,)), ranks)                # SN = exp(X - GM)
            sd = materialise(sn, rest, Op.SUM, (m,))                         # SD = sum_m SN
            if n.op is Op.SOFTMAX:
                out = node(Op.MUL, (sn, node(Op.RECIP, (sd,))))              # A = SN / SD
            else:
                out = node(Op.ADD, (shifted, node(Op.MUL, (const(-1.0), node(Op.LOG, (sd,))))))
        else:  # pragma: no cover
            raise AssertionError(kind)
        built[id(n)] = out
        return out

    for oname, o in outputs.items():
        einsums.append(Einsum(oname, tuple(r for r in R(dims[id(o)]) if r is not None), value(o)))

    # --- readable names ----------------------------------------------------------------------
    first_out = [r for r in R(dims[id(next(iter(outputs.values())))]) if r is not None]
    pretty: dict[str, str] = {}
    conventional = ("b", "s", "h") if len(first_out) <= 3 else ("b", "n", "s", "h") if len(first_out) == 4 else ()
    for r, nm in zip(first_out[::-1], conventional[::-1]):
        pretty[r] = nm
    pool = iter(c for c in "mefpqgijklortuvwxyz" if c not in pretty.values())
    used_in = [r for e in einsums for r in e.ranks + e.over] + [r for rs in decl.values() for r in R(rs) if r]
    for r in used_in:
        if r not in pretty:
            pretty[r] = next(pool)
    tensor_names = {f"T{i}": f"R{j}" for j, i in enumerate(range(counter[0]))}
    return _rename(Cascade(name, tuple((t, tuple(r for r in R(rs) if r is not None)) for t, rs in decl.items()),
                           tuple(einsums), tuple(outputs)), pretty, tensor_names)


def _rename(c: Cascade, ranks: dict[str, str], tensors: dict[str, str]) -> Cascade:
    def rn(n: Node) -> Node:
        if n.op is Op.READ:
            t, rs = n.arg
            return read(tensors.get(t, t), *[ranks.get(r, r) for r in rs])
        if not n.src:
            return n
        parts = [rn(s) for s in n.src]
        if n.op in (Op.ADD, Op.MUL):
            parts.sort(key=lambda e: e.key)
        return node(n.op, tuple(parts), n.arg)
    es = tuple(Einsum(tensors.get(e.out, e.out), tuple(ranks.get(r, r) for r in e.ranks), rn(e.expr), e.reduce,
                      tuple(ranks.get(r, r) for r in e.over), e.init) for e in c.einsums)
    ins = tuple((t, tuple(ranks.get(r, r) for r in rs)) for t, rs in c.inputs)
    return Cascade(c.name, ins, es, c.outputs, c.notes)
