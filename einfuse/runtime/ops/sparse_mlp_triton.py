"""Triton kernels for the activation-sparse MLP (CUDA; CI runs them in Triton's interpreter).

Given the kept channels ``idx`` [K] (the union over the call's tokens), the activations of those
channels ``a`` [N, K] (fp32) and a per-token mask ``m`` [N, K] (or none), two kernels compute

    h[n, j]   = a[n, j] * m[n, j] * (x[n, :] . w_up[idx[j], :] + b_up[idx[j]])     (gathered GEMV)
    out[n, :] = sum_j h[n, j] * w_down_t[idx[j], :]  (+ b_down)                       (gathered rows)

Each program reads only the kept rows of ``w_up`` and of ``w_down_t`` (the transposed down weight,
so a kept channel's down weights are one contiguous row: coalesced loads); nothing of the pruned
channels is loaded. Accumulation in fp32. The gate projection (dense: the choice needs it), the
selection (threshold / top-k) and the union are torch ops on the device.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from einfuse.runtime import dispatch


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def up_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, a_ptr, m_ptr, h_ptr, K, H,
                  HAS_B: tl.constexpr, HAS_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        n = tl.program_id(0)
        kb = tl.program_id(1)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        rows = tl.load(idx_ptr + offs_k, mask=kmask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            hmask = offs_h < H
            xv = tl.load(x_ptr + n * H + offs_h, mask=hmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * H + offs_h[None, :], mask=kmask[:, None] & hmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w * xv[None, :], axis=1)
        if HAS_B:
            acc += tl.load(b_ptr + rows, mask=kmask, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + n * K + offs_k, mask=kmask, other=0.0)
        acc = acc * av
        if HAS_M:
            mv = tl.load(m_ptr + n * K + offs_k, mask=kmask, other=0)
            acc = tl.where(mv != 0, acc, 0.0)
        tl.store(h_ptr + n * K + offs_k, acc.to(h_ptr.dtype.element_ty), mask=kmask)

    @triton.jit
    def down_kernel(h_ptr, wt_ptr, b_ptr, idx_ptr, out_ptr, K, H2,
                    HAS_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr):
        n = tl.program_id(0)
        ob = tl.program_id(1)
        offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        omask = offs_o < H2
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            rows = tl.load(idx_ptr + offs_k, mask=kmask, other=0).to(tl.int64)
            hv = tl.load(h_ptr + n * K + offs_k, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(wt_ptr + rows[:, None] * H2 + offs_o[None, :], mask=kmask[:, None] & omask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w * hv[:, None], axis=0)
        if HAS_B:
            acc += tl.load(b_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * H2 + offs_o, acc.to(out_ptr.dtype.element_ty), mask=omask)

    return triton, up_kernel, down_kernel


def _pow2(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def sparse_rows(x2: Tensor, a_k: Tensor, mask_k: Optional[Tensor], idx: Tensor, w_up: Tensor, b_up: Optional[Tensor],
                w_down_t: Tensor, b_down: Optional[Tensor]) -> Tensor:
    """down(h) with h[:, j] = a_k[:, j] * mask_k[:, j] * up(x2)[:, idx[j]], reading only the rows idx.

    x2 [N, H]; a_k [N, K] fp32 (the activations of the kept channels); mask_k [N, K] bool or None (all kept);
    idx [K]; w_up [I, H]; w_down_t [I, H2] (contiguous transposed down weight). Returns [N, H2] in x2's dtype.
    """
    triton, up_kernel, down_kernel = _kernels()
    N, H = x2.shape
    K = idx.numel()
    H2 = w_down_t.shape[1]
    x2 = x2.contiguous()
    a_k = a_k.float().contiguous()
    idx = idx.to(torch.int32).contiguous()
    h = torch.empty(N, K, dtype=x2.dtype, device=x2.device)
    bk, bh = _pow2(K, 16, 64), _pow2(H, 16, 128)
    m = mask_k.to(torch.int8).contiguous() if mask_k is not None else a_k  # dummy pointer when HAS_M is off
    up_kernel[(N, triton.cdiv(K, bk))](x2, w_up, b_up if b_up is not None else x2, idx, a_k, m, h, K, H,
                                        HAS_B=b_up is not None, HAS_M=mask_k is not None, BLOCK_K=bk, BLOCK_H=bh)
    dispatch.launches["sparse_mlp_up"] += 1
    out = torch.empty(N, H2, dtype=x2.dtype, device=x2.device)
    bo = _pow2(H2, 16, 128)
    down_kernel[(N, triton.cdiv(H2, bo))](h, w_down_t, b_down if b_down is not None else h, idx, out, K, H2,
                                           HAS_B=b_down is not None, BLOCK_K=bk, BLOCK_O=bo)
    dispatch.launches["sparse_mlp_down"] += 1
    return out
