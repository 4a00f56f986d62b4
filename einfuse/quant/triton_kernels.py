"""Triton dequantize-matmul kernels for every scheme (CUDA; CI runs them under TRITON_INTERPRET=1).

Written once by hand, not generated from a cascade: the codegen's cascades have no
integer unpacking (bit shifts and masks of packed bytes), which is the whole of
these kernels. One kernel body covers the weight formats of `einfuse.quant.schemes`:

    y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = s[n, g] * code(n, k) + o[n, g],  g = k // GS

* int8 (and the int8 part of w8a8 / llm_int8): signed codes, one scale per row, o = 0;
* int4: byte g*GS/2 + (j mod GS/2) of the row, low nibble for j < GS/2, high nibble after;
* int6: the int4 plane above for the low 4 bits, plus the high 2 bits at byte
  K/2 + g*GS/4 + (j mod GS/4), bits 2*(j div GS/4);
* symmetric grouped codes: o = -zero * s (zero = 2**(bits-1)); asymmetric: o from `offsets`.

The weight tile [BLOCK_N, BLOCK_K] is unpacked in registers, scaled in fp32 and fed to
`tl.dot` with the fp32 x tile (weight-only: x keeps its precision). w8a8 and
llm_int8 run the same kernel with int8 x (per-token codes from `quantize_rows`) and
an int32 `tl.dot` (exact), then rescale by the row and channel scales in the epilogue;
LLM.int8()'s outlier columns are a small fp matmul added on the host.

`qlinear(...)` is what `einfuse::quantized_linear` calls when `dispatch.use_triton`
says so (CUDA tensors, or CPU tensors with EINFUSE_KERNELS=triton under the
interpreter); each launch is counted in `einfuse.runtime.dispatch.launches` under
`quantized_linear_<scheme>`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from einfuse.quant.schemes import get_scheme, outlier_columns, quantize_rows, zero_point
from einfuse.runtime import dispatch


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def qmm(x_ptr, w_ptr, s_ptr, o_ptr, b_ptr, xs_ptr, y_ptr, M, N, K, RB, G, zp,
            stride_xm, stride_ym,
            BITS: tl.constexpr, GS: tl.constexpr, HAS_OFF: tl.constexpr, HAS_BIAS: tl.constexpr,
            INT8_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        if INT8_X:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0)
            wmask = mn[:, None] & mk[None, :]
            row = w_ptr + rn[:, None] * RB
            if BITS == 8:
                code = tl.load(row + rk[None, :], mask=wmask, other=0)          # int8
            else:
                g = rk // GS
                j = rk % GS
                h = GS // 2
                byte = tl.load(row + (g * h + j % h)[None, :], mask=wmask, other=0).to(tl.int32)
                u = (byte >> ((j >= h).to(tl.int32) * 4)[None, :]) & 15
                if BITS == 6:
                    q = GS // 4
                    hb = tl.load(row + (K // 2 + g * q + j % q)[None, :], mask=wmask, other=0).to(tl.int32)
                    u = u | (((hb >> (2 * (j // q))[None, :]) & 3) << 4)
                code = u
            if INT8_X:
                acc += tl.dot(xt, tl.trans(code.to(tl.int8)), out_dtype=tl.int32)
            else:
                if BITS == 8:
                    s = tl.load(s_ptr + rn, mask=mn, other=0.0)
                    w = code.to(tl.float32) * s[:, None]
                else:
                    gi = rn[:, None] * G + (rk // GS)[None, :]
                    s = tl.load(s_ptr + gi, mask=wmask, other=0.0)
                    if HAS_OFF:
                        o = tl.load(o_ptr + gi, mask=wmask, other=0.0)
                    else:
                        o = -zp * s
                    w = code.to(tl.float32) * s + o
                acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        if INT8_X:  # per-token x scale times per-channel weight scale
            xs = tl.load(xs_ptr + rm, mask=mm, other=0.0)
            s = tl.load(s_ptr + rn, mask=mn, other=0.0)
            out = acc.to(tl.float32) * xs[:, None] * s[None, :]
        else:
            out = acc
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=mn, other=0.0)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out, mask=mm[:, None] & mn[None, :])

    return triton, qmm


def _blocks(m: int, n: int, k: int, gs: int) -> tuple[int, int, int]:
    import triton
    if dispatch.interpreting():  # small tiles: ragged edges and several programs are exercised
        return 16, 16, 32
    bm = 16 if m <= 16 else 64
    bn = 64 if m <= 16 else 128
    bk = min(128, max(32, triton.next_power_of_2(k)))
    return bm, bn, bk


def launch(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None,
           scheme: str, group_size: int, in_features: int, x_scales: Tensor | None = None) -> Tensor:
    """y [M, N] fp32 = x2 @ dequant(W)^T (+ bias); with x_scales, x2 is int8 codes of per-token int8 x."""
    triton, qmm = _kernel()
    sch = get_scheme(scheme)
    m, k = x2.shape
    n = qweight.shape[0]
    gs = group_size if sch.grouped else k
    x2 = x2.contiguous()
    qw = qweight.contiguous()
    s = scales.to(torch.float32).contiguous()
    o = offsets.to(torch.float32).contiguous() if offsets is not None else None
    b = bias.to(torch.float32).contiguous() if bias is not None else None
    y = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    bm, bn, bk = _blocks(m, n, k, gs)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    zp = float(zero_point(sch.bits)) if (sch.grouped and o is None) else 0.0
    qmm[grid](x2, qw, s, o if o is not None else s, b if b is not None else s,
              x_scales if x_scales is not None else s, y, m, n, k, qw.shape[1], (k // gs) if sch.grouped else 1, zp,
              x2.stride(0), y.stride(0), BITS=sch.bits, GS=gs, HAS_OFF=o is not None, HAS_BIAS=b is not None,
              INT8_X=x_scales is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    dispatch.launches[f"quantized_linear_{scheme}"] += 1
    return y


def qlinear(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None,
            outliers: Tensor | None, scheme: str, group_size: int, in_features: int, threshold: float) -> Tensor:
    """The whole quantized linear on the Triton path, in x's dtype."""
    sch = get_scheme(scheme)
    x2 = x.reshape(-1, in_features).to(torch.float32)
    n = qweight.shape[0]
    if sch.activations == "none":
        y = launch(x2, qweight, scales, offsets, bias, scheme, group_size, in_features)
    else:
        cols = None
        if sch.activations == "llm_int8":
            cols = outlier_columns(x2, threshold, outliers)
            if cols.numel():
                x2r = x2.index_fill(1, cols, 0.0)
            else:
                cols, x2r = None, x2
        else:
            x2r = x2
        q, xs = quantize_rows(x2r)
        y = launch(q, qweight, scales, None, bias, scheme, 0, in_features, xs.contiguous())
        if cols is not None:
            w_out = qweight.index_select(1, cols).to(torch.float32) * scales.to(torch.float32)[:, None]
            y = y.addmm_(x2.index_select(1, cols), w_out.t())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def aot_compile(scheme: str, group_size: int = 64, in_features: int = 576, asymmetric: bool = False,
                arch: int = 90, blocks: tuple[int, int, int] = (16, 64, 64)) -> dict:
    """Compile the kernel for `scheme` for cuda:sm_<arch> down to cubin without a GPU (Triton ships
    ptxas); returns Triton's asm dict. The interpreter accepts more than the GPU compiler does, so
    CI checks this too. Run it in a process that has not imported triton in interpreter mode."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    _, qmm = _kernel()
    sch = get_scheme(scheme)
    int8_x = sch.activations != "none"
    gs = group_size if sch.grouped else in_features
    const = {"BITS": sch.bits, "GS": gs, "HAS_OFF": bool(asymmetric and sch.grouped), "HAS_BIAS": True,
             "INT8_X": int8_x, "BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "BLOCK_K": blocks[2]}
    types = {"x_ptr": "*i8" if int8_x else "*fp32", "w_ptr": "*i8" if sch.bits == 8 else "*u8", "zp": "fp32"}
    sig = {a: types.get(a, "constexpr" if a in const else ("*fp32" if a.endswith("_ptr") else "i32"))
           for a in qmm.arg_names}
    src = ASTSource(qmm, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2}).asm
