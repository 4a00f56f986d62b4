"""The `einfuse` torch.compile backend.

Dynamo hands us each captured graph (graph breaks give several) as a
torch-level FX GraphModule with `example_value` metadata on every node. We
run the pass pipeline on it and hand the result to the inner executor. The
rewritten graph returns exactly the captured graph's outputs: passes only
replace interior nodes by fused ops of the same shape and dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
        _record_compile(report, gm, example_inputs)
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


# --- compilations and recompilations -----------------------------------------------------------

@dataclass
class CompileRecord:
    """One graph handed to the backend."""
    graph: int                   # its index in the report (report.graphs before it)
    frame: int | None            # Dynamo's frame id (a graph break continues in a new frame)
    attempt: int | None          # 0: the frame's first compilation; n > 0: its n-th recompilation
    symbols: tuple[str, ...]     # symbolic sizes among the graph's inputs (empty: a static graph)
    shapes: tuple[tuple[str, ...], ...]   # the graph's tensor inputs' sizes, e.g. ("s0", "s1", "32")


def compile_records(report: Report) -> list[CompileRecord]:
    """Every graph compiled for this report, in order (see `compile_stats`)."""
    return report.__dict__.setdefault("compiles", [])


def compile_stats(report: Report) -> dict[str, int]:
    """graphs: graphs compiled; compilations: distinct (frame, attempt) pairs (a frame split by
    Dynamo's DDPOptimizer hands over several graphs in one compilation); recompilations: those
    with attempt > 0 (a guard failed: new shapes, dtypes, ...); dynamic_graphs: graphs with
    symbolic sizes."""
    recs = compile_records(report)
    comps = {(r.frame, r.attempt) for r in recs} if all(r.frame is not None for r in recs) else set(range(len(recs)))
    return {"graphs": len(recs), "compilations": len(comps),
            "recompilations": sum(1 for c in comps if isinstance(c, tuple) and (c[1] or 0) > 0),
            "dynamic_graphs": sum(1 for r in recs if r.symbols)}


def _record_compile(report: Report, gm: fx.GraphModule, example_inputs: list[Any]) -> None:
    try:
        from torch._guards import CompileContext
        cid = CompileContext.current_compile_id()
        frame, attempt = (cid.frame_id, cid.frame_compile_id) if cid is not None else (None, None)
    except Exception:  # pragma: no cover - private API moved
        frame, attempt = None, None
    shapes, symbols = [], set()
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            shapes.append(tuple(str(d) for d in t.shape))
            symbols.update(str(d) for d in t.shape if isinstance(d, torch.SymInt))
        elif isinstance(t, torch.SymInt):
            symbols.add(str(t))
    rec = CompileRecord(report.graphs, frame, attempt, tuple(sorted(symbols)), tuple(shapes))
    compile_records(report).append(rec)
    if attempt:
        report.notes.append(f"graph {rec.graph}: recompilation {attempt} of frame {frame}"
                            + (f" (symbolic sizes {', '.join(rec.symbols)})" if rec.symbols else " (static sizes)"))
    if _ddp_optimizer_active():
        global _warned_ddp
        if not _warned_ddp:
            _warned_ddp = True
            log.warning("einfuse: Dynamo's DDPOptimizer is splitting this DistributedDataParallel model's graph "
                        "at gradient-bucket boundaries, which can cut fusions apart. einfuse.optimize turns it "
                        "off by default (OptimizeConfig.ddp_optimizer); with torch.compile(backend='einfuse') "
                        "set torch._dynamo.config.optimize_ddp = False.")
        report.notes.append(f"graph {rec.graph}: a piece of a graph split by Dynamo's DDPOptimizer")


_warned_ddp = False


def _ddp_optimizer_active() -> bool:
    try:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return False
        from torch._dynamo.utils import get_optimize_ddp_mode
        from torch.nn.parallel import DistributedDataParallel
        return get_optimize_ddp_mode() == "ddp_optimizer" and DistributedDataParallel._get_active_ddp_module() is not None
    except Exception:  # pragma: no cover
        return False


def einfuse_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **kwargs):
    """Entry point registered as `torch_dynamo_backends: einfuse`."""
    config = OptimizeConfig.from_options(**(options or {}), **kwargs)
    return make_backend(config)(gm, example_inputs)
