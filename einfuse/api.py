"""Public entry points: `optimize` (function, module, decorator) and `inspect`."""

from __future__ import annotations

import copy
import functools
import inspect as _inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from einfuse.capture.backend import make_backend
from einfuse.config import OptimizeConfig
from einfuse.report import Report


def _compile(fn: Callable, config: OptimizeConfig, report: Report) -> Callable:
    return torch.compile(fn, backend=make_backend(config, report), dynamic=config.dynamic,
                         fullgraph=config.fullgraph)


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
        new = copy.copy(model)
        new.__dict__ = dict(model.__dict__)
        _attach(new, config)
        return new
    new = copy.copy(model)  # shallow: shares _parameters, _buffers and _modules with the original
    new.__class__ = _optimized_class(type(model))
    _attach(new, config)
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
    if isinstance(model, nn.Module):
        target = model.forward
    elif callable(model):
        target = model
    else:
        raise TypeError(f"einfuse.inspect expects an nn.Module or a function, got {type(model).__name__}")
    compiled = torch.compile(target, backend=make_backend(cfg, report), dynamic=cfg.dynamic)
    with torch.no_grad() if not torch.is_grad_enabled() else _nullcontext():
        compiled(*example_args, **example_kwargs)
    return report


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
