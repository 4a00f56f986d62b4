"""Measuring and predicting memory.

`LiveStorageTracker` measures: a `TorchDispatchMode` that follows the storages op
outputs live in. A storage is *allocated under the tracker* when an op returns a
tensor whose storage is none of the storages seen before (an input's, or an earlier
output's); it counts from then until the storage is freed (a weakref callback on the
storage object; CPython frees it the moment its last reference goes). Views share
their base's storage and cost nothing; in-place ops cost nothing. Tensors that exist
before the tracker starts (parameters, inputs) are not counted: `peak` is the peak of
memory the tracked code allocated, which is what `predict` (in `liveness.py`) models.

torch has no allocator statistics on CPU; this works on every device, and sees the
tensors autograd saves and the backward's temporaries (the CPU autograd engine runs
the backward on the calling thread, inside the mode). Custom ops' implementations
(einfuse's fused ops run Python code) are followed inside, so their temporaries count.

torch.compile'd code: a dispatch mode that does not declare `ignore_compile_internals()`
makes Dynamo skip every frame it meets while the mode is active (torch runs the original
Python, i.e. the *eager* model) and marks the frame skipped for good, so a compiled or
`einfuse.optimize`d model measured under such a mode is measured as eager and stays
eager afterwards. This tracker declares `ignore_compile_internals() = True`: the compiled
artifact runs, compilation itself (fake tensors) is not tracked. What runs as Python over
torch ops (the graphs einfuse's default `inner="eager"` executes, fused ops, the
autograd backward of custom ops) is tracked op by op. Inductor-generated code allocates
its buffers outside the dispatcher: those are invisible, so the peak of an Inductor-compiled
region is under-measured (its extern kernels' outputs are still seen).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveStorageTracker", "measure_peak"]

_BUILTIN_NAMESPACES = ("aten", "prim", "prims", "_c10d_functional", "c10d")
_DEVICE_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}


def _storages(x: Any) -> list[torch.UntypedStorage]:
    out = []
    for t in tree_flatten(x)[0]:
        if isinstance(t, torch.Tensor):
            try:
                out.append(t.untyped_storage())
            except (RuntimeError, NotImplementedError):  # sparse, some subclasses
                pass
    return out


@dataclass
class _Event:
    op: str
    live: int


class LiveStorageTracker(TorchDispatchMode):
    """Track bytes of live storages allocated by ops run under this mode.

    >>> with LiveStorageTracker() as t:
    ...     y = torch.ones(256) * 2
    >>> t.peak >= 2 * 256 * 4
    True

    Attributes: `current` (bytes live now), `peak` (max of `current`), `peak_op` (the op
    that reached the peak), and with `timeline=True`, `events`: (op, live bytes after it).
    `reset_peak()` sets the peak to the current value (to measure a phase, e.g. backward).
    """

    def __init__(self, timeline: bool = False, inside_custom_ops: bool = True):
        super().__init__()
        self.inside_custom_ops = inside_custom_ops
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self.timeline = timeline
        self.events: list[_Event] = []
        self._live: dict[int, tuple[weakref.ref, int]] = {}   # id(storage obj) -> (ref, bytes)
        self._known: dict[int, weakref.ref] = {}              # storages seen, not allocated here

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let torch.compile'd frames run their compiled code under the tracker (see the module
        docstring); the default (False) silently runs -- and keeps running -- the eager model."""
        return True

    # -- bookkeeping -----------------------------------------------------------------------
    def _key(self, st: torch.UntypedStorage) -> int:
        return st._cdata

    def _seen(self, st) -> bool:
        k = self._key(st)
        return k in self._live or k in self._known

    def _forget(self, k: int, ref) -> None:
        ent = self._live.get(k)
        if ent is not None and ent[0] is ref:
            del self._live[k]
            self.current -= ent[1]
        kn = self._known.get(k)
        if kn is ref:
            del self._known[k]

    def _add(self, st, counted: bool) -> None:
        k = self._key(st)
        cb = lambda r, k=k: self._forget(k, r)  # noqa: E731
        try:
            ref = weakref.ref(st, cb)
        except TypeError:
            return
        if counted:
            n = int(st.nbytes())
            self._live[k] = (ref, n)
            self.current += n
        else:
            self._known[k] = ref

    def reset_peak(self) -> None:
        self.peak = self.current

    # -- the mode ------------------------------------------------------------------------------
    def _call(self, func, args, kwargs):
        """Run the op; a custom (non-aten) op's implementation runs with this mode active.

        A custom op implemented in Python (einfuse's fused ops) allocates its temporaries
        through torch ops the mode would not see (a mode is switched off while it handles
        an op); redispatching to the backend kernel under the mode makes them visible.
        """
        if self.inside_custom_ops and func.namespace not in _BUILTIN_NAMESPACES:
            dev = next((t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)
            key = _DEVICE_KEYS.get(dev)
            if key is not None:
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for st in _storages((args, kwargs)):
            if not self._seen(st):
                self._add(st, counted=False)
        out = self._call(func, args, kwargs)
        for st in _storages(out):
            if not self._seen(st):
                self._add(st, counted=True)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = str(func)
        if self.timeline:
            self.events.append(_Event(str(func), self.current))
        return out


def measure_peak(fn, *args, **kwargs) -> tuple[Any, int]:
    """(fn(*args, **kwargs), peak bytes it allocated), measured with `LiveStorageTracker`."""
    with LiveStorageTracker() as t:
        out = fn(*args, **kwargs)
    return out, t.peak
