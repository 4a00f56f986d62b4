"""Calibration for activation sparsity: ``einfuse.calibrate(model, batches, sparsity={...})``.

The model runs through einfuse with the sparsity pass in *observe* mode: every gated MLP the pass finds
in the captured graph is replaced by ``einfuse::glu_mlp_observe``, the dense MLP that also adds the
magnitudes of its gate activations ``|act(gate(x))|`` to a per-channel histogram (log2-spaced bins,
1/8 octave wide, from 2^-24 to 2^8; smaller values and zeros land in the first bin). The MLPs are keyed
as the pass keys them when it later sparsifies (the down-projection parameter's name), so a calibration
made on one instance applies to any instance of the same model.

It also accumulates each channel's mean up-projection magnitude ``E|u_i|``. When the batches are done,
each channel's histogram becomes a quantile table: the magnitude below which a fraction q of that
channel's calibration gate activations fall, for q = 0, 1/Q, ..., 1 (Q = 200).

CHESS's channel-wise thresholds (``thresholds(key, target)``): pruning channel i of a token changes the
MLP's intermediate value by ``act(g_i) * u_i``; ``u_i`` is not known before the up projection it is meant
to skip, so CHESS scores ``|act(g_i)| * E|u_i|`` and keeps the channels whose score exceeds one
layer-wide ``lambda``, i.e. ``|act(g_i)| > t_i = lambda / E|u_i|``. ``lambda`` is found (bisection on the
per-channel quantile tables) so that the layer skips a fraction ``target`` of all its channel
activations on the calibration data; channels that matter more (large ``E|u_i|``) are pruned less
often. One calibration serves every target.

Saved with safetensors (tensors ``quantiles/<key>`` [I, Q+1] fp32, ``up_mean/<key>`` [I] fp32 and
``tokens/<key>``; JSON metadata in the header); never pickle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

LO, HI, BINS_PER_OCTAVE = -24.0, 8.0, 8
BINS = int((HI - LO) * BINS_PER_OCTAVE)
QUANTILES = 200
FORMAT = "einfuse-calibration"
VERSION = "1"


class Calibration:
    """Per-channel activation statistics of a model's gated MLPs (see the module docstring)."""

    def __init__(self, sparsity: dict | None = None):
        self.sparsity = dict(sparsity) if sparsity else {}
        self.quantiles: dict[str, torch.Tensor] = {}   # key -> [I, Q+1] fp32
        self.tokens: dict[str, int] = {}
        self.acts: dict[str, str] = {}
        self.up_mean: dict[str, torch.Tensor] = {}     # key -> [I] fp32: E|u_i|
        self._hist: dict[str, torch.Tensor] | None = None  # key -> [I, BINS] int64 while collecting
        self._up_sum: dict[str, torch.Tensor] = {}
        self._collector_id: str | None = None

    # -- collecting ---------------------------------------------------------------------------------
    @property
    def collecting(self) -> bool:
        return self._hist is not None

    def _start(self) -> str:
        from einfuse.runtime.ops.sparse_mlp import register_collector
        self._hist = {}
        self._collector_id = register_collector(self)
        return self._collector_id

    def observe(self, key: str, mag: torch.Tensor, act: str, up: torch.Tensor | None = None) -> None:
        """Add |act(gate)| values [tokens, I] of MLP `key` to its per-channel histogram (and the up
        projection's values `up` [tokens, I] to its per-channel mean magnitude)."""
        if self._hist is None:
            return
        if up is not None:
            s = up.detach().abs().reshape(-1, up.shape[-1]).double().sum(0).cpu()
            self._up_sum[key] = s if key not in self._up_sum else self._up_sum[key] + s
        mag = mag.detach().float().reshape(-1, mag.shape[-1])
        n, inter = mag.shape
        b = torch.log2(mag.clamp_min(2.0 ** LO)).sub_(LO).mul_(BINS_PER_OCTAVE).floor_().clamp_(0, BINS - 1).long()
        b += torch.arange(inter, device=b.device).mul_(BINS)
        counts = torch.bincount(b.view(-1), minlength=inter * BINS).view(inter, BINS).cpu()
        h = self._hist.get(key)
        self._hist[key] = counts if h is None else h.add_(counts)
        self.tokens[key] = self.tokens.get(key, 0) + n
        self.acts[key] = act

    def _finish(self) -> None:
        for key, h in (self._hist or {}).items():
            self.quantiles[key] = _quantile_table(h)
            if key in self._up_sum:
                self.up_mean[key] = (self._up_sum[key] / max(self.tokens.get(key, 1), 1)).float()
        self._up_sum = {}
        self._hist = None
        self._collector_id = None

    # -- using ---------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.quantiles)

    def __contains__(self, key: str) -> bool:
        return key in self.quantiles

    def __len__(self) -> int:
        return len(self.quantiles)

    def thresholds(self, key: str, target: float) -> torch.Tensor | None:
        """CHESS's per-channel thresholds [I] on |act(gate)| for MLP `key` at sparsity `target`."""
        q = self.quantiles.get(key)
        if q is None:
            return None
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"target must be in [0, 1], got {target}")
        inter = q.shape[0]
        m = self.up_mean.get(key)
        m = torch.ones(inter) if m is None else m.double().clamp_min(1e-30)
        if target <= 0.0:
            return torch.zeros(inter)
        if target >= 1.0:
            return torch.full((inter,), math.inf)
        qd = q.double().contiguous()
        lo, hi = math.log2(2.0 ** LO * float(m.min())), math.log2(float((qd[:, -1] * m).max()) * 2 + 1e-30)
        for _ in range(60):  # bisection on log2(lambda): the skipped fraction grows with lambda
            mid = 0.5 * (lo + hi)
            if float(_cdf(qd, (2.0 ** mid) / m).mean()) < target:
                lo = mid
            else:
                hi = mid
        return ((2.0 ** hi) / m).float().contiguous()

    def sparsity_at(self, key: str, thresholds: torch.Tensor) -> float:
        """The fraction of MLP `key`'s calibration gate activations below `thresholds` (per channel)."""
        return float(_cdf(self.quantiles[key].double().contiguous(), thresholds.double()).mean())

    def __repr__(self) -> str:
        toks = sorted(set(self.tokens.values()))
        return (f"Calibration({len(self)} MLPs, tokens per MLP {toks[0] if len(toks) == 1 else toks}, "
                f"sparsity={self.sparsity or None})")

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write to `path` (safetensors)."""
        from safetensors.torch import save_file
        if self.collecting:
            raise RuntimeError("calibration still collecting")
        tensors = {}
        for key, q in self.quantiles.items():
            tensors[f"quantiles/{key}"] = q.contiguous()
            tensors[f"tokens/{key}"] = torch.tensor([self.tokens.get(key, 0)], dtype=torch.int64)
            if key in self.up_mean:
                tensors[f"up_mean/{key}"] = self.up_mean[key].contiguous()
        meta = {"format": FORMAT, "version": VERSION,
                "json": json.dumps({"sparsity": self.sparsity, "acts": self.acts, "quantiles": QUANTILES})}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an einfuse calibration file (format {meta.get('format')!r})")
            info = json.loads(meta.get("json", "{}"))
            if info.get("quantiles", QUANTILES) != QUANTILES:
                raise ValueError(f"{path}: quantile grid {info.get('quantiles')} != {QUANTILES}")
            cal = cls(info.get("sparsity"))
            cal.acts = dict(info.get("acts", {}))
            for name in f.keys():
                kind, key = name.split("/", 1)
                if kind == "quantiles":
                    cal.quantiles[key] = f.get_tensor(name)
                elif kind == "tokens":
                    cal.tokens[key] = int(f.get_tensor(name)[0])
                elif kind == "up_mean":
                    cal.up_mean[key] = f.get_tensor(name)
        return cal


def _cdf(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per channel, the fraction of values below t [I], from quantile tables q [I, Q+1] (interpolated)."""
    Q = q.shape[1] - 1
    j = torch.searchsorted(q, t[:, None]).squeeze(1)  # first table entry >= t
    jc = j.clamp(1, Q)
    lo, hi = q.gather(1, (jc - 1)[:, None]).squeeze(1), q.gather(1, jc[:, None]).squeeze(1)
    frac = ((t - lo) / (hi - lo).clamp_min(1e-300)).clamp(0.0, 1.0)
    pos = (jc - 1).double() + frac
    pos = torch.where(j == 0, torch.zeros_like(pos), pos)
    pos = torch.where(j > Q, torch.full_like(pos, float(Q)), pos)
    return pos / Q


def _quantile_table(h: torch.Tensor) -> torch.Tensor:
    """[I, BINS] counts -> [I, Q+1] magnitudes at quantiles 0, 1/Q, ..., 1 (linear inside a bin)."""
    h = h.double()
    inter = h.shape[0]
    cum = h.cumsum(1)
    total = cum[:, -1:].clamp_min(1.0)
    q = torch.linspace(0.0, 1.0, QUANTILES + 1, dtype=torch.float64)
    want = (q[None, :] * total).contiguous()                              # [I, Q+1] counts
    b = torch.searchsorted(cum.contiguous(), want).clamp_(max=BINS - 1)   # first bin reaching the count
    below = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(want))
    inbin = h.gather(1, b).clamp_min(1e-12)
    frac = ((want - below) / inbin).clamp_(0.0, 1.0)
    log_mag = LO + (b.double() + frac) / BINS_PER_OCTAVE
    out = torch.exp2(log_mag)
    out[:, 0] = 0.0  # target 0 keeps everything
    out[b == 0] = torch.minimum(out[b == 0], torch.full_like(out[b == 0], 2.0 ** LO))
    return out.float()


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(model: Any, batches: Iterable, sparsity: dict | None = None, *, progress: bool = True,
              passes: tuple[str, ...] | None = ("sparsity",)) -> Calibration:
    """Run `model` over `batches` and collect its gated MLPs' activation statistics.

    batches: an iterable of model inputs (a tensor of token ids, a tuple of positional arguments, or a
    dict of keyword arguments). sparsity: the option you will optimize with (recorded, and validated;
    its target does not matter: one calibration serves every target). passes: the einfuse passes to run
    while observing (the sparsity pass recognises plain gated MLPs itself; add "swiglu" to also catch
    the spellings only that pass recognises). Shows a progress bar unless progress=False.

    >>> cal = einfuse.calibrate(model, [ids1, ids2], sparsity={"method": "chess", "target": 0.5})
    >>> cal.save("cal.safetensors"); cal = einfuse.calibrate.load("cal.safetensors")
    >>> fast = einfuse.optimize(model, sparsity={"method": "chess", "target": 0.5}, calibration=cal)
    """
    import einfuse
    from einfuse.passes.sparsity import normalise_sparsity

    spec = normalise_sparsity(sparsity) if sparsity is not None else {"method": "chess", "target": 0.5}
    cal = Calibration(spec)
    cal._start()
    try:
        observed = einfuse.optimize(model, passes=passes, sparsity=spec, calibration=cal)
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
        it = batches
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(batches, total=total, desc="einfuse calibrate", unit="batch")
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            with torch.no_grad():
                for batch in it:
                    _call(observed, batch)
        finally:
            if was_training:
                model.train()
        if not cal._hist:
            raise ValueError("calibrate: no gated MLP was found in the model's captured graphs "
                             "(see einfuse.inspect(model, ...).unfused for the candidates and why)")
    finally:
        cal._finish()
    return cal


# `einfuse.calibrate` is this function (the package exports it over the module name): reach the class and
# the loader from it too.
calibrate.Calibration = Calibration  # type: ignore[attr-defined]
calibrate.load = Calibration.load  # type: ignore[attr-defined]
