"""Save and load quantized models with safetensors (tensors and JSON metadata, no pickle).

The file holds the model's whole `state_dict` (codes, scales, offsets, outlier
columns, the fp parameters of what was not quantized) and, in the safetensors
metadata, a JSON description of every quantized layer (`layout()`: scheme, group
size, shapes, bias) and of tensors stored once under another name (tied or shared
tables). `load_quantized(model, path)` takes a fresh fp model of the same
architecture (its weights are discarded where quantized layers go, so a randomly
initialised one is fine), puts empty quantized layers where the file says, and
loads the state dict strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from einfuse.quant.modules import _Quantized, from_layout

FORMAT = "einfuse.quant/1"


def _safetensors():
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError as e:  # an optional dependency (the `hf` extra)
        raise ImportError("saving and loading quantized models needs the safetensors package "
                          "(pip install safetensors, or einfuse[hf])") from e
    return st, safe_open


def _layouts(model: nn.Module) -> dict[str, dict]:
    out: dict[str, dict] = {}
    first: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, _Quantized):
            if id(m) in first:
                out[name] = {"same_as": first[id(m)]}
            else:
                first[id(m)] = name
                out[name] = m.layout()
    return out


def save_quantized(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `model` (quantized) to a .safetensors file; returns the path."""
    st, _ = _safetensors()
    layouts = _layouts(model)
    if not layouts:
        raise ValueError("the model has no quantized layers; quantize it first (einfuse.quant.quantize)")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in by_view:
            aliases[name] = by_view[key]
            continue
        by_view[key] = name
        tensors[name] = t
    # any other memory overlap (a slice of another tensor) is stored as its own copy
    ptrs: dict[int, int] = {}
    for name, t in list(tensors.items()):
        p = t.untyped_storage().data_ptr()
        if t.numel() and p in ptrs:
            tensors[name] = t.contiguous().clone()
        else:
            ptrs[p] = 1
            tensors[name] = t.contiguous()
    meta = {"format": FORMAT, "layers": json.dumps(layouts), "aliases": json.dumps(aliases)}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
        meta["tie_word_embeddings"] = json.dumps(bool(cfg.tie_word_embeddings))
    meta.update(metadata or {})
    path = Path(path)
    st.save_file(tensors, str(path), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    _, safe_open = _safetensors()
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_quantized(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Make the fp `model` the quantized model saved at `path` (in place); returns it."""
    _, safe_open = _safetensors()
    if any(isinstance(m, _Quantized) for m in model.modules()):
        raise ValueError("load_quantized needs a fresh fp model of the saved architecture; this one is already "
                         "quantized")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an einfuse quantized model (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    layouts = json.loads(meta["layers"])
    aliases = json.loads(meta.get("aliases", "{}"))
    made: dict[str, nn.Module] = {}
    for name, lay in layouts.items():
        if "same_as" not in lay:
            made[name] = from_layout(lay)
    for name, lay in layouts.items():
        new = made[lay.get("same_as", name)]
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if not hasattr(owner, child):
            raise ValueError(f"{path} has a quantized layer {name!r} that this model does not have")
        setattr(owner, child, new)
    if "tie_word_embeddings" in meta and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = json.loads(meta["tie_word_embeddings"])
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    # buffers whose length is data, not layout (LLM.int8()'s calibrated outlier columns): take the file's shape
    for name, m in made.items():
        for b, t in list(m._buffers.items()):
            v = state.get(f"{name}.{b}")
            if t is not None and v is not None and t.shape != v.shape and b == "outliers":
                m._buffers[b] = torch.empty_like(v)
    model.load_state_dict(state, strict=strict)
    # re-share what was stored once (a tied table): same tensor object, not two copies
    for alias, canonical in aliases.items():
        a_mod, _, a_attr = alias.rpartition(".")
        c_mod, _, c_attr = canonical.rpartition(".")
        am, cm = model.get_submodule(a_mod), model.get_submodule(c_mod)
        if a_attr in am._buffers and c_attr in cm._buffers:
            am._buffers[a_attr] = cm._buffers[c_attr]
        elif a_attr in am._parameters and c_attr in cm._parameters:
            am._parameters[a_attr] = cm._parameters[c_attr]
    return model
