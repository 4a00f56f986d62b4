"""Quantization: schemes, kernels, the quantized-linear op, the pass on tiny models, save/load, bad inputs.

Numerics: a quantized op is compared with its own fp64 reference (the dequantized
weight, and for w8a8 / llm_int8 the int8-rounded activations), under the project's
rule: its error is no larger than plain eager torch's on the same inputs
(F.linear with the dequantized fp32 weight) plus 1e-5 (fp32) / 1e-2 (bf16).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import einfuse
import einfuse.quant as Q
from einfuse.quant import cpu_kernels
from einfuse.quant.modules import QuantizedEmbedding, QuantizedLinear
from einfuse.quant.schemes import (SCHEMES, dequantize_weight, pack_codes, quantize_rows, quantize_weight,
                                   reference_linear, unpack_codes)
from einfuse.runtime import counters
from einfuse.runtime.ops import quantized_linear as qlop
from einfuse.runtime.ops.quantized_linear import quantized_linear, quantized_linear_op

from hf_models import build

ALL = tuple(SCHEMES)
GROUP = {"int4": 32, "int6": 64}


def rel_err(out, ref) -> float:
    o, r = out.detach().double(), ref.detach().double()
    den = r.norm().item()
    return (o - r).norm().item() / den if den else (o - r).norm().item()


def make_state(scheme, n=24, k=128, symmetric=True, seed=0, group=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    gs = group if group is not None else GROUP.get(scheme, 0)
    return w, gs, quantize_weight(w, scheme, gs, symmetric)


def call(x, st, scheme, gs, k, bias=None, outliers=None, threshold=6.0):
    return quantized_linear(x, st["qweight"], st["scales"], st["offsets"], bias, scheme=scheme, group_size=gs,
                            in_features=k, outliers=outliers, threshold=threshold)


def ref(x, st, scheme, gs, k, bias=None, outliers=None, threshold=6.0):
    return reference_linear(x, st["qweight"], st["scales"], st["offsets"], bias, scheme, gs, k, outliers, threshold)


def eager(x, st, scheme, gs, k, bias=None):
    """Plain eager torch at x's dtype: the 'unfused' comparison of the numerics rule (weight-only)."""
    w = dequantize_weight(st["qweight"], st["scales"], st["offsets"], scheme, gs, k, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("bits,gs", [(4, 2), (4, 32), (4, 64), (6, 4), (6, 64), (6, 128)])
def test_pack_unpack_roundtrip(bits, gs):
    k = 2 * max(gs, 64)
    u = torch.randint(0, 1 << bits, (7, k), dtype=torch.uint8)
    p = pack_codes(u, bits, gs)
    assert p.shape == (7, k // 2 if bits == 4 else 3 * k // 4) and p.dtype == torch.uint8
    assert torch.equal(unpack_codes(p, bits, gs, k), u)


def _rtn_group_err(w, bits, gs, symmetric):
    """Plain round-to-nearest on the full range (written out here independently): per-group squared error."""
    wg = w.view(w.shape[0], -1, gs)
    if symmetric:
        z = 1 << (bits - 1)
        s = wg.abs().amax(-1, keepdim=True) / (z - 1)
        d = torch.round(wg / s).clamp(-z, z - 1) * s
    else:
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        s = (hi - lo) / ((1 << bits) - 1)
        d = torch.round((wg - lo) / s) * s + lo
    return (d - wg).square().sum(-1)


@pytest.mark.parametrize("scheme,symmetric", [("int8", True), ("int4", True), ("int4", False), ("int6", True),
                                              ("int6", False)])
def test_dequantize_error_bounds(scheme, symmetric):
    w, gs, st = make_state(scheme, n=32, k=256, symmetric=symmetric)
    d = dequantize_weight(st["qweight"], st["scales"], st["offsets"], scheme, gs, 256)
    if scheme == "int8":  # per-channel round-to-nearest: every error within half a step
        assert ((d - w).abs() <= st["scales"][:, None] / 2 + 1e-7).all()
        assert rel_err(d, w) < 0.01
        return
    bits = SCHEMES[scheme].bits
    err = (d - w).view(32, -1, gs).square().sum(-1)
    # the scale search never does worse than plain round-to-nearest, group by group
    assert (err <= _rtn_group_err(w, bits, gs, symmetric) * (1 + 1e-5) + 1e-12).all()
    bound = {4: 0.12, 6: 0.03}[bits]
    assert rel_err(d, w) < bound
    if symmetric:
        assert st["offsets"] is None and st["scales"].shape == (32, 256 // gs)
    else:
        assert st["offsets"].shape == st["scales"].shape


def test_activation_rows_quantization():
    x = torch.randn(5, 40) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.0])[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and (q.abs() <= 127).all()
    assert ((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-6).all()
    assert (q[4] == 0).all() and s[4] == 1.0  # an all-zero row


# ---------------------------------------------------------------- the op

@pytest.mark.parametrize("scheme", ALL)
@pytest.mark.parametrize("m", [1, 3, 5, 40])  # 40 rows: the dequantize + sgemm path
def test_op_matches_reference(scheme, m):
    k = 192 if scheme != "int6" else 128
    w, gs, st = make_state(scheme, n=20, k=k)
    x = torch.randn(m, k)
    b = torch.randn(20)
    with counters.counting() as c:
        y = call(x, st, scheme, gs, k, b)
    assert c["quantized_linear"] == 1
    r = ref(x, st, scheme, gs, k, b)
    if SCHEMES[scheme].activations == "none":
        assert rel_err(y, r) <= rel_err(eager(x, st, scheme, gs, k, b), r) + 1e-5
    else:  # int8 activations: integer matmul is exact; only fp32 rescaling rounds
        assert rel_err(y, r) < 1e-6
    assert y.dtype == x.dtype and y.shape == (m, 20)


@pytest.mark.parametrize("scheme,gs,k", [("int8", 0, 37), ("int4", 2, 36), ("int4", 16, 48), ("int6", 4, 36),
                                         ("int6", 32, 96)])
def test_op_portable_paths(scheme, gs, k):
    """Group sizes / widths the AVX-512 path does not tile run the portable C loop; also the torch fallback."""
    w, _, st = make_state(scheme, n=9, k=k, group=gs)
    x = torch.randn(2, k)
    r = ref(x, st, scheme, gs, k)
    assert rel_err(call(x, st, scheme, gs, k), r) <= rel_err(eager(x, st, scheme, gs, k), r) + 1e-5


def test_op_torch_fallback(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    for scheme in ("int8", "int4", "int6"):
        w, gs, st = make_state(scheme, k=128)
        x = torch.randn(3, 128)
        r = ref(x, st, scheme, gs, 128)
        assert rel_err(call(x, st, scheme, gs, 128), r) <= rel_err(eager(x, st, scheme, gs, 128), r) + 1e-5


def test_kernels_are_compiled_here():
    """The fast path exists on this machine (CI has a C compiler); if not, this says why."""
    assert cpu_kernels.available(), cpu_kernels.status()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_op_3d_bf16_and_fp64(scheme):
    w, gs, st = make_state(scheme, k=128)
    x = torch.randn(2, 3, 128)
    r = ref(x, st, scheme, gs, 128)
    xb = x.to(torch.bfloat16)
    yb = call(xb, st, scheme, gs, 128)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 24)
    assert rel_err(yb, r) <= rel_err(eager(xb, st, scheme, gs, 128), r) + 1e-2
    y64 = call(x.double(), st, scheme, gs, 128)
    assert y64.dtype == torch.float64 and rel_err(y64, r) < 1e-12


def test_llm_int8_outliers():
    k = 64
    w, gs, st = make_state("llm_int8", n=16, k=k)
    x = torch.randn(6, k)
    x[2, 5] = 40.0  # an outlier: column 5 goes to fp for the whole batch
    x[:, 9] *= 8.0
    y = call(x, st, "llm_int8", 0, k)
    r = ref(x, st, "llm_int8", 0, k)
    assert rel_err(y, r) < 1e-6
    # the outlier columns really are computed in fp: per-token int8 of the whole row is much worse
    w8 = ref(x, st, "w8a8", 0, k)
    exact = x.double() @ dequantize_weight(st["qweight"], st["scales"], None, "int8", 0, k, torch.float64).t()
    assert rel_err(y, exact) < 0.25 * rel_err(w8, exact)
    # calibrated (static) columns are kept in fp even below the threshold
    static = torch.tensor([3, 17])
    xs = torch.randn(4, k)
    y = call(xs, st, "llm_int8", 0, k, outliers=static)
    assert rel_err(y, ref(xs, st, "llm_int8", 0, k, outliers=static)) < 1e-6
    assert rel_err(y, ref(xs, st, "llm_int8", 0, k)) > 1e-7  # and that changes the result


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_op_gradients(scheme):
    k = 128
    w, gs, st = make_state(scheme, k=k)
    x = torch.randn(3, 5, k, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    y = call(x, st, scheme, gs, k, b)
    g = torch.randn_like(y)
    y.backward(g)
    wd = dequantize_weight(st["qweight"], st["scales"], st["offsets"], scheme, gs, k, torch.float64)
    gx_ref = g.double() @ wd
    xe = x.detach().clone().requires_grad_()
    be = b.detach().clone().requires_grad_()
    F.linear(xe, wd.float(), be).backward(g)  # unfused eager fp32
    assert rel_err(x.grad, gx_ref) <= rel_err(xe.grad, gx_ref) + 1e-5
    assert rel_err(b.grad, g.sum((0, 1)).double()) <= rel_err(be.grad, g.sum((0, 1)).double()) + 1e-5


@pytest.mark.parametrize("scheme", ["int4", "llm_int8"])
def test_opcheck(scheme):
    k = 64
    w, gs, st = make_state(scheme, n=8, k=k)
    x = torch.randn(3, k, requires_grad=True)
    b = torch.randn(8)
    outl = torch.tensor([1, 7]) if scheme == "llm_int8" else None
    torch.library.opcheck(quantized_linear_op, (x, st["qweight"], st["scales"], st["offsets"], b, outl, scheme, gs,
                                                k, 6.0))
    torch.library.opcheck(qlop.quantized_linear_backward_op,
                          (torch.randn(3, 8), st["qweight"], st["scales"], st["offsets"], scheme, gs, k))


def test_compile_forward_backward():
    k = 64
    w, gs, st = make_state("int4", n=8, k=k)

    def fn(x):
        return call(x, st, "int4", gs, k).square().sum()

    x = torch.randn(4, k, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with counters.counting() as c:
        out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
        out.backward()
    assert c["quantized_linear"] >= 1
    fn(x2).backward()
    assert rel_err(out, fn(x2.detach())) < 1e-6 and rel_err(x.grad, x2.grad) < 1e-6


@settings(max_examples=25, deadline=None)
@given(scheme=st.sampled_from(ALL), m=st.integers(1, 30), n=st.integers(1, 40), groups=st.integers(1, 4),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), sym=st.booleans(), bf16=st.booleans())
def test_property_op_vs_reference(scheme, m, n, groups, scale, sym, bf16):
    sch = SCHEMES[scheme]
    gs = 64 if sch.grouped else 0
    k = 64 * groups + (0 if sch.grouped else 3)
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = torch.randn(n, k, generator=g)
    st_ = quantize_weight(w, scheme, gs, sym or not sch.grouped)
    x = torch.randn(m, k, generator=g) * scale
    if bf16:
        x = x.to(torch.bfloat16)
    y = call(x, st_, scheme, gs, k, threshold=6.0 * scale)
    r = ref(x, st_, scheme, gs, k, threshold=6.0 * scale)
    if sch.activations == "none":
        assert rel_err(y, r) <= rel_err(eager(x, st_, scheme, gs, k), r) + (1e-2 if bf16 else 1e-5)
    else:
        assert rel_err(y, r) < (1e-2 if bf16 else 1e-5)


# ---------------------------------------------------------------- the pass on models

def tiny(seed=0, tied=False, **kw):
    torch.manual_seed(seed)
    m = build("llama", hidden_size=64, intermediate_size=128, vocab_size=128, **kw).eval()
    if tied:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    return m


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
LOGIT_ERR = {"int8": 0.03, "int4": 0.3, "int6": 0.08, "llm_int8": 0.04, "w8a8": 0.04}


@pytest.mark.parametrize("scheme", ALL)
def test_tiny_llama_end_to_end(scheme):
    """Quantize in place, fp weights gone, logits close to fp, generate() works; through einfuse.optimize
    (int4; compiling is the slow part) the fusions still happen around the quantized projections."""
    fp = tiny()
    with torch.no_grad():
        ref_logits = fp(input_ids=IDS).logits
    model = copy.deepcopy(fp)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    through_optimize = scheme == "int4"
    if through_optimize:
        opt = einfuse.optimize(model, quantize=scheme)
        summary = opt.einfuse_quantization
    else:
        summary = Q.quantize(model, scheme)
    # the original module object is quantized in place (its linears replaced), fp weights gone
    lin = model.model.layers[0].mlp.gate_proj
    assert isinstance(lin, QuantizedLinear) and lin.scheme == scheme
    sd = model.state_dict()
    assert "model.layers.0.mlp.gate_proj.qweight" in sd and "model.layers.0.mlp.gate_proj.scales" in sd
    assert "model.layers.0.mlp.gate_proj.weight" not in sd
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    after = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert summary.bytes_after == after < before <= summary.bytes_before
    with torch.no_grad(), counters.counting() as c:
        eager_q = model(input_ids=IDS).logits
    assert c["quantized_linear"] == 14
    assert rel_err(eager_q, ref_logits) < LOGIT_ERR[scheme]
    g = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert g.shape == (1, 13)
    if not through_optimize:
        return
    with torch.no_grad(), counters.counting() as c:
        out = opt(input_ids=IDS).logits
    assert c["quantized_linear"] == 14 and c["swiglu"] == 2 and c["attention"] == 2
    assert rel_err(out, eager_q) < 1e-5
    rep = opt.einfuse_report
    f = rep.fusions
    assert f["quantize"] == 14 and f["swiglu"] == 2 and f["attention"] == 2 and f["rmsnorm"] == 5
    assert any("parameter bytes" in n for n in rep.notes)
    assert any(r.kind == "quantize" and r.anchor == "lm_head" and "default" in r.reason for r in rep.unfused)


def test_asymmetric_option_dict():
    model = tiny()
    einfuse.optimize(model, quantize={"scheme": "int4", "group_size": 32, "symmetric": False})
    o = model.model.layers[1].self_attn.o_proj
    assert o.offsets is not None and o.group_size == 32 and o.scales.shape == (64, 2)


def test_group_size_fallback_note():
    model = build("llama", hidden_size=96, intermediate_size=192, vocab_size=64, head_dim=24).eval()
    s = Q.quantize(model, "int4")
    assert model.model.layers[0].self_attn.q_proj.group_size == 32       # 96: 128 and 64 do not divide
    assert model.model.layers[0].mlp.down_proj.group_size == 64          # 192
    assert any("group size 128 does not divide 96: used 32" in n for n in s.notes)


def test_layer_with_no_listed_group_stays_fp():
    model = build("llama", hidden_size=64, intermediate_size=48, vocab_size=64).eval()
    s = Q.quantize(model, "int4")
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert "no group size" in s.skipped["model.layers.0.mlp.down_proj"]


def test_filters_and_report():
    model = tiny()
    rep = einfuse.Report()
    s = Q.quantize(model, "int8", include=["*.mlp.*", "*.self_attn.q_proj"], exclude="*.layers.1.*",
                   min_size=64 * 100, report=rep)
    assert set(s.quantized) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                "model.layers.0.mlp.down_proj"}  # q_proj: 64*64 < min_size
    assert "min_size" in s.skipped["model.layers.0.self_attn.q_proj"]
    assert "excluded" in s.skipped["model.layers.1.mlp.gate_proj"]
    assert "not matched" in s.skipped["model.layers.0.self_attn.k_proj"]
    assert rep.fusions["quantize"] == 3 and len([r for r in rep.unfused if r.kind == "quantize"]) == len(s.skipped)


def test_lm_head_and_embeddings_tied():
    fp = tiny(tied=True)
    with torch.no_grad():
        r = fp(input_ids=IDS).logits
    m1 = copy.deepcopy(fp)
    s1 = Q.quantize(m1, "int8", lm_head=True)
    assert isinstance(m1.lm_head, QuantizedLinear) and isinstance(m1.model.embed_tokens, nn.Embedding)
    assert m1.config.tie_word_embeddings is False and any("untied" in n for n in s1.notes)
    m2 = copy.deepcopy(fp)
    s2 = Q.quantize(m2, "int8", lm_head=True, embeddings=True)
    assert isinstance(m2.model.embed_tokens, QuantizedEmbedding)
    assert m2.model.embed_tokens.qweight is m2.lm_head.qweight  # one shared table
    assert s2.bytes_after < s1.bytes_after
    with torch.no_grad():
        for m in (m1, m2):
            assert rel_err(m(input_ids=IDS).logits, r) < 0.03
    assert m2.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, 12)


@pytest.mark.parametrize("scheme", ALL)
def test_save_load_roundtrip(scheme, tmp_path):
    model = tiny(tied=scheme == "int4")
    kw = {"embeddings": True, "lm_head": True} if scheme == "int4" else {}
    cal = [IDS] if scheme == "llm_int8" else None
    if scheme == "llm_int8":  # a low threshold: calibrated outlier columns, a different number per layer
        kw = {"threshold": 1.0}
    Q.quantize(model, scheme, calibration=cal, progress=False, **kw)
    if scheme == "llm_int8":
        counts = {m.outliers.numel() for m in model.modules() if isinstance(m, QuantizedLinear)}
        assert len(counts) > 1 and max(counts) > 0
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    path = Q.save_quantized(model, tmp_path / "m.safetensors")
    assert Q.read_metadata(path)["format"] == "einfuse.quant/1"
    fresh = tiny(seed=7, tied=scheme == "int4")  # different random weights: all must come from the file
    Q.load_quantized(fresh, path)
    with torch.no_grad():
        got = fresh(input_ids=IDS).logits
    assert torch.equal(got, want)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if scheme == "int4":
        assert fresh.model.embed_tokens.qweight is fresh.lm_head.qweight
    with open(path, "rb") as f:  # safetensors: a JSON header, raw tensors, no pickle opcodes
        assert b"\x80\x04" not in f.read(64)


def test_calibration_outliers_and_gptq():
    model = tiny()
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[11] = 400.0  # column 11 of the MLP input explodes
    s = Q.quantize(model, "llm_int8", calibration=[IDS, IDS[:, :4]], progress=True)
    cols = model.model.layers[0].mlp.gate_proj.outliers
    assert 11 in cols.tolist() and model.model.layers[0].mlp.up_proj.outliers.tolist() == cols.tolist()
    assert any("calibration" in n for n in s.notes)
    del emb
    # GPTQ: lower output error than round-to-nearest on correlated inputs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    lin = nn.Linear(64, 32, bias=False)
    from einfuse.quant.gptq import gptq_quantize
    for scheme, gs, act in (("int4", 32, False), ("int4", 32, True), ("int8", 0, False)):
        st_g = gptq_quantize(lin.weight, x.double().t() @ x.double(), scheme, gs, act_order=act)
        st_r = quantize_weight(lin.weight, scheme, gs)
        y = x @ lin.weight.t()
        e_g = rel_err(x @ dequantize_weight(st_g["qweight"], st_g["scales"], None, scheme, gs, 64).t(), y)
        e_r = rel_err(x @ dequantize_weight(st_r["qweight"], st_r["scales"], None, scheme, gs, 64).t(), y)
        assert e_g < 0.8 * e_r, (scheme, act, e_g, e_r)


def test_composes_with_layer_skip():
    model = build("llama", hidden_size=64, intermediate_size=128, vocab_size=128, num_hidden_layers=4).eval()
    opt = einfuse.optimize(model, quantize="int8", layer_skip=0.25)
    with torch.no_grad(), counters.counting() as c:
        opt(input_ids=IDS, use_cache=False)
    assert 0 < c["quantized_linear"] < 28  # a skipped layer's quantized projections do not run


def test_composes_with_sparsity():
    """Attention projections quantized, MLPs kept in fp by the name filter: the MLPs are sparsified (moc),
    attention and RMSNorm still fuse around the quantized q/k/v/o; quantized MLPs would stay dense (reason)."""
    model = tiny()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    opt = einfuse.optimize(model, quantize={"scheme": "int8", "exclude": "*.mlp.*"},
                           sparsity={"method": "moc", "target": 0.0001})
    with torch.no_grad(), counters.counting() as c:
        got = opt(input_ids=IDS).logits
    assert c["quantized_linear"] == 8 and c["sparsity"] == 2 and c["attention"] == 2 and c["rmsnorm"] == 5
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)
    assert rel_err(got, want) < LOGIT_ERR["int8"]
    rep = opt.einfuse_report
    assert rep.fusions["sparsity"] == 2 and rep.fusions["quantize"] == 8
    assert any("excluded by pattern" in r.reason for r in rep.unfused if r.kind == "quantize")
    both = einfuse.optimize(tiny(), quantize="int8", sparsity={"method": "moc", "target": 0.5})
    with torch.no_grad(), counters.counting() as c:
        both(input_ids=IDS)
    assert c["quantized_linear"] == 14 and "sparsity" not in c
    assert all("projections are quantized" in r.reason for r in both.einfuse_report.unfused if r.kind == "sparsity")


# ---------------------------------------------------------------- Triton kernels (interpreted in CI)

TRITON_CASES = [("int8", 0, True), ("int4", 32, True), ("int4", 64, False), ("int6", 64, True), ("int6", 32, False),
                ("w8a8", 0, True), ("llm_int8", 0, True)]


@pytest.mark.parametrize("scheme,gs,sym", TRITON_CASES)
@pytest.mark.parametrize("m", [1, 19])
def test_triton_kernels_interpreted(monkeypatch, scheme, gs, sym, m):
    """EINFUSE_KERNELS=triton sends CPU tensors through the Triton kernel under TRITON_INTERPRET=1 (conftest)."""
    from einfuse.runtime import dispatch
    pytest.importorskip("triton")
    assert dispatch.interpreting()
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    k = 192 if scheme != "int6" else 128
    w, _, st_ = make_state(scheme, n=40, k=k, symmetric=sym, group=gs)  # 40 outputs: ragged 16-wide tiles
    x = torch.randn(m, k)
    x[0, 3] = 30.0  # an LLM.int8() outlier column
    b = torch.randn(40)
    dispatch.launches.clear()
    with counters.counting() as c:
        y = call(x, st_, scheme, gs, k, b)
    assert dispatch.launches[f"quantized_linear_{scheme}"] == 1 and c["quantized_linear"] == 1
    r = ref(x, st_, scheme, gs, k, b)
    if SCHEMES[scheme].activations == "none":
        assert rel_err(y, r) <= rel_err(eager(x, st_, scheme, gs, k, b), r) + 1e-5
    else:
        assert rel_err(y, r) < 1e-6
    if m == 19 and scheme in ("int4", "w8a8"):  # bf16 in, bf16 out
        xb = x.to(torch.bfloat16)
        yb = call(xb, st_, scheme, gs, k, b)
        assert yb.dtype == torch.bfloat16
        rb = ref(xb, st_, scheme, gs, k, b)
        tol = rel_err(eager(xb, st_, scheme, gs, k, b), rb) if SCHEMES[scheme].activations == "none" else 0.0
        assert rel_err(yb, rb) <= tol + 1e-2


def test_triton_not_used_for_cpu_tensors_by_default(monkeypatch):
    from einfuse.runtime import dispatch
    monkeypatch.delenv("EINFUSE_KERNELS", raising=False)
    w, gs, st_ = make_state("int4", k=128)
    dispatch.launches.clear()
    call(torch.randn(2, 128), st_, "int4", gs, 128)
    assert not any(k.startswith("quantized_linear") for k in dispatch.launches)


def test_triton_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter accepts more than the GPU compiler: compile each variant to sm_90 cubin (no GPU needed),
    in a subprocess (this process imported triton in interpreter mode)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    import json
    import os
    import subprocess
    import sys
    script = ("import json\nfrom einfuse.quant.triton_kernels import aot_compile\nout = {}\n"
              "for s, a in (('int8', 0), ('int4', 0), ('int4', 1), ('int6', 1), ('w8a8', 0)):\n"
              "    asm = aot_compile(s, asymmetric=bool(a))\n"
              "    out[s + str(a)] = [sorted(asm), asm['ptx'].count('mma')]\n"
              "print('RESULT' + json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.split("RESULT", 1)[1])
    assert set(res) == {"int80", "int40", "int41", "int61", "w8a80"}
    for name, (stages, mma) in res.items():
        assert stages == ["cubin", "llir", "ptx", "source", "ttgir", "ttir"], name
    assert res["w8a80"][1] > 0  # the int8 x int8 dot became tensor-core (mma) instructions


# ---------------------------------------------------------------- bad input

def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        einfuse.OptimizeConfig(quantize="int3")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        Q.quantize(tiny(), "fp8")
    with pytest.raises(ValueError, match="group size 48 does not divide in_features 64"):
        Q.quantize(tiny(), "int4", group_size=48)
    with pytest.raises(ValueError, match="group_size applies to the grouped schemes"):
        einfuse.OptimizeConfig(quantize="int8", quant_group_size=64)
    with pytest.raises(ValueError, match="multiple of 4"):
        einfuse.OptimizeConfig(quantize={"scheme": "int6", "group_size": 30})
    with pytest.raises(ValueError, match="asymmetric quantization applies to int4 and int6"):
        einfuse.OptimizeConfig(quantize="w8a8", quant_symmetric=False)
    with pytest.raises(ValueError, match="unknown quantize option 'groupsize'"):
        einfuse.OptimizeConfig(quantize={"scheme": "int4", "groupsize": 64})
    with pytest.raises(ValueError, match="quantize is None"):
        einfuse.OptimizeConfig(quant_group_size=64)
    with pytest.raises(ValueError, match="threshold"):
        einfuse.OptimizeConfig(quantize="llm_int8", quant_threshold=-1)
    with pytest.raises(TypeError, match="unknown einfuse option"):
        einfuse.optimize(tiny(), quantise="int8")
    m = tiny()
    einfuse.optimize(m, quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        einfuse.optimize(m, quantize="int4")
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize(m, "int8")
    with pytest.raises(TypeError, match="unsupported weight dtype torch.float64"):
        Q.quantize(tiny().double(), "int8")
    with pytest.raises(ValueError, match="optimize an nn.Module, not a function"):
        einfuse.optimize(lambda x: x, quantize="int8")
    with pytest.raises(ValueError, match="expects 64"):
        tiny_q = tiny()
        Q.quantize(tiny_q, "int8")
        tiny_q.model.layers[0].mlp.gate_proj(torch.randn(2, 63))
    with pytest.raises(ValueError, match="no quantized layers"):
        Q.save_quantized(tiny(), "/tmp/never.safetensors")
    cfg = einfuse.OptimizeConfig(quantize={"scheme": "int4", "group_size": 64, "symmetric": False})
    assert cfg.quantize == "int4" and cfg.quant_group_size == 64 and cfg.quant_symmetric is False
