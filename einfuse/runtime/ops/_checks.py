"""Argument checks shared by the fused ops' fake implementations.

A fused op called with tensors on two devices must fail loudly. Eager torch raises from inside its
kernels, but a custom op with one meta (or fake) tensor among CPU tensors is routed to its fake
implementation, which would return an uninitialised tensor: a silent wrong answer. The fake
implementations therefore check devices first (under torch.compile this also runs at trace time).
"""
from __future__ import annotations

from typing import Optional

import torch


def same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Raise ValueError naming the tensors when the given tensors are not all on one device."""
    seen = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(seen.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in seen.items())
        raise ValueError(f"einfuse::{op}: all tensors must be on one device, got {where}")
