"""The command line: the demo (the README's main job) and inspect."""

import json
import subprocess
import sys

from einfuse.cli import main


def test_demo_succeeds_and_fuses(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "OK: optimized outputs and all" in out
    assert "attention=2, rmsnorm=5, swiglu=2, rope=2, linear_cross_entropy=1" in out


def test_inspect_builtin_json(tmp_path):
    path = tmp_path / "r.json"
    assert main(["inspect", "tiny-llama", "--format", "json", "-o", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["fusions"]["rmsnorm"] == 5 and data["graphs"] == 1


def test_errors_are_one_line_without_debug():
    p = subprocess.run([sys.executable, "-m", "einfuse", "inspect", "no.such.module:f"],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("einfuse: error: ModuleNotFoundError")
    assert "Traceback" not in p.stderr
