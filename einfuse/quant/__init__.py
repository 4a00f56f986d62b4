"""Quantization: schemes, quantized layers, calibration, safetensors save/load.

    import einfuse
    model = einfuse.optimize(model, quantize="int4")                 # quantize, then fuse
    summary = einfuse.quant.quantize(model, "llm_int8", calibration=batches)  # quantize only
    summary = einfuse.quant.quantize(model, "int4", group_size=64, calibration=batches)  # GPTQ rounding
    einfuse.quant.save_quantized(model, "model.safetensors")
    einfuse.quant.load_quantized(fresh_fp_model, "model.safetensors")

Schemes (`SCHEMES`): int8 (weight-only, per-channel), int4 (W4A16, group-wise,
symmetric or asymmetric), int6 (FlexQ-style weight-only), llm_int8 (LLM.int8()
with fp outlier columns), w8a8 (dynamic per-token int8 activations).
See einfuse/passes/quantize.py for what the pass does to a model and why, and
einfuse/runtime/ops/quantized_linear.py for the kernels.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn

from einfuse.quant.schemes import GROUP_SIZES, SCHEMES, dequantize_weight, quantize_weight, reference_linear
from einfuse.quant.spec import QuantSpec


def quantize(model: nn.Module, scheme: str = "int8", *, group_size: int | None = None, symmetric: bool = True,
             threshold: float = 6.0, include: Any = None, exclude: Any = (), min_size: int = 0,
             lm_head: bool = False, embeddings: bool = False, calibration: Iterable[Any] | None = None,
             progress: bool = True, report=None):
    """Quantize `model`'s linear layers in place; returns a QuantSummary (layers, bytes before/after, notes).

    `calibration`: batches run through the fp model first (progress bar unless
    progress=False). llm_int8: they find each layer's outlier input columns. The
    other schemes: they give each layer's input Hessian X^T X, and the weights are
    rounded with GPTQ (einfuse/quant/gptq.py) instead of round-to-nearest — what
    makes int4 usable on small models. Calibrate on text distinct from what you
    evaluate on.
    """
    from einfuse.passes.quantize import quantize_model
    spec = QuantSpec(scheme, group_size, symmetric, threshold, include, exclude, min_size, lm_head, embeddings)
    return quantize_model(model, spec, report, calibration, progress)


def __getattr__(name: str):  # the layer classes and save/load import the runtime op: load them on first use
    if name in ("QuantizedLinear", "QuantizedEmbedding", "is_quantized"):
        from einfuse.quant import modules
        return getattr(modules, name)
    if name in ("save_quantized", "load_quantized", "read_metadata"):
        from einfuse.quant import serialize
        return getattr(serialize, name)
    if name == "calibrate_outliers":
        from einfuse.quant.calibrate import calibrate_outliers
        return calibrate_outliers
    raise AttributeError(f"module 'einfuse.quant' has no attribute {name!r}")


__all__ = ["quantize", "QuantSpec", "SCHEMES", "GROUP_SIZES", "QuantizedLinear", "QuantizedEmbedding",
           "save_quantized", "load_quantized", "read_metadata", "calibrate_outliers", "quantize_weight",
           "dequantize_weight", "reference_linear", "is_quantized"]
