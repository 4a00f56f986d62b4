"""Activation sparsity for gated MLPs: ``optimize(model, sparsity={"method": ..., "target": 0.5})``.

Finds each gated MLP ``down(act(gate(x)) * up(x))`` in the captured graph and replaces it by
``einfuse::sparse_glu_mlp`` (einfuse/runtime/ops/sparse_mlp.py), which multiplies only the intermediate
channels the method keeps:

* "chess" — channel-wise thresholds on |act(gate)| calibrated to the target (``einfuse.calibrate``);
* "moc" — the top-K channels of |act(gate)| per token (Mixture-of-Channels), K = (1 - target) * I;
* "coreinfer" — sentence-level core channels chosen at prefill (dense) and fixed for the decode steps;
  the runtime state is ``einfuse.runtime.ops.sparse_mlp.STATE`` (see ``CoreInferState``), one entry per
  layer keyed by its down weight, replaced by every call with more than one new token per sequence.

Coordination with the "swiglu" fusion: this pass runs after it (PIPELINE order) and rewrites the
``glu_mlp`` calls it produced — so every spelling swiglu recognises (fused gate_up weights, chunks,
upcasts, GeGLU) is sparsified too. Gated MLPs that swiglu did not fuse (or with swiglu disabled, e.g.
``passes=("sparsity",)``) are recognised here directly in their plain FX form
``linear(act(linear(x, Wg)) * linear(x, Wu), Wd)`` (act: silu, gelu, gelu-tanh; either factor order),
or swiglu's elementwise ``glu(gate, up)`` feeding a down projection. MLPs whose projections are
quantized (``einfuse::quantized_linear``, from ``optimize(quantize=...)``) stay dense and are reported
with the reason: sparse execution gathers rows of floating-point weights. Layer skipping composes.
Every MLP is keyed by its down-projection parameter's name (``model.layers.3.mlp.down_proj.weight``),
which is how calibration statistics find their layer. Target 0 (or no option) leaves the graph as is.

With ``calibration`` still collecting (inside ``einfuse.calibrate``), MLPs become
``einfuse::glu_mlp_observe`` instead: dense, recording their gate activations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from einfuse.ir.lower import op_name
from einfuse.runtime.ops import sparse_mlp
from einfuse.runtime.ops.sparse_mlp import METHODS, glu_mlp_observe, sparse_glu_mlp
from einfuse.runtime.ops.swiglu import glu_mlp
from .base import PassContext, clone, erase_dead, finish, tensor_meta
from .rope import emit, fake_mode_of, replace_value


# -- options ---------------------------------------------------------------------------------------

def normalise_sparsity(spec: Any) -> dict:
    """Validate ``{"method": ..., "target": ...}`` and return a fresh dict with a float target."""
    if not isinstance(spec, dict):
        raise TypeError(f"sparsity must be a dict like {{'method': 'chess', 'target': 0.5}}, got "
                        f"{type(spec).__name__}")
    unknown = set(spec) - {"method", "target"}
    if unknown:
        raise ValueError(f"unknown sparsity key {sorted(unknown)[0]!r}; keys are 'method' and 'target'")
    method = spec.get("method")
    if method not in METHODS:
        raise ValueError(f"sparsity method must be one of {METHODS}, got {method!r}")
    target = spec.get("target", 0.5)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"sparsity target must be a number in [0, 1) (the fraction of MLP channels "
                         f"skipped), got {target!r}")
    return {"method": method, "target": float(target)}


def check_options(config) -> None:
    """Validate OptimizeConfig's sparsity / layer_skip / calibration (called from its __post_init__)."""
    from einfuse.calibrate import Calibration
    cal = config.calibration
    if cal is not None and not isinstance(cal, Calibration):
        raise TypeError(f"calibration must be an einfuse.calibrate(...) result (Calibration), got "
                        f"{type(cal).__name__}")
    ls = config.layer_skip
    if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0.0 <= float(ls) < 1.0:
        raise ValueError(f"layer_skip must be a number in [0, 1) (the fraction of decoder layers to skip), "
                         f"got {ls!r}")
    object.__setattr__(config, "layer_skip", float(ls))
    if config.sparsity is not None:
        spec = normalise_sparsity(config.sparsity)
        object.__setattr__(config, "sparsity", spec)
        if spec["method"] == "chess" and spec["target"] > 0 and cal is None:
            raise ValueError("sparsity method 'chess' needs calibrated thresholds: pass "
                             "calibration=einfuse.calibrate(model, batches, sparsity=...)")
    for opt, name, on in (("sparsity", "sparsity", config.sparsity is not None and
                           (config.sparsity["target"] > 0 or (cal is not None and cal.collecting))),
                          ("layer_skip", "layer_skip", config.layer_skip > 0)):
        if on and config.passes is not None and name not in config.passes:
            raise ValueError(f"option {opt} is set but passes={config.passes} leaves out the {name!r} pass")


# -- finding gated MLPs ------------------------------------------------------------------------------

@dataclass
class Site:
    root: fx.Node                       # the node whose value the MLP output is (down linear / glu_mlp)
    args: tuple                         # (x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    act: str
    region: list[fx.Node] = field(default_factory=list)
    form: str = "plain"


def _linear_args(f: fx.Node):
    x = f.args[0] if f.args else f.kwargs.get("input")
    w = f.args[1] if len(f.args) > 1 else f.kwargs.get("weight")
    b = f.args[2] if len(f.args) > 2 else f.kwargs.get("bias")
    return x, w, b


def _act_of(n: Any) -> str | None:
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    name = op_name(n)
    if name == "silu":
        return "silu"
    if name == "gelu":
        approx = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    return None


_PROJ = ("linear", "quantized_linear")


def _is_proj(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and op_name(n) in _PROJ


def _gated(h: Any) -> list[tuple[fx.Node, fx.Node, str, list]]:
    """Readings of h as act(g) * u: [(g, u, act, nodes of the product)]."""
    if not isinstance(h, fx.Node) or h.op not in ("call_function", "call_method"):
        return []
    name = op_name(h)
    if name == "glu" and len(h.args) >= 2:  # the swiglu pass's elementwise form
        act = h.kwargs.get("act", h.args[2] if len(h.args) > 2 else "silu")
        return [(h.args[0], h.args[1], act, [h])]
    if name != "mul" or len(h.args) != 2 or h.kwargs or not all(isinstance(a, fx.Node) for a in h.args):
        return []
    out = []
    for a, u in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
        act = _act_of(a)
        if act is not None:
            out.append((a.args[0] if a.args else a.kwargs.get("input"), u, act, [h, a]))
    return out


def _plain_sites(gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
    out = []
    for d in gm.graph.nodes:
        if not _is_proj(d):
            continue
        h = _linear_args(d)[0]
        readings = _gated(h)
        if not readings:
            continue
        found, why = None, ""
        for g, u, act, prod in readings:
            if not _is_proj(g):
                why = f"the activation's input {getattr(g, 'name', g)} is not a linear projection"
                continue
            if not _is_proj(u):
                why = f"the other factor {getattr(u, 'name', u)} of {act}(gate) * up is not a linear projection"
                continue
            if _linear_args(g)[0] is not _linear_args(u)[0]:
                why = "gate and up project different inputs"
                continue
            if g is u:
                why = "gate and up are the same projection"
                continue
            quantized = [n.name for n in (g, u, d) if op_name(n) == "quantized_linear"]
            if quantized:
                why = (f"its projections are quantized ({', '.join(quantized)}: einfuse::quantized_linear); "
                       f"sparse execution gathers rows of floating-point weights")
                continue
            found = (g, u, act, prod)
            break
        if found is None:
            if why:
                ctx.new_region("sparsity", False, [h.name, d.name], d.name, reason=f"gated MLP left dense: {why}")
            continue
        g, u, act, prod = found
        x, wg, bg = _linear_args(g)
        _, wu, bu = _linear_args(u)
        _, wd, bd = _linear_args(d)
        out.append(Site(d, (x, wg, wu, wd, bg, bu, bd), act, [d, *prod, g, u], "plain"))
    return out


def _fused_sites(gm: fx.GraphModule) -> list[Site]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is glu_mlp:
            args = tuple(n.args) + (None,) * (7 - len(n.args))
            names = ("x", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
            args = tuple(n.kwargs.get(k, a) for k, a in zip(names, args))
            out.append(Site(n, args, n.kwargs.get("act", "silu"), [n], "glu_mlp"))
    return out


def _check_site(s: Site) -> str:
    x, wg, wu, wd, bg, bu, bd = s.args
    ts = {k: tensor_meta(v) for k, v in zip(("x", "w_gate", "w_up", "w_down"), (x, wg, wu, wd))}
    missing = [k for k, t in ts.items() if t is None]
    if missing:
        return f"shape of {missing[0]} unknown"
    if any(t.dim() != 2 for k, t in ts.items() if k != "x"):
        return "weights are not 2-D matrices"
    inter, H = ts["w_gate"].shape
    if tuple(ts["w_up"].shape) != (inter, H) or ts["w_down"].shape[1] != inter or ts["x"].shape[-1] != H:
        return (f"projection shapes do not chain: x {tuple(ts['x'].shape)}, gate {tuple(ts['w_gate'].shape)}, "
                f"up {tuple(ts['w_up'].shape)}, down {tuple(ts['w_down'].shape)}")
    dts = {t.dtype for t in ts.values()} | {tensor_meta(b).dtype for b in (bg, bu, bd) if tensor_meta(b) is not None}
    if len(dts) != 1:
        return f"mixed dtypes {sorted(map(str, dts))}"
    if any(b is not None and tensor_meta(b) is None for b in (bg, bu, bd)):
        return "a bias is not a tensor the graph knows"
    return ""


_PREFIXES = ("L_self_", "l_self_", "L_", "l_")


def layer_key(w_down: Any, ordinal: int, graph_index: int) -> str:
    """The name an MLP is known by: its down-projection parameter's module path, else its position."""
    if isinstance(w_down, fx.Node) and w_down.op in ("placeholder", "get_attr"):
        s = str(w_down.target)
        for p in _PREFIXES:
            if s.startswith(p):
                s = s[len(p):]
                break
        s = s.replace("_modules_", ".").replace("_parameters_", ".").replace("_buffers_", ".")
        s = re.sub(r"^(modules|parameters|buffers)_", "", s).rstrip("_")
        return s
    return f"g{graph_index}.mlp{ordinal}"


# -- the pass --------------------------------------------------------------------------------------

def fuse_sparsity(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    spec = getattr(ctx.config, "sparsity", None)
    cal = getattr(ctx.config, "calibration", None)
    observing = cal is not None and cal.collecting
    if spec is None or (spec["target"] <= 0 and not observing):
        return gm  # off: the graph is untouched
    method, target = spec["method"], spec["target"]
    gm = clone(gm)
    sites = _fused_sites(gm) + _plain_sites(gm, ctx)
    n_fused = 0
    for i, s in enumerate(sites):
        key = layer_key(s.args[3], i, ctx.graph_index)
        why = _check_site(s)
        inter = tensor_meta(s.args[1]).shape[0] if not why else 0
        thr = None
        if not why and method == "chess" and not observing:
            thr = cal.thresholds(key, target) if cal is not None else None
            if thr is None:
                why = (f"no calibration statistics for {key!r} (the calibration has {len(cal)} MLPs"
                       f"{': ' + ', '.join(cal.keys()[:3]) + ', ...' if len(cal) else ''})")
            elif thr.shape != (inter,):
                why = f"calibration for {key!r} has {thr.shape[0]} channels, the MLP {inter}"
        if why:
            ctx.new_region("sparsity", False, [n.name for n in s.region], s.root.name,
                           reason=f"gated MLP left dense: {why}")
            continue
        keep = inter - int(round(target * inter))
        wd_t = tensor_meta(s.args[3])
        with gm.graph.inserting_before(s.root):
            if observing:
                new = emit(gm, "call_function", glu_mlp_observe, s.args,
                           {"act": s.act, "collector": cal._collector_id, "key": key})
            else:
                kw = {"act": s.act, "method": method, "k": keep if method != "chess" else 0, "key": key}
                if thr is not None:
                    name = _free_attr(gm, f"_einfuse_chess_thresholds_{n_fused}")
                    gm.register_buffer(name, thr.to(wd_t.device, torch.float32))
                    tn = gm.graph.get_attr(name)
                    mode = fake_mode_of(wd_t)
                    if mode is not None:
                        tn.meta["example_value"] = mode.from_tensor(getattr(gm, name))
                    kw["thresholds"] = tn
                new = emit(gm, "call_function", sparse_glu_mlp, s.args, kw)
        replace_value(gm, [s.root], new)
        erase_dead(gm, s.region)
        n_fused += 1
        ctx.new_region("sparsity", True, [n.name for n in s.region], s.root.name,
                       bindings={"method": "observe" if observing else method, "target": target, "key": key,
                                 "intermediate": inter, "keep": inter if method == "chess" else keep,
                                 "act": s.act, "form": s.form})
    return finish(gm)


def _free_attr(gm: fx.GraphModule, base: str) -> str:
    name, j = base, 0
    while hasattr(gm, name):
        j += 1
        name = f"{base}_{j}"
    return name


# -- runtime state helpers ----------------------------------------------------------------------------

def _down_weights(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 2] if model is not None else []


def sparsity_state(model=None) -> dict[str, torch.Tensor]:
    """CoreInfer's current core channels: {parameter name: [B, k] indices} for `model`'s layers."""
    out = {}
    for name, p in (model.named_parameters() if model is not None else []):
        idx = sparse_mlp.STATE.get(p)
        if idx is not None:
            out[name] = idx.idx
    return out


def reset_sparsity_state(model=None) -> None:
    """Forget CoreInfer's core channels (of `model`, or of every model): the next call is a prefill."""
    sparse_mlp.STATE.reset(None if model is None else _down_weights(model))
