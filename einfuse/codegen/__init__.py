"""Codegen: Triton source generated from einsum cascades.

    src = einfuse.codegen.generate(cascade).source     # a Triton module, readable
    kernel_source("rmsnorm", cascade)                  # the same, named for a fusion kind

`row.py` generates row programs (one parallel row rank set, one tiled rank): norms,
activations, RoPE, softmax, cross-entropy over given logits, and their backward cascades
(`library.py` builds those from an op call's parameters). `rules.py` is the Op -> Triton
expression table. `launch.py` runs generated kernels through the kernel cache
(`einfuse.runtime.cache`); `ops.py` holds the fused ops' Triton implementations that
`einfuse.runtime.dispatch` routes CUDA tensors (or EINFUSE_KERNELS=triton) to.

`contraction.py` generates contraction programs from cascades with a split, iterated rank:
`tl.dot` on tiles, running state carried across the tiles: attention forward (the 1-pass
cascade of `einfuse.ir.attention_cascades`), attention backward (dQ with query rows in
parallel; dK, dV with keys in parallel), and linear cross-entropy (the log-sum-exp over
vocabulary tiles; dX with tokens in parallel; dW, dB with vocabulary rows in parallel). A full
rank wider than one block (the hidden size of a loss) is tiled: contractions over it loop over
its tiles, and outputs indexed by it are split over grid axis 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from einfuse.ir.cascade import Cascade
from . import contraction, row
from .rules import CodegenError, triton_rules

__all__ = ["generate", "kernel_source", "report_kernels", "Generated", "CodegenError", "triton_rules"]


@dataclass(frozen=True)
class Generated:
    name: str
    source: str
    meta: dict


def _kernel_name(s: str) -> str:
    out = "".join(ch if ch.isalnum() else "_" for ch in s).strip("_") or "kernel"
    return out if out[0].isalpha() else "k_" + out


def generate(c: Cascade, name: str | None = None, compute: str = "float32", block: str | None = None) -> Generated:
    """Triton source for a cascade: a contraction program if it splits a rank, else a row program
    (raises CodegenError when it is neither)."""
    name = _kernel_name(name or c.name)
    if c.splits:
        cprog = contraction.analyse(c)
        return Generated(name, contraction.emit(cprog, name), cprog.meta())
    prog = row.analyse(c, block)
    return Generated(name, row.emit(prog, name, compute), prog.meta())


def kernel_source(kind: str, cascade: Cascade) -> str:
    """The generated source for a fusion kind's cascade, e.g. a fused region's reference cascade."""
    return generate(cascade, f"{kind}_kernel").source


_PREFERRED = ("1-pass", "reference", "forward")


def _op_cascade(region) -> Cascade | None:
    """The op's own forward cascade, for regions that record none."""
    from . import library
    if region.kind == "rope":
        return library.rope(False, shared_halves=bool(region.bindings.get("interleaved")))
    return None


def report_kernels(regions) -> dict[str, str]:
    """Fusion kind -> generated source, from the first fused region of each kind: its "1-pass"
    or "reference" cascade if recorded, else the fused op's forward cascade where there is one;
    a cascade outside the codegen gives a comment saying why."""
    out: dict[str, str] = {}
    for r in regions:
        if not r.fused or r.kind in out:
            continue
        label = next((k for k in _PREFERRED if k in r.cascades), next(iter(r.cascades), None))
        c = r.cascades[label] if label is not None else _op_cascade(r)
        if c is None:
            continue
        try:
            out[r.kind] = kernel_source(r.kind, c)
        except CodegenError as e:
            out[r.kind] = f"# no kernel generated for the {label!r} cascade of {r.kind}: {e}\n"
    return out
