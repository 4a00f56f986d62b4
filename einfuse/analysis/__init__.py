"""Symbolic cost analysis: FLOPs, bytes, peak memory, pass counts and IO bounds.

    cost = einfuse.analysis.analyze(gm)       # a Dynamo-captured FX graph
    cost.flops, cost.matmul_flops, cost.bytes_moved, cost.peak_bytes   # sympy
    cost.evaluate(seq=4096)

Modules: `symbolic` (the interpreter over sympy sizes), `cost_rules` (per-op rules),
`liveness` (peak memory), `memory` (a measuring tracker), `io_model` (traffic and lower
bounds), `devices` (profiles), `pass_count` (FuseMax pass counts), `cost` (aggregates),
`report_hooks` (what the backend records in the Report).
"""

from .cost import Cost, GraphCost, analyze
from .devices import A100, H100, DeviceProfile, get_profile, set_default_profile
from .memory import LiveStorageTracker, measure_peak
from .pass_count import PassCount, passes_per_rank, region_pass_counts

__all__ = ["Cost", "GraphCost", "analyze", "DeviceProfile", "H100", "A100", "get_profile", "set_default_profile",
           "LiveStorageTracker", "measure_peak", "PassCount", "passes_per_rank", "region_pass_counts"]
