"""The command line: the demo (the README's main job), inspect with its options and formats, errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from einfuse.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_succeeds_and_fuses(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "OK: optimized outputs and all" in out
    assert "attention=2, rmsnorm=5, swiglu=2, rope=2, linear_cross_entropy=1" in out


def test_inspect_builtin_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["inspect", "tiny-llama", "--format", "json", "-o", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["fusions"]["rmsnorm"] == 5 and data["graphs"] == 1
    assert data["target"] == "tiny-llama" and data["options"] == {}
    assert [p["name"] for p in data["passes"]][:5] == ["attention", "rope", "rmsnorm", "swiglu",
                                                       "linear_cross_entropy"]
    assert data["cost"]["after"]["bytes_moved"]["value"] < data["cost"]["before"]["bytes_moved"]["value"]
    assert "bytes_lower_bound" in data["cost"]["after"]
    assert set(data["kernels"]) >= {"rmsnorm", "attention"}
    err = capsys.readouterr().err
    assert "capturing the graph(s) and running the passes" in err      # progress goes to stderr


def test_inspect_markdown_to_stdout(capsys):
    assert main(["inspect", "tiny-llama", "--passes", "rmsnorm", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# einfuse report")
    assert "| rmsnorm | 5 |" in captured.out and "| attention | 0 |" in captured.out
    assert captured.err == ""                                        # -q: no progress


def test_inspect_a_module_callable_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        def make():
            w = torch.nn.Parameter(torch.ones(16))
            class Norm(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.w = w
                def forward(self, x):
                    return self.w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            return Norm(), (torch.randn(3, 16),), {}
        def bad():
            return 42
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "r.json"
    assert main(["inspect", "my_models:make", "--format", "json", "-o", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["fusions"]["rmsnorm"] == 1
    assert main(["inspect", "my_models:bad", "-q"]) == 1


def test_inspect_the_offline_example_by_file_path_lists_near_misses(tmp_path):
    out = tmp_path / "r.json"
    assert main(["inspect", str(ROOT / "examples" / "inspect_offline.py") + ":make", "--format", "json",
                 "-o", str(out), "-q"]) == 0
    data = json.loads(out.read_text())
    assert data["fusions"]["rmsnorm"] == 1
    reasons = {u["kind"]: u["reason"] for u in data["unfused"]}
    assert "not the key axis" in reasons["attention"]
    assert "rmsnorm" in reasons


def test_offline_inspection_example_writes_its_reports(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import inspect_offline
    finally:
        sys.path.remove(str(ROOT / "examples"))
    out = inspect_offline.main(["--out", str(tmp_path)])
    assert out["report"].fusions["rmsnorm"] == 1 and len(out["report"].unfused) == 2
    assert (tmp_path / "report.md").read_text().startswith("# einfuse report")
    assert json.loads((tmp_path / "report.json").read_text())["fusions"]["rmsnorm"] == 1
    if "report.html" in out["written"]:
        assert "rejected" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("opts, kind, n", [
    (["--layers", "4", "--layer-skip", "0.34"], "layer_skip", 1),
    (["--quantize", "int8"], "quantize", 14),
    (["--sparsity", "moc", "--sparsity-target", "0.5"], "sparsity", 2),
])
def test_inspect_options_reach_the_passes(tmp_path, opts, kind, n):
    out = tmp_path / "r.json"
    assert main(["inspect", "tiny-llama", *opts, "--format", "json", "-o", str(out), "-q"]) == 0
    data = json.loads(out.read_text())
    assert data["fusions"][kind] == n, data["fusions"]
    assert data["fusions"]["attention"] == (4 if "--layers" in opts else 2)


def test_errors_are_one_line_without_debug():
    # also: `python -m einfuse` works
    p = subprocess.run([sys.executable, "-m", "einfuse", "inspect", "no.such.module:f"],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("einfuse: error: ModuleNotFoundError")
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_bad_options_and_targets_are_one_line(capsys):
    assert main(["inspect", "tiny-llama", "--quantize", "int3", "-q"]) == 1
    assert main(["inspect", "no-such-builtin", "-q"]) == 1
    assert main(["inspect", "tiny-llama", "--passes", "nope", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("einfuse: error: ") for line in err), err
    assert "unknown quantization scheme 'int3'" in err[0]
    assert "unknown built-in target 'no-such-builtin'" in err[1]
    assert "unknown pass 'nope'" in err[2]


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="unknown pass"):
        main(["inspect", "tiny-llama", "--passes", "nope", "--debug"])
    with pytest.raises(ValueError, match="unknown pass"):
        main(["--debug", "inspect", "tiny-llama", "--passes", "nope"])


def test_passes_listing_and_help(capsys):
    assert main(["passes"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "attention", "rope", "rmsnorm", "swiglu", "linear_cross_entropy", "layer_skip", "sparsity"]
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--format {md,html,json}" in out and "--quantize" in out and "--sparsity" in out


def test_debug_logging_shows_each_pass_match_and_rejection():
    """EINFUSE_LOG=debug sets this logger to DEBUG; the records are what it prints."""
    import logging
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logger = logging.getLogger("einfuse")
    handler, old = Keep(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        assert main(["inspect", str(ROOT / "examples" / "inspect_offline.py") + ":make", "-q", "-o", os.devnull]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    for name in ("attention", "rope", "rmsnorm", "swiglu", "linear_cross_entropy", "layer_skip", "sparsity"):
        assert any(f"pass {name} fused" in r for r in records), name
    assert "pass rmsnorm: fused g0/rmsnorm/0 at rsqrt" in records
    assert any(r.startswith("pass attention: rejected candidate at softmax: softmax over dim -2") for r in records)
    assert any(r.startswith("pass rmsnorm: rejected candidate at rsqrt_1: ") for r in records)
