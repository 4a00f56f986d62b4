"""Entry points: optimize on modules/functions/classes, the backend, config and bad input."""

import pytest
import torch
import torch.nn as nn

import einfuse
from einfuse.models import TinyLlama, TinyLlamaConfig
from einfuse.runtime import counters


def norm_fn(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Norm(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return norm_fn(x, self.w)


def test_function_decorator_with_and_without_arguments():
    x, w = torch.randn(3, 8), torch.randn(8)

    @einfuse.optimize
    def f(x, w):
        return norm_fn(x, w)

    @einfuse.optimize(inner="eager")
    def g(x, w):
        return norm_fn(x, w)

    with counters.counting() as c:
        torch.testing.assert_close(f(x, w), norm_fn(x, w))
        torch.testing.assert_close(g(x, w), norm_fn(x, w))
    assert c["rmsnorm"] == 2
    assert f.__name__ == "f" and f.einfuse_report.fusions["rmsnorm"] == 1


def test_class_decorator_optimizes_instances_on_construction():
    @einfuse.optimize
    class M(Norm):
        pass

    @einfuse.optimize()
    class M2(Norm):
        pass

    for cls in (M, M2):
        m = cls()
        assert isinstance(m, Norm) and m.einfuse_report is not None
        x = torch.randn(2, 8)
        with counters.counting() as c:
            torch.testing.assert_close(m(x), norm_fn(x, m.w))
        assert c["rmsnorm"] == 1


def test_optimized_module_shares_parameters_and_modes():
    model = TinyLlama(TinyLlamaConfig(layers=1))
    fast = einfuse.optimize(model)
    assert isinstance(fast, TinyLlama)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(fast.parameters(), model.parameters()))
    ids = torch.randint(0, 256, (1, 8))
    before = fast(ids)
    with torch.no_grad():  # in-place update after optimize is seen
        model.norm.weight.mul_(2.0)
    after = fast(ids)
    torch.testing.assert_close(after, model(ids))
    assert not torch.allclose(before, after)
    fast.eval()
    assert not fast.training and not fast.blocks[0].training
    fast.train()
    assert fast.training


def test_optimize_twice_is_harmless():
    model = Norm()
    once = einfuse.optimize(model)
    twice = einfuse.optimize(once)
    x = torch.randn(2, 8)
    with counters.counting() as c:
        torch.testing.assert_close(twice(x), norm_fn(x, model.w))
    assert c["rmsnorm"] == 1
    assert type(twice) is type(once)


def test_config_and_bad_inputs():
    cfg = einfuse.OptimizeConfig()
    assert cfg.inner == "eager" and cfg.passes is None and cfg.return_logits is False
    with pytest.raises(TypeError, match="unknown einfuse option 'fuse_everything'"):
        einfuse.optimize(Norm(), fuse_everything=True)
    with pytest.raises(TypeError, match="expects an nn.Module.*got int"):
        einfuse.optimize(42)
    with pytest.raises(ValueError, match="inner must be one of"):
        einfuse.OptimizeConfig(inner="tvm")
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        einfuse.OptimizeConfig(passes=("nope",))
    with pytest.raises(TypeError, match="expects an nn.Module or a function"):
        einfuse.inspect(42)


def test_passes_option_turns_a_pass_off():
    x, w = torch.randn(3, 8), torch.randn(8)
    f = einfuse.optimize(norm_fn, passes=())
    with counters.counting() as c:
        f(x, w)
    assert c["rmsnorm"] == 0 and f.einfuse_report.fusions["rmsnorm"] == 0


def test_backend_by_name_with_options_and_graph_breaks():
    def f(x, w):
        y = norm_fn(x, w)
        torch._dynamo.graph_break()
        return norm_fn(y, w) * 2

    x, w = torch.randn(4, 8), torch.randn(8)
    c_f = torch.compile(f, backend="einfuse", options={"debug": True})
    with counters.counting() as c:
        out = c_f(x, w)
    torch.testing.assert_close(out, f(x, w))
    assert c["rmsnorm"] == 2  # each of the two graphs optimized on its own
    with pytest.raises(Exception, match="unknown einfuse option"):
        torch._dynamo.reset()
        torch.compile(f, backend="einfuse", options={"bogus": 1})(x, w)


def test_backend_returns_exactly_the_graph_outputs():
    def f(x, w):
        y = norm_fn(x, w)
        return y, y.sum(), x.to(torch.float64), (x > 0)
    x, w = torch.randn(3, 8), torch.randn(8)
    ref = f(x, w)
    out = torch.compile(f, backend="einfuse")(x, w)
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_unknown_op_leaves_region_untouched_and_is_reported():
    def f(x, w):  # erfinv has no lowering rule: the norm built on it is not an RMSNorm we can see
        v = torch.special.erfinv(x.pow(2).mean(-1, keepdim=True).tanh())
        return w * (x * torch.rsqrt(v + 1e-6))
    x, w = torch.randn(3, 8), torch.randn(8)
    report = einfuse.inspect(f, x, w)
    assert report.fusions["rmsnorm"] == 0
    (r,) = report.unfused
    assert r.kind == "rmsnorm" and "opaque value" in r.reason
    out = einfuse.optimize(f)(x, w)
    torch.testing.assert_close(out, f(x, w))


def test_report_markdown_lists_passes_and_cascades():
    model = TinyLlama(TinyLlamaConfig(layers=1))
    ids = torch.randint(0, 256, (2, 8))  # batch 2: a size-1 batch dimension would carry no rank
    report = einfuse.inspect(model, ids)
    md = report.to_markdown()
    assert "| rmsnorm | 3 |" in md and "sum_h X[b,s,h] * X[b,s,h]" in md
    p = next(p for p in report.passes if p.name == "rmsnorm")
    assert p.changed and "ops_rmsnorm_rms_norm(" in p.after and "ops_rmsnorm_rms_norm(" not in p.before
    ids_ = [r.id for r in report.regions]
    assert len(set(ids_)) == len(ids_)


def test_inspect_with_quantize_reports_it_and_leaves_the_model_untouched():
    from hf_models import build, inputs
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = einfuse.inspect(model, config=einfuse.OptimizeConfig(quantize="int8"), **inputs("llama"))
    assert report.fusions.get("quantize", 0) > 0
    assert report.fusions.get("swiglu", 0) > 0  # the fusions still find the quantized projections
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m) is not nn.Linear or m.weight.dtype == torch.float32 for m in model.modules())
