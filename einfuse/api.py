"""Public entry points: `optimize` (function, module, decorator) and `inspect`."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect as _inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from einfuse.capture.backend import make_backend
from einfuse.config import OptimizeConfig
from einfuse.report import Report


class InputMismatchError(ValueError):
    """One call of an optimized model mixes devices (or floating dtypes the model rejects)."""


def _compile(fn: Callable, config: OptimizeConfig, report: Report) -> Callable:
    compiled = torch.compile(fn, backend=make_backend(config, report), dynamic=config.dynamic,
                             fullgraph=config.fullgraph)

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            if not config.ddp_optimizer and _distributed():
                # Dynamo's DDPOptimizer would split the graph at DDP's gradient buckets and cut
                # fusions apart (OptimizeConfig.ddp_optimizer); it reads this flag per frame
                with torch._dynamo.config.patch(optimize_ddp=False), _quiet_loggers():
                    return compiled(*args, **kwargs)
            with _quiet_loggers():
                return compiled(*args, **kwargs)
        except Exception as e:
            _raise_if_mixed(e, args, kwargs)
            raise

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


def _quiet_loggers():
    """Let Dynamo skip transformers' `Logger.warning_once` instead of breaking the graph there.

    transformers attaches an lru_cache'd `warning_once` to `logging.Logger`; Dynamo cannot trace it,
    and e.g. GPT-2's `loss_function` property calls it between the lm_head and the loss, which cut
    the logit-free loss out of the graph. Declared an ignored logging function, the call is dropped
    from the compiled graph (the warning is not printed from compiled code)."""
    import logging
    extra = getattr(logging.Logger, "warning_once", None)
    if extra is None or extra in torch._dynamo.config.ignore_logging_functions:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(
        ignore_logging_functions=torch._dynamo.config.ignore_logging_functions | {extra})


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _call_tensors(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """(description, tensor) for every tensor taking part in a call, a module's own included."""
    from torch.utils._pytree import tree_flatten_with_path, keystr
    out: list[tuple[str, torch.Tensor]] = []
    for i, a in enumerate(args):
        if isinstance(a, nn.Module):
            out += [(f"parameter {n!r}", p) for n, p in a.named_parameters()]
            out += [(f"buffer {n!r}", b) for n, b in a.named_buffers()]
            continue
        leaves, _ = tree_flatten_with_path(a)
        out += [(f"argument {i}{keystr(k)}", t) for k, t in leaves if isinstance(t, torch.Tensor)]
    for name, a in kwargs.items():
        leaves, _ = tree_flatten_with_path(a)
        out += [(f"argument {name!r}{keystr(k)}", t) for k, t in leaves if isinstance(t, torch.Tensor)]
    return out


def _summary(groups: dict[str, list[str]]) -> str:
    parts = []
    for key, names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{key}: {shown}")
    return "; ".join(parts)


def _raise_if_mixed(error: Exception, args: tuple, kwargs: dict) -> None:
    """After a failed call: if the call mixed devices, or mixed floating dtypes and the failure is
    a dtype error, raise InputMismatchError naming which tensors are where (chained to the
    original error). Runs only on failure: the happy path pays nothing."""
    try:
        tensors = _call_tensors(args, kwargs)
    except Exception:  # describing the inputs must never hide the original error
        return
    by_device: dict[str, list[str]] = {}
    for name, t in tensors:
        by_device.setdefault(str(t.device), []).append(name)
    if len(by_device) > 1:
        raise InputMismatchError(
            f"einfuse: one call mixes tensors on {len(by_device)} devices ({_summary(by_device)}); "
            "move the inputs, parameters and buffers to one device") from error
    msg = str(error).lower()
    if "dtype" in msg or "scalar type" in msg:
        by_dtype: dict[str, list[str]] = {}
        for name, t in tensors:
            if t.is_floating_point():
                by_dtype.setdefault(str(t.dtype).removeprefix("torch."), []).append(name)
        if len(by_dtype) > 1:
            first = next((ln.strip() for ln in str(error).splitlines() if "dtype" in ln.lower()), "")
            raise InputMismatchError(
                f"einfuse: one call mixes floating dtypes ({_summary(by_dtype)}) and the model rejects "
                f"the mix ({first}); cast the inputs to the model's dtype") from error


class _Optimized:
    """Marker base for classes whose forward runs through einfuse."""


def _optimized_class(cls: type) -> type:
    """A subclass of `cls` whose forward runs the compiled original forward.

    Subclassing (rather than wrapping) keeps isinstance checks, attribute and
    parameter names (state_dict has no wrapper prefix), and Hugging Face's
    `generate()`, which calls `self(...)`, so decoding runs the optimized
    forward too.
    """
    if issubclass(cls, _Optimized):
        return cls
    orig_forward = cls.forward

    @functools.wraps(orig_forward)
    def forward(self, *args, **kwargs):
        compiled = self.__dict__.get("_einfuse_compiled")
        if compiled is None:  # e.g. a decorated class: compile lazily per instance
            _attach(self, self.__dict__.get("_einfuse_config") or OptimizeConfig())
            compiled = self.__dict__["_einfuse_compiled"]
        return compiled(self, *args, **kwargs)

    name = cls.__name__
    new = type(name, (cls, _Optimized), {"forward": forward, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__, "_einfuse_orig_class": cls})
    return new


# --- quantization hook (issue 6) -------------------------------------------------------------
def _apply_quantization(module: Any, config: OptimizeConfig, report: Report) -> None:
    """Quantize the module in place when `quantize=` is set: the one step of `optimize` that changes
    parameters, so it runs on the module before any capture (einfuse/passes/quantize.py)."""
    if config.quantize is not None:
        if not isinstance(module, nn.Module):
            raise ValueError("quantize= replaces a module's linear layers: optimize an nn.Module, not a function")
        from einfuse.passes.quantize import apply
        apply(module, config, report)
# --- end quantization hook ------------------------------------------------------------------


def _attach(module: nn.Module, config: OptimizeConfig) -> None:
    report = Report()
    _apply_quantization(module, config, report)
    orig_cls = type(module)._einfuse_orig_class
    # plain attributes (not submodules/parameters): invisible to state_dict and .to()
    module.__dict__["_einfuse_config"] = config
    module.__dict__["einfuse_report"] = report
    module.__dict__["_einfuse_compiled"] = _compile(orig_cls.forward, config, report)


def _optimize_module(model: nn.Module, config: OptimizeConfig) -> nn.Module:
    if isinstance(model, _Optimized):
        # optimizing twice is harmless: re-bind the options, keep one level of compilation
        new = _shallow_copy(model, type(model))
        _attach(new, config)
        return new
    new = _shallow_copy(model, _optimized_class(type(model)))
    _attach(new, config)
    return new


def _shallow_copy(model: nn.Module, cls: type) -> nn.Module:
    """A new instance of `cls` with a copy of model's __dict__: it shares _parameters, _buffers,
    _modules and the hook tables with the original. Not `copy.copy`: classes such as FSDP2's
    (`fully_shard`) re-run __init__ in __new__, which a copy cannot do."""
    new = object.__new__(cls)
    new.__dict__ = dict(model.__dict__)
    return new


def _optimize_function(fn: Callable, config: OptimizeConfig) -> Callable:
    report = Report()
    _apply_quantization(fn, config, report)
    compiled = _compile(fn, config, report)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return compiled(*args, **kwargs)

    wrapper.einfuse_report = report  # type: ignore[attr-defined]
    return wrapper


def _optimize_class(cls: type, config: OptimizeConfig) -> type:
    new = _optimized_class(cls)
    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        _attach(self, config)

    new.__init__ = __init__
    return new


def optimize(model: Any = None, /, config: OptimizeConfig | None = None, **options: Any):
    """Optimize a model or function with einfuse's fusion passes.

    Works on an `nn.Module` instance (returns a module sharing its parameters),
    a function, or as a decorator on functions and `nn.Module` subclasses,
    with or without options:

    >>> import torch, einfuse
    >>> @einfuse.optimize
    ... def norm(x, w):
    ...     return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    >>> y = norm(torch.randn(2, 8), torch.ones(8))
    >>> norm.einfuse_report.fusions["rmsnorm"]
    1
    """
    cfg = OptimizeConfig.from_options(config, **options)
    if model is None:
        return lambda m: optimize(m, config=cfg)
    if isinstance(model, nn.Module):
        return _optimize_module(model, cfg)
    if isinstance(model, type) and issubclass(model, nn.Module):
        return _optimize_class(model, cfg)
    if callable(model) and not isinstance(model, type):
        return _optimize_function(model, cfg)
    raise TypeError(f"einfuse.optimize expects an nn.Module, an nn.Module subclass or a function, "
                    f"got {type(model).__name__}: {model!r:.60}")


def inspect(model: Any, *example_args: Any, config: OptimizeConfig | None = None, **example_kwargs: Any) -> Report:
    """Capture `model(*example_args, **example_kwargs)`, run the pipeline offline, return the Report.

    Options go in `config=OptimizeConfig(...)` (keyword arguments are the model's).
    """
    cfg = config or OptimizeConfig()
    report = Report()
    if cfg.quantize is not None:
        if not isinstance(model, nn.Module):
            raise ValueError("quantize= replaces a module's linear layers: inspect an nn.Module, not a function")
        # quantization changes parameters in place; inspection must leave the caller's model as it was
        model = copy.deepcopy(model)
        _apply_quantization(model, cfg, report)
    if isinstance(model, nn.Module):
        target = model.forward
    elif callable(model):
        target = model
    else:
        raise TypeError(f"einfuse.inspect expects an nn.Module or a function, got {type(model).__name__}")
    compiled = torch.compile(target, backend=make_backend(cfg, report), dynamic=cfg.dynamic)
    with torch.no_grad() if not torch.is_grad_enabled() else _nullcontext(), _quiet_loggers():
        compiled(*example_args, **example_kwargs)
    return report


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
