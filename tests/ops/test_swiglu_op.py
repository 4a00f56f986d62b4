"""Tests for einfuse::glu and einfuse::glu_mlp (fusion key "swiglu")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.graph import saved_tensors_hooks

import einfuse.runtime.ops.swiglu as swiglu_mod  # noqa: F401  (registers the ops)
from einfuse.runtime import counters
from einfuse.runtime.ops.swiglu import glu, glu_mlp

try:
    from tests.ops._numerics import rel_err
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from _numerics import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def eager_mlp(x, wg, wu, wd, bg=None, bu=None, bd=None, act="silu"):
    return F.linear(ACTS[act](F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def assert_no_worse(fused, eager, ref, dtype, what):
    assert fused.dtype == eager.dtype == dtype, what
    assert fused.shape == ref.shape, what
    ef, ee = rel_err(fused, ref), rel_err(eager, ref)
    assert ef <= ee + TOL[dtype], f"{what}: fused err {ef:.3e} > eager err {ee:.3e} + {TOL[dtype]}"


def _leaves(masters, dtype):
    return [None if m is None else m.detach().to(dtype).requires_grad_(True) for m in masters]


def make_mlp_inputs(lead, H, inter, H2, bias, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s

    x = r(*lead, H, s=scale)
    wg, wu = r(inter, H, s=H**-0.5), r(inter, H, s=H**-0.5)
    wd = r(H2, inter, s=inter**-0.5)
    bs = [r(inter), r(inter), r(H2)] if bias else [None, None, None]
    go = r(*lead, H2)
    return [x, wg, wu, wd, *bs], go


def check_mlp(lead, H, inter, H2, dtype, act, bias, scale=1.0, seed=0):
    masters, go = make_mlp_inputs(lead, H, inter, H2, bias, scale, seed)
    fused_in = _leaves(masters, dtype)
    eager_in = _leaves(masters, dtype)
    ref_in = _leaves([None if m is None else m.to(dtype) for m in masters], torch.float64)

    with counters.counting() as c:
        out = glu_mlp(*fused_in, act=act)
    assert c["swiglu"] == 1
    out_e = eager_mlp(*eager_in, act=act)
    out_r = eager_mlp(*ref_in, act=act)
    assert_no_worse(out, out_e, out_r, dtype, f"forward {act} {dtype}")

    go_d = go.to(dtype)
    grads = [t for t in fused_in if t is not None]
    g_f = torch.autograd.grad(out, grads, go_d)
    g_e = torch.autograd.grad(out_e, [t for t in eager_in if t is not None], go_d)
    g_r = torch.autograd.grad(out_r, [t for t in ref_in if t is not None], go_d.double())
    names = [n for n, m in zip(["x", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"], masters) if m is not None]
    for n, a, e, r in zip(names, g_f, g_e, g_r):
        assert_no_worse(a, e, r, dtype, f"grad {n} {act} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3)])
def test_glu_mlp_numerics(dtype, act, bias, lead):
    check_mlp(lead, H=5, inter=11, H2=5, dtype=dtype, act=act, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("scale", [1e-3, 50.0])
def test_glu_mlp_magnitudes(dtype, act, scale):
    check_mlp((2, 9), H=16, inter=24, H2=8, dtype=dtype, act=act, bias=True, scale=scale, seed=3)


def test_glu_mlp_moderate_size():
    check_mlp((4, 64), H=96, inter=256, H2=96, dtype=torch.float32, act="silu", bias=False)
    check_mlp((4, 64), H=96, inter=256, H2=96, dtype=torch.bfloat16, act="gelu_tanh", bias=True)


@pytest.mark.parametrize("act", list(ACTS))
def test_glu_mlp_gradcheck_fp64(act):
    masters, _ = make_mlp_inputs((2, 3), H=4, inter=5, H2=3, bias=True)
    ins = [m.clone().requires_grad_(True) for m in masters]
    assert torch.autograd.gradcheck(lambda *a: glu_mlp(*a, act=act), ins)


@pytest.mark.parametrize("frozen", ["x", "weights", "down_only"])
def test_glu_mlp_partial_requires_grad(frozen):
    masters, go = make_mlp_inputs((7,), H=5, inter=11, H2=6, bias=True)
    f_in, e_in = _leaves(masters, torch.float64), _leaves(masters, torch.float64)
    for ins in (f_in, e_in):
        for i, t in enumerate(ins):
            if (frozen == "x" and i == 0) or (frozen == "weights" and i > 0) or (frozen == "down_only" and i not in (3, 6)):
                t.requires_grad_(False)
    out, out_e = glu_mlp(*f_in), eager_mlp(*e_in)
    out.backward(go)
    out_e.backward(go)
    for a, e in zip(f_in, e_in):
        if e.requires_grad:
            torch.testing.assert_close(a.grad, e.grad)
        else:
            assert a.grad is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_glu_mlp_fused_gate_up_parameter(dtype):
    """Phi-3: one gate_up weight, split into views; gradients must land in the one parameter."""
    H, inter, N = 6, 7, 5
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(2 * inter, H, generator=gen, dtype=torch.float64) * 0.3
    Wd0 = torch.randn(H, inter, generator=gen, dtype=torch.float64) * 0.3
    x0 = torch.randn(N, H, generator=gen, dtype=torch.float64)
    go = torch.randn(N, H, generator=gen, dtype=torch.float64)

    def run(fused, dt):
        W = W0.to(dt).requires_grad_(True)
        Wd = Wd0.to(dt).requires_grad_(True)
        x = x0.to(dt).requires_grad_(True)
        if fused:
            out = glu_mlp(x, W[:inter], W[inter:], Wd)
        else:
            gate, up = F.linear(x, W).chunk(2, dim=-1)
            out = F.linear(F.silu(gate) * up, Wd)
        out.backward(go.to(dt))
        return out, x.grad, W.grad, Wd.grad

    fused, eager, ref = run(True, dtype), run(False, dtype), run(False, torch.float64)
    assert fused[2].shape == (2 * inter, H)
    for f, e, r in zip(fused, eager, ref):
        if dtype == torch.float64:
            torch.testing.assert_close(f, r)
        else:
            assert_no_worse(f, e, r, dtype, "phi3 fused gate_up")
    # both halves of W.grad are populated (not only one view)
    assert fused[2][:inter].abs().sum() > 0 and fused[2][inter:].abs().sum() > 0


def _saved_activation_bytes(fn, params):
    """Bytes of distinct storages saved for backward, excluding the parameters themselves."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st_ = t.untyped_storage()
        if st_.data_ptr() not in param_ptrs:
            seen[st_.data_ptr()] = st_.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("bias", [False, True])
def test_glu_mlp_saves_only_x_g_u(bias):
    lead, H, inter, H2 = (3, 10), 8, 24, 8
    masters, go = make_mlp_inputs(lead, H, inter, H2, bias)
    f_in, e_in = _leaves(masters, torch.float32), _leaves(masters, torch.float32)
    params_f = [t for t in f_in[1:] if t is not None]
    params_e = [t for t in e_in[1:] if t is not None]
    out, fused_bytes = _saved_activation_bytes(lambda: glu_mlp(*f_in), params_f)
    out_e, eager_bytes = _saved_activation_bytes(lambda: eager_mlp(*e_in), params_e)
    n_tok = 30
    expected = 4 * (n_tok * H + 2 * n_tok * inter)  # x + g + u, fp32
    assert fused_bytes == expected
    assert fused_bytes < eager_bytes
    # eager keeps x, g, act(g), u and h
    assert eager_bytes == 4 * (n_tok * H + 4 * n_tok * inter)
    # and the memory-lean backward is still right
    out.backward(go.float())
    out_e.backward(go.float())
    for a, e in zip(f_in, e_in):
        if a is not None:
            torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- glu (elementwise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(1,), (7, 11), (2, 3, 5)])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_glu_numerics(dtype, act, shape, scale):
    gen = torch.Generator().manual_seed(2)
    gm = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    um = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    go = torch.randn(*shape, generator=gen, dtype=torch.float64)
    (g, u), (ge, ue) = _leaves([gm, um], dtype), _leaves([gm, um], dtype)
    gr, ur = _leaves([gm.to(dtype), um.to(dtype)], torch.float64)
    with counters.counting() as c:
        out = glu(g, u, act)
    assert c["swiglu"] == 1
    out_e = ACTS[act](ge) * ue
    out_r = ACTS[act](gr) * ur
    assert_no_worse(out, out_e, out_r, dtype, "glu fwd")
    gf = torch.autograd.grad(out, [g, u], go.to(dtype))
    gee = torch.autograd.grad(out_e, [ge, ue], go.to(dtype))
    grr = torch.autograd.grad(out_r, [gr, ur], go.to(dtype).double())
    for n, a, e, r in zip(["gate", "up"], gf, gee, grr):
        assert_no_worse(a, e, r, dtype, f"glu grad {n}")


@pytest.mark.parametrize("act", list(ACTS))
def test_glu_gradcheck_and_saved(act):
    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: glu(a, b, act), (g, u))
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        glu(g, u, act)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {g.data_ptr(), u.data_ptr()}


def test_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError):
        glu(x, x, "relu")
    with pytest.raises(ValueError):
        glu(x, torch.randn(3, 5))
    with pytest.raises(ValueError):
        glu_mlp(x, torch.randn(6, 5), torch.randn(6, 5), torch.randn(4, 6))
    with pytest.raises(ValueError):
        glu_mlp(x, torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6), b_gate=torch.randn(5))


# ---------------------------------------------------------------- compile / opcheck


def test_compile_aot_eager():
    masters, go = make_mlp_inputs((2, 5), H=6, inter=9, H2=4, bias=True)
    f_in, e_in = _leaves(masters, torch.float32), _leaves(masters, torch.float32)

    def fn(x, wg, wu, wd, bg, bu, bd):
        return glu_mlp(x, wg, wu, wd, bg, bu, bd, act="gelu") + glu(x, x * 2.0, "silu").sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with counters.counting() as c:
        out = compiled(*f_in)
    assert c["swiglu"] == 2
    out_e = eager_mlp(*e_in, act="gelu") + (F.silu(e_in[0]) * (e_in[0] * 2.0)).sum()
    torch.testing.assert_close(out, out_e, rtol=1e-5, atol=1e-5)
    out.backward(go.float())
    out_e.backward(go.float())
    for a, e in zip(f_in, e_in):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_glu_mlp(bias):
    masters, go = make_mlp_inputs((2, 3), H=5, inter=7, H2=4, bias=bias)
    ins = _leaves(masters, torch.float32)
    torch.library.opcheck(torch.ops.einfuse.glu_mlp.default, (*ins, "silu"))
    x, wg, wu, wd = (t.detach() for t in ins[:4])
    _, g, u = torch.ops.einfuse.glu_mlp(x, wg, wu, wd, None, None, None, "gelu")
    needs = [True] * 4 + [bias] * 3
    torch.library.opcheck(
        torch.ops.einfuse.glu_mlp_backward.default, (go.float(), x, g, u, wg, wu, wd, "gelu", needs)
    )


def test_opcheck_glu():
    g = torch.randn(4, 6, requires_grad=True)
    u = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.einfuse.glu.default, (g, u, "gelu_tanh"))
    torch.library.opcheck(
        torch.ops.einfuse.glu_backward.default, (torch.randn(4, 6), g.detach(), u.detach(), "silu")
    )


# ---------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    H=st.integers(1, 9),
    inter=st.integers(1, 13),
    H2=st.integers(1, 7),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    act=st.sampled_from(list(ACTS)),
    bias=st.booleans(),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_glu_mlp_property(n, H, inter, H2, dtype, act, bias, scale, seed):
    check_mlp((n,), H, inter, H2, dtype, act, bias, scale, seed)
