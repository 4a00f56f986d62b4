"""The hand-written model in examples/ spells every fusion differently from Hugging Face."""

import sys
from pathlib import Path

import torch

import einfuse
from einfuse.runtime import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from handwritten_llama import HandwrittenLlama  # noqa: E402


def test_handwritten_llama_gets_the_same_fusions_as_hugging_face():
    torch.manual_seed(0)
    model = HandwrittenLlama(layers=2)
    tokens = torch.randint(0, 128, (2, 24))
    report = einfuse.inspect(model, tokens, tokens)
    assert report.fusions == {"attention": 2, "rmsnorm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1}
    assert not report.unfused
    torch._dynamo.reset()
    ref = model(tokens, tokens)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with counters.counting() as calls:
        loss = einfuse.optimize(model)(tokens, tokens)
        loss.backward()
    assert all(calls[k] > 0 for k in report.fusions), dict(calls)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)
