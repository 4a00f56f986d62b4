"""The HTML report: graph pictures (graphviz), layer collapsing, and loading it in a real headless browser.

Needs graphviz's `dot`, Debian's `chromium` + `chromium-driver` and the `selenium` package. `.ci/run`
installs them and sets EINFUSE_CI=1; there a missing tool FAILS these tests. Run by hand without them,
the tests skip with a reason saying what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from einfuse import graph_draw as gd
from einfuse.cli import main

IN_CI = bool(os.environ.get("EINFUSE_CI"))
INSTALL = "apt-get install -y graphviz chromium chromium-driver && pip install selenium"


def require(ok: bool, what: str) -> None:
    if ok:
        return
    msg = f"{what} is not available: install it ({INSTALL})"
    if IN_CI:
        pytest.fail(f"EINFUSE_CI is set but {msg}")
    pytest.skip(f"!!! SKIPPED: {msg} !!!")


def require_dot() -> None:
    require(gd.have_dot(), "graphviz's `dot`")


def _selenium():
    try:
        import selenium  # noqa: F401
        return True
    except ImportError:
        return False


def require_browser() -> None:
    require(shutil.which("chromium") is not None, "chromium")
    require(shutil.which("chromedriver") is not None, "chromedriver (Debian package chromium-driver)")
    require(_selenium(), "the selenium package")


@pytest.fixture(scope="module")
def tiny_html(tmp_path_factory) -> Path:
    require_dot()
    path = tmp_path_factory.mktemp("html") / "tiny.html"
    torch._dynamo.reset()
    assert main(["inspect", "tiny-llama", "--format", "html", "-o", str(path), "-q"]) == 0
    return path


def test_report_is_self_contained_with_every_section(tiny_html):
    text = tiny_html.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # nothing fetched: no scripts, no external stylesheet/image; only SVG namespaces mention http
    assert "<script" not in text
    refs = re.findall(r'(?:src|href)="([^"#][^"]*)"', text)
    assert all(r.startswith("data:") for r in refs), refs
    for anchor in ("summary", "cost", "passes", "regions", "unfused", "kernels"):
        assert f'id="{anchor}"' in text
    # the cost table with the lower bound, a cascade, pass counts, kernels
    assert "bytes moved: lower bound" in text
    assert "R0[" in text or "QK[" in text               # cascades in IR notation
    assert "passes unfused" in text
    assert "@triton.jit" in text or "import triton" in text


def test_pass_pictures_highlight_regions_and_fused_ops(tiny_html):
    text = tiny_html.read_text()
    svgs = re.findall(r"<svg.*?</svg>", text, flags=re.S)
    # five fusion passes changed the graph: a picture before and one after each
    assert len(svgs) == 10, len(svgs)
    before_attention, after_attention = svgs[0], svgs[1]
    assert "g0/attention/0 fused" in before_attention and "g0/attention/1 fused" in before_attention
    assert "einfuse::attention" not in before_attention
    assert after_attention.count(">einfuse::attention<") == 2
    after_all = svgs[-1]
    for op in ("einfuse::rms_norm", "einfuse::rope", "einfuse::glu_mlp", "einfuse::linear_cross_entropy"):
        assert op in after_all, op
    # ids are unique across the inline pictures
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert len(ids) == len(set(ids))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Linear(d, d)
        self.g = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g
        return x + torch.relu(self.w(h))


class _Deep(nn.Module):
    def __init__(self, layers=30, d=8):
        super().__init__()
        self.emb = nn.Linear(d, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.emb(x)
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


def _capture(model, *args):
    gms = []

    def backend(gm, _inputs):
        gms.append(gm)
        return gm
    torch.compile(model, backend=backend)(*args)
    assert len(gms) == 1
    return gms[0]


def _capture_code(model, *args) -> str:
    return _capture(model, *args).code


def test_thirty_layers_collapse_to_a_readable_picture():
    code = _capture_code(_Deep(), torch.randn(2, 8))
    sk = gd.sketch_from_code(code)
    assert sk.layers == list(range(30))
    sigs = {gd.layer_signature(sk, i) for i in range(1, 29)}
    assert len(sigs) == 1                     # the middle layers look alike (the first and last may differ
    boxes = gd.collapse_plan(sk)              # at the edges: the first norm's statistics, no final norm)
    assert len(boxes) == 1 and boxes[0].last >= 28 and boxes[0].first <= 2
    dot = gd.to_dot(sk)
    drawn = len(re.findall(r'^\s+"[^"]+" \[label=', dot, flags=re.M))
    calls = sum(n.op == "call" for n in sk.nodes)
    assert drawn < calls / 6, (drawn, calls)                # ~3 of 30 layers drawn
    assert f"layers {boxes[0].first}-{boxes[0].last}" in dot
    uncollapsed = gd.to_dot(sk, collapse=False)
    assert len(re.findall(r'^\s+"[^"]+" \[label=', uncollapsed, flags=re.M)) > calls
    require_dot()
    svg = gd.render_svg(dot)
    assert svg.startswith("<svg") and "layers" in svg


def test_a_layer_with_its_own_highlighted_region_is_not_collapsed():
    code = _capture_code(_Deep(), torch.randn(2, 8))
    sk = gd.sketch_from_code(code)
    in_15 = [n.name for n in sk.nodes if n.layer == 15 and n.label == "relu"]
    assert len(in_15) == 1
    hl = [gd.Highlight(in_15, "layer_skip", True, "g0/layer_skip/0 fused")]
    marks = {in_15[0]: "layer_skip True"}
    boxes = gd.collapse_plan(sk, marks=marks)
    assert [(b.first, b.last) for b in boxes] == [(2, 14), (17, boxes[-1].last)] and boxes[-1].last >= 28
    dot = gd.to_dot(sk, hl)
    assert "g0/layer_skip/0 fused" in dot and f'"{in_15[0]}" [label="relu"' in dot


def test_layers_of_a_hugging_face_style_graph_come_from_parameter_names():
    code = _capture_code(_Deep(layers=4), torch.randn(2, 8))
    sk = gd.sketch_from_code(code)
    head = [n for n in sk.nodes if n.op == "call" and n.label == "linear" and any("head" in i for i in n.inputs)]
    assert head and head[0].layer == gd.EPILOGUE
    lin = [n for n in sk.nodes if n.op == "call" and n.label == "linear"]
    assert [n.layer for n in lin[1:5]] == [0, 1, 2, 3]
    # an fx.Graph reads the same as its code
    torch._dynamo.reset()
    from_graph = gd.sketch_from_graph(_capture(_Deep(layers=4), torch.randn(2, 8)).graph)
    calls = lambda s: [(n.name, n.label, n.layer) for n in s.nodes if n.op == "call"]  # noqa: E731
    assert calls(from_graph) == calls(sk)


def test_missing_graphviz_gives_a_complete_report_without_pictures(monkeypatch):
    import einfuse
    from einfuse.report_html import to_html
    from einfuse.models import TinyLlama
    torch.manual_seed(0)
    m = TinyLlama()
    ids = torch.randint(0, 256, (1, 8))
    report = einfuse.inspect(m, ids, config=einfuse.OptimizeConfig(passes=("rmsnorm",)))
    monkeypatch.setattr(gd, "have_dot", lambda: False)
    text = to_html(report)
    assert "graphviz's <code>dot</code> is not installed" in text and "<svg" not in text
    assert "g0/rmsnorm/0" in text


def _chrome(tmpdir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmpdir}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def test_report_loads_in_headless_chromium_and_its_pictures_render(tiny_html, tmp_path):
    require_browser()
    profile = tempfile.mkdtemp(prefix="einfuse-chromium-")
    drv = _chrome(profile)
    try:
        drv.get(tiny_html.as_uri())
        assert drv.title == "einfuse report: tiny-llama"
        logs = drv.get_log("browser")
        errors = [e for e in logs if e.get("level") in ("SEVERE", "ERROR")]
        assert not errors, errors
        boxes = drv.execute_script(
            "return Array.from(document.querySelectorAll('svg')).map(s => {"
            "  const r = s.getBoundingClientRect();"
            "  const n = s.querySelector('g.node'); const nr = n ? n.getBoundingClientRect() : null;"
            "  return {w: r.width, h: r.height, nodes: s.querySelectorAll('g.node').length,"
            "          nw: nr ? nr.width : 0, nh: nr ? nr.height : 0}; })")
        assert len(boxes) == 10
        for b in boxes:
            assert b["w"] > 100 and b["h"] > 100 and b["nodes"] > 20 and b["nw"] > 0 and b["nh"] > 0, b
        # the first picture is painted where it lies: the element at a node's centre belongs to that SVG
        hit = drv.execute_script(
            "const s = document.querySelector('svg');"
            "const n = s.querySelector('g.node polygon, g.node path, g.node ellipse');"
            "n.scrollIntoView({block: 'center', inline: 'center'});"
            "const r = n.getBoundingClientRect();"
            "const e = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);"
            "return e !== null && s.contains(e);")
        assert hit
        shot = tmp_path / "report.png"
        drv.execute_script("document.getElementById('passes').scrollIntoView()")
        assert drv.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000   # a blank page compresses to a few KB
        assert not [e for e in drv.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_a_missing_tool_fails_in_ci_and_skips_by_hand(monkeypatch):
    import sys
    mod = sys.modules[__name__]
    monkeypatch.setattr(mod, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="EINFUSE_CI is set but chromium is not available"):
        require(False, "chromium")
    monkeypatch.setattr(mod, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="SKIPPED: chromium is not available"):
        require(False, "chromium")
