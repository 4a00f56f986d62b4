"""The tiled cascade executor (einfuse.runtime.cascade_cpu) runs cascades exactly as the IR's
reference interpreter does, one tile of the iterated rank at a time.

Every cascade here comes from a derivation (attention_cascades.derive, the codegen library's
online-softmax log-sum-exp); the executor's result is compared with `CascadeInterpreter` on
the same cascade and with eager PyTorch, in fp64.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from einfuse.codegen.library import linear_cross_entropy_lse
from einfuse.ir.attention_cascades import derive
from einfuse.ir.cascade import Cascade, CascadeInterpreter, Einsum, read
from einfuse.ir.node import Op, const, node
from einfuse.runtime import counters
from einfuse.runtime.cascade_cpu import TiledExecutor, counter_name, watching

NEG_INF = float("-inf")
LOWEST64 = torch.finfo(torch.float64).min


def eager(q, k, v, scale, mask=None, kind=None, softcap=0.0, band=None):
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if kind == "additive":
        s = s + mask
    elif kind == "bool":
        s = s.masked_fill(~mask, NEG_INF)
    if band is not None:
        s = s.masked_fill(~band, NEG_INF)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def inputs(P, M, E, F, kind, band, seed, mag=2.0):
    g = torch.Generator().manual_seed(seed)
    ins = {"Q": torch.randn(P, E, generator=g, dtype=torch.float64) * mag,
           "K": torch.randn(M, E, generator=g, dtype=torch.float64) * mag,
           "V": torch.randn(M, F, generator=g, dtype=torch.float64)}
    if kind == "additive":
        ins["M"] = torch.randn(P, M, generator=g, dtype=torch.float64) * 3
        ins["M"][:, : M // 2] = NEG_INF  # leading keys masked: the guard's case
    elif kind == "bool":
        ins["M"] = torch.rand(P, M, generator=g) > 0.4
        ins["M"][0, : min(M, 5)] = False  # row 0: its leading tile(s) fully masked
        if P > 2:
            ins["M"][2] = False           # row 2: every key masked (eager: NaN)
    if band:
        ins["W"] = torch.ones(P, M, dtype=torch.bool).tril(M - P)
    return ins


def both(c, ins, **kw):
    ref = CascadeInterpreter(c).run(ins, sizes={"m0": kw.get("tile", 4)})
    got = TiledExecutor(c).run(ins, dtype=torch.float64, **kw)
    return ref, got


def assert_same(a, b, tol=1e-12):
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    torch.testing.assert_close(a.nan_to_num(0.0), b.nan_to_num(0.0), rtol=tol, atol=tol)


CASES = [  # P, M, E, F, kind, softcap, band, tile, chunk
    (5, 11, 3, 2, None, 0.0, False, 4, None),
    (7, 13, 5, 3, "bool", 2.5, False, 4, 3),
    (6, 9, 3, 4, "additive", 0.0, True, 2, 4),
    (4, 10, 4, 1, "bool", 30.0, True, 3, 1),
    (1, 1, 1, 1, None, 0.0, False, 1, None),
    (3, 17, 2, 5, "additive", 5.0, False, 17, 2),  # one tile holds every key
]


@pytest.mark.parametrize("P,M,E,F,kind,softcap,band,tile,chunk", CASES)
def test_executor_equals_interpreter_and_eager(P, M, E, F, kind, softcap, band, tile, chunk):
    scale = 1.0 / math.sqrt(E)
    c = derive(scale, kind, softcap, band=band, lse=True, lowest=LOWEST64)["1-pass"]
    ins = inputs(P, M, E, F, kind, band, seed=P * 31 + M)
    ref, got = both(c, ins, tile=tile, chunks={"p": chunk} if chunk else None)
    for o in ("O", "LSE"):
        assert_same(got[o], ref[o])
    o_e, lse_e = eager(ins["Q"], ins["K"], ins["V"], scale, ins.get("M"), kind, softcap, ins.get("W"))
    assert_same(got["O"], o_e, 1e-10)
    assert_same(got["LSE"], lse_e, 1e-10)
    if kind == "bool" and P > 2:
        assert torch.isnan(got["O"][2]).all() and torch.isneginf(got["LSE"][2])  # eager's NaN row
        assert not torch.isnan(got["O"][0]).any()  # leading masked tiles: no NaN (the guard)


def test_unguarded_cascade_gives_nan_where_eager_does_not():
    """Without the guard the plain 1-pass cascade is NaN on leading masked tiles (FuseMax's
    limitation); the executor reproduces that faithfully: it runs the cascade, no fix-ups."""
    ins = inputs(4, 9, 3, 2, "bool", False, seed=3)
    plain = derive(0.5, "bool")["1-pass"]
    guarded = derive(0.5, "bool", lowest=LOWEST64)["1-pass"]
    out_plain = TiledExecutor(plain).run(ins, tile=4, dtype=torch.float64)["O"]
    out_guard = TiledExecutor(guarded).run(ins, tile=4, dtype=torch.float64)["O"]
    assert torch.isnan(out_plain[0]).all() and not torch.isnan(out_guard[0]).any()
    ref, _ = eager(ins["Q"], ins["K"], ins["V"], 0.5, ins["M"], "bool")
    assert_same(out_guard, ref, 1e-10)


def test_the_cascade_is_the_program():
    """Changing the cascade changes what runs: softcap 3 vs none give each their own eager."""
    ins = inputs(5, 12, 4, 3, None, False, seed=4, mag=3.0)
    for cap in (0.0, 3.0):
        out = TiledExecutor(derive(0.5, None, cap)["1-pass"]).run(ins, tile=5, dtype=torch.float64)["O"]
        assert_same(out, eager(ins["Q"], ins["K"], ins["V"], 0.5, softcap=cap)[0], 1e-10)
    # a hand-edited cascade (the max subtracted twice) is run as written, i.e. wrongly
    c = derive(0.5)["1-pass"]
    bad = tuple(Einsum(e.out, e.ranks, node(Op.MUL, (const(2.0), e.expr)), e.reduce, e.over, e.init)
                if e.out == "SLD" else e for e in c.einsums)
    wrong = TiledExecutor(Cascade("bad", c.inputs, bad, c.outputs, c.notes, c.splits)).run(ins, tile=5,
                                                                                             dtype=torch.float64)
    assert_same(wrong["O"] * 2, eager(ins["Q"], ins["K"], ins["V"], 0.5)[0], 1e-10)


def test_batch_dims_broadcast_and_gqa_fold():
    """Leading batch dims no Einsum names; K/V shared by a group of query heads (size 1)."""
    B, Hkv, G, P, M, E, F = 2, 3, 4, 7, 10, 5, 6
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hkv, G, P, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, 1, M, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, 1, M, F, generator=g, dtype=torch.float64)
    mask = torch.randn(B, 1, 1, P, M, generator=g, dtype=torch.float64)  # broadcast over heads
    c = derive(0.3, "additive", 4.0, lse=True, lowest=LOWEST64)["1-pass"]
    got = TiledExecutor(c).run({"Q": q, "K": k, "V": v, "M": mask}, tile=3, batch_dims=3, chunks={"p": 2},
                               dtype=torch.float64)
    ref_o, ref_l = eager(q, k, v, 0.3, mask, "additive", 4.0)
    assert got["O"].shape == (B, Hkv, G, P, F) and got["LSE"].shape == (B, Hkv, G, P)
    assert_same(got["O"], ref_o, 1e-10)
    assert_same(got["LSE"], ref_l, 1e-10)


def test_tiles_are_bounded_and_counted():
    P, M = 9, 23
    ins = inputs(P, M, 3, 2, None, False, seed=6)
    c = derive(0.5, lse=True, lowest=LOWEST64)["1-pass"]
    with counters.counting() as cnt, watching() as rec:
        TiledExecutor(c).run(ins, tile=5, chunks={"p": 4}, dtype=torch.float64)
    assert cnt[counter_name(c)] == 1 and counter_name(c) == "cascade:" + c.key()
    assert len(rec) == math.ceil(P / 4) * math.ceil(M / 5)
    assert {r.tile for r in rec} == {(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)}
    assert max(r.biggest for r in rec) == 4 * 5  # one [rows, keys] tile, never [P, M]
    assert all(r.key == c.key() for r in rec)


def test_key_range_skips_tiles_exactly():
    """Skipping key tiles that the band fully masks is exact (the cascade leaves state unchanged)."""
    P, M = 8, 20
    ins = inputs(P, M, 3, 2, None, True, seed=7)
    c = derive(0.5, band=True, lse=True, lowest=LOWEST64)["1-pass"]
    full = TiledExecutor(c).run(ins, tile=3, chunks={"p": 2}, dtype=torch.float64)
    with watching() as rec:
        part = TiledExecutor(c).run(ins, tile=3, chunks={"p": 2}, dtype=torch.float64,
                                    key_range=lambda sl: (0, min(M, sl["p"][1] + M - P)))
    assert len(rec) < math.ceil(P / 2) * math.ceil(M / 3)
    for o in ("O", "LSE"):
        assert torch.equal(full[o], part[o])


def test_lazy_inputs_and_constant_folding():
    """An input may be built per tile by a callable; a scalar True means no masking there."""
    P, M = 6, 14
    ins = inputs(P, M, 3, 2, None, True, seed=8)
    band = ins.pop("W")
    calls = []

    def lazy(sl):
        (i0, i1), (j0, j1) = sl["p"], sl["m"]
        calls.append((i0, i1, j0, j1))
        tile = band[i0:i1, j0:j1]
        return True if bool(tile.all()) else tile
    c = derive(0.5, band=True, lse=True, lowest=LOWEST64)["1-pass"]
    got = TiledExecutor(c).run({**ins, "W": lazy}, tile=4, chunks={"p": 3}, dtype=torch.float64)
    ref = eager(ins["Q"], ins["K"], ins["V"], 0.5, band=band)
    assert_same(got["O"], ref[0], 1e-10)
    assert len(calls) == 2 * 4


def test_inputs_are_not_modified():
    ins = inputs(5, 9, 3, 2, "additive", True, seed=9)
    before = {k: v.clone() for k, v in ins.items()}
    c = derive(0.5, "additive", 2.0, band=True, lse=True, lowest=LOWEST64)["1-pass"]
    TiledExecutor(c).run(ins, tile=4, chunks={"p": 2}, dtype=torch.float64)
    for k in ins:
        assert torch.equal(ins[k], before[k])


def test_other_cascades_run_too():
    """Generic over cascades: the LCE online log-sum-exp (rank v split) and an unsplit 3-pass."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(19, 5, generator=g, dtype=torch.float64)
    b = torch.randn(19, generator=g, dtype=torch.float64)
    c = linear_cross_entropy_lse(bias=True, softcap=7.0)
    got = TiledExecutor(c).run({"X": x, "W": w, "B": b}, tile=4, chunks={"p": 4}, dtype=torch.float64)["LSE"]
    ref = torch.logsumexp(7.0 * torch.tanh((x @ w.T + b) / 7.0), -1)
    assert_same(got, ref, 1e-12)
    ins = inputs(4, 7, 3, 2, "additive", False, seed=11)
    c3 = derive(0.5, "additive")["3-pass"]
    out = TiledExecutor(c3).run(ins, dtype=torch.float64)["AV"]
    assert_same(out, CascadeInterpreter(c3).run(ins)["AV"])
    # a map whose operands only broadcast together (no reduction at all)
    outer = Cascade("outer", (("A", ("i",)), ("B", ("j",))),
                    (Einsum("C", ("i", "j"), node(Op.MUL, (read("A", "i"), read("B", "j")))),), ("C",))
    a, bb = torch.arange(3.0, dtype=torch.float64), torch.arange(4.0, dtype=torch.float64)
    assert torch.equal(TiledExecutor(outer).run({"A": a, "B": bb}, dtype=torch.float64)["C"], a[:, None] * bb)


@settings(max_examples=25, deadline=None)
@given(P=st.integers(1, 7), M=st.integers(1, 15), E=st.integers(1, 4), F=st.integers(1, 3),
       tile=st.integers(1, 6), chunk=st.integers(1, 8), kind=st.sampled_from([None, "additive", "bool"]),
       softcap=st.sampled_from([0.0, 3.0]), band=st.booleans(), mag=st.sampled_from([0.1, 1.0, 30.0]))
def test_property_executor_equals_interpreter(P, M, E, F, tile, chunk, kind, softcap, band, mag):
    c = derive(E ** -0.5, kind, softcap, band=band, lse=True, lowest=LOWEST64)["1-pass"]
    ins = inputs(P, M, E, F, kind, band, seed=P + 7 * M + 31 * E, mag=mag)
    ref, got = both(c, ins, tile=tile, chunks={"p": chunk})
    for o in ("O", "LSE"):
        assert_same(got[o], ref[o], 1e-10)
