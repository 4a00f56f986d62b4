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
