"""CPU dequantize-matmul kernels for the weight-only schemes (int8, int4, int6).

Why not torch's own ops: at batch 1, `aten._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu` measured 10-50x slower than an fp32 `F.linear`
on this project's CPUs (AMD EPYC, AVX-512), and a dequantize-then-matmul in torch
writes the whole fp32 weight every call. Decoding is bound by weight bytes, so the
kernel must read the packed codes once and never materialise fp32 weights.

The kernel (C, ~150 lines below) computes, for every output n and a tile of up to
four rows of x,

    y[m, n] = sum_g ( scale[n, g] * sum_{k in g} x[m, k] * u[n, k] + offset[n, g] * xsum[m, g] )

unpacking codes in registers (AVX-512: 16 codes per load, a mask and a shift per
nibble, int -> fp32, FMA against x), with fp32 accumulation: the result is
x @ dequant(W)^T to fp32 rounding, with x kept in full precision (weight-only
semantics). A portable C path (unpack a group into a small buffer, then a SIMD dot)
covers CPUs without AVX-512 and group sizes the vector path does not tile.
Output channels are split across threads with OpenMP; the library links the
libgomp torch has already loaded, so it shares torch's thread pool and honours
`torch.set_num_threads`.

For many rows (prefill) the work is compute-bound and MKL's sgemm wins: the weight
is dequantized by `dequantize` (same C file) in chunks of output channels and
multiplied with `torch.mm`.

Build: compiled on first use with the system C compiler (`$CC`, else gcc/cc;
`-O3 -march=native -fopenmp`) into a private cache directory
(`$EINFUSE_CACHE_DIR/cpu_kernels` or `~/.cache/einfuse/cpu_kernels`, 0700, owned by
us; anything else is refused and a per-process temp directory is used). The file
name is the sha256 of the source, flags, compiler version and CPU flags; a side
file holds the library's own sha256, checked before every load (a mismatch is
rebuilt, never loaded). No compiler, or `EINFUSE_CPU_KERNELS=0`: `available()` is
False and callers use the torch fallback (dequantize + matmul), with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MT 4  /* rows of x per pass over a weight row */

static int64_t row_bytes(int bits, int64_t K) { return bits == 8 ? K : (bits == 4 ? K / 2 : 3 * K / 4); }

/* codes of group g of one packed row -> u[0..gs) as floats (int8: signed, else unsigned) */
static void codes_group(const uint8_t* row, int bits, int64_t K, int64_t gs, int64_t g, float* u) {
    if (bits == 8) {
        const int8_t* q = (const int8_t*)row + g * gs;
        #pragma omp simd
        for (int64_t j = 0; j < gs; j++) u[j] = (float)q[j];
    } else if (bits == 4) {
        const int64_t h = gs / 2;
        const uint8_t* b = row + g * h;
        #pragma omp simd
        for (int64_t j = 0; j < h; j++) { u[j] = (float)(b[j] & 15); u[h + j] = (float)(b[j] >> 4); }
    } else {
        const int64_t h = gs / 2, q = gs / 4;
        const uint8_t* a = row + g * h;
        const uint8_t* c = row + K / 2 + g * q;
        #pragma omp simd
        for (int64_t j = 0; j < q; j++) {
            const int cc = c[j];
            u[j] = (float)((a[j] & 15) | ((cc & 3) << 4));
            u[q + j] = (float)((a[q + j] & 15) | (((cc >> 2) & 3) << 4));
            u[2 * q + j] = (float)((a[j] >> 4) | (((cc >> 4) & 3) << 4));
            u[3 * q + j] = (float)((a[q + j] >> 4) | ((cc >> 6) << 4));
        }
    }
}

#if defined(__AVX512F__)
#define INLINE static inline __attribute__((always_inline))
static int vec_ok(int bits, int64_t gs) { return bits == 8 ? gs % 16 == 0 : (bits == 4 ? gs % 32 == 0 : gs % 64 == 0); }

/* p[t][0..3] += x_t[group g] * u[group g], for t < mt (four independent FMA chains per row, so a single
   row, the decoding case, is not bound by FMA latency). mt and bits are constants after inlining. */
INLINE void group_dot(const uint8_t* row, const int bits, int64_t K, int64_t gs, int64_t g,
                      const float* x0, int64_t ldx, const int mt, __m512 p[MT][4]) {
    const __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3);
    const float* xg = x0 + g * gs;
    if (bits == 8) {
        const int8_t* q = (const int8_t*)row + g * gs;
        int64_t j = 0;
        for (; j + 32 <= gs; j += 32) {
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + j))));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + j + 16))));
            for (int t = 0; t < mt; t++) {
                p[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + t * ldx + j), w0, p[t][0]);
                p[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + t * ldx + j + 16), w1, p[t][1]);
            }
        }
        for (; j < gs; j += 16) {
            __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + j))));
            for (int t = 0; t < mt; t++) p[t][2] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + t * ldx + j), w, p[t][2]);
        }
    } else if (bits == 4) {
        const int64_t h = gs / 2;
        const uint8_t* b = row + g * h;
        int64_t j = 0;
        for (; j + 32 <= h; j += 32) {
            __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + j)));
            __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + j + 16)));
            __m512 l0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, m15)), h0 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4));
            __m512 l1 = _mm512_cvtepi32_ps(_mm512_and_si512(b1, m15)), h1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4));
            for (int t = 0; t < mt; t++) {
                const float* xr = xg + t * ldx;
                p[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + j), l0, p[t][0]);
                p[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + h + j), h0, p[t][1]);
                p[t][2] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + j + 16), l1, p[t][2]);
                p[t][3] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + h + j + 16), h1, p[t][3]);
            }
        }
        for (; j < h; j += 16) {
            __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + j)));
            __m512 l0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, m15)), h0 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4));
            for (int t = 0; t < mt; t++) {
                const float* xr = xg + t * ldx;
                p[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + j), l0, p[t][0]);
                p[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + h + j), h0, p[t][1]);
            }
        }
    } else {
        const int64_t h = gs / 2, q = gs / 4;
        const uint8_t* A = row + g * h;
        const uint8_t* C = row + K / 2 + g * q;
        for (int64_t j = 0; j < q; j += 16) {
            __m512i a0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(A + j)));
            __m512i a1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(A + q + j)));
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(C + j)));
            __m512 v0 = _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_and_si512(a0, m15),
                                           _mm512_slli_epi32(_mm512_and_si512(c, m3), 4)));
            __m512 v1 = _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_and_si512(a1, m15),
                                           _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(c, 2), m3), 4)));
            __m512 v2 = _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_srli_epi32(a0, 4),
                                           _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(c, 4), m3), 4)));
            __m512 v3 = _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_srli_epi32(a1, 4),
                                           _mm512_slli_epi32(_mm512_srli_epi32(c, 6), 4)));
            for (int t = 0; t < mt; t++) {
                const float* xr = xg + t * ldx;
                p[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + j), v0, p[t][0]);
                p[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + q + j), v1, p[t][1]);
                p[t][2] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 2 * q + j), v2, p[t][2]);
                p[t][3] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 3 * q + j), v3, p[t][3]);
            }
        }
    }
}

/* one weight row against mt rows of x: out[t] = sum_g s_g * dot_g + off_g * xs[t, g] */
INLINE void tile(const uint8_t* row, const int bits, int64_t K, int64_t gs, int64_t G, const float* sr,
                 const float* orow, float zp, int need_off, const float* x0, const float* xs0, const int mt,
                 float* out) {
    __m512 vacc[MT];
    float acc[MT];
    for (int t = 0; t < mt; t++) { vacc[t] = _mm512_setzero_ps(); acc[t] = 0.f; }
    for (int64_t g = 0; g < G; g++) {
        __m512 p[MT][4];
        for (int t = 0; t < mt; t++) for (int i = 0; i < 4; i++) p[t][i] = _mm512_setzero_ps();
        group_dot(row, bits, K, gs, g, x0, K, mt, p);
        const float sc = sr[g];
        const __m512 vs = _mm512_set1_ps(sc);
        for (int t = 0; t < mt; t++)
            vacc[t] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(p[t][0], p[t][1]), _mm512_add_ps(p[t][2], p[t][3])),
                                      vs, vacc[t]);
        if (need_off) {
            const float off = orow ? orow[g] : -zp * sc;
            for (int t = 0; t < mt; t++) acc[t] += off * xs0[t * G + g];
        }
    }
    for (int t = 0; t < mt; t++) out[t] = acc[t] + _mm512_reduce_add_ps(vacc[t]);
}

#define TILE_BITS(B) switch (mt) { \
    case 1: tile(row, B, K, gs, G, sr, orow, zp, need_off, x0, xs0, 1, out); break; \
    case 2: tile(row, B, K, gs, G, sr, orow, zp, need_off, x0, xs0, 2, out); break; \
    case 3: tile(row, B, K, gs, G, sr, orow, zp, need_off, x0, xs0, 3, out); break; \
    default: tile(row, B, K, gs, G, sr, orow, zp, need_off, x0, xs0, 4, out); }

static void tile_vec(const uint8_t* row, int bits, int64_t K, int64_t gs, int64_t G, const float* sr,
                     const float* orow, float zp, int need_off, const float* x0, const float* xs0, int mt, float* out) {
    if (bits == 8) { TILE_BITS(8) } else if (bits == 4) { TILE_BITS(4) } else { TILE_BITS(6) }
}
#endif

/* portable path: unpack a group into u[], then a SIMD dot per row */
static void tile_generic(const uint8_t* row, int bits, int64_t K, int64_t gs, int64_t G, const float* sr,
                         const float* orow, float zp, int need_off, const float* x0, const float* xs0, int mt,
                         float* out, float* u) {
    for (int t = 0; t < mt; t++) out[t] = 0.f;
    for (int64_t g = 0; g < G; g++) {
        codes_group(row, bits, K, gs, g, u);
        const float sc = sr[g], off = orow ? orow[g] : -zp * sc;
        for (int t = 0; t < mt; t++) {
            const float* xr = x0 + t * K + g * gs;
            float d = 0.f;
            #pragma omp simd reduction(+:d)
            for (int64_t j = 0; j < gs; j++) d += xr[j] * u[j];
            out[t] += sc * d + (need_off ? off * xs0[t * G + g] : 0.f);
        }
    }
}

/* y[M, N] = x[M, K] @ dequant(W)^T (+ bias). s, o: [N, G] (o may be NULL: offset = -zp * s);
   xs: [M, G] group sums of x (may be NULL when o == NULL and zp == 0). Returns 1 on the AVX-512 path. */
int ef_qgemv(const float* x, const float* xs, const uint8_t* w, const float* s, const float* o, float zp,
             const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t gs, int bits, int nt) {
    const int64_t G = K / gs, rb = row_bytes(bits, K);
    const int need_off = (o != NULL) || (zp != 0.f);
    float* xs_own = NULL;
    if (need_off && xs == NULL) {  /* group sums of x, once per call */
        xs_own = (float*)malloc(sizeof(float) * (size_t)(M * G));
        for (int64_t i = 0; i < M * G; i++) {
            const float* xr = x + i * gs;
            float a = 0.f;
            #pragma omp simd reduction(+:a)
            for (int64_t j = 0; j < gs; j++) a += xr[j];
            xs_own[i] = a;
        }
        xs = xs_own;
    }
    int vec = 0;
#if defined(__AVX512F__)
    vec = vec_ok(bits, gs);
#endif
    #pragma omp parallel num_threads(nt)
    {
        float* u = vec ? NULL : (float*)malloc(sizeof(float) * (size_t)gs);
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t* row = w + n * rb;
            const float* sr = s + n * G;
            const float* orow = o ? o + n * G : NULL;
            for (int64_t m0 = 0; m0 < M; m0 += MT) {
                const int mt = (int)(M - m0 < MT ? M - m0 : MT);
                const float* x0 = x + m0 * K;
                const float* xs0 = xs ? xs + m0 * G : NULL;
                float out[MT];
#if defined(__AVX512F__)
                if (vec) tile_vec(row, bits, K, gs, G, sr, orow, zp, need_off, x0, xs0, mt, out);
                else
#endif
                tile_generic(row, bits, K, gs, G, sr, orow, zp, need_off, x0, xs0, mt, out, u);
                for (int t = 0; t < mt; t++) y[(m0 + t) * N + n] = out[t] + (bias ? bias[n] : 0.f);
            }
        }
        free(u);
    }
    free(xs_own);
    return vec;
}

/* out[N, K] = dequant(W) in fp32 */
void ef_dequant(const uint8_t* w, const float* s, const float* o, float zp, float* out,
                int64_t N, int64_t K, int64_t gs, int bits, int nt) {
    const int64_t G = K / gs, rb = row_bytes(bits, K);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            float* u = out + n * K + g * gs;
            codes_group(w + n * rb, bits, K, gs, g, u);
            const float sc = s[n * G + g], off = o ? o[n * G + g] : -zp * sc;
            #pragma omp simd
            for (int64_t j = 0; j < gs; j++) u[j] = u[j] * sc + off;
        }
    }
}

int ef_has_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error = ""
_warned = False


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _private_dir() -> str:
    base = os.environ.get("EINFUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "einfuse")
    d = os.path.join(base, "cpu_kernels")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
        if st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return d
        warnings.warn(f"einfuse: {d} is not private (owner or mode); CPU kernels are built in a temp dir")
    except OSError as e:
        warnings.warn(f"einfuse: cannot use {d} ({e}); CPU kernels are built in a temp dir")
    return tempfile.mkdtemp(prefix="einfuse-cpu-")


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _build() -> ctypes.CDLL:
    return build_shared_library(SOURCE)


def build_shared_library(source: str, prefix: str = "") -> ctypes.CDLL:
    """Compile C `source` into a shared library in einfuse's private directory, or load the one built
    before: keyed by the source, the compiler version, the CPU and the flags (best flags first), and
    verified against its stored sha256 (a corrupt or tampered library is rebuilt, with a warning).
    Shared by the quantized-matmul and the sparse-MLP kernels; `prefix` names the file."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    flag_sets = [["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"]]
    key_base = hashlib.sha256("\0".join([source, str(version), _cpu_id(), platform.machine()]).encode()).hexdigest()
    d = _private_dir()
    errors = []
    for flags in flag_sets:
        key = prefix + hashlib.sha256((key_base + " ".join(flags)).encode()).hexdigest()[:32]
        so, sig = os.path.join(d, f"{key}.so"), os.path.join(d, f"{key}.sha256")
        if os.path.exists(so) and os.path.exists(sig):
            with open(sig) as f:
                if f.read().strip() == _sha(so):
                    return ctypes.CDLL(so)
            warnings.warn(f"einfuse: CPU kernel {so} failed its hash check; rebuilding")
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src, out = os.path.join(tmp, "k.c"), os.path.join(tmp, "k.so")
            with open(src, "w") as f:
                f.write(source)
            p = subprocess.run([cc, *flags, "-shared", "-fPIC", "-std=c11", src, "-o", out],
                               capture_output=True, text=True)
            if p.returncode != 0:
                errors.append(f"{' '.join(flags)}: {p.stderr.strip()[-300:]}")
                continue
            digest = _sha(out)
            os.replace(out, so)
            tmp_sig = os.path.join(tmp, "sig")
            with open(tmp_sig, "w") as f:
                f.write(digest)
            os.replace(tmp_sig, sig)
        return ctypes.CDLL(so)  # just built in our private directory (a concurrent build of the same key is as good)
    raise RuntimeError("compilation failed: " + " | ".join(errors))


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _error
    if _lib is not None or _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("EINFUSE_CPU_KERNELS", "1") in ("0", "false", "off"):
            _error = "disabled by EINFUSE_CPU_KERNELS=0"
            return None
        try:
            lib = _build()
            P, I64 = ctypes.c_void_p, ctypes.c_int64
            lib.ef_qgemv.argtypes = [P, P, P, P, P, ctypes.c_float, P, P, I64, I64, I64, I64, ctypes.c_int,
                                     ctypes.c_int]
            lib.ef_qgemv.restype = ctypes.c_int
            lib.ef_dequant.argtypes = [P, P, P, ctypes.c_float, P, I64, I64, I64, ctypes.c_int, ctypes.c_int]
            lib.ef_dequant.restype = None
            lib.ef_has_avx512.restype = ctypes.c_int
            _lib = lib
        except Exception as e:  # no compiler, no libgomp, read-only disk...: the torch path still works
            _error = f"{type(e).__name__}: {e}"
    return _lib


def loaded() -> bool:
    """The kernels are built and loaded (a cheap check for the hot path)."""
    return _lib is not None


def available() -> bool:
    """Whether the compiled kernels can be used (builds them on first call)."""
    ok = _load() is not None
    global _warned
    if not ok and not _warned and not _error.startswith("disabled"):
        _warned = True
        warnings.warn(f"einfuse: CPU quantized kernels unavailable ({_error}); using dequantize + matmul",
                      RuntimeWarning)
    return ok


def status() -> str:
    lib = _load()
    if lib is None:
        return f"unavailable: {_error}"
    return "avx512" if lib.ef_has_avx512() else "portable C"


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _grid(scales: Tensor, n: int) -> Tensor:
    if scales.dtype == torch.float32 and scales.is_contiguous():
        return scales
    return scales.reshape(n, -1).to(torch.float32).contiguous()


def qgemv(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None,
          bits: int, group_size: int, in_features: int, zero: int) -> Tensor:
    """y = x @ dequant(W)^T (+ bias) for fp32 x [M, K], through the compiled kernel."""
    lib = _lib or _load()
    assert lib is not None
    m, k = x.shape
    n = qweight.shape[0]
    gs = group_size or k
    x = x.contiguous()
    s = _grid(scales, n)
    o = _grid(offsets, n) if offsets is not None else None
    b = bias.to(torch.float32).contiguous() if bias is not None else None
    y = torch.empty(m, n, dtype=torch.float32)
    qw = qweight.contiguous()
    lib.ef_qgemv(x.data_ptr(), None, qw.data_ptr(), s.data_ptr(), _ptr(o), float(zero), _ptr(b), y.data_ptr(),
                 m, n, k, gs, bits, torch.get_num_threads())
    return y


def dequantize(qweight: Tensor, scales: Tensor, offsets: Tensor | None, bits: int, group_size: int,
               in_features: int, zero: int) -> Tensor:
    """dequant(W) [N, K] fp32 through the compiled kernel."""
    lib = _load()
    assert lib is not None
    n, k = qweight.shape[0], in_features
    gs = group_size or k
    s = _grid(scales, n)
    o = _grid(offsets, n) if offsets is not None else None
    out = torch.empty(n, k, dtype=torch.float32)
    qw = qweight.contiguous()
    lib.ef_dequant(qw.data_ptr(), s.data_ptr(), _ptr(o), float(zero), out.data_ptr(), n, k, gs, bits,
                   torch.get_num_threads())
    return out
