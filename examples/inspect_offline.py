"""Offline inspection: what einfuse would fuse in a model, and why not elsewhere, without training it.

`einfuse.inspect(model, *example_inputs)` captures the model once, runs the pass pipeline and returns
the Report: fused regions with their einsum cascades, candidates left unfused with the reason, symbolic
costs before/after, and the Triton source generated from the cascades. This script writes it as
Markdown, JSON and the HTML report with graph pictures (the last needs graphviz's `dot`).

    python examples/inspect_offline.py --out reports/
    einfuse inspect examples/inspect_offline.py:make --format html -o report.html   # the same model via the CLI
    einfuse inspect examples/inspect_offline.py:make_deep --format html -o deep.html  # 30 layers, collapsed
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import einfuse
from einfuse import graph_draw


class NearMisses(nn.Module):
    """A block with one RMSNorm that fuses and two look-alikes that must not."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        good = self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))   # RMSNorm: fused
        wrong_axis = x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + 1e-6)          # over the wrong axis
        attn = F.softmax(x @ x.transpose(-1, -2), dim=-2) @ x                          # softmax over queries
        return self.proj(good) + wrong_axis + attn


def make():
    """The CLI target: (model, example_args, example_kwargs)."""
    torch.manual_seed(0)
    return NearMisses(), (torch.randn(2, 8, 32),), {}


def make_deep(layers: int = 30):
    """SmolLM2-135M's architecture (30 layers, GQA 9/3 -> here 4/2 heads) at toy widths, random weights:
    what the HTML report's layer collapsing is for. `einfuse inspect examples/inspect_offline.py:make_deep`."""
    from transformers import LlamaForCausalLM
    from einfuse.models.smollm2 import smollm2_config
    cfg = smollm2_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=layers)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (1, 16))
    return LlamaForCausalLM(cfg), (), {"input_ids": ids, "labels": ids}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="einfuse-reports", help="directory for report.md, report.json, report.html")
    a = p.parse_args(argv)

    model, args, kwargs = make()
    report = einfuse.inspect(model, *args, **kwargs)
    print("fusions:", {k: v for k, v in report.fusions.items() if v})
    for r in report.unfused:
        print("not fused:", r.summary())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report.to_markdown())
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    written = ["report.md", "report.json"]
    if graph_draw.have_dot():
        (out / "report.html").write_text(report.to_html(title="einfuse report: NearMisses"))
        written.append("report.html")
    else:
        print("graphviz's dot is not installed: report.html not written (apt-get install graphviz)")
    print(f"wrote {', '.join(written)} to {out}/")
    return {"report": report, "written": written}


if __name__ == "__main__":
    main()
