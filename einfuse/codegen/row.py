"""Row programs: Triton source generated from a cascade with one tiled rank.

A row program has one *block* rank (tiled by BLOCK_<rank>; the reduced rank of a norm or a
softmax, the feature rank of an elementwise op) and *parallel* ranks, flattened into rows
that programs take BLOCK_R at a time. The structure comes from the cascade:

* every tensor is classified by its ranks: a *tile* ([rows, block]), a *row* value ([rows]),
  a *column* value ([block], e.g. a weight) or a scalar;
* an Einsum reducing over the block rank is a *row reduction*: an accumulator over the tiles
  of a sweep, finished with `tl.sum`/`tl.max` after it; an Einsum reducing over all the
  parallel ranks into [block] is a *column reduction*: per-program partial sums in a
  [programs, block] buffer that the host adds up (a dW);
* maps become expressions through the rule table in `rules.py`; READs become `tl.load`s
  masked for the ragged last tile and the ragged last row block;
* sweeps follow FuseMax pass counting: an Einsum runs in sweep 1 + (the number of row
  reductions on its dependency chain), so RMSNorm (a sum, then maps) is 2 sweeps and softmax
  (max, sum, maps) is 3. Row values are computed between sweeps; tile maps that are not
  outputs are recomputed in every sweep that needs them (never materialised);
* variables are the cascade's tensor names and each statement is commented with its Einsum.

Reductions mask only the block rank (rows beyond the end compute on zeros and are never
stored), so padding never produces inf/NaN in the lanes that count.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum, format_einsum, reads
from einfuse.ir.node import Node, Op
from .rules import HELPER_DEPS, HELPERS, CodegenError, literal, render

_RESERVED = {"tl", "triton", "pid", "rows", "row0", "row_mask", "mask", "n_rows", "n_programs", "rem",
             "BLOCK_R", "ONE_TILE", "float", "range", "min", "max"}
COMPUTE_TYPES = {"float32": "tl.float32", "float64": "tl.float64"}


@dataclass(frozen=True)
class Tensor:
    name: str                  # cascade name
    var: str                   # Python identifier in the kernel
    ranks: tuple[str, ...]
    role: str                  # "input" | "output"
    kind: str                  # "tile" | "row" | "col" | "scalar" | "colred"
    reduce: str = ""           # colred: "sum" | "max"
    cond: bool = False         # input only used as a where() condition: loaded as is


@dataclass(frozen=True)
class RowProgram:
    """The analysed structure: what the emitter and the host launcher both need."""
    cascade: Cascade
    block: str
    parallel: tuple[str, ...]
    tensors: tuple[Tensor, ...]           # kernel pointer arguments: inputs, then outputs
    classes: dict                          # einsum out -> "tilemap" | "rowmap" | "rowred" | "colred"
    kinds: dict                            # every tensor -> "tile" | "row" | "col" | "scalar" | "colred"
    level: dict                            # einsum out -> sweep index
    sweeps: int

    def meta(self) -> dict:
        return {"program": "row", "block": self.block, "parallel": list(self.parallel),
                "tensors": [{"name": t.name, "ranks": list(t.ranks), "role": t.role, "kind": t.kind,
                             "reduce": t.reduce} for t in self.tensors]}


def _ident(name: str) -> str:
    ok = name.isidentifier() and not keyword.iskeyword(name) and name not in _RESERVED and not name.startswith("_")
    return name if ok else "T_" + "".join(ch if ch.isalnum() else "_" for ch in name)


def _largest_output(c: Cascade) -> Einsum:
    by = {e.out: e for e in c.einsums}
    return max((by[o] for o in c.outputs), key=lambda e: len(e.ranks))


def choose_block(c: Cascade) -> str:
    """The tiled rank: the last rank of the largest output if it is reduced somewhere (or
    nothing is reduced), else the one reduced rank the largest output does not have."""
    reduced = {r for e in c.einsums if e.reduce is not None for r in e.over}
    big = _largest_output(c)
    if big.ranks and (big.ranks[-1] in reduced or not reduced):
        return big.ranks[-1]
    cands = sorted(reduced - set(big.ranks))
    if len(cands) != 1:
        raise CodegenError(f"cannot tell which rank to tile (candidates {cands}); pass block=")
    return cands[0]


def analyse(c: Cascade, block: str | None = None) -> RowProgram:
    for e in c.einsums:
        if any("+" in r for r in e.ranks) or e.init is not None:
            raise CodegenError(f"{e.out} carries running state over a rank: that is a contraction program, "
                               "not a row program")
    if c.splits:
        raise CodegenError("rank splits belong to contraction programs")
    block = block or choose_block(c)
    order: list[str] = []
    for r in _largest_output(c).ranks:
        if r != block:
            order.append(r)
    for _, rs in c.inputs:
        order += [r for r in rs if r != block and r not in order]
    for e in c.einsums:
        order += [r for r in e.ranks + e.over if r != block and r not in order]
    parallel = tuple(order)
    pset = set(parallel)

    kind_of: dict[str, str] = {}
    for name, rs in c.inputs:
        kind_of[name] = _kind(rs, block)
    classes: dict[str, str] = {}
    level: dict[str, int] = {}
    for e in c.einsums:
        rd = reads(e.expr)
        unknown = rd - set(kind_of)
        if unknown:
            raise CodegenError(f"{e.out} reads {sorted(unknown)} before they are written")
        for t in rd:
            if classes.get(t) == "colred":
                raise CodegenError(f"{e.out} reads the column reduction {t}, known only after all rows")
        lv = 0
        for t in rd:
            if t in level:
                lv = max(lv, level[t] + (1 if classes[t] == "rowred" else 0))
        expr_has_block = any(kind_of[t] in ("tile", "col") for t in rd)
        if e.reduce is None:
            if block in e.ranks or expr_has_block:
                if block not in e.ranks:
                    raise CodegenError(f"{e.out}[{','.join(e.ranks)}] reads {block}-indexed values without "
                                       f"reducing over {block}")
                cls = "tilemap"
            else:
                cls = "rowmap"
        elif e.reduce not in (Op.SUM, Op.MAX):
            raise CodegenError(f"reduction {e.reduce} has no Triton rule")
        elif tuple(e.over) == (block,) and block not in e.ranks:
            cls = "rowred"
        elif set(e.over) == pset and set(e.ranks) <= {block}:
            cls = "colred"
        else:
            raise CodegenError(f"{e.out} reduces over {list(e.over)}: a row program reduces over the block "
                               f"rank {block!r} or over all of the parallel ranks {list(parallel)}")
        bad = set(e.ranks) - pset - {block}
        if bad:
            raise CodegenError(f"{e.out} has ranks {sorted(bad)} outside the program")
        classes[e.out] = cls
        level[e.out] = lv
        kind_of[e.out] = {"tilemap": _kind(e.ranks, block), "rowmap": "row" if e.ranks else "scalar",
                          "rowred": "row" if e.ranks else "scalar", "colred": "colred"}[cls]
        if cls in ("rowred", "rowmap") and not e.ranks:
            raise CodegenError(f"{e.out} is a scalar over all rows (a full reduction): not a row program")
    for o in c.outputs:
        if o not in classes:
            raise CodegenError(f"output {o} is not written by any Einsum")

    traversing = [e.out for e in c.einsums if classes[e.out] in ("rowred", "colred")
                  or (classes[e.out] == "tilemap" and e.out in c.outputs)]
    sweeps = 1 + max((level[t] for t in traversing), default=-1)

    cond_only = _condition_inputs(c)
    tensors = [Tensor(n, _ident(n), tuple(rs), "input", kind_of[n], cond=n in cond_only) for n, rs in c.inputs]
    by = {e.out: e for e in c.einsums}
    for o in c.outputs:
        e = by[o]
        red = ("sum" if e.reduce is Op.SUM else "max") if classes[o] == "colred" else ""
        tensors.append(Tensor(o, _ident(o), tuple(e.ranks), "output", kind_of[o], red))
    names = [t.var for t in tensors]
    if len(set(names)) != len(names):
        raise CodegenError(f"tensor names collide after sanitising: {names}")
    return RowProgram(c, block, parallel, tuple(tensors), classes, kind_of, level, sweeps)


def _kind(ranks, block) -> str:
    if block in ranks:
        return "tile" if len(ranks) > 1 else "col"
    return "row" if ranks else "scalar"


def _condition_inputs(c: Cascade) -> set[str]:
    """Inputs read only as the condition of a WHERE (loaded without conversion)."""
    as_cond: set[str] = set()
    other: set[str] = set()

    def walk(n: Node, is_cond: bool):
        if n.op is Op.READ:
            (as_cond if is_cond else other).add(n.arg[0])
        for i, s in enumerate(n.src):
            walk(s, n.op is Op.WHERE and i == 0)
    for e in c.einsums:
        walk(e.expr, False)
    return as_cond - other


# ---------------------------------------------------------------------------------------
# emission

class _Writer:
    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, text: str = ""):
        self.lines.append(("    " * self.depth + text) if text else "")


def _uses(exprs: list[Node]) -> dict[int, int]:
    count: dict[int, int] = {}

    def walk(n: Node):
        count[id(n)] = count.get(id(n), 0) + 1
        if count[id(n)] == 1:
            for s in n.src:
                walk(s)
    for e in exprs:
        walk(e)
    return count


class _Block:
    """One straight-line code block (a tile body or a row section) with its own CSE memo."""

    def __init__(self, w: _Writer, env: dict[str, str], exprs: list[Node], helpers: set[str]):
        self.w, self.env, self.helpers = w, env, helpers
        self.uses = _uses(exprs)
        self.memo: dict[int, str] = {}
        self.n = 0

    def expr(self, n: Node) -> str:
        if n.op is Op.READ:
            return self.env[n.arg[0]]
        if n.op is Op.CONST:
            return literal(n.arg)
        if id(n) in self.memo:
            return self.memo[id(n)]
        text = render(n, [self.expr(s) for s in n.src])
        for h in HELPERS:
            if f"{h}(" in text:
                self.helpers.add(h)
        if self.uses.get(id(n), 0) > 1:
            name = f"_t{len(self.memo)}"
            self.w(f"{name} = {text}")
            self.memo[id(n)] = name
            return name
        return text


def _shape_of(prog: RowProgram, e: Einsum) -> set[str]:
    """Which of {row, col} the value of an Einsum's expression varies over."""
    out: set[str] = set()
    for t in reads(e.expr):
        out |= {"tile": {"row", "col"}, "row": {"row"}, "col": {"col"}}.get(prog.kinds[t], set())
    return out


def emit(prog: RowProgram, kernel_name: str, compute: str = "float32") -> str:
    """The Triton module source (imports, helpers, one @triton.jit kernel)."""
    if compute not in COMPUTE_TYPES:
        raise CodegenError(f"compute dtype {compute!r} is not one of {sorted(COMPUTE_TYPES)}")
    ct = COMPUTE_TYPES[compute]
    c, block, par = prog.cascade, prog.block, prog.parallel
    B = f"BLOCK_{_ident(block).upper()}"
    rk = {r: _ident(r) for r in par + (block,)}
    tens = {t.name: t for t in prog.tensors}
    by = {e.out: e for e in c.einsums}
    helpers: set[str] = set()
    w = _Writer()

    # signature
    ptrs = [f"{t.var}_ptr" for t in prog.tensors]
    sizes = [f"size_{rk[r]}" for r in par + (block,)]
    strides = []
    for t in prog.tensors:
        rs = ("p", block) if t.kind == "colred" else t.ranks
        strides += [f"{t.var}_stride_{'p' if r == 'p' and t.kind == 'colred' else rk[r]}" for r in rs]
    w(f"@triton.jit")
    w(f"def {kernel_name}(")
    w.depth += 1
    w(", ".join(ptrs) + ",")
    w(", ".join(sizes) + ",")
    for t in prog.tensors:
        mine = [s for s in strides if s.startswith(f"{t.var}_stride_")]
        if mine:
            w(", ".join(mine) + ",")
    w("n_rows, n_programs,")
    w(f"BLOCK_R: tl.constexpr, {B}: tl.constexpr, ONE_TILE: tl.constexpr,")
    w.depth -= 1
    w("):")
    w.depth += 1
    for line in str(c).splitlines():
        w(f"# {line}")
    w(f"# row program: rows = ({', '.join(par)}), tiled rank {block}, {prog.sweeps} sweep(s) over {block}")
    w("pid = tl.program_id(0)")
    colreds = [t for t in prog.tensors if t.kind == "colred"]
    for t in colreds:
        init = "0.0" if t.reduce == "sum" else 'float("-inf")'
        w(f"{t.var}_acc = tl.full([1, {B}], {init}, {ct})  # per-program partial {t.reduce} (used when ONE_TILE)")
    w("for row0 in range(pid * BLOCK_R, n_rows, n_programs * BLOCK_R):")
    w.depth += 1
    w("rows = (row0 + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]")
    w("row_mask = rows < n_rows")
    if len(par) == 1:
        w(f"idx_{rk[par[0]]} = rows")
    elif par:
        w(f"# rows -> ({', '.join(par)})")
        w("rem = rows")
        for r in reversed(par[1:]):
            w(f"idx_{rk[r]} = rem % size_{rk[r]}")
            w(f"rem = rem // size_{rk[r]}")
        w(f"idx_{rk[par[0]]} = rem")
    for t in prog.tensors:
        if t.kind == "colred":
            continue
        terms = [f"idx_{rk[r]} * {t.var}_stride_{rk[r]}" for r in t.ranks if r != block]
        if terms:
            w(f"{t.var}_row = {t.var}_ptr + " + " + ".join(terms))
        else:
            w(f"{t.var}_row = {t.var}_ptr")

    env: dict[str, str] = {}

    def load_row_inputs(needed: set[str]):
        for t in prog.tensors:
            if t.role == "input" and t.kind in ("row", "scalar") and t.name in needed and t.name not in env:
                conv = "" if t.cond else f".to({ct})"
                m = ", mask=row_mask, other=0.0" if t.kind == "row" else ""
                w(f"{t.var} = tl.load({t.var}_row{m}){conv}")
                env[t.name] = t.var

    def row_section(lv: int):
        es = [e for e in c.einsums if prog.classes[e.out] == "rowmap" and prog.level[e.out] == lv]
        if not es:
            return
        load_row_inputs(set().union(*(reads(e.expr) for e in es)))
        blk = _Block(w, env, [e.expr for e in es], helpers)
        for e in es:
            w(f"# {format_einsum(e)}")
            val = blk.expr(e.expr)
            if "row" not in _shape_of(prog, e):
                val = f"({val}) + tl.zeros([BLOCK_R, 1], {ct})"
            w(f"{_ident(e.out)} = {val}")
            env[e.out] = _ident(e.out)
            if e.out in tens:
                t = tens[e.out]
                w(f"tl.store({t.var}_row, {t.var}.to({t.var}_ptr.dtype.element_ty), mask=row_mask)")

    def deps_tile(roots: list[str]) -> list[Einsum]:
        need: set[str] = set()
        stack = list(roots)
        while stack:
            t = stack.pop()
            if t in need:
                continue
            need.add(t)
            for d in reads(by[t].expr):
                if d in by and prog.classes[d] == "tilemap":
                    stack.append(d)
        return [e for e in c.einsums if e.out in need]

    for s in range(prog.sweeps):
        row_section(s)
        roots = [e.out for e in c.einsums if prog.level[e.out] == s and (
            prog.classes[e.out] in ("rowred", "colred") or (prog.classes[e.out] == "tilemap" and e.out in c.outputs))]
        body = deps_tile(roots)
        tile_reads = set().union(*(reads(e.expr) for e in body)) if body else set()
        load_row_inputs(tile_reads)
        w(f"# sweep {s + 1} of {prog.sweeps} over {block}")
        for e in body:
            if prog.classes[e.out] == "rowred":
                init = "0.0" if e.reduce is Op.SUM else 'float("-inf")'
                w(f"{_ident(e.out)}_acc = tl.full([BLOCK_R, {B}], {init}, {ct})")
        w(f"for {rk[block]}0 in range(0, size_{rk[block]}, {B}):")
        w.depth += 1
        w(f"offs_{rk[block]} = {rk[block]}0 + tl.arange(0, {B})[None, :]")
        w(f"{rk[block]}_mask = offs_{rk[block]} < size_{rk[block]}")
        w(f"mask = row_mask & {rk[block]}_mask")
        local = dict(env)
        for t in prog.tensors:
            if t.role == "input" and t.kind in ("tile", "col") and t.name in tile_reads:
                conv = "" if t.cond else f".to({ct})"
                m = "mask" if t.kind == "tile" else f"{rk[block]}_mask"
                w(f"{t.var} = tl.load({t.var}_row + offs_{rk[block]} * {t.var}_stride_{rk[block]}, "
                  f"mask={m}, other=0.0){conv}")
                local[t.name] = t.var
        blk = _Block(w, local, [e.expr for e in body], helpers)
        for e in body:
            cls = prog.classes[e.out]
            var = _ident(e.out)
            w(f"# {format_einsum(e)}")
            val = blk.expr(e.expr)
            if cls == "tilemap":
                if _shape_of(prog, e) != {"row", "col"}:
                    val = f"({val}) + tl.zeros([BLOCK_R, {B}], {ct})"
                w(f"{var} = {val}")
                local[e.out] = var
                if e.out in c.outputs and prog.level[e.out] == s:
                    t = tens[e.out]
                    w(f"tl.store({t.var}_row + offs_{rk[block]} * {t.var}_stride_{rk[block]}, "
                      f"{var}.to({t.var}_ptr.dtype.element_ty), mask=mask)")
            elif cls == "rowred":
                if e.reduce is Op.SUM:
                    w(f"{var}_acc += tl.where({rk[block]}_mask, {val}, 0.0)")
                else:
                    w(f"{var}_acc = tl.maximum({var}_acc, tl.where({rk[block]}_mask, {val}, float(\"-inf\")))")
            else:  # colred
                t = tens[e.out]
                red, neutral = ("sum", "0.0") if e.reduce is Op.SUM else ("max", 'float("-inf")')
                w(f"{var}_part = tl.{red}(tl.where(mask, {val}, {neutral}), axis=0, keep_dims=True)")
                comb = (lambda a, b: f"{a} + {b}") if red == "sum" else (lambda a, b: f"tl.maximum({a}, {b})")
                w("if ONE_TILE:")
                w(f"    {var}_acc = {comb(f'{var}_acc', f'{var}_part')}")
                w("else:  # accumulate in this program's row of the partial buffer")
                p = f"{t.var}_ptr + pid * {t.var}_stride_p + offs_{rk[block]} * {t.var}_stride_{rk[block]}"
                w(f"    {var}_old = tl.load({p}, mask={rk[block]}_mask, other=0.0)")
                w(f"    tl.store({p}, {comb(f'{var}_old', f'{var}_part')}, mask={rk[block]}_mask)")
        w.depth -= 1
        for e in body:
            if prog.classes[e.out] == "rowred":
                var = _ident(e.out)
                red = "sum" if e.reduce is Op.SUM else "max"
                w(f"{var} = tl.{red}({var}_acc, axis=1, keep_dims=True)")
                env[e.out] = var
                if e.out in tens:
                    t = tens[e.out]
                    w(f"tl.store({t.var}_row, {var}.to({t.var}_ptr.dtype.element_ty), mask=row_mask)")
    row_section(prog.sweeps)
    w.depth -= 1
    if colreds:
        w("if ONE_TILE:  # the whole block rank was one tile: write the partials once")
        w(f"    offs_{rk[block]} = tl.arange(0, {B})[None, :]")
        for t in colreds:
            w(f"    tl.store({t.var}_ptr + pid * {t.var}_stride_p + offs_{rk[block]} * {t.var}_stride_{rk[block]}, "
              f"{t.var}_acc, mask=offs_{rk[block]} < size_{rk[block]})")
    body_src = "\n".join(w.lines) + "\n"
    return _module(c, kernel_name, body_src, helpers)


def _module(c: Cascade, kernel_name: str, body: str, helpers: set[str]) -> str:
    need = set(helpers)
    for h in list(need):
        need.update(HELPER_DEPS.get(h, ()))
    head = [f'"""Generated by einfuse.codegen from cascade {c.name!r} (do not edit); the kernel\'s comments',
            'give the cascade, and each statement the Einsum it implements."""', "", "import triton",
            "import triton.language as tl", "", ""]
    parts = ["\n".join(head)]
    for h in HELPERS:  # fixed order, dependencies first
        if h in need:
            parts.append(HELPERS[h] + "\n\n")
    parts.append(body)
    return "".join(parts)
