"""Activation sparsity (CHESS, MoC, CoreInfer): the op, the pass, calibration, generate().

The op's output is checked against the dense MLP restricted to the channels the method chooses, with the
channel choice recomputed here independently (fp64 reference; fused error <= eager error + tol).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.calibrate import Calibration
from einfuse.passes.sparsity import layer_key, reset_sparsity_state, sparsity_state
from einfuse.runtime import counters
from einfuse.runtime.ops import sparse_mlp
from einfuse.runtime.ops.sparse_mlp import STATE, glu_mlp_observe, sparse_glu_mlp
from einfuse.models import TinyLlama, TinyLlamaConfig
from hf_models import build, rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
P = ("sparsity",)


def _inputs(lead, H, inter, H2, bias, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, k=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * k  # noqa: E731
    x = r(*lead, H, k=scale)
    ws = [r(inter, H, k=H ** -0.5), r(inter, H, k=H ** -0.5), r(H2, inter, k=inter ** -0.5)]
    bs = [r(inter), r(inter), r(H2)] if bias else [None, None, None]
    return [x, *ws, *bs]


def _masked(ins, mask, act):
    """The dense MLP restricted to the kept channels, in plain torch (any dtype)."""
    x, wg, wu, wd, bg, bu, bd = ins
    h = ACTS[act](F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    return F.linear(h * mask.to(h.dtype), wd, bd)


def _choose(ins, method, k=None, thr=None, act="silu"):
    """The channels each token keeps, recomputed from the definition in plain torch (inputs' dtype, the
    activation in fp32 for bf16 as the op does)."""
    x, wg, _, _, bg, _, _ = ins
    g = F.linear(x, wg, bg)
    a = ACTS[act](g.float() if g.dtype == torch.bfloat16 else g).abs()
    if method == "chess":
        return a > thr.double()
    idx = a.topk(k, dim=-1).indices
    return torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True)


def _cast(ins, dtype):
    return [None if t is None else t.to(dtype) for t in ins]


# ------------------------------------------------------------------------------------------ the op

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["chess", "moc"])
@pytest.mark.parametrize("lead", [(1, 1), (2, 5), (1, 37)])  # one token (gather path), a few, many (union)
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_op_equals_dense_restricted_to_chosen_channels(dtype, method, lead, bias):
    H, inter, H2 = 24, 40, 19
    ins64 = _inputs(lead, H, inter, H2, bias)
    k = 13
    a = ACTS["silu"](F.linear(ins64[0], ins64[1], ins64[4])).abs().reshape(-1, inter)
    thr = a.quantile(0.6, dim=0).float()  # per-channel thresholds: ~60% sparsity
    ins = _cast(ins64, dtype)
    mask = _choose(ins, method, k=k, thr=thr)
    with counters.counting() as calls:
        out, got_mask = torch.ops.einfuse.sparse_glu_mlp(*ins, thr if method == "chess" else None, "silu", method,
                                                        k, "t")
    assert calls["sparsity"] == 1
    assert torch.equal(got_mask, mask), "the op kept other channels than the method's definition"
    if method == "moc":
        assert int(got_mask.sum(-1).min()) == int(got_mask.sum(-1).max()) == k
    ref = _masked(ins64, mask, "silu")
    eager = _masked(ins, mask, "silu")
    ef, ee = rel_err(out, ref), rel_err(eager, ref)
    assert out.dtype == dtype and out.shape == ref.shape
    assert ef <= ee + TOL[dtype], f"fused {ef:.3e} > eager {ee:.3e} + {TOL[dtype]}"


def test_sparse_op_union_covering_most_channels_uses_the_dense_product_with_the_same_result():
    H, inter, H2 = 16, 20, 16
    ins = _cast(_inputs((64,), H, inter, H2, True), torch.float32)
    out, mask = torch.ops.einfuse.sparse_glu_mlp(*ins, None, "gelu", "moc", 15, "t")
    assert bool(mask.any(0).all())  # 64 tokens x 15 of 20: the union is every channel
    ref = _masked(_cast(ins, torch.float64), mask, "gelu")
    assert rel_err(out, ref) <= rel_err(_masked(ins, mask, "gelu"), ref) + 1e-5


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_sparse_op_gradients_match_the_masked_dense_mlp(act):
    H, inter, H2 = 12, 18, 10
    ins64 = _inputs((2, 3), H, inter, H2, True, seed=3)
    go = torch.randn(2, 3, H2, dtype=torch.float64)
    mask = _choose(ins64, "moc", k=7, act=act)
    leaves = [t.float().requires_grad_(True) for t in ins64]
    out = sparse_glu_mlp(*leaves, act=act, method="moc", k=7)
    out.backward(go.float())
    ref_leaves = [t.clone().requires_grad_(True) for t in ins64]
    _masked(ref_leaves, mask, act).backward(go)
    eag_leaves = [t.float().requires_grad_(True) for t in ins64]
    _masked(eag_leaves, mask, act).backward(go.float())
    for name, a, r, e in zip(("x", "wg", "wu", "wd", "bg", "bu", "bd"), leaves, ref_leaves, eag_leaves):
        assert rel_err(a.grad, r.grad) <= rel_err(e.grad, r.grad) + 1e-5, name
    # pruned channels get no gradient through the up / gate rows of a channel no token kept
    unused = ~mask.reshape(-1, inter).any(0)
    if unused.any():
        assert leaves[2].grad[unused].abs().max() == 0


def test_coreinfer_prefill_is_dense_then_decode_uses_exactly_the_core_channels():
    H, inter, H2, S = 20, 32, 20, 9
    ins = _cast(_inputs((1, S), H, inter, H2, True, seed=5), torch.float32)
    wd = ins[3]
    reset_sparsity_state()
    k = 12
    with counters.counting() as calls:
        out, mask = torch.ops.einfuse.sparse_glu_mlp(*ins, None, "silu", "coreinfer", k, "layer0")
    assert calls["sparsity"] == 1 and bool(mask.all())
    ref = _masked(_cast(ins, torch.float64), torch.ones(inter, dtype=torch.bool), "silu")
    assert rel_err(out, ref) < 1e-6  # prefill: the dense MLP
    core = STATE.get(wd).idx[0]
    # the core set from the definition: each token votes for its top 10% |act(g) * u| (3 of 32 channels);
    # the k most voted win
    x, wg, wu, _, bg, bu, _ = ins
    h = (F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)).abs()[0]
    kt = round(sparse_mlp.CORE_TOKEN_FRACTION * inter)
    votes = torch.zeros(inter).scatter_add_(0, h.topk(kt, -1).indices.reshape(-1), torch.ones(S * kt))
    assert core.numel() == k
    assert votes[core].min() >= votes[~torch.isin(torch.arange(inter), core)].max()
    # decode: one new token, only the core channels
    step = _cast(_inputs((1, 1), H, inter, H2, True, seed=6), torch.float32)
    ins_step = [step[0]] + ins[1:]
    before = STATE.decodes
    out1, mask1 = torch.ops.einfuse.sparse_glu_mlp(*ins_step, None, "silu", "coreinfer", k, "layer0")
    assert STATE.decodes == before + 1
    want = torch.zeros(inter, dtype=torch.bool)
    want[core] = True
    assert torch.equal(mask1.reshape(-1), want)
    ref1 = _masked(_cast(ins_step, torch.float64), want, "silu")
    assert rel_err(out1, ref1) <= rel_err(_masked(ins_step, want, "silu"), ref1) + 1e-5
    # a new prefill replaces the core set; a reset forgets it (next one-token call is dense)
    reset_sparsity_state()
    out2, mask2 = torch.ops.einfuse.sparse_glu_mlp(*ins_step, None, "silu", "coreinfer", k, "layer0")
    assert bool(mask2.all())


def test_coreinfer_continuation_scores_like_token_by_token_decoding():
    H, inter, H2 = 16, 24, 12
    ins = _cast(_inputs((1, 7), H, inter, H2, True, seed=12), torch.float32)
    steps = _cast(_inputs((1, 4), H, inter, H2, True, seed=13), torch.float32)[0]
    reset_sparsity_state()
    torch.ops.einfuse.sparse_glu_mlp(*ins, None, "silu", "moc", 0, "l")  # (moc: no state involved)
    sparse_glu_mlp(*ins, method="coreinfer", k=9)  # prefill: picks the core channels
    one_by_one = torch.cat([sparse_glu_mlp(steps[:, i:i + 1], *ins[1:], method="coreinfer", k=9)
                            for i in range(4)], 1)
    with sparse_mlp.continuation():
        together = sparse_glu_mlp(steps, *ins[1:], method="coreinfer", k=9)
    assert torch.allclose(together, one_by_one, atol=1e-6)
    assert bool(sparse_glu_mlp(steps, *ins[1:], method="coreinfer", k=9).ne(together).any())  # a new prefill


def test_coreinfer_batched_sequences_get_their_own_core_channels():
    H, inter, H2 = 16, 24, 16
    ins = _cast(_inputs((3, 6), H, inter, H2, False, seed=8), torch.float32)
    reset_sparsity_state()
    torch.ops.einfuse.sparse_glu_mlp(*ins, None, "silu", "coreinfer", 8, "l")
    idx = STATE.get(ins[3]).idx
    assert idx.shape == (3, 8)
    step = _cast(_inputs((3, 1), H, inter, H2, False, seed=9), torch.float32)[0]
    out, mask = torch.ops.einfuse.sparse_glu_mlp(step, *ins[1:], None, "silu", "coreinfer", 8, "l")
    want = torch.zeros(3, inter, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(mask.reshape(3, inter), want)
    ref = _masked(_cast([step] + ins[1:], torch.float64), want[:, None, :], "silu")
    assert rel_err(out, ref) < 1e-5


def test_opcheck_and_compile():
    H, inter, H2 = 8, 12, 6
    ins = _cast(_inputs((2, 3), H, inter, H2, True), torch.float32)
    thr = torch.full((inter,), 0.2)
    for t, method, k in ((thr, "chess", 0), (None, "moc", 5), (None, "coreinfer", 5)):
        leaves = [a.clone().requires_grad_(True) for a in ins]
        torch.library.opcheck(torch.ops.einfuse.sparse_glu_mlp.default, (*leaves, t, "silu", method, k, "op"))
    leaves = [a.clone().requires_grad_(True) for a in ins]
    torch.library.opcheck(torch.ops.einfuse.glu_mlp_observe.default, (*leaves, "gelu", "", "op"))

    def fn(*a):
        return sparse_glu_mlp(*a, method="moc", k=5).square().sum()

    leaves = [a.clone().requires_grad_(True) for a in ins]
    ref_leaves = [a.clone().requires_grad_(True) for a in ins]
    with counters.counting() as calls:
        torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves).backward()
    fn(*ref_leaves).backward()
    assert calls["sparsity"] == 1
    for a, b in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 9), H=st.integers(1, 17), inter=st.integers(2, 29), H2=st.integers(1, 13),
       frac=st.floats(0.05, 0.95), scale=st.sampled_from([1e-3, 1.0, 1e3]), bias=st.booleans(),
       method=st.sampled_from(["chess", "moc"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_sparse_op(tokens, H, inter, H2, frac, scale, bias, method, dtype):
    ins64 = _inputs((tokens,), H, inter, H2, bias, scale=scale, seed=tokens * 31 + H)
    ins = _cast(ins64, dtype)
    k = max(1, int(inter * (1 - frac)))
    a = ACTS["silu"](F.linear(ins[0].double(), ins[1].double(), None if ins[4] is None else ins[4].double())).abs()
    thr = a.quantile(frac, dim=0).float() * 1.0001
    out, mask = torch.ops.einfuse.sparse_glu_mlp(*ins, thr if method == "chess" else None, "silu", method, k, "p")
    if method == "moc":  # ties in low precision may pick a different but equally large channel
        assert bool((mask.sum(-1) == k).all())
    else:
        assert torch.equal(mask, _choose(ins, "chess", thr=thr))
    ref = _masked(ins64, mask, "silu")
    assert rel_err(out, ref) <= rel_err(_masked(ins, mask, "silu"), ref) + TOL[dtype]


# ------------------------------------------------------------------------------------ the pass / API

@pytest.fixture(scope="module")
def llama():
    return build("llama").eval()  # Hugging Face, 2 layers: generate()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(vocab_size=96, hidden=32, intermediate=48, layers=2, heads=4)).eval()


@pytest.fixture(scope="module")
def cal(llama):
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 96, (2, 24), generator=g) for _ in range(4)]
    return einfuse.calibrate(llama, batches, sparsity={"method": "chess", "target": 0.5}, progress=False)


@pytest.fixture(scope="module")
def tiny_cal(tiny):
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 96, (2, 24), generator=g) for _ in range(6)]
    return einfuse.calibrate(tiny, batches, sparsity={"method": "chess", "target": 0.5}, progress=False)


def test_target_zero_is_exactly_the_original_model(tiny, tiny_cal):
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tiny(ids)
        for method in ("chess", "moc", "coreinfer"):
            torch._dynamo.reset()
            fast = einfuse.optimize(tiny, passes=P, sparsity={"method": method, "target": 0.0}, calibration=tiny_cal)
            with counters.counting() as calls:
                got = fast(ids)
            assert torch.equal(got, want), method
            assert not calls and not [r for r in fast.einfuse_report.regions if r.kind == "sparsity"]
            assert all(not p.changed for p in fast.einfuse_report.passes)


def test_calibrated_thresholds_reach_the_target_on_held_out_batches(tiny, tiny_cal, tmp_path):
    cal = tiny_cal
    assert len(cal) == 2 and cal.keys() == ["blocks.0.down.weight", "blocks.1.down.weight"]
    assert set(cal.tokens.values()) == {6 * 2 * 24}
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    raw = path.read_bytes()
    header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])  # safetensors: a JSON header, no pickle
    assert header["__metadata__"]["format"] == "einfuse-calibration"
    loaded = einfuse.calibrate.load(path)
    for key in cal.keys():
        assert torch.equal(loaded.thresholds(key, 0.5), cal.thresholds(key, 0.5))
        # CHESS: one layer-wide lambda on |act(g_i)| * E|u_i|, i.e. t_i = lambda / E|u_i| ...
        lam = cal.thresholds(key, 0.5) * cal.up_mean[key]
        assert torch.allclose(lam, lam.mean().expand_as(lam), rtol=1e-4)
        # ... that skips the target fraction of the calibration activations
        assert abs(cal.sparsity_at(key, cal.thresholds(key, 0.5)) - 0.5) < 1e-3
    g = torch.Generator().manual_seed(99)
    held = [torch.randint(0, 96, (2, 24), generator=g) for _ in range(4)]
    for target in (0.3, 0.5, 0.7):
        torch._dynamo.reset()
        fast = einfuse.optimize(tiny, passes=P, sparsity={"method": "chess", "target": target}, calibration=loaded)
        with sparse_mlp.measuring() as m, torch.no_grad():
            for b in held:
                fast(b)
        assert m.total > 0
        assert abs(m.sparsity - target) <= 0.03, f"target {target}: held-out sparsity {m.sparsity:.3f}"
        assert fast.einfuse_report.fusions["sparsity"] == 2


def test_calibration_file_must_be_a_calibration(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(ValueError, match="not an einfuse calibration"):
        Calibration.load(p)


@pytest.mark.parametrize("method", ["chess", "moc", "coreinfer"])
def test_generate_works_with_each_method(llama, cal, method):
    torch._dynamo.reset()
    reset_sparsity_state()
    fast = einfuse.optimize(llama, passes=P, sparsity={"method": method, "target": 0.5}, calibration=cal)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    decodes = STATE.decodes
    with counters.counting() as calls, sparse_mlp.measuring() as m:
        out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                            do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13) and torch.equal(out[:, :10], ids)
    assert calls["sparsity"] == 3 * 2  # every forward (prefill + 2 decode steps) through every layer's MLP
    if method == "coreinfer":
        assert STATE.decodes - decodes == 2 * 2  # decode steps (two different graphs) ran on the core channels
        assert set(sparsity_state(llama)) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
        assert abs(m.sparsity - 0.5 * 2 / (10 + 2)) < 1e-6  # dense prefill (10 tokens), 2 sparse steps
    else:
        assert 0.35 < m.sparsity < 0.65


def test_composes_with_the_fusions():
    """Full pipeline (swiglu fuses the MLP, then this pass sparsifies the glu_mlp call)."""
    model = build("llama").eval()
    torch._dynamo.reset()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    fast = einfuse.optimize(model, sparsity={"method": "moc", "target": 0.4})
    with counters.counting() as calls:
        out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                            do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    rep = fast.einfuse_report
    assert rep.fusions["swiglu"] == rep.fusions["sparsity"] > 0
    assert {r.bindings["form"] for r in rep.regions if r.kind == "sparsity" and r.fused} == {"glu_mlp"}
    assert calls["sparsity"] == 2 * 2 and calls["rmsnorm"] > 0 and "swiglu" not in calls
    # the same MLP keys as the plain recogniser (so a calibration from passes=("sparsity",) applies)
    keys = {r.bindings["key"] for r in rep.regions if r.kind == "sparsity"}
    assert keys == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_chess_without_statistics_for_an_mlp_is_reported_and_left_dense(tiny):
    other = Calibration({"method": "chess", "target": 0.5})
    other.quantiles["blocks.0.down.weight"] = torch.linspace(0, 1, 201).repeat(48, 1)
    torch._dynamo.reset()
    cfg = einfuse.OptimizeConfig(passes=P, sparsity={"method": "chess", "target": 0.5}, calibration=other)
    rep = einfuse.inspect(tiny, torch.randint(0, 96, (1, 5)), config=cfg)
    assert rep.fusions["sparsity"] == 1
    reasons = [r.reason for r in rep.unfused if r.kind == "sparsity"]
    assert len(reasons) == 1 and "no calibration statistics for 'blocks.1.down.weight'" in reasons[0]


def test_layer_key_names_the_down_projection():
    import torch.fx as fx
    g = fx.Graph()
    p = g.placeholder("L_self_modules_model_modules_layers_modules_12_modules_mlp_modules_down_proj_parameters_weight_")
    assert layer_key(p, 0, 0) == "model.layers.12.mlp.down_proj.weight"
    assert layer_key(None, 3, 1) == "g1.mlp3"


@pytest.mark.parametrize("opts, err", [
    ({"sparsity": {"method": "relu", "target": 0.5}}, "method must be one of"),
    ({"sparsity": {"method": "moc", "target": 1.0}}, r"target must be a number in \[0, 1\)"),
    ({"sparsity": {"method": "moc", "target": 0.5, "k": 3}}, "unknown sparsity key 'k'"),
    ({"sparsity": {"method": "chess", "target": 0.5}}, "needs calibrated thresholds"),
    ({"sparsity": {"method": "moc", "target": 0.5}, "passes": ("rmsnorm",)}, "leaves out the 'sparsity' pass"),
    ({"layer_skip": 1.5}, r"layer_skip must be a number in \[0, 1\)"),
    ({"calibration": {"a": 1}}, "calibration must be an einfuse.calibrate"),
])
def test_options_are_validated(opts, err):
    with pytest.raises((ValueError, TypeError), match=err):
        einfuse.OptimizeConfig(**opts)


def test_observe_op_is_the_dense_mlp():
    ins = _cast(_inputs((3, 4), 8, 10, 7, True), torch.float32)
    ref = _masked(_cast(ins, torch.float64), torch.ones(10, dtype=torch.bool), "silu")
    with counters.counting() as calls:
        out = glu_mlp_observe(*ins, act="silu", collector="nobody", key="k")
    assert calls["calibration"] == 1
    assert rel_err(out, ref) <= rel_err(_masked(ins, torch.ones(10, dtype=torch.bool), "silu"), ref) + 1e-5


@pytest.mark.parametrize("method", ["chess", "moc"])
def test_one_token_cpu_kernel_reads_only_the_kept_channels(method):
    """Decode (one fp32 token on CPU) runs the compiled kernel (sparse_mlp_cpu.py); poisoning every pruned
    channel's up row and down column with NaN leaves the result finite and equal to the masked dense MLP."""
    from einfuse.runtime.ops import sparse_mlp_cpu
    if not sparse_mlp_cpu.available():
        pytest.skip("no C compiler: the torch gather path runs (covered above)")
    H, inter, H2 = 40, 96, 24
    ins64 = _inputs((1, 1), H, inter, H2, True, seed=21)
    ins = _cast(ins64, torch.float32)
    a = F.silu(F.linear(ins[0], ins[1], ins[4])).abs().reshape(-1)
    thr = torch.full((inter,), float(a.median()))
    k = 30
    mask = _choose(ins, method, k=k, thr=thr).reshape(-1)
    poisoned = list(ins)
    poisoned[2] = ins[2].clone()
    poisoned[2][~mask] = float("nan")
    poisoned[3] = ins[3].clone()
    poisoned[3][:, ~mask] = float("nan")
    with counters.counting() as calls:
        out, got = torch.ops.einfuse.sparse_glu_mlp(*poisoned, thr if method == "chess" else None, "silu", method,
                                                    k, "t")
    assert calls["sparsity_cpu_kernel"] == 1
    assert torch.equal(got.reshape(-1), mask) and torch.isfinite(out).all()
    ref = _masked(ins64, mask, "silu")
    assert rel_err(out, ref) <= rel_err(_masked(ins, mask, "silu"), ref) + 1e-5
