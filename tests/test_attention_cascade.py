"""The softmax-into-attention derivation on the IR: 3-pass -> 2-pass -> 1-pass.

The printed 3-pass cascade is pinned; the interpreter runs all three cascades on random fp64
inputs (odd sizes, the key rank split into tiles of 4, ragged or not) and each must equal
eager softmax attention; the pass counter gives 3, 2, 1 for the key rank.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from einfuse.ir.attention_cascades import (attention_3pass, defer_division, derive, online_softmax,
                                           passes_per_rank)
from einfuse.ir.cascade import Cascade, CascadeInterpreter, Einsum, format_cascade, read
from einfuse.ir.node import Op, node

NEG_INF = float("-inf")


def eager_attention(q, k, v, scale, mask=None, kind=None, softcap=0.0, fill=NEG_INF):
    s = q @ k.T * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if kind == "additive":
        s = s + mask
    elif kind in ("bool", "causal"):
        s = s.masked_fill(~mask, fill)
    return torch.softmax(s, dim=-1) @ v


def make_inputs(P, M, E, F, kind, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(P, E, generator=g, dtype=torch.float64) * magnitude
    k = torch.randn(M, E, generator=g, dtype=torch.float64) * magnitude
    v = torch.randn(M, F, generator=g, dtype=torch.float64)
    inputs = {"Q": q, "K": k, "V": v}
    mask = None
    if kind == "additive":
        mask = torch.randn(P, M, generator=g, dtype=torch.float64) * 3
        mask[:, M // 2] = torch.finfo(torch.float64).min  # an HF-style "masked" column
    elif kind == "bool":
        mask = torch.rand(P, M, generator=g) > 0.4
        mask[:, 0] = True   # each row's leading tile keeps a key (see the module's limitation)
        if M > 4:
            mask[0, 4:8] = False  # a whole later tile masked for one row
    elif kind == "causal":
        mask = torch.ones(P, M, dtype=torch.bool).tril(M - P)  # aligned to the end of the keys
    if mask is not None:
        inputs["M"] = mask
    return inputs, mask


PINNED_3PASS = """\
QK[p,m] = sum_e 0.125 * Q[p,e] * K[m,e]
MQK[p,m] = QK[p,m] + M[p,m]
GM[p] = max_m MQK[p,m]
SN[p,m] = exp(MQK[p,m] - GM[p])
SD[p] = sum_m SN[p,m]
A[p,m] = SN[p,m] * 1/SD[p]
AV[p,f] = sum_m A[p,m] * V[m,f]"""

PINNED_1PASS = """\
split m -> m1,m0
BQK[m1,m0,p] = sum_e 0.125 * Q[p,e] * K[m1,m0,e]
BMQK[m1,m0,p] = BQK[m1,m0,p] + M[p,m1,m0]
LM[m1,p] = max_m0 BMQK[m1,m0,p]
RM[m1+1,p] = max(RM[m1,p], LM[m1,p])    (from -inf)
SLN[m1,m0,p] = exp(BMQK[m1,m0,p] - RM[m1+1,p])
PRM[m1,p] = exp(RM[m1,p] - RM[m1+1,p])
SLD[m1,p] = sum_m0 SLN[m1,m0,p]
SPD[m1,p] = RD[m1,p] * PRM[m1,p]
RD[m1+1,p] = SLD[m1,p] + SPD[m1,p]    (from 0)
SLNV[m1,p,f] = sum_m0 SLN[m1,m0,p] * V[m1,m0,f]
SPNV[m1,p,f] = RNV[m1,p,f] * PRM[m1,p]
RNV[m1+1,p,f] = SLNV[m1,p,f] + SPNV[m1,p,f]    (from 0)
O[p,f] = RNV[M1,p,f] * 1/RD[M1,p]"""


def test_3pass_cascade_is_pinned():
    c3 = attention_3pass(scale=0.125, mask="additive")
    assert format_cascade(c3) == PINNED_3PASS
    assert c3.outputs == ("AV",)
    plain = attention_3pass(scale=1.0)
    assert format_cascade(plain).splitlines()[:2] == ["QK[p,m] = sum_e Q[p,e] * K[m,e]", "GM[p] = max_m QK[p,m]"]
    capped = attention_3pass(scale=0.5, mask="bool", softcap=30.0)
    assert "MQK[p,m] = where(M[p,m], 30 * tanh(QK[p,m] * 0.0333333), -inf)" in str(capped)


def test_2pass_defers_the_division():
    c2 = defer_division(attention_3pass(scale=0.125, mask="additive"))
    lines = format_cascade(c2).splitlines()
    assert lines[-2:] == ["AV[p,f] = sum_m SN[p,m] * V[m,f]", "O[p,f] = AV[p,f] * 1/SD[p]"]
    assert not any(l.startswith("A[") for l in lines)  # the normalised probabilities are gone
    assert c2.outputs == ("O",)
    with pytest.raises(ValueError):
        defer_division(c2)  # nothing left to defer


def test_1pass_is_pinned_and_carries_running_state():
    c1 = derive(scale=0.125, mask="additive")["1-pass"]
    assert format_cascade(c1) == PINNED_1PASS
    assert c1.splits == (("m", "m1", "m0"),)
    running = {e.out: e.init for e in c1.einsums if any("+1" in r for r in e.ranks)}
    assert running == {"RM": NEG_INF, "RD": 0.0, "RNV": 0.0}


def test_pass_counts_are_3_2_1():
    for kw in ({"scale": 0.125}, {"scale": 0.3, "mask": "bool", "softcap": 5.0}, {"scale": 1.0, "mask": "additive"}):
        cs = derive(**kw)
        assert [passes_per_rank(cs[k])["m"] for k in ("3-pass", "2-pass", "1-pass")] == [3, 2, 1]
        p3, p1 = passes_per_rank(cs["3-pass"]), passes_per_rank(cs["1-pass"])
        assert p3["e"] == p3["p"] == p3["f"] == 1
        assert p1["m1"] == 1 and p1["m0"] == 2  # a tile is swept twice on chip: max, then exp/sums


def test_pass_counter_counts_dependent_reductions_not_einsums():
    # two independent reductions over m need one pass; a reduction of a reduction's user needs two
    x = read("X", "p", "m")
    one = Cascade("one", (("X", ("p", "m")),), (
        Einsum("S", ("p",), x, Op.SUM, ("m",)), Einsum("G", ("p",), x, Op.MAX, ("m",))), ("S", "G"))
    assert passes_per_rank(one)["m"] == 1
    two = Cascade("two", (("X", ("p", "m")),), (
        Einsum("G", ("p",), x, Op.MAX, ("m",)),
        Einsum("S", ("p",), node(Op.ADD, (x, read("G", "p"))), Op.SUM, ("m",))), ("S",))
    assert passes_per_rank(two) == {"p": 1, "m": 2}


CASES = [
    # (P, M, E, F, kind, softcap)
    (5, 11, 3, 2, None, 0.0),          # ragged last tile (4, 4, 3)
    (5, 12, 3, 2, "additive", 0.0),    # M divisible by the tile
    (7, 13, 5, 3, "bool", 0.0),
    (6, 9, 3, 4, "causal", 0.0),       # causal aligned to the end of the keys (M > P)
    (3, 10, 4, 1, "bool", 2.5),        # soft-capping
    (1, 1, 1, 1, None, 0.0),           # length 1 everywhere
]


@pytest.mark.parametrize("P,M,E,F,kind,softcap", CASES)
def test_interpreter_runs_all_three_cascades_equal_to_eager(P, M, E, F, kind, softcap):
    scale = 1.0 / math.sqrt(E)
    inputs, mask = make_inputs(P, M, E, F, kind, seed=P * 100 + M, magnitude=3.0)
    ref = eager_attention(inputs["Q"], inputs["K"], inputs["V"], scale, mask, kind, softcap)
    cs = derive(scale=scale, mask=kind, softcap=softcap)
    for label, c in cs.items():
        out = CascadeInterpreter(c).run(inputs, sizes={"m0": 4})[c.outputs[0]]
        assert out.dtype == torch.float64 and out.shape == (P, F)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=f"{label} cascade differs from eager")


def test_1pass_runs_tile_by_tile():
    """The 1-pass interpreter never sees more than one tile of keys (a buffer independent of M)."""
    inputs, _ = make_inputs(4, 11, 3, 2, None)
    seen = []
    c1 = derive(scale=0.5)["1-pass"]
    interp = CascadeInterpreter(c1)
    orig = interp._tile

    def tile(v, rank, inner, t0, t1):
        out = orig(v, rank, inner, t0, t1)
        if v[1] != out[1]:
            seen.append(out[0].shape[v[1].index(rank)])
        return out
    interp._tile = tile
    out = interp.run(inputs, sizes={"m0": 4})["O"]
    assert seen == [4, 4, 4, 4, 3, 3]  # K and V, tiles of 4, 4, 3
    torch.testing.assert_close(out, eager_attention(inputs["Q"], inputs["K"], inputs["V"], 0.5))


def test_1pass_needs_the_tile_size():
    inputs, _ = make_inputs(3, 5, 2, 2, None)
    with pytest.raises(ValueError, match="m0"):
        CascadeInterpreter(derive()["1-pass"]).run(inputs)


def test_1pass_finite_fill_matches_eager_on_fully_masked_rows():
    # a dtype-minimum fill (not -inf): a fully masked row gets uniform weights, in every cascade
    fill = torch.finfo(torch.float64).min
    inputs, _ = make_inputs(4, 9, 3, 2, None)
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[2] = False
    inputs["M"] = mask
    ref = eager_attention(inputs["Q"], inputs["K"], inputs["V"], 0.5, mask, "bool", fill=fill)
    for label, c in derive(scale=0.5, mask="bool", fill=fill).items():
        out = CascadeInterpreter(c).run(inputs, sizes={"m0": 4})[c.outputs[0]]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=label)


@settings(max_examples=25, deadline=None)
@given(P=st.integers(1, 6), M=st.integers(1, 14), E=st.integers(1, 5), F=st.integers(1, 4),
       tile=st.integers(1, 6), kind=st.sampled_from([None, "additive", "causal"]),
       softcap=st.sampled_from([0.0, 3.0]), magnitude=st.sampled_from([0.1, 1.0, 30.0]))
def test_property_1pass_equals_eager(P, M, E, F, tile, kind, softcap, magnitude):
    if kind == "causal" and M < P:
        kind = None  # causal aligned to the end of keys leaves rows without keys when M < P
    scale = 1.0 / math.sqrt(E)
    inputs, mask = make_inputs(P, M, E, F, kind, seed=P + 7 * M + 31 * E, magnitude=magnitude)
    ref = eager_attention(inputs["Q"], inputs["K"], inputs["V"], scale, mask, kind, softcap)
    c1 = derive(scale=scale, mask=kind, softcap=softcap)["1-pass"]
    out = CascadeInterpreter(c1).run(inputs, sizes={"m0": tile})["O"]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_online_softmax_rejects_what_it_cannot_rewrite():
    # a sum over m that is not SN times other factors: exp(x - G) squared
    c2 = defer_division(attention_3pass(scale=0.5))
    bad = [e if e.out != "SD" else Einsum("SD", ("p",), node(Op.MUL, (read("SN", "p", "m"), read("SN", "p", "m"))),
                                          Op.SUM, ("m",)) for e in c2.einsums]
    with pytest.raises(ValueError, match="SD"):
        online_softmax(Cascade("bad", c2.inputs, tuple(bad), c2.outputs))


# ---------------------------------------------------------------- what the fused CPU op runs
LOWEST64 = torch.finfo(torch.float64).min


def test_guarded_1pass_is_derived_and_printed():
    """derive(..., band, lse, lowest): the band is a second where, LSE rides through both
    rewrites, and the guard SM = max(RM[m1+1], lowest) feeds the exponentials and PRM."""
    cs = derive(scale=0.125, mask="bool", softcap=30.0, band=True, lse=True, lowest=-1e30)
    assert "MQK[p,m] = where(W[p,m], where(M[p,m], 30 * tanh(QK[p,m] * 0.0333333), -inf), -inf)" in str(cs["3-pass"])
    assert cs["3-pass"].outputs == ("AV", "LSE") and cs["1-pass"].outputs == ("O", "LSE")
    lines = format_cascade(cs["1-pass"]).splitlines()
    assert "SM[m1,p] = max(RM[m1+1,p], -1e+30)" in lines
    assert "SLN[m1,m0,p] = exp(BMQK[m1,m0,p] - SM[m1,p])" in lines
    assert "PRM[m1,p] = exp(RM[m1,p] - SM[m1,p])" in lines
    assert lines[-1] == "LSE[p] = RM[M1,p] + log(RD[M1,p])"
    assert [passes_per_rank(cs[k])["m"] for k in ("3-pass", "2-pass", "1-pass")] == [3, 2, 1]
    # the defaults are untouched: no guard, no band, no LSE
    assert format_cascade(derive(scale=0.125, mask="additive")["1-pass"]) == PINNED_1PASS


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_guarded_1pass_equals_eager_when_leading_tiles_are_masked(kind):
    """Rows whose first key tiles are all -inf: the plain 1-pass is NaN there (FuseMax's
    limitation), the guarded one equals eager; an all-masked row is NaN in both, as in eager."""
    P, M = 5, 13
    inputs, _ = make_inputs(P, M, 3, 2, None, seed=21)
    g = torch.Generator().manual_seed(22)
    keep = torch.rand(P, M, generator=g) > 0.3
    keep[0, :8] = False     # two whole leading tiles of 4 masked
    keep[1, :4] = False
    keep[3] = False         # every key masked
    mask = keep if kind == "bool" else torch.zeros(P, M, dtype=torch.float64).masked_fill(~keep, NEG_INF)
    band = torch.ones(P, M, dtype=torch.bool).tril(M - P)
    inputs.update(M=mask, W=band)
    s = (2.0 * torch.tanh(inputs["Q"] @ inputs["K"].T * 0.25)).masked_fill(~keep, NEG_INF).masked_fill(~band, NEG_INF)
    ref = torch.softmax(s, -1) @ inputs["V"]  # eager: soft-cap, then the mask, then the band
    plain = derive(scale=0.5, mask=kind, softcap=2.0, band=True)["1-pass"]
    guarded = derive(scale=0.5, mask=kind, softcap=2.0, band=True, lse=True, lowest=LOWEST64)["1-pass"]
    out_plain = CascadeInterpreter(plain).run(inputs, sizes={"m0": 4})["O"]
    res = CascadeInterpreter(guarded).run(inputs, sizes={"m0": 4})
    assert torch.isnan(out_plain[0]).all()
    assert torch.equal(torch.isnan(res["O"]).any(-1), torch.tensor([False, False, False, True, False]))
    torch.testing.assert_close(res["O"].nan_to_num(0.0), ref.nan_to_num(0.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res["LSE"], torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)
