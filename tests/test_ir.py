"""IR unit tests: canonical forms, the matcher, the printer and the cascade interpreter."""

import torch
import torch.fx as fx

from einfuse.ir.cascade import Cascade, CascadeInterpreter, Einsum, format_cascade, read
from einfuse.ir.from_dag import dag_to_cascade
from einfuse.ir.lower import lower_function
from einfuse.ir.match import match
from einfuse.ir.node import Op, const, node


def canon(fn):
    return lower_function(fn)[0][0]


def test_spellings_of_one_computation_are_one_node():
    a = canon(lambda x: x.pow(2).mean(-1, keepdim=True))
    b = canon(lambda x: torch.mean(x * x, dim=-1, keepdim=True))
    assert a is b
    c = canon(lambda x, v: x / torch.sqrt(v + 1e-6))
    d = canon(lambda x, v: x * torch.rsqrt(v + 1e-6))
    e = canon(lambda x, v: torch.mul(x, (1e-6 + v).rsqrt()))
    assert c is d is e
    f = canon(lambda x: x.float().sigmoid() * x)
    g = canon(lambda x: torch.nn.functional.silu(x))
    assert f is g


def test_different_computations_differ():
    assert canon(lambda x: x.pow(2).mean(-1, keepdim=True)) is not canon(lambda x: x.pow(2).mean(-2, keepdim=True))
    assert canon(lambda x, y: x - y) is not canon(lambda x, y: y - x)
    assert canon(lambda x: torch.exp(x)) is not canon(lambda x: torch.log(x))


def test_spelled_softmax_canonicalises_to_softmax():
    def spelled(x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)
    assert canon(spelled) is canon(lambda x: torch.softmax(x, dim=-1))


def test_matcher_binds_variables_and_reports_the_first_difference():
    pat = canon(lambda x, w, eps: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)))
    ok = canon(lambda a, b: (a / torch.sqrt(torch.mean(a * a, -1, keepdim=True) + 1e-5)) * b)
    m = match(pat, ok)
    assert m.ok and m.bindings["eps"].arg == 1e-5
    bad = canon(lambda a, b: (a / torch.sqrt(torch.mean(a * a, -2, keepdim=True) + 1e-5)) * b)
    m = match(pat, bad)
    assert not m.ok and "sum over ((-2,), True), expected ((-1,), True)" in m.reason


def test_printer_is_pinned():
    qk = Einsum("QK", ("p", "m"), node(Op.MUL, (read("Q", "p", "e"), read("K", "m", "e"))), Op.SUM, ("e",))
    gm = Einsum("GM", ("p",), read("QK", "p", "m"), Op.MAX, ("m",))
    sn = Einsum("SN", ("p", "m"), node(Op.EXP, (node(Op.ADD, (read("QK", "p", "m"),
                node(Op.MUL, (const(-1.0), read("GM", "p"))))),)))
    c = Cascade("softmax", (("Q", ("p", "e")), ("K", ("m", "e"))), (qk, gm, sn), ("SN",))
    assert format_cascade(c) == (
        "QK[p,m] = sum_e Q[p,e] * K[m,e]\n"
        "GM[p] = max_m QK[p,m]\n"
        "SN[p,m] = exp(QK[p,m] - GM[p])")
    # structural identity: renaming tensors and ranks gives an equal cascade with the same key
    qk2 = Einsum("A", ("i", "j"), node(Op.MUL, (read("X", "i", "k"), read("Y", "j", "k"))), Op.SUM, ("k",))
    c1 = Cascade("a", (("Q", ("p", "e")), ("K", ("m", "e"))), (qk,), ("QK",))
    c2 = Cascade("b", (("X", ("i", "k")), ("Y", ("j", "k"))), (qk2,), ("A",))
    assert c1 == c2 and c1.key() == c2.key()
    assert c1 != Cascade("c", c1.inputs, (gm,), ("GM",))


def test_interpreter_matches_torch_on_random_inputs():
    q, k = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    qk = Einsum("QK", ("p", "m"), node(Op.MUL, (read("Q", "p", "e"), read("K", "m", "e"))), Op.SUM, ("e",))
    gm = Einsum("GM", ("p",), read("QK", "p", "m"), Op.MAX, ("m",))
    c = Cascade("t", (("Q", ("p", "e")), ("K", ("m", "e"))), (qk, gm), ("QK", "GM"))
    out = CascadeInterpreter(c).run({"Q": q, "K": k})
    torch.testing.assert_close(out["QK"], q @ k.T)
    torch.testing.assert_close(out["GM"], (q @ k.T).amax(-1))


def test_iterative_rank_runs_as_a_loop():
    # running max over tiles: RM[k+1] = max(RM[k], max_j X[k,j])
    x = torch.randn(4, 3, dtype=torch.float64)
    lm = Einsum("LM", ("k",), read("X", "k", "j"), Op.MAX, ("j",))
    rm = Einsum("RM", ("k+1",), node(Op.MAX2, (read("RM", "k"), read("LM", "k"))), init=float("-inf"))
    c = Cascade("runmax", (("X", ("k", "j")),), (lm, rm), ("RM",))
    out = CascadeInterpreter(c).run({"X": x})
    assert float(out["RM"]) == float(x.max())


def test_rmsnorm_region_lowers_to_a_cascade_that_evaluates_correctly():
    pat, names = lower_function(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
    root = pat[0]
    m = match(root, root)
    leaves = {id(m.bindings[n]): n.upper() for n in ("x", "w")}
    # the pattern has no shapes; give the leaves shapes through a concrete graph instead
    import einfuse.ir.lower as L
    class M(torch.nn.Module):
        def forward(self, x, w):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    from torch.fx.passes.shape_prop import ShapeProp
    gm = fx.symbolic_trace(M())
    x, w = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    ShapeProp(gm).propagate(x, w)
    for n in gm.graph.nodes:
        if "tensor_meta" in n.meta:
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape)
    low = L.lower_graph(gm.graph)
    out_fx = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    xs, ws = [low.of[n] for n in gm.graph.nodes if n.op == "placeholder"]
    c = dag_to_cascade("rmsnorm", {"Y": low.of[out_fx]}, {id(xs): "X", id(ws): "W"})
    assert format_cascade(c) == ("R0[b,s] = sum_h X[b,s,h] * X[b,s,h]\n"
                                 "Y[b,s,h] = W[h] * X[b,s,h] * rsqrt(1e-06 + (0.125 * R0[b,s]))")
    y = CascadeInterpreter(c).run({"X": x, "W": w})["Y"]
    torch.testing.assert_close(y, M()(x, w))


def _graph_of(fn, *args):
    """A traced graph with shapes, as Dynamo would give it."""
    from torch.fx.passes.shape_prop import ShapeProp
    gm = fx.symbolic_trace(fn)
    ShapeProp(gm).propagate(*args)
    for n in gm.graph.nodes:
        if "tensor_meta" in n.meta:
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape)
    return gm


def _region_cascade(fn, *args):
    import einfuse.ir.lower as L
    gm = _graph_of(fn, *args)
    low = L.lower_graph(gm.graph)
    out_fx = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    names = {}
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        names[id(low.of[n])] = "QKVWXYZ"[i]
    return dag_to_cascade("region", {"O": low.of[out_fx]}, names)


def test_attention_region_lowers_to_the_three_pass_cascade_and_runs():
    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1) @ v
    q, k, v = (torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 7, 4, dtype=torch.float64),
               torch.randn(2, 7, 3, dtype=torch.float64))
    c = _region_cascade(attn, q, k, v)
    text = format_cascade(c)
    assert text == (
        "R0[b,s,m] = sum_e K[b,m,e] * Q[b,s,e]\n"
        "R1[b,s] = max_m 0.125 * R0[b,s,m]\n"
        "R2[b,s,m] = exp((0.125 * R0[b,s,m]) - R1[b,s])\n"
        "R3[b,s] = sum_m R2[b,s,m]\n"
        "R4[b,s,h] = sum_m R2[b,s,m] * 1/R3[b,s] * V[b,m,h]\n"
        "O[b,s,h] = R4[b,s,h]"), text
    out = CascadeInterpreter(c).run({"Q": q, "K": k, "V": v})["O"]
    torch.testing.assert_close(out, attn(q, k, v))


def test_linear_einsum_and_log_softmax_regions_lower_and_run():
    def f(x, w, y):
        h = torch.nn.functional.linear(x, w)
        return torch.log_softmax(torch.einsum("bij,jk->bik", h, y), dim=-1)
    x, w, y = (torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64),
               torch.randn(6, 4, dtype=torch.float64))
    c = _region_cascade(f, x, w, y)
    out = CascadeInterpreter(c).run({"Q": x, "K": w, "V": y})["O"]
    torch.testing.assert_close(out, f(x, w, y))


def test_a_view_that_merges_ranks_is_reported_not_lowered():
    import pytest
    from einfuse.ir.from_dag import NotRepresentable
    with pytest.raises(NotRepresentable, match="splits or merges ranks"):
        _region_cascade(lambda x: x.reshape(6, 4).exp(), torch.randn(2, 3, 4))
