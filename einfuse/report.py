"""The Report: what every pass matched, changed and rejected, graph by graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FUSION_KINDS = ("attention", "rmsnorm", "swiglu", "rope", "linear_cross_entropy")


@dataclass
class Region:
    """One candidate region: fused, or left alone with the reason."""
    id: str                      # stable: "g{graph}/{kind}/{n}"
    kind: str
    fused: bool
    nodes: list[str]             # FX node names the region covers
    reason: str = ""             # why it was not fused (empty when fused)
    anchor: str = ""             # the FX node the search started from
    cascades: dict[str, Any] = field(default_factory=dict)   # label -> Cascade
    bindings: dict[str, Any] = field(default_factory=dict)   # eps, scale, group size, ...
    extra: dict[str, Any] = field(default_factory=dict)      # room for costs, pass counts, kernels

    def summary(self) -> str:
        what = "fused" if self.fused else f"not fused: {self.reason}"
        return f"{self.id} ({self.anchor}): {what}"


@dataclass
class PassRecord:
    graph: int
    name: str
    changed: bool
    before: str
    after: str
    matched: int = 0
    rejected: int = 0


@dataclass
class Report:
    regions: list[Region] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    graphs: int = 0
    notes: list[str] = field(default_factory=list)
    # filled by the backend (einfuse.analysis.report_hooks): einfuse.analysis.Cost before and
    # after the passes (sympy flops, matmul_flops, bytes_moved, peak_bytes; evaluate(**sizes)),
    # and region id -> rank -> PassCount(unfused, fused)
    cost_before: Any = None
    cost_after: Any = None
    pass_counts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def fusions(self) -> dict[str, int]:
        counts = {k: 0 for k in FUSION_KINDS}
        for r in self.regions:
            if r.fused:
                counts[r.kind] = counts.get(r.kind, 0) + 1
        return counts

    @property
    def kernels(self) -> dict[str, str]:
        """Fusion kind -> Triton source generated from a fused region's cascade (einfuse.codegen)."""
        from einfuse.codegen import report_kernels
        return report_kernels(self.regions)

    @property
    def unfused(self) -> list[Region]:
        return [r for r in self.regions if not r.fused]

    def region(self, region_id: str) -> Region:
        return next(r for r in self.regions if r.id == region_id)

    def to_markdown(self) -> str:
        lines = ["# einfuse report", "", f"Graphs captured: {self.graphs}", "", "## Fusions", "",
                 "| kind | fused |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.fusions.items()]
        lines += ["", "## Passes", "", "| graph | pass | changed | matched | rejected |", "|---|---|---|---|---|"]
        lines += [f"| {p.graph} | {p.name} | {'yes' if p.changed else 'no'} | {p.matched} | {p.rejected} |"
                  for p in self.passes]
        lines += ["", "## Not fused", ""]
        lines += [f"- `{r.id}` at `{r.anchor}`: {r.reason}" for r in self.unfused] or ["(none)"]
        fused = [r for r in self.regions if r.fused]
        if fused:
            lines += ["", "## Fused regions", ""]
            seen: set[str] = set()
            for r in fused:
                lines.append(f"### {r.id}")
                lines.append("")
                lines.append(f"Covers {len(r.nodes)} FX nodes; bindings: "
                             + ", ".join(f"{k}={_short(v)}" for k, v in r.bindings.items()))
                for label, c in r.cascades.items():
                    key = f"{r.kind}/{label}/{c}"
                    if key in seen:
                        lines.append(f"\n{label}: same cascade as an earlier {r.kind} region")
                        continue
                    seen.add(key)
                    lines += ["", f"{label}:", "```", str(c), "```"]
                lines.append("")
        if self.cost_before is not None or self.pass_counts:
            from einfuse.analysis.report_hooks import markdown as cost_markdown
            lines += cost_markdown(self)
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def to_html(self, title: str = "einfuse report", **options: Any) -> str:
        """One self-contained HTML page with graph pictures; see einfuse.report_html.to_html."""
        from einfuse.report_html import to_html
        return to_html(self, title=title, **options)

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready data (expressions as strings, costs also as numbers)."""
        def num(cost: Any, e: Any) -> Any:
            try:
                v = cost.subs(e)
                return v if isinstance(v, (int, float)) else str(v)
            except Exception:  # noqa: BLE001 - a size the example does not fix
                return None

        out: dict[str, Any] = {
            "graphs": self.graphs,
            "fusions": self.fusions,
            "passes": [{"graph": p.graph, "name": p.name, "changed": p.changed, "matched": p.matched,
                        "rejected": p.rejected} for p in self.passes],
            "regions": [{"id": r.id, "kind": r.kind, "fused": r.fused, "anchor": r.anchor, "nodes": r.nodes,
                         "reason": r.reason, "cascades": {k: str(c) for k, c in r.cascades.items()},
                         "bindings": {k: _short(v) for k, v in r.bindings.items()}} for r in self.regions],
            "unfused": [{"id": r.id, "kind": r.kind, "anchor": r.anchor, "reason": r.reason} for r in self.unfused],
            "pass_counts": {rid: {rank: [pc.unfused, pc.fused] for rank, pc in counts.items()}
                            for rid, counts in self.pass_counts.items()},
            "notes": list(self.notes),
        }
        if self.cost_before is not None and self.cost_after is not None:
            cost = {}
            for side, c in (("before", self.cost_before), ("after", self.cost_after)):
                metrics = {"flops": c.flops, "matmul_flops": c.matmul_flops, "bytes_moved": c.bytes_moved,
                           "peak_bytes": c.peak_bytes}
                try:
                    metrics["bytes_lower_bound"] = c.lower_bound_on()
                except Exception:  # noqa: BLE001
                    pass
                cost[side] = {k: {"value": num(c, e), "expr": str(e)} for k, e in metrics.items()}
            cost["example_sizes"] = dict(self.cost_after.example_sizes or self.cost_before.example_sizes)
            out["cost"] = cost
        try:
            out["kernels"] = self.kernels
        except Exception as e:  # noqa: BLE001
            out["kernels"] = {"error": f"{type(e).__name__}: {e}"}
        return out


def _short(v: Any) -> str:
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) < 40 else s[:37] + "..."
