"""What the backend records in the Report, and the Report's cost tables.

`record_costs(report, before_gm, after_gm, graph_index)` is called by the backend once
per captured graph, after the pass pipeline: it adds the graph's cost before and after
the passes to `report.cost_before` / `report.cost_after`, fills
`report.pass_counts[region id]` (rank -> PassCount(unfused, fused)) for the graph's fused
regions, and puts each fused region's traffic in `region.extra["io"]`: bytes moved by the
unfused nodes it replaced and by the fused op (the IO model, on the report's device
profile), the lower bound, the two ratios to it, the unfused nodes it counts
(`replaced_nodes`), and both sides' FLOPs and bytes read/written by dtype. Analysis
failures never break a compilation: they are logged and noted in the report.

Set EINFUSE_COST=0 to skip the analysis.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import sympy

from . import io_model
from .cost import FUSED_OPS, Cost, GraphCost
from .devices import DeviceProfile, get_profile
from .pass_count import region_pass_counts

log = logging.getLogger("einfuse")


def enabled() -> bool:
    return os.environ.get("EINFUSE_COST", "1") not in ("0", "false", "no", "off")


def record_costs(report, before_gm, after_gm, graph_index: int, profile: DeviceProfile | str | None = None) -> None:
    if not enabled():
        return
    try:
        p = get_profile(profile)
        before = GraphCost(before_gm, profile=p)
        after = GraphCost(after_gm, training=before.training, profile=p)
        if report.cost_before is None:
            report.cost_before = Cost(profile=p)
        if report.cost_after is None:
            report.cost_after = Cost(profile=p)
        report.cost_before.add(before)
        report.cost_after.add(after)
        was_dead = {c.name for c in before.dead_nodes}
        dead = [c.name for c in after.dead_nodes if (c.flops or c.allocs) and c.name not in was_dead]
        if dead:
            report.notes.append(f"graph {graph_index}: {len(dead)} computing node(s) no output depends on remain "
                                f"after the passes (an eager executor still runs them): {', '.join(dead[:8])}"
                                + (" ..." if len(dead) > 8 else ""))
        fused = [r for r in report.regions if r.fused and r.id.startswith(f"g{graph_index}/")]
        region_io(fused, before, after, p)
        for r in fused:
            counts = region_pass_counts(r, p.smem_per_block)
            if counts:
                report.pass_counts[r.id] = counts
    except Exception as e:  # the analysis must never break a compilation
        log.warning("einfuse: cost analysis of graph %d failed: %s", graph_index, e, exc_info=True)
        report.notes.append(f"cost analysis of graph {graph_index} failed: {type(e).__name__}: {e}")


def replaced_nodes(region, before: GraphCost, gone: set, claimed: dict) -> list[str]:
    """The unfused nodes a fused region replaced, in graph order.

    A pass records the nodes its match visited; the rewrite also erases nodes the match
    did not visit (casts, the `x * rstd` product canonicalisation merged). Added here,
    among the nodes gone from the rewritten graph (`gone`) and not recorded by another
    region: those lying between two recorded nodes, and those all of whose users are in
    the region (producers only the region read, such as an upcast of its input).
    """
    by_name = {c.name: c for c in before.nodes}
    nodes = {n for n in region.nodes if n in by_name}
    free = {n for n in gone if claimed.get(n, region.id) == region.id} - nodes

    def reach(start: set, step) -> set:
        seen: set = set()
        stack = list(start)
        while stack:
            for m in step(by_name[stack.pop()]):
                if m in free and m not in seen:
                    seen.add(m)
                    stack.append(m)
        return seen

    nodes |= reach(nodes, lambda c: c.users) & reach(nodes, lambda c: c.in_nodes)
    grown = True
    while grown:
        grown = False
        for m in sorted(free - nodes):
            users = by_name[m].users
            if users and all(u in nodes for u in users):
                nodes.add(m)
                grown = True
    return [c.name for c in before.nodes if c.name in nodes]


def region_io(regions: list, before: GraphCost, after: GraphCost, p: DeviceProfile) -> None:
    """region.extra["io"] for fused regions of one graph.

    A region's fused op is the call of its kind's ops (`FUSED_OPS`) that reads the most
    of the values the region's nodes read from outside it (node names survive the passes);
    without any such overlap, the k-th remaining call for the k-th region of the kind
    (passes rewrite candidates in graph order).
    """
    M = p.smem_per_block
    by_name = {c.name: c for c in before.nodes}
    calls: dict[str, list] = {}
    for c in after.nodes:
        for kind, ops in FUSED_OPS.items():
            if c.kind == "compute" and c.op in ops:
                calls.setdefault(kind, []).append(c)
    free = {k: list(v) for k, v in calls.items()}
    claimed = {n: r.id for r in regions for n in r.nodes}
    gone = {c.name for c in before.nodes if c.kind in ("compute", "view")} - {c.name for c in after.nodes}
    for r in regions:
        r_nodes = replaced_nodes(r, before, gone, claimed)
        inside = set(r_nodes)
        outside = {src for n in r_nodes for src in by_name[n].in_nodes if src not in inside}
        ours = free.get(r.kind, [])
        scored = [(len(outside & set(c.in_nodes)), -i, c) for i, c in enumerate(ours)]
        best = max(scored, key=lambda x: x[:2], default=None)
        fused_node = best[2] if best is not None and best[0] > 0 else (ours[0] if ours else None)
        if fused_node is not None:
            ours.remove(fused_node)
        unfused = sympy.Add(*[sympy.sympify(io_model.node_traffic(by_name[n], M)) for n in r_nodes])
        if fused_node is None:
            continue
        fused = sympy.sympify(io_model.node_traffic(fused_node, M))
        unfused_nodes = [by_name[n] for n in r_nodes]
        lb = sympy.sympify(io_model.node_lower_bound(fused_node, M))
        r.extra["io"] = {"profile": p.name, "unfused": unfused, "fused": fused, "lower_bound": lb,
                         "fused_node": fused_node.name, "unfused_nodes": r_nodes,
                         "flops": (sympy.Add(*[sympy.sympify(c.flops) for c in unfused_nodes]),
                                   sympy.sympify(fused_node.flops)),
                         "bytes_by_dtype": (_by_dtype(unfused_nodes), _by_dtype([fused_node])),
                         "ratio_unfused": unfused / lb if lb != 0 else None,
                         "ratio_fused": fused / lb if lb != 0 else None}


def _by_dtype(nodes: list) -> dict:
    """dtype name -> (bytes read, bytes written) summed over nodes."""
    out: dict = {}
    for c in nodes:
        for key, i in (("read", 0), ("written", 1)):
            for dt, b in getattr(c, key).items():
                cur = out.setdefault(str(dt).replace("torch.", ""), [sympy.Integer(0), sympy.Integer(0)])
                cur[i] += sympy.sympify(b)
    return {k: tuple(v) for k, v in out.items()}


# -------------------------------------------------------------------------------------------
# markdown

def _fmt_num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _fmt_expr(e: Any, width: int = 90) -> str:
    s = sympy.sstr(e)
    return f"`{s}`" if len(s) <= width else f"`{s[:width - 1]}…`"


def _value(cost: Cost, e: Any) -> str:
    try:
        return _fmt_num(cost.subs(e))
    except (ValueError, TypeError):
        return "?"


def markdown(report) -> list[str]:
    """The cost sections of `Report.to_markdown()` (empty when nothing was analysed)."""
    before, after = report.cost_before, report.cost_after
    lines: list[str] = []
    if before is not None and after is not None and before.graphs:
        sizes = after.example_sizes or before.example_sizes
        lines += ["", "## Cost", ""]
        lines.append(("Symbols: " + ", ".join(f"`{k}` (example {v})" for k, v in sizes.items()) + ". ")
                     if sizes else "Static shapes. ")
        lines[-1] += (f"Peak memory is the {'training (forward + backward)' if before.training else 'inference'} "
                      f"peak of what the graphs allocate; bytes moved on {before.profile.name} "
                      f"(M = {before.profile.smem_per_block // 1024} KiB on chip).")
        lines += ["", "| metric | before | after | before (example) | after (example) |", "|---|---|---|---|---|"]
        for name, label in (("flops", "FLOPs"), ("matmul_flops", "matmul FLOPs"), ("bytes_moved", "bytes moved"),
                            ("peak_bytes", "peak bytes")):
            b, a = getattr(before, name), getattr(after, name)
            lines.append(f"| {label} | {_fmt_expr(b)} | {_fmt_expr(a)} | {_value(before, b)} | {_value(after, a)} |")
        lines += ["", "Roofline time at the example sizes:", "", "| profile | before (µs) | after (µs) |", "|---|---|---|"]
        for prof in ("H100", "A100"):
            try:
                tb = before.subs(before.time_on(prof)) * 1e6
                ta = after.subs(after.time_on(prof)) * 1e6
                lines.append(f"| {prof} | {tb:.3g} | {ta:.3g} |")
            except (ValueError, TypeError, KeyError):
                pass
    if report.pass_counts:
        lines += ["", "## Pass counts", "", "Passes over each rank's fiber (FuseMax), unfused -> fused.", "",
                  "| region | rank | unfused | fused |", "|---|---|---|---|"]
        for rid, counts in report.pass_counts.items():
            for rank, pc in counts.items():
                lines.append(f"| {rid} | {rank} | {pc.unfused} | {pc.fused} |")
    io_rows = [r for r in report.regions if r.fused and "io" in r.extra]
    if io_rows and after is not None:
        lines += ["", "## Traffic per fused region", "",
                  f"Bytes moved at the example sizes ({io_rows[0].extra['io']['profile']}); lower bound: inputs "
                  "read once, outputs written once (attention: also Ω(N²d²/M)).", "",
                  "| region | unfused | fused | lower bound | unfused / bound | fused / bound |",
                  "|---|---|---|---|---|---|"]
        for r in io_rows:
            io = r.extra["io"]
            vals = []
            for key in ("unfused", "fused", "lower_bound", "ratio_unfused", "ratio_fused"):
                try:
                    v = after.subs(io[key]) if io[key] is not None else None
                    vals.append("-" if v is None else (f"{v:.2f}" if key.startswith("ratio") else _fmt_num(v)))
                except (ValueError, TypeError):
                    vals.append("?")
            lines.append(f"| {r.id} | " + " | ".join(vals) + " |")
    return lines
