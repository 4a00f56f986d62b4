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
