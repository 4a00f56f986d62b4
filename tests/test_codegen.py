"""Generated Triton kernels: run under TRITON_INTERPRET=1 on CPU tensors, compiled for sm_90 ahead
of time (no GPU needed), snapshotted, and routed to by the fused ops under EINFUSE_KERNELS=triton.

Numerics rule: error against the fp64 reference (the cascade interpreter, and torch) must be at
most the plain eager error in the same dtype plus 1e-5 (fp32) / 1e-2 (bf16).
Set EINFUSE_UPDATE_SNAPSHOTS=1 to rewrite tests/snapshots/ after an intended codegen change.
"""

from __future__ import annotations

import os

# Triton decides when triton.language is first imported whether its library is interpreted:
# set this before anything imports triton (the fixture below checks that it took effect).
os.environ.setdefault("TRITON_INTERPRET", "1")

import difflib  # noqa: E402
import warnings  # noqa: E402

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from einfuse.codegen import CodegenError, generate, kernel_source, library
from einfuse.codegen import ops as K
from einfuse.ir.cascade import Cascade, CascadeInterpreter, Einsum, read
from einfuse.ir.node import Op, node
from einfuse.runtime import counters, dispatch
from tests.ops._numerics import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SNAP = os.path.join(os.path.dirname(__file__), "snapshots")


@pytest.fixture(autouse=True, scope="module")
def _interpreter(tmp_path_factory):
    """Kernels run in Triton's interpreter; the kernel cache goes to a private temp dir."""
    from einfuse.codegen.launch import _check_interpreter
    _check_interpreter()  # fails loudly if triton was imported before TRITON_INTERPRET=1 was set
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    mp.setenv("EINFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("einfuse-cache")))
    mp.delenv("EINFUSE_KERNELS", raising=False)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _fresh_dispatch():
    dispatch.reset()
    yield
    dispatch.reset()


def check(fused: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    dt = eager.dtype if eager.dtype in TOL else torch.float32
    ef, ee = rel_err(fused, ref), rel_err(eager, ref)
    assert fused.dtype == eager.dtype and fused.shape == eager.shape, what
    assert ef <= ee + TOL[dt], f"{what}: kernel err {ef:.3e} > eager err {ee:.3e} + {TOL[dt]}"


def interp(c: Cascade, **inputs) -> dict[str, torch.Tensor]:
    return CascadeInterpreter(c).run({k: v.double() for k, v in inputs.items()})


# ---------------------------------------------------------------------------------------
# RMSNorm

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,H,offset", [(7, 100, 0.0), (1, 1, 0.0), (5, 64, 1.0), (3, 130, 0.0)])
def test_rmsnorm_forward_and_backward_kernels(rows, H, offset, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + H)
    x = (torch.randn(rows, H, generator=g) * 3).to(dtype)
    w = torch.randn(H, generator=g).to(dtype)
    gy = torch.randn(rows, H, generator=g).to(dtype)
    eps = 1e-6
    y, rstd = K.rmsnorm_forward(x, w, eps, offset)
    assert dispatch.launches["rmsnorm_fwd"] == 1
    c = library.rmsnorm_forward(H, eps, offset)
    ref = interp(c, X=x, W=w)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    yd = (wd + offset) * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(ref["Y"], yd.detach())  # the cascade means what torch computes
    eager = (w + offset) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    check(y, eager, ref["Y"], f"rmsnorm fwd {dtype}")
    check(rstd, rstd.double().to(torch.float32), ref["RSTD"], "rstd")

    dx, dw = K.rmsnorm_backward(gy, x, w, rstd, offset, True)
    yd.backward(gy.double())
    cb = library.rmsnorm_backward(H, offset)
    refb = interp(cb, G=gy, X=x, W=w, RSTD=rstd)
    torch.testing.assert_close(refb["DX"], xd.grad, rtol=1e-5, atol=1e-6)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    ((we + offset) * (xe * torch.rsqrt(xe.pow(2).mean(-1, keepdim=True) + eps))).backward(gy)
    check(dx, xe.grad, xd.grad, f"rmsnorm dx {dtype}")
    check(dw, we.grad, wd.grad, f"rmsnorm dw {dtype}")
    dx2, dw2 = K.rmsnorm_backward(gy, x, w, rstd, offset, False)
    assert torch.equal(dx2, dx) and not dw2.any()


def test_rmsnorm_kernel_from_the_pass_cascade_with_two_row_ranks():
    """The cascade the rmsnorm pass records ([b,s,h], the weight broadcast over rows) runs as is."""
    from einfuse.ir.from_dag import dag_to_cascade
    from einfuse.ir.lower import lower_graph
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    class M(torch.nn.Module):
        def forward(self, x, w):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    gm = fx.symbolic_trace(M())
    x, w = torch.randn(2, 3, 40), torch.randn(40)
    ShapeProp(gm).propagate(x, w)
    for n in gm.graph.nodes:
        if "tensor_meta" in n.meta:
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape)
    low = lower_graph(gm.graph)
    out_fx = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    xs, ws = [low.of[n] for n in gm.graph.nodes if n.op == "placeholder"]
    c = dag_to_cascade("rmsnorm", {"Y": low.of[out_fx]}, {id(xs): "X", id(ws): "W"})
    y = K.run_cascade(c, {"X": x, "W": w}, {"Y": torch.float32},
                      config={"block_r": 4, "block": 16, "num_warps": 1, "programs": 2})["Y"]
    check(y, M()(x, w), interp(c, X=x, W=w)["Y"], "rmsnorm [b,s,h]")
    assert "idx_b" in kernel_source("rmsnorm", c) and "idx_s" in kernel_source("rmsnorm", c)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 9), H=st.integers(1, 80), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_rmsnorm_kernel_property(rows, H, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, H, generator=g) * scale).to(dtype)
    w = torch.randn(H, generator=g).to(dtype)
    y, _ = K.rmsnorm_forward(x, w, 1e-5, 0.0)
    eager = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    check(y, eager, interp(library.rmsnorm_forward(H, 1e-5), X=x, W=w)["Y"], f"rmsnorm {dtype} x{scale}")


# ---------------------------------------------------------------------------------------
# GLU

@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glu_kernels(act, dtype):
    torch.manual_seed(1)
    for shape in [(5, 33), (1, 1), (2, 3, 70)]:
        gate = (torch.randn(shape) * 4).to(dtype)
        up, dh = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        fn = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]
        h = K.glu_forward(gate, up, act)
        ref = interp(library.glu_forward(act), G=gate.reshape(-1, shape[-1]), U=up.reshape(-1, shape[-1]))["H"]
        gd, ud = gate.double().requires_grad_(), up.double().requires_grad_()
        hd = fn(gd) * ud
        torch.testing.assert_close(ref.view(shape), hd.detach())
        check(h, fn(gate) * up, hd, f"glu {act} {dtype} {shape}")
        dg, du = K.glu_backward(dh, gate, up, act)
        hd.backward(dh.double())
        refb = interp(library.glu_backward(act), DH=dh.reshape(-1, shape[-1]), G=gate.reshape(-1, shape[-1]),
                      U=up.reshape(-1, shape[-1]))
        torch.testing.assert_close(refb["DG"].view(shape), gd.grad)   # the backward cascade is the derivative
        ge, ue = gate.clone().requires_grad_(), up.clone().requires_grad_()
        (fn(ge) * ue).backward(dh)
        check(dg, ge.grad, gd.grad, f"glu {act} d_gate {dtype} {shape}")
        check(du, ue.grad, ud.grad, f"glu {act} d_up {dtype} {shape}")


def test_exact_gelu_derivative_near_zero_and_in_the_tails():
    x = torch.tensor([0.0, 1e-30, -1e-30, 1e-8, -3.0, 3.0, -12.0, 12.0, -40.0], dtype=torch.float64)
    c = library.glu_backward("gelu")
    one = torch.ones_like(x)
    dg = CascadeInterpreter(c).run({"DH": one[None], "G": x[None], "U": one[None]})["DG"][0]
    xr = x.clone().requires_grad_()
    F.gelu(xr).sum().backward()
    torch.testing.assert_close(dg, xr.grad, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------
# RoPE, softmax, cross-entropy

@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernels(interleaved, dtype):
    from einfuse.runtime.ops.rope import rope_backward_op, rope_op
    torch.manual_seed(2)
    q, k = torch.randn(2, 3, 5, 16).to(dtype), torch.randn(2, 1, 5, 12).to(dtype)  # GQA, partial rotary on k
    r = 4 if interleaved else 8
    ang = torch.randn(2, 5, r)                                                       # [B, S, r]: per-batch positions
    cos, sin = ang.cos(), ang.sin()
    qo, ko = K.rope_forward(q, k, cos, sin, interleaved)
    with torch.no_grad():
        ref = rope_op(q.double(), k.double(), cos.double(), sin.double(), interleaved)
        eager = rope_op(q, k, cos, sin, interleaved)   # the CPU implementation, same dtype
    check(qo, eager[0], ref[0], "rope q")
    check(ko, eager[1], ref[1], "rope k")
    gq, gk = K.rope_backward(q, k, cos, sin, interleaved)
    refb = rope_backward_op(q.double(), k.double(), cos.double(), sin.double(), interleaved)
    eb = rope_backward_op(q, k, cos, sin, interleaved)
    check(gq, eb[0], refb[0], "rope dq")
    check(gk, eb[1], refb[1], "rope dk")
    # the forward cascade, run by the interpreter on the pair views, is the rotation
    qd, cd, sd = q.double(), cos.double(), sin.double()
    if interleaved:
        x1, x2, cs, y1 = qd[..., 0:2 * r:2], qd[..., 1:2 * r:2], {"C": cd, "S": sd}, ref[0][..., 0:2 * r:2]
    else:
        h = r // 2
        x1, x2, y1 = qd[..., :h], qd[..., h:r], ref[0][..., :h]
        cs = {"C1": cd[..., :h], "C2": cd[..., h:], "S1": sd[..., :h], "S2": sd[..., h:]}
    y = CascadeInterpreter(library.rope(False, shared_halves=interleaved)).run({"X1": x1, "X2": x2, **cs})
    torch.testing.assert_close(y["Y1"], y1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_and_cross_entropy_kernels(dtype):
    torch.manual_seed(3)
    for rows, V, scale in [(6, 77, 5.0), (1, 1, 1.0), (3, 200, 30.0)]:
        x = (torch.randn(rows, V) * scale).to(dtype)
        y = K.softmax_forward(x)
        check(y, x.softmax(-1), interp(library.softmax_forward(), X=x)["Y"], f"softmax {V}")
        gy = torch.randn(rows, V).to(dtype)
        xd = x.double().requires_grad_()
        xd.softmax(-1).backward(gy.double())
        xe = x.clone().requires_grad_()
        ye = xe.softmax(-1)
        ye.backward(gy)
        # backward is a function of (grad, y): both get eager's y
        check(K.softmax_backward(gy, ye.detach()), xe.grad, xd.grad, f"softmax bwd {V}")

        t = torch.randint(0, V, (rows,))
        t[0] = -100  # an ignored row
        loss, lse = K.cross_entropy_forward(x, t)
        ref = F.cross_entropy(x.double(), t, reduction="none")
        check(loss.to(dtype), F.cross_entropy(x, t, reduction="none"), ref, f"ce {V}")
        assert loss[0] == 0
        gl = torch.randn(rows)
        xd = x.double().requires_grad_()
        (F.cross_entropy(xd, t, reduction="none") * gl.double()).sum().backward()
        xe = x.clone().requires_grad_()
        (F.cross_entropy(xe, t, reduction="none") * gl.to(dtype)).sum().backward()
        check(K.cross_entropy_backward(gl, x, t, lse), xe.grad, xd.grad, f"ce bwd {V}")


# ---------------------------------------------------------------------------------------
# attention forward: a contraction program from the 1-pass cascade

def _attention_ref(q, k, v, scale, mask, kind, softcap):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if kind == "additive":
        s = s + mask
    elif kind is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v, torch.logsumexp(s, -1)


@pytest.mark.parametrize("dtype,kind,softcap", [(torch.float32, None, 0.0), (torch.float32, "causal", 20.0),
                                                (torch.bfloat16, "additive", 0.0), (torch.bfloat16, "bool", 0.0)])
def test_attention_forward_kernel(dtype, kind, softcap):
    torch.manual_seed(5)
    B, H, Hk, S, T, E, F = 1, 2, 1, 19, 37, 8, 12             # GQA, ragged tiles, head dims < 16
    q, k, v = (torch.randn(B, H, S, E) * 2).to(dtype), torch.randn(B, Hk, T, E).to(dtype), \
        torch.randn(B, Hk, T, F).to(dtype)
    mask = None
    if kind == "additive":
        mask = torch.randn(1, 1, S, T).to(dtype)
    elif kind == "bool":
        mask = torch.rand(B, 1, S, T) > 0.3
        mask[:, :, 0, :20] = False                               # row 0: the first key tile is all masked
    elif kind == "causal":
        mask = torch.ones(S, T, dtype=torch.bool).tril(T - S)[None, None]
    o, lse = K.attention_forward(q, k, v, 0.3, mask, kind, softcap)
    assert dispatch.launches["attention_fwd"] == 1
    md = mask.double() if kind == "additive" else mask
    od, lsed = _attention_ref(q.double(), k.double(), v.double(), 0.3, md, kind, softcap)
    oe, _ = _attention_ref(q, k, v, 0.3, mask, kind, softcap)
    check(o, oe, od, f"attention {dtype} {kind}")
    torch.testing.assert_close(lse.double(), lsed, rtol=1e-5, atol=1e-5)
    # the kernel means what the cascade means: one head through the cascade interpreter
    if kind == "causal":
        c = library.attention_forward(0.3, kind, softcap)
        ref = CascadeInterpreter(c).run({"Q": q[0, 0].double(), "K": k[0, 0].double(), "V": v[0, 0].double(),
                                          "M": mask[0, 0]}, sizes={"m0": 16})
        torch.testing.assert_close(ref["O"], od[0, 0])
        torch.testing.assert_close(o[0, 0].double(), ref["O"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_forward_kernel(dtype):
    """Logits x @ w^T reduced to a log-sum-exp tile by tile, never materialised."""
    torch.manual_seed(6)
    x, w = (torch.randn(21, 24) * 2).to(dtype), torch.randn(50, 24).to(dtype)   # V = 50: 4 ragged tiles
    t = torch.randint(0, 50, (21,))
    t[3] = -100
    loss, lse = K.linear_cross_entropy_forward(x, w, t)
    assert dispatch.launches["linear_cross_entropy_fwd"] == 1
    ref = F.cross_entropy(x.double() @ w.double().T, t, reduction="none")
    eager = F.cross_entropy((x @ w.T).float(), t, reduction="none")   # eager upcasts bf16 logits
    check(loss, eager, ref, f"linear cross-entropy {dtype}")
    torch.testing.assert_close(lse.double(), torch.logsumexp(x.double() @ w.double().T, -1),
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert loss[3] == 0


# ---------------------------------------------------------------------------------------
# what the generator accepts and refuses

def test_the_generator_refuses_what_it_cannot_express_with_a_clear_error():
    x = read("X", "r", "h")
    cast = Cascade("c", (("X", ("r", "h")),), (Einsum("Y", ("r", "h"), node(Op.CAST, (x,), "float16")),), ("Y",))
    with pytest.raises(CodegenError, match="no Triton rule for op CAST"):
        generate(cast)
    run = Cascade("r", (("X", ("k", "j")),), (
        Einsum("LM", ("k",), read("X", "k", "j"), Op.MAX, ("j",)),
        Einsum("RM", ("k+1",), node(Op.MAX2, (read("RM", "k"), read("LM", "k"))), init=float("-inf"))), ("RM",))
    with pytest.raises(CodegenError, match="running state"):
        generate(run)
    total = Cascade("t", (("X", ("r", "h")),), (Einsum("T", (), read("X", "r", "h"), Op.SUM, ("r", "h")),), ("T",))
    with pytest.raises(CodegenError, match="reduces over"):
        generate(total, block="h")
    # a reduction over a leading rank is a row program too: that rank is tiled, the others are rows
    colsum = Cascade("s", (("X", ("a", "b", "h")),), (Einsum("S", ("b", "h"), read("X", "a", "b", "h"), Op.SUM,
                                                              ("a",)),), ("S",))
    x = torch.randn(70, 3, 5)
    s = K.run_cascade(colsum, {"X": x}, {"S": torch.float32})["S"]
    torch.testing.assert_close(s, x.sum(0))


def test_generated_source_is_readable():
    src = generate(library.rmsnorm_backward(64)).source
    assert "# DOT[r] = sum_h G[r,h] * W[h] * X[r,h] * RSTD[r]" in src     # each block says its Einsum
    assert "DOT_acc +=" in src and "DW_part" in src and "tl.load(RSTD_row" in src  # cascade names
    assert "sweep 2 of 2 over h" in src


# ---------------------------------------------------------------------------------------
# snapshots

SNAPSHOTS = {
    "rmsnorm_fwd": lambda: library.rmsnorm_forward(4096, 1e-6),
    "rmsnorm_bwd": lambda: library.rmsnorm_backward(4096, 1.0),
    "glu_gelu_tanh_bwd": lambda: library.glu_backward("gelu_tanh"),
    "rope_fwd": lambda: library.rope(False),
    "cross_entropy_fwd": lambda: library.cross_entropy_forward(),
    "attention_fwd": lambda: library.attention_forward(0.125, "causal", 0.0),
    "attention_bwd_dq": lambda: library.attention_backward_dq(0.125, "causal", 0.0),
    "attention_bwd_dkdv": lambda: library.attention_backward_dkdv(0.125, "additive", 30.0),
    "linear_cross_entropy_fwd_bias_softcap": lambda: library.linear_cross_entropy_lse(True, 30.0),
    "linear_cross_entropy_bwd_dx": lambda: library.linear_cross_entropy_backward_dx(),
    "linear_cross_entropy_bwd_dw_bias": lambda: library.linear_cross_entropy_backward_dw(True),
}


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_generated_source_snapshot(name):
    src = generate(SNAPSHOTS[name]()).source
    path = os.path.join(SNAP, f"{name}.py.snap")
    if os.environ.get("EINFUSE_UPDATE_SNAPSHOTS") == "1" or not os.path.exists(path):
        os.makedirs(SNAP, exist_ok=True)
        with open(path, "w") as f:
            f.write(src)
        if os.environ.get("EINFUSE_UPDATE_SNAPSHOTS") != "1":
            pytest.fail(f"snapshot {path} did not exist and was written; review and commit it")
        return
    with open(path) as f:
        want = f.read()
    if src != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), src.splitlines(True), "snapshot", "generated"))
        pytest.fail(f"generated source for {name} changed (EINFUSE_UPDATE_SNAPSHOTS=1 to accept):\n{diff}")


# ---------------------------------------------------------------------------------------
# what a GPU compiler accepts (compiled for sm_90 down to cubin; no GPU needed)

_AOT_SCRIPT = r"""
import json, sys, torch
from einfuse.codegen import library
from einfuse.codegen.aot import aot_compile
bf, f32 = torch.bfloat16, torch.float32
jobs = [
    (library.rmsnorm_backward(4096), {"G": bf, "X": bf, "W": bf, "RSTD": f32, "DX": bf},
     {"block_r": 2, "block": 1024, "num_warps": 8}),
    (library.rmsnorm_backward(4096, 1.0), {"G": bf, "X": bf, "W": bf, "RSTD": f32, "DX": bf},
     {"block_r": 1, "block": 4096, "num_warps": 8, "one_tile": True}),
    (library.glu_backward("gelu"), {"DH": bf, "G": bf, "U": bf, "DG": bf, "DU": bf},
     {"block_r": 4, "block": 512, "num_warps": 4}),
    (library.rope(False), {n: f32 if n[0] in "CS" else bf for n in ("X1", "X2", "C1", "C2", "S1", "S2", "Y1", "Y2")},
     {"block_r": 8, "block": 64, "num_warps": 4}),
    (library.cross_entropy_forward(), {"X": bf, "XT": bf, "LOSS": f32, "LSE": f32},
     {"block_r": 1, "block": 4096, "num_warps": 8}),
    (library.attention_forward(0.125, "bool", 30.0), {"Q": bf, "K": bf, "V": bf, "M": torch.bool, "O": bf, "LSE": f32},
     {"block_p": 128, "block_m": 64, "block_e": 128, "block_f": 128, "num_warps": 8, "num_stages": 3}),
    (library.attention_backward_dkdv(0.125, "additive", 30.0), {"Q": bf, "K": bf, "V": bf, "DO": bf, "LSE": f32,
     "DELTA": f32, "M": bf, "DK": f32, "DV": f32},
     {"block_p": 64, "block_m": 64, "block_e": 128, "block_f": 128, "num_warps": 4, "num_stages": 2}),
    (library.linear_cross_entropy_backward_dx(), {"X": bf, "W": bf, "LSE": f32, "A": f32, "DX": f32},
     {"block_p": 64, "block_m": 64, "block_e": 64, "one_block_e": False, "num_warps": 4, "num_stages": 2}),
]
out = {}
for c, dtypes, cfg in jobs:
    asm = aot_compile(c, c.name, dtypes, cfg, arch=int(sys.argv[1]))
    out[c.name + str(cfg)] = sorted(asm) if (".entry " + c.name) in asm["ptx"] else "no entry in ptx"
    if c.name in ("attention_fwd", "attention_bwd_dkdv", "linear_cross_entropy_bwd_dx"):
        out["mma_" + c.name] = asm["ptx"].count("mma")
print("RESULT" + json.dumps(out))
"""


def test_generated_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter accepts more than the GPU compiler: compile for sm_90 down to cubin (Triton
    ships ptxas, no GPU needed). In a subprocess: this process imported triton in interpreter mode."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), EINFUSE_CACHE_DIR=str(tmp_path / "einfuse"),
               TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, "90"], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.split("RESULT", 1)[1])
    assert len(res) == 11  # 8 kernels and 3 mma counts
    for name in ("attention_fwd", "attention_bwd_dkdv", "linear_cross_entropy_bwd_dx"):
        assert res.pop("mma_" + name) > 0, name   # the dots became tensor-core instructions
    for name, stages in res.items():
        assert stages == ["cubin", "llir", "ptx", "source", "ttgir", "ttir"], (name, stages)


# ---------------------------------------------------------------------------------------
# dispatch: the fused ops route to the kernels

def test_einfuse_kernels_triton_routes_the_ops_through_generated_kernels(monkeypatch):
    from einfuse.runtime.ops.rmsnorm import rms_norm
    from einfuse.runtime.ops.rope import rope
    from einfuse.runtime.ops.swiglu import glu
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    torch.manual_seed(4)
    x = torch.randn(3, 5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    with counters.counting() as n:
        y = rms_norm(x, w, 1e-6)
        y.backward(torch.ones_like(y))
    assert n["rmsnorm"] == 1
    assert dispatch.launches["rmsnorm_fwd"] == 1 and dispatch.launches["rmsnorm_bwd"] == 1
    xe, we = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ye = we * (xe * torch.rsqrt(xe.pow(2).mean(-1, keepdim=True) + 1e-6))
    ye.backward(torch.ones_like(ye))
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, we.grad, rtol=1e-5, atol=1e-5)

    gate, up = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    glu(gate, up, "silu").sum().backward()
    assert dispatch.launches["glu_silu_fwd"] == 1 and dispatch.launches["glu_silu_bwd"] == 1
    q, k = torch.randn(1, 2, 3, 8, requires_grad=True), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    qo, _ = rope(q, k, cos, sin)
    qo.sum().backward()
    assert dispatch.launches["rope_fwd"] == 2 and dispatch.launches["rope_bwd"] == 2


def test_compiled_graph_runs_the_kernel(monkeypatch):
    from einfuse.runtime.ops.rmsnorm import rms_norm
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    x, w = torch.randn(4, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    f = torch.compile(lambda x, w: rms_norm(x, w, 1e-6) * 2, backend="aot_eager", fullgraph=True)
    f(x, w).sum().backward()
    assert dispatch.launches["rmsnorm_fwd"] >= 1 and dispatch.launches["rmsnorm_bwd"] >= 1
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cpu_tensors_take_the_cpu_path_by_default(monkeypatch):
    from einfuse.runtime.ops.rmsnorm import rms_norm
    monkeypatch.delenv("EINFUSE_KERNELS", raising=False)
    rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)
    assert not dispatch.launches
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # Triton with CPU tensors needs the interpreter
    with pytest.warns(dispatch.KernelFallbackWarning, match="TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)
    assert not dispatch.launches


def test_a_failing_kernel_falls_back_with_one_warning(monkeypatch):
    from einfuse.runtime.ops.rmsnorm import rms_norm, _forward
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    x, w = torch.randn(3, 20), torch.randn(20)
    with dispatch.inject_failure("rmsnorm_fwd"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = rms_norm(x, w, 1e-6)
        y2 = rms_norm(x, w, 1e-6)
    mine = [w_ for w_ in caught if issubclass(w_.category, dispatch.KernelFallbackWarning)]
    assert len(mine) == 1, [str(m.message) for m in mine]
    assert "'rmsnorm_fwd'" in str(mine[0].message) and "injected" in str(mine[0].message)
    ref = _forward(x, w, 1e-6, 0.0)[0]
    assert torch.equal(y1, ref) and torch.equal(y2, ref)
    assert dispatch.launches["rmsnorm_fwd"] == 0


def test_report_kernels_show_generated_source():
    from einfuse.report import Region, Report
    c = library.rmsnorm_forward(32, 1e-6)
    rep = Report(regions=[Region("g0/rmsnorm/0", "rmsnorm", True, [], cascades={"reference": c}),
                          Region("g0/swiglu/0", "swiglu", False, [], reason="x", cascades={"reference": c})])
    assert set(rep.kernels) == {"rmsnorm"}
    assert "@triton.jit" in rep.kernels["rmsnorm"] and "def rmsnorm_kernel(" in rep.kernels["rmsnorm"]


def test_tiny_llama_training_step_with_generated_kernels_matches_eager(monkeypatch):
    """einfuse.optimize + EINFUSE_KERNELS=triton: RMSNorm, RoPE, the GLU, attention and the linear
    cross-entropy loss run as generated kernels, forward and backward; loss and every gradient follow
    the fp32 rule."""
    import einfuse
    from tests.hf_models import build, inputs
    monkeypatch.setenv("EINFUSE_KERNELS", "triton")
    ref64, eager, model = (build("llama", num_hidden_layers=1) for _ in range(3))
    ref64 = ref64.double()
    kw = inputs("llama")
    opt = einfuse.optimize(model)
    out = opt(**kw)
    out.loss.backward()
    for m in (ref64, eager):
        m(**kw).loss.backward()
    assert dispatch.launches["rmsnorm_fwd"] > 0 and dispatch.launches["rmsnorm_bwd"] > 0
    assert dispatch.launches["rope_fwd"] > 0 and dispatch.launches["glu_silu_fwd"] > 0
    assert dispatch.launches["rope_bwd"] > 0 and dispatch.launches["glu_silu_bwd"] > 0
    for name in ("attention_fwd", "attention_bwd_delta", "attention_bwd_dq", "attention_bwd_dkdv",
                 "linear_cross_entropy_fwd", "linear_cross_entropy_bwd_dx", "linear_cross_entropy_bwd_dw"):
        assert dispatch.launches[name] > 0, (name, dict(dispatch.launches))
    le = eager(**kw).loss
    check(out.loss.detach(), le.detach(), ref64(**kw).loss.detach(), "loss")
    params = dict(model.named_parameters())
    for name, p64 in ref64.named_parameters():
        pe = dict(eager.named_parameters())[name]
        check(params[name].grad, pe.grad, p64.grad, f"grad {name}")
    kernels = einfuse.inspect(build("llama", num_hidden_layers=1), **kw).kernels   # what `inspect` shows
    for kind in ("attention", "rmsnorm", "swiglu", "rope"):
        assert "@triton.jit" in kernels[kind], kind
    assert "tl.dot(" in kernels["attention"]
