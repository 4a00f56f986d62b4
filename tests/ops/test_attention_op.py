"""Tests for einfuse::attention (fusion key "attention") and its backward op.

Every numeric check follows the project rule: error = ||x - ref|| / ||ref|| against an fp64
eager reference; the fused result's error must not exceed plain eager's (same dtype) error
by more than TOL[dtype]. Forward and dq, dk, dv are checked; each test asserts the fused
ops ran (counters). Both execution paths are exercised: ATen's fused CPU kernel (where the
op dispatches to it) and the tiled path (``USE_NATIVE = False``, and every call ATen cannot
take): forward = the derived 1-pass cascade run by the tiled cascade executor (counted under
the cascade's key), backward = the hand-tiled loop; with tiny tiles so that many tiles, the
causal band skipping and the backward's two-pass form really run. The fp64 reference sees
the same dtype-rounded inputs.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.graph import saved_tensors_hooks

import einfuse.runtime.ops.attention as A
from einfuse.ir.attention_cascades import derive
from einfuse.runtime import counters
from einfuse.runtime.cascade_cpu import watching
from einfuse.runtime.ops.attention import attention

try:
    from tests.ops._numerics import rel_err
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from _numerics import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}
NEG_INF = float("-inf")


# ---------------------------------------------------------------- eager reference
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face repeat_kv: [B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]."""
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


def eager_attention(
    q, k, v, mask=None, *, scale, is_causal=False, window=-1, softcap=0.0, sdpa_masked_rows=False
):
    """HF-style eager attention in q's dtype; softmax in fp32 (fp64 for fp64 inputs).

    Additive entries <= -1e30 (HF's finfo.min) are applied as absorbing, i.e. score + min
    == min, with derivative 1 as for any sum. That is what fp32/bf16 arithmetic does anyway;
    in the fp64 reference it keeps the semantics ("a fully finfo.min row is uniform") instead
    of letting fp64 resolve the scores.
    """
    G = q.shape[1] // k.shape[1]
    S, T = q.shape[2], k.shape[2]
    k, v = repeat_kv(k, G), repeat_kv(v, G)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, NEG_INF)
        else:
            st = torch.promote_types(s.dtype, mask.dtype)  # HF: bf16 scores + fp32 mask -> fp32
            s, m = s.to(st), mask.to(st)
            s = torch.where(m <= -1e30, m + (s - s.detach()), s + m)
    i = torch.arange(S)[:, None] + (T - S)
    j = torch.arange(T)[None, :]
    if is_causal:
        s = s.masked_fill(j > i, NEG_INF)
    if window > 0:
        s = s.masked_fill(j <= i - window, NEG_INF)
    sm_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = s.to(sm_dtype)
    if sdpa_masked_rows:
        dead = (s == NEG_INF).all(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    else:
        p = torch.softmax(s, -1)
    return torch.matmul(p.to(v.dtype), v), torch.logsumexp(s, -1)


# ---------------------------------------------------------------- harness
@contextlib.contextmanager
def config(native: bool, bq: int | None = None, bk: int | None = None, wide_bwd: bool = False):
    """Set the op's path and tile sizes (hypothesis cannot use the monkeypatch fixture).

    With explicit tile sizes the tile cap is 1 unless ``wide_bwd``: then the backward too runs
    several key tiles per query tile (its two-pass form). With ``wide_bwd`` the backward
    widens its key tile to all keys (one pass) while the forward keeps the small tiles.
    """
    old = (A.USE_NATIVE, A.BLOCK_Q, A.BLOCK_K, A.MAX_TILE_ELEMS)
    A.USE_NATIVE = native
    if bq is not None:
        A.BLOCK_Q, A.BLOCK_K = bq, bk
        A.MAX_TILE_ELEMS = old[3] if wide_bwd else 1
    try:
        yield
    finally:
        A.USE_NATIVE, A.BLOCK_Q, A.BLOCK_K, A.MAX_TILE_ELEMS = old


def make_inputs(B, Hq, Hkv, S, T, D, Dv=None, mag=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64) * mag
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) * mag
    v = torch.randn(B, Hkv, T, Dv or D, generator=g, dtype=torch.float64)
    go = torch.randn(B, Hq, S, Dv or D, generator=g, dtype=torch.float64)
    return q, k, v, go


def _fwd_bwd(fn, q, k, v, go, mask, dtype, kw, grads=True):
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*ins, mask, **kw)
    out = out[0] if isinstance(out, tuple) else out
    if not grads:
        return out.detach(), None
    g = torch.autograd.grad(out, ins, go.to(dtype))
    return out.detach(), g


def check(q, k, v, go, mask=None, *, dtype, grads=True, **kw):
    """Fused vs eager (same dtype), both against the fp64 eager reference; returns fused out.

    The reference sees the same dtype-rounded inputs as the ops under test, so errors measure
    the computation, not the rounding of q, k, v to bf16 (which at logits ~1e3 alone moves the
    output by ~5%, the same for every implementation).
    """
    q, k, v, go = (t.to(dtype).double() for t in (q, k, v, go))
    mask_ref = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref, ref_g = _fwd_bwd(eager_attention, q, k, v, go, mask_ref, torch.float64, kw, grads)
    dead = torch.isnan(ref).any(-1)
    if dead.any():  # eager NaN rows (default mode, all -inf): gradients are NaN in eager too
        grads = False
    with counters.counting() as c:
        out, g = _fwd_bwd(attention, q, k, v, go, mask, dtype, kw, grads)
    assert c["attention"] == 1
    assert c["attention_backward"] == (1 if grads else 0)
    assert out.dtype == dtype and out.shape == ref.shape
    eag, eag_g = _fwd_bwd(eager_attention, q, k, v, go, mask, dtype, kw, grads)
    # Fully masked rows: NaN exactly where eager softmax gives NaN.
    assert torch.equal(torch.isnan(out).any(-1), dead)
    assert torch.equal(torch.isnan(out), torch.isnan(out).any(-1, keepdim=True).expand_as(out))
    rows = dead.unsqueeze(-1)
    pairs = [("out", out.masked_fill(rows, 0.0), eag.masked_fill(rows, 0.0), ref.masked_fill(rows, 0.0))]
    if grads:
        pairs += [(n, a, b, r) for n, a, b, r in zip(("dq", "dk", "dv"), g, eag_g, ref_g)]
    for name, fused, eager, r in pairs:
        assert torch.isfinite(fused).all(), name
        e_f, e_e = rel_err(fused, r), rel_err(eager, r)
        assert e_f <= e_e + TOL[dtype], f"{name}: fused {e_f:.3g} > eager {e_e:.3g} + {TOL[dtype]}"
    return out


def hf_mask(B, S, T, dtype, dead_rows=(), pad=None, causal=True):
    """HF 4-D additive mask [B, 1, S, T] with finfo(dtype).min (causal + left padding)."""
    mn = torch.finfo(dtype).min
    m = torch.zeros(B, 1, S, T, dtype=dtype)
    if causal:
        i = torch.arange(S)[:, None] + (T - S)
        m = m.masked_fill(torch.arange(T)[None, :] > i, mn)
    if pad is not None:  # pad[b] = number of left-padding keys in batch b
        for b, n in enumerate(pad):
            m[b, :, :, :n] = mn
    for b, r in dead_rows:
        m[b, 0, r, :] = mn
    return m


PATHS = pytest.mark.parametrize("native", [True, False], ids=["native", "tiled"])


# ---------------------------------------------------------------- forward + backward numerics
SHAPES = [  # B, Hq, Hkv, S, T, D, Dv
    (2, 4, 4, 7, 7, 8, 8),  # MHA, odd
    (1, 6, 2, 33, 33, 16, 16),  # GQA
    (2, 4, 1, 5, 9, 8, 8),  # MQA, S < T (chunked prefill with cache)
    (2, 6, 2, 1, 17, 16, 16),  # decode
    (1, 2, 2, 1, 1, 8, 8),  # length 1
    (1, 6, 3, 9, 13, 8, 12),  # Dv != D (never native)
]


# ATen's path only where it can apply (no window/softcap, D == Dv); elsewhere both are the tile loop.
def _case_id(native, variant, shape):
    return f"{'native' if native else 'tiled'}-{variant}-{'x'.join(map(str, shape))}"


NUMERICS_CASES = [
    pytest.param(native, variant, shape, id=_case_id(native, variant, shape))
    for variant in ("none", "causal", "window", "softcap")
    for shape in SHAPES
    for native in (True, False)
    if not native or (variant in ("none", "causal") and shape[5] == shape[6])
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("native, variant, shape", NUMERICS_CASES)
def test_numerics(native, variant, shape, dtype):
    B, Hq, Hkv, S, T, D, Dv = shape
    q, k, v, go = make_inputs(B, Hq, Hkv, S, T, D, Dv, seed=sum(shape))
    kw = dict(scale=D**-0.5)
    if variant == "causal":
        kw["is_causal"] = True
    elif variant == "window":
        kw.update(is_causal=True, window=3)
    elif variant == "softcap":  # scores pushed into tanh's saturating range
        q = q * 8.0
        kw.update(softcap=30.0, is_causal=True)
    with config(native, bq=4, bk=5):
        check(q, k, v, go, dtype=dtype, **kw)


@PATHS
@pytest.mark.parametrize(
    "dtype, tiles",
    [
        (torch.float32, (None, None, False)),
        (torch.float32, (32, 32, False)),
        (torch.float32, (32, 32, True)),
        (torch.bfloat16, (None, None, False)),
    ],
    ids=["fp32-default", "fp32-32x32", "fp32-32x32-wide-bwd", "bf16-default"],
)
def test_large_magnitudes(native, dtype, tiles):
    """q, k scaled by 30: logits ~1e3, softmax saturated, gradients ill-conditioned (cond ~ |s|).

    Tiles of realistic width here: with 1-16 keys per tile BLAS picks other fp32 kernels whose
    score rounding, amplified ~1e3, is sometimes a few times eager's (a kernel-choice effect;
    tiny tiles are covered at moderate magnitudes by the other tests).
    """
    q, k, v, go = make_inputs(1, 4, 2, 64, 64, 16, mag=30.0, seed=3)
    bq, bk, wide = tiles
    with config(native, bq, bk, wide):
        check(q, k, v, go, dtype=dtype, scale=0.25, is_causal=True)
        check(q, k, v, go, dtype=dtype, scale=0.25)
        check(q, k, v, go, dtype=dtype, scale=0.25, softcap=30.0)
        check(q[:, :, :1], k, v, go[:, :, :1], dtype=dtype, scale=0.25, is_causal=True)


@PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_additive_mask_with_fully_masked_rows(native, dtype):
    """HF 4-D finfo.min mask (causal + left padding); padded query rows are fully masked.

    Eager gives those rows finite uniform-like weights (score + min == min); so must we,
    in both modes (SDPA does the same for finite masks).
    """
    B, S, T = 2, 9, 9
    q, k, v, go = make_inputs(B, 6, 2, S, T, 16, seed=5)
    mask = hf_mask(B, S, T, dtype, pad=[0, 3], dead_rows=[(0, 4)])
    assert (mask == torch.finfo(dtype).min).all(-1).any()  # the case under test is present
    with config(native, bq=4, bk=4):
        for sdpa_rows in (False, True):
            out = check(q, k, v, go, mask, dtype=dtype, scale=0.25, sdpa_masked_rows=sdpa_rows)
            # Fully masked row 4 of batch 0: uniform over all keys = mean of v.
            mean_v = repeat_kv(v.to(dtype), 3)[0].double().mean(-2)
            assert rel_err(out[0, :, 4], mean_v) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_fp32_mask_with_bf16_inputs():
    """A mask in another dtype than q (fp32 finfo.min with bf16 q) is applied in fp32, not cast
    (casting would turn finfo(fp32).min into -inf); ATen's path declines it (see dispatch test)."""
    q, k, v, go = make_inputs(2, 4, 2, 7, 10, 8, seed=6)
    mask = hf_mask(2, 7, 10, torch.float32, pad=[2, 0], dead_rows=[(1, 3)])
    with config(True, bq=4, bk=4):
        check(q, k, v, go, mask, dtype=torch.bfloat16, scale=0.3)


@PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bool_and_padding_masks(native, dtype):
    B, S, T = 2, 7, 10
    q, k, v, go = make_inputs(B, 6, 3, S, T, 8, seed=7)
    g = torch.Generator().manual_seed(1)
    full = torch.rand(B, 6, S, T, generator=g) > 0.3
    full[..., 0] = True  # no fully masked rows here
    pad = torch.ones(B, 1, 1, T, dtype=torch.bool)
    pad[1, ..., :4] = False
    additive_pad = torch.zeros(B, 1, 1, T, dtype=dtype).masked_fill(~pad, NEG_INF)
    with config(native, bq=3, bk=4):
        for mask in (full, pad, full[0, 0], additive_pad):  # 4-D per head, [B,1,1,T], 2-D, -inf float
            check(q, k, v, go, mask, dtype=dtype, scale=0.35)
            check(q, k, v, go, mask, dtype=dtype, scale=0.35, is_causal=True, window=4)


@PATHS
def test_fully_masked_rows_default_is_eager_nan(native):
    """Rows whose scores are all -inf: NaN like eager softmax (bool mask, -inf mask, causal S > T)."""
    q, k, v, go = make_inputs(2, 4, 2, 6, 6, 8, seed=8)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, 0, 2] = False
    with config(native, bq=4, bk=4):
        out = check(q, k, v, go, mask, dtype=torch.float32, scale=0.3)
        assert torch.isnan(out[0, :, 2]).all() and not torch.isnan(out[1]).any()
        fmask = torch.zeros(2, 1, 6, 6).masked_fill(~mask, NEG_INF)
        out = check(q, k, v, go, fmask, dtype=torch.float32, scale=0.3)
        assert torch.isnan(out[0, :, 2]).all()
        # causal with more queries than keys: the first S - T queries see nothing
        out = check(q, k[:, :, :4], v[:, :, :4], go, dtype=torch.float32, scale=0.3, is_causal=True)
        assert torch.isnan(out[:, :, :2]).all() and not torch.isnan(out[:, :, 2:]).any()


@PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_masked_rows_matches_sdpa(native, dtype):
    """sdpa_masked_rows=True: what F.scaled_dot_product_attention gives on CPU (zeros, zero grads)."""
    q, k, v, go = make_inputs(2, 6, 2, 7, 9, 16, seed=9)
    mask = torch.rand(2, 6, 7, 9, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[0, 1, 3] = False
    mask[1, :, 5] = False
    with config(native, bq=4, bk=4):
        out = check(q, k, v, go, mask, dtype=dtype, scale=0.25, sdpa_masked_rows=True)
        assert (out[0, 1, 3] == 0).all() and (out[1, :, 5] == 0).all()
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        ours = attention(*ins, mask, scale=0.25, sdpa_masked_rows=True)
        g_ours = torch.autograd.grad(ours, ins, go.to(dtype))
        sd_ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        sdpa = F.scaled_dot_product_attention(*sd_ins, attn_mask=mask, scale=0.25, enable_gqa=True)
        g_sdpa = torch.autograd.grad(sdpa, sd_ins, go.to(dtype))
    assert (sdpa[0, 1, 3] == 0).all()  # the SDPA behaviour this mode mirrors
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip((ours, *g_ours), (sdpa, *g_sdpa)):
        assert rel_err(a, b) < tol
    # causal with S > T: rows that see no key are zero
    kw = dict(scale=0.3, is_causal=True, sdpa_masked_rows=True)
    out = check(q, k[:, :, :4], v[:, :, :4], go, dtype=dtype, **kw)
    assert (out[:, :, :3] == 0).all()


@PATHS
def test_lse_output_and_its_gradient(native):
    """The raw op's lse equals logsumexp of the masked scores; gradient flows through it too."""
    q, k, v, go = make_inputs(2, 6, 3, 9, 11, 8, seed=10)
    gl = torch.randn(2, 6, 9, dtype=torch.float64)
    mask = hf_mask(2, 9, 11, torch.float32, pad=[0, 2], causal=False)
    kw = dict(scale=0.3, is_causal=True, window=-1, softcap=0.0, sdpa_masked_rows=False)

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*ins, mask.to(dtype), **kw)
        loss = (out.double() * go).sum() + (lse.double() * gl).sum()
        return (out, lse), torch.autograd.grad(loss, ins)

    def op(q_, k_, v_, m_, **kw_):
        return torch.ops.einfuse.attention(q_, k_, v_, m_, *kw_.values())

    with config(native, bq=4, bk=4):
        with counters.counting() as c:
            (out, lse), g = run(op, torch.float32)
        assert c["attention"] == 1 and c["attention_backward"] == 1
        def eager(*a, **kw_):
            return eager_attention(*a, scale=0.3, is_causal=True)

        (r_out, r_lse), r_g = run(eager, torch.float64)
        (e_out, e_lse), e_g = run(eager, torch.float32)
    assert lse.dtype == torch.float32 and lse.shape == (2, 6, 9)
    for a, b, r in zip((out, lse, *g), (e_out, e_lse, *e_g), (r_out, r_lse, *r_g)):
        assert rel_err(a, r) <= rel_err(b, r) + 1e-5


def test_non_contiguous_inputs():
    """HF layout: q/k/v are transposes of [B, S, H, D]; k/v of MQA may be expanded views."""
    q, k, v, go = make_inputs(2, 4, 2, 7, 7, 8, seed=11)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    for native in (True, False):
        with config(native, bq=4, bk=4):
            check(q, k, v, go, dtype=torch.float32, scale=0.3, is_causal=True)
            k1, v1 = k[:, :1].expand(2, 2, 7, 8), v[:, :1].expand(2, 2, 7, 8)  # stride-0 heads
            check(q, k1, v1, go, dtype=torch.float32, scale=0.3)


# ---------------------------------------------------------------- tiling, memory, dispatch
def test_tiling_is_used(monkeypatch):
    """Small tiles: many (query, key) tiles run, never larger than the block, causal band skipped.

    The forward's tiles are the cascade executor's steps (`cascade_cpu.watching`), the
    backward's the hand-tiled `_Tiles.scores` calls.
    """
    monkeypatch.setattr(A, "USE_NATIVE", False)
    monkeypatch.setattr(A, "BLOCK_Q", 4)
    monkeypatch.setattr(A, "BLOCK_K", 5)
    monkeypatch.setattr(A, "MAX_TILE_ELEMS", 1)  # backward may not widen its key tiles
    seen = []
    orig = A._Tiles.scores

    def spy(self, qt, i0, i1, j0, j1):
        s, th = orig(self, qt, i0, i1, j0, j1)
        seen.append(tuple(s.shape))
        return s, th

    monkeypatch.setattr(A._Tiles, "scores", spy)
    B, Hq, Hkv, S, T = 1, 6, 2, 23, 23
    q, k, v, go = make_inputs(B, Hq, Hkv, S, T, 8, seed=12)
    with watching() as fwd:
        check(q, k, v, go, dtype=torch.float32, scale=0.3)  # full: every tile
    grid = math.ceil(S / 4) * math.ceil(T / 5)
    assert len(fwd) == grid and len(seen) == 2 * grid  # forward; the backward's statistics + gradient passes
    # largest temporary: a [B, Hq, 4 queries, 5 keys] score tile or the [B, Hq, 4, Dv] accumulator
    assert max(r.biggest for r in fwd) == B * Hq * 4 * max(5, 8)
    assert max(r.tile[1] - r.tile[0] for r in fwd) == 5 and max(r.chunk[1] - r.chunk[0] for r in fwd) == 4
    assert max(s[-2] for s in seen) == 4 * (Hq // Hkv) and max(s[-1] for s in seen) == 5
    assert {r.key for r in fwd} == {derive(0.3, lse=True, lowest=torch.finfo(torch.float32).min)["1-pass"].key()}
    seen.clear()
    kw = dict(scale=0.3, is_causal=True, window=6)
    with watching() as fwd, torch.no_grad():
        attention(q.float(), k.float(), v.float(), **kw)
    band = len(fwd)
    assert 1 < band < grid  # the forward visits only the band's tiles
    seen.clear()
    check(q, k, v, go, dtype=torch.float32, **kw)
    assert band < len(seen) <= 2 * band  # backward: 1 pass (1 key tile) or 2 per query tile
    # the tile size changes the arithmetic order, not the result
    monkeypatch.setattr(A, "BLOCK_K", 1000)
    with watching() as fwd:
        out_one = attention(q.float(), k.float(), v.float(), scale=0.3)
    assert len(fwd) == math.ceil(S / 4)
    monkeypatch.setattr(A, "BLOCK_K", 3)
    out_many = attention(q.float(), k.float(), v.float(), scale=0.3)
    assert rel_err(out_many, out_one) < 1e-6
    # with room under the cap, the backward takes all keys of a query tile at once (one pass)
    monkeypatch.setattr(A, "BLOCK_K", 5)
    monkeypatch.setattr(A, "MAX_TILE_ELEMS", 1 << 22)
    seen.clear()
    check(q, k, v, go, dtype=torch.float32, scale=0.3)
    assert len(seen) == math.ceil(S / 4)
    assert seen[-1][-1] == T


def test_memory_long_sequence(monkeypatch):
    """S = T = 1024: no [S, T] temporary in forward (cascade executor) or backward (tile loop),
    and only O(S*D) saved for backward."""
    monkeypatch.setattr(A, "USE_NATIVE", False)
    monkeypatch.setattr(A, "MAX_TILE_ELEMS", 1 << 18)  # well below B * H * S * S = 2**21
    biggest = []
    orig = A._Tiles.scores

    def spy(self, *a):
        s, th = orig(self, *a)
        biggest.append(s.numel())
        return s, th

    monkeypatch.setattr(A._Tiles, "scores", spy)
    B, H, S, D = 1, 2, 1024, 16
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with counters.counting() as c, watching() as fwd:
        with saved_tensors_hooks(pack, lambda t: t):
            out = attention(q, k, v, scale=0.25, is_causal=True, softcap=50.0)
        out.sum().backward()
    assert c["attention"] == 1 and c["attention_backward"] == 1
    assert len(fwd) > 1 and max(r.biggest for r in fwd) <= A.MAX_TILE_ELEMS < B * H * S * S
    assert max(biggest) <= A.MAX_TILE_ELEMS
    # q, k, v, out (B*H*S*D each) + lse (B*H*S): no probabilities, no score matrix
    assert sum(t.numel() for t in saved) == 4 * B * H * S * D + B * H * S
    s = torch.matmul(q, k.transpose(-1, -2)).mul(0.25).div(50.0).tanh().mul(50.0)
    ref = torch.softmax(s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), NEG_INF), -1) @ v
    assert rel_err(out, ref) < 1e-5


# ---------------------------------------------------------------- the derived cascade really runs
def _expected_key(scale, mask_kind=None, softcap=0.0, band=False, dtype=torch.float32):
    """The key of the derivation's 1-pass cascade, spelled out here (not taken from the op)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    c = derive(scale, mask_kind, softcap, band=band, lse=True, lowest=torch.finfo(acc).min)["1-pass"]
    return "cascade:" + c.key()


CASCADE_CASES = [  # id, shape (B, Hq, Hkv, S, T, D, Dv), kwargs, mask kind, mask kind in the cascade, band
    ("softcap", (2, 4, 2, 13, 13, 8, 8), dict(softcap=20.0), None, None, False),
    ("softcap-causal-gqa", (1, 6, 2, 11, 17, 16, 16), dict(softcap=30.0, is_causal=True), None, None, True),
    ("window", (2, 4, 4, 9, 9, 8, 8), dict(is_causal=True, window=3), None, None, True),
    ("causal-S<T", (1, 4, 1, 5, 12, 8, 8), dict(is_causal=True), None, None, True),
    ("Dv!=D", (1, 6, 3, 7, 10, 8, 12), {}, None, None, False),
    ("bool-dead-rows", (2, 6, 3, 9, 14, 8, 8), {}, "bool_dead", "bool", False),
    ("additive-inf-dead-rows-softcap", (2, 4, 2, 7, 11, 16, 16), dict(softcap=15.0), "inf_dead", "additive", False),
    ("hf-finfo-min-causal-window", (2, 6, 2, 9, 9, 8, 8), dict(is_causal=True, window=4), "hf", "additive", True),
    ("length-1", (1, 2, 1, 1, 1, 8, 8), dict(softcap=5.0), None, None, False),
]


def _cascade_mask(kind, B, S, T, dtype, g):
    if kind == "bool_dead":
        m = torch.rand(B, 1, S, T, generator=g) > 0.3
        m[0, 0, 2] = False          # fully masked row
        m[1, 0, 4, :6] = False      # leading key tiles masked
        return m
    if kind == "inf_dead":
        m = torch.zeros(B, 1, S, T, dtype=dtype)
        m[1, 0, 3] = NEG_INF
        m[0, 0, :, :5] = NEG_INF
        return m
    if kind == "hf":
        return hf_mask(B, S, T, dtype, pad=[0, 3], dead_rows=[(0, 5)], causal=False)
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("case", CASCADE_CASES, ids=[c[0] for c in CASCADE_CASES])
def test_cpu_path_runs_the_derived_cascade(case, dtype):
    """Where ATen's kernel cannot take the call, the forward is the derivation's 1-pass cascade
    (counted under its structural key) run by the tiled executor; fp64 rule on out, dq, dk, dv,
    fully masked rows NaN exactly where eager has them (and 0 in sdpa mode)."""
    name, (B, Hq, Hkv, S, T, D, Dv), kw, mkind, ckind, band = case
    q, k, v, go = make_inputs(B, Hq, Hkv, S, T, D, Dv, mag=2.0, seed=S * T + D)
    mask = _cascade_mask(mkind, B, S, T, dtype, torch.Generator().manual_seed(S + T))
    scale = D ** -0.5
    want = _expected_key(scale, ckind, kw.get("softcap", 0.0), band, dtype)
    for sdpa_rows in (False, True):
        with config(True, bq=4, bk=5), counters.counting() as c:
            check(q, k, v, go, mask, dtype=dtype, scale=scale, sdpa_masked_rows=sdpa_rows, **kw)
            m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
            native = A._native_plan(q.to(dtype), k.to(dtype), v.to(dtype), m, kw.get("is_causal", False),
                                    kw.get("window", -1), kw.get("softcap", 0.0), sdpa_rows) is not None
        # ATen's kernel takes only sdpa-mode bool masks here (it zeroes dead rows, as that mode wants)
        assert native == (sdpa_rows and name == "bool-dead-rows")
        assert c[want] == (0 if native else 1), f"the derived cascade did not run: {dict(c)}"


def test_native_path_runs_no_cascade():
    """Plain attention goes to ATen's kernel (its semantics match): no cascade runs."""
    q, k, v, go = make_inputs(1, 4, 2, 8, 8, 16, seed=30)
    with config(True), counters.counting() as c:
        check(q, k, v, go, dtype=torch.float32, scale=0.25, is_causal=True)
    assert not [key for key in c if key.startswith("cascade:")]
    with config(False), counters.counting() as c:  # USE_NATIVE off: the cascade takes every call
        check(q, k, v, go, dtype=torch.float32, scale=0.25, is_causal=True)
    assert c[_expected_key(0.25, band=True)] == 1


def test_native_dispatch_plan():
    """ATen's kernel is used exactly where its semantics are ours."""
    q = torch.randn(1, 4, 5, 8)
    k = v = torch.randn(1, 2, 5, 8)
    def plan(q, k, v, mask, is_causal=False, window=-1, softcap=0.0, sdpa_masked_rows=False):
        return A._native_plan(q, k, v, mask, is_causal, window, softcap, sdpa_masked_rows)

    dead = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    dead[..., 1, :] = False
    with config(True):
        assert plan(q, k, v, None) is not None
        assert plan(q, k, v, None, is_causal=True) is not None  # S == T
        assert plan(q[:, :, :1], k, v, None, is_causal=True) is not None  # decode: causal is a no-op
        assert plan(q[:, :, :3], k, v, None, is_causal=True) is None  # ATen aligns causal top-left
        assert plan(q, k, v, None, softcap=30.0) is None
        assert plan(q, k, v, None, window=2) is None
        assert plan(q, k, torch.randn(1, 2, 5, 4), None) is None  # Dv != D
        assert plan(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.zeros(1, 1, 5, 5)) is None  # fp32 mask
        assert plan(q, k, v, dead) is None  # eager NaN rows: ATen would give 0
        assert plan(q, k, v, dead, sdpa_masked_rows=True) is not None
    with config(False):
        assert plan(q, k, v, None) is None


def test_native_backward_dispatch(monkeypatch):
    """ATen's backward only for moderate logits, no lse gradient and no finfo.min-masked rows."""
    used = []
    orig = A._backward_native
    monkeypatch.setattr(A, "_backward_native", lambda *a: used.append(1) or orig(*a))

    def grads(q, k, v, mask=None, with_lse=False):
        ins = [t.float().requires_grad_() for t in (q, k, v)]
        out, lse = torch.ops.einfuse.attention(*ins, mask, 0.25, True, -1, 0.0, False)
        loss = out.sum() + (lse.sum() if with_lse else 0.0)
        torch.autograd.grad(loss, ins)
        n = len(used)
        used.clear()
        return n

    q, k, v, _ = make_inputs(1, 4, 2, 9, 9, 16, seed=15)
    with config(True):
        assert grads(q, k, v) == 1
        assert grads(q, k, v, with_lse=True) == 0
        assert grads(q * 30, k * 30, v) == 0  # |lse| ~ 1e3
        assert grads(q, k, v, hf_mask(1, 9, 9, torch.float32, pad=[0])) == 1
        assert grads(q, k, v, hf_mask(1, 9, 9, torch.float32, dead_rows=[(0, 2)])) == 0
    with config(False):
        assert grads(q, k, v) == 0


# ---------------------------------------------------------------- compile / opcheck
def test_compile_aot_eager():
    q, k, v, go = make_inputs(2, 6, 2, 9, 9, 8, seed=13)
    mask = hf_mask(2, 9, 9, torch.float32, pad=[0, 2])

    def fn(q_, k_, v_, m_):
        return attention(q_, k_, v_, m_, scale=0.3, is_causal=True, softcap=20.0)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    ins = [t.float().requires_grad_() for t in (q, k, v)]
    with counters.counting() as c:
        out = compiled(*ins, mask)
        g = torch.autograd.grad(out, ins, go.float())
    assert c["attention"] >= 1 and c["attention_backward"] >= 1
    ins2 = [t.float().requires_grad_() for t in (q, k, v)]
    ref = fn(*ins2, mask)
    g_ref = torch.autograd.grad(ref, ins2, go.float())
    for a, b in zip((out, *g), (ref, *g_ref)):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize(
    "case",
    [
        dict(shape=(2, 4, 2, 5, 5, 8), mask="float", is_causal=True, softcap=0.0, window=-1),  # native
        dict(shape=(1, 6, 3, 3, 7, 8), mask="bool", is_causal=True, softcap=25.0, window=3),  # tiled
    ],
    ids=["native", "tiled"],
)
def test_opcheck(case):
    B, Hq, Hkv, S, T, D = case["shape"]
    q, k, v, go = make_inputs(B, Hq, Hkv, S, T, D, seed=14)
    if case["mask"] == "float":
        mask = hf_mask(B, S, T, torch.float32, pad=[0, 1], causal=False)
    else:
        mask = torch.ones(B, 1, S, T, dtype=torch.bool)
        mask[..., 0] = False
    q, k, v, go = (t.float() for t in (q, k, v, go))
    params = (0.3, case["is_causal"], case["window"], case["softcap"], True)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, *params)
    with config(True, bq=2, bk=3):
        torch.library.opcheck(torch.ops.einfuse.attention.default, args)
        out, lse = torch.ops.einfuse.attention(q.detach(), k.detach(), v.detach(), mask, *params)
        for glse in (None, torch.randn_like(lse)):
            bargs = (go, glse, q.detach(), k.detach(), v.detach(), out, lse, mask, *params)
            torch.library.opcheck(torch.ops.einfuse.attention_backward.default, bargs)


# ---------------------------------------------------------------- property test
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 3]),
    S=st.integers(1, 12),
    T=st.integers(1, 12),
    D=st.sampled_from([8, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    mag=st.sampled_from([1.0, 3.0]),  # logits to ~30 here (tiny tiles); ~1e3 in test_large_magnitudes
    is_causal=st.booleans(),
    window=st.sampled_from([-1, 1, 4]),
    softcap=st.sampled_from([0.0, 30.0]),
    mask_kind=st.sampled_from(["none", "bool", "pad", "hf"]),
    sdpa_rows=st.booleans(),
    native=st.booleans(),
    blocks=st.sampled_from([(1, 1, False), (2, 3, False), (5, 4, True), (None, None, False)]),
    seed=st.integers(0, 2**16),
)
def test_property(
    B, Hkv, G, S, T, D, dtype, mag, is_causal, window, softcap, mask_kind, sdpa_rows, native, blocks, seed
):
    Hq = Hkv * G
    q, k, v, go = make_inputs(B, Hq, Hkv, S, T, D, mag=mag, seed=seed)
    g = torch.Generator().manual_seed(seed)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, Hq, S, T, generator=g) > 0.3
    elif mask_kind == "pad":
        mask = torch.rand(B, 1, 1, T, generator=g) > 0.3
    elif mask_kind == "hf":
        pad = torch.randint(0, T + 1, (B,), generator=g).tolist()
        mask = hf_mask(B, S, T, dtype, pad=pad, causal=is_causal)
    with config(native, *blocks):
        check(
            q, k, v, go, mask, dtype=dtype, scale=D**-0.5, is_causal=is_causal, window=window,
            softcap=softcap, sdpa_masked_rows=sdpa_rows,
        )
