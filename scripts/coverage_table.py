"""Generate the README's "supported patterns x architectures" table from the test matrix.

Every model the end-to-end tests build (tests/hf_models.py: tiny random-weight Hugging Face models, eager
and sdpa attention; the hand-written Llama in examples/; einfuse's built-in TinyLlama) runs one training
step through `einfuse.optimize` and through eager and an fp64 copy. A cell is the number of regions of
that kind the Report says were fused, and only counts when the fused op was called
(`einfuse.runtime.counters`) and the outputs and every gradient pass the numerics rule (error vs fp64 no
larger than eager's + 1e-5). Candidates left unfused are listed with their reasons.

    python scripts/coverage_table.py                 # markdown on stdout
    python scripts/coverage_table.py -o docs/coverage.md --json docs/coverage.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples"), str(ROOT)]

import torch  # noqa: E402

import einfuse  # noqa: E402
from einfuse.report import FUSION_KINDS  # noqa: E402
from einfuse.runtime import counters  # noqa: E402

# fusion kind -> the counter names its fused op(s) bump
OPS = {"attention": ("attention",), "rmsnorm": ("rmsnorm", "rmsnorm_residual"), "swiglu": ("swiglu", "glu"),
       "rope": ("rope",), "linear_cross_entropy": ("linear_cross_entropy",)}
HF_ARCHS = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "bert")
NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma", "phi3": "Phi-3",
         "gpt2": "GPT-2", "bert": "BERT (encoder)"}


class Hidden(torch.nn.Module):
    """An encoder whose output object the numerics check cannot read: return its tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        out = self.model(**kw)
        return out.last_hidden_state, out.pooler_output


def cases():
    """(row label, build() -> (model, args, kwargs))."""
    from hf_models import build, inputs

    def hf(arch, attn):
        model = build(arch, attn)
        return (Hidden(model) if arch == "bert" else model), (), inputs(arch)
    for arch in HF_ARCHS:
        for attn in ("eager", "sdpa"):
            yield (f"{NAMES[arch]} ({attn})", lambda arch=arch, attn=attn: hf(arch, attn))

    def handwritten():
        from handwritten_llama import HandwrittenLlama
        torch.manual_seed(0)
        ids = torch.randint(0, 128, (2, 12))
        return HandwrittenLlama(layers=2), (ids, ids), {}
    yield ("hand-written Llama (examples/)", handwritten)

    def tiny():
        from einfuse.models import TinyLlama
        torch.manual_seed(0)
        m = TinyLlama()
        ids = torch.randint(0, m.config.vocab_size, (2, 12))
        return m, (ids,), {"labels": ids}
    yield ("einfuse TinyLlama (built-in)", tiny)


def check_against_fp64(model, args, kwargs, optimized) -> None:
    """The numerics rule (tests/hf_models.py) on the outputs and every gradient; a gradient that is
    structurally zero in fp64 (BERT's key bias: softmax is shift-invariant) is compared relative to the
    largest gradient instead of itself, as tests/test_models_e2e.py does."""
    import copy
    from hf_models import TOL, _ref_args, _run, rel_err
    tol = TOL[torch.float32]
    ref = _run(copy.deepcopy(model).double(), _ref_args(args), kwargs)
    eager = _run(model, args, kwargs)
    got = _run(optimized, args, kwargs)
    for i, (o, e, r) in enumerate(zip(got[0], eager[0], ref[0])):
        assert rel_err(o, r) <= rel_err(e, r) + tol, f"output {i}: {rel_err(o, r):.2e} vs eager {rel_err(e, r):.2e}"
    assert set(got[1]) == set(ref[1]) and got[1], "gradients missing"
    scale = max(float(g.double().norm()) for g in ref[1].values())
    for n, r in ref[1].items():
        if float(r.double().norm()) < 1e-6 * scale:
            ef = float((got[1][n].double() - r).norm()) / scale
            ee = float((eager[1][n].double() - r).norm()) / scale
        else:
            ef, ee = rel_err(got[1][n], r), rel_err(eager[1][n], r)
        assert ef <= ee + tol, f"grad {n}: {ef:.2e} vs eager {ee:.2e}"


def run_case(label: str, make) -> dict:
    torch._dynamo.reset()
    model, args, kwargs = make()
    row = {"model": label, "fused": {}, "ran": {}, "unfused": [], "numerics": "ok", "error": ""}
    fast = einfuse.optimize(model)
    try:
        with counters.counting() as calls:
            check_against_fp64(model, args, kwargs, optimized=fast)
    except AssertionError as e:
        row["numerics"] = f"FAILED: {str(e).splitlines()[0] if str(e) else 'assertion'}"
    except Exception as e:  # noqa: BLE001 - one model failing is a row, not the end of the table
        row["numerics"] = "error"
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    report = fast.einfuse_report
    row["fused"] = {k: report.fusions.get(k, 0) for k in FUSION_KINDS}
    row["ran"] = {k: sum(calls.get(op, 0) for op in OPS[k]) for k in FUSION_KINDS}
    row["unfused"] = [{"kind": r.kind, "reason": r.reason} for r in report.unfused]
    return row


def cell(row: dict, kind: str) -> str:
    n = row["fused"].get(kind, 0)
    if not n:
        return "—"
    if not row["ran"].get(kind):
        return f"{n} (op not called!)"
    return f"✓ {n}"


def markdown(rows: list[dict], seconds: float) -> str:
    head = "| model | " + " | ".join(f"`{k}`" for k in FUSION_KINDS) + " | fp64 check | left unfused (reason) |"
    lines = [head, "|" + "---|" * (len(FUSION_KINDS) + 3)]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['model']} | " + " | ".join("?" for _ in FUSION_KINDS) + f" | error | {r['error']} |")
            continue
        reasons: dict[str, int] = {}
        for u in r["unfused"]:
            key = f"{u['kind']}: {u['reason']}"
            reasons[key] = reasons.get(key, 0) + 1
        why = "; ".join(f"{k}" + (f" (×{n})" if n > 1 else "") for k, n in reasons.items()) or ""
        why = why.replace("|", "\\|")
        lines.append(f"| {r['model']} | " + " | ".join(cell(r, k) for k in FUSION_KINDS)
                     + f" | {r['numerics']} | {why} |")
    lines += ["", f"Generated by `python scripts/coverage_table.py` ({len(rows)} models, {seconds:.0f} s, "
              f"torch {torch.__version__}). A cell is the number of regions of that kind fused in one training "
              "step (✓: the fused op was called); the fp64 check applies the numerics rule to the outputs and "
              "every gradient."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", help="write the markdown table here (default: stdout)")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--only", nargs="*", help="row labels containing any of these words")
    a = p.parse_args(argv)
    rows = []
    t0 = time.perf_counter()
    for label, make in cases():
        if a.only and not any(w.lower() in label.lower() for w in a.only):
            continue
        print(f"[coverage] {label} ...", file=sys.stderr, flush=True)
        rows.append(run_case(label, make))
    text = markdown(rows, time.perf_counter() - t0)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text)
        print(f"wrote {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    bad = [r["model"] for r in rows if r["numerics"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
