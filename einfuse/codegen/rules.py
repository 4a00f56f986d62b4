"""Triton expression text for the map ops of a cascade: a rule table keyed by `Op`.

`triton_rules[op](node, args)` returns the Triton expression for one map node whose operands
are already rendered as `args` (strings). Ops without a rule raise `CodegenError` naming the op,
so a new op shows up as a clear error, not as wrong code. Rules that need more than one line
call a small `@triton.jit` helper; `HELPERS` holds their source, emitted into the generated
module only when used.
"""

from __future__ import annotations

import math
from typing import Callable

from einfuse.ir.node import Node, Op


class CodegenError(ValueError):
    """The cascade is outside what the generator handles (the message says why)."""


def literal(v: float) -> str:
    """A float constant as Triton source (fp32 in the kernel, like torch's Python scalars)."""
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(float(v))


def _add(n: Node, a: list[str]) -> str:
    out = a[0]
    for t in a[1:]:  # a + (-x) prints as a - x
        out += f" - {t[1:]}" if t.startswith("-") else f" + {t}"
    return f"({out})"


def _simple(t: str) -> bool:
    return t.replace("_", "").replace(".", "").isalnum()


def _mul(n: Node, a: list[str]) -> str:
    neg = bool(n.src) and n.src[0].op is Op.CONST and n.src[0].arg == -1.0 and len(a) > 1
    factors = list(zip(n.src, a))[1:] if neg else list(zip(n.src, a))
    num, den = [], []
    for s, t in factors:  # x * recip(y) -> x / y (one rounding, not two)
        if s.op is Op.RECIP and t.startswith("(1.0 / ") and t.endswith(")"):
            d = t[len("(1.0 / "):-1]
            den.append(d if _simple(d) else f"({d})")
        else:
            num.append(t)
    text = " * ".join(num) if num else "1.0"
    text += "".join(f" / {d}" for d in den)
    if neg:  # (-1)*x*y -> -(x * y)
        return f"-({text})" if len(num) + len(den) > 1 else f"-{text}"
    return text


def _gelu(n: Node, a: list[str]) -> str:
    approx = n.arg or "none"
    if approx not in ("none", "tanh"):
        raise CodegenError(f"gelu with approximate={approx!r} has no Triton rule")
    return f"{'_gelu_tanh' if approx == 'tanh' else '_gelu'}({a[0]})"


triton_rules: dict[Op, Callable[[Node, list[str]], str]] = {
    Op.ADD: _add,                                            # a + b + ...
    Op.MUL: _mul,                                            # a * b * ...
    Op.NEG: lambda n, a: f"-({a[0]})",
    Op.RECIP: lambda n, a: f"(1.0 / {a[0]})",
    Op.SQRT: lambda n, a: f"tl.sqrt({a[0]})",
    Op.RSQRT: lambda n, a: f"tl.rsqrt({a[0]})",
    Op.EXP: lambda n, a: f"tl.exp({a[0]})",
    Op.LOG: lambda n, a: f"tl.log({a[0]})",
    Op.TANH: lambda n, a: f"_tanh({a[0]})",
    Op.SIGMOID: lambda n, a: f"tl.sigmoid({a[0]})",
    Op.GELU: _gelu,
    Op.MAX2: lambda n, a: f"tl.maximum({a[0]}, {a[1]})",
    Op.WHERE: lambda n, a: f"tl.where({a[0]} != 0, {a[1]}, {a[2]})",
}


def render(n: Node, args: list[str]) -> str:
    rule = triton_rules.get(n.op)
    if rule is None:
        raise CodegenError(f"no Triton rule for op {n.op.name} (in a map expression); "
                           f"add one to einfuse.codegen.rules.triton_rules")
    return rule(n, args)


# helpers (tanh: 2*sigmoid(2x) - 1 works in the interpreter and on every GPU backend)
HELPERS = {
    "_tanh": '''@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
''',
    "_gelu": '''@triton.jit
def _gelu(x):
    # exact GELU: x * Phi(x), Phi(x) = (1 + erf(x / sqrt(2))) / 2
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
''',
    "_gelu_tanh": '''@triton.jit
def _gelu_tanh(x):
    # GELU, tanh approximation: x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) / 2
    return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
''',
    "_dot_in": '''@triton.jit
def _dot_in(x, F32: tl.constexpr):
    # Triton's interpreter computes bf16/fp16 tl.dot wrongly: there the operands go in as fp32
    # holding the same values (what a tensor core multiplies exactly and accumulates in fp32)
    if F32:
        y = x.to(tl.float32)
    else:
        y = x
    return y
''',
}
HELPER_DEPS = {"_gelu_tanh": ("_tanh",)}
