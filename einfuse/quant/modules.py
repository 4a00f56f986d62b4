"""Quantized layers: drop-in replacements for nn.Linear and nn.Embedding.

Both hold the weight only as buffers in a scheme's format (`qweight`, `scales`,
`offsets` when asymmetric, `outliers` for LLM.int8()), so `state_dict` has the
quantized tensors and no fp weight; a bias stays an fp parameter. The layout of
each layer (scheme, group size, shapes) is in `layout()`, which is what
`einfuse.quant.save_quantized` writes next to the tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from einfuse.quant.schemes import dequantize_weight, get_scheme, packed_width, quantize_weight
from einfuse.runtime.ops.quantized_linear import quantized_linear


class _Quantized(nn.Module):
    """Shared buffer handling of quantized layers."""

    scheme: str
    group_size: int
    symmetric: bool
    in_features: int
    out_features: int

    def _init_buffers(self, n: int, k: int, asymmetric: bool):
        sch = get_scheme(self.scheme)
        code_dtype = torch.int8 if sch.bits == 8 else torch.uint8
        groups = k // self.group_size if sch.grouped else None
        sshape = (n, groups) if groups else (n,)
        self.register_buffer("qweight", torch.zeros(n, packed_width(sch.bits, k), dtype=code_dtype))
        self.register_buffer("scales", torch.ones(sshape, dtype=torch.float32))
        self.register_buffer("offsets", torch.zeros(sshape, dtype=torch.float32) if asymmetric else None)

    def _set_weight(self, w: Tensor, state: dict | None = None) -> None:
        st = state if state is not None else quantize_weight(w, self.scheme, self.group_size, self.symmetric)
        self.qweight = st["qweight"]
        self.scales = st["scales"]
        self.offsets = st["offsets"]

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer computes with, [out, in] (for inspection and tests)."""
        return dequantize_weight(self.qweight, self.scales, self.offsets, self.scheme, self.group_size,
                                 self.in_features, dtype)

    def layout(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size, "symmetric": self.symmetric,
                "in_features": self.in_features, "out_features": self.out_features}


class QuantizedLinear(_Quantized):
    """y = x @ dequant(W)^T + b through `einfuse::quantized_linear` (see runtime/ops/quantized_linear.py)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 0,
                 symmetric: bool = True, bias: bool = False, threshold: float = 6.0,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        sch = get_scheme(scheme)
        self.scheme, self.group_size, self.symmetric = scheme, (group_size if sch.grouped else 0), symmetric
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self._init_buffers(out_features, in_features, sch.grouped and not symmetric)
        self.register_buffer("outliers", torch.zeros(0, dtype=torch.int64) if sch.activations == "llm_int8" else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype)) if bias else None

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None, scheme: str, group_size: int = 0,
                   symmetric: bool = True, threshold: float = 6.0, outliers: Tensor | None = None,
                   state: dict | None = None) -> "QuantizedLinear":
        """Quantize a weight [out, in] (and keep the bias in its dtype); `state`: codes already computed (GPTQ)."""
        n, k = weight.shape
        m = cls(k, n, scheme, group_size, symmetric, bias is not None, threshold,
                bias.dtype if bias is not None else torch.float32)
        m._set_weight(weight, state)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        if outliers is not None and m.outliers is not None:
            m.outliers = outliers.to(torch.int64).sort().values
        return m

    def forward(self, x: Tensor) -> Tensor:
        return quantized_linear(x, self.qweight, self.scales, self.offsets, self.bias, scheme=self.scheme,
                                group_size=self.group_size, in_features=self.in_features, outliers=self.outliers,
                                threshold=self.threshold)

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "kind": "linear", "bias": self.bias is not None, "threshold": self.threshold,
                "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None}

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        sym = "" if self.symmetric else ", asymmetric"
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{g}{sym}"


class QuantizedEmbedding(_Quantized):
    """An nn.Embedding whose table is quantized; only the looked-up rows are dequantized.

    The table is quantized per row (a row is a token's vector), with the scheme's
    weight format; activation schemes (w8a8, llm_int8) store it as int8, like int8.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str, group_size: int = 0,
                 symmetric: bool = True, padding_idx: int | None = None, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        sch = get_scheme(scheme)
        self.scheme, self.group_size, self.symmetric = scheme, (group_size if sch.grouped else 0), symmetric
        self.in_features, self.out_features = embedding_dim, num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = out_dtype
        self._init_buffers(num_embeddings, embedding_dim, sch.grouped and not symmetric)

    @classmethod
    def from_float(cls, emb: nn.Embedding, scheme: str, group_size: int = 0, symmetric: bool = True) -> "QuantizedEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, scheme, group_size, symmetric, emb.padding_idx,
                emb.weight.dtype)
        m._set_weight(emb.weight)
        return m

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_weight(self.qweight.index_select(0, flat), self.scales.index_select(0, flat),
                                 None if self.offsets is None else self.offsets.index_select(0, flat),
                                 self.scheme, self.group_size, self.embedding_dim, torch.float32)
        return rows.to(self.out_dtype).reshape(*ids.shape, self.embedding_dim)

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "kind": "embedding", "padding_idx": self.padding_idx,
                "out_dtype": str(self.out_dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}"


def from_layout(layout: dict[str, Any]) -> _Quantized:
    """An empty quantized layer with this layout (the loader fills its buffers)."""
    dt = lambda s: getattr(torch, s) if s else torch.float32  # noqa: E731
    if layout["kind"] == "linear":
        return QuantizedLinear(layout["in_features"], layout["out_features"], layout["scheme"], layout["group_size"],
                               layout["symmetric"], layout["bias"], layout.get("threshold", 6.0),
                               dt(layout.get("bias_dtype")))
    if layout["kind"] == "embedding":
        return QuantizedEmbedding(layout["out_features"], layout["in_features"], layout["scheme"],
                                  layout["group_size"], layout["symmetric"], layout.get("padding_idx"),
                                  dt(layout.get("out_dtype")))
    raise ValueError(f"unknown quantized layer kind {layout['kind']!r}")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, _Quantized) for m in model.modules())


__all__ = ["QuantizedLinear", "QuantizedEmbedding", "from_layout", "is_quantized"]
