"""Graph costs as sympy expressions, aggregated over a compilation's graphs.

`GraphCost(gm)` runs the symbolic interpreter over one FX graph; `Cost` sums
GraphCosts (the graphs of one model, split by graph breaks) and is what the Report
holds as `cost_before` / `cost_after`:

    cost.flops, cost.matmul_flops      FLOPs (the convention: `cost_rules`)
    cost.bytes_moved                   HBM traffic for the report's device profile (`io_model`)
    cost.peak_bytes                    peak memory the graphs allocate (`liveness`): the training
                                       peak (forward + backward) for graphs autograd records,
                                       the inference peak otherwise; the max over graphs
    cost.evaluate(seq=8192, ...)       numbers; sizes not given take their example values

All four are sympy expressions in the dynamic-dimension symbols (`batch`, `seq`, or a
SymInt's own name); with static shapes they are sympy integers.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import sympy
import torch
import torch.fx as fx

from . import io_model, liveness
from .devices import DeviceProfile, get_profile
from .symbolic import CostInterpreter, NodeCost, SymEnv

log = logging.getLogger("einfuse")

__all__ = ["GraphCost", "Cost", "analyze", "FUSED_OPS", "node_time"]

# region kind -> the ops its rewrite inserts
FUSED_OPS = {"attention": ("attention",), "rmsnorm": ("rms_norm", "add_rms_norm"), "swiglu": ("glu", "glu_mlp"),
             "rope": ("rope",), "linear_cross_entropy": ("linear_cross_entropy",)}


def _sum(xs: Iterable[Any]) -> sympy.Expr:
    return sympy.Add(*[sympy.sympify(x) for x in xs])


def _number(x: Any) -> Any:
    x = sympy.sympify(x)
    if x.free_symbols:
        raise ValueError(f"sizes missing for {sorted(map(str, x.free_symbols))}")
    if x.is_Integer:
        return int(x)
    v = float(x)
    return int(v) if v.is_integer() else v


def node_time(c: NodeCost, p: DeviceProfile) -> Any:
    """Roofline time (s) of one node as one kernel: max(compute time, memory time).

    Compute: contraction FLOPs at the profile's matmul rate for the operands' dtype plus
    the other FLOPs at its vector rate; memory: the IO model's traffic over the bandwidth.
    """
    if c.kind != "compute":
        return sympy.Integer(0)
    dtype = c.outs[0].dtype if c.outs else torch.float32
    if c.ins and c.matmul_flops:
        dtype = c.ins[0].dtype
    comp = (sympy.sympify(c.matmul_flops) / p.matmul_rate(dtype)
            + sympy.sympify(c.flops - c.matmul_flops) / p.vector_flops)
    mem = sympy.sympify(io_model.node_traffic(c, p.smem_per_block)) / p.mem_bw
    return sympy.Max(comp, mem)


class GraphCost:
    """The cost of one FX graph (per-node `NodeCost`s in `nodes`)."""

    def __init__(self, gm: fx.GraphModule, training: bool | None = None, profile: DeviceProfile | str | None = None):
        interp = CostInterpreter(gm, SymEnv(), training)
        self.nodes: list[NodeCost] = interp.run()
        self.training: bool = interp.training
        self.symbols: dict[str, sympy.Symbol] = interp.env.symbols
        self.example_sizes: dict[str, int] = dict(interp.env.hints)
        self.env = interp.env
        self.profile = get_profile(profile)
        self._cache: dict[Any, Any] = {}

    def _memo(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def node(self, name: str) -> NodeCost:
        return next(c for c in self.nodes if c.name == name)

    @property
    def dead_nodes(self) -> list[NodeCost]:
        """Compute nodes no graph output depends on (run by an eager executor all the same)."""
        needed = liveness.reaches_output(self.nodes)
        return [c for c in self.nodes if c.kind == "compute" and c.name not in needed]

    @property
    def flops(self):
        return self._memo("flops", lambda: _sum(c.flops for c in self.nodes))

    @property
    def matmul_flops(self):
        return self._memo("mm", lambda: _sum(c.matmul_flops for c in self.nodes))

    @property
    def bytes_read(self):
        return self._memo("read", lambda: _sum(c.bytes_read for c in self.nodes))

    @property
    def bytes_written(self):
        return self._memo("written", lambda: _sum(c.bytes_written for c in self.nodes))

    def bytes_by_dtype(self) -> dict[str, tuple]:
        out: dict[str, list] = {}
        for c in self.nodes:
            for dt, b in c.read.items():
                out.setdefault(str(dt).replace("torch.", ""), [0, 0])[0] += b
            for dt, b in c.written.items():
                out.setdefault(str(dt).replace("torch.", ""), [0, 0])[1] += b
        return {k: (sympy.sympify(r), sympy.sympify(w)) for k, (r, w) in out.items()}

    @property
    def peak_inference(self):
        return self._memo("peak_inf", lambda: sympy.sympify(liveness.inference_peak(self.nodes)))

    @property
    def peak_training(self):
        return self._memo("peak_train", lambda: sympy.sympify(liveness.training_peak(self.nodes)))

    @property
    def peak_bytes(self):
        return self.peak_training if self.training else self.peak_inference

    @property
    def saved_bytes(self):
        return self._memo("saved", lambda: sympy.sympify(liveness.saved_bytes(self.nodes)))

    def bytes_moved_on(self, profile: DeviceProfile | str | None = None):
        p = get_profile(profile) if profile is not None else self.profile
        return self._memo(("moved", p.name, p.smem_per_block),
                          lambda: _sum(io_model.node_traffic(c, p.smem_per_block) for c in self.nodes))

    @property
    def bytes_moved(self):
        return self.bytes_moved_on(None)

    def lower_bound_on(self, profile: DeviceProfile | str | None = None):
        p = get_profile(profile) if profile is not None else self.profile
        return self._memo(("lb", p.name, p.smem_per_block),
                          lambda: _sum(io_model.node_lower_bound(c, p.smem_per_block) for c in self.nodes))

    def time_on(self, profile: DeviceProfile | str | None = None):
        """Roofline time (s): per kernel max(compute, memory), summed over kernels."""
        p = get_profile(profile) if profile is not None else self.profile
        return self._memo(("time", p.name), lambda: sympy.Add(*[node_time(c, p) for c in self.nodes]))


class Cost:
    """Costs of a set of graphs (one compilation); see the module docstring."""

    def __init__(self, graphs: Iterable[GraphCost] = (), profile: DeviceProfile | str | None = None):
        self.graphs: list[GraphCost] = list(graphs)
        self.profile = get_profile(profile)

    def add(self, g: GraphCost) -> "Cost":
        self.graphs.append(g)
        return self

    # -- the four expressions --------------------------------------------------------------
    @property
    def flops(self) -> sympy.Expr:
        return _sum(g.flops for g in self.graphs)

    @property
    def matmul_flops(self) -> sympy.Expr:
        return _sum(g.matmul_flops for g in self.graphs)

    @property
    def bytes_moved(self) -> sympy.Expr:
        return _sum(g.bytes_moved_on(self.profile) for g in self.graphs)

    @property
    def peak_bytes(self) -> sympy.Expr:
        return sympy.sympify(liveness.max_expr(g.peak_bytes for g in self.graphs))

    # -- more ----------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        return any(g.training for g in self.graphs)

    @property
    def bytes_read(self):
        return _sum(g.bytes_read for g in self.graphs)

    @property
    def bytes_written(self):
        return _sum(g.bytes_written for g in self.graphs)

    @property
    def saved_bytes(self):
        return _sum(g.saved_bytes for g in self.graphs)

    @property
    def peak_inference(self):
        return sympy.sympify(liveness.max_expr(g.peak_inference for g in self.graphs))

    def bytes_moved_on(self, profile: DeviceProfile | str) -> sympy.Expr:
        return _sum(g.bytes_moved_on(profile) for g in self.graphs)

    def lower_bound_on(self, profile: DeviceProfile | str | None = None) -> sympy.Expr:
        return _sum(g.lower_bound_on(profile or self.profile) for g in self.graphs)

    def time_on(self, profile: DeviceProfile | str | None = None) -> sympy.Expr:
        return _sum(g.time_on(profile or self.profile) for g in self.graphs)

    @property
    def symbols(self) -> dict[str, sympy.Symbol]:
        out: dict[str, sympy.Symbol] = {}
        for g in self.graphs:
            out.update(g.symbols)
        return out

    @property
    def example_sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.graphs:
            out.update(g.example_sizes)
        return out

    def subs(self, expr: Any, **sizes: int) -> Any:
        syms = self.symbols
        unknown = [k for k in sizes if k not in syms]
        if unknown:
            raise ValueError(f"unknown size(s) {unknown}; the symbols are {sorted(syms)}")
        vals = {**self.example_sizes, **sizes}
        return _number(sympy.sympify(expr).subs({syms[k]: v for k, v in vals.items() if k in syms}))

    def evaluate(self, **sizes: int) -> dict[str, Any]:
        """The four costs as numbers; sizes not given take their example values."""
        return {k: self.subs(getattr(self, k), **sizes) for k in ("flops", "matmul_flops", "bytes_moved", "peak_bytes")}

    def __repr__(self) -> str:
        return (f"Cost(flops={self.flops}, matmul_flops={self.matmul_flops}, bytes_moved={self.bytes_moved}, "
                f"peak_bytes={self.peak_bytes})")


def analyze(gm: fx.GraphModule, training: bool | None = None, profile: DeviceProfile | str | None = None) -> Cost:
    """The cost of one FX graph (Dynamo-captured: shapes from `example_value` metadata)."""
    return Cost([GraphCost(gm, training, profile)], profile)
