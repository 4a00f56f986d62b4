"""Calibration for LLM.int8(): which input columns of each linear hold outliers.

LLM.int8() computes in higher precision the activation columns (input features)
that hold an |x| > threshold; Dettmers et al. found them systematic: the same
feature dimensions across tokens and batches. Calibration runs the fp model over a
few batches with a forward pre-hook on each selected linear and records those
columns; the quantized layer keeps them (`outliers` buffer) and, at run time,
unites them with the columns the current batch crosses the threshold in, so unseen
outliers are still caught.

Batches are input_ids tensors (called as `model(input_ids=batch)` when the model
takes `input_ids`, else `model(batch)`), dicts of keyword arguments, or tuples of
positional arguments. A progress bar (tqdm, else rich) shows the batches.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
import torch.nn as nn


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, unit="batch", leave=False)
    except ImportError:
        pass
    try:
        from rich.progress import track
        return track(items, description=desc)
    except ImportError:
        return items


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif isinstance(batch, torch.Tensor) and "input_ids" in inspect.signature(model.forward).parameters:
        model(input_ids=batch)
    else:
        model(batch)


def calibrate_outliers(model: nn.Module, layers: list[nn.Module], batches: Iterable[Any], threshold: float = 6.0,
                       progress: bool = True) -> dict[nn.Module, torch.Tensor]:
    """{layer: sorted int64 input columns where some |x| > threshold} over all batches."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch")
    hit: dict[nn.Module, torch.Tensor] = {}

    def hook(mod, args):
        x = args[0].detach()
        over = (x.reshape(-1, x.shape[-1]).abs() > threshold).any(dim=0)
        hit[mod] = over if mod not in hit else hit[mod] | over

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in _progress(batches, progress, "einfuse: calibrating LLM.int8() outliers"):
                _call(model, b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {m: torch.nonzero(hit[m]).flatten() if m in hit else torch.zeros(0, dtype=torch.int64) for m in layers}
