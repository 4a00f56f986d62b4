"""einfuse::rms_norm against an fp64 reference: forward, gradients, dtypes, odd shapes."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from einfuse.runtime import counters
from einfuse.runtime.ops.rmsnorm import rms_norm, rms_norm_op

from _numerics import rel_err


def eager(x, w, eps, offset):  # Hugging Face's spelling, in the input dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (w + offset) * y.to(x.dtype) if offset else w * y.to(x.dtype)


def _check(shape, dtype, scale=1.0, offset=0.0, eps=1e-6):
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    g = torch.Generator().manual_seed(sum(shape))
    x64 = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()
    w64 = torch.randn(shape[-1], generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    ref = eager(x64, w64, eps, offset)
    ref_grads = torch.autograd.grad(ref, (x64, w64), dy)
    results = {}
    for name, fn in (("fused", rms_norm), ("eager", eager)):
        x = x64.detach().to(dtype).requires_grad_()
        w = w64.detach().to(dtype).requires_grad_()
        with counters.counting() as c:
            out = fn(x, w, eps, offset)
        if name == "fused":
            assert c["rmsnorm"] == 1
        grads = torch.autograd.grad(out, (x, w), dy.to(out.dtype))
        results[name] = [out] + list(grads)
    for i, r in enumerate([ref, *ref_grads]):
        if i == 1 and shape[-1] == 1:
            continue  # a row of one element normalises to sign(x): d/dx is 0 up to eps, all rounding noise
        e_f, e_e = rel_err(results["fused"][i], r), rel_err(results["eager"][i], r)
        assert e_f <= e_e + tol, (i, e_f, e_e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (1, 1, 576)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_forward_and_gradients(shape, dtype, offset):
    _check(shape, dtype, offset=offset)


@pytest.mark.parametrize("scale", [1e-3, 1e4])
def test_large_and_small_magnitudes(scale):
    _check((4, 65), torch.float32, scale=scale)


def test_saves_only_input_and_rstd():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == [(4,), (4, 16), (16,)]  # rstd per row, the input, the weight (a parameter)


def test_opcheck_and_compile():
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.library.opcheck(rms_norm_op, (x, w, 1e-6, 0.0))
    f = torch.compile(lambda x, w: rms_norm(x, w, 1e-6).sum(), backend="aot_eager", fullgraph=True)
    f(x, w).backward()
    gx = x.grad.clone()
    x.grad = None
    eager(x, w, 1e-6, 0.0).sum().backward()
    torch.testing.assert_close(gx, x.grad)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), h=st.integers(1, 70), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale=st.sampled_from([1e-2, 1.0, 1e3]))
def test_property(rows, h, dtype, scale):
    _check((rows, h), dtype, scale=scale)


# -- residual-add variant: (y, h) = (rmsnorm(x + residual), x + residual) ------------------------------

from einfuse.runtime.ops.rmsnorm import add_rms_norm, add_rms_norm_op  # noqa: E402


def eager_add(x, r, w, eps, offset):  # Hugging Face's decoder layer: h = residual + x; norm(h)
    h = r + x
    return eager(h, w, eps, offset), h


def _check_add(shape, dtype, scale=1.0, offset=0.0, eps=1e-6):
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    g = torch.Generator().manual_seed(3 + sum(shape))
    x64 = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()
    r64 = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()
    w64 = torch.randn(shape[-1], generator=g, dtype=torch.float64).requires_grad_()
    dy, dh = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    ref = eager_add(x64, r64, w64, eps, offset)
    ref_grads = torch.autograd.grad(ref, (x64, r64, w64), (dy, dh))
    results = {}
    for name, fn in (("fused", add_rms_norm), ("eager", eager_add)):
        x, r, w = (t.detach().to(dtype).requires_grad_() for t in (x64, r64, w64))
        with counters.counting() as c:
            y, h = fn(x, r, w, eps, offset)
        if name == "fused":
            assert c["rmsnorm"] == 1 and c["rmsnorm_residual"] == 1
        assert y.dtype == dtype and h.dtype == dtype
        grads = torch.autograd.grad((y, h), (x, r, w), (dy.to(dtype), dh.to(dtype)))
        results[name] = [y, h, *grads]
    for i, ref_i in enumerate([*ref, *ref_grads]):
        e_f, e_e = rel_err(results["fused"][i], ref_i), rel_err(results["eager"][i], ref_i)
        assert e_f <= e_e + tol, (i, e_f, e_e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (1, 2, 576)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_residual_forward_and_gradients(shape, dtype, offset):
    _check_add(shape, dtype, offset=offset)


def test_residual_only_norm_output_used():
    # h's own gradient is zero: dx = dresidual = d rmsnorm/dh only
    x, r = torch.randn(3, 10, requires_grad=True), torch.randn(3, 10, requires_grad=True)
    w = torch.randn(10, requires_grad=True)
    y, _ = add_rms_norm(x, r, w, 1e-6)
    gx, gr, gw = torch.autograd.grad(y.sum(), (x, r, w))
    h = (x + r).detach().requires_grad_()
    ex, ew = torch.autograd.grad(eager(h, w, 1e-6, 0.0).sum(), (h, w))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gr, ex)
    torch.testing.assert_close(gw, ew)


def test_residual_saves_only_sum_and_rstd():
    x, r = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, h = add_rms_norm(x, r, w, 1e-6)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == [(4,), (4, 16), (16,)]  # rstd per row, h = x + r, the weight
    (s,) = [t for t in saved if t.shape == (4, 16)]
    assert s.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()  # h itself, not a copy


def test_residual_opcheck_and_compile():
    x, r = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    torch.library.opcheck(add_rms_norm_op, (x, r, w, 1e-6, 0.0))

    def f(x, r, w):
        y, h = add_rms_norm(x, r, w, 1e-6)
        return (y * 2 + h).sum()

    torch.compile(f, backend="aot_eager", fullgraph=True)(x, r, w).backward()
    got = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    y, h = eager_add(x, r, w, 1e-6, 0.0)
    (y * 2 + h).sum().backward()
    for a, t in zip(got, (x, r, w)):
        torch.testing.assert_close(a, t.grad)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 9), h=st.integers(1, 70), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale=st.sampled_from([1e-2, 1.0, 1e3]))
def test_residual_property(rows, h, dtype, scale):
    _check_add((rows, h), dtype, scale=scale)
