"""Tests for einfuse::rope (fusion key "rope")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.graph import saved_tensors_hooks

import einfuse.runtime.ops.rope as rope_mod  # noqa: F401  (registers the ops)
from einfuse.runtime import counters
from einfuse.runtime.ops.rope import rope

try:
    from tests.ops._numerics import rel_err
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from _numerics import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------- eager references


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def hf_rope(q, k, cos, sin):
    """Hugging Face apply_rotary_pos_emb (+ Phi-style partial rotary), in the input dtype."""
    R = cos.shape[-1]
    if cos.dim() == 2:
        cos, sin = cos[None, None], sin[None, None]
    elif cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def f(x):
        xr, xp = x[..., :R], x[..., R:]
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((xr * c + _rotate_half(xr) * s, xp), dim=-1)

    return f(q), f(k)


def meta_rope(q, k, cos, sin):
    """Meta's view_as_complex RoPE (computes in fp32/fp64 complex, casts back), layout [B, H, S, D]."""
    R = 2 * cos.shape[-1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    freqs = torch.complex(cos.to(cdt), sin.to(cdt))
    if freqs.dim() == 2:
        freqs = freqs[None, None]
    elif freqs.dim() == 3:
        freqs = freqs.unsqueeze(1)

    def f(x):
        xr, xp = x[..., :R], x[..., R:]
        xc = torch.view_as_complex(xr.to(cdt).reshape(*xr.shape[:-1], -1, 2))
        rot = torch.view_as_real(xc * freqs).flatten(-2).type_as(x)
        return torch.cat((rot, xp), dim=-1)

    return f(q), f(k)


def assert_no_worse(fused, eager, ref, dtype, what):
    assert fused.dtype == eager.dtype == dtype, what
    assert fused.shape == ref.shape, what
    ef, ee = rel_err(fused, ref), rel_err(eager, ref)
    assert ef <= ee + TOL[dtype], f"{what}: fused err {ef:.3e} > eager err {ee:.3e} + {TOL[dtype]}"


def make_inputs(B, Hq, Hk, S, D, R, interleaved, cs_layout="bsr", scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(B, Hk, S, D, generator=gen, dtype=torch.float64) * scale
    r = R // 2 if interleaved else R
    pos = torch.arange(S, dtype=torch.float64)[:, None] + 3.0 * torch.arange(B, dtype=torch.float64)[:, None, None]
    inv = 10000.0 ** (-torch.arange(0, R // 2, dtype=torch.float64) * 2 / R)
    ang = pos * inv  # [B, S, R/2]
    if not interleaved:
        ang = torch.cat((ang, ang), dim=-1)  # HF: emb = cat(freqs, freqs)
    cos, sin = ang.cos(), ang.sin()  # [B, S, r]
    assert cos.shape[-1] == r
    if cs_layout == "b1sr":
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    elif cs_layout == "sr":
        cos, sin = cos[0], sin[0]
    elif cs_layout == "11sr":
        cos, sin = cos[:1].unsqueeze(1), sin[:1].unsqueeze(1)
    go_q = torch.randn(B, Hq, S, D, generator=gen, dtype=torch.float64)
    go_k = torch.randn(B, Hk, S, D, generator=gen, dtype=torch.float64)
    return q, k, cos, sin, go_q, go_k


def check(B, Hq, Hk, S, D, R, interleaved, dtype, cs_layout="b1sr", scale=1.0, seed=0):
    q, k, cos, sin, go_q, go_k = make_inputs(B, Hq, Hk, S, D, R, interleaved, cs_layout, scale, seed)
    eager_fn = meta_rope if interleaved else hf_rope
    # Inputs as a model would hand them over: q/k/cos/sin in the model dtype.
    qd, kd, cd, sd = (t.to(dtype) for t in (q, k, cos, sin))

    def leaves(dt):
        return qd.to(dt).requires_grad_(True), kd.to(dt).requires_grad_(True)

    (qf, kf), (qe, ke), (qr, kr) = leaves(dtype), leaves(dtype), leaves(torch.float64)
    with counters.counting() as c:
        of = rope(qf, kf, cd, sd, interleaved=interleaved)
    assert c["rope"] == 1
    oe = eager_fn(qe, ke, cd, sd)
    orf = eager_fn(qr, kr, cd.double(), sd.double())
    for n, a, e, r in zip("qk", of, oe, orf):
        assert_no_worse(a, e, r, dtype, f"fwd {n} interleaved={interleaved} {dtype}")
    gq, gk = go_q.to(dtype), go_k.to(dtype)
    gf = torch.autograd.grad(of, [qf, kf], [gq, gk])
    ge = torch.autograd.grad(oe, [qe, ke], [gq, gk])
    gr = torch.autograd.grad(orf, [qr, kr], [gq.double(), gk.double()])
    for n, a, e, r in zip("qk", gf, ge, gr):
        assert_no_worse(a, e, r, dtype, f"grad {n} interleaved={interleaved} {dtype}")


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    "B,Hq,Hk,S,D,R",
    [
        (2, 4, 2, 7, 12, 12),  # GQA, odd S, full rotary
        (1, 3, 1, 1, 12, 6),  # S = 1, partial rotary
        (2, 2, 2, 5, 12, 6),  # partial rotary (Phi style)
        (1, 5, 3, 9, 10, 4),  # odd head counts, D not a power of two
    ],
)
def test_rope_numerics(dtype, interleaved, B, Hq, Hk, S, D, R):
    check(B, Hq, Hk, S, D, R, interleaved, dtype)


@pytest.mark.parametrize("cs_layout", ["sr", "bsr", "b1sr", "11sr"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_cos_sin_layouts(cs_layout, interleaved):
    check(2, 3, 1, 6, 8, 8, interleaved, torch.float32, cs_layout=cs_layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 1e4])
def test_rope_magnitudes(dtype, interleaved, scale):
    check(2, 2, 1, 33, 16, 16, interleaved, dtype, scale=scale, seed=5)


def test_rope_moderate_size():
    check(2, 8, 2, 128, 64, 32, False, torch.bfloat16)
    check(2, 8, 2, 128, 64, 64, True, torch.float32)


def test_rope_matches_reference_fp64_exactly_in_structure():
    """Non-HF cos/sin (halves differ, arbitrary values) still follow x*cos + rotate_half(x)*sin."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 5, 10, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 10, generator=gen, dtype=torch.float64)
    cos = torch.randn(2, 1, 5, 6, generator=gen, dtype=torch.float64)
    sin = torch.randn(2, 1, 5, 6, generator=gen, dtype=torch.float64)
    for a, b in zip(rope(q, k, cos, sin), hf_rope(q, k, cos, sin)):
        torch.testing.assert_close(a, b)
    for a, b in zip(rope(q, k, cos[..., :3], sin[..., :3], interleaved=True), meta_rope(q, k, cos[..., :3], sin[..., :3])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gradcheck_including_cos_sin(interleaved):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    r = 2 if interleaved else 4  # partial rotary: R = 4 of D = 6
    for shape in [(2, 1, 3, r), (3, r), (2, 3, r)]:
        cos = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        sin = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: rope(*a, interleaved=interleaved), (q, k, cos, sin))
    # only sin requiring grad
    cos = torch.randn(3, r, generator=gen, dtype=torch.float64)
    sin = torch.randn(3, r, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: rope(a, b, cos, s, interleaved=interleaved), (q, k, sin))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_cos_sin_grad_fp32(interleaved):
    q, k, cos, sin, go_q, go_k = make_inputs(2, 3, 1, 5, 12, 8, interleaved, "bsr")
    ins_f = [t.float().requires_grad_(True) for t in (q, k, cos, sin)]
    ins_e = [t.float().requires_grad_(True) for t in (q, k, cos, sin)]
    ins_r = [t.clone().requires_grad_(True) for t in (q, k, cos, sin)]
    eager_fn = meta_rope if interleaved else hf_rope
    of, oe, orf = rope(*ins_f, interleaved=interleaved), eager_fn(*ins_e), eager_fn(*ins_r)
    gf = torch.autograd.grad(of, ins_f, [go_q.float(), go_k.float()])
    ge = torch.autograd.grad(oe, ins_e, [go_q.float(), go_k.float()])
    gr = torch.autograd.grad(orf, ins_r, [go_q, go_k])
    for n, a, e, r in zip(["q", "k", "cos", "sin"], gf, ge, gr):
        assert_no_worse(a, e, r, torch.float32, f"grad {n}")


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_saves_only_cos_sin(interleaved):
    q, k, cos, sin, _, _ = make_inputs(2, 4, 2, 6, 8, 8, interleaved, "b1sr")
    q.requires_grad_(True)
    k.requires_grad_(True)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rope(q, k, cos, sin, interleaved=interleaved)
    assert {t.untyped_storage().data_ptr() for t in saved} == {
        cos.untyped_storage().data_ptr(),
        sin.untyped_storage().data_ptr(),
    }


def test_rope_only_one_output_used():
    q, k, cos, sin, go_q, _ = make_inputs(1, 2, 2, 3, 8, 8, False, "sr")
    q.requires_grad_(True)
    k.requires_grad_(True)
    qo, _ = rope(q, k, cos, sin)
    qo.backward(go_q)
    qe, ke = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    hf_rope(qe, ke, cos, sin)[0].backward(go_q)
    torch.testing.assert_close(q.grad, qe.grad)
    assert k.grad is None or torch.count_nonzero(k.grad) == 0


def test_rope_bad_inputs():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError):  # rotary dim > head dim
        rope(q, q, torch.randn(3, 10), torch.randn(3, 10))
    with pytest.raises(ValueError):  # odd rotate-half dim
        rope(q, q, torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError):  # S mismatch
        rope(q, q, torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError):  # cos/sin shape mismatch
        rope(q, q, torch.randn(3, 8), torch.randn(3, 6))
    with pytest.raises(ValueError):  # 3-D q
        rope(q[0], q[0], torch.randn(3, 8), torch.randn(3, 8))


# ---------------------------------------------------------------- compile / opcheck


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_compile_aot_eager(interleaved):
    q, k, cos, sin, go_q, go_k = make_inputs(2, 4, 2, 5, 12, 6, interleaved, "b1sr")
    qf, kf = q.float().requires_grad_(True), k.float().requires_grad_(True)
    qe, ke = q.float().requires_grad_(True), k.float().requires_grad_(True)

    def fn(q_, k_, c_, s_):
        a, b = rope(q_ * 1.0, k_, c_, s_, interleaved=interleaved)
        return a + 1.0, b

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with counters.counting() as c:
        of = compiled(qf, kf, cos.float(), sin.float())
    assert c["rope"] == 1
    oe = (meta_rope if interleaved else hf_rope)(qe, ke, cos.float(), sin.float())
    torch.testing.assert_close(of[0], oe[0] + 1.0)
    torch.testing.assert_close(of[1], oe[1])
    torch.autograd.backward(of, [go_q.float(), go_k.float()])
    torch.autograd.backward(oe, [go_q.float(), go_k.float()])
    torch.testing.assert_close(qf.grad, qe.grad)
    torch.testing.assert_close(kf.grad, ke.grad)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("cs_grad", [False, True])
def test_rope_opcheck(interleaved, cs_grad):
    q, k, cos, sin, go_q, go_k = make_inputs(1, 3, 1, 4, 10, 6 if not interleaved else 8, interleaved, "sr")
    q, k, cos, sin = (t.float() for t in (q, k, cos, sin))
    args = (q.requires_grad_(True), k.requires_grad_(True), cos.requires_grad_(cs_grad), sin.requires_grad_(cs_grad))
    torch.library.opcheck(torch.ops.einfuse.rope.default, (*args, interleaved))
    torch.library.opcheck(
        torch.ops.einfuse.rope_backward.default, (go_q.float(), go_k.float(), cos.detach(), sin.detach(), interleaved)
    )


# ---------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    Hq=st.integers(1, 4),
    kv_div=st.sampled_from([1, 2, 4]),
    S=st.integers(1, 9),
    half_D=st.integers(1, 8),
    rot_frac=st.sampled_from([0.5, 1.0]),
    interleaved=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scale=st.sampled_from([1e-2, 1.0, 1e3]),
    cs_layout=st.sampled_from(["bsr", "b1sr"]),
    seed=st.integers(0, 2**16),
)
def test_rope_property(B, Hq, kv_div, S, half_D, rot_frac, interleaved, dtype, scale, cs_layout, seed):
    D = 2 * half_D
    R = max(2, 2 * int(half_D * rot_frac))
    Hk = max(1, Hq // kv_div)
    check(B, Hq, Hk, S, D, R, interleaved, dtype, cs_layout=cs_layout, scale=scale, seed=seed)
