"""Contraction programs: Triton source for a cascade with a split, iterated rank and `tl.dot`s.

The shape is FuseMax's 1-pass cascade (attention, or a loss over a linear layer): a *parallel*
rank p tiled by BLOCK_P (grid axis 0; batch and heads are grid axis 1, outside the cascade),
an *iterated* rank m split into tiles (m1, m0) (`Cascade.splits`): the kernel loops over m1,
the tile m0 is BLOCK_M wide, and *full* ranks (a head dim e, a value dim f) are one padded
block each. Every value is a 2-D block [p, x] with x one of m0 / a full rank / nothing ([p, 1]).

From the cascade:
* a SUM whose summand multiplies a [p, k] side by a [k, n] side (n the output's other rank)
  is a `tl.dot` (k = the contracted rank); factors without k are applied to the result;
* other reductions over m0 are `tl.sum` / `tl.max` over the tile, masked for the ragged last
  tile (and so is the [p, m0] operand of a dot over m0);
* an Einsum writing `X[m1+1, ...]` is running state: a loop-carried variable, initialised from
  `init`; a read at m1 is the previous value, at m1+1 this iteration's, at M1 (after the loop)
  the final one. Reads at m1+1 of a *max* state inside a map use a copy with -inf replaced by 0,
  so `exp(x - max)` over a tile that is masked so far gives 0, not NaN (the guard the IR lacks);
* inputs are loaded in the layout their consumer needs (K as [e, m0] for Q @ K^T), in their
  storage dtype for dots (fp32 dots with input_precision="ieee"; the [p, k] side is rounded to
  the other side's dtype, as flash attention does; under the interpreter DOT_F32 feeds the same
  values as fp32, since its bf16 dot is wrong), converted to fp32 for maps;
  loads that do not depend on m1 are hoisted out of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum, format_einsum, reads
from einfuse.ir.node import Node, Op
from .row import _Writer, _ident, _module
from .rules import HELPERS, CodegenError, literal, render

DOT_MIN = 16  # tl.dot needs every tile dimension >= 16 on a GPU


def _base(r: str) -> str:
    return r.partition("+")[0]


@dataclass(frozen=True)
class ContractionProgram:
    cascade: Cascade
    par: str                      # p
    split: tuple[str, str, str]   # (m, m1, m0)
    full: tuple[str, ...]         # e, f, ...
    layout: dict                  # tensor -> axis-1 rank (None: [p, 1])
    where: dict                   # einsum out -> "before" | "loop" | "after"
    state: dict                   # running-state einsum out -> init
    columns: tuple = ()           # full ranks that outputs/state are indexed by (grid axis 2 tiles them)
    contracted: tuple = ()        # full ranks a tl.dot contracts (a K-loop when not one block)

    def meta(self) -> dict:
        c = self.cascade
        return {"program": "contraction", "par": self.par, "split": list(self.split), "full": list(self.full),
                "columns": list(self.columns), "contracted": list(self.contracted),
                "inputs": [[n, list(rs)] for n, rs in c.inputs],
                "outputs": [[o, list(next(e.ranks for e in c.einsums if e.out == o))] for o in c.outputs]}


def analyse(c: Cascade) -> ContractionProgram:
    if len(c.splits) != 1:
        raise CodegenError("a contraction program needs exactly one split rank")
    m, m1, m0 = c.splits[0]
    outs = {e.out: e for e in c.einsums}
    common = None
    for o in c.outputs:
        rs = set(outs[o].ranks)
        common = rs if common is None else common & rs
    if common and len(common) > 1:  # the parallel rank is the one that meets the key tiles m0
        common = {r for r in common if any(m0 in e.ranks and r in e.ranks for e in c.einsums)}
    if not common or len(common) != 1:
        raise CodegenError(f"cannot tell the parallel rank from the outputs' ranks {sorted(common or [])}")
    (par,) = common
    layout: dict[str, str | None] = {}
    where: dict[str, str] = {}
    state: dict[str, float] = {}
    full: list[str] = []
    loop_vals: set[str] = set()
    for e in c.einsums:
        rs = [_base(r) for r in e.ranks]
        in_loop = m1 in rs
        if any(r == m1.upper() for r in rs):
            raise CodegenError(f"{e.out} writes at the final index {m1.upper()}")
        rest = [r for r in rs if r not in (m1, par)]
        if par not in rs:
            raise CodegenError(f"{e.out}[{','.join(e.ranks)}] lacks the parallel rank {par}")
        if len(rest) > 1:
            raise CodegenError(f"{e.out} has ranks {rest} besides {par}: values are [{par}, x] blocks")
        layout[e.out] = rest[0] if rest else None
        for r in rest + list(e.over):
            if r not in (m0, m1, par) and r not in full:
                full.append(r)
        if any(r.endswith("+1") for r in e.ranks):
            if e.reduce is not None:
                raise CodegenError(f"running state {e.out} cannot also be a reduction")
            state[e.out] = e.init if e.init is not None else 0.0
        rd = reads(e.expr)
        if in_loop:
            where[e.out] = "loop"
            loop_vals.add(e.out)
        elif rd & loop_vals:
            where[e.out] = "after"
            loop_vals.add(e.out)
        else:
            where[e.out] = "before"
        if where[e.out] == "loop" and e.reduce is not None and (m1 in e.over):
            raise CodegenError(f"{e.out} reduces over the iterated rank {m1}: use running state")
    for o in c.outputs:
        if where[o] == "loop":
            raise CodegenError(f"output {o} is written inside the {m1} loop")
    columns = tuple(r for r in full if r in layout.values())
    contracted = tuple(r for r in full if any(e.reduce is Op.SUM and r in e.over for e in c.einsums))
    return ContractionProgram(c, par, (m, m1, m0), tuple(full), layout, where, state, columns, contracted)


# ---------------------------------------------------------------------------------------

def emit(prog: ContractionProgram, kernel_name: str) -> str:
    c = prog.cascade
    p, (m, m1, m0) = prog.par, prog.split
    rk = {r: _ident(r) for r in (p, m1, m0) + prog.full}
    inputs = {n: rs for n, rs in c.inputs}
    by = {e.out: e for e in c.einsums}
    out_ranks = {o: tuple(by[o].ranks) for o in c.outputs}
    helpers: set[str] = set()
    w = _Writer()
    B = {p: "BLOCK_P", m0: "BLOCK_M", **{r: f"BLOCK_{_ident(r).upper()}" for r in prog.full}}
    offs = {p: f"offs_{rk[p]}", m0: f"offs_{rk[m0]}", **{r: f"offs_{rk[r]}" for r in prog.full}}
    msk = {p: f"{rk[p]}_mask", m0: f"{rk[m0]}_mask", **{r: f"{rk[r]}_mask" for r in prog.full}}

    def stride(t: str, r: str) -> str:
        return f"{_ident(t)}_stride_{rk[m0] if r == m else rk[r]}"

    # signature: tensors, sizes, per-tensor (batch, head, ranks) strides and head divisors
    tens = list(inputs) + list(c.outputs)
    sizes = [f"size_{rk[p]}", f"size_{rk[m0]}"] + [f"size_{rk[r]}" for r in prog.full] + ["size_heads"]
    w("@triton.jit")
    w(f"def {kernel_name}(")
    w.depth += 1
    w(", ".join(f"{_ident(t)}_ptr" for t in tens) + ",")
    w(", ".join(sizes) + ",")
    for t in tens:
        rs = inputs.get(t) or out_ranks[t]
        w(", ".join([f"{_ident(t)}_stride_z", f"{_ident(t)}_stride_hd"] + [stride(t, r) for r in rs])
          + f", {_ident(t)}_head_div,")
    ones = "".join(f" {_ident(r).upper()}_ONE_BLOCK: tl.constexpr," for r in prog.contracted)
    w(", ".join(f"{b}: tl.constexpr" for b in dict.fromkeys(B.values())) + "," + ones + " DOT_F32: tl.constexpr,")
    w.depth -= 1
    w("):")
    w.depth += 1
    for line in str(c).splitlines():
        w(f"# {line}")
    w(f"# contraction program: {p} tiled by BLOCK_P, {m} iterated in tiles {m1} of BLOCK_M ({m0})"
      + "".join(f"; {r}: tiles of BLOCK_{_ident(r).upper()} over grid axis 2" for r in prog.columns)
      + "".join(f"; sums over {r}: one block if {_ident(r).upper()}_ONE_BLOCK, else a loop over tiles"
                for r in prog.contracted))
    w(f"pid_{rk[p]} = tl.program_id(0)")
    w("pid_z = tl.program_id(1)  # batch * heads")
    w("z = pid_z // size_heads")
    w("hd = pid_z % size_heads")
    for t in tens:
        v = _ident(t)
        w(f"{v}_base = {v}_ptr + z.to(tl.int64) * {v}_stride_z + (hd // {v}_head_div).to(tl.int64) * {v}_stride_hd")
    w(f"{offs[p]} = pid_{rk[p]} * BLOCK_P + tl.arange(0, BLOCK_P)")
    w(f"{msk[p]} = {offs[p]} < size_{rk[p]}")
    if prog.columns:
        w("pid_c = tl.program_id(2)  # tile of the column rank(s)")
    for r in prog.full:
        w(f"{offs[r]} = {'pid_c * ' + B[r] + ' + ' if r in prog.columns else ''}tl.arange(0, {B[r]})")
        w(f"{msk[r]} = {offs[r]} < size_{rk[r]}")
    kofs = {r: f"offs_{rk[r]}k" for r in prog.contracted}   # offsets of a contracted rank's tile
    kmsk = {r: f"{rk[r]}k_mask" for r in prog.contracted}
    for r in prog.contracted:
        w(f"if {_ident(r).upper()}_ONE_BLOCK:  # the whole of {r} in one tile")
        w(f"    {kofs[r]} = tl.arange(0, {B[r]})")
        w(f"    {kmsk[r]} = {kofs[r]} < size_{rk[r]}")

    loaded: dict[tuple, str] = {}

    def load_text(t: str, axes, of: dict, mk: dict) -> str:
        rs = [m0 if r == m else r for r in inputs[t]]
        for r in rs:
            if r not in axes:
                raise CodegenError(f"{t}[{','.join(inputs[t])}] does not fit a [{axes[0]}, {axes[1]}] block")
        parts, masks = [], []
        for i, a in enumerate(axes):
            if a is None or a not in rs:
                continue
            sl = "[:, None]" if i == 0 else "[None, :]"
            parts.append(f"{of[a]}{sl} * {stride(t, m if a == m0 else a)}")
            masks.append(f"{mk[a]}{sl}")
        ptr = f"{_ident(t)}_base + " + " + ".join(parts) if parts else f"{_ident(t)}_base"
        return f"tl.load({ptr}, mask={' & '.join(masks) or 'None'}, other=0.0)"

    def load(t: str, axes: tuple[str | None, str | None], as_dot: bool, scope: list) -> str:
        """Load input t as a [axes[0], axes[1]] block (None: broadcast dim of size 1)."""
        key = (t, axes, as_dot)
        if key in loaded:
            return loaded[key]
        rs = [m0 if r == m else r for r in inputs[t]]
        for r in rs:
            if r not in axes:
                raise CodegenError(f"{t}[{','.join(inputs[t])}] does not fit a [{axes[0]}, {axes[1]}] block")
        parts, masks = [], []
        for i, a in enumerate(axes):
            if a is None:
                continue
            sl = "[:, None]" if i == 0 else "[None, :]"
            if a in rs:
                parts.append(f"{offs[a]}{sl} * {stride(t, m if a == m0 else a)}")
                masks.append(f"{msk[a]}{sl}")
        name = f"{_ident(t)}_{''.join(rk.get(a, '1') if a else '1' for a in axes)}"
        hoist = m0 not in rs
        target = scope if not hoist else pre
        ptr = f"{_ident(t)}_base + " + " + ".join(parts) if parts else f"{_ident(t)}_base"
        conv = "" if as_dot or _is_cond(t) else ".to(tl.float32)"
        target.append(f"{name} = tl.load({ptr}, mask={' & '.join(masks) or 'None'}, other=0.0){conv}")
        loaded[key] = name
        return name

    cond_inputs = _condition_inputs(c)

    def _is_cond(t: str) -> bool:
        return t in cond_inputs

    def block_axes(e: Einsum) -> tuple[str, str | None]:
        return (p, prog.layout[e.out])

    safe: set[str] = set()

    def value(n: Node, axes, lines: list, env: dict) -> str:
        if n.op is Op.READ:
            t, rr = n.arg
            if t in inputs:
                return load(t, axes, False, lines)
            if t in prog.state:
                if any(r == f"{m1}+1" for r in rr):
                    if by[t].expr.op is Op.MAX2 and t in safe:
                        return f"{_ident(t)}_new_safe"
                    return f"{_ident(t)}_new"
                return _ident(t)  # at m1 (previous) or at M1 (final)
            return env[t]
        if n.op is Op.CONST:
            return literal(n.arg)
        text = render(n, [value(s, axes, lines, env) for s in n.src])
        for h in HELPERS:
            if f"{h}(" in text:
                helpers.add(h)
        return text

    def emit_einsum(e: Einsum, lines: list, env: dict):
        axes = block_axes(e)
        var = _ident(e.out)
        lines.append(f"# {format_einsum(e)}")
        if e.out in prog.state:
            lines.append(f"{var}_new = {value(e.expr, axes, lines, env)}")
            if e.expr.op is Op.MAX2:
                lines.append(f"{var}_new_safe = tl.where({var}_new == float(\"-inf\"), 0.0, {var}_new)")
                safe.add(e.out)
            return
        if e.reduce is None:
            lines.append(f"{var} = {value(e.expr, axes, lines, env)}")
        elif len(e.over) != 1:
            raise CodegenError(f"{e.out} reduces over {list(e.over)}: one rank at a time")
        else:
            k = e.over[0]
            n_rank = prog.layout[e.out]
            factors = list(e.expr.src) if e.expr.op is Op.MUL else [e.expr]

            def ranks_of(f: Node) -> set[str]:
                out: set[str] = set()
                for t in reads(f):
                    if t in inputs:
                        out |= {m0 if r == m else r for r in inputs[t]}
                    else:
                        out |= {x for x in ((prog.layout.get(t),) + (p,)) if x}
                return out
            kf = [f for f in factors if k in ranks_of(f)]
            b_side = [f for f in kf if p not in ranks_of(f)]
            if e.reduce is Op.SUM and n_rank is not None and b_side:
                a_side = [f for f in kf if f not in b_side]
                outer = [f for f in factors if f not in kf]
                if any(not ranks_of(f) <= {k, n_rank} for f in b_side) or any(
                        not ranks_of(f) <= {p, k} for f in a_side) or not a_side:
                    raise CodegenError(f"{e.out} is a sum over {k} but not a [{p},{k}] @ [{k},{n_rank}] product")
                if k in prog.contracted:
                    emit_kloop(e, var, k, n_rank, a_side, b_side, outer, lines, env)
                    env[e.out] = var
                    return
                a_txt = " * ".join(value(f, (p, k), lines, env) if f.op is not Op.READ or f.arg[0] not in inputs
                                   else load(f.arg[0], (p, k), True, lines) for f in a_side)
                b_parts = []
                for f in b_side:
                    if f.op is not Op.READ or f.arg[0] not in inputs:
                        raise CodegenError(f"the [{k},{n_rank}] side of {e.out} must be an input")
                    b_parts.append(load(f.arg[0], (k, n_rank), True, lines))
                b_txt = " * ".join(b_parts)
                b_name = b_side[0].arg[0]
                if k == m0:
                    a_txt = f"tl.where({msk[m0]}[None, :], {a_txt}, 0.0)"
                dot = (f"tl.dot(_dot_in(({a_txt}).to({_ident(b_name)}_ptr.dtype.element_ty), DOT_F32), "
                       f"_dot_in({b_txt}, DOT_F32), input_precision=\"ieee\")")
                helpers.add("_dot_in")
                if outer:
                    dot = " * ".join([value(f, (p, n_rank), lines, env) for f in outer] + [dot])
                lines.append(f"{var} = {dot}")
            else:
                if (k != m0 and k not in prog.full) or k in prog.columns or k in prog.contracted:
                    raise CodegenError(f"{e.out} reduces over {k} (not the tile rank {m0} or a one-block rank)")
                val = value(e.expr, (p, k), lines, env)
                red, neutral = ("sum", "0.0") if e.reduce is Op.SUM else ("max", "float(\"-inf\")")
                lines.append(f"{var} = tl.{red}(tl.where({msk[k]}[None, :], {val}, {neutral}), axis=1, keep_dims=True)")
        env[e.out] = var

    def emit_kloop(e: Einsum, var: str, k: str, n_rank: str, a_side, b_side, outer, lines: list, env: dict):
        """A sum over a full rank k of [p,k] @ [k,n] inputs: one tl.dot when k fits one block
        (K_ONE_BLOCK), else a loop over k tiles accumulating the dots."""
        for f in a_side + b_side:
            if f.op is not Op.READ or f.arg[0] not in inputs:
                raise CodegenError(f"{e.out} sums over {k}, tiled: both sides of the product must be inputs")
        KU = _ident(k).upper()
        of, mk = {**offs, k: kofs[k]}, {**msk, k: kmsk[k]}
        b_ty = f"{_ident(b_side[0].arg[0])}_ptr.dtype.element_ty"

        def names(side, axes, suffix):
            return [f"{_ident(f.arg[0])}_{''.join(rk.get(a, '1') for a in axes)}{suffix}" for f in side]

        def dot(an, bn):
            return (f"tl.dot(_dot_in(({' * '.join(an)}).to({b_ty}), DOT_F32), "
                    f"_dot_in({' * '.join(bn)}, DOT_F32), input_precision=\"ieee\")")
        helpers.add("_dot_in")
        an, bn = names(a_side, (p, k), "k"), names(b_side, (k, n_rank), "k")
        lines.append(f"if {KU}_ONE_BLOCK:")
        for f, nm in zip(a_side, an):
            t = f.arg[0]
            hoist = m0 not in [m0 if r == m else r for r in inputs[t]]
            text = f"{nm} = {load_text(t, (p, k), of, mk)}"
            if hoist:  # loaded once, before the loop over {m1}
                if "    " + text not in pre:
                    pre.extend([f"if {KU}_ONE_BLOCK:", "    " + text])
            else:
                lines.append("    " + text)
        for f, nm in zip(b_side, bn):
            lines.append(f"    {nm} = {load_text(f.arg[0], (k, n_rank), of, mk)}")
        lines.append(f"    {var} = {dot(an, bn)}")
        lines.append(f"else:  # {k} in tiles of BLOCK_{KU}")
        lines.append(f"    {var} = tl.zeros([BLOCK_P, {B[n_rank]}], tl.float32)")
        lines.append(f"    for {rk[k]}_t in range(0, tl.cdiv(size_{rk[k]}, {B[k]})):")
        lines.append(f"        {kofs[k]} = {rk[k]}_t * {B[k]} + tl.arange(0, {B[k]})")
        lines.append(f"        {kmsk[k]} = {kofs[k]} < size_{rk[k]}")
        for f, nm in zip(a_side, an):
            lines.append(f"        {nm} = {load_text(f.arg[0], (p, k), of, mk)}")
        for f, nm in zip(b_side, bn):
            lines.append(f"        {nm} = {load_text(f.arg[0], (k, n_rank), of, mk)}")
        lines.append(f"        {var} += {dot(an, bn)}")
        if outer:
            lines.append(f"{var} = " + " * ".join([value(f, (p, n_rank), lines, env) for f in outer] + [var]))

    env: dict[str, str] = {}
    pre: list[str] = []
    before = [e for e in c.einsums if prog.where[e.out] == "before"]
    loop = [e for e in c.einsums if prog.where[e.out] == "loop"]
    after = [e for e in c.einsums if prog.where[e.out] == "after"]
    body: list[str] = []
    before_lines: list[str] = []
    for e in before:
        emit_einsum(e, before_lines, env)
    for e in loop:
        emit_einsum(e, body, env)
    after_lines: list[str] = []
    for e in after:
        emit_einsum(e, after_lines, env)

    for line in pre + before_lines:
        w(line)
    for s, init in prog.state.items():
        n_rank = prog.layout[s]
        shape = f"[BLOCK_P, {B[n_rank]}]" if n_rank else "[BLOCK_P, 1]"
        w(f"{_ident(s)} = tl.full({shape}, {literal(init)}, tl.float32)")
    w(f"for {rk[m1]} in range(0, tl.cdiv(size_{rk[m0]}, BLOCK_M)):")
    w.depth += 1
    w(f"{offs[m0]} = {rk[m1]} * BLOCK_M + tl.arange(0, BLOCK_M)")
    w(f"{msk[m0]} = {offs[m0]} < size_{rk[m0]}")
    for line in body:
        w(line)
    w("# advance the running state")
    for s in prog.state:
        w(f"{_ident(s)} = {_ident(s)}_new")
    w.depth -= 1
    for line in after_lines:
        w(line)
    for o in c.outputs:
        n_rank = prog.layout[o]
        ptr = f"{_ident(o)}_base + {offs[p]}[:, None] * {stride(o, p)}"
        mask = f"{msk[p]}[:, None]"
        if prog.columns and not n_rank:
            mask += f" & ({offs[p]}[:, None] * 0 + pid_c == 0)"  # one column tile stores what does not vary over it
        if n_rank:
            ptr += f" + {offs[n_rank]}[None, :] * {stride(o, n_rank)}"
            mask += f" & {msk[n_rank]}[None, :]"
        w(f"tl.store({ptr}, {_ident(o)}.to({_ident(o)}_ptr.dtype.element_ty), mask={mask})")
    return _module(c, kernel_name, "\n".join(w.lines) + "\n", helpers)


def _condition_inputs(c: Cascade) -> set[str]:
    from .row import _condition_inputs as f
    return f(c)
