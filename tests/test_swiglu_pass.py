"""The SwiGLU/GeGLU pass: spellings, activations, fused gate_up, HF models, and near misses.

Numerics: outputs and every gradient against an fp64 copy run eagerly; the
optimized error must be no larger than plain eager's (same dtype) plus 1e-5
(fp32) / 1e-2 (bf16). Counts come from the report; counters prove the op ran.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.runtime import counters
from hf_models import _run, build, check_against_fp64, inputs, rel_err

from hf_models import TOL  # noqa: E402


SPELLINGS = {
    "silu": lambda g, u: F.silu(g) * u,
    "sigmoid": lambda g, u: g * torch.sigmoid(g) * u,
    "module": lambda g, u: nn.SiLU()(g) * u,
    "exp": lambda g, u: g / (1 + torch.exp(-g)) * u,
    "up_first": lambda g, u: u * F.silu(g),
    "fp32": lambda g, u: (F.silu(g.float()) * u.float()).to(g.dtype),
    "gelu": lambda g, u: F.gelu(g) * u,
    "gelu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u,
}
ACT = {"gelu": "gelu", "gelu_tanh": "gelu_tanh"}


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), spelled by `glu`; `fused`: one gate_up linear split by chunk or slices."""

    def __init__(self, glu=SPELLINGS["silu"], d=12, inter=20, bias=False, fused=None, extra_use=False):
        super().__init__()
        self.glu, self.fused, self.extra_use, self.inter = glu, fused, extra_use, inter
        if fused:
            self.gate_up = nn.Linear(d, 2 * inter, bias=bias)
        else:
            self.gate = nn.Linear(d, inter, bias=bias)
            self.up = nn.Linear(d, inter, bias=bias)
        self.down = nn.Linear(inter, d, bias=bias)

    def forward(self, x):
        if self.fused == "chunk":
            g, u = self.gate_up(x).chunk(2, dim=-1)
        elif self.fused == "slice":
            h = self.gate_up(x)
            g, u = h[..., : self.inter], h[..., self.inter:]
        else:
            g, u = self.gate(x), self.up(x)
        h = self.glu(g, u)
        out = self.down(h)
        return (out, h.mean(-1)) if self.extra_use else out


def _x(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_every_spelling_and_activation_is_one_fused_mlp(name):
    torch.manual_seed(0)
    m = MLP(SPELLINGS[name])
    x = _x(2, 5, 12)
    with counters.counting() as c:
        fast = check_against_fp64(m, (x,))
    assert c["swiglu"] == 1
    (r,) = [r for r in fast.einfuse_report.regions if r.kind == "swiglu"]
    assert r.fused and r.bindings["act"] == ACT.get(name, "silu") and r.bindings["form"] == "mlp"


@pytest.mark.parametrize("fused", ["chunk", "slice"])
def test_fused_gate_up_projection_with_bias(fused):
    torch.manual_seed(0)
    m = MLP(fused=fused, bias=True)
    with counters.counting() as c:
        fast = check_against_fp64(m, (_x(3, 12),))
    assert c["swiglu"] == 1
    (r,) = [r for r in fast.einfuse_report.regions if r.kind == "swiglu"]
    assert r.fused and r.bindings["fused_gate_up"] and r.bindings["form"] == "mlp"


def test_product_with_other_users_uses_the_elementwise_op():
    torch.manual_seed(0)
    m = MLP(extra_use=True)
    with counters.counting() as c:
        fast = check_against_fp64(m, (_x(2, 4, 12),))
    assert c["swiglu"] == 1
    (r,) = [r for r in fast.einfuse_report.regions if r.kind == "swiglu"]
    assert r.fused and r.bindings["form"] == "elementwise"


class NearMiss(nn.Module):
    def __init__(self, kind, d=12):
        super().__init__()
        self.kind = kind
        self.gate = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, d, bias=False)

    def forward(self, x, y):
        if self.kind == "times_input":  # act(gate(x)) * x: x is not a projection
            return F.silu(self.gate(x)) * x
        if self.kind == "other_input":  # gate and up of different inputs
            return F.silu(self.gate(x)) * self.up(y)
        if self.kind == "same_projection":
            g = self.gate(x)
            return F.silu(g) * g
        raise ValueError(self.kind)


@pytest.mark.parametrize("kind,reason", [
    ("times_input", "is not a linear projection of x (found the gate projection's input itself)"),
    ("other_input", "gate and up project different inputs"),
    ("same_projection", "gate and up are the same projection"),
])
def test_near_misses_are_rejected_with_a_reason(kind, reason):
    m = NearMiss(kind)
    x, y = _x(2, 3, 12), _x(2, 3, 12, scale=2.0)
    report = einfuse.inspect(m, x, y)
    assert report.fusions["swiglu"] == 0
    (r,) = [r for r in report.unfused if r.kind == "swiglu"]
    assert reason in r.reason, r.reason
    with counters.counting() as c:
        out = einfuse.optimize(m)(x, y)
    assert c["swiglu"] == 0
    torch.testing.assert_close(out, m(x, y))


def test_a_plain_activation_is_not_a_candidate():
    m = nn.Sequential(nn.Linear(12, 20), nn.SiLU(), nn.Linear(20, 12), nn.GELU())
    report = einfuse.inspect(m, _x(2, 12))
    assert report.fusions["swiglu"] == 0 and not [r for r in report.regions if r.kind == "swiglu"]


def test_hf_llama_one_fused_mlp_per_layer():
    model = build("llama")
    kw = inputs("llama")
    layers = model.config.num_hidden_layers
    with counters.counting() as c:
        fast = check_against_fp64(model, (), kw)
    assert c["swiglu"] == layers
    regions = [r for r in fast.einfuse_report.regions if r.kind == "swiglu"]
    assert len(regions) == layers and all(r.fused and r.bindings["form"] == "mlp" for r in regions)


def test_hf_gemma_geglu_tanh():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = tf.GemmaForCausalLM(cfg)
    assert cfg.hidden_act == "gelu_pytorch_tanh"
    with counters.counting() as c:
        fast = check_against_fp64(model, (), inputs("llama"))
    assert c["swiglu"] == 1
    (r,) = [r for r in fast.einfuse_report.regions if r.kind == "swiglu"]
    assert r.fused and r.bindings["act"] == "gelu_tanh" and r.bindings["form"] == "mlp"


def test_hf_phi3_fused_gate_up():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = tf.Phi3ForCausalLM(cfg)
    with counters.counting() as c:
        fast = check_against_fp64(model, (), inputs("llama"))
    assert c["swiglu"] == 1
    (r,) = [r for r in fast.einfuse_report.regions if r.kind == "swiglu"]
    assert r.fused and r.bindings["fused_gate_up"] and r.bindings["intermediate"] == 48


def test_bf16_mlp_within_the_bf16_rule():
    torch.manual_seed(0)
    m = MLP(SPELLINGS["fp32"]).to(torch.bfloat16)
    with counters.counting() as c:
        check_against_fp64(m, (_x(3, 5, 12, dtype=torch.bfloat16),), dtype=torch.bfloat16)
    assert c["swiglu"] == 1


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 7), d=st.integers(1, 9), inter=st.integers(1, 13),
       act=st.sampled_from(["silu", "gelu", "gelu_tanh"]), fused=st.sampled_from([None, "chunk"]),
       bias=st.booleans(), scale=st.sampled_from([1.0, 30.0]), bf16=st.booleans())
def test_property_shapes_dtypes_magnitudes(rows, d, inter, act, fused, bias, scale, bf16):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    m = MLP(SPELLINGS[act], d=d, inter=inter, bias=bias, fused=fused).to(dtype)
    with counters.counting() as c:
        check_against_fp64(m, (_x(rows, d, scale=scale, dtype=dtype),), dtype=dtype)
    assert c["swiglu"] == 1
