"""Device dispatch: which implementation a fused op runs.

    CUDA tensors            -> the generated Triton kernel (einfuse.codegen.ops)
    CPU tensors             -> the op's CPU implementation
    EINFUSE_KERNELS=triton  -> the Triton path for CPU tensors too; it needs TRITON_INTERPRET=1
                               (Triton's interpreter), which is how CI runs the kernels
    EINFUSE_KERNELS=torch   -> never Triton (the CPU implementation runs on every device)

An op module asks at the top of its implementation:

    out = dispatch.try_triton("rmsnorm_forward", x, weight, eps, offset)
    if out is not None:
        return out
    ...  # CPU implementation

`try_triton` returns None when the Triton path does not apply, when the variant has no
kernel (`Unsupported`, silently), or when generating, compiling or launching the kernel
failed: then it warns once per kernel (naming it) and the op falls back to its CPU path;
that kernel is not tried again in this process. `launches` counts Triton launches per
kernel (tests assert it); `inject_failure(name)` (or EINFUSE_INJECT_KERNEL_FAILURE=name1,name2)
makes the named kernel fail to compile, to test the fallback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections import Counter
from typing import Any

import torch

log = logging.getLogger("einfuse.dispatch")

launches: Counter[str] = Counter()        # kernel name -> Triton launches
_broken: set[str] = set()                 # kernels that failed (by cache key or name): not retried
_injected: set[str] = set()
_warned_interp = False


class KernelFallbackWarning(RuntimeWarning):
    pass


class Unsupported(Exception):
    """This call has no generated kernel (a variant outside the codegen); use the CPU path."""


class InjectedFailure(RuntimeError):
    pass


def mode() -> str:
    m = os.environ.get("EINFUSE_KERNELS", "auto").strip().lower() or "auto"
    return m if m in ("auto", "triton", "torch") else "auto"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def backend() -> str:
    return "interpreter" if interpreting() else "cuda"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency where a GPU is
        return False
    return True


def use_triton(*tensors: Any) -> bool:
    """Whether these tensors take the Triton path (see the module docstring)."""
    global _warned_interp
    m = mode()
    if m == "torch" or not triton_available():
        return False
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts:
        return False
    if any(getattr(t, "is_meta", False) or t.device.type == "meta" for t in ts):
        return False
    on_cuda = all(t.is_cuda for t in ts)
    if on_cuda:
        return not interpreting() or m == "triton"
    if m != "triton" or any(t.is_cuda for t in ts):
        return False
    if not interpreting():
        if not _warned_interp:
            _warned_interp = True
            warnings.warn("einfuse: EINFUSE_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 (Triton's "
                          "interpreter); using the CPU implementations", KernelFallbackWarning, stacklevel=3)
        return False
    return True


def try_triton(name: str, *args: Any, **kwargs: Any) -> Any | None:
    """Run einfuse.codegen.ops.IMPLS[name](*args) if the Triton path applies; None otherwise."""
    if not use_triton(*args, *kwargs.values()) or name in _broken:
        return None
    from einfuse.codegen.ops import IMPLS, KernelFailure
    impl = IMPLS.get(name)
    if impl is None:
        return None
    try:
        out = impl(*args, **kwargs)
    except Unsupported as e:
        log.debug("no generated kernel for %s: %s", name, e)
        return None
    except KernelFailure as e:
        if e.key not in _broken:
            _broken.add(e.key)
            warnings.warn(f"einfuse: Triton kernel {e.kernel!r} failed ({e.cause}); falling back to the CPU "
                          f"implementation of {name}", KernelFallbackWarning, stacklevel=3)
        return None
    except Exception as e:  # host glue around the kernels
        _broken.add(name)
        warnings.warn(f"einfuse: Triton path of {name!r} failed ({type(e).__name__}: {e}); falling back to the "
                      "CPU implementation", KernelFallbackWarning, stacklevel=3)
        return None
    return out


def run(name: str, fallback, *args: Any, **kwargs: Any) -> Any:
    """try_triton, else fallback(*args, **kwargs)."""
    out = try_triton(name, *args, **kwargs)
    return fallback(*args, **kwargs) if out is None else out


def failed_kernels() -> set[str]:
    """Cache keys of kernels that failed in this process (not launched again)."""
    return _broken


def failure_injected(kernel: str) -> bool:
    env = {s.strip() for s in os.environ.get("EINFUSE_INJECT_KERNEL_FAILURE", "").split(",") if s.strip()}
    return kernel in _injected or kernel in env


@contextlib.contextmanager
def inject_failure(*kernels: str):
    """Make the named generated kernels fail to compile inside the block (for tests)."""
    added = [k for k in kernels if k not in _injected]
    _injected.update(added)
    try:
        yield
    finally:
        _injected.difference_update(added)


def reset() -> None:
    """Forget failures and counts (tests)."""
    global _warned_interp
    launches.clear()
    _broken.clear()
    _warned_interp = False
