"""The HTML report: one self-contained file (inline SVG and CSS, no script, nothing fetched).

    html = einfuse.report_html.to_html(report, title="tiny-llama")     # or report.to_html()

Sections: a summary (fusions per kind, graphs captured, options); the cost
table before/after the passes with the lower bound on bytes moved; every pass of
every captured graph with pictures of the FX graph before and after it (its
fused regions in clusters of the kind's colour, its rejected candidates
outlined in red, einfuse's fused ops filled; repeated layers collapsed, see
einfuse/graph_draw.py); each fused region's einsum cascade(s) with its pass
counts and traffic; the candidates left unfused with the reason; the Triton
source generated from the cascades.

Pictures need graphviz's `dot`; without it the report says so where the pictures
would be and is otherwise complete.
"""

from __future__ import annotations

import html
import re
import time
from typing import Any, Callable

from einfuse import graph_draw as gd

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1d1d1f;
       background: #fafafa; }
header { background: #20232a; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 22px; }
header .sub { color: #c8c8c8; font-size: 13px; margin-top: 4px; }
nav { padding: 6px 28px; background: #eceff3; font-size: 13px; border-bottom: 1px solid #d5d9df; }
nav a { margin-right: 14px; color: #264a73; text-decoration: none; }
main { padding: 8px 28px 40px; max-width: 1500px; }
h2 { border-bottom: 2px solid #d5d9df; padding-bottom: 4px; margin-top: 30px; }
h3 { margin: 18px 0 6px; font-size: 16px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; background: #fff; }
th, td { border: 1px solid #d5d9df; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; }
pre { background: #fff; border: 1px solid #d5d9df; padding: 8px 10px; overflow-x: auto; margin: 6px 0; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 9px; color: #fff; font-size: 12px;
        margin-right: 4px; }
.muted { color: #6b6b6b; }
.pass { background: #fff; border: 1px solid #d5d9df; border-radius: 6px; margin: 12px 0; padding: 4px 12px 10px; }
.pass summary { cursor: pointer; font-weight: 600; padding: 6px 0; }
.pics { display: flex; gap: 14px; flex-wrap: wrap; }
.pic { flex: 1 1 440px; min-width: 340px; border: 1px solid #e1e4e8; border-radius: 4px; background: #fff; }
.pic .cap { font-size: 12px; padding: 4px 8px; background: #f6f8fa; border-bottom: 1px solid #e1e4e8; }
.pic .scroll { max-height: 820px; overflow: auto; }
.pic svg { display: block; }
.region { background: #fff; border-left: 4px solid #999; padding: 2px 12px 8px; margin: 10px 0; }
.legend span { margin-right: 12px; font-size: 12px; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 4px;
            vertical-align: -1px; }
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _num(x: Any) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _pill(kind: str) -> str:
    color = gd.KIND_COLORS.get(kind, ("#555", "#ddd"))[0]
    return f'<span class="pill" style="background:{color}">{_e(kind)}</span>'


def _sym(e: Any, width: int = 120) -> str:
    try:
        import sympy
        s = sympy.sstr(e)
    except Exception:  # noqa: BLE001 - display only
        s = str(e)
    return s if len(s) <= width else s[:width - 1] + "…"


def _value(cost: Any, e: Any) -> str:
    try:
        return _num(cost.subs(e))
    except Exception:  # noqa: BLE001 - a size the example does not fix
        return "?"


def _svg_unique_ids(svg: str, prefix: str) -> str:
    """Make the ids of one inline SVG unique in the page (graphviz numbers them from 0 in each)."""
    svg = re.sub(r'\bid="([^"]*)"', lambda m: f'id="{prefix}{m.group(1)}"', svg)
    return re.sub(r'url\(#([^)]*)\)', lambda m: f"url(#{prefix}{m.group(1)})", svg)


def _legend() -> str:
    items = "".join(f'<span><i style="background:{c[0]}"></i>{_e(k)}</span>' for k, c in gd.KIND_COLORS.items())
    return (f'<div class="legend">{items}<span><i style="border:2px dashed {gd.REJECTED_COLOR};width:9px;'
            'height:9px"></i>rejected candidate</span><span><i style="background:#fff8dc;border:1px solid '
            '#b8860b"></i>collapsed repeated layers</span></div>')


# ------------------------------------------------------------------------------------------------

def _summary(report: Any, meta: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta.items())
    fus = "".join(f"<tr><td>{_pill(k)}</td><td class='num'>{v}</td></tr>" for k, v in report.fusions.items())
    extra = {}
    for r in report.regions:
        if r.fused and r.kind not in report.fusions:
            extra[r.kind] = extra.get(r.kind, 0) + 1
    fus += "".join(f"<tr><td>{_pill(k)}</td><td class='num'>{v}</td></tr>" for k, v in extra.items())
    out = ['<h2 id="summary">Summary</h2>', "<table>", rows,
           f"<tr><th>graphs captured</th><td>{report.graphs}</td></tr>",
           f"<tr><th>candidates</th><td>{sum(r.fused for r in report.regions)} fused, "
           f"{len(report.unfused)} left unfused</td></tr></table>",
           "<table><tr><th>fusion</th><th>regions fused</th></tr>", fus, "</table>"]
    if report.notes:
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    return "\n".join(out)


def _costs(report: Any) -> str:
    before, after = report.cost_before, report.cost_after
    out = ['<h2 id="cost">Cost before and after</h2>']
    if before is None or after is None or not getattr(before, "graphs", None):
        out.append('<p class="muted">No cost analysis in this report (EINFUSE_COST=0, or it failed: see the '
                   "notes).</p>")
        return "\n".join(out)
    sizes = after.example_sizes or before.example_sizes
    sym = ", ".join(f"<code>{_e(k)}</code> = {v}" for k, v in sizes.items()) or "static shapes"
    out.append(f"<p>Symbolic costs of all captured graphs ({'training: forward + backward' if before.training else 'inference'}); "
               f"numbers at the example sizes ({sym}). Bytes moved and their lower bound on the "
               f"<b>{_e(before.profile.name)}</b> profile (M = {before.profile.smem_per_block // 1024} KiB on chip); "
               "the lower bound is summed over the graph's ops, each reading its inputs once and writing its "
               "outputs once (attention: also Ω(N²d²/M)), so an unfused graph sits at its own bound and fusion "
               "lowers the bound itself; the traffic table below compares each fused region with its "
               "bound.</p>")
    out.append("<table><tr><th>metric</th><th>before</th><th>after</th><th>before (symbolic)</th>"
               "<th>after (symbolic)</th></tr>")
    rows = [("FLOPs", before.flops, after.flops), ("matmul FLOPs", before.matmul_flops, after.matmul_flops),
            ("bytes moved", before.bytes_moved, after.bytes_moved)]
    try:
        rows.append(("bytes moved: lower bound", before.lower_bound_on(), after.lower_bound_on()))
    except Exception:  # noqa: BLE001
        pass
    rows.append(("peak bytes", before.peak_bytes, after.peak_bytes))
    for label, b, a in rows:
        out.append(f"<tr><th>{_e(label)}</th><td class='num'>{_value(before, b)}</td>"
                   f"<td class='num'>{_value(after, a)}</td><td><code>{_e(_sym(b))}</code></td>"
                   f"<td><code>{_e(_sym(a))}</code></td></tr>")
    try:
        ratio_b = before.subs(before.bytes_moved) / before.subs(before.lower_bound_on())
        ratio_a = after.subs(after.bytes_moved) / after.subs(after.lower_bound_on())
        out.append(f"<tr><th>bytes moved / lower bound</th><td class='num'>{ratio_b:.2f}</td>"
                   f"<td class='num'>{ratio_a:.2f}</td><td></td><td></td></tr>")
    except Exception:  # noqa: BLE001
        pass
    for prof in ("H100", "A100"):
        try:
            tb = before.subs(before.time_on(prof)) * 1e6
            ta = after.subs(after.time_on(prof)) * 1e6
            out.append(f"<tr><th>roofline time on {prof} (µs)</th><td class='num'>{tb:.4g}</td>"
                       f"<td class='num'>{ta:.4g}</td><td></td><td></td></tr>")
        except Exception:  # noqa: BLE001
            pass
    out.append("</table>")
    io_rows = [r for r in report.regions if r.fused and "io" in r.extra]
    if io_rows:
        out.append("<h3>Traffic per fused region</h3><table><tr><th>region</th><th>unfused</th><th>fused</th>"
                   "<th>lower bound</th><th>unfused / bound</th><th>fused / bound</th></tr>")
        for r in io_rows:
            io = r.extra["io"]
            cells = []
            for key in ("unfused", "fused", "lower_bound", "ratio_unfused", "ratio_fused"):
                try:
                    v = after.subs(io[key]) if io.get(key) is not None else None
                    cells.append("-" if v is None else (f"{v:.2f}" if key.startswith("ratio") else _num(v)))
                except Exception:  # noqa: BLE001
                    cells.append("?")
            out.append(f"<tr><td><a href='#{_anchor(r.id)}'>{_e(r.id)}</a></td>"
                       + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>")
        out.append("</table>")
    return "\n".join(out)


def _anchor(region_id: str) -> str:
    return "r-" + re.sub(r"[^A-Za-z0-9_-]", "-", region_id)


def _highlights_for(report: Any, graph: int, kind: str) -> list[gd.Highlight]:
    out = []
    for r in report.regions:
        if r.kind != kind or not r.id.startswith(f"g{graph}/"):
            continue
        cap = f"{r.id} fused" if r.fused else f"{r.id} rejected"
        out.append(gd.Highlight(list(r.nodes), r.kind, r.fused, cap, r.reason or cap))
    return out


def _passes(report: Any, collapse: bool, pictures: bool, step: Callable[[str], None]) -> str:
    out = ['<h2 id="passes">Passes</h2>',
           "<p>Each pass of each captured graph, with the FX graph before and after it. "
           "Before: the regions this pass fused are boxed in their kind's colour, rejected candidates are "
           "outlined in red (hover for the reason). After: einfuse's fused ops are filled. Runs of identical "
           "layers are drawn once and collapsed into one box. Parameters are not drawn.</p>", _legend()]
    if pictures and not gd.have_dot():
        out.append("<p><b>graphviz's <code>dot</code> is not installed here: the graph pictures are left out "
                   "(apt-get install graphviz).</b></p>")
        pictures = False
    svg_n = 0
    for k, p in enumerate(report.passes):
        fused = [r for r in report.regions if r.kind == p.name and r.id.startswith(f"g{p.graph}/") and r.fused]
        rejected = [r for r in report.regions if r.kind == p.name and r.id.startswith(f"g{p.graph}/") and not r.fused]
        status = (f"fused {p.matched}, rejected {p.rejected}" + ("" if p.changed else " — graph unchanged"))
        is_open = " open" if (p.changed or p.rejected) else ""
        out.append(f'<details class="pass" id="pass-{k}"{is_open}><summary>graph {p.graph} · pass '
                   f"<code>{_e(p.name)}</code> — {_e(status)}</summary>")
        if fused:
            out.append("<p>fused: " + ", ".join(f"<a href='#{_anchor(r.id)}'>{_e(r.id)}</a>" for r in fused) + "</p>")
        if rejected:
            out.append("<ul>" + "".join(f"<li><code>{_e(r.id)}</code> at <code>{_e(r.anchor)}</code>: "
                                        f"{_e(r.reason)}</li>" for r in rejected) + "</ul>")
        if not (p.changed or rejected):
            out.append('<p class="muted">No candidates for this pass in this graph.</p></details>')
            continue
        if pictures:
            pics = []
            views = [("before", p.before, _highlights_for(report, p.graph, p.name))]
            if p.changed:
                views.append(("after", p.after, []))
            for label, code, hl in views:
                step(f"graph {p.graph} {p.name} ({label})")
                try:
                    sk = gd.sketch_from_code(code)
                    marks = {m: f"{h.kind} {h.fused}" for h in hl for m in h.nodes}
                    boxes = gd.collapse_plan(sk, marks=marks) if collapse else []
                    svg = gd.render_svg(gd.to_dot(sk, hl, collapse=collapse))
                    svg = _svg_unique_ids(svg, f"s{svg_n}_")
                    svg_n += 1
                    calls = sum(1 for n in sk.nodes if n.op == "call")
                    note = (f"{calls} ops, {len(sk.layers)} layers"
                            + (", collapsed: " + ", ".join(f"{b.first}-{b.last}" for b in boxes) if boxes else ""))
                    pics.append(f'<div class="pic"><div class="cap"><b>{label}</b> {_e(p.name)} '
                                f'<span class="muted">({_e(note)})</span></div><div class="scroll">{svg}</div></div>')
                except Exception as e:  # noqa: BLE001 - one picture failing must not lose the report
                    pics.append(f'<div class="pic"><div class="cap"><b>{label}</b></div>'
                                f"<p>picture failed: {_e(type(e).__name__)}: {_e(e)}</p></div>")
            if not p.changed:
                pics.append('<div class="pic"><div class="cap"><b>after</b></div><p class="muted">&nbsp;'
                            "unchanged</p></div>")
            out.append('<div class="pics">' + "".join(pics) + "</div>")
        out.append("</details>")
    return "\n".join(out)


def _regions(report: Any) -> str:
    fused = [r for r in report.regions if r.fused]
    out = ['<h2 id="regions">Fused regions: cascades and pass counts</h2>']
    if not fused:
        return "\n".join(out + ['<p class="muted">Nothing was fused.</p>'])
    out.append("<p>Each fused region's einsum cascade(s) in the IR's notation, and the passes over each "
               "rank's fiber (FuseMax's count), unfused → fused. A cascade identical to an earlier region's "
               "of the same kind is not repeated.</p>")
    seen: dict[str, str] = {}
    for r in fused:
        color = gd.KIND_COLORS.get(r.kind, ("#999", ""))[0]
        out.append(f'<div class="region" id="{_anchor(r.id)}" style="border-left-color:{color}">')
        out.append(f"<h3>{_pill(r.kind)} {_e(r.id)}</h3>")
        binds = ", ".join(f"{_e(k)}={_e(_short(v))}" for k, v in r.bindings.items())
        out.append(f"<p>anchor <code>{_e(r.anchor)}</code>; covers {len(r.nodes)} FX nodes"
                   + (f"; bindings: {binds}" if binds else "") + "</p>")
        for label, c in r.cascades.items():
            text = str(c)
            key = f"{r.kind}/{label}/{text}"
            if key in seen:
                out.append(f"<p class='muted'>{_e(label)}: same cascade as {_e(seen[key])}</p>")
                continue
            seen[key] = r.id
            out.append(f"<p><b>{_e(label)}</b></p><pre>{_e(text)}</pre>")
        counts = report.pass_counts.get(r.id)
        if counts:
            out.append("<table><tr><th>rank</th><th>passes unfused</th><th>passes fused</th></tr>"
                       + "".join(f"<tr><td><code>{_e(rank)}</code></td><td class='num'>{pc.unfused}</td>"
                                 f"<td class='num'>{pc.fused}</td></tr>" for rank, pc in counts.items())
                       + "</table>")
        out.append("</div>")
    return "\n".join(out)


def _unfused(report: Any) -> str:
    out = ['<h2 id="unfused">Candidates left unfused</h2>']
    if not report.unfused:
        return "\n".join(out + ['<p class="muted">None: every candidate was fused.</p>'])
    out.append("<table><tr><th>candidate</th><th>kind</th><th>at</th><th>reason</th></tr>")
    for r in report.unfused:
        out.append(f"<tr><td><code>{_e(r.id)}</code></td><td>{_pill(r.kind)}</td><td><code>{_e(r.anchor)}</code>"
                   f"</td><td>{_e(r.reason)}</td></tr>")
    return "\n".join(out + ["</table>"])


def _kernels(report: Any) -> str:
    out = ['<h2 id="kernels">Generated kernels</h2>']
    try:
        kernels = report.kernels
    except Exception as e:  # noqa: BLE001
        return "\n".join(out + [f"<p>kernel generation failed: {_e(type(e).__name__)}: {_e(e)}</p>"])
    if not kernels:
        return "\n".join(out + ['<p class="muted">No kernel was generated (nothing fused with a cascade).</p>'])
    out.append("<p>Triton source generated from the first fused region of each kind (einfuse.codegen).</p>")
    for kind, src in kernels.items():
        out.append(f"<details><summary>{_pill(kind)} {src.count(chr(10)) + 1} lines</summary>"
                   f"<pre>{_e(src)}</pre></details>")
    return "\n".join(out)


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) < 60 else s[:57] + "..."


def to_html(report: Any, title: str = "einfuse report", meta: dict[str, Any] | None = None, collapse: bool = True,
            pictures: bool = True, progress: Callable[[str], None] | None = None) -> str:
    """The report as one self-contained HTML page (see the module docstring).

    meta: extra rows for the summary table (target, options, ...). collapse: collapse runs of
    identical layers in the pictures. pictures: draw the graphs (needs graphviz's `dot`).
    progress: called with a short description before each picture is drawn.
    """
    step = progress or (lambda _msg: None)
    meta = dict(meta or {})
    meta.setdefault("generated", time.strftime("%Y-%m-%d %H:%M:%S"))
    body = [_summary(report, meta), _costs(report), _passes(report, collapse, pictures, step), _regions(report),
            _unfused(report), _kernels(report)]
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (("summary", "Summary"), ("cost", "Cost"),
                                                          ("passes", "Passes"), ("regions", "Fused regions"),
                                                          ("unfused", "Unfused"), ("kernels", "Kernels")))
    fusions = ", ".join(f"{k} {v}" for k, v in report.fusions.items() if v) or "nothing fused"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><div class=\"sub\">einfuse report · {report.graphs} graph(s) · "
            f"{_e(fusions)}</div></header><nav>{nav}</nav><main>"
            + "\n".join(body) + "</main></body></html>\n")
