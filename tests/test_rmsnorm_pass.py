"""The RMSNorm pass: spellings that match, variants, and near misses that must not."""

import torch
import torch.nn as nn

import einfuse
from einfuse.runtime import counters


class Norm(nn.Module):
    def __init__(self, fn, d=12):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.fn(x, self.weight) @ torch.ones(x.shape[-1], 3)  # something after the norm


SPELLINGS = {
    "hf": lambda x, w: w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype),
    "div_sqrt": lambda x, w: x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-6) * w,
    "pow_neg_half": lambda x, w: (x * (x.pow(2).sum(-1, keepdim=True) / x.shape[-1] + 1e-6).pow(-0.5)) * w,
    "positive_dim": lambda x, w: torch.mul(x, torch.rsqrt(x.square().mean(dim=2, keepdim=True) + 1e-6)) * w,
}


def test_every_spelling_is_fused_and_exact():
    x = torch.randn(2, 5, 12)
    for name, fn in SPELLINGS.items():
        torch._dynamo.reset()
        m = Norm(fn)
        fast = einfuse.optimize(m)
        with counters.counting() as c:
            out = fast(x)
        assert c["rmsnorm"] == 1, name
        assert fast.einfuse_report.fusions["rmsnorm"] == 1, name
        torch.testing.assert_close(out, m(x), msg=name)


def test_gemma_one_plus_weight_variant():
    fn = lambda x, w: (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1.0 + w.float())
    m = Norm(fn)
    report = einfuse.inspect(m, torch.randn(2, 3, 12))
    (r,) = [r for r in report.regions if r.kind == "rmsnorm"]
    assert r.fused and r.bindings["variant"] == "one_plus_weight"
    x = torch.randn(2, 3, 12, requires_grad=True)
    out = einfuse.optimize(m)(x)
    out.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    m(x).sum().backward()
    torch.testing.assert_close(gx, x.grad)


def test_norm_over_the_wrong_dimension_is_not_fused():
    fn = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + 1e-6))
    report = einfuse.inspect(Norm(fn), torch.randn(2, 12, 12))
    assert report.fusions["rmsnorm"] == 0
    (r,) = report.unfused
    assert "sum over ((-2,), True), expected ((-1,), True)" in r.reason


def test_weight_on_the_wrong_axis_and_wrong_count_are_not_fused():
    wrong_w = lambda x, w: w[:, None] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    report = einfuse.inspect(Norm(wrong_w), torch.randn(2, 12, 12))
    assert report.fusions["rmsnorm"] == 0 and "does not scale the normalised dimension" in report.unfused[0].reason
    wrong_n = lambda x, w: w * (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / 7 + 1e-6))
    report = einfuse.inspect(Norm(wrong_n), torch.randn(2, 3, 12))
    assert report.fusions["rmsnorm"] == 0 and "not the row length 12" in report.unfused[0].reason


# -- residual add fused into the norm --------------------------------------------------------------

import sys  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import build, check_against_fp64, inputs  # noqa: E402

_hf_norm = SPELLINGS["hf"]


class ResidualBlock(nn.Module):
    """h = x + r is the residual stream (used after the norm); y = rmsnorm(h) feeds a projection."""

    def __init__(self, d=12, norm_input="h"):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.proj = nn.Linear(d, d)
        self.norm_input = norm_input

    def forward(self, x, r):
        h = x + r
        early = h.sin() if self.norm_input == "h_used_before" else 0  # a user of h ahead of the norm
        y = _hf_norm(x if self.norm_input == "x" else h, self.weight)
        return h + self.proj(y) + early


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dtype,norm_input", [(torch.float32, "h"), (torch.bfloat16, "h"),
                                              (torch.float32, "h_used_before")])
def test_residual_add_is_fused_into_the_norm(dtype, norm_input):
    torch.manual_seed(0)
    torch._dynamo.reset()
    m = ResidualBlock(norm_input=norm_input).to(dtype)
    x, r = _x(2, 5, 12).to(dtype), (_x(2, 5, 12) * 3).to(dtype)
    with counters.counting() as c:  # output and the gradients of x, r and every parameter
        fast = check_against_fp64(m, (x, r), dtype=dtype)
    assert c["rmsnorm"] == 1 and c["rmsnorm_residual"] == 1
    (reg,) = [g for g in fast.einfuse_report.regions if g.kind == "rmsnorm"]
    assert reg.fused and reg.bindings["residual"] is True
    assert fast.einfuse_report.fusions["rmsnorm"] == 1


def test_add_not_feeding_the_norm_is_left_alone():
    torch.manual_seed(0)
    m = ResidualBlock(norm_input="x")  # the norm reads x, not x + r: the add stays a separate op
    with counters.counting() as c:
        fast = check_against_fp64(m, (_x(2, 5, 12), _x(2, 5, 12)))
    assert c["rmsnorm"] == 1 and c["rmsnorm_residual"] == 0
    (reg,) = [g for g in fast.einfuse_report.regions if g.kind == "rmsnorm"]
    assert reg.fused and reg.bindings["residual"] is False


def test_tiny_llama_residual_norms():  # fp32 here; bf16 on the block above and in the op tests
    torch._dynamo.reset()
    m = build("llama", "sdpa")
    layers = m.config.num_hidden_layers
    with counters.counting() as c:
        fast = check_against_fp64(m, kw=inputs("llama"))
    report = fast.einfuse_report
    norms = [g for g in report.regions if g.kind == "rmsnorm"]
    assert report.fusions["rmsnorm"] == 2 * layers + 1 and all(g.fused for g in norms)
    # every norm after the embedding reads a residual add: post-attention and next-layer/final norms
    assert [g.bindings["residual"] for g in norms] == [False] + [True] * (2 * layers)
    assert c["rmsnorm_residual"] == 2 * layers and c["rmsnorm"] == 2 * layers + 1
