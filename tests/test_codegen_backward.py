"""Generated contraction kernels for the backward passes (attention dQ / dK,dV, linear cross-entropy
dX / dW,dB) and the forward kernels they pair with, under TRITON_INTERPRET=1 at small, odd sizes:
against eager torch (the fp64 rule) and the cascade interpreter; and the fused attention and
linear cross-entropy ops routed to them by EINFUSE_KERNELS=triton.

Sizes are tiny on purpose (the interpreter is slow) but ragged against the 16-wide tiles, with
grouped-query heads, and with the contracted hidden rank split into several tiles.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see tests/test_codegen.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from einfuse.codegen import generate, launch, library  # noqa: E402
from einfuse.codegen import ops as K  # noqa: E402
from einfuse.ir.cascade import CascadeInterpreter  # noqa: E402
from einfuse.runtime import counters, dispatch  # noqa: E402

# the interpreter and private-cache fixtures (autouse) and the fp64-rule check of the forward kernels' tests
from tests.test_codegen import TOL, _fresh_dispatch, _interpreter, check  # noqa: E402,F401


# ---------------------------------------------------------------------------------------
# attention

def _eager_attention(q, k, v, mask, scale, causal, window, softcap):
    """Eager reference (same semantics as einfuse::attention): returns (out, lse)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + mask if mask.is_floating_point() else s.masked_fill(~mask, float("-inf"))
    S, T = q.shape[2], k.shape[2]
    i = torch.arange(S)[:, None] + (T - S)
    j = torch.arange(T)[None, :]
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    if window > 0:
        s = s.masked_fill(j <= i - window, float("-inf"))
    return s.softmax(-1) @ v, torch.logsumexp(s, -1)


CASES = [  # dtype, mask kind, causal, window, softcap, grad of lse too
    (torch.float32, None, False, -1, 0.0, False),
    (torch.float32, "bool", True, 9, 20.0, True),
    (torch.bfloat16, "additive", True, -1, 0.0, False),
]


@pytest.mark.parametrize("dtype,kind,causal,window,softcap,with_dlse", CASES)
def test_attention_forward_and_backward_kernels(dtype, kind, causal, window, softcap, with_dlse):
    """einfuse::attention and its backward on the generated kernels (attention_fwd, then
    attention_bwd_delta, attention_bwd_dq, attention_bwd_dkdv) vs eager in fp64 and in dtype."""
    torch.manual_seed(11)
    B, H, Hk, S, T, E, Fv = 1, 4, 2, 19, 37, 8, 12          # GQA 2:1, ragged tiles, head dims < 16
    q = (torch.randn(B, H, S, E) * 2).to(dtype)
    k, v = torch.randn(B, Hk, T, E).to(dtype), torch.randn(B, Hk, T, Fv).to(dtype)
    mask = None
    if kind == "bool":
        mask = torch.rand(B, 1, S, T) > 0.3
    elif kind == "additive":
        mask = torch.randn(1, 1, S, T).to(dtype)
    do = torch.randn(B, H, S, Fv).to(dtype)
    dl = torch.randn(B, H, S) if with_dlse else None
    o, lse = K.attention(q, k, v, mask, 0.3, causal, window, softcap, False)
    dq, dk, dv = K.attention_backward(do, dl, q, k, v, o, lse, mask, 0.3, causal, window, softcap, False)
    for name in ("attention_fwd", "attention_bwd_delta", "attention_bwd_dq", "attention_bwd_dkdv"):
        assert dispatch.launches[name] == 1, name

    def grads(q, k, v, m, do, dl):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, l_ = _eager_attention(q, k, v, m, 0.3, causal, window, softcap)
        loss = (out.float() * do.float()).sum() + ((l_.float() * dl).sum() if dl is not None else 0)
        loss.backward()
        return out.detach(), l_.detach(), q.grad, k.grad, v.grad
    md = mask.double() if kind == "additive" else mask
    ref = grads(q.double(), k.double(), v.double(), md, do.double(), None if dl is None else dl.double())
    eag = grads(q, k, v, mask, do, dl)
    for what, fused, e, r in zip(("out", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), eag, ref):
        check(fused, e.to(fused.dtype), r, f"attention {what} {dtype} {kind}")


def test_attention_backward_kernels_mean_what_their_cascades_mean():
    """One head through the cascade interpreter (fp64, tiles of 16) vs the kernels' dQ, dK, dV."""
    torch.manual_seed(12)
    S, T, E, Fv = 21, 18, 8, 5
    q, k, v, do = torch.randn(1, 1, S, E), torch.randn(1, 1, T, E), torch.randn(1, 1, T, Fv), torch.randn(1, 1, S, Fv)
    mask = torch.randn(1, 1, S, T)
    o, lse = K.attention(q, k, v, mask, 0.5, False, -1, 7.0, False)
    dq, dk, dv = K.attention_backward(do, None, q, k, v, o, lse, mask, 0.5, False, -1, 7.0, False)
    delta = (do * o).sum(-1)
    ins = {"Q": q[0, 0], "K": k[0, 0], "V": v[0, 0], "DO": do[0, 0], "LSE": lse[0, 0], "DELTA": delta[0, 0],
           "M": mask[0, 0]}
    ins = {n: t.double() for n, t in ins.items()}
    r_dq = CascadeInterpreter(library.attention_backward_dq(0.5, "additive", 7.0)).run(ins, sizes={"m0": 16})
    r_kv = CascadeInterpreter(library.attention_backward_dkdv(0.5, "additive", 7.0)).run(ins, sizes={"p0": 16})
    torch.testing.assert_close(dq[0, 0].double(), r_dq["DQ"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk[0, 0].double(), r_kv["DK"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv[0, 0].double(), r_kv["DV"], rtol=1e-5, atol=1e-5)


def test_the_attention_op_routes_forward_and_backward_to_the_kernels(monkeypatch):
    """EINFUSE_KERNELS=triton: einfuse::attention (autograd) runs the generated kernels and agrees
    with its CPU implementation, fully masked rows included (NaN like eager, or SDPA's zeros)."""
    from einfuse.runtime.ops.attention import attention
    torch.manual_seed(13)
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    mask = torch.rand(1, 1, 5, 7) > 0.4
    mask[..., 1, :] = False                                    # row 1: every key masked
    res = {}
    for mode in ("triton", "torch"):
        monkeypatch.setenv("EINFUSE_KERNELS", mode)
        dispatch.reset()
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        with counters.counting() as n:
            out = attention(qs, ks, vs, mask, scale=0.25, is_causal=True, sdpa_masked_rows=True)
            out.square().sum().backward()
        assert n["attention"] == 1 and n["attention_backward"] == 1
        launched = dispatch.launches["attention_fwd"] + dispatch.launches["attention_bwd_dkdv"]
        assert launched == (2 if mode == "triton" else 0), (mode, dict(dispatch.launches))
        res[mode] = (out.detach(), qs.grad, ks.grad, vs.grad)
    assert torch.equal(res["triton"][0][0, :, 1], torch.zeros(2, 16))
    for a, b in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    o_nan = attention(q, k, v, mask, scale=0.25, is_causal=True)   # default mode: NaN on the dead row
    assert torch.isnan(o_nan[0, :, 1]).all() and torch.isfinite(o_nan[0, :, 0]).all()


# ---------------------------------------------------------------------------------------
# linear cross-entropy

def _eager_lce(x, w, b, y, reduction, z_loss, softcap):
    z = F.linear(x, w, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z.float() if z.dtype != torch.float64 else z
    if not z_loss:
        return F.cross_entropy(z, y, reduction=reduction).to(x.dtype)   # the op's loss is in x's dtype
    valid = y != -100
    lse = torch.logsumexp(z, -1)
    row = (F.cross_entropy(z, y, reduction="none") + z_loss * lse * lse) * valid
    return (row.sum() / valid.sum() if reduction == "mean" else row.sum()).to(x.dtype)


LCE_CASES = [  # dtype, bias, reduction, z_loss, softcap, hidden tiles (launch.MAX_FULL_BLOCK)
    (torch.float32, False, "mean", 1e-3, 0.0, 16),
    (torch.float32, True, "sum", 0.0, 15.0, 256),
    (torch.bfloat16, False, "mean", 0.0, 0.0, 16),
]


@pytest.mark.parametrize("dtype,bias,reduction,z_loss,softcap,max_full", LCE_CASES)
def test_linear_cross_entropy_forward_and_backward_kernels(monkeypatch, dtype, bias, reduction, z_loss, softcap,
                                                           max_full):
    """einfuse::linear_cross_entropy with EINFUSE_KERNELS=triton: the loss from the LSE kernel and
    the gradients from the dX and dW(,dB) kernels; H = 40 is three tiles of 16 when max_full=16."""
    from einfuse.runtime.ops.linear_cross_entropy import linear_cross_entropy
    monkeypatch.setattr(launch, "MAX_FULL_BLOCK", max_full)
    monkeypatch.setattr(launch, "FULL_TILE", 16)
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    torch.manual_seed(14)
    N, V, H = 21, 50, 40
    x, w = (torch.randn(N, H) * 0.5).to(dtype), (torch.randn(V, H) * 0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    y = torch.randint(0, V, (N,))
    y[3] = y[10] = -100

    def run(fn, x, w, b):
        ts = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        loss = fn(ts[0], ts[1], ts[2])
        loss.backward()
        return [loss.detach()] + [t.grad for t in ts if t is not None]
    with counters.counting() as n:
        fused = run(lambda x, w, b: linear_cross_entropy(x, w, y, b, reduction=reduction, z_loss=z_loss,
                                                         softcap=softcap), x, w, b)
    assert n["linear_cross_entropy"] == 1
    suffix = ("_bias" if bias else "") + ("_softcap" if softcap else "")
    for name in ("linear_cross_entropy_fwd", "linear_cross_entropy_bwd_dx", "linear_cross_entropy_bwd_dw"):
        assert dispatch.launches[name + suffix] == 1, (name, dict(dispatch.launches))
    eager = run(lambda x, w, b: _eager_lce(x, w, b, y, reduction, z_loss, softcap), x, w, b)
    ref = run(lambda x, w, b: _eager_lce(x, w, b, y, reduction, z_loss, softcap), x.double(), w.double(),
              None if b is None else b.double())
    for what, f_, e_, r_ in zip(("loss", "dx", "dw", "db"), fused, eager, ref):
        check(f_, e_, r_, f"linear cross-entropy {what} {dtype}")


def test_linear_cross_entropy_kernels_mean_what_their_cascades_mean(monkeypatch):
    """The dX and dW, dB kernels (before the host's one-hot term) vs the cascade interpreter, with the
    hidden rank in tiles."""
    monkeypatch.setattr(launch, "MAX_FULL_BLOCK", 16)
    monkeypatch.setattr(launch, "FULL_TILE", 16)
    torch.manual_seed(15)
    N, V, H = 17, 35, 20
    x, w, b = torch.randn(N, H), torch.randn(V, H) * 0.5, torch.randn(V)
    lse = torch.logsumexp(10.0 * torch.tanh((x @ w.T + b) / 10.0), -1)
    a = torch.rand(N)
    ins = {"X": x, "W": w, "LSE": lse, "A": a, "B": b}
    got_x = K.run_cascade(library.linear_cross_entropy_backward_dx(True, 10.0), {n: t[None, None] for n, t in ins.items()},
                          {"DX": torch.float32}, compute="float32")["DX"][0, 0]
    got_w = K.run_cascade(library.linear_cross_entropy_backward_dw(True, 10.0), {n: t[None, None] for n, t in ins.items()},
                          {"DW": torch.float32, "DB": torch.float32}, compute="float32")
    d = {n: t.double() for n, t in ins.items()}
    r_x = CascadeInterpreter(library.linear_cross_entropy_backward_dx(True, 10.0)).run(d, sizes={"v0": 16})
    r_w = CascadeInterpreter(library.linear_cross_entropy_backward_dw(True, 10.0)).run(d, sizes={"p0": 16})
    torch.testing.assert_close(got_x.double(), r_x["DX"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w["DW"][0, 0].double(), r_w["DW"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w["DB"][0, 0].double(), r_w["DB"], rtol=1e-5, atol=1e-5)
    # and what the cascade says is the gradient: G = a * softmax(capped logits) * cap'
    z = (x @ w.T + b).double()
    t = torch.tanh(z / 10.0)
    g = a.double()[:, None] * torch.exp(10.0 * t - lse.double()[:, None]) * (1 - t * t)
    torch.testing.assert_close(r_x["DX"], g @ w.double(), rtol=1e-5, atol=1e-5)


def test_backward_kernels_are_contraction_programs_with_gpu_sized_dots():
    """Readable source: the cascade's tensor names, a comment per Einsum, every tl.dot fp32-exact."""
    for c in (library.attention_backward_dq(0.125, "causal", 0.0), library.attention_backward_dkdv(0.125, None, 0.0),
              library.linear_cross_entropy_backward_dx(), library.linear_cross_entropy_backward_dw(True)):
        g = generate(c)
        assert g.meta["program"] == "contraction"
        src = g.source
        for e in c.einsums:
            assert f"# {e.out}[" in src, (c.name, e.out)
        assert src.count("tl.dot(") >= 2 and src.count("tl.dot(") == src.count('input_precision="ieee"')
        assert "BLOCK_E_ONE_BLOCK" not in src and "E_ONE_BLOCK: tl.constexpr" in src
