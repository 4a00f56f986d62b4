"""Pictures of FX graphs for the HTML report: graphviz `dot` -> SVG.

A graph is read from the Python source FX generates for it (`GraphModule.code`,
which is what `Report.passes[i].before/after` keep) or from an `fx.Graph`. Both
give a `Sketch`: the nodes in program order, each with its inputs and the
decoder layer it belongs to.

Layers. A parameter's name carries its layer (`..._modules_layers_modules_7_...`).
A node belongs to the highest layer among its inputs; a node that reads a
parameter outside every layer (the final norm's weight, the lm_head) after the
layers have started belongs to the epilogue, and so do all its users. So a layer
runs from its first use of its own parameters to just before the next layer's.

Collapsing. Consecutive layers whose nodes spell the same sequence of ops are
one run; of a run of 3 or more, the first layer is drawn in full and the rest
becomes a single box ("layers 2-28: 27 x the structure of layer 1"), so a
30-layer model draws about four layers, whatever its depth.

Highlighting. Nodes of a region (`Region.nodes`) are drawn in a cluster coloured
by fusion kind (fused) or outlined in red (a rejected candidate, its reason in
the tooltip); calls of einfuse's fused ops are filled with their kind's colour.

`dot` comes from graphviz (`apt-get install graphviz`); `have_dot()` tells
whether it is on PATH. Nothing else is needed (the `graphviz` Python package is
used when installed, `dot` through subprocess otherwise).
"""

from __future__ import annotations

import ast
import html
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Iterable

EPILOGUE = 10 ** 9            # layer number of the nodes after the last layer

# fusion kind -> (fill colour of fused ops and fused-region clusters, light fill for region members)
KIND_COLORS = {
    "attention": ("#e4572e", "#fbd5ca"),
    "rope": ("#7b2cbf", "#e4d3f5"),
    "rmsnorm": ("#2e86ab", "#cde6f1"),
    "swiglu": ("#3a9d23", "#d3eecb"),
    "linear_cross_entropy": ("#f4a100", "#fde7b8"),
    "layer_skip": ("#6c757d", "#e2e3e5"),
    "sparsity": ("#d63384", "#f7d1e4"),
    "quantize": ("#0f766e", "#c9ece8"),
}
REJECTED_COLOR = "#c0392b"

# substrings of a fused op's name (as FX prints it) -> fusion kind; first match wins
_FUSED_OPS = (("sparse", "sparsity"), ("quantized", "quantize"), ("linear_cross_entropy", "linear_cross_entropy"),
              ("attention", "attention"), ("rope", "rope"), ("rms_norm", "rmsnorm"), ("glu", "swiglu"))

_VIEWISH = {"view", "reshape", "transpose", "permute", "contiguous", "to", "getitem", "size", "unsqueeze",
            "squeeze", "expand", "flatten", "type_as", "float", "clone", "detach", "t", "_set_grad_enabled"}

_LAYER_RES = (re.compile(r"_modules_(\d+)_"), re.compile(r"(?:layers?|blocks?|h)_(\d+)_"))


@dataclass
class GNode:
    name: str
    op: str                       # "input", "param", "call", "output"
    label: str                    # short op name: "linear", "*", ".view", "einfuse::attention"
    inputs: list[str] = field(default_factory=list)
    text: str = ""                # the statement, for the tooltip
    layer: int | None = None      # None: before the first layer; EPILOGUE: after the last
    fused_kind: str | None = None  # for calls of einfuse's fused ops


@dataclass
class Sketch:
    nodes: list[GNode]

    def by_name(self) -> dict[str, GNode]:
        return {n.name: n for n in self.nodes}

    @property
    def layers(self) -> list[int]:
        return sorted({n.layer for n in self.nodes if n.layer is not None and n.layer != EPILOGUE})


# ------------------------------------------------------------------------------------------------
# reading graphs

def _param_layer(name: str) -> int | None:
    for r in _LAYER_RES:
        m = r.search(name)
        if m:
            return int(m.group(1))
    return None


def _is_param_name(name: str) -> bool:
    n = name.lower()
    return "_parameters_" in n or "_buffers_" in n or n.startswith(("l_self_", "l__self__", "self_")) \
        and not n.startswith("l_self_kwargs")


def fused_kind_of(label: str) -> str | None:
    low = label.lower()
    if "einfuse" not in low:
        return None
    for sub, kind in _FUSED_OPS:
        if sub in low:
            return kind
    return "fused"


def _short_label(func: str) -> str:
    if "einfuse" in func:
        # einfuse_runtime_ops_rmsnorm_rms_norm / torch.ops.einfuse.rms_norm.default -> einfuse::rms_norm
        tail = func.split("einfuse", 1)[1].strip("._")
        tail = re.sub(r"\.default$", "", tail)
        tail = re.sub(r"^runtime_ops_[a-z0-9]+?_", "", tail) if tail.startswith("runtime_ops_") else tail
        for known in ("linear_cross_entropy", "sparse_glu_mlp", "glu_mlp_observe", "glu_mlp", "rms_norm", "rope",
                      "attention", "glu", "quantized_linear"):
            if tail.endswith(known):
                tail = known
                break
        return "einfuse::" + tail.split(".")[-1]
    s = func.split(".")[-1]
    return s


_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**",
           ast.MatMult: "@", ast.Mod: "%", ast.BitAnd: "&", ast.BitOr: "|"}


def _expr_label(v: ast.expr) -> str:
    if isinstance(v, ast.Call):
        f = v.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id not in (
                "torch", "operator", "math", "builtins", "einfuse"):
            return "." + f.attr                  # a method call on a value
        return _short_label(ast.unparse(f))
    if isinstance(v, ast.BinOp):
        return _BINOPS.get(type(v.op), type(v.op).__name__)
    if isinstance(v, ast.UnaryOp):
        return {ast.USub: "neg", ast.Not: "not", ast.Invert: "~"}.get(type(v.op), type(v.op).__name__)
    if isinstance(v, ast.Compare):
        return "compare"
    if isinstance(v, ast.Subscript):
        return "getitem"
    if isinstance(v, ast.Attribute):
        return "." + v.attr
    if isinstance(v, ast.Name):
        return "alias"
    return type(v).__name__.lower()


def sketch_from_code(code: str) -> Sketch:
    """A Sketch of the graph whose FX-generated `forward` source is `code`."""
    tree = ast.parse(code.strip() if code.strip().startswith("def") else code)
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)), None)
    if fn is None:
        raise ValueError("no function definition in the graph code")
    nodes: list[GNode] = []
    known: dict[str, GNode] = {}
    alias: dict[str, str] = {}

    def add(n: GNode):
        nodes.append(n)
        known[n.name] = n

    for a in fn.args.args + fn.args.kwonlyargs:
        if a.arg == "self":
            continue
        add(GNode(a.arg, "param" if _is_param_name(a.arg) else "input", a.arg))
    if fn.args.vararg:
        add(GNode(fn.args.vararg.arg, "input", fn.args.vararg.arg))

    def refs(v: ast.AST) -> list[str]:
        out = []
        for x in ast.walk(v):
            if isinstance(x, ast.Name):
                nm = alias.get(x.id, x.id)
                if nm in known and nm not in out:
                    out.append(nm)
        return out

    for st in fn.body:
        if isinstance(st, ast.Assign):
            if isinstance(st.value, ast.Constant) and st.value.value is None:
                continue                                  # `a = b = None`: FX freeing values
            if len(st.targets) != 1:
                continue
            tgt = st.targets[0]
            if isinstance(st.value, ast.Name) and isinstance(tgt, ast.Name):
                src = alias.get(st.value.id, st.value.id)
                if src in known:                          # `l_x_ = L_x_`: the same value under a new name
                    node = known[src]
                    if node.op in ("input", "param") and node.name == st.value.id:
                        del known[node.name]              # a placeholder's FX name is the lower-case one
                        node.name = tgt.id
                        known[tgt.id] = node
                    else:
                        alias[tgt.id] = src
                    continue
            names = [t.id for t in ast.walk(tgt) if isinstance(t, ast.Name)]
            if not names:
                continue
            label = _expr_label(st.value)
            ins = refs(st.value)
            text = ast.unparse(st)
            first = GNode(names[0], "call", label, ins, text[:300], fused_kind=fused_kind_of(label))
            add(first)
            for extra in names[1:]:                       # tuple unpacking: each name is a getitem
                add(GNode(extra, "call", "getitem", [first.name], text[:300]))
        elif isinstance(st, ast.Return) and st.value is not None:
            add(GNode("output", "output", "output", refs(st.value), "return"))
        elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Call):   # a call whose result is unused
            label = _expr_label(st.value)
            add(GNode(f"_stmt{len(nodes)}", "call", label, refs(st.value), ast.unparse(st)[:300],
                      fused_kind=fused_kind_of(label)))
    sk = Sketch(nodes)
    assign_layers(sk)
    return sk


_OPERATOR_LABELS = {"add": "+", "iadd": "+", "sub": "-", "isub": "-", "mul": "*", "imul": "*", "truediv": "/",
                    "itruediv": "/", "floordiv": "//", "pow": "**", "matmul": "@", "mod": "%", "and_": "&",
                    "or_": "|", "neg": "neg", "not_": "not", "invert": "~", "getitem": "getitem",
                    "lt": "compare", "le": "compare", "gt": "compare", "ge": "compare", "eq": "compare",
                    "ne": "compare"}


def sketch_from_graph(graph: Any) -> Sketch:
    """A Sketch of an fx.Graph (layers from parameter names, as for code)."""
    nodes: list[GNode] = []
    for n in graph.nodes:
        ins = [i.name for i in n.all_input_nodes]
        if n.op == "placeholder":
            nodes.append(GNode(n.name, "param" if _is_param_name(str(n.target)) else "input", n.name))
        elif n.op == "get_attr":
            nodes.append(GNode(n.name, "param", str(n.target)))
        elif n.op == "output":
            nodes.append(GNode("output", "output", "output", ins, "return"))
        else:
            if n.op == "call_method":
                label = "." + str(n.target)
            elif n.op == "call_module":
                label = str(n.target)
            elif getattr(n.target, "__module__", None) in ("_operator", "operator"):
                label = _OPERATOR_LABELS.get(n.target.__name__, n.target.__name__)
            else:
                t = n.target
                label = _short_label(getattr(t, "__module__", "") + "." + getattr(t, "__name__", str(t))
                                     if "einfuse" in str(getattr(t, "__module__", "")) or "einfuse" in str(t)
                                     else getattr(t, "__name__", str(t)))
            nodes.append(GNode(n.name, "call", label, ins, n.format_node() or "", fused_kind=fused_kind_of(label)))
    sk = Sketch(nodes)
    assign_layers(sk)
    return sk


def assign_layers(sk: Sketch) -> None:
    """Each node's layer (see the module docstring)."""
    layer: dict[str, int | None] = {}
    outside_params: set[str] = set()
    for n in sk.nodes:
        if n.op == "param":
            n.layer = _param_layer(n.name) if _param_layer(n.label) is None else _param_layer(n.label)
            layer[n.name] = n.layer
            if n.layer is None:
                outside_params.add(n.name)
            continue
        if n.op == "input":
            layer[n.name] = None
            continue
        ls = [layer.get(i) for i in n.inputs if layer.get(i) is not None]
        cur = max(ls) if ls else None
        if cur is not None and cur != EPILOGUE and any(i in outside_params for i in n.inputs):
            cur = EPILOGUE
        n.layer = cur
        layer[n.name] = cur
    for n in sk.nodes:
        if n.op == "output":
            n.layer = EPILOGUE
    # A node computed before the layers from no parameter whose every user sits in one layer (a
    # per-layer constant, cos/sin unsqueezed for layer k, the first norm's statistics) belongs to
    # that layer; walking backwards carries this up chains of such nodes.
    users: dict[str, list[GNode]] = {}
    for n in sk.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    byname = sk.by_name()
    for n in reversed(sk.nodes):
        if n.op != "call" or n.layer is not None or not users.get(n.name):
            continue
        if any(byname[i].op == "param" for i in n.inputs if i in byname):
            continue
        ls = {u.layer for u in users[n.name]}
        if len(ls) == 1 and None not in ls and EPILOGUE not in ls:
            n.layer = ls.pop()


# ------------------------------------------------------------------------------------------------
# collapsing repeated layers

@dataclass
class Box:
    name: str
    first: int
    last: int
    like: int
    nodes: int
    fused: dict[str, int]


def layer_signature(sk: Sketch, layer: int, marks: dict[str, str] | None = None) -> tuple:
    """The layer's op sequence; with `marks` (node -> highlight), a node's mark is part of its op."""
    if marks:
        return tuple((n.label, marks.get(n.name)) for n in sk.nodes if n.op == "call" and n.layer == layer)
    return tuple(n.label for n in sk.nodes if n.op == "call" and n.layer == layer)


def collapse_plan(sk: Sketch, min_run: int = 3, marks: dict[str, str] | None = None) -> list[Box]:
    """Runs of >= min_run consecutive layers with the same op sequence: all but the first become a Box.

    marks (node name -> highlight, e.g. "swiglu fused"): a layer is like another only if the same ops
    are highlighted the same way, so a region found in one layer only (a skipped layer, a lone near
    miss) keeps its layer drawn."""
    layers = sk.layers
    sigs = {l: layer_signature(sk, l, marks) for l in layers}
    boxes: list[Box] = []
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1 and sigs[layers[j + 1]] == sigs[layers[i]]:
            j += 1
        if j - i + 1 >= min_run:
            first, last = layers[i + 1], layers[j]
            fused: dict[str, int] = {}
            for n in sk.nodes:
                if n.fused_kind and n.layer is not None and first <= n.layer <= last:
                    fused[n.fused_kind] = fused.get(n.fused_kind, 0) + 1
            boxes.append(Box(f"collapsed_{first}_{last}", first, last, layers[i],
                             len(sigs[layers[i]]), fused))
        i = j + 1
    return boxes


# ------------------------------------------------------------------------------------------------
# dot

def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(**kw: Any) -> str:
    return "[" + ", ".join(f"{k}={_q(str(v))}" for k, v in kw.items() if v is not None) + "]"


@dataclass
class Highlight:
    """A region to outline: its nodes, its kind, whether it was fused, and a caption."""
    nodes: list[str]
    kind: str
    fused: bool
    caption: str
    tooltip: str = ""


def to_dot(sk: Sketch, highlights: Iterable[Highlight] = (), title: str = "", collapse: bool = True,
           show_params: bool = False) -> str:
    """The dot source of a sketch: repeated layers collapsed, regions in clusters, fused ops coloured."""
    highlights = list(highlights)
    marks = {m: f"{h.kind} {h.fused}" for h in highlights for m in h.nodes}
    boxes = collapse_plan(sk, marks=marks) if collapse else []
    box_of: dict[str, str] = {}
    for n in sk.nodes:
        for b in boxes:
            if n.layer is not None and b.first <= n.layer <= b.last and n.op != "output":
                box_of[n.name] = b.name
    byname = sk.by_name()
    drawn = [n for n in sk.nodes if n.name not in box_of and (show_params or n.op != "param")]
    drawn_names = {n.name for n in drawn}

    lines = ["digraph G {",
             '  graph [rankdir=TB, nodesep=0.12, ranksep=0.22, fontname="Helvetica", fontsize=11, '
             'newrank=true, bgcolor="white"' + (f", label={_q(title)}, labelloc=t" if title else "") + "];",
             '  node [shape=box, style="rounded,filled", fillcolor="#f6f6f6", color="#9a9a9a", '
             'fontname="Helvetica", fontsize=9, height=0.22, margin="0.06,0.02"];',
             '  edge [color="#8a8a8a", arrowsize=0.5];']

    def node_line(n: GNode, extra: dict | None = None) -> str:
        kw: dict[str, Any] = {"label": n.label, "tooltip": (n.text or n.name)[:300], "id": f"n_{n.name}"}
        if n.op == "input":
            kw.update(shape="ellipse", fillcolor="#ffffff", color="#333333")
        elif n.op == "output":
            kw.update(shape="ellipse", fillcolor="#ffffff", color="#333333")
        elif n.op == "param":
            kw.update(shape="note", fillcolor="#ffffff", fontsize=7)
        elif n.fused_kind:
            strong = KIND_COLORS.get(n.fused_kind, ("#444444", "#dddddd"))[0]
            kw.update(fillcolor=strong, fontcolor="white", color=strong, penwidth=2, fontsize=10,
                      style="filled,bold")
        elif n.label.lstrip(".") in _VIEWISH:
            kw.update(fontsize=7, fillcolor="#fbfbfb", color="#c8c8c8", fontcolor="#777777")
        if extra:
            kw.update(extra)
        return f"  {_q(n.name)} {_attrs(**kw)};"

    in_cluster: set[str] = set()
    for ci, h in enumerate(highlights):
        members = [m for m in h.nodes if m in drawn_names and m not in in_cluster]
        if not members:
            continue
        strong, light = KIND_COLORS.get(h.kind, ("#444444", "#eeeeee"))
        if h.fused:
            lines.append(f"  subgraph cluster_r{ci} {{ "
                         + f'label={_q(h.caption)}; tooltip={_q(h.tooltip or h.caption)}; style="rounded,filled"; '
                         + f'fillcolor={_q(light)}; color={_q(strong)}; penwidth=2; fontsize=9; fontcolor={_q(strong)};')
            for m in members:
                lines.append(node_line(byname[m], {"fillcolor": "#ffffff"}))
        else:
            lines.append(f"  subgraph cluster_r{ci} {{ "
                         + f'label={_q(h.caption)}; tooltip={_q(h.tooltip or h.caption)}; style="dashed,rounded"; '
                         + f'color={_q(REJECTED_COLOR)}; penwidth=2; fontsize=9; fontcolor={_q(REJECTED_COLOR)};')
            for m in members:
                lines.append(node_line(byname[m]))
        lines.append("  }")
        in_cluster.update(members)
    for n in drawn:
        if n.name not in in_cluster:
            lines.append(node_line(n))
    for b in boxes:
        fused = ", ".join(f"{v} {k}" for k, v in sorted(b.fused.items()))
        label = (f"layers {b.first}-{b.last}  ({b.last - b.first + 1} x)\n"
                 f"each the same {b.nodes} ops as layer {b.like}"
                 + (f"\nfused ops in them: {fused}" if fused else ""))
        lines.append(f"  {_q(b.name)} " + _attrs(label=label, shape="box3d", style="filled", fillcolor="#fff8dc",
                                                 color="#b8860b", fontsize=10, id=f"n_{b.name}",
                                                 tooltip=f"collapsed: layers {b.first} to {b.last}"))
    edges: set[tuple[str, str]] = set()
    for n in sk.nodes:
        dst = box_of.get(n.name, n.name)
        if dst not in drawn_names and dst not in {b.name for b in boxes}:
            continue
        for i in n.inputs:
            src = box_of.get(i, i)
            if src == dst or (src not in drawn_names and src not in {b.name for b in boxes}):
                continue
            edges.add((src, dst))
    order = {n.name: k for k, n in enumerate(sk.nodes)}
    for b in boxes:
        order[b.name] = min(order[n] for n, bn in box_of.items() if bn == b.name)
    for src, dst in sorted(edges, key=lambda e: (order.get(e[1], 0), order.get(e[0], 0))):
        lines.append(f"  {_q(src)} -> {_q(dst)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# rendering

def have_dot() -> bool:
    return shutil.which("dot") is not None


class GraphvizMissing(RuntimeError):
    pass


def render_svg(dot_source: str, timeout: float = 120.0) -> str:
    """SVG text of a dot graph (graphviz's `dot`); the XML prologue and DOCTYPE are dropped for inlining."""
    if not have_dot():
        raise GraphvizMissing("graphviz's `dot` is not on PATH (apt-get install graphviz)")
    try:
        import graphviz  # type: ignore[import-not-found]
        svg = graphviz.Source(dot_source).pipe(format="svg").decode("utf-8")
    except ImportError:
        p = subprocess.run(["dot", "-Tsvg"], input=dot_source.encode("utf-8"), capture_output=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"dot failed: {p.stderr.decode('utf-8', 'replace').strip()[:500]}")
        svg = p.stdout.decode("utf-8")
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def graph_svg(code_or_graph: Any, highlights: Iterable[Highlight] = (), title: str = "",
              collapse: bool = True) -> str:
    sk = sketch_from_code(code_or_graph) if isinstance(code_or_graph, str) else sketch_from_graph(code_or_graph)
    return render_svg(to_dot(sk, highlights, title=title, collapse=collapse))


def escape(s: str) -> str:
    return html.escape(s, quote=True)
