"""The sparse MLP's Triton kernels (einfuse/runtime/ops/sparse_mlp_triton.py) in Triton's interpreter.

EINFUSE_KERNELS=triton routes CPU tensors to the Triton path (it needs TRITON_INTERPRET=1, set before
anything imports triton). The kernels read only the kept rows; the result must equal the dense MLP
restricted to the chosen channels (fp64 reference; kernel error <= eager error + tol).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see tests/test_codegen.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from einfuse.runtime import dispatch  # noqa: E402
from einfuse.runtime.ops import sparse_mlp_triton  # noqa: E402
from hf_models import rel_err  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    from einfuse.codegen.launch import _check_interpreter
    _check_interpreter()  # fails loudly if triton was imported before TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    dispatch.reset()
    yield
    dispatch.reset()


def _inputs(N, H, inter, H2, bias, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, k=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * k  # noqa: E731
    return [r(N, H), r(inter, H, k=H ** -0.5), r(inter, H, k=H ** -0.5), r(H2, inter, k=inter ** -0.5),
            *([r(inter), r(inter), r(H2)] if bias else [None, None, None])]


def _masked(ins, mask):
    x, wg, wu, wd, bg, bu, bd = ins
    h = F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    return F.linear(h * mask.to(h.dtype), wd, bd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["chess", "moc"])
@pytest.mark.parametrize("N, bias", [(1, False), (1, True), (5, True), (3, False)])
def test_triton_sparse_mlp_equals_dense_restricted_to_chosen_channels(dtype, method, N, bias):
    H, inter, H2 = 40, 72, 33  # not multiples of the blocks: masked tails
    ins64 = _inputs(N, H, inter, H2, bias, seed=N * 7 + bias)
    ins = [None if t is None else t.to(dtype) for t in ins64]
    a = F.silu(F.linear(ins[0], ins[1], ins[4]).float()).abs()
    thr = a.double().quantile(0.5, dim=0).float() if N > 1 else torch.full((inter,), float(a.median()))
    k = 20
    out, mask = torch.ops.einfuse.sparse_glu_mlp(*ins, thr if method == "chess" else None, "silu", method, k, "t")
    assert dispatch.launches["sparse_mlp_up"] == 1 and dispatch.launches["sparse_mlp_down"] == 1
    top = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, 1).indices, True)
    want = a > thr if method == "chess" else top
    assert torch.equal(mask, want)
    ref = _masked(ins64, mask)
    ef, ee = rel_err(out, ref), rel_err(_masked(ins, mask), ref)
    assert out.dtype == dtype and ef <= ee + TOL[dtype], f"kernel {ef:.3e} > eager {ee:.3e}"


def test_kernels_read_only_the_kept_rows():
    """Poison every pruned row of w_up and w_down^T with NaN: the result stays finite and exact."""
    H, inter, H2, N = 24, 50, 16, 2
    ins = [None if t is None else t.float() for t in _inputs(N, H, inter, H2, True, seed=3)]
    x, _, wu, wd, _, bu, bd = ins
    idx = torch.tensor([3, 4, 17, 30, 49])
    a_k = torch.randn(N, idx.numel())
    m_k = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    pruned = torch.ones(inter, dtype=torch.bool)
    pruned[idx] = False
    wu_p, wdt_p = wu.clone(), wd.t().contiguous()
    wu_p[pruned] = float("nan")
    wdt_p[pruned] = float("nan")
    out = sparse_mlp_triton.sparse_rows(x, a_k, m_k, idx, wu_p, bu, wdt_p, bd)
    h = a_k * m_k * (x.double() @ wu[idx].double().t() + bu[idx].double()).float()
    ref = h.double() @ wd[:, idx].double().t() + bd.double()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5
