"""Pass counting (FuseMax) for every fused region, before and after fusion.

The convention (also in the README):

  * A *pass* over a rank r is one sweep over r's fiber -- all values of r, for each
    fixed value of the other ranks -- reading the inputs indexed by r.
  * An Einsum *traverses* r when r is among its output ranks or the ranks it reduces.
    It runs in the same sweep as the Einsums it reads, unless it reads a value
    *reduced over r*: that value is known only after a whole sweep, so reading it at
    every point of r needs a new sweep. passes(r) = 1 + the largest number of
    reductions over r on a dependency chain ending in an Einsum that traverses r
    (`passes_per_rank`, in `einfuse.ir.attention_cascades`).
  * *Materialised outputs add no pass.* Writing an r-indexed intermediate (the scores
    of unfused attention, the log-probabilities of an eager loss) belongs to the sweep
    that computes it, and reading it back belongs to the later sweep that needs it;
    a pass counts the dependency, not the number of kernels or of HBM round trips (the
    IO model, `io_model`, counts those bytes).
  * Running state carried across an iterated rank (the online-softmax running max and
    denominator) is not a reduction over it: it adds no pass.
  * Ranks with no reduction count 1.

Unfused counts are the reference cascade's (the computation as eager PyTorch spells
it); fused counts are those of the cascade the fused op runs, and for ops that keep a
whole fiber on chip, the number of sweeps over it in HBM:
  * attention: the 3-pass cascade (max of the scores over the key rank m, sum of the
    exponentials, then normalise and multiply by V) and the 1-pass cascade the fused
    op runs (`einfuse.ir.attention_cascades.derive`): 3 -> 1 over m;
  * linear_cross_entropy: `cross_entropy_cascades()` below: the eager loss is a
    log_softmax (max, then sum of exponentials) materialised and then read by
    nll_loss: 3 passes over the vocabulary rank v; the fused op carries a running
    max, a running sum and the target logit across vocabulary tiles: 1 pass;
  * rmsnorm (and any region recorded with a "reference" cascade): the reference
    cascade's count before (RMSNorm: 2 over h, the sum of squares then the scaling);
    after fusion a kernel holds a whole fiber on chip when it fits the on-chip memory
    of one thread block (M, `devices.DeviceProfile.smem_per_block`, fp32 compute), so
    its later sweeps read the on-chip copy: 1 pass over HBM; when the fiber does not
    fit, the fused kernel sweeps the fiber in HBM as often as the cascade says (2).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import sympy

from einfuse.ir.attention_cascades import passes_per_rank
from einfuse.ir.cascade import Cascade, Einsum, read
from einfuse.ir.node import Op, const, node

__all__ = ["PassCount", "passes_per_rank", "cross_entropy_cascades", "fused_passes", "region_pass_counts",
           "cascade_cost"]


class PassCount(NamedTuple):
    unfused: int
    fused: int

    def __str__(self) -> str:
        return f"{self.unfused} -> {self.fused}"


def _sub(a, b):
    return node(Op.ADD, (a, node(Op.MUL, (const(-1.0), b))))


def cross_entropy_cascades() -> dict[str, Cascade]:
    """The loss cascades: "3-pass" (eager: logits, log_softmax, nll) and "1-pass" (online).

    Ranks: n (tokens), v (vocabulary), h (hidden). Y[n,v] is the one-hot target (the
    gather of the target logit written as a contraction with it); L[n] is the per-token
    loss. In the 1-pass cascade v is split into tiles (v1, v0); RM, RD and RY are the
    running max, the running (rescaled) sum of exponentials and the running target
    logit; L = RM + log(RD) - RY from the final state.
    """
    hx = node(Op.MUL, (read("H", "n", "h"), read("W", "v", "h")))
    x = read("X", "n", "v")
    c3 = Cascade("cross_entropy", (("H", ("n", "h")), ("W", ("v", "h")), ("Y", ("n", "v"))), (
        Einsum("X", ("n", "v"), hx, Op.SUM, ("h",)),
        Einsum("GM", ("n",), x, Op.MAX, ("v",)),
        Einsum("SN", ("n", "v"), node(Op.EXP, (_sub(x, read("GM", "n")),))),
        Einsum("SD", ("n",), read("SN", "n", "v"), Op.SUM, ("v",)),
        Einsum("LP", ("n", "v"), _sub(_sub(x, read("GM", "n")), node(Op.LOG, (read("SD", "n"),)))),
        Einsum("L", ("n",), node(Op.MUL, (const(-1.0), read("Y", "n", "v"), read("LP", "n", "v"))), Op.SUM, ("v",)),
    ), ("L",), ("eager: log_softmax materialised, then nll_loss",))

    bx = read("BX", "v1", "v0", "n")
    c1 = Cascade("cross_entropy", c3.inputs, (
        Einsum("BX", ("v1", "v0", "n"), node(Op.MUL, (read("H", "n", "h"), read("W", "v1", "v0", "h"))), Op.SUM, ("h",)),
        Einsum("LM", ("v1", "n"), bx, Op.MAX, ("v0",)),
        Einsum("RM", ("v1+1", "n"), node(Op.MAX2, (read("RM", "v1", "n"), read("LM", "v1", "n"))), init=float("-inf")),
        Einsum("SLN", ("v1", "v0", "n"), node(Op.EXP, (_sub(bx, read("RM", "v1+1", "n")),))),
        Einsum("PRM", ("v1", "n"), node(Op.EXP, (_sub(read("RM", "v1", "n"), read("RM", "v1+1", "n")),))),
        Einsum("SLD", ("v1", "n"), read("SLN", "v1", "v0", "n"), Op.SUM, ("v0",)),
        Einsum("SPD", ("v1", "n"), node(Op.MUL, (read("RD", "v1", "n"), read("PRM", "v1", "n")))),
        Einsum("RD", ("v1+1", "n"), node(Op.ADD, (read("SLD", "v1", "n"), read("SPD", "v1", "n"))), init=0.0),
        Einsum("LY", ("v1", "n"), node(Op.MUL, (read("Y", "n", "v1", "v0"), bx)), Op.SUM, ("v0",)),
        Einsum("RY", ("v1+1", "n"), node(Op.ADD, (read("RY", "v1", "n"), read("LY", "v1", "n"))), init=0.0),
        Einsum("L", ("n",), _sub(node(Op.ADD, (read("RM", "V1", "n"), node(Op.LOG, (read("RD", "V1", "n"),)))),
                                 read("RY", "V1", "n"))),
    ), ("L",), ("online logsumexp and target logit over vocabulary tiles",), (("v", "v1", "v0"),))
    return {"3-pass": c3, "1-pass": c1}


def _base_ranks(c: Cascade) -> list[str]:
    out: list[str] = []
    for _, ranks in c.inputs:
        for r in ranks:
            if r not in out:
                out.append(r)
    for e in c.einsums:
        for r in tuple(x.partition("+")[0] for x in e.ranks) + e.over:
            if r not in out:
                out.append(r)
    split = {o for _, o, i in c.splits} | {i for _, o, i in c.splits}
    return [r for r in out if r not in split and not r[:1].isupper()]


def fused_passes(cascade: Cascade, sizes: dict[str, Any], smem_bytes: int, elem_bytes: int = 4) -> dict[str, int]:
    """Passes over HBM of a kernel running `cascade` that keeps a fiber on chip when it fits.

    A rank whose fiber (size * elem_bytes) fits in `smem_bytes` is swept once in HBM;
    a rank of unknown size, or one that does not fit, keeps the cascade's count.
    """
    counts = passes_per_rank(cascade)
    out = {}
    for r, p in counts.items():
        size = sizes.get(r)
        fits = isinstance(size, int) and size * elem_bytes <= smem_bytes
        out[r] = 1 if (p > 1 and fits) else p
    return out


_LCE = None


def region_pass_counts(region, smem_bytes: int) -> dict[str, PassCount]:
    """rank -> PassCount(unfused, fused) for a fused region (empty when it has no cascade)."""
    global _LCE
    cs = getattr(region, "cascades", {}) or {}
    if region.kind == "attention" and "3-pass" in cs and "1-pass" in cs:
        before, after = passes_per_rank(cs["3-pass"]), passes_per_rank(cs["1-pass"])
        ranks = _base_ranks(cs["3-pass"])
        return {r: PassCount(before.get(r, 1), after.get(r, 1)) for r in ranks}
    if region.kind == "linear_cross_entropy":
        if _LCE is None:
            _LCE = cross_entropy_cascades()
        before, after = passes_per_rank(_LCE["3-pass"]), passes_per_rank(_LCE["1-pass"])
        return {r: PassCount(before[r], after.get(r, 1)) for r in _base_ranks(_LCE["3-pass"])}
    ref = cs.get("reference")
    if ref is None:
        return {}
    sizes = dict(region.bindings.get("rank_sizes", {}) or {})
    if region.kind == "rmsnorm" and isinstance(region.bindings.get("hidden"), int):
        sizes.setdefault("h", region.bindings["hidden"])
    before = passes_per_rank(ref)
    after = fused_passes(ref, sizes, smem_bytes)
    return {r: PassCount(before[r], after[r]) for r in _base_ranks(ref) if r in before}


# ---------------------------------------------------------------------------------------
# the symbolic interpreter over cascades

def _expr_ops(n) -> int:
    if not n.src:
        return 0
    own = len(n.src) - 1 if n.op in (Op.ADD, Op.MUL) else 1
    return own + sum(_expr_ops(s) for s in n.src)


def cascade_cost(cascade: Cascade, sizes: dict[str, Any], elem_bytes: int = 4) -> dict[str, Any]:
    """FLOPs and materialised bytes of a cascade, with rank sizes given as ints or sympy symbols.

    Per Einsum: its iteration space (output ranks and reduced ranks; a split rank's outer
    and inner parts together span the rank) times the operations of its map expression
    (an n-ary add/mul is n - 1 operations), plus one per point for the reduction. Bytes:
    each Einsum's output written once (running state: one value per iteration).
    {"flops": ..., "bytes": ..., "per_einsum": {name: (flops, bytes)}}.
    """
    sizes = dict(sizes)
    for rank, outer, inner in cascade.splits:
        if rank in sizes and inner in sizes and outer not in sizes:
            sizes[outer] = sympy.ceiling(sympy.sympify(sizes[rank]) / sizes[inner])
    def size(r: str):
        base = r.partition("+")[0]
        if base[:1].isupper():
            return 1
        return sizes.get(base, sympy.Symbol(base, positive=True, integer=True))
    per: dict[str, tuple] = {}
    flops, nbytes = 0, 0
    for e in cascade.einsums:
        ranks = [r for r in e.ranks] + [r for r in e.over if r not in e.ranks]
        space = 1
        for r in ranks:
            space = space * size(r)
        ops = _expr_ops(e.expr) + (1 if e.reduce is not None else 0)
        out = 1
        for r in e.ranks:
            out = out * size(r)
        f, b = ops * space, out * elem_bytes
        per[e.out] = (f, b)
        flops, nbytes = flops + f, nbytes + b
    return {"flops": sympy.sympify(flops), "bytes": sympy.sympify(nbytes), "per_einsum": per}
