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
    sparsity: activation sparsity for gated (SwiGLU-style) MLPs, ``{"method": "chess" | "moc" |
        "coreinfer", "target": 0.5}`` (target: the fraction of intermediate channels skipped, in [0, 1));
        "chess" needs ``calibration``. None or target 0: off. See einfuse/passes/sparsity.py.
    layer_skip: the fraction of decoder layers to skip (Unified Layer Skipping: spread evenly over the
        middle of the stack, first and last kept), in [0, 1); see ``einfuse.layers_for_speedup`` and
        einfuse/passes/layer_skip.py. 0: off.
    calibration: an ``einfuse.calibrate(...)`` result (``einfuse.calibrate.Calibration``) for ``sparsity``.
    ddp_optimizer: under torch.distributed, let Dynamo's DDPOptimizer split the captured graph at
        DistributedDataParallel's gradient-bucket boundaries (True), or not (False, the default:
        `torch._dynamo.config.optimize_ddp` is set to False while the optimized model runs). Splitting
        lets the all-reduce of early buckets overlap the rest of the backward, but a split can cut a
        fusion apart (a gated MLP whose weights fall in two buckets is left unfused); without it the
        model is one graph, every fusion is kept, and DDP's all-reduce runs after the backward.

    Quantization (`einfuse.optimize` on an nn.Module; see einfuse/passes/quantize.py):
    quantize: None, a scheme name ("int8", "int4", "int6", "llm_int8", "w8a8") or a dict
        {"scheme": ..., plus any quant_* option without the prefix}. The model's linear
        layers are replaced IN PLACE by quantized ones and their fp weights freed.
    quant_group_size: int4/int6 group size (None: the largest of 128, 64, 32 that divides
        each layer's input size; an explicit size must divide it).
    quant_symmetric: int4/int6 codes with a scale only (True) or a scale and an offset.
    quant_threshold: LLM.int8() outlier threshold on |activation| (default 6.0).
    quant_include / quant_exclude: fnmatch patterns on module names selecting layers.
    quant_min_size: layers whose weight has fewer elements stay in fp.
    quant_lm_head / quant_embeddings: also quantize the lm_head / the embedding tables (off
        by default; quantizing a tied lm_head without the embedding unties them).
    """
    inner: str = "eager"
    passes: tuple[str, ...] | None = None
    return_logits: bool = False
    dynamic: bool | None = None
    debug: bool = False
    fullgraph: bool = False
    sparsity: dict | None = None
    layer_skip: float = 0.0
    calibration: object | None = None
    ddp_optimizer: bool = False
    quantize: str | dict | None = None
    quant_group_size: int | None = None
    quant_symmetric: bool = True
    quant_threshold: float = 6.0
    quant_include: tuple[str, ...] | None = None
    quant_exclude: tuple[str, ...] = ()
    quant_min_size: int = 0
    quant_lm_head: bool = False
    quant_embeddings: bool = False

    def __post_init__(self):
        if self.inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, got {self.inner!r}")
        if self.passes is not None:
            from einfuse.passes.pipeline import PASS_NAMES
            object.__setattr__(self, "passes", tuple(self.passes))
            unknown = [p for p in self.passes if p not in PASS_NAMES]
            if unknown:
                raise ValueError(f"unknown pass {unknown[0]!r}; passes are {PASS_NAMES}")
        from einfuse.passes.sparsity import check_options
        check_options(self)  # sparsity / layer_skip / calibration: clear errors, sparsity normalised
        self._check_quantization()

    def _check_quantization(self):
        """Validate the quantize options (a dict form is spread into the quant_* fields)."""
        from einfuse.quant.spec import CONFIG_FIELDS, normalize_quantize_option
        scheme, flat = normalize_quantize_option(self.quantize, {k: getattr(self, k) for k in CONFIG_FIELDS})
        object.__setattr__(self, "quantize", scheme)
        for k, v in flat.items():
            object.__setattr__(self, k, v)

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
