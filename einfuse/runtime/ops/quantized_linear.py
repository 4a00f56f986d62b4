"""Quantized linear: y = x @ dequant(W)^T (+ b) for every scheme, as `einfuse::quantized_linear`.

Weights are in the formats of `einfuse.quant.schemes` (codes, scales, offsets).
What runs on CPU, per scheme:

* weight-only (int8, int4, int6): x stays in full precision. Up to `SMALL_M` rows
  (decoding), a compiled kernel unpacks the codes in registers and accumulates in
  fp32, reading each packed weight byte once (`einfuse.quant.cpu_kernels`); above
  that (prefill, compute-bound) the weight is dequantized chunk by chunk of output
  channels and multiplied by MKL's sgemm. Without a C compiler: dequantize + matmul.
* w8a8: per-token int8 x (scale = row absmax / 127) times the int8 weight with
  torch's integer GEMM (`torch._int_mm`, int32 accumulation: exact), rescaled by
  the row and channel scales.
* llm_int8 (LLM.int8()): the input columns holding an |x| > threshold anywhere in
  the batch, united with the columns found by calibration (`outliers`), are
  multiplied in fp32 with the matching dequantized weight columns; the rest of x is
  per-token int8 through `torch._int_mm`, as in w8a8.

bf16/fp16 inputs are computed in fp32 and cast back; fp64 inputs take the fp64
reference path (`schemes.reference_linear`), so an fp64 reference model stays fp64.
CUDA tensors run the Triton dequantize-matmul kernels (`einfuse.quant.triton_kernels`;
CPU tensors too with EINFUSE_KERNELS=triton under TRITON_INTERPRET=1, which is how CI
checks them); other devices, or no Triton, take the reference path in fp32.

Autograd: the weight is frozen (integer codes have no gradient); the gradient of x
is grad @ dequant(W) (`einfuse::quantized_linear_backward`), with the activation
rounding of w8a8 and llm_int8 treated as identity (straight-through). Saved for
backward: only the quantized weight tensors, which the module holds anyway, so a
quantized layer keeps no activation alive (nn.Linear saves its input).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from einfuse.quant import cpu_kernels
from einfuse.quant.schemes import (dequantize_weight, get_scheme, outlier_columns, quantize_rows,
                                   reference_linear, zero_point)
from einfuse.runtime import counters, dispatch

SMALL_M = 24            # rows up to which the in-register kernel beats dequantize + sgemm (measured, see README)
CHUNK_ELEMS = 1 << 22   # dequantize at most this many weights at a time on the sgemm path (16 MB of fp32)


def _TRITON_ON_CPU() -> bool:  # EINFUSE_KERNELS=triton: CPU tensors go to Triton too (under TRITON_INTERPRET=1)
    return dispatch.mode() == "triton"


def _zero(scheme: str, offsets: Tensor | None) -> int:
    return zero_point(get_scheme(scheme).bits) if offsets is None else 0


def _dequant_rows(qweight: Tensor, scales: Tensor, offsets: Tensor | None, scheme: str, group_size: int,
                  in_features: int, n0: int, n1: int) -> Tensor:
    """Output channels n0:n1 of dequant(W), fp32."""
    sch = get_scheme(scheme)
    q, s = qweight[n0:n1], scales[n0:n1]
    o = offsets[n0:n1] if offsets is not None else None
    if qweight.device.type == "cpu" and cpu_kernels.available():
        return cpu_kernels.dequantize(q, s, o, sch.bits, group_size, in_features, _zero(scheme, offsets))
    return dequantize_weight(q, s, o, scheme, group_size, in_features, torch.float32)


def _weight_only(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None,
                 scheme: str, group_size: int, in_features: int) -> Tensor:
    m, n = x2.shape[0], qweight.shape[0]
    if m <= SMALL_M and (cpu_kernels.loaded() or cpu_kernels.available()):
        bits = get_scheme(scheme).bits
        return cpu_kernels.qgemv(x2, qweight, scales, offsets, bias, bits, group_size, in_features,
                                 0 if offsets is not None else zero_point(bits))
    step = max(1, CHUNK_ELEMS // max(1, in_features))
    if step >= n:
        y = x2 @ _dequant_rows(qweight, scales, offsets, scheme, group_size, in_features, 0, n).t()
    else:
        y = torch.cat([x2 @ _dequant_rows(qweight, scales, offsets, scheme, group_size, in_features, i,
                                          min(n, i + step)).t() for i in range(0, n, step)], dim=-1)
    return y if bias is None else y.add_(bias.to(torch.float32))


def _int8_rows(x2: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """per-token int8(x) @ int8(W)^T, rescaled (fp32)."""
    q, s = quantize_rows(x2)
    acc = torch._int_mm(q, qweight.t())
    return acc.to(torch.float32).mul_(s[:, None]).mul_(scales.to(torch.float32)[None, :])


def _forward(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Optional[Tensor], bias: Optional[Tensor],
             outliers: Optional[Tensor], scheme: str, group_size: int, in_features: int, threshold: float) -> Tensor:
    sch = get_scheme(scheme)
    if x.shape[-1] != in_features:
        raise ValueError(f"quantized_linear: input has {x.shape[-1]} features, the layer expects {in_features}")
    n = qweight.shape[0]
    if (not x.is_cpu or _TRITON_ON_CPU()) and x.is_floating_point() and x.dtype != torch.float64 \
            and dispatch.use_triton(x, qweight):  # CUDA (or the interpreter in CI): the Triton kernels
        from einfuse.quant import triton_kernels
        return triton_kernels.qlinear(x, qweight, scales, offsets, bias, outliers, scheme, group_size, in_features,
                                      threshold)
    if x.dtype is torch.float32 and x.is_cpu and sch.activations == "none":  # the hot path (decoding), lean
        y = _weight_only(x.reshape(-1, in_features), qweight, scales, offsets, bias, scheme, group_size, in_features)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
    if not x.is_floating_point():
        raise TypeError(f"quantized_linear: unsupported input dtype {x.dtype} (floating point only)")
    if x.dtype == torch.float64:
        return reference_linear(x, qweight, scales, offsets, bias, scheme, group_size, in_features, outliers,
                                threshold, torch.float64)
    if not x.is_cpu:  # a device without Triton (or EINFUSE_KERNELS=torch): the plain reference, in fp32
        return reference_linear(x, qweight, scales, offsets, bias, scheme, group_size, in_features, outliers,
                                threshold, torch.float32).to(x.dtype)
    x2 = x.reshape(-1, in_features).to(torch.float32)
    if sch.activations == "none":
        y = _weight_only(x2, qweight, scales, offsets, bias, scheme, group_size, in_features)
    else:
        if sch.activations == "per_token":
            y = _int8_rows(x2, qweight, scales)
        else:
            cols = outlier_columns(x2, threshold, outliers)
            if cols.numel():
                w_out = qweight.index_select(1, cols).to(torch.float32).mul_(scales.to(torch.float32)[:, None])
                y = _int8_rows(x2.index_fill(1, cols, 0.0), qweight, scales)
                y.addmm_(x2.index_select(1, cols), w_out.t())
            else:
                y = _int8_rows(x2, qweight, scales)
        if bias is not None:
            y.add_(bias.to(torch.float32))
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("einfuse::quantized_linear", mutates_args=())
def quantized_linear_op(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Optional[Tensor], bias: Optional[Tensor],
                        outliers: Optional[Tensor], scheme: str, group_size: int, in_features: int,
                        threshold: float) -> Tensor:
    counters.bump("quantized_linear")
    return _forward(x, qweight, scales, offsets, bias, outliers, scheme, group_size, in_features, threshold)


@quantized_linear_op.register_fake
def _(x, qweight, scales, offsets, bias, outliers, scheme, group_size, in_features, threshold):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("einfuse::quantized_linear_backward", mutates_args=())
def quantized_linear_backward_op(grad: Tensor, qweight: Tensor, scales: Tensor, offsets: Optional[Tensor],
                                 scheme: str, group_size: int, in_features: int) -> Tensor:
    """grad_x = grad @ dequant(W)."""
    n = qweight.shape[0]
    g2 = grad.reshape(-1, n)
    dt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if dt == torch.float64:
        w = dequantize_weight(qweight, scales, offsets, scheme, group_size, in_features, dt)
    else:
        w = _dequant_rows(qweight, scales, offsets, scheme, group_size, in_features, 0, n)
    return (g2.to(dt) @ w).to(grad.dtype).reshape(*grad.shape[:-1], in_features)


@quantized_linear_backward_op.register_fake
def _(grad, qweight, scales, offsets, scheme, group_size, in_features):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup(ctx, inputs, output):
    x, qweight, scales, offsets, bias, outliers, scheme, group_size, in_features, threshold = inputs
    ctx.save_for_backward(qweight, scales, offsets)
    ctx.meta = (scheme, group_size, in_features, x.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad):
    qweight, scales, offsets = ctx.saved_tensors
    scheme, group_size, in_features, x_dtype, b_dtype = ctx.meta
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        dx = quantized_linear_backward_op(grad, qweight, scales, offsets, scheme, group_size, in_features).to(x_dtype)
    if ctx.needs_input_grad[4]:
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0).to(b_dtype)
    return dx, None, None, None, dbias, None, None, None, None, None


quantized_linear_op.register_autograd(_backward, setup_context=_setup)


@torch._dynamo.allow_in_graph  # one graph node named `quantized_linear`, which ir/lower.py lowers to a LINEAR
def quantized_linear(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None = None,
                     bias: Tensor | None = None, *, scheme: str, group_size: int = 0, in_features: int,
                     outliers: Tensor | None = None, threshold: float = 6.0) -> Tensor:
    """y = x @ dequant(W)^T + bias in x's dtype: the call QuantizedLinear makes and graph rewrites insert.

    Eagerly, with no gradient to track, the implementation is called without the
    dispatcher round trip of the custom op (same code, same counter; it costs ~50-100 us
    a call, more than the kernel itself at batch 1). Traced (Dynamo, AOT: fake or
    functional tensor subclasses) or with autograd, it is the op.
    """
    if (type(x) is Tensor and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
        counters.bump("quantized_linear")
        return _forward(x, qweight, scales, offsets, bias, outliers, scheme, group_size, in_features, float(threshold))
    return quantized_linear_op(x, qweight, scales, offsets, bias, outliers, scheme, group_size, in_features,
                               float(threshold))
