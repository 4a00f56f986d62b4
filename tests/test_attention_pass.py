"""The attention pass: softmax attention and SDPA calls -> einfuse::attention.

Tiny random-weight Hugging Face models (Llama, Mistral with a sliding window, Qwen2, GPT-2,
BERT), each with attn_implementation "eager" and "sdpa": `inspect` finds one attention per
layer; `optimize` matches eager -- outputs, loss and every parameter gradient -- under the
numerics rule (fp64-referenced relative error: fused <= eager + 1e-5 in fp32, + 1e-2 in
bf16), and the call counters show the fused op ran. Hand-written attention covers
masked_fill(~causal, -inf) with division by sqrt(d), where() with finfo.min, soft-capping,
repeat_interleave GQA, 3-D operands and direct SDPA calls; dropout in training and the near
misses (softmax over the wrong dim, a mask broadcast on the wrong axis, probabilities used
elsewhere) are left unfused with their reasons in `report.unfused`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import einfuse
from einfuse.runtime import counters

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LAYERS = 2
SEQ = 9          # longer than Mistral's window of 4, so the window matters
HEAD = 8         # hidden 32 / 4 heads
GQA = {"llama": 2, "mistral": 2, "qwen2": 2, "gpt2": 1, "bert": 1}
PASSES = {"3-pass": 3, "2-pass": 2, "1-pass": 1}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor), in fp64."""
    out, ref = out.detach().double(), ref.detach().double()
    den = max(float(ref.norm()), floor)
    return float((out - ref).norm()) / den if den > 0 else float((out - ref).norm())


# ---------------------------------------------------------------------------------------------
# models and the comparison

def build(arch: str, attn: str, dtype=torch.float32) -> nn.Module:
    import transformers as tf
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(sliding_window=4, **common), tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cls = tf.GPT2LMHeadModel
    elif arch == "bert":
        cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64,
                            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        cls = tf.BertModel
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn
    model = cls(cfg).to(dtype)
    if arch == "gpt2":
        model.loss_type = "ForCausalLM"  # GPT-2 names none: HF's warning about it is a graph break
    return model


def hf_inputs(arch: str, left_pad: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :3] = 0   # causal + left padding: the first queries of row 1 see no key at all
    else:
        mask[1, -3:] = 0  # right padding (HF's fp64 eager path turns fully masked rows into NaN)
    kw = {"input_ids": ids, "attention_mask": mask}
    if arch != "bert":
        kw["labels"] = ids.masked_fill(mask == 0, -100)
    return kw


def run(model, *args, **kw):
    """(main output, secondary output, {param: grad}) after one forward and backward."""
    model.zero_grad(set_to_none=True)
    out = model(*args, **kw)
    if isinstance(out, torch.Tensor):
        main, second = out, out
    else:
        main = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state
        second = out.logits if hasattr(out, "logits") else out.last_hidden_state
    # a fixed random projection: BERT's LayerNorm-ed output has a near-constant mean square,
    # whose gradients would be rounding noise
    probe = torch.randn(main.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scalar = main if main.dim() == 0 else (main * probe.to(main.dtype)).sum()
    scalar.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return main.detach(), second.detach(), grads


def check(got, eager, ref, tol):
    """The numerics rule on outputs and every gradient.

    A gradient that is zero in exact arithmetic (a key bias without RoPE: it shifts every
    score of a row equally, and softmax ignores that) is rounding noise even in fp64 (~1e-28
    here), so a relative error means nothing; such a gradient's error is measured relative to
    the largest gradient's norm instead.
    """
    for i, what in ((0, "output/loss"), (1, "logits")):
        e_f, e_e = rel_err(got[i], ref[i]), rel_err(eager[i], ref[i])
        assert math.isfinite(e_f) and e_f <= e_e + tol, f"{what}: fused {e_f:.3e} > eager {e_e:.3e} + {tol}"
    assert set(got[2]) == set(ref[2]) and ref[2]
    scale = max(float(g.double().norm()) for g in ref[2].values())
    for n, r in ref[2].items():
        floor = scale if float(r.double().norm()) < 1e-9 * scale else 0.0
        e_f, e_e = rel_err(got[2][n], r, floor), rel_err(eager[2][n], r, floor)
        assert math.isfinite(e_f) and e_f <= e_e + tol, f"grad {n}: fused {e_f:.3e} > eager {e_e:.3e} + {tol}"


def compare(model, args=(), kw=None, dtype=torch.float32, expect_calls=1, passes=("attention",)):
    kw = kw or {}
    f64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    ref = run(copy.deepcopy(model).double(), *map(f64, args), **{k: f64(v) for k, v in kw.items()})
    eager = run(model, *args, **kw)
    fast = einfuse.optimize(model, passes=passes)
    with counters.counting() as calls:
        got = run(fast, *args, **kw)
    assert calls["attention"] == expect_calls and calls["attention_backward"] == expect_calls, dict(calls)
    check(got, eager, ref, TOL[dtype])
    return fast.einfuse_report


def attention_regions(report, fused=True):
    return [r for r in report.regions if r.kind == "attention" and r.fused == fused]


# ---------------------------------------------------------------------------------------------
# Hugging Face models

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_hf_model_attention_is_fused_and_matches_eager(arch, attn):
    model = build(arch, attn)
    kw = hf_inputs(arch)
    report = einfuse.inspect(model, **kw)
    assert report.fusions["attention"] == LAYERS
    assert not attention_regions(report, fused=False), [r.summary() for r in report.unfused]
    for r in attention_regions(report):
        b = r.bindings
        assert b["source"] == attn and b["gqa_group"] == GQA[arch] and b["softcap"] == 0.0
        assert b["scale"] == pytest.approx(HEAD ** -0.5, rel=1e-12)
        assert b["mask"] == ("additive" if attn == "eager" else "bool")   # HF's 4-D float mask / bool mask
        assert b["passes_per_rank"] == PASSES and set(r.cascades) == set(PASSES)
    compare(model, kw=kw, expect_calls=LAYERS)


def test_sdpa_fully_masked_rows_follow_sdpa():
    # left padding + causal: rows with no key at all; SDPA gives them zeros, so must the fused op
    model = build("llama", "sdpa")
    compare(model, kw=hf_inputs("llama", left_pad=True), expect_calls=LAYERS)


def test_bf16_llama_eager():
    model = build("llama", "eager", dtype=torch.bfloat16)
    report = compare(model, kw=hf_inputs("llama"), dtype=torch.bfloat16, expect_calls=LAYERS)
    assert report.fusions["attention"] == LAYERS


def test_compile_backend_runs_the_fused_op():
    model = Attn(variant="pad_and_causal")
    x, pad = attn_inputs()
    eager = run(model, x, pad)
    compiled = torch.compile(model, backend="einfuse", options={"passes": ("attention",)})
    with counters.counting() as calls:
        got = run(compiled, x, pad)
    assert calls["attention"] == 1 and calls["attention_backward"] == 1
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-6)
    for n, g in eager[2].items():
        torch.testing.assert_close(got[2][n], g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# hand-written attention

class Attn(nn.Module):
    """Multi-head attention spelled out by hand, in the variants the tests need."""

    def __init__(self, d=24, h=4, hkv=2, variant="causal_inf", p=0.0, softcap=0.0, gqa="repeat_interleave"):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.hkv, self.dh = h, hkv, d // h
        self.q = nn.Linear(d, h * self.dh)
        self.k = nn.Linear(d, hkv * self.dh)
        self.v = nn.Linear(d, hkv * self.dh)
        self.o = nn.Linear(h * self.dh, d)
        self.variant, self.softcap, self.gqa = variant, softcap, gqa
        self.drop = nn.Dropout(p)

    def forward(self, x, pad):
        B, S, _ = x.shape
        n = self.h // self.hkv
        q = self.q(x).view(B, S, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, S, self.hkv, self.dh).transpose(1, 2)
        v = self.v(x).view(B, S, self.hkv, self.dh).transpose(1, 2)
        if self.variant == "sdpa_gqa":  # SDPA does the head sharing itself
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o(y.transpose(1, 2).reshape(B, S, -1))
        if self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        else:  # HF's repeat_kv
            k = k[:, :, None].expand(B, self.hkv, n, S, self.dh).reshape(B, self.h, S, self.dh)
            v = v[:, :, None].expand(B, self.hkv, n, S, self.dh).reshape(B, self.h, S, self.dh)
        if self.variant == "sdpa_dropout":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
            return self.o(y.transpose(1, 2).reshape(B, S, -1))
        s = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        if self.softcap:
            s = self.softcap * torch.tanh(s / self.softcap)
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool, device=x.device))
        var = self.variant
        if var == "causal_inf":
            s = s.masked_fill(~causal, float("-inf"))
        elif var == "where_min":
            s = torch.where(causal, s, torch.finfo(s.dtype).min)
        elif var == "pad":
            s = s + pad[:, None, None, :]
        elif var == "pad_and_causal":
            s = (s + pad[:, None, None, :]).masked_fill(~causal, float("-inf"))
        elif var == "wrong_axis":
            s = s + pad[:, None, :, None]   # a key-padding mask laid out along the queries
        p = torch.softmax(s, dim=-2 if var == "wrong_dim" else -1)
        p = self.drop(p)
        y = p @ v
        out = self.o(y.transpose(1, 2).reshape(B, S, -1))
        return (out, p) if var == "probs_returned" else out


def attn_inputs(seq=7, d=24, scale=1.0):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, seq, d, generator=g) * scale
    pad = torch.zeros(2, seq)
    pad[1, -2:] = torch.finfo(torch.float32).min
    return x, pad


@pytest.mark.parametrize("variant,gqa,mask", [
    ("causal_inf", "repeat_interleave", "bool"),
    ("where_min", "repeat_kv", "bool"),
    ("pad", "repeat_kv", "additive"),
    ("pad_and_causal", "repeat_interleave", "additive"),
])
def test_hand_written_attention(variant, gqa, mask):
    model = Attn(variant=variant, gqa=gqa)
    x, pad = attn_inputs(scale=4.0)   # large scores: the softmax must be stable
    report = compare(model, (x, pad))
    (r,) = attention_regions(report)
    assert r.bindings["mask"] == mask and r.bindings["gqa_group"] == 2
    assert r.bindings["scale"] == pytest.approx(1 / math.sqrt(6), rel=1e-12)  # / sqrt(d) became * 1/sqrt(d)
    after = next(p.after for p in report.passes if p.name == "attention")
    assert "softmax" not in after and "masked_fill" not in after  # the region is gone ...
    assert "repeat_interleave" not in after and "expand" not in after  # ... and so are the repeated K, V
    if variant == "causal_inf":
        assert "invert" not in after and "combine_masks" not in after  # ~causal folded back to causal
    if variant == "where_min":
        assert r.bindings["mask_fill"] == torch.finfo(torch.float32).min


def test_soft_capping():
    model = Attn(variant="causal_inf", softcap=2.0)
    report = compare(model, attn_inputs(scale=3.0))
    (r,) = attention_regions(report)
    assert r.bindings["softcap"] == pytest.approx(2.0) and r.bindings["scale"] == pytest.approx(1 / math.sqrt(6))
    assert "tanh" in str(r.cascades["3-pass"])


def test_sdpa_call_with_gqa_and_causal():
    model = Attn(variant="sdpa_gqa")
    report = compare(model, attn_inputs())
    (r,) = attention_regions(report)
    b = r.bindings
    assert b["source"] == "sdpa" and b["is_causal"] and b["mask"] == "causal" and b["gqa_group"] == 2
    assert b["scale"] == pytest.approx(1 / math.sqrt(6))  # scale=None -> 1/sqrt(D)


def test_3d_operands():
    def f(q, k, v):   # [batch*heads, S, D] attention with bmm
        return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.5, dim=-1), v)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, n, 5, generator=g, requires_grad=True) for n in (4, 6, 6))
    fast = einfuse.optimize(f, passes=("attention",))
    with counters.counting() as calls:
        out = fast(q, k, v)
        out.pow(2).sum().backward()
    assert calls["attention"] == 1
    grads = [t.grad.clone() for t in (q, k, v)]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro = f(*ref)
    ro.pow(2).sum().backward()
    for t in (q, k, v):
        t.grad = None
    eo = f(q, k, v)
    eo.pow(2).sum().backward()
    assert rel_err(out, ro) <= rel_err(eo, ro) + 1e-5
    for gf, r, t in zip(grads, ref, (q, k, v)):
        assert rel_err(gf, r.grad) <= rel_err(t.grad, r.grad) + 1e-5


@settings(max_examples=6, deadline=None)
@given(seq=st.sampled_from([1, 5, 9]), hkv=st.sampled_from([1, 2, 4]), scale=st.sampled_from([0.1, 1.0, 8.0]),
       variant=st.sampled_from(["causal_inf", "pad", "pad_and_causal"]))
def test_property_hand_written(seq, hkv, scale, variant):
    torch._dynamo.reset()
    model = Attn(variant=variant, hkv=hkv, gqa="repeat_kv")
    compare(model, attn_inputs(seq=seq, scale=scale))


# ---------------------------------------------------------------------------------------------
# left unfused, with the reason

def unfused_reasons(model, *args):
    report = einfuse.inspect(model, *args)
    assert report.fusions["attention"] == 0
    return [r.reason for r in attention_regions(report, fused=False)]


def test_dropout_in_training_is_left_unfused():
    model = Attn(p=0.1).train()
    (reason,) = unfused_reasons(model, *attn_inputs())
    assert "dropout p=0.1 in training" in reason
    model.eval()   # in eval the dropout is the identity: fused
    torch._dynamo.reset()
    assert einfuse.inspect(model, *attn_inputs()).fusions["attention"] == 1


def test_sdpa_dropout_is_left_unfused():
    (reason,) = unfused_reasons(Attn(variant="sdpa_dropout"), *attn_inputs())
    assert "dropout_p=0.1" in reason


def test_near_miss_softmax_over_the_wrong_dim():
    (reason,) = unfused_reasons(Attn(variant="wrong_dim"), *attn_inputs())
    assert reason == "softmax over dim -2, not the key axis (-1) of q @ k^T"


def test_near_miss_mask_broadcast_on_the_wrong_axis():
    (reason,) = unfused_reasons(Attn(variant="wrong_axis"), *attn_inputs())
    assert "(2, 1, 7, 1) is broadcast along the key axis" in reason


def test_near_miss_probabilities_used_elsewhere():
    (reason,) = unfused_reasons(Attn(variant="probs_returned"), *attn_inputs())
    assert "the attention probabilities are also used by output" in reason


def test_learned_additive_bias_is_left_unfused():
    class Biased(nn.Module):  # a trained relative-position bias: its gradient must survive
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(4, 7, 7))

        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.5 + self.bias, dim=-1) @ v
    q, k, v = torch.randn(3, 2, 4, 7, 6).unbind(0)
    (reason,) = unfused_reasons(Biased(), q, k, v)
    assert "requires grad" in reason


def test_near_misses_still_compute_the_same():
    model = Attn(variant="wrong_axis")
    x, pad = attn_inputs()
    fast = einfuse.optimize(model, passes=("attention",))
    with counters.counting() as calls:
        torch.testing.assert_close(fast(x, pad), model(x, pad))
    assert calls["attention"] == 0
    assert "broadcast along the key axis" in fast.einfuse_report.unfused[0].reason
