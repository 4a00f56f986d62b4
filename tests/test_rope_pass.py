"""The RoPE pass: HF rotate-half, Meta's complex form, partial rotary, position ids, near misses.

Numerics: every output and gradient is compared with an fp64 copy run eagerly;
the optimized error must be no larger than plain eager's (same dtype) plus
1e-5 (fp32) / 1e-2 (bf16). Counts come from `inspect`; counters prove the op ran.
"""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.models.tiny_llama import TinyLlama, TinyLlamaConfig
from einfuse.runtime import counters
from hf_models import _run, build, check_against_fp64, inputs, rel_err

from hf_models import TOL  # noqa: E402


# -- helpers -----------------------------------------------------------------------------------

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Hand-written q/k projection + RoPE in [B, H, S, D] layout; `variant` spells the rotation."""

    def __init__(self, variant="hf", dim=24, heads=3, kv=1, hd=8, rotary=None):
        super().__init__()
        self.variant, self.heads, self.kv, self.hd = variant, heads, kv, hd
        self.rot = rotary or hd
        self.wq = nn.Linear(dim, heads * hd, bias=False)
        self.wk = nn.Linear(dim, kv * hd, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.rot, 2).float() / self.rot))
        self.register_buffer("inv_freq", inv, persistent=False)

    def angles(self, pos):
        f = pos[..., None].float() * self.inv_freq
        return torch.cat((f, f), dim=-1)

    def forward(self, x, pos, pos2=None):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        emb = self.angles(pos)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        v = self.variant
        if v == "diff_pos":  # sin at other positions than cos
            sin = self.angles(pos2).sin()[:, None]
        if v == "cos_cos":
            return q * cos + rotate_half(q) * cos, k * cos + rotate_half(k) * cos
        if v == "swapped":
            return q * sin + rotate_half(q) * cos, k * sin + rotate_half(k) * cos
        if v == "wrong_rotation":  # cat(x1, -x2): not a rotation
            bad = lambda t: torch.cat((t[..., :4], -t[..., 4:]), dim=-1)  # noqa: E731
            return q * cos + bad(q) * sin, k * cos + bad(k) * sin
        if v == "q_only":
            return q * cos + rotate_half(q) * sin, k
        if v == "partial":
            r = self.rot
            qr, qp = q[..., :r], q[..., r:]
            kr, kp = k[..., :r], k[..., r:]
            return (torch.cat([qr * cos + rotate_half(qr) * sin, qp], dim=-1),
                    torch.cat([kr * cos + rotate_half(kr) * sin, kp], dim=-1))
        if v == "chunk":
            def rh(t):
                a, c = t.chunk(2, dim=-1)
                return torch.cat((-c, a), dim=-1)
            return (q.float() * cos + rh(q.float()) * sin).to(q.dtype), k * cos + rh(k) * sin
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _xpos(b=2, s=5, dim=24, offset=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, dim, generator=g)
    pos = (torch.arange(s) + offset).expand(b, s)
    return x, pos


# -- Meta's complex form -----------------------------------------------------------------------

def precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def reshape_for_broadcast(freqs_cis, x):
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class MetaRotary(nn.Module):
    def __init__(self, dim=32, heads=4, kv=2, max_seq=16):
        super().__init__()
        self.hd, self.h, self.kv = dim // heads, heads, kv
        self.wq = nn.Linear(dim, heads * self.hd, bias=False)
        self.wk = nn.Linear(dim, kv * self.hd, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(self.hd, max_seq), persistent=False)

    def forward(self, x, start_pos: int = 0):
        b, s, _ = x.shape
        xq = self.wq(x).view(b, s, self.h, self.hd)  # [B, S, H, D]: Meta's layout
        xk = self.wk(x).view(b, s, self.kv, self.hd)
        return apply_rotary_emb(xq, xk, self.freqs_cis[start_pos: start_pos + s])

    def double(self):  # keep freqs complex128 for the fp64 reference
        super().double()
        self.freqs_cis = self.freqs_cis.to(torch.complex128)
        return self


# -- tests ---------------------------------------------------------------------------------------

def test_hf_llama_one_rope_per_layer_with_explicit_position_ids():
    torch.manual_seed(0)
    model = build("llama")
    kw = inputs("llama")
    b, s = kw["input_ids"].shape
    kw["position_ids"] = (torch.arange(s) + 4).expand(b, s)
    layers = model.config.num_hidden_layers
    fast = torch.compile(model, backend="einfuse")
    with counters.counting() as c:
        check_against_fp64(model, (), kw, optimized=fast)
    assert c["rope"] == layers
    report = einfuse.last_report()
    assert report.fusions["rope"] == layers
    regions = [r for r in report.regions if r.kind == "rope"]
    assert all(r.fused and r.bindings["q_and_k"] and r.bindings["form"] == "rotate_half" for r in regions)
    assert not [r for r in report.unfused if r.kind == "rope"]


def test_hand_written_rotate_half_spellings():
    x, pos = _xpos()
    for variant in ("hf", "chunk"):
        torch._dynamo.reset()
        torch.manual_seed(1)
        m = Rotary(variant)
        report = einfuse.inspect(m, x, pos)
        assert report.fusions["rope"] == 1 and not report.unfused, (variant, report.unfused)
        fast = einfuse.optimize(m)
        with counters.counting() as c:
            check_against_fp64(m, (x, pos), optimized=fast)
        assert c["rope"] == 1, variant


def test_partial_rotary_fuses_the_pass_through_concatenation():
    x, pos = _xpos()
    m = Rotary("partial", rotary=4)
    report = einfuse.inspect(m, x, pos)
    (r,) = [r for r in report.regions if r.kind == "rope"]
    assert r.fused and r.bindings["rotary_dim"] == 4 and r.bindings["head_dim"] == 8 and r.bindings["q_and_k"]
    with counters.counting() as c:
        check_against_fp64(m, (x, pos))
    assert c["rope"] == 1


def test_phi3_partial_rotary_and_fused_qkv():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        pad_token_id=0, partial_rotary_factor=0.5)
    cfg._attn_implementation = "eager"
    model = tf.Phi3ForCausalLM(cfg)
    kw = inputs("llama")
    with counters.counting() as c:
        fast = check_against_fp64(model, (), kw)
    assert c["rope"] == 1
    (r,) = [r for r in fast.einfuse_report.regions if r.kind == "rope"]
    assert r.fused and r.bindings["rotary_dim"] == 4 and r.bindings["head_dim"] == 8 and r.bindings["q_and_k"]


def test_meta_complex_form_becomes_the_interleaved_op():
    torch.manual_seed(0)
    m = MetaRotary()
    x = torch.randn(2, 5, 32)
    report = einfuse.inspect(m, x, 2)
    (r,) = [r for r in report.regions if r.kind == "rope"]
    assert r.fused and r.bindings["form"] == "interleaved" and r.bindings["layout"] == "BSHD"
    assert r.bindings["q_and_k"]
    with counters.counting() as c:
        check_against_fp64(m, (x, 2))
    assert c["rope"] == 1


def test_tiny_llama_chunked_rotate_half():
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(layers=2, hidden=32, intermediate=48, vocab_size=64))
    ids = torch.randint(0, 64, (2, 6))
    with counters.counting() as c:
        fast = check_against_fp64(model, (ids,))
    assert c["rope"] == 2 and fast.einfuse_report.fusions["rope"] == 2


def test_a_lone_rotation_is_fused_with_an_empty_k():
    x, pos = _xpos()
    m = Rotary("q_only")
    report = einfuse.inspect(m, x, pos)
    (r,) = [r for r in report.regions if r.kind == "rope"]
    assert r.fused and not r.bindings["q_and_k"]
    with counters.counting() as c:
        check_against_fp64(m, (x, pos))
    assert c["rope"] == 1


@pytest.mark.parametrize("variant,reason", [
    ("diff_pos", "different"),
    ("cos_cos", "cos and sin are the same tensor"),
    ("swapped", "swapped"),
    ("wrong_rotation", "not part of x*cos + rotate_half(x)*sin"),
])
def test_near_misses_are_rejected_with_a_reason(variant, reason):
    x, pos = _xpos()
    m = Rotary(variant)
    args = (x, pos, pos + 1) if variant == "diff_pos" else (x, pos)
    report = einfuse.inspect(m, *args)
    assert report.fusions["rope"] == 0
    misses = [r for r in report.unfused if r.kind == "rope"]
    assert len(misses) == 2 and all(reason in r.reason for r in misses), [r.reason for r in misses]
    with counters.counting() as c:
        out = einfuse.optimize(m)(*args)
    assert c["rope"] == 0
    for a, b in zip(out, m(*args)):
        torch.testing.assert_close(a, b)


def test_bf16_llama_within_the_bf16_rule():
    model = build("llama", dtype=torch.bfloat16, num_hidden_layers=1)
    kw = inputs("llama")
    with counters.counting() as c:
        check_against_fp64(model, (), kw, dtype=torch.bfloat16)
    assert c["rope"] == model.config.num_hidden_layers


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), s=st.integers(1, 6), half=st.integers(1, 5), partial=st.booleans(),
       scale=st.sampled_from([1.0, 1e3]), bf16=st.booleans())
def test_property_shapes_dtypes_magnitudes(b, s, half, partial, scale, bf16):
    torch._dynamo.reset()
    hd = 2 * half + (2 if partial else 0)
    rot = 2 * half
    torch.manual_seed(0)
    m = Rotary("partial" if partial else "hf", dim=12, heads=2, kv=1, hd=hd, rotary=rot)
    dtype = torch.bfloat16 if bf16 else torch.float32
    m = m.to(dtype)
    x = (torch.randn(b, s, 12) * scale).to(dtype)
    pos = (torch.arange(s) * 7).expand(b, s)
    with counters.counting() as c:
        check_against_fp64(m, (x, pos), dtype=dtype)
    assert c["rope"] == 1
