"""Fused softmax attention: ``einfuse::attention`` (+ ``einfuse::attention_backward``).

Computes, per batch b and query head h (kv head ``h // (Hq // Hkv)``, as HF ``repeat_kv``)::

    s   = (q @ k^T) * scale
    s   = softcap * tanh(s / softcap)                 if softcap > 0
    s   = s + mask  |  s.masked_fill(~mask, -inf)     float (additive) | bool (True = attend)
    s   = -inf where j > i + (T - S)                  if is_causal (queries aligned to the END of keys)
    s   = -inf where j <= i + (T - S) - window        if window > 0 (Mistral sliding window)
    out = softmax(s, -1) @ v,   lse = logsumexp(s, -1)

Device dispatch: CUDA tensors (or CPU tensors with EINFUSE_KERNELS=triton and TRITON_INTERPRET=1)
run the generated Triton kernels of ``einfuse.codegen.ops.attention`` / ``attention_backward``
instead of what follows (via ``einfuse.runtime.dispatch``; a kernel failure falls back here).

Algorithm (CPU forward). The eager cascade traverses the key rank three times (max, sum,
A @ V). The forward runs the 1-pass cascade *derived* from it on the IR
(``einfuse.ir.attention_cascades.derive(scale, mask kind, softcap, band=causal or window,
lse=True, lowest=finfo(acc).min)["1-pass"]``: defer the division, then online softmax over key
tiles, with the masked-row guard) through the tiled cascade executor
(``einfuse.runtime.cascade_cpu.TiledExecutor``): keys in tiles of ``BLOCK_K``, a running max,
denominator and numerator carried across tiles exactly as the cascade's Einsums say; query
rows in chunks of ``BLOCK_Q`` (fewer when B*Hq is large, see ``MAX_TILE_ELEMS``), so the
largest temporary is one [B, Hq, block_q, block_k] score tile, never [S, T]. Each run bumps
``counters`` under ``"cascade:" + cascade.key()``. Causal/window attention is the cascade's
second bool mask W, built per tile from indices (a scalar True on tiles inside the band), and
only the key tiles inside each query chunk's band are visited (the others would leave the
running state unchanged). GQA never copies K/V: heads are batch dims [B, Hkv, G] and a kv
head's K/V tile (size 1 on G) is folded into the rows of one batched matmul. All softmax state
is fp32 (fp64 for fp64 inputs).

Where ATen's fused CPU kernel ``aten::_scaled_dot_product_flash_attention_for_cpu`` has exactly
these semantics its forward is used instead (the same online-softmax algorithm in C++,
GQA-aware; ~1.5x faster than the tile loop at B=1, H=9, S=T=1024, D=64): no softcap, no
window, causal only when S == T or S == 1 (ATen aligns causal to the top-left), D == Dv,
equal q/k/v dtypes, mask None / bool / float of q's dtype, and -- in the default
fully-masked-row mode -- no row whose mask is all -inf (ATen returns zeros there, eager
softmax NaN). Set ``USE_NATIVE = False`` to force the tiled path.

Fully masked rows (every score -inf): default mode gives NaN like eager ``torch.softmax``
(an HF additive mask with ``finfo.min`` is finite, so those rows get eager's uniform-like
weights in both modes); ``sdpa_masked_rows=True`` gives zeros, like
``F.scaled_dot_product_attention`` on CPU. ``lse`` is -inf on such rows; they add no gradient.

Saved for backward: q, k, v, out, lse (per row, fp32) and the mask: O((S + T) * D) memory,
no probabilities. The backward is a hand-written tile loop (``_Tiles``), not a cascade run: the
derived backward cascades (``einfuse.codegen.library.attention_backward_*``) use the textbook
delta = rowsum(dO * O), the inaccurate form described next. It recomputes the probabilities
tile by tile, using lse as the shift: x = exp(s - lse). It does not trust the saved statistics to the last bit, though:
per query tile it sums, in fp64, c = sum_j x and u = sum_j x * dP (dP = dO V^T), and uses
P = x / c, delta = u / c (- dlse), dS = P * (dP - delta) (times 1 - tanh^2 under softcap),
with delta applied as an fp32 hi + lo pair; then dQ += dS K * scale per query tile,
dK += dS^T Q * scale and dV += P^T dO into fp32 buffers the size of k and v. The textbook
form (P = exp(s - lse), delta = rowsum(dO * O)) is equal in exact arithmetic, but lse's and
O's fp32 rounding does not cancel in dP - delta on saturated (near one-hot) rows: measured
10-30x eager's dq/dk error at logits ~1e3, where this form matches or beats eager. When a
query tile's keys fit one tile under ``MAX_TILE_ELEMS`` (the backward widens its key tiles up
to that) the statistics come from the same tiles; otherwise one extra pass of 2 matmuls per
tile computes them. ATen's backward (the textbook form) is used only when grad_lse is unused
and every finite |lse| <= ``NATIVE_BWD_MAX_LSE``: it is inaccurate at large logits and plainly
wrong on HF ``finfo.min``-masked rows (lse ~ -3.4e38 makes exp(s - lse) = 1 for every key;
checked in torch 2.13).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from einfuse.ir.attention_cascades import derive
from einfuse.runtime import counters, dispatch
from einfuse.runtime.ops._checks import same_device
from einfuse.runtime.cascade_cpu import TiledExecutor

__all__ = ["attention", "attention_op", "attention_backward_op"]

# Tile sizes of the CPU paths (module constants so tests can shrink them).
BLOCK_Q = 256  # query positions per tile (per head)
BLOCK_K = 512  # keys per tile
MAX_TILE_ELEMS = 1 << 22  # cap on B * Hq * block_q * block_k (16 MiB of fp32 scores)
MIN_BLOCK_Q = 16  # below this many query rows per tile, the cap gives way
USE_NATIVE = True  # use ATen's fused CPU kernel where semantics match exactly
NATIVE_BWD_MAX_LSE = 64.0  # ATen's backward only when every finite |lse| is at most this

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> None:
    same_device("attention", q=q, k=k, v=v, mask=mask)
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D")
    B, Hq, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    torch._check(k.shape[0] == B and v.shape[0] == B, lambda: "batch sizes differ")
    torch._check(k.shape[3] == D, lambda: "q and k head sizes differ")
    torch._check(v.shape[1] == Hkv and v.shape[2] == T, lambda: "k and v disagree")
    torch._check(Hkv > 0 and Hq % Hkv == 0, lambda: f"Hq={Hq} not a multiple of Hkv={Hkv}")
    if mask is not None:
        torch._check(mask.dim() <= 4, lambda: "mask has more than 4 dims")
        shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        for got, want in zip(shape, (B, Hq, S, T)):
            torch._check(got == 1 or got == want, lambda: f"mask {tuple(mask.shape)} not broadcastable")


def _mask5(mask: Optional[Tensor], Hkv: int, G: int) -> Optional[Tensor]:
    """View the mask as [Bm, Hkv|1, G|1, Sm, Tm] to match the folded [B, Hkv, G, S, T] scores."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.unflatten(1, (Hkv, G))


def _dead_rows(mask: Tensor) -> Tensor:
    """Rows whose mask alone excludes every key (broadcastable to [B, Hq, S])."""
    if mask.dtype == torch.bool:
        return ~mask.any(-1)
    return (mask == _NEG_INF).all(-1)


def _key_range(i0: int, i1: int, T: int, off: int, is_causal: bool, window: int) -> tuple[int, int]:
    """Keys [lo, hi) that some query in [i0, i1) may attend under causal/window."""
    hi = min(T, i1 + off) if is_causal else T
    lo = max(0, i0 + off - window + 1) if window > 0 else 0
    return lo, hi


def _block_q(rows_per_pos: int, S: int, bk: int) -> int:
    bq = min(BLOCK_Q, max(MIN_BLOCK_Q, MAX_TILE_ELEMS // max(1, rows_per_pos * bk)))
    return max(1, min(bq, S))


class _Tiles:
    """Shared tile machinery of forward and backward: folded q tiles and masked score tiles."""

    def __init__(self, q, k, v, mask, scale, is_causal, window, softcap, wide_keys=False):
        self.B, self.Hq, self.S, self.D = q.shape
        self.Hkv, self.T, self.Dv = k.shape[1], k.shape[2], v.shape[3]
        self.G = self.Hq // self.Hkv
        self.acc = _acc_dtype(q.dtype)
        self.q5 = q.unflatten(1, (self.Hkv, self.G))  # view [B, Hkv, G, S, D]
        self.k, self.v = k, v
        self.m5 = _mask5(mask, self.Hkv, self.G)
        self.scale, self.is_causal, self.window, self.softcap = scale, is_causal, window, softcap
        self.off = self.T - self.S
        rows = self.B * self.Hq
        self.bk = max(1, min(BLOCK_K, self.T))
        fits = MAX_TILE_ELEMS // max(1, rows * self.T) >= min(self.S, MIN_BLOCK_Q)
        if wide_keys and self.T > self.bk and fits:
            self.bk = self.T  # one key tile per query tile still fits the cap: no second pass
        self.bq = _block_q(rows, self.S, self.bk)

    def rows(self, x5: Tensor, i0: int, i1: int) -> Tensor:
        """[B, Hkv, G, S, *] -> fp32 [B, Hkv, G*(i1-i0), *] (query-tile rows, group folded)."""
        t = x5[:, :, :, i0:i1].to(self.acc)
        return t.reshape(self.B, self.Hkv, self.G * (i1 - i0), *t.shape[4:])

    def query_tiles(self):
        for i0 in range(0, self.S, self.bq):
            i1 = min(self.S, i0 + self.bq)
            lo, hi = _key_range(i0, i1, self.T, self.off, self.is_causal, self.window)
            yield i0, i1, [(j0, min(hi, j0 + self.bk)) for j0 in range(lo, hi, self.bk)]

    def scores(self, qt: Tensor, i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor, Optional[Tensor]]:
        """Masked fp32 scores of one tile, [B, Hkv, G*(i1-i0), j1-j0]; also tanh(.) if softcap."""
        kt = self.k[:, :, j0:j1].to(self.acc)
        # scale after the product, as eager does: pre-scaling q rounds every term of a dot product
        # that may cancel (scores ~1e4 near a softcap's knee), doubling the gradient's noise there
        s = torch.matmul(qt, kt.transpose(-1, -2))
        th = None
        if self.softcap > 0:
            th = s.mul_(self.scale / self.softcap).tanh_()
            s = th * self.softcap
        else:
            s.mul_(self.scale)
        s5 = s.view(self.B, self.Hkv, self.G, i1 - i0, j1 - j0)
        if self.m5 is not None:
            mt = self.m5
            mt = mt[..., i0:i1, :] if mt.shape[3] != 1 else mt
            mt = mt[..., j0:j1] if mt.shape[4] != 1 else mt
            if mt.dtype == torch.bool:
                s5.masked_fill_(~mt, _NEG_INF)
            else:
                s5.add_(mt)
        band = self._band(i0, i1, j0, j1, s.device)
        if band is not None:
            s5.masked_fill_(band, _NEG_INF)
        return s, th

    def _band(self, i0, i1, j0, j1, device) -> Optional[Tensor]:
        """[rows, keys] bool of causal/window exclusions, None when the tile needs none."""
        keep = _band_keep(i0, i1, j0, j1, self.off, self.is_causal, self.window, device)
        return None if keep is True else ~keep


# --------------------------------------------------------------------------- cascade path
@functools.lru_cache(maxsize=128)
def _forward_cascade_for(scale: float, kind: Optional[str], softcap: float, band: bool, acc: torch.dtype):
    """The derived 1-pass cascade of these bindings (with LSE and the masked-row guard), compiled."""
    c = derive(scale, kind, softcap, band=band, lse=True, lowest=torch.finfo(acc).min)["1-pass"]
    return TiledExecutor(c)


def _band_keep(i0: int, i1: int, j0: int, j1: int, off: int, is_causal: bool, window: int, device=None):
    """W[p, m] of one tile (True = attend): True when the tile needs no causal/window exclusion."""
    need_causal = is_causal and j1 - 1 > i0 + off
    need_window = window > 0 and j0 <= i1 - 1 + off - window
    if not (need_causal or need_window):
        return True
    ii = torch.arange(i0, i1, device=device)[:, None] + off
    jj = torch.arange(j0, j1, device=device)[None, :]
    keep = jj <= ii if need_causal else torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if need_window:
        keep &= jj > ii - window
    return keep


def _forward_cascade(q, k, v, mask, scale, is_causal, window, softcap, sdpa_masked_rows):
    """Run the derived 1-pass cascade (`einfuse.ir.attention_cascades.derive`) with the tiled
    cascade executor: query rows in chunks of `bq`, keys in tiles of `bk` (the band only)."""
    B, Hq, S, _ = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    out = q.new_empty(B, Hq, S, Dv)
    lse = q.new_empty(B, Hq, S, dtype=acc)
    if S == 0:
        return out, lse
    if T == 0:  # eager: softmax over nothing @ empty v == 0, logsumexp of nothing = -inf
        return out.zero_(), lse.fill_(_NEG_INF)
    kind = None if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    band = bool(is_causal) or window > 0
    ex = _forward_cascade_for(float(scale), kind, float(softcap), band, acc)
    off = T - S
    # batch dims [B, Hkv, G]: a kv head's K/V tile is shared (size 1) by its G query heads
    inputs = {"Q": q.unflatten(1, (Hkv, G)), "K": k.unsqueeze(2), "V": v.unsqueeze(2)}
    if kind is not None:
        inputs["M"] = _mask5(mask, Hkv, G)
    key_range = None
    if band:
        inputs["W"] = lambda sl: _band_keep(*sl["p"], *sl["m"], off, is_causal, window, q.device)

        def key_range(sl):  # key tiles outside the band are fully masked: skipping them is exact
            return _key_range(*sl["p"], T, off, is_causal, window)
    bk = max(1, min(BLOCK_K, T))
    bq = _block_q(B * Hq, S, bk)
    ex.run(inputs, tile=bk, batch_dims=3, chunks={"p": bq}, key_range=key_range, dtype=acc,
           out={"O": out.view(B, Hkv, G, S, Dv), "LSE": lse.view(B, Hkv, G, S)})
    if sdpa_masked_rows:  # rows that see no key: zeros, like F.scaled_dot_product_attention on CPU
        out.masked_fill_(torch.isneginf(lse).unsqueeze(-1), 0.0)
    return out, lse


# --------------------------------------------------------------------------- tiled backward
def _backward_tiled(dout, dlse, q, k, v, lse, mask, scale, is_causal, window, softcap):
    t = _Tiles(q, k, v, mask, scale, is_causal, window, softcap, wide_keys=True)
    B, Hkv, G, S, D = t.B, t.Hkv, t.G, t.S, t.D
    dq = q.new_empty(q.shape)
    dk = torch.zeros(k.shape, dtype=t.acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=t.acc, device=v.device)
    dq5 = dq.view(B, Hkv, G, S, D)
    do5 = dout.unflatten(1, (Hkv, G))
    # lse is only the shift of exp(); fully masked rows (-inf) get 0, so their P is exp(-inf) = 0
    lse5 = lse.masked_fill(torch.isinf(lse), 0.0).to(t.acc).unflatten(1, (Hkv, G))
    dlse5 = None if dlse is None else dlse.unflatten(1, (Hkv, G))

    def tile(qt, dot, lse_t, i0, i1, j0, j1):
        s, th = t.scores(qt, i0, i1, j0, j1)
        x = s.sub_(lse_t).exp_()  # exp(s - lse): P up to the row factor c (~1, see below)
        vt = t.v[:, :, j0:j1].to(t.acc)
        return x, th, torch.matmul(dot, vt.transpose(-1, -2))  # dP = dO V^T

    for i0, i1, ktiles in t.query_tiles():
        sq = i1 - i0
        qt = t.rows(t.q5, i0, i1)  # unscaled: scores() applies `scale`
        dot = t.rows(do5, i0, i1)
        lse_t = t.rows(lse5, i0, i1).unsqueeze(-1)
        # Row statistics from the recomputed tiles, in fp64 (see the module docstring):
        #   c = sum_j x_j,  delta = sum_j x_j dP_j / c (- dlse),  P = x / c,  dS = P (dP - delta).
        cached = [tile(qt, dot, lse_t, i0, i1, *ktiles[0])] if len(ktiles) == 1 else None
        c = qt.new_zeros(qt.shape[:-1], dtype=torch.float64)
        u = torch.zeros_like(c)
        for j0, j1 in ktiles:
            x, _, dp = cached[0] if cached else tile(qt, dot, lse_t, i0, i1, j0, j1)
            c += x.sum(-1, dtype=torch.float64)
            # (a copy: for fp64 inputs .double() would alias x, which the gradient pass reuses)
            u += x.to(torch.float64, copy=True).mul_(dp).sum(-1)  # fp32 products are exact in fp64
        delta = u / c.masked_fill(c == 0, 1.0)
        if dlse5 is not None:  # d lse / d s = P: folds into the same row term
            delta -= t.rows(dlse5, i0, i1).double()
        d_hi = delta.to(t.acc)
        d_lo = (delta - d_hi.double()).to(t.acc).unsqueeze(-1)
        d_hi = d_hi.unsqueeze(-1)
        inv_c = c.masked_fill(c == 0, 1.0).reciprocal_().to(t.acc).unsqueeze(-1)
        dqt = qt.new_zeros(qt.shape)
        for j0, j1 in ktiles:
            x, th, dp = cached[0] if cached else tile(qt, dot, lse_t, i0, i1, j0, j1)
            p = x * inv_c
            dv[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), dot)
            # (dP - hi) is exact where it cancels (Sterbenz), then lo: dS keeps full relative
            # precision even for saturated rows, where dP ~ delta.
            ds = dp.sub_(d_hi).sub_(d_lo).mul_(p)
            if th is not None:  # d/ds [c * tanh(s / c)] = 1 - tanh^2
                ds.mul_(th.square_().neg_().add_(1.0))
            kt = t.k[:, :, j0:j1].to(t.acc)
            dqt += torch.matmul(ds, kt)
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qt)  # times scale once, below
        dq5[:, :, :, i0:i1] = dqt.mul_(scale).view(B, Hkv, G, sq, D)
    return dq, dk.mul_(scale).to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------- native path
def _native_plan(q, k, v, mask, is_causal, window, softcap, sdpa_masked_rows):
    """(attn_mask, is_causal, dead_rows) for ATen's fused CPU kernel, or None if it differs."""
    S, T = q.shape[2], k.shape[2]
    if not (USE_NATIVE and q.device.type == "cpu" and softcap <= 0 and window <= 0):
        return None
    if not (q.dtype == k.dtype == v.dtype and q.dtype in _NATIVE_DTYPES):
        return None
    if q.shape[3] != v.shape[3] or S == 0 or T == 0:
        return None
    if is_causal and S != T and S != 1:  # ATen's causal is top-left aligned; ours bottom-right
        return None
    causal = is_causal and S == T
    dead = None
    if mask is not None:
        # a row is dead when the mask AND the causal constraint together exclude every key
        tri = torch.ones(S, T, dtype=torch.bool, device=mask.device).tril() if causal else None
        if mask.dtype == torch.bool:
            dead = _dead_rows(mask if tri is None else mask & tri)
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill_(~mask, _NEG_INF)
        elif mask.dtype == q.dtype:
            dead = _dead_rows(mask) if tri is None else ((mask == _NEG_INF) | ~tri).all(-1)
        else:  # casting would change values (e.g. fp32 finfo.min -> -inf in bf16)
            return None
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if not bool(dead.any()):
            dead = None
        elif not sdpa_masked_rows:  # ATen gives 0 where eager softmax gives NaN
            return None
    return mask, causal, dead


def _forward_native(q, k, v, plan, scale):
    mask, causal, dead = plan
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale
    )
    lse = lse.to(_acc_dtype(q.dtype))
    if dead is not None:  # ATen reports lse = 0 on fully masked rows; our contract is -inf
        lse = lse.masked_fill(dead.expand(lse.shape), _NEG_INF)
    return out.contiguous(), lse.contiguous()


def _native_backward_ok(lse: Tensor) -> bool:
    """ATen's backward uses P = exp(s - lse) and rowsum(dO * O); accurate only for moderate lse.

    The fp32 rounding of lse is a per-row error in every P (ulp(64) = 7.6e-6), and with
    saturated rows it is amplified into dq/dk (measured: 30x eager's error at logits ~1e3).
    HF finfo.min-masked rows have lse ~ -3.4e38, where exp(s - lse) = 1 for every key and
    ATen's gradients are plainly wrong (checked in torch 2.13). Rows with lse = -inf (fully
    masked, sdpa mode) are fine.
    """
    finite = lse.masked_fill(torch.isinf(lse), 0.0)
    return lse.numel() == 0 or float(finite.abs().amax()) <= NATIVE_BWD_MAX_LSE


def _backward_native(dout, q, k, v, out, lse, plan, scale):
    mask, causal, _ = plan
    lse = lse.masked_fill(lse == _NEG_INF, 0.0).to(_acc_dtype(q.dtype))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("einfuse::attention", mutates_args=())
def attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    scale: float,
    is_causal: bool,
    window: int,
    softcap: float,
    sdpa_masked_rows: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out [B, Hq, S, Dv] in q.dtype, lse [B, Hq, S] in fp32 (fp64 for fp64 q))."""
    counters.bump("attention")
    _check(q, k, v, mask)
    res = dispatch.try_triton("attention", q, k, v, mask, scale, is_causal, window, softcap, sdpa_masked_rows)
    if res is not None:  # CUDA (or EINFUSE_KERNELS=triton): the generated kernel
        return res
    plan = _native_plan(q, k, v, mask, is_causal, window, softcap, sdpa_masked_rows)
    if plan is not None:
        return _forward_native(q, k, v, plan, scale)
    return _forward_cascade(q, k, v, mask, scale, is_causal, window, softcap, sdpa_masked_rows)


@attention_op.register_fake
def _(q, k, v, mask, scale, is_causal, window, softcap, sdpa_masked_rows):
    _check(q, k, v, mask)
    B, Hq, S, _ = q.shape
    out = q.new_empty(B, Hq, S, v.shape[3])
    lse = q.new_empty(B, Hq, S, dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("einfuse::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    scale: float,
    is_causal: bool,
    window: int,
    softcap: float,
    sdpa_masked_rows: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) shaped and typed like q, k, v (contiguous)."""
    counters.bump("attention_backward")
    res = dispatch.try_triton("attention_backward", grad_out, grad_lse, q, k, v, out, lse, mask, scale, is_causal,
                              window, softcap, sdpa_masked_rows)
    if res is not None:  # CUDA (or EINFUSE_KERNELS=triton): the generated kernels
        return res
    plan = None
    if grad_lse is None and _native_backward_ok(lse):  # ATen's backward has no lse-gradient input
        plan = _native_plan(q, k, v, mask, is_causal, window, softcap, sdpa_masked_rows)
    if plan is not None:
        return _backward_native(grad_out, q, k, v, out, lse, plan, scale)
    return _backward_tiled(grad_out, grad_lse, q, k, v, lse, mask, scale, is_causal, window, softcap)


@attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, mask, scale, is_causal, window, softcap, sdpa_masked_rows):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, window, softcap, sdpa_masked_rows = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.params = (scale, is_causal, window, softcap, sdpa_masked_rows)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, mask, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- wrapper
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    *,
    scale: float,
    is_causal: bool = False,
    window: int = -1,
    softcap: float = 0.0,
    sdpa_masked_rows: bool = False,
) -> Tensor:
    """Fused attention; q [B, Hq, S, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] -> [B, Hq, S, Dv].

    >>> q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    >>> attention(q, k, v, scale=8 ** -0.5, is_causal=True).shape
    torch.Size([1, 4, 3, 8])
    """
    out, _ = torch.ops.einfuse.attention(
        q, k, v, mask, scale, bool(is_causal), int(window), float(softcap), bool(sdpa_masked_rows)
    )
    return out
