"""Quantization: the pass that changes a module's parameters.

`einfuse.optimize(model, quantize="int8" | "int4" | "int6" | "llm_int8" | "w8a8")`
(or `einfuse.quant.quantize(model, ...)`) replaces the model's linear layers with
`QuantizedLinear` modules whose forward calls `einfuse::quantized_linear`, frees
their fp weights, and records what it did in the Report.

Why a module swap and not an FX rewrite of `linear(x, W)` nodes. Every fusion pass
rewrites a captured graph and leaves the parameters alone; quantization must
change the parameters themselves (free W, keep codes and scales), and:
  * the parameters are shared by every graph Dynamo captures of the model
    (`generate()` makes three: prefill, first decode, dynamic decode) and by eager
    code outside them; a graph pass sees one graph at a time, after capture;
  * a swapped module keeps working everywhere: eagerly, under torch.compile with any
    backend, with `state_dict`/`load_state_dict`, `generate()`, and safetensors
    save/load — a graph rewrite over buffers the module does not have could not;
  * Dynamo turns `QuantizedLinear.forward` into exactly the node a rewrite would
    insert: one `quantized_linear(x, codes, scales, ...)` call (the wrapper is
    `allow_in_graph`), which `ir/lower.py` lowers to a LINEAR with an opaque weight,
    so the passes that look for projections still see one.
Dynamo captures an `nn.Linear` as `linear(x, <module>.weight)`, so the linears the
graph multiplies are the model's nn.Linear modules (and Hugging Face's GPT-2
`Conv1D`, a linear with a transposed weight); they are found by walking the
modules, which needs no example input. A linear the forward never calls is
quantized too, harmlessly.

Pipeline order: quantization runs first, on the module, before capture; the
fusion passes then run on graphs whose projections are `quantized_linear` calls.
Composition: attention, RoPE and RMSNorm do not involve the projections' weights
and fuse as before. SwiGLU recognises the quantized gate/up projections and fuses
the elementwise `act(gate) * up` (`einfuse::glu`); the whole-MLP `glu_mlp` form
needs fp weights, so it is not used. The logit-free loss needs an fp lm_head (off
by default). Activation sparsity needs fp MLP weights and rejects quantized MLPs
with the reason; layer skipping composes.

Filter (in this order): the lm_head (the output embedding) and embedding tables
are left in fp unless `quant_lm_head` / `quant_embeddings`; `quant_include` /
`quant_exclude` name patterns; `quant_min_size`. Each layer left in fp is a
rejected "quantize" region with its reason (`report.unfused`).

Tied lm_head: quantizing the lm_head alone gives it its own quantized copy and
leaves the embedding's fp table in place (untied; `config.tie_word_embeddings` is
set to False when the model has one), so generation is unchanged but the fp table
still counts in the model's bytes. Quantizing both shares one quantized table
(still tied, counted once). Quantizing the embedding alone unties it the other way.

The model is changed IN PLACE (`optimize` returns a module sharing the original's
submodules, so the original is quantized too): that is what frees the fp weights.
Deep-copy the model first to keep an fp copy. Quantizing a model that already has
quantized layers is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from einfuse.quant.modules import QuantizedEmbedding, QuantizedLinear, _Quantized
from einfuse.quant.spec import QuantSpec
from einfuse.report import Region, Report

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class QuantSummary:
    """What quantization did: per layer, and the model's bytes before and after."""
    spec: QuantSpec
    quantized: dict[str, dict] = field(default_factory=dict)   # name -> layout (+ group note)
    skipped: dict[str, str] = field(default_factory=dict)      # name -> reason kept in fp
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameter and buffer storages."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def _is_conv1d(m: nn.Module) -> bool:  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W [in, out]
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


def _linear_weight(m: nn.Module) -> torch.Tensor:
    return m.weight.t() if _is_conv1d(m) else m.weight


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            return out
    for name in ("lm_head", "output", "embed_out"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Linear):
            return m
    return None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, spec: QuantSpec, report: Report | None = None,
                   calibration: Iterable[Any] | None = None, progress: bool = True) -> QuantSummary:
    """Quantize `model` in place according to `spec`; record regions and notes in `report`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantization needs an nn.Module, got {type(model).__name__}")
    done = [n for n, m in model.named_modules() if isinstance(m, _Quantized)]
    if done:
        first = model.get_submodule(done[0])
        raise ValueError(f"the model is already quantized ({len(done)} quantized layers, e.g. {done[0]!r} with "
                         f"scheme {first.scheme!r}); quantize a fresh fp model instead")
    summary = QuantSummary(spec, bytes_before=model_bytes(model))
    head = _output_embedding(model)
    head_id = id(head) if head is not None else None

    # every nn.Linear / Conv1D / nn.Embedding once, under its first name
    seen: set[int] = set()
    linears: list[tuple[str, nn.Module]] = []
    embeddings: list[tuple[str, nn.Embedding]] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen or not name:
            continue
        if isinstance(m, nn.Linear) or _is_conv1d(m):
            seen.add(id(m))
            linears.append((name, m))
        elif type(m) is nn.Embedding:
            seen.add(id(m))
            embeddings.append((name, m))
    names_of: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen and name:
            names_of.setdefault(id(m), []).append(name)

    def decide(name: str, m: nn.Module, weight: torch.Tensor, is_head: bool, is_emb: bool) -> tuple[int, str, str]:
        """(group size, note, reason kept in fp ('' = quantize))."""
        if is_head and not spec.lm_head:
            return 0, "", "lm_head: kept in fp by default (quant_lm_head=True quantizes it)"
        if is_emb and not spec.embeddings:
            return 0, "", "embedding table: kept in fp by default (quant_embeddings=True quantizes it)"
        why = spec.selects(name)
        if why:
            return 0, "", why
        if weight.numel() < spec.min_size:
            return 0, "", f"weight has {weight.numel()} elements, fewer than min_size {spec.min_size}"
        if weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"cannot quantize {name!r}: unsupported weight dtype {weight.dtype} "
                            f"(supported: {', '.join(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES)})")
        if weight.is_meta:
            raise ValueError(f"cannot quantize {name!r}: its weight is on the meta device (load the weights first, "
                             f"or use einfuse.quant.load_quantized for a saved quantized model)")
        gs, note = spec.group_for(weight.shape[1], name)
        if gs < 0:
            return 0, "", note
        return gs, note, ""

    plan: list[tuple[str, nn.Module, int, str]] = []
    for name, m in linears:
        gs, note, why = decide(name, m, _linear_weight(m), id(m) == head_id, False)
        if why:
            summary.skipped[name] = why
        else:
            plan.append((name, m, gs, note))
    emb_plan: list[tuple[str, nn.Embedding, int, str]] = []
    for name, m in embeddings:
        if m.max_norm is not None:
            why, gs, note = "embedding with max_norm (renormalises its table in place)", 0, ""
        else:
            gs, note, why = decide(name, m, m.weight, False, True)
        if why:
            summary.skipped[name] = why
        else:
            emb_plan.append((name, m, gs, note))

    outliers: dict[int, torch.Tensor] = {}
    hessians: dict[int, tuple[torch.Tensor, int]] = {}
    if calibration is not None and spec.scheme != "llm_int8":  # GPTQ rounding for the other schemes
        from einfuse.quant.gptq import collect_hessians
        found_h = collect_hessians(model, [m for _, m, _, _ in plan], calibration, progress)
        hessians = {id(m): v for m, v in found_h.items()}
        rows = max((c for _, c in hessians.values()), default=0)
        summary.notes.append(f"GPTQ rounding: Hessians of {len(hessians)} layers from {rows} calibration rows")
    elif calibration is not None:
        from einfuse.quant.calibrate import calibrate_outliers
        found = calibrate_outliers(model, [m for _, m, _, _ in plan], calibration, spec.threshold, progress)
        outliers = {id(m): cols for m, cols in found.items()}
        n_cols = sum(int(c.numel()) for c in outliers.values())
        summary.notes.append(f"calibration: {n_cols} outlier input columns (|x| > {spec.threshold:g}) in "
                             f"{sum(1 for c in outliers.values() if c.numel())} of {len(plan)} layers")

    new_of: dict[int, nn.Module] = {}
    with torch.no_grad():
        if hessians:
            from einfuse.quant.gptq import gptq_quantize
        for name, m, gs, note in plan:
            state = None
            if id(m) in hessians:
                state = gptq_quantize(_linear_weight(m), hessians.pop(id(m))[0], spec.scheme, gs, spec.symmetric)
            q = QuantizedLinear.from_float(_linear_weight(m), m.bias, spec.scheme, gs, spec.symmetric, spec.threshold,
                                           outliers.get(id(m)), state)
            new_of[id(m)] = q
            summary.quantized[name] = {**q.layout(), **({"note": note} if note else {})}
            if note:
                summary.notes.append(f"{name}: {note}")
        for name, m, gs, note in emb_plan:
            tied_head = next((h for (hn, h, _, _) in plan if id(h) == head_id and h.weight is m.weight), None)
            q_head = new_of.get(id(tied_head)) if tied_head is not None else None
            if (q_head is not None and q_head.group_size == (gs if spec.grouped else 0)
                    and q_head.scheme == spec.scheme):
                q = QuantizedEmbedding(m.num_embeddings, m.embedding_dim, spec.scheme, gs, spec.symmetric,
                                       m.padding_idx, m.weight.dtype)
                q.qweight, q.scales, q.offsets = q_head.qweight, q_head.scales, q_head.offsets  # one shared table
                summary.notes.append(f"{name} and the tied lm_head share one quantized table")
            else:
                q = QuantizedEmbedding.from_float(m, spec.scheme, gs, spec.symmetric)
            new_of[id(m)] = q
            summary.quantized[name] = {**q.layout(), **({"note": note} if note else {})}
        # ties broken by quantizing one side only
        if head is not None:
            tied_emb = [e for _, e in embeddings if getattr(head, "weight", None) is e.weight]
            for e in tied_emb:
                if (id(head) in new_of) != (id(e) in new_of):
                    which = "lm_head" if id(head) in new_of else "embedding"
                    summary.notes.append(f"the tied lm_head and embedding are untied: only the {which} is quantized "
                                         f"(the other keeps the fp table)")
                    cfg = getattr(model, "config", None)
                    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                        cfg.tie_word_embeddings = False
        for old_id, q in new_of.items():
            for name in names_of.get(old_id, []):
                _set_module(model, name, q)
    summary.bytes_after = model_bytes(model)
    summary.notes.insert(0, f"quantize {spec.scheme}: {len(summary.quantized)} layers quantized, "
                            f"{len(summary.skipped)} kept in fp; parameter bytes {summary.bytes_before:,} -> "
                            f"{summary.bytes_after:,} ({summary.ratio:.2f}x)")
    if report is not None:
        record(report, summary)
    model.__dict__["einfuse_quantization"] = summary  # a plain attribute: invisible to state_dict
    return summary


def record(report: Report, summary: QuantSummary) -> None:
    """One "quantize" region per layer (kept-in-fp ones rejected with the reason), plus the notes."""
    i = sum(1 for r in report.regions if r.kind == "quantize")
    for name, lay in summary.quantized.items():
        report.regions.append(Region(f"module/quantize/{i}", "quantize", True, [name], anchor=name,
                                     bindings={k: v for k, v in lay.items() if k in ("scheme", "group_size",
                                                                                       "symmetric", "kind", "note")}))
        i += 1
    for name, why in summary.skipped.items():
        report.regions.append(Region(f"module/quantize/{i}", "quantize", False, [name], reason=why, anchor=name))
        i += 1
    report.notes.extend(summary.notes)


def apply(model: nn.Module, config: Any, report: Report | None) -> QuantSummary | None:
    """The `einfuse.optimize` hook: quantize when `config.quantize` is set."""
    spec = QuantSpec.from_config(config)
    if spec is None:
        return None
    return quantize_model(model, spec, report)
