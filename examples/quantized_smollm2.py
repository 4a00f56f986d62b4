"""A quantized SmolLM2-135M: `einfuse.optimize(model, quantize="int8")`, then generate and score text.

Quantization replaces the model's linear layers in place by int8 ones (weights as codes plus per-channel
scales, the fp weights freed); the fusion passes then run on graphs whose projections are
`einfuse::quantized_linear` calls. The script compares the loss per token on a text snippet before and
after quantizing, and greedy-decodes a continuation.

It needs SmolLM2's weights in einfuse's cache (einfuse.models.smollm2.fetch_smollm2()); without them it
says so and exits cleanly. `--tiny` runs the same steps on a small random-weight Llama instead (what the
test suite does).

    python examples/quantized_smollm2.py --text ../shared/data/tinyshakespeare.txt
    python examples/quantized_smollm2.py --tiny
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import einfuse
from einfuse.runtime import counters

SNIPPET = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
           "First Citizen:\nYou are all resolved rather to die than to famish?\n")


def load(tiny: bool):
    """(model, encode, decode): SmolLM2 with its tokenizer, or a tiny random Llama on bytes."""
    if tiny:
        from train_hf_loop import tiny_llama
        return (tiny_llama(2).eval(), lambda s: torch.tensor([list(s.encode("utf-8"))]),
                lambda ids: bytes(ids).decode("utf-8", "replace"))
    from einfuse.models.smollm2 import load_smollm2, smollm2_path
    if smollm2_path() is None:
        return None
    model, tok = load_smollm2(fetch=False)
    return model, (lambda s: tok(s, return_tensors="pt").input_ids), (lambda ids: tok.decode(ids))


def loss_per_token(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a small random-weight stand-in (no weights needed)")
    p.add_argument("--scheme", default="int8", help="int8, int4, int6, llm_int8 or w8a8")
    p.add_argument("--text", help="score the first 2,000 characters of this file (default: a short snippet)")
    p.add_argument("--tokens", type=int, default=20, help="tokens to generate")
    a = p.parse_args(argv)

    got = load(a.tiny)
    if got is None:
        print("SmolLM2's weights are not cached: skipping (fetch them with "
              "python -c 'from einfuse.models.smollm2 import fetch_smollm2; fetch_smollm2()', or use --tiny)")
        return None
    model, encode, decode = got
    text = Path(a.text).read_text()[:2000] if a.text else SNIPPET
    ids = encode(text)
    fp_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    fp_model = copy.deepcopy(model)                     # quantization is in place: keep an fp copy to compare
    fp_loss = loss_per_token(fp_model, ids)

    t0 = time.perf_counter()
    fast = einfuse.optimize(model, quantize=a.scheme)  # the linear layers are now int8
    with counters.counting() as calls:
        q_loss = loss_per_token(fast, ids)
        prompt = ids[:, :8]
        with torch.no_grad():
            out = fast.generate(prompt, max_new_tokens=a.tokens, do_sample=False, pad_token_id=0)
    q_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    report = fast.einfuse_report
    quantized = sum(1 for r in report.regions if r.kind == "quantize" and r.fused)
    print(f"{a.scheme}: {quantized} linear layers quantized; parameters+buffers {fp_bytes / 1e6:.1f} MB -> "
          f"{q_bytes / 1e6:.1f} MB")
    print(f"loss per token on {ids.shape[1]} tokens: fp32 {fp_loss:.4f}  {a.scheme} {q_loss:.4f} "
          f"({time.perf_counter() - t0:.1f} s incl. compilation)")
    print("fusions:", report.fusions)
    print("fused-op calls:", dict(calls))
    print("greedy continuation:", repr(decode(out[0, prompt.shape[1]:].tolist())))
    return {"fp_loss": fp_loss, "q_loss": q_loss, "quantized": quantized, "calls": dict(calls),
            "fp_bytes": fp_bytes, "q_bytes": q_bytes, "fusions": report.fusions}


if __name__ == "__main__":
    main()
