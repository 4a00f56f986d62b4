"""Every script in examples/ runs (on tiny settings) and does what it says."""

import math
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


FUSED = {"attention": 2, "rmsnorm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1}


def test_plain_training_loop_trains_through_the_fused_ops():
    import train_hf_loop
    out = train_hf_loop.main(["--steps", "4", "--seq", "32", "--lr", "1e-2"])
    assert out["fusions"] == FUSED
    losses = out["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses         # it learns
    for op in ("attention", "attention_backward", "rope", "swiglu", "linear_cross_entropy"):
        assert out["calls"].get(op, 0) > 0, (op, out["calls"])
    assert out["calls"]["linear_cross_entropy"] == 4    # one fused loss per step


def test_hugging_face_trainer_trains_through_the_fused_ops():
    import train_hf_trainer
    out = train_hf_trainer.main(["--steps", "3", "--seq", "32"])
    assert out["fusions"] == FUSED
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"])
    assert out["calls"]["linear_cross_entropy"] == 3 and out["calls"]["attention_backward"] > 0, out["calls"]


def test_generate_gives_eager_tokens_through_the_fused_ops():
    import generate_hf
    out = generate_hf.main(["--tokens", "6"])
    assert out["same"] and out["tokens"].shape[1] == len(b"ROMEO:") + 6
    assert out["calls"].get("attention", 0) > 0 and out["calls"].get("rope", 0) > 0, out["calls"]


def test_quantized_example_on_a_tiny_stand_in():
    import quantized_smollm2
    out = quantized_smollm2.main(["--tiny", "--tokens", "2"])
    assert out["quantized"] >= 14                       # 2 layers x 7 projections (the lm_head stays fp)
    assert out["calls"].get("quantized_linear", 0) > 0, out["calls"]
    assert out["q_bytes"] < out["fp_bytes"]
    assert abs(out["q_loss"] - out["fp_loss"]) < 0.02 * out["fp_loss"], out


def test_quantized_example_skips_cleanly_without_the_weights(monkeypatch, capsys):
    import quantized_smollm2
    import einfuse.models.smollm2 as smollm2
    monkeypatch.setattr(smollm2, "smollm2_path", lambda: None)
    assert quantized_smollm2.main([]) is None
    assert "not cached: skipping" in capsys.readouterr().out
