"""A compiled CPU kernel for the one-token sparse MLP (decode), fp32.

Profiling SmolLM2-135M decoding showed the torch gather path (``index_select`` of the kept rows of
w_up into a buffer, ``mm``, ``embedding_bag`` over the kept rows of w_down^T) no faster than the dense
MLP: the gather writes and re-reads the rows it copies, and each of the ~10 small ops costs more than
the bytes it saves. This kernel reads each kept channel's up row and down row once, in one call:

    for every channel i with mask[i]:   h = a[i] * (w_up[i, :] . x + b_up[i]);   out += h * w_down_t[i, :]

(w_down_t: the cached contiguous transpose of w_down, so a channel's down weights are one row). With
several threads the channels are split across them and the per-thread partial outputs are added. Built
like einfuse/quant/cpu_kernels.py (same compiler, flags and private hash-checked cache, reusing its
helpers); unavailable (no compiler, ``EINFUSE_CPU_KERNELS=0``): callers use the torch path.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static void channels(const float* x, const float* a, const uint8_t* mask, int64_t lo, int64_t hi,
                     const float* wu, const float* bu, const float* wdt, float* acc, int64_t H, int64_t H2) {
    for (int64_t i = lo; i < hi; i++) {
        if (!mask[i]) continue;
        const float* r = wu + i * H;
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t k = 0; k < H; k++) s += r[k] * x[k];
        if (bu) s += bu[i];
        float h = a[i] * s;
        const float* d = wdt + i * H2;
        #pragma omp simd
        for (int64_t o = 0; o < H2; o++) acc[o] += h * d[o];
    }
}

void ef_sparse_mlp1(const float* x, const float* a, const uint8_t* mask, const float* wu, const float* bu,
                    const float* wdt, const float* bd, float* out, int64_t I, int64_t H, int64_t H2, int nthreads) {
    if (bd) memcpy(out, bd, sizeof(float) * H2); else memset(out, 0, sizeof(float) * H2);
    if (nthreads <= 1) { channels(x, a, mask, 0, I, wu, bu, wdt, out, H, H2); return; }
#ifdef _OPENMP
    #pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t lo = I * t / n, hi = I * (t + 1) / n;
        float* acc = (float*)calloc(H2, sizeof(float));
        channels(x, a, mask, lo, hi, wu, bu, wdt, acc, H, H2);
        #pragma omp critical
        for (int64_t o = 0; o < H2; o++) out[o] += acc[o];
        free(acc);
    }
#else
    channels(x, a, mask, 0, I, wu, bu, wdt, out, H, H2);
#endif
}
"""

_lib = None
_tried = False
_lock = threading.Lock()


def _build() -> ctypes.CDLL:
    from einfuse.quant.cpu_kernels import build_shared_library
    return build_shared_library(SOURCE, prefix="sparse_")


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    global _lib, _tried
    if _lib is not None or _tried:
        return _lib is not None
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("EINFUSE_CPU_KERNELS", "1") not in ("0", "false", "off"):
                try:
                    lib = _build()
                    P, I64 = ctypes.c_void_p, ctypes.c_int64
                    lib.ef_sparse_mlp1.argtypes = [P, P, P, P, P, P, P, P, I64, I64, I64, ctypes.c_int]
                    lib.ef_sparse_mlp1.restype = None
                    _lib = lib
                except Exception:  # no compiler etc.: the torch path is used
                    _lib = None
    return _lib is not None


def sparse_mlp1(x: Tensor, a: Tensor, mask: Tensor, w_up: Tensor, b_up: Tensor | None, w_down_t: Tensor,
                b_down: Tensor | None) -> Tensor:
    """One token: sum over kept channels i of a[i] * (w_up[i] . x + b_up[i]) * w_down_t[i] (+ b_down), fp32.

    x [H], a [I] fp32 (act(gate)), mask [I] bool, w_up [I, H], w_down_t [I, H2] (all contiguous fp32).
    """
    I, H = w_up.shape
    H2 = w_down_t.shape[1]
    out = torch.empty(H2, dtype=torch.float32)
    _lib.ef_sparse_mlp1(x.data_ptr(), a.data_ptr(), mask.data_ptr(), w_up.data_ptr(),
                        None if b_up is None else b_up.data_ptr(), w_down_t.data_ptr(),
                        None if b_down is None else b_down.data_ptr(), out.data_ptr(), I, H, H2,
                        torch.get_num_threads())
    return out
