"""QuantSpec: which scheme, with which options, on which layers; validated up front.

`OptimizeConfig(quantize=...)` and `einfuse.quant.quantize(...)` both resolve to a
QuantSpec. Every bad option fails here, before a model is touched, with the option
named in the message.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, fields
from typing import Any

from einfuse.quant.schemes import GROUP_SIZES, SCHEMES, get_scheme

# OptimizeConfig field -> QuantSpec field (the dict form of `quantize=` uses the right-hand names)
CONFIG_FIELDS = {"quant_group_size": "group_size", "quant_symmetric": "symmetric", "quant_threshold": "threshold",
                 "quant_include": "include", "quant_exclude": "exclude", "quant_min_size": "min_size",
                 "quant_lm_head": "lm_head", "quant_embeddings": "embeddings"}


@dataclass(frozen=True)
class QuantSpec:
    """A quantization request.

    scheme: one of int8, int4, int6, llm_int8, w8a8.
    group_size: int4/int6 group size along the input dimension; None picks the
        largest of 128, 64, 32 that divides each layer's input size (a layer none
        divides stays in fp, with the reason in the report). An explicit size must
        divide every selected layer's input size.
    symmetric: int4/int6 codes centred on zero (scale only) or min/max (scale and offset).
    threshold: LLM.int8() outlier threshold on |x|.
    include / exclude: fnmatch patterns on module names ("*.mlp.*", "model.layers.0.*").
    min_size: layers whose weight has fewer elements stay in fp.
    lm_head / embeddings: also quantize the output projection / the embedding tables.
    """
    scheme: str
    group_size: int | None = None
    symmetric: bool = True
    threshold: float = 6.0
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    min_size: int = 0
    lm_head: bool = False
    embeddings: bool = False

    def __post_init__(self):
        sch = get_scheme(self.scheme)
        if self.group_size is not None:
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
                raise ValueError(f"quant group_size must be a positive int, got {gs!r}")
            if not sch.grouped:
                raise ValueError(f"group_size applies to the grouped schemes int4 and int6, not {self.scheme!r} "
                                 f"(which has one scale per output channel)")
            step = 2 if sch.bits == 4 else 4
            if gs % step:
                raise ValueError(f"{self.scheme} group_size must be a multiple of {step} (codes are packed "
                                 f"{8 // sch.bits if sch.bits == 4 else 4} per {1 if sch.bits == 4 else 3} byte(s)), "
                                 f"got {gs}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"quant symmetric must be a bool, got {self.symmetric!r}")
        if not self.symmetric and not sch.grouped:
            raise ValueError(f"asymmetric quantization applies to int4 and int6; {self.scheme!r} is symmetric "
                             f"(int8 codes multiply directly in integer matmuls)")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold > 0:
            raise ValueError(f"quant threshold must be a positive number, got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if v is None:
                continue
            v = (v,) if isinstance(v, str) else v
            try:
                v = tuple(v)
            except TypeError:
                raise TypeError(f"quant {name} must be a pattern or a sequence of patterns, got {v!r}") from None
            if not all(isinstance(p, str) for p in v):
                raise TypeError(f"quant {name} patterns must be strings, got {v!r}")
            object.__setattr__(self, name, v)
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"quant min_size must be a non-negative int, got {self.min_size!r}")
        for name in ("lm_head", "embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"quant {name} must be a bool, got {getattr(self, name)!r}")

    @property
    def grouped(self) -> bool:
        return get_scheme(self.scheme).grouped

    def selects(self, name: str) -> str:
        """'' if the name filters let the layer through, else the reason it is left in fp."""
        if self.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return f"not matched by include patterns {list(self.include)}"
        for p in self.exclude:
            if fnmatch.fnmatchcase(name, p):
                return f"excluded by pattern {p!r}"
        return ""

    def group_for(self, k: int, name: str) -> tuple[int, str]:
        """(group size for a layer with k inputs, note); group 0 means per-channel.

        Raises for an explicit size that does not divide k; returns (-1, reason)
        when no listed size does (the layer stays in fp).
        """
        if not self.grouped:
            return 0, ""
        if self.group_size is not None:
            if k % self.group_size:
                raise ValueError(f"group size {self.group_size} does not divide in_features {k} of layer {name!r}; "
                                 f"pick a divisor of {k} or leave group_size unset (the largest of "
                                 f"{GROUP_SIZES} that divides is used)")
            return self.group_size, ""
        for gs in GROUP_SIZES:
            if k % gs == 0:
                note = "" if gs == GROUP_SIZES[0] else f"group size {GROUP_SIZES[0]} does not divide {k}: used {gs}"
                return gs, note
        return -1, f"no group size in {GROUP_SIZES} divides in_features {k}"

    @classmethod
    def from_config(cls, config: Any) -> "QuantSpec | None":
        """The spec an OptimizeConfig asks for (None without `quantize`)."""
        if getattr(config, "quantize", None) is None:
            return None
        kw = {v: getattr(config, k) for k, v in CONFIG_FIELDS.items()}
        return cls(scheme=config.quantize, **kw)


def normalize_quantize_option(value: Any, flat: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """`quantize=` as given (None, a scheme name or a dict) -> (scheme, the quant_* fields to set).

    Validates everything by building the QuantSpec once.
    """
    defaults = {f.name: f.default for f in fields(QuantSpec)}
    if value is None:
        set_ = [k for k, v in flat.items() if v != defaults[CONFIG_FIELDS[k]]]
        if set_:
            raise ValueError(f"{set_[0]} is set but quantize is None; pass quantize=<scheme>, one of {tuple(SCHEMES)}")
        return None, {}
    if isinstance(value, dict):
        value = dict(value)
        scheme = value.pop("scheme", None)
        if scheme is None:
            raise ValueError(f"quantize dict needs a 'scheme' key, one of {tuple(SCHEMES)}")
        back = {v: k for k, v in CONFIG_FIELDS.items()}
        unknown = [k for k in value if k not in back]
        if unknown:
            raise ValueError(f"unknown quantize option {unknown[0]!r}; options are 'scheme', "
                             f"{', '.join(repr(k) for k in back)}")
        flat = {**flat, **{back[k]: v for k, v in value.items()}}
    elif isinstance(value, str):
        scheme = value
    else:
        raise TypeError(f"quantize must be a scheme name {tuple(SCHEMES)}, a dict or None, got {value!r}")
    spec = QuantSpec(scheme=scheme, **{CONFIG_FIELDS[k]: v for k, v in flat.items()})
    out = {k: getattr(spec, v) for k, v in CONFIG_FIELDS.items()}
    return spec.scheme, out
