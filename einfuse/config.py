"""OptimizeConfig: every option of `optimize`, the backend and `inspect`, with its default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

INNER = ("eager", "inductor")


@dataclass(frozen=True)
class OptimizeConfig:
    """Options for `einfuse.optimize`, `torch.compile(backend="einfuse", options=...)` and `einfuse.inspect`.

    inner: "eager" runs the rewritten graph as is; "inductor" hands it to Inductor.
    passes: names of the fusion passes to run (default: all, in pipeline order).
    return_logits: with the logit-free loss, also return the logits (default: an
        empty tensor stands in for them when labels are given, as Liger-Kernel
        and Cut Cross-Entropy return none).
    dynamic: passed to torch.compile (None lets Dynamo decide: static first,
        dynamic after a shape change, so decoding does not recompile per token).
    debug: lint the graph after every pass and keep graph text in the report.
    fullgraph: passed to torch.compile.
    """
    inner: str = "eager"
    passes: tuple[str, ...] | None = None
    return_logits: bool = False
    dynamic: bool | None = None
    debug: bool = False
    fullgraph: bool = False

    def __post_init__(self):
        if self.inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, got {self.inner!r}")
        if self.passes is not None:
            from einfuse.passes.pipeline import PASS_NAMES
            object.__setattr__(self, "passes", tuple(self.passes))
            unknown = [p for p in self.passes if p not in PASS_NAMES]
            if unknown:
                raise ValueError(f"unknown pass {unknown[0]!r}; passes are {PASS_NAMES}")

    @classmethod
    def from_options(cls, config: "OptimizeConfig | None" = None, **options: Any) -> "OptimizeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        for k in options:
            if k not in names:
                raise TypeError(f"unknown einfuse option {k!r}; options are: {', '.join(sorted(names))}")
        base = config or cls()
        if not isinstance(base, OptimizeConfig):
            raise TypeError(f"config must be an einfuse.OptimizeConfig, got {type(base).__name__}")
        return dataclasses.replace(base, **options)
