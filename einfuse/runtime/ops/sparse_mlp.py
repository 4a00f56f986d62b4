"""Activation-sparse gated MLPs (CHESS, Mixture-of-Channels, CoreInfer); fusion key "sparsity".

``einfuse::sparse_glu_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, thresholds, act, method, k, key)
-> (out, mask)`` computes ``down((act(gate(x)) * up(x)) * mask)`` where ``mask`` [..., I] (bool, returned
for autograd and for measuring sparsity; non-differentiable) says which intermediate channels each token
keeps, and only the kept channels' rows of ``w_up`` (and ``w_gate`` where the choice does not need the
gate) and columns of ``w_down`` are read:

* ``"chess"`` (CHESS, channel-wise thresholding): keep channel i of a token where ``|act(g_i)| > t_i``;
  ``thresholds`` t [I] come from calibration (``einfuse.calibrate``: ``t_i = lambda / E|u_i|``, one
  layer-wide lambda for the target). The gate is computed densely (the choice needs it); up and down
  only on the kept channels.
* ``"moc"`` (Mixture-of-Channels): keep the ``k`` channels of largest ``|act(g)|`` per token. Gate dense,
  up and down gathered.
* ``"coreinfer"`` (CoreInfer, sentence-level core neurons): a call with more than one new token per
  sequence is a *prefill*: it runs the dense MLP (exact) and picks each sequence's ``k`` core channels —
  every token votes for its top 10% channels by ``|act(g) * u|`` (its token-wise core), the ``k`` most
  voted win (ties by summed normalised magnitude) — and stores them, with compact copies of the selected
  gate/up rows and down columns, in the runtime state ``STATE`` (one entry per layer, keyed by the
  layer's down weight). A one-token call is a *decode* step: it multiplies only the compact weights (all
  three projections skip work). See ``CoreInferState``. ``key`` names the layer (reports, measurements).

Work skipping. One fp32 token on CPU (decode, CHESS/MoC): one call of a compiled C kernel
(sparse_mlp_cpu.py) that reads each kept channel's up row and down row once and nothing else. CUDA (or
``EINFUSE_KERNELS=triton`` under ``TRITON_INTERPRET=1``): two Triton kernels (sparse_mlp_triton.py) over
the union of the kept channels. Otherwise (torch, any dtype): rows are gathered with ``index_select``
into a reused scratch buffer and multiplied (the copy reads only the kept rows); at one token the down
projection is an ``embedding_bag`` weighted sum of the kept rows of a cached transposed copy of
``w_down`` (read-only, nothing materialised). With many tokens (prefill) CHESS/MoC gather the union of
the tokens' kept channels and mask inside it; when the
union covers almost every channel the dense product with the mask is cheaper and gives the same result.
Memory: CHESS/MoC keep one transposed copy of each down weight (cached per weight, refreshed when it
changes: +1/3 of the MLP weights); CoreInfer keeps (1 - target) of each MLP's weights per sequence.
The scratch buffers are per process: do not run sparse MLPs from several threads at once.

``einfuse::glu_mlp_observe(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, collector, key) -> Tensor``
is the dense MLP that also adds ``|act(gate(x))|`` to a per-channel log-histogram in a calibration
collector (and ``|up(x)|`` to a per-channel mean) (``einfuse.calibrate``); fusion key "calibration".

Saved for backward (sparse op): ``x``, the weights and biases (references) and ``mask``; backward
recomputes ``g``, ``u`` densely and returns the gradient of the dense MLP restricted to the kept channels
(the selection itself is treated as a constant, as in straight-through sparse fine-tuning). Nothing of
size [tokens, I] besides the 1-byte mask is kept between forward and backward.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from einfuse.runtime import counters, dispatch
from einfuse.runtime.ops import sparse_mlp_cpu, sparse_mlp_triton
from einfuse.runtime.ops.swiglu import _check_mlp

METHODS = ("chess", "moc", "coreinfer")

_LOW = (torch.bfloat16, torch.float16)
TRITON_NAME = "sparse_mlp"
DENSE_UNION = 0.85  # prefill: above this kept fraction of the union, the masked dense product is cheaper


# --------------------------------------------------------------------------------------------------
# runtime state (CoreInfer) and measurement
# --------------------------------------------------------------------------------------------------


@dataclass
class CoreEntry:
    """One layer's core channels for the current sequences (chosen at the last prefill)."""
    batch: int
    idx: Tensor                 # [B, k] sorted channel indices
    w_gate: Tensor              # [B, k, H] (or [k, H] when B == 1)
    w_up: Tensor
    w_down_t: Tensor            # [B, k, H2]: rows of w_down^T
    b_gate: Optional[Tensor]
    b_up: Optional[Tensor]
    versions: tuple             # (version, data_ptr) of w_gate, w_up, w_down when copied


class CoreInferState:
    """Runtime state carried from a prefill graph to the decode graphs (CoreInfer).

    One entry per layer, held beside (and keyed by) the layer's down-projection weight in a weak map, so
    the prefill graph and every decode graph of a model find it whichever graph, backend or optimized
    view runs them, and it goes away with the weights. Every call with more than one new token per
    sequence is a new prefill and replaces the layer's entry; a one-token call reuses it. A one-token
    *prompt* cannot be told from a decode step: call ``reset()`` (or
    ``einfuse.passes.sparsity.reset_sparsity_state(model)``) before generating from one; with no entry, a
    one-token call runs densely and picks the core channels from that token.
    """

    def __init__(self):
        self._entries = WeakIdKeyDictionary()
        self.prefills = 0
        self.decodes = 0

    def get(self, w_down: Tensor) -> Optional[CoreEntry]:
        return self._entries.get(w_down)

    def set(self, w_down: Tensor, entry: CoreEntry) -> None:
        self._entries[w_down] = entry

    def reset(self, weights=None) -> None:
        """Forget the core channels (of the layers whose down weights are in `weights`, or all)."""
        if weights is None:
            self._entries = WeakIdKeyDictionary()
            return
        for w in weights:
            self._entries.pop(w, None)

    def __len__(self) -> int:
        return len(self._entries)


STATE = CoreInferState()


class Measure:
    """Kept/total channel counts of the sparse MLP calls made inside ``measuring()``."""

    def __init__(self):
        self.kept = 0
        self.total = 0
        self.by_key: dict[str, list[int]] = {}

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0

    def add(self, key: str, kept: int, total: int) -> None:
        self.kept += kept
        self.total += total
        e = self.by_key.setdefault(key, [0, 0])
        e[0] += kept
        e[1] += total


_measures: list[Measure] = []
_continuing = False


@contextmanager
def continuation():
    """CoreInfer: multi-token calls inside continue the current sequences with their core channels
    instead of starting a new prefill — teacher-forced scoring of a continuation in one forward, which
    gives what decoding it token by token would (the benchmark's perplexity uses it)."""
    global _continuing
    old, _continuing = _continuing, True
    try:
        yield
    finally:
        _continuing = old


@contextmanager
def measuring():
    """Collect the realised sparsity (1 - kept / total over tokens x channels) of sparse MLP calls."""
    m = Measure()
    _measures.append(m)
    try:
        yield m
    finally:
        _measures.remove(m)


# collectors for calibration (einfuse.calibrate): id -> object with .observe(key, act_abs_2d)
_COLLECTORS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def register_collector(obj) -> str:
    cid = f"calib-{id(obj)}"
    _COLLECTORS[cid] = obj
    return cid


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _check(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act) -> None:
    """The dense glu_mlp's argument checks (devices, shapes, dtypes, biases, activation)."""
    _check_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, op="sparse_glu_mlp")


def _act(x: Tensor, act: str) -> Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "gelu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


def _act_bwd(grad: Tensor, x: Tensor, act: str) -> Tensor:
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    return torch.ops.aten.gelu_backward(grad, x, approximate="none" if act == "gelu" else "tanh")


def _opmath(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _LOW else t


def _lin(x2: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())


_scratch: dict = {}


def _gather_rows(w: Tensor, idx: Tensor, slot: str) -> Tensor:
    """w[idx] (rows) into a reused scratch buffer: reads only the kept rows, no fresh allocation.

    The buffer is overwritten by the next call with the same slot: use the result before that.
    """
    key = (slot, w.dtype, w.device)
    n = idx.numel() * w.shape[1]
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = _scratch[key] = torch.empty(max(n, 1), dtype=w.dtype, device=w.device)
    out = buf[:n].view(idx.numel(), w.shape[1])
    return torch.index_select(w, 0, idx, out=out)


_transposed = WeakIdKeyDictionary()


def _rows_of_down(w_down: Tensor) -> Tensor:
    """w_down^T as a contiguous [I, H2] copy, cached per weight (refreshed when the weight changes).

    Kept channels are then contiguous rows, so the down projection reads only their bytes.
    """
    stamp = (w_down._version, w_down.data_ptr(), tuple(w_down.shape), w_down.dtype)
    hit = _transposed.get(w_down)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    t = w_down.t().contiguous()
    try:
        _transposed[w_down] = (stamp, t)
    except TypeError:  # e.g. tensors that cannot be weakly referenced: no caching
        pass
    return t


def _stamp(w: Tensor) -> tuple:
    return (w._version, w.data_ptr())


def _seq_dims(x: Tensor) -> tuple[int, int]:
    """(sequences, new tokens per sequence) of an MLP input [..., S, H] (a 2-D input is one sequence)."""
    if x.dim() >= 3:
        b = 1
        for d in x.shape[:-2]:
            b *= d
        return b, x.shape[-2]
    if x.dim() == 2:
        return 1, x.shape[0]
    return 1, 1


# --------------------------------------------------------------------------------------------------
# forward implementations
# --------------------------------------------------------------------------------------------------

def _sparse_rows(x2, a, mask, w_up, w_down, b_up, b_down, dt) -> Tensor:
    """down((a * up(x)) * mask) computing up and down on the union of the kept channels only."""
    N = x2.shape[0]
    H2 = w_down.shape[0]
    inter = w_up.shape[0]
    union = mask[0] if N == 1 else mask.any(0)
    idx = union.nonzero().squeeze(1)
    K = idx.numel()
    if K == 0:
        out = x2.new_zeros(N, H2)
        return out + b_down if b_down is not None else out
    if dispatch.use_triton(x2, w_up, w_down) and TRITON_NAME not in dispatch.failed_kernels():
        # CUDA (or Triton's interpreter): the gathered-row kernels of sparse_mlp_triton.py
        a_k = a.index_select(1, idx)
        m_k = mask.index_select(1, idx) if N > 1 else None
        try:
            return sparse_mlp_triton.sparse_rows(x2, a_k, m_k, idx, w_up, b_up, _rows_of_down(w_down), b_down)
        except Exception as e:  # compile/launch failure: warn once, then the torch path below
            dispatch.failed_kernels().add(TRITON_NAME)
            warnings.warn(f"einfuse: Triton kernel {TRITON_NAME!r} failed ({type(e).__name__}: {e}); falling "
                          f"back to the torch implementation", dispatch.KernelFallbackWarning, stacklevel=2)
    if N > 1 and K > DENSE_UNION * inter:  # the tokens together keep nearly every channel
        u = _opmath(_lin(x2, w_up, b_up))
        h = (a * u).mul_(mask)
        return _lin(h.to(dt), w_down, b_down)
    wu = _gather_rows(w_up, idx, "up")
    u = torch.mm(x2, wu.t())
    if b_up is not None:
        u += b_up.index_select(0, idx)
    a_k = a.index_select(1, idx)
    h = a_k.mul_(_opmath(u))
    if N > 1:
        h.mul_(mask.index_select(1, idx))
    h = h.to(dt)
    wdt = _rows_of_down(w_down)
    if N == 1:  # weighted sum of the kept rows of w_down^T: reads K rows, writes nothing large
        out = F.embedding_bag(idx[None], wdt, per_sample_weights=h, mode="sum")
    else:
        out = torch.mm(h, _gather_rows(wdt, idx, "down"))
    return out + b_down if b_down is not None else out


def _chess_moc(x, w_gate, w_up, w_down, b_gate, b_up, b_down, thresholds, act, method, k) -> tuple[Tensor, Tensor]:
    lead = x.shape[:-1]
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    inter = w_gate.shape[0]
    a = _act(_opmath(_lin(x2, w_gate, b_gate)), act)
    mag = a.abs()
    if method == "chess":
        if thresholds is None or thresholds.shape != (inter,):
            raise ValueError(f"einfuse sparse MLP (chess): thresholds must have shape ({inter},), got "
                             f"{None if thresholds is None else tuple(thresholds.shape)}")
        mask = mag > thresholds.to(mag.dtype)
    else:
        kk = max(0, min(int(k), inter))
        if kk >= inter:
            mask = torch.ones_like(mag, dtype=torch.bool)
        else:
            mask = torch.zeros_like(mag, dtype=torch.bool)
            if kk > 0:
                mask.scatter_(1, torch.topk(mag, kk, dim=1, sorted=False).indices, True)
    if x2.shape[0] == 1 and _one_token_kernel(x2, w_up, w_down, b_up, b_down):
        # decode: one compiled call reads each kept channel's up and down rows once (sparse_mlp_cpu.py)
        counters.bump("sparsity_cpu_kernel")
        out = sparse_mlp_cpu.sparse_mlp1(x2[0].contiguous(), a[0].contiguous(), mask[0], w_up, b_up,
                                         _rows_of_down(w_down), b_down)[None]
    else:
        out = _sparse_rows(x2, a, mask, w_up, w_down, b_up, b_down, dt)
    return out.view(*lead, w_down.shape[0]), mask.view(*lead, inter)


def _one_token_kernel(x2, w_up, w_down, b_up, b_down) -> bool:
    ts = [t for t in (x2, w_up, w_down, b_up, b_down) if t is not None]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts) and w_up.is_contiguous()
            and (b_up is None or b_up.is_contiguous()) and (b_down is None or b_down.is_contiguous())
            and not dispatch.use_triton(x2, w_up, w_down) and sparse_mlp_cpu.available())


CORE_TOKEN_FRACTION = 0.1  # CoreInfer's alpha: each token's core channels are its top 10% by |act(g) * u|


def _core_select(h: Tensor, B: int, k: int) -> Tensor:
    """CoreInfer's sentence-level core channels: [B, k] sorted indices from h [B*S, I].

    Token-wise core channels: each token's top ``CORE_TOKEN_FRACTION`` of channels by |h|. Sentence-wise:
    the k channels that are token-wise core for the most tokens; equal counts are ordered by the
    channels' summed magnitude, each token's |h| normalised by its largest (a tie-break below one vote).
    """
    inter = h.shape[-1]
    mag = h.abs().view(B, -1, inter)
    S = mag.shape[1]
    kt = max(1, min(inter, int(round(CORE_TOKEN_FRACTION * inter))))
    tok = torch.topk(mag, kt, dim=-1, sorted=False).indices  # token-wise core channels
    votes = torch.zeros(B, inter, dtype=torch.float32, device=h.device)
    votes.scatter_add_(1, tok.reshape(B, S * kt), torch.ones(B, S * kt, dtype=torch.float32, device=h.device))
    norm = mag / mag.amax(-1, keepdim=True).clamp_min(torch.finfo(mag.dtype).tiny)
    tie = norm.sum(1).float() / (S + 1)  # < 1: orders equal vote counts only
    return torch.topk(votes + tie, k, dim=-1, sorted=False).indices.sort(-1).values


def _coreinfer(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, k) -> tuple[Tensor, Tensor]:
    lead = x.shape[:-1]
    dt = x.dtype
    inter, H = w_gate.shape
    H2 = w_down.shape[0]
    kk = max(1, min(int(k), inter))
    B, S = _seq_dims(x)
    st = STATE
    entry = st.get(w_down)
    fresh = entry is not None and entry.versions == (_stamp(w_gate), _stamp(w_up), _stamp(w_down))
    if (S == 1 or _continuing) and fresh and entry.batch == B:
        # decode: the compact weights only
        st.decodes += 1
        if B == 1:
            x2 = x.reshape(-1, H)
            g = _lin(x2, entry.w_gate, entry.b_gate)
            u = _lin(x2, entry.w_up, entry.b_up)
            h = (_act(_opmath(g), act) * _opmath(u)).to(dt)
            out = torch.mm(h, entry.w_down_t)
        else:
            x3 = x.reshape(B, S, H)
            g = torch.bmm(x3, entry.w_gate.transpose(1, 2))
            u = torch.bmm(x3, entry.w_up.transpose(1, 2))
            if entry.b_gate is not None:
                g = g + entry.b_gate[:, None]
            if entry.b_up is not None:
                u = u + entry.b_up[:, None]
            h = (_act(_opmath(g), act) * _opmath(u)).to(dt)
            out = torch.bmm(h, entry.w_down_t).reshape(B * S, H2)
        if b_down is not None:
            out = out + b_down
        mask = torch.zeros(B, inter, dtype=torch.bool, device=x.device)
        mask.scatter_(1, entry.idx, True)
        return out.view(*lead, H2), mask[:, None, :].expand(B, S, inter).reshape(*lead, inter)
    # prefill (or no usable state): dense and exact; choose and store the core channels
    x2 = x.reshape(-1, H)
    g = _lin(x2, w_gate, b_gate)
    u = _lin(x2, w_up, b_up)
    h = (_act(_opmath(g), act) * _opmath(u))
    out = _lin(h.to(dt), w_down, b_down)
    st.prefills += 1
    idx = _core_select(h, B, kk)  # [B, k]

    def pick(w):  # the selected rows, copied once per prefill: [k, H] (B == 1) or [B, k, H]
        rows = w[idx]
        return rows[0].contiguous() if B == 1 else rows.contiguous()

    bg = pick(b_gate) if b_gate is not None else None
    bu = pick(b_up) if b_up is not None else None
    st.set(w_down, CoreEntry(B, idx, pick(w_gate), pick(w_up), pick(w_down.t()), bg, bu,
                             (_stamp(w_gate), _stamp(w_up), _stamp(w_down))))
    mask = torch.ones(*lead, inter, dtype=torch.bool, device=x.device)
    return out.view(*lead, H2), mask


# --------------------------------------------------------------------------------------------------
# einfuse::sparse_glu_mlp
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("einfuse::sparse_glu_mlp", mutates_args=())
def sparse_glu_mlp_op(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor],
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    thresholds: Optional[Tensor],
    act: str,
    method: str,
    k: int,
    key: str,
) -> tuple[Tensor, Tensor]:
    _check(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    if method not in METHODS:
        raise ValueError(f"einfuse sparse MLP: unknown method {method!r}; expected one of {METHODS}")
    counters.bump("sparsity")
    if method == "coreinfer":
        out, mask = _coreinfer(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, k)
    else:
        out, mask = _chess_moc(x, w_gate, w_up, w_down, b_gate, b_up, b_down, thresholds, act, method, k)
    if _measures:
        kept = int(mask.sum())
        for m in _measures:
            m.add(key, kept, mask.numel())
    return out, mask


@sparse_glu_mlp_op.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, thresholds, act, method, k, key):
    _check(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    lead = tuple(x.shape[:-1])
    return x.new_empty(lead + (w_down.shape[0],)), x.new_empty(lead + (w_gate.shape[0],), dtype=torch.bool)


def _masked_mlp_backward(go, x, w_gate, w_up, w_down, b_gate, b_up, mask, act, needs):
    """Gradients of down((act(gate(x)) * up(x)) * mask) with the mask constant (None: dense)."""
    need_x, need_wg, need_wu, need_wd, need_bg, need_bu, need_bd = needs
    H, H2 = x.shape[-1], go.shape[-1]
    dt = x.dtype
    x2 = x.reshape(-1, H)
    go2 = go.reshape(-1, H2)
    g = _opmath(_lin(x2, w_gate, b_gate))
    u = _opmath(_lin(x2, w_up, b_up))
    a = _act(g, act)
    m = None if mask is None else mask.reshape(-1, mask.shape[-1]).to(a.dtype)
    res = [None] * 7
    if need_wd:
        h = a * u if m is None else a * u * m
        res[3] = torch.mm(go2.t(), h.to(dt))
    if need_bd:
        res[6] = go2.sum(0)
    if need_x or need_wg or need_wu or need_bg or need_bu:
        dh = _opmath(torch.mm(go2, w_down))
        if m is not None:
            dh = dh * m
        du = (dh * a).to(dt)
        dg = _act_bwd(dh * u, g, act).to(dt)
        if need_x:
            res[0] = torch.mm(dg, w_gate).addmm_(du, w_up).view(x.shape)
        if need_wg:
            res[1] = torch.mm(dg.t(), x2)
        if need_wu:
            res[2] = torch.mm(du.t(), x2)
        if need_bg:
            res[4] = dg.sum(0)
        if need_bu:
            res[5] = du.sum(0)
    return res


def _sparse_setup(ctx, inputs, output) -> None:
    x, w_gate, w_up, w_down, b_gate, b_up, b_down, thresholds, act, method, k, key = inputs
    _, mask = output
    ctx.mark_non_differentiable(mask)
    ctx.save_for_backward(x, w_gate, w_up, w_down, b_gate, b_up, mask)
    ctx.act = act


def _sparse_backward(ctx, grad_out, _grad_mask):
    x, w_gate, w_up, w_down, b_gate, b_up, mask = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    grads = _masked_mlp_backward(grad_out, x, w_gate, w_up, w_down, b_gate, b_up, mask, ctx.act, needs)
    return tuple(grads) + (None,) * 5


sparse_glu_mlp_op.register_autograd(_sparse_backward, setup_context=_sparse_setup)


def sparse_glu_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Optional[Tensor] = None,
                   b_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None,
                   thresholds: Optional[Tensor] = None, act: str = "silu", method: str = "moc", k: int = 0,
                   key: str = "") -> Tensor:
    """Sparse ``down(act(gate(x)) * up(x))`` keeping the channels `method` chooses (see the module doc)."""
    out, _ = torch.ops.einfuse.sparse_glu_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, thresholds, act,
                                              method, k, key)
    return out


# --------------------------------------------------------------------------------------------------
# einfuse::glu_mlp_observe  (calibration)
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("einfuse::glu_mlp_observe", mutates_args=())
def glu_mlp_observe_op(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor],
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    act: str,
    collector: str,
    key: str,
) -> Tensor:
    _check(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    counters.bump("calibration")
    x2 = x.reshape(-1, x.shape[-1])
    a = _act(_opmath(_lin(x2, w_gate, b_gate)), act)
    u = _opmath(_lin(x2, w_up, b_up))
    col = _COLLECTORS.get(collector)
    if col is not None:
        col.observe(key, a.abs(), act, u)
    h = a.mul_(u).to(x.dtype)
    return _lin(h, w_down, b_down).view(*x.shape[:-1], w_down.shape[0])


@glu_mlp_observe_op.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, collector, key):
    _check(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    return x.new_empty(tuple(x.shape[:-1]) + (w_down.shape[0],))


def _observe_setup(ctx, inputs, output) -> None:
    x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, collector, key = inputs
    ctx.save_for_backward(x, w_gate, w_up, w_down, b_gate, b_up)
    ctx.act = act


def _observe_backward(ctx, grad_out):
    x, w_gate, w_up, w_down, b_gate, b_up = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    grads = _masked_mlp_backward(grad_out, x, w_gate, w_up, w_down, b_gate, b_up, None, ctx.act, needs)
    return tuple(grads) + (None,) * 3


glu_mlp_observe_op.register_autograd(_observe_backward, setup_context=_observe_setup)


def glu_mlp_observe(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Optional[Tensor] = None,
                    b_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None, act: str = "silu",
                    collector: str = "", key: str = "") -> Tensor:
    """The dense gated MLP, recording |act(gate(x))| per channel into calibration collector `collector`."""
    return torch.ops.einfuse.glu_mlp_observe(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, collector, key)
