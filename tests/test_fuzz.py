"""Property-based fuzzing of every fused op against the fp64 reference rule (issue 9).

Each test draws shapes (odd sizes and 1 included), dtypes (fp32, bf16), magnitudes (logits up
to ~1e4), masks (fully masked rows included), ignored labels and the op's options, runs the
fused op, the unfused eager computation in the same dtype, and the same computation in fp64,
and asserts the rule: ||fused - ref|| / ||ref|| <= ||eager - ref|| / ||ref|| + tol (fp32 1e-5,
bf16 1e-2), for the outputs and, where the op has autograd, for the input gradients.

Two documented relaxations, for ill-conditioned cases, where both results are mostly rounding
noise and one comparison pits two random draws of it against each other:
- where eager's own error exceeds 1e-3 (fp32) / 1e-1 (bf16), the fused error must be within 4x eager's;
- otherwise, when the single comparison fails, the case is re-judged on its neighbourhood: the fused
  op and eager are both evaluated at the case's inputs and at 8 neighbouring inputs (each input
  element moved by -1, 0 or +1 ulp of its dtype at random), each against fp64 at the same inputs. It
  passes if the fused error at the case stays within 4x max(eager's error, eager's median) (a gross
  or value-specific error is never averaged away) and either the fused median does not exceed eager's
  median + tol, or eager's median itself exceeds tol (eager's typical error is above the tolerance:
  the case is ill-conditioned and both results are noise of that size).
Re-judged and ill-conditioned cases are counted and reported separately;
test_rule_still_catches_wrong_results shows the rule still fails a 5% error on such a case.
NaN / inf positions (eager's fully masked softmax rows, a loss over no label) must match eager's exactly.

The cases tried per op are counted and written to pytest's cache (einfuse/fuzz) and printed
as EINFUSE_FUZZ. Examples are derandomized (the same cases every run, CI-stable); set
EINFUSE_FUZZ_EXAMPLES to try more per op.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from einfuse.runtime import counters
from einfuse.runtime.ops.attention import attention
from einfuse.runtime.ops.linear_cross_entropy import linear_cross_entropy
from einfuse.runtime.ops.quantized_linear import quantized_linear
from einfuse.runtime.ops.rmsnorm import rms_norm
from einfuse.runtime.ops.rope import rope
from einfuse.runtime.ops.swiglu import glu, glu_mlp
from einfuse.quant.schemes import quantize_weight, reference_linear

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EXAMPLES = int(os.environ.get("EINFUSE_FUZZ_EXAMPLES", "60"))
CASES: Counter[str] = Counter()
MISMATCHES: Counter[str] = Counter()
ILL_CONDITIONED: Counter[str] = Counter()
REJUDGED: Counter[str] = Counter()
ILL = {torch.float32: 1e-3, torch.bfloat16: 1e-1}   # eager's own error above this: ill-conditioned case
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The smallest cases of three families a 300-example run once reported as mismatches: ill-conditioned
# cases where eager's error was a lucky draw well below the case's noise floor (kept as @examples).
dtypes = st.sampled_from([torch.float32, torch.bfloat16])
sizes = st.integers(1, 9)
scales = st.sampled_from([1e-2, 1.0, 10.0, 100.0])


@pytest.fixture(scope="module", autouse=True)
def _tally(request):
    yield
    out = {"cases": dict(CASES), "total": sum(CASES.values()), "mismatches": sum(MISMATCHES.values()),
           "ill_conditioned": dict(ILL_CONDITIONED), "rejudged": dict(REJUDGED),
           "examples_per_test": EXAMPLES}
    print("\nEINFUSE_FUZZ " + json.dumps(out))
    if getattr(request.config, "cache", None) is not None:  # absent under -p no:cacheprovider
        request.config.cache.set("einfuse/fuzz", out)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _err(out, ref, where):
    o, r = out.detach().double(), ref.detach().double()
    o, r = o[where], r[where]
    den = r.norm()
    return float((o - r).norm() / den) if den > 0 else float((o - r).norm())


def neighbour(inputs, draw):
    """The inputs with each finite nonzero element of every floating tensor moved by -1, 0 or +1 ulp (its
    own dtype) at random: an equally plausible input for the same case."""
    g = _gen(1000 + draw)
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            step = torch.randint(-1, 2, t.shape, generator=g)
            far = torch.where(step > 0, float("inf"), float("-inf")).to(t.dtype)
            moved = torch.nextafter(t, far)
            t = torch.where((step != 0) & torch.isfinite(t) & (t != 0), moved, t)
        out.append(t)
    return out


NEIGHBOURS = 8


def rejudge(errors_at):
    """`errors_at(k)` -> (fused errors, eager errors), one per result, at the case's inputs (k = -1) or
    its k-th neighbour; returns per result (fused median, eager median) over the 1 + NEIGHBOURS points."""
    pts = [errors_at(k) for k in range(-1, NEIGHBOURS)]
    med = lambda col: sorted(col)[len(col) // 2]
    return [(med(f), med(e)) for f, e in zip(zip(*(p[0] for p in pts)), zip(*(p[1] for p in pts)))]


def _errs(outs, refs):
    return [_err(o, r, torch.isfinite(o.double()) & torch.isfinite(r)) for o, r in zip(outs, refs)]


def check(name, out, eager, ref, dtype, rejudged=None):
    """The fp64 rule on the finite positions; non-finite positions must match eager's.

    `rejudged`: a zero-argument callable giving (fused median, eager median) of the errors over the case
    and its neighbours (computed only when the single comparison fails: it costs 18 more evaluations)."""
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    fin_e = torch.isfinite(eager.double())
    fin_o = torch.isfinite(out.double())
    if not torch.equal(fin_o, fin_e):
        MISMATCHES[name] += 1
        raise AssertionError(f"{name}: non-finite positions differ from eager's")
    where = fin_e & torch.isfinite(ref)
    eo, ee = _err(out, ref, where), _err(eager, ref, where)
    if eo <= ee + TOL[dtype]:
        return
    if ee > ILL[dtype] and eo <= 4 * ee:
        # ill-conditioned: eager's own result is mostly rounding noise here (e.g. the RMSNorm
        # gradient at h=1, a difference of nearly equal terms); both are noise: counted, reported
        ILL_CONDITIONED[name.split(" grad")[0]] += 1
        return
    fm, em = rejudged() if rejudged is not None else (math.inf, 0.0)
    if eo <= 4 * max(ee, em) and (fm <= em + TOL[dtype] or em > TOL[dtype]):
        # one unlucky draw: over the case's neighbourhood the fused op is as accurate as eager, or
        # eager's own typical error there exceeds the tolerance (the case is ill-conditioned: both
        # are noise of that size, e.g. a 1e-17 bias gradient left by +-1/3 terms cancelling)
        REJUDGED[name.split(" grad")[0]] += 1
        return
    MISMATCHES[name] += 1
    raise AssertionError(f"{name}: fused error {eo:.3e} > eager error {ee:.3e} + {TOL[dtype]} "
                         f"(medians over the neighbourhood: fused {fm:.3e}, eager {em:.3e})")


def grads(fn, inputs, proj_seed=7):
    """Output and the gradients of sum(out * P) w.r.t. every floating input (P fixed, fp64)."""
    ins = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
           for t in inputs]
    out = fn(*ins)
    p = torch.randn(out.shape, generator=_gen(proj_seed), dtype=torch.float64)
    (out.double() * p).nan_to_num(0.0).sum().backward()
    return out.detach(), [t.grad for t in ins if isinstance(t, torch.Tensor) and t.is_floating_point()]


def rule_with_grads(name, fused, eager, inputs, dtype, backward=True, unchecked_grads=()):
    CASES[name] += 1
    ref_in = [_fp64(t) for t in inputs]
    at = lambda k: inputs if k < 0 else neighbour(inputs, k)
    if not backward:
        with torch.no_grad():
            def errors_at(k):
                ins = at(k)
                ref = eager(*[_fp64(t) for t in ins])
                return _errs([fused(*ins)], [ref]), _errs([eager(*ins)], [ref])
            med = _lazy(lambda: rejudge(errors_at))
            check(name, fused(*inputs), eager(*inputs), eager(*ref_in), dtype, rejudged=lambda: med()[0])
        return
    o_f, g_f = grads(fused, inputs)
    o_e, g_e = grads(eager, inputs)
    o_r, g_r = grads(eager, ref_in)

    def errors_at(k):
        ins = at(k)
        (of, gf), (oe, ge), (o64, g64) = grads(fused, ins), grads(eager, ins), grads(eager, [_fp64(t) for t in ins])
        return _errs([of] + gf, [o64] + g64), _errs([oe] + ge, [o64] + g64)
    med = _lazy(lambda: rejudge(errors_at))
    check(name, o_f, o_e, o_r, dtype, rejudged=lambda: med()[0])
    for i, (a, b, c) in enumerate(zip(g_f, g_e, g_r)):
        if i not in unchecked_grads:
            check(f"{name} grad {i}", a, b, c, dtype, rejudged=lambda i=i: med()[i + 1])


def _fp64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _lazy(fn):
    """fn's result, computed on the first call only."""
    memo = []
    return lambda: memo[0] if memo else (memo.append(fn()) or memo[0])


# -- rmsnorm ------------------------------------------------------------------------------------------

@example(lead=[1], h=1, dtype=torch.float32, scale=1.0, gemma=False, eps=1e-05, seed=0)
@FUZZ
@given(lead=st.lists(sizes, min_size=1, max_size=3), h=st.integers(1, 67), dtype=dtypes, scale=scales,
       gemma=st.booleans(), eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 2**16))
def test_fuzz_rmsnorm(lead, h, dtype, scale, gemma, eps, seed):
    g = _gen(seed)
    x, w = _randn(g, *lead, h, scale=scale, dtype=dtype), _randn(g, h, dtype=dtype)
    off = 1.0 if gemma else 0.0

    def eager(x, w):   # Hugging Face's spelling: fp32 upcast, cast back
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return ((w.to(y.dtype) + off) * y).to(torch.result_type(x, w))

    with counters.counting() as c:
        # At h = 1 the input gradient is exactly r^3 * eps * g * w: the difference of two terms equal to
        # ~eps relative (1 - x^2 / (x^2 + eps)), so any fp32/bf16 evaluation of it, eager's included,
        # is rounding noise (errors 1e-2 .. 1 against fp64, which draw is luckier is chance). The
        # forward and the weight gradient are still checked there; h >= 2 checks every gradient.
        rule_with_grads("rmsnorm", lambda x, w: rms_norm(x, w, eps, off), eager, [x, w], dtype,
                        unchecked_grads=(0,) if h == 1 else ())
    assert c["rmsnorm"] >= 1


# -- swiglu: glu and glu_mlp -------------------------------------------------------------------------

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


@FUZZ
@given(lead=st.lists(sizes, min_size=1, max_size=3), n=st.integers(1, 33), dtype=dtypes, scale=scales,
       act=st.sampled_from(sorted(ACTS)), seed=st.integers(0, 2**16))
def test_fuzz_glu(lead, n, dtype, scale, act, seed):
    g = _gen(seed)
    gate, up = _randn(g, *lead, n, scale=scale, dtype=dtype), _randn(g, *lead, n, scale=scale, dtype=dtype)
    with counters.counting() as c:
        rule_with_grads("glu", lambda a, b: glu(a, b, act), lambda a, b: ACTS[act](a) * b, [gate, up], dtype)
    assert c["swiglu"] >= 1


@example(tokens=[7, 7], h=1, i=1, dtype=torch.bfloat16, scale=1.0, act='gelu', bias=False, seed=23)
@FUZZ
@given(tokens=st.lists(sizes, min_size=1, max_size=2), h=st.integers(1, 24), i=st.integers(1, 40), dtype=dtypes,
       scale=st.sampled_from([0.1, 1.0, 10.0]), act=st.sampled_from(sorted(ACTS)), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzz_glu_mlp(tokens, h, i, dtype, scale, act, bias, seed):
    g = _gen(seed)
    x = _randn(g, *tokens, h, scale=scale, dtype=dtype)
    wg, wu, wd = _randn(g, i, h, dtype=dtype), _randn(g, i, h, dtype=dtype), _randn(g, h, i, dtype=dtype)
    bs = [_randn(g, i, dtype=dtype), _randn(g, i, dtype=dtype), _randn(g, h, dtype=dtype)] if bias else [None] * 3

    def eager(x, wg, wu, wd, *b):
        b = list(b) + [None] * (3 - len(b))
        return F.linear(ACTS[act](F.linear(x, wg, b[0])) * F.linear(x, wu, b[1]), wd, b[2])

    def fused(x, wg, wu, wd, *b):
        b = list(b) + [None] * (3 - len(b))
        return glu_mlp(x, wg, wu, wd, *b, act=act)

    with counters.counting() as c:
        rule_with_grads("glu_mlp", fused, eager, [x, wg, wu, wd] + ([*bs] if bias else []), dtype)
    assert c["swiglu"] >= 1


# -- rope ---------------------------------------------------------------------------------------------

def _rotate_half(t):
    a, b = t.chunk(2, -1)
    return torch.cat((-b, a), -1)


@FUZZ
@given(b=st.integers(1, 3), hq=st.integers(1, 4), hk=st.integers(1, 3), s=sizes, half=st.integers(1, 8),
       extra=st.integers(0, 5), dtype=dtypes, interleaved=st.booleans(), batched_cs=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzz_rope(b, hq, hk, s, half, extra, dtype, interleaved, batched_cs, seed):
    g = _gen(seed)
    r, d = 2 * half, 2 * half + extra          # partial rotary: the last `extra` features pass through
    q, k = _randn(g, b, hq, s, d, dtype=dtype), _randn(g, b, hk, s, d, dtype=dtype)
    pos = torch.arange(s, dtype=torch.float64)[:, None] + torch.randint(0, 50, (1,), generator=g)
    ang = pos * (10000.0 ** (-torch.arange(half, dtype=torch.float64) / half))        # [s, half]
    ang = ang if interleaved else torch.cat((ang, ang), -1)                             # [s, r or half]
    if batched_cs:
        ang = ang.expand(b, *ang.shape)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def eager(q, k, cos, sin):
        c4, s4 = (cos[:, None] if cos.dim() == 3 else cos), (sin[:, None] if sin.dim() == 3 else sin)

        def one(x):
            xr, xp = x[..., :r], x[..., r:]
            if interleaved:
                x1, x2 = xr[..., 0::2], xr[..., 1::2]
                y = torch.stack((x1 * c4 - x2 * s4, x2 * c4 + x1 * s4), -1).flatten(-2)
            else:
                y = xr * c4 + _rotate_half(xr) * s4
            return torch.cat((y, xp), -1)
        return torch.cat([one(q).flatten(), one(k).flatten()])

    def fused(q, k, cos, sin):
        qo, ko = rope(q, k, cos, sin, interleaved=interleaved)
        return torch.cat([qo.flatten(), ko.flatten()])

    with counters.counting() as c:
        rule_with_grads("rope", fused, eager, [q, k, cos, sin], dtype)
    assert c["rope"] >= 1


# -- attention ----------------------------------------------------------------------------------------

@example(b=1, hkv=1, grp=2, s=6, t=2, d=6, dtype=torch.float32, mag=100.0, mask='none', causal=False, window=-1, softcap=50.0, sdpa_rows=False, seed=1)
@FUZZ
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), grp=st.integers(1, 3), s=sizes, t=sizes, d=st.integers(1, 17),
       dtype=dtypes, mag=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
       mask=st.sampled_from(["none", "bool", "float", "bool_dead_rows", "float_dead_rows"]),
       causal=st.booleans(), window=st.sampled_from([-1, -1, 1, 3]), softcap=st.sampled_from([0.0, 0.0, 5.0, 50.0]),
       sdpa_rows=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_attention(b, hkv, grp, s, t, d, dtype, mag, mask, causal, window, softcap, sdpa_rows, seed):
    g = _gen(seed)
    hq = hkv * grp
    q = _randn(g, b, hq, s, d, scale=mag, dtype=dtype)   # scores up to ~mag^2 * d: logits to 1e4+
    k, v = _randn(g, b, hkv, t, d, scale=mag, dtype=dtype), _randn(g, b, hkv, t, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    m = None
    if mask != "none":
        keep = torch.rand(b, 1, s, t, generator=g) > 0.3
        if mask.endswith("dead_rows"):
            keep[:, :, torch.randint(0, s, (1,), generator=g)] = False        # a fully masked row
        if mask.startswith("bool"):
            m = keep
        else:   # additive: -inf where masked, a small bias elsewhere
            m = torch.where(keep, _randn(g, b, 1, s, t, scale=0.5), torch.tensor(float("-inf"))).to(dtype)

    def eager(q, k, v):
        wd = q.dtype
        kk, vv = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
        sc = (q @ kk.transpose(-1, -2)) * scale
        if softcap > 0:
            sc = softcap * torch.tanh(sc / softcap)
        if m is not None:
            sc = sc.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else sc + m.to(wd)
        i = torch.arange(s)[:, None] + (t - s)
        j = torch.arange(t)[None, :]
        if causal:
            sc = sc.masked_fill(j > i, float("-inf"))
        if window > 0:
            sc = sc.masked_fill(j <= i - window, float("-inf"))
        dead = ~torch.isfinite(sc).any(-1, keepdim=True) if sdpa_rows else None
        if sdpa_rows:       # F.scaled_dot_product_attention's zeros on dead rows (and no NaN gradient)
            sc = sc.masked_fill(dead, 0.0)
        p = torch.softmax(sc, -1, dtype=torch.float32 if wd != torch.float64 else wd).to(wd)   # HF: fp32 softmax
        if sdpa_rows:
            p = p.masked_fill(dead, 0.0)
        return p @ vv

    def fused(q, k, v):
        return attention(q, k, v, m, scale=scale, is_causal=causal, window=window, softcap=softcap,
                         sdpa_masked_rows=sdpa_rows)

    with counters.counting() as c:
        # gradients only where eager has them everywhere (a dead row's NaN poisons eager's backward)
        with torch.no_grad():
            dead = not torch.isfinite(eager(q.double(), k.double(), v.double())).all()
        rule_with_grads("attention", fused, eager, [q, k, v], dtype, backward=not dead or sdpa_rows)
    assert c["attention"] >= 1


# -- linear cross-entropy -----------------------------------------------------------------------------

@example(n=1, h=1, vocab=1, dtype=torch.float32, logit_scale=1.0, ignored=0.0, bias=False, reduction="mean", z_loss=0.0001, softcap=0.0, seed=0)
# well-predicted rows (P[y] within ~1e-4 of 1): -log(P[y]) lost accuracy; now -log1p(-sum of the others)
@example(n=1, h=2, vocab=2, dtype=torch.float32, logit_scale=30.0, ignored=0.0, bias=False, reduction="mean",
         z_loss=0.0, softcap=0.0, seed=2)
# logits ~1e4: the bias gradient is ~1e-17, what +-1/3 terms leave after cancelling (re-judged)
@example(n=3, h=2, vocab=2, dtype=torch.float32, logit_scale=10000.0, ignored=0.0, bias=True, reduction="mean",
         z_loss=0.0, softcap=0.0, seed=2)
@FUZZ
@given(n=st.integers(1, 40), h=st.integers(1, 24), vocab=st.integers(1, 300), dtype=dtypes,
       logit_scale=st.sampled_from([1.0, 30.0, 1e3, 1e4]), ignored=st.sampled_from([0.0, 0.3, 1.0]),
       bias=st.booleans(), reduction=st.sampled_from(["mean", "sum"]), z_loss=st.sampled_from([0.0, 1e-4]),
       softcap=st.sampled_from([0.0, 0.0, 30.0]), seed=st.integers(0, 2**16))
def test_fuzz_linear_cross_entropy(n, h, vocab, dtype, logit_scale, ignored, bias, reduction, z_loss, softcap,
                                   seed):
    g = _gen(seed)
    x = _randn(g, n, h, scale=logit_scale / math.sqrt(h), dtype=dtype)     # logits ~ logit_scale
    w = _randn(g, vocab, h, dtype=dtype)
    bvec = _randn(g, vocab, dtype=dtype) if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = -100                          # ignored labels (maybe all)

    def eager(x, w, *b):
        logits = F.linear(x, w, b[0] if b else None).float() if x.dtype != torch.float64 else F.linear(
            x, w, b[0] if b else None)
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        loss = F.cross_entropy(logits, y, ignore_index=-100, reduction=reduction)
        if z_loss:
            lse = torch.logsumexp(logits, -1)[y != -100]
            zl = (lse ** 2).sum()
            loss = loss + z_loss * (zl / max(int((y != -100).sum()), 1) if reduction == "mean" else zl)
        return loss.reshape(1)

    def fused(x, w, *b):
        return linear_cross_entropy(x, w, y, b[0] if b else None, ignore_index=-100, reduction=reduction,
                                    z_loss=z_loss, softcap=softcap).float().reshape(1)

    with counters.counting() as c:
        rule_with_grads("linear_cross_entropy", fused, eager, [x, w] + ([bvec] if bias else []), dtype)
    assert c["linear_cross_entropy"] >= 1


# -- quantized linear ---------------------------------------------------------------------------------

@FUZZ
@given(tokens=st.lists(sizes, min_size=1, max_size=2), n_out=st.integers(1, 20), groups=st.integers(1, 3),
       scheme=st.sampled_from(["int8", "int4", "int6", "w8a8", "llm_int8"]), dtype=dtypes,
       scale=st.sampled_from([0.1, 1.0, 10.0]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_quantized_linear(tokens, n_out, groups, scheme, dtype, scale, bias, seed):
    g = _gen(seed)
    gs = 32 if scheme in ("int4", "int6") else 0
    k = groups * 32
    q = quantize_weight(_randn(g, n_out, k), scheme, gs)
    x = _randn(g, *tokens, k, scale=scale, dtype=dtype)
    b = _randn(g, n_out, dtype=dtype) if bias else None
    kw = dict(scheme=scheme, group_size=gs, in_features=k)

    def eager(x, *bb):
        return reference_linear(x, q["qweight"], q["scales"], q["offsets"], bb[0] if bb else None,
                                dtype=x.dtype, **kw).to(x.dtype)

    def fused(x, *bb):
        return quantized_linear(x, q["qweight"], q["scales"], q["offsets"], bb[0] if bb else None, **kw)

    with counters.counting() as c:
        rule_with_grads("quantized_linear", fused, eager, [x] + ([b] if bias else []), dtype,
                        backward=scheme in ("int8", "int4", "int6"))   # w8a8/llm_int8: straight-through grads
    assert c["quantized_linear"] >= 1


# -- activation-sparse gated MLP ----------------------------------------------------------------------

@example(tokens=[1], h=1, i=11, dtype=torch.bfloat16, method='moc', frac=0.1, act='gelu', seed=0)
@FUZZ
@given(tokens=st.lists(sizes, min_size=1, max_size=2), h=st.integers(1, 20), i=st.integers(1, 40), dtype=dtypes,
       method=st.sampled_from(["moc", "chess"]), frac=st.sampled_from([0.1, 0.5, 0.9]),
       act=st.sampled_from(sorted(ACTS)), seed=st.integers(0, 2**16))
def test_fuzz_sparse_glu_mlp(tokens, h, i, dtype, method, frac, act, seed):
    g = _gen(seed)
    x = _randn(g, *tokens, h, dtype=dtype)
    wg, wu, wd = _randn(g, i, h, dtype=dtype), _randn(g, i, h, dtype=dtype), _randn(g, h, i, dtype=dtype)
    kk = max(1, int(i * (1 - frac))) if method == "moc" else 0
    th = (torch.rand(i, generator=g) * frac).to(dtype) if method == "chess" else None
    def run(x, wg, wu, wd):
        return torch.ops.einfuse.sparse_glu_mlp(x, wg, wu, wd, None, None, None, th, act, method, kk, "fuzz")
    out, mask = run(x, wg, wu, wd)
    CASES["sparse_glu_mlp"] += 1
    if method == "moc":
        assert bool((mask.sum(-1) == min(kk, i)).all()), "moc keeps exactly k channels per token"

    def eager(x, wg, wu, wd, mask=mask):   # the dense MLP restricted to the channels the op kept
        return F.linear((ACTS[act](F.linear(x, wg)) * F.linear(x, wu)) * mask.to(x.dtype), wd)

    ins = [x, wg, wu, wd]

    def errors_at(k):
        nb = ins if k < 0 else neighbour(ins, k)
        o, m = run(*nb)
        ref = eager(*[_fp64(t) for t in nb], mask=m)
        return _errs([o], [ref]), _errs([eager(*nb, mask=m)], [ref])
    check("sparse_glu_mlp", out, eager(*ins), eager(*[_fp64(t) for t in ins]), dtype,
          rejudged=lambda: rejudge(errors_at)[0])


def test_rule_still_catches_wrong_results(monkeypatch):
    """The relaxations do not make the rule vacuous: a result with a 5% error is caught in a
    well-conditioned case and in the ill-conditioned softcap case above (eager's errors ~1e-4 there),
    and an fp32 op that rounds through bf16 is caught."""
    for tally in ("MISMATCHES", "CASES", "REJUDGED", "ILL_CONDITIONED"):   # keep the file's tally clean
        monkeypatch.setattr(sys.modules[__name__], tally, Counter())

    def run_rule(fused, eager, inputs):
        rule_with_grads("self-test", fused, eager, inputs, torch.float32)
    g = _gen(3)
    x = _randn(g, 5, 7)

    def f(t):
        return torch.softmax(t * 3.0, -1)
    run_rule(f, f, [x])                                  # the rule passes the right answer ...
    with pytest.raises(AssertionError, match="fused error"):
        run_rule(lambda t: f(t) * 1.05, f, [x])          # ... and fails a 5% error
    with pytest.raises(AssertionError, match="fused error"):
        run_rule(lambda t: f(t.bfloat16()).float(), f, [x])

    # the ill-conditioned attention case: q gradient with softcap 50 and scores ~1e4
    q, k, v = _randn(g, 1, 2, 6, 6, scale=100.0), _randn(g, 1, 1, 2, 6, scale=100.0), _randn(g, 1, 1, 2, 6)

    def att(q, k, v):
        sc = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(6)
        return torch.softmax(50 * torch.tanh(sc / 50), -1) @ v.repeat_interleave(2, 1)

    def att_bad(q, k, v):                                # right forward, q gradient 5% too large
        q = q + (q * 0.05 - (q * 0.05).detach())
        return att(q, k, v)
    _, g_e = grads(att, [q, k, v])
    _, g_r = grads(att, [_fp64(t) for t in (q, k, v)])
    assert _err(g_e[0], g_r[0], torch.isfinite(g_r[0])) > 10 * TOL[torch.float32]   # ill-conditioned ...
    with pytest.raises(AssertionError, match="self-test grad 0: fused error"):
        run_rule(att_bad, att, [q, k, v])                # ... a wrong gradient is still caught


def test_every_op_was_fuzzed():
    """Runs last: each of the 8 fuzz tests above tried cases, none mismatched (not a vacuous pass)."""
    if len(CASES) < 8:
        pytest.skip("only meaningful when the whole file runs")
    assert all(n >= EXAMPLES // 2 for n in CASES.values()), dict(CASES)
    assert not MISMATCHES, dict(MISMATCHES)
