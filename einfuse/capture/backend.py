"""The `einfuse` torch.compile backend.

Dynamo hands us each captured graph (graph breaks give several) as a
torch-level FX GraphModule with `example_value` metadata on every node. We
run the pass pipeline on it and hand the result to the inner executor. The
rewritten graph returns exactly the captured graph's outputs: passes only
replace interior nodes by fused ops of the same shape and dtype.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from einfuse.config import OptimizeConfig
from einfuse.passes.base import PassContext
from einfuse.passes.pipeline import run_pipeline
from einfuse.report import Report

log = logging.getLogger("einfuse")

_last_report: Report | None = None


def last_report() -> Report | None:
    """The report of the most recent compilation through the backend."""
    return _last_report


def make_backend(config: OptimizeConfig, report: Report | None = None):
    """A Dynamo backend bound to a config and a report that collects every graph."""
    report = report if report is not None else Report()

    def backend(gm: fx.GraphModule, example_inputs: list[Any]):
        global _last_report
        _last_report = report
        ctx = PassContext(config, report, graph_index=report.graphs)
        report.graphs += 1
        out = run_pipeline(gm, ctx)
        from einfuse.analysis.report_hooks import record_costs
        record_costs(report, gm, out, ctx.graph_index)  # symbolic costs before/after, pass counts
        if config.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(out, example_inputs)
        return out

    backend.report = report  # type: ignore[attr-defined]
    return backend


def einfuse_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **kwargs):
    """Entry point registered as `torch_dynamo_backends: einfuse`."""
    config = OptimizeConfig.from_options(**(options or {}), **kwargs)
    return make_backend(config)(gm, example_inputs)
