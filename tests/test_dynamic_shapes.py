"""Dynamic shapes (issue 9): 12 calls with varying batch and sequence lengths, length 1 included.

Every call's logits follow the fp64 rule and run the fused ops; the number of compilations is
bounded and reported (`einfuse.capture.compile_stats`, also in `report.notes` and printed as
EINFUSE_DYNAMIC); the report's cost expressions stay symbolic in batch and seq.

Why the bounds: Dynamo specialises sizes 0 and 1 (a size-1 dimension broadcasts), so with both
batch and seq dynamic there are up to 2 x 2 graphs: {b>1, s>1}, {b=1}, {s=1}, {b=1, s=1}.
Without marking, the first call compiles a static graph and the first shape change a dynamic
one ("automatic dynamic"): at most one more.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import einfuse
from einfuse.capture import compile_records, compile_stats
from einfuse.runtime import counters
from hf_models import TOL, build, rel_err

SHAPES = [(2, 7), (3, 5), (1, 1), (2, 1), (4, 9), (1, 6), (3, 12), (2, 2), (1, 3), (4, 1), (2, 15), (3, 8)]
TWO_DIMS = 4                 # 0/1 specialisation of batch and seq


def _ids(b, s, i):
    return torch.randint(0, 96, (b, s), generator=torch.Generator().manual_seed(i))


def _twelve_calls(fast, model, ref, mark=False):
    per_call = []
    for i, (b, s) in enumerate(SHAPES):
        ids = _ids(b, s, i)
        if mark:
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(ids, 1)
        with torch.no_grad(), counters.counting() as calls:
            got = fast(input_ids=ids).logits
        with torch.no_grad():
            eager, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
        assert got.shape == (b, s, 96)
        e_got, e_eager = rel_err(got, want), rel_err(eager, want)
        assert e_got <= e_eager + TOL[torch.float32], f"shape {(b, s)}: {e_got:.3e} > {e_eager:.3e}"
        assert calls["rmsnorm"] == 5 and calls["attention"] == 2, (b, s, dict(calls))
        per_call.append(fast.einfuse_report.graphs)
    return per_call


def _report(request, key, fast, per_call):
    rep = fast.einfuse_report
    stats = compile_stats(rep)
    out = {"calls": len(SHAPES), "shapes": SHAPES, **stats, "graphs_after_each_call": per_call,
           "symbols": sorted({s for r in compile_records(rep) for s in r.symbols})}
    print(f"\nEINFUSE_DYNAMIC {key} " + json.dumps(out))
    if getattr(request.config, "cache", None) is not None:  # absent under -p no:cacheprovider
        request.config.cache.set(f"einfuse/dynamic_shapes/{key}", out)
    return rep, stats


@pytest.fixture
def models():
    model = build("llama").eval()
    return model, copy.deepcopy(model).double()


def test_twelve_shapes_automatic_dynamic(models, request):
    model, ref = models
    fast = einfuse.optimize(model)
    per_call = _twelve_calls(fast, model, ref)
    rep, stats = _report(request, "automatic", fast, per_call)
    assert stats["compilations"] <= 1 + TWO_DIMS and stats["recompilations"] == stats["compilations"] - 1
    assert stats["dynamic_graphs"] >= 1
    assert per_call[-1] == per_call[6], "shapes seen before (up to 0/1) must not recompile"
    assert any("recompilation" in n for n in rep.notes)
    # costs stay symbolic: the flops of the captured graphs are a polynomial in batch and seq
    flops = rep.cost_after.flops
    assert {str(s) for s in flops.free_symbols} >= {"batch", "seq"}, flops


def test_twelve_shapes_marked_dynamic(models, request):
    model, ref = models
    fast = einfuse.optimize(model)
    per_call = _twelve_calls(fast, model, ref, mark=True)
    rep, stats = _report(request, "mark_dynamic", fast, per_call)
    assert stats["compilations"] <= TWO_DIMS
    assert all(r.symbols for r in compile_records(rep)[:1]), "the first graph is already dynamic"


def test_training_shapes_dynamic_true_compile_once():
    """Training (loss and gradients through the fused ops) over 4 shapes, dynamic=True: 1 graph."""
    model = build("llama")
    ref = copy.deepcopy(model).double()
    eager = copy.deepcopy(model)
    fast = einfuse.optimize(model, dynamic=True)
    for i, (b, s) in enumerate([(2, 7), (3, 5), (2, 12), (4, 3)]):
        ids = _ids(b, s, i)
        outs = []
        for m in (fast, eager, ref):
            m.zero_grad(set_to_none=True)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            outs.append((loss.detach(), dict(m.named_parameters())))
        (lf, pf), (le, pe), (lr, pr) = outs
        assert rel_err(lf, lr) <= rel_err(le, lr) + TOL[torch.float32]
        for n in pr:
            assert rel_err(pf[n].grad, pr[n].grad) <= rel_err(pe[n].grad, pr[n].grad) + TOL[torch.float32], n
    stats = compile_stats(fast.einfuse_report)
    assert stats["compilations"] == 1 and stats["dynamic_graphs"] == 1, stats
    assert fast.einfuse_report.fusions["linear_cross_entropy"] == 1
