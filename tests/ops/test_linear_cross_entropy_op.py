"""Tests for einfuse::linear_cross_entropy (fusion key "linear_cross_entropy").

Every numeric check follows the numerics rule: error of the fused op vs an fp64
eager reference (F.linear + F.cross_entropy in fp64 on the same, dtype-rounded
inputs) must be <= the error of plain eager torch in the same dtype + tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.graph import saved_tensors_hooks

import einfuse.runtime.ops.linear_cross_entropy as lce_mod
from einfuse.runtime import counters
from einfuse.runtime.ops.linear_cross_entropy import linear_cross_entropy

try:
    from tests.ops._numerics import rel_err
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from _numerics import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
GRAD_SCALE = 0.7  # backward with grad_output != 1 so the scaling path is exercised


def eager_loss(h, w, y, b=None, *, ignore_index=-100, reduction="mean", z_loss=0.0, softcap=0.0):
    """Unfused reference: F.linear + F.cross_entropy (+ z-loss, softcap), in the inputs' dtype."""
    logits = F.linear(h, w, b)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if z_loss == 0.0:
        return F.cross_entropy(logits, y, ignore_index=ignore_index, reduction=reduction)
    keep = y != ignore_index
    per = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none")
    per = per + z_loss * torch.logsumexp(logits, dim=-1) ** 2 * keep
    total = per.sum()
    return total / keep.sum() if reduction == "mean" else total


def make_inputs(n, hdim, v, *, bias=True, scale=1.0, ignore=0.0, ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=gen, dtype=torch.float64) * scale
    w = torch.randn(v, hdim, generator=gen, dtype=torch.float64) * hdim**-0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    if ignore > 0:
        mask = torch.rand(n, generator=gen) < ignore
        y = torch.where(mask, torch.full_like(y, ignore_index), y)
    return h, w, b, y


def _leaves(ts, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in ts]


def _run(fn, leaves, y, **kw):
    h, w, b = leaves
    with counters.counting() as cnt:
        loss = fn(h, w, y, b, **kw)
    if loss.requires_grad:
        (loss * GRAD_SCALE).backward()
    return loss, [None if t is None else t.grad for t in leaves], cnt


def assert_close_to_ref(fused, eager, ref, dtype, what):
    assert fused.dtype == eager.dtype, f"{what}: dtype {fused.dtype} vs eager {eager.dtype}"
    assert fused.shape == ref.shape, what
    if not ref.detach().any():
        # The fp64 reference can be exactly zero where the true value is merely tiny
        # (e.g. a fully saturated softcap: 1 - tanh**2 == 0 in fp64); relative error is
        # meaningless then, so require a negligible result instead (the saturated derivative
        # is ~1e-19 in fp32 where fp64 rounds it to 0; gradients here are O(1e-3..1)).
        assert torch.linalg.vector_norm(fused.detach().double()) <= 1e-12, what
        return
    ef, ee = rel_err(fused, ref), rel_err(eager, ref)
    assert ef <= ee + TOL[dtype], f"{what}: fused err {ef:.3e} > eager err {ee:.3e} + {TOL[dtype]}"


def check(n, hdim, v, dtype, *, bias=True, scale=1.0, ignore=0.0, seed=0, **kw):
    h, w, b, y = make_inputs(n, hdim, v, bias=bias, scale=scale, ignore=ignore,
                             ignore_index=kw.get("ignore_index", -100), seed=seed)
    rounded = [None if t is None else t.to(dtype).to(torch.float64) for t in (h, w, b)]
    f_loss, f_grads, cnt = _run(linear_cross_entropy, _leaves(rounded, dtype), y, **kw)
    assert cnt["linear_cross_entropy"] == 1, "fused op did not run"
    e_loss, e_grads, _ = _run(eager_loss, _leaves(rounded, dtype), y, **kw)
    r_loss, r_grads, _ = _run(eager_loss, _leaves(rounded, torch.float64), y, **kw)
    assert f_loss.dtype == dtype
    if torch.isnan(r_loss):  # all rows ignored with reduction="mean"
        assert bool((y == kw.get("ignore_index", -100)).all())
        assert torch.isnan(f_loss) and torch.isnan(e_loss)
        # like eager F.cross_entropy: zero gradients (the z-loss reference's 0/0 gives NaN)
        assert all(g is None or not g.any() for g in f_grads)
        return f_loss, r_loss
    else:
        assert torch.isfinite(f_loss)
        assert_close_to_ref(f_loss, e_loss, r_loss, dtype, "loss")
    for name, fg, eg, rg in zip(("hidden", "weight", "bias"), f_grads, e_grads, r_grads):
        if rg is None:
            assert fg is None
            continue
        assert fg is not None, f"no gradient for {name}"
        assert_close_to_ref(fg, eg, rg, dtype, f"grad {name}")
    return f_loss, r_loss


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Force chunks of `rows` rows for a vocabulary of `v` entries."""

    def set_rows(rows, v):
        monkeypatch.setattr(lce_mod, "CHUNK_BYTES", 4 * v * rows)
        assert lce_mod._chunk_rows(10_000, v) == rows

    return set_rows


DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 5, 33), (7, 5, 33), (7, 16, 33), (40, 24, 100), (33, 9, 257)]


# ---------------------------------------------------------------- forward + grads
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(dtype, shape, bias, reduction, tiny_chunks):
    n, hdim, v = shape
    tiny_chunks(3, v)  # several chunks, last one ragged
    check(n, hdim, v, dtype, bias=bias, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("onednn", [True, False])
def test_default_chunking(dtype, onednn, monkeypatch):
    # one chunk at the default chunk size; both matmul back ends (oneDNN linear / torch.mm)
    if onednn and not lce_mod._USE_ONEDNN:
        pytest.skip("oneDNN linear not available in this build")
    monkeypatch.setattr(lce_mod, "_USE_ONEDNN", onednn)
    check(64, 32, 500, dtype)
    check(9, 7, 33, dtype, z_loss=1e-3, softcap=3.0, ignore=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignore_index(dtype, ignore_index, reduction, tiny_chunks):
    tiny_chunks(4, 47)
    check(23, 12, 47, dtype, ignore=0.4, ignore_index=ignore_index, reduction=reduction, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("return_logits", [False, True])
def test_all_rows_ignored(dtype, reduction, return_logits):
    h, w, b, y = make_inputs(6, 8, 19, ignore=1.1)
    assert (y == -100).all()
    leaves = _leaves([h, w, b], dtype)
    out = linear_cross_entropy(*leaves[:2], y, leaves[2], reduction=reduction, return_logits=return_logits)
    loss = out[0] if return_logits else out
    e_leaves = _leaves([h, w, b], dtype)
    e_loss = eager_loss(*e_leaves[:2], y, e_leaves[2], reduction=reduction)
    assert loss.dtype == e_loss.dtype
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(e_loss)
    else:
        assert loss.item() == 0.0 == e_loss.item()
    loss.backward()
    e_loss.backward()
    for f, e in zip(leaves, e_leaves):
        assert torch.equal(f.grad, e.grad) and not f.grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_z_loss(dtype, reduction, tiny_chunks):
    tiny_chunks(5, 61)
    check(19, 10, 61, dtype, z_loss=1e-2, ignore=0.3, reduction=reduction, scale=3.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_softcap(dtype, bias, tiny_chunks):
    tiny_chunks(4, 70)
    check(21, 12, 70, dtype, bias=bias, softcap=5.0, scale=4.0, ignore=0.2)
    check(21, 12, 70, dtype, bias=bias, softcap=5.0, z_loss=1e-3, scale=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_large_magnitudes(dtype, reduction, tiny_chunks):
    # logits up to ~1e4: target probabilities underflow, exercising the exact-lse
    # recomputation for those rows
    tiny_chunks(3, 40)
    f_loss, r_loss = check(17, 16, 40, dtype, scale=3e3, reduction=reduction)
    assert r_loss.item() > 1e2 if reduction == "mean" else True
    # softcap bounds them again
    check(17, 16, 40, dtype, scale=3e3, softcap=30.0, reduction=reduction)


def test_large_magnitude_rows_are_exact():
    # rows whose target is far below the max must not collapse to inf / -log(0)
    h = torch.zeros(3, 2, dtype=torch.float64)
    h[:, 0] = torch.tensor([1e4, -1e4, 50.0])
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([1, 0, 2])
    ref = F.cross_entropy(F.linear(h, w), y, reduction="none")
    for i in range(3):
        out = linear_cross_entropy(h[i : i + 1].float(), w.float(), y[i : i + 1])
        assert torch.isfinite(out)
        assert abs(out.item() - ref[i].item()) <= 1e-6 * ref[i].item() + 1e-6


# ---------------------------------------------------------------- chunking really happens
def test_chunks_are_walked(monkeypatch, tiny_chunks):
    n, hdim, v = 11, 6, 29
    tiny_chunks(2, v)
    calls = []
    orig = lce_mod._chunk_logits

    def spy(*a, **k):
        out = orig(*a, **k)
        calls.append(tuple(out.shape))
        return out

    monkeypatch.setattr(lce_mod, "_chunk_logits", spy)
    check(n, hdim, v, torch.float32)
    assert calls == [(2, v)] * 5 + [(1, v)]


def test_chunk_size_budget():
    # default: a chunk of fp32 logits stays within CHUNK_BYTES (a few tens of MB)
    for v in (33, 32_000, 49_152, 128_256, 256_000):
        rows = lce_mod._chunk_rows(1 << 20, v)
        assert 1 <= rows and rows * v * 4 <= max(lce_mod.CHUNK_BYTES, 4 * v)
    assert lce_mod.CHUNK_BYTES <= 64 * 2**20
    assert lce_mod._chunk_rows(5, 49_152) == 5


def test_never_saves_logits_for_backward():
    n, hdim, v = 64, 8, 300
    h, w, b, y = make_inputs(n, hdim, v)
    leaves = _leaves([h, w, b], torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(*leaves[:2], y, leaves[2])
    # only references to the inputs go through save_for_backward ...
    assert saved
    input_ptrs = {t.data_ptr() for t in (*leaves, y)}
    assert all(t.data_ptr() in input_ptrs for t in saved), [tuple(t.shape) for t in saved]
    # ... and the node holds the precomputed fp32 gradients, nothing of size N x V
    held = [t for t in loss.grad_fn.precomputed if t is not None]
    assert sorted(tuple(t.shape) for t in held) == sorted([(n, hdim), (v, hdim), (v,)])
    assert all(t.dtype == torch.float32 for t in held)
    loss.backward()
    assert loss.grad_fn.precomputed is None  # handed over to autograd


# ---------------------------------------------------------------- backward hand-over
def test_backward_retain_graph_accumulate_and_reuse():
    # The first backward hands the precomputed gradients to autograd without a copy;
    # they must never alias anything the graph still uses.
    h, w, b, y = make_inputs(12, 6, 29, ignore=0.25)
    hf, wf, bf = (t.float().requires_grad_(True) for t in (h, w, b))
    hr, wr, br = (t.clone().requires_grad_(True) for t in (h, w, b))
    eager_loss(hr, wr, y, br).backward()
    ref = [hr.grad, wr.grad, br.grad]

    def grads():
        return [hf.grad.clone(), wf.grad.clone(), bf.grad.clone()]

    def close(gs, factor=1.0):
        return all(rel_err(g, factor * r) < 1e-5 for g, r in zip(gs, ref))

    loss = linear_cross_entropy(hf, wf, y, bf)
    loss.backward(retain_graph=True)
    assert close(grads())
    for t in (hf, wf, bf):  # zero_grad(set_to_none=False) mutates the adopted grads in place
        t.grad.zero_()
    with counters.counting() as cnt:
        loss.backward(retain_graph=True)  # recomputes: the first backward gave its copy away
    assert cnt["linear_cross_entropy"] == 1 and close(grads())
    (loss * 3.0).backward()  # accumulates into existing .grad, scaled
    assert close(grads(), 4.0)

    for t in (hf, wf, bf):
        t.grad = None
    (linear_cross_entropy(hf, wf, y, bf) + 0.5 * linear_cross_entropy(hf, wf, y, bf)).backward()
    assert close(grads(), 1.5)


# ---------------------------------------------------------------- logits output
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_return_logits(dtype, softcap, tiny_chunks):
    tiny_chunks(3, 37)
    h, w, b, y = make_inputs(2 * 5, 8, 37, ignore=0.3)
    h = h.reshape(2, 5, 8)
    y = y.reshape(2, 5)
    rounded = [t.to(dtype).to(torch.float64) for t in (h, w, b)]

    def fused(h_, w_, y_, b_, **kw):
        return linear_cross_entropy(h_, w_, y_, b_, return_logits=True, softcap=softcap)

    def eager(h_, w_, y_, b_):
        logits = F.linear(h_, w_, b_)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits.flatten(0, 1), y_.flatten()), logits

    with counters.counting() as cnt:
        f = fused(*_leaves(rounded[:2], dtype), y, _leaves(rounded[2:], dtype)[0])
    assert cnt["linear_cross_entropy"] == 1
    e = eager(*_leaves(rounded[:2], dtype), y, _leaves(rounded[2:], dtype)[0])
    r = eager(*_leaves(rounded[:2], torch.float64), y, _leaves(rounded[2:], torch.float64)[0])
    assert f[1].shape == (2, 5, 37) and f[1].dtype == dtype
    assert_close_to_ref(f[0], e[0], r[0], dtype, "loss")
    assert_close_to_ref(f[1], e[1], r[1], dtype, "logits")

    # gradients flowing through both the loss and the returned logits
    def total_grads(fn, dt):
        leaves = _leaves(rounded, dt)
        loss, logits = fn(leaves[0], leaves[1], y, leaves[2])
        (loss + 0.05 * (logits.float() ** 2).mean()).backward()
        return [t.grad for t in leaves]

    fg = total_grads(fused, dtype)
    eg = total_grads(eager, dtype)
    rg = total_grads(eager, torch.float64)
    for name, a, bb, c in zip(("hidden", "weight", "bias"), fg, eg, rg):
        assert_close_to_ref(a, bb, c, dtype, f"grad {name} (through logits)")

    # unused logits output: the loss-only gradients are unchanged
    leaves = _leaves(rounded, torch.float32)
    loss, _ = fused(leaves[0], leaves[1], y, leaves[2])
    loss.backward()
    e_leaves = _leaves(rounded, torch.float64)
    eager(e_leaves[0], e_leaves[1], y, e_leaves[2])[0].backward()
    for a, c in zip(leaves, e_leaves):
        assert rel_err(a.grad, c.grad) < 1e-5


# ---------------------------------------------------------------- no-grad path
def _op_names(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, [e.name for e in prof.events()]


@pytest.mark.parametrize("mode", ["no_grad", "frozen"])
def test_no_grad_skips_gradient_work(mode, tiny_chunks):
    tiny_chunks(4, 50)
    h, w, b, y = make_inputs(13, 7, 50, ignore=0.2)
    ref = eager_loss(h, w, y, b)
    hf, wf, bf = (t.float() for t in (h, w, b))
    if mode == "no_grad":
        for t in (hf, wf, bf):
            t.requires_grad_(True)
        ctx = torch.no_grad()
    else:  # nothing requires grad
        ctx = torch.enable_grad()
    with ctx:
        with counters.counting() as cnt:
            loss, names = _op_names(lambda: linear_cross_entropy(hf, wf, y, bf))
    assert cnt["linear_cross_entropy"] == 1
    assert not loss.requires_grad
    assert rel_err(loss, ref) < 1e-5
    n_chunks = math.ceil(int((y != -100).sum()) / 4)
    products = [nm for nm in names if nm in ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise")]
    assert len(products) == n_chunks  # the logits only: no P @ W
    for grad_op in ("aten::addmm_", "aten::scatter_add_", "aten::addmv_"):
        assert grad_op not in names, grad_op
    # the raw op returns empty gradient outputs
    outs = torch.ops.einfuse.linear_cross_entropy(hf.detach(), wf.detach(), y, bf.detach(), -100, "mean",
                                                  0.0, 0.0, False, False, False, False)
    assert [o.numel() for o in outs[1:]] == [0, 0, 0, 0]


def test_partial_requires_grad_only_computes_needed():
    # frozen lm_head (e.g. LoRA): only grad_hidden is computed
    h, w, b, y = make_inputs(9, 6, 31)
    hf = h.float().requires_grad_(True)
    wf, bf = w.float(), b.float()
    loss, names = _op_names(lambda: linear_cross_entropy(hf, wf, y, bf))
    assert "aten::addmm_" not in names and "aten::addmv_" not in names
    assert "aten::scatter_add_" in names
    loss.backward()
    hr = h.clone().requires_grad_(True)
    eager_loss(hr, w, y, b).backward()
    assert rel_err(hf.grad, hr.grad) < 1e-5


# ---------------------------------------------------------------- errors
def test_errors():
    h, w, b, y = (t if not torch.is_floating_point(t) else t.float() for t in make_inputs(4, 3, 7))
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, y, b, reduction="none")
    with pytest.raises(IndexError):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 7, 2]), b)
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w.double(), y, b)


# ---------------------------------------------------------------- compile / opcheck
def test_compile_aot_eager(tiny_chunks):
    tiny_chunks(3, 23)
    h, w, b, y = make_inputs(10, 6, 23, ignore=0.3)
    y2 = y.reshape(2, 5)

    def fn(h_, w_, y_, b_):
        loss, logits = linear_cross_entropy(h_.reshape(2, 5, 6), w_, y_, b_, z_loss=1e-3,
                                            softcap=3.0, return_logits=True)
        return loss * 2.0, logits

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    f_in = _leaves([h, w, b], torch.float32)
    with counters.counting() as cnt:
        f_loss, f_logits = compiled(f_in[0], f_in[1], y2, f_in[2])
        f_loss.backward()
    assert cnt["linear_cross_entropy"] >= 1
    e_in = _leaves([h, w, b], torch.float32)
    e_loss, e_logits = fn(e_in[0], e_in[1], y2, e_in[2])
    e_loss.backward()
    assert rel_err(f_loss, e_loss) < 1e-6 and rel_err(f_logits, e_logits) < 1e-6
    for a, c in zip(f_in, e_in):
        assert rel_err(a.grad, c.grad) < 1e-6


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("return_logits", [False, True])
def test_opcheck(bias, return_logits):
    h, w, b, y = make_inputs(6, 5, 11, bias=bias, ignore=0.3)
    h, w = h.float().requires_grad_(True), w.float().requires_grad_(True)
    b = None if b is None else b.float().requires_grad_(True)
    args = (h, w, y, b, -100, "mean", 1e-3, 2.0 if return_logits else 0.0, return_logits, True, True, bias)
    torch.library.opcheck(torch.ops.einfuse.linear_cross_entropy.default, args)
    # inference flavour
    args_ng = (h.detach(), w.detach(), y, None if b is None else b.detach(), -100, "sum", 0.0, 0.0,
               return_logits, False, False, False)
    torch.library.opcheck(torch.ops.einfuse.linear_cross_entropy.default, args_ng)


# ---------------------------------------------------------------- property test
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    hdim=st.integers(1, 12),
    v=st.integers(2, 60),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.1, 1.0, 30.0, 1e3]),
    bias=st.booleans(),
    ignore=st.sampled_from([0.0, 0.5]),
    reduction=st.sampled_from(["mean", "sum"]),
    z_loss=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([0.0, 10.0]),
    rows=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_property(n, hdim, v, dtype, scale, bias, ignore, reduction, z_loss, softcap, rows, seed):
    old = lce_mod.CHUNK_BYTES
    lce_mod.CHUNK_BYTES = 4 * v * rows
    try:
        check(n, hdim, v, dtype, bias=bias, scale=scale, ignore=ignore, reduction=reduction,
              z_loss=z_loss, softcap=softcap, seed=seed)
    finally:
        lce_mod.CHUNK_BYTES = old
