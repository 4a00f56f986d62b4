"""Layer skipping: ``optimize(model, layer_skip=FRACTION)``, Unified Layer Skipping (ULS).

Layers are found in the captured graph, not from a model class: a *residual add* is an add
``s' = s + f(s)`` of two same-shape, same-dtype floating tensors where one operand ``s`` (through
casts/copies) is an ancestor of the other; chaining each residual add to the add that consumes its
output as the skip operand gives the residual stream ``s_0 -> s_1 -> ... -> s_n``. Each add's branch
(the nodes between ``s_{k-1}`` and ``s_k`` that depend on ``s_{k-1}`` and feed the added value) gets a
signature: the multiset of its heavy ops (matmuls, linears, softmax, attention, embedding lookups and
every fused or custom op) and of the shapes of the graph inputs (parameters, caches) it reads. The stream is
cut into layers at the smallest period ``p`` with which the signatures repeat (``p = 2`` for
pre-norm transformers: attention + MLP), keeping the longest periodic run if a prefix/suffix differs.

ULS keeps the first and the last layer and spreads the ``round(fraction * L)`` skipped layers evenly
over the middle: layer ``1 + floor((i + 1/2) * (L - 2) / n)`` for ``i < n`` (``layers_to_skip``).

A skipped layer's output stream value is replaced by its input (``s_out -> s_in``), and the nodes of
its branches that nothing uses any more are erased. KV cache: nodes of the layer whose values are
graph outputs stay — with Hugging Face caches (``DynamicCache``: the new keys/values are concatenated
to the cache and returned as graph outputs) the skipped layer's K and V projections (and RoPE) are still
computed from the layer's input, so its cache entries stay valid and are of the right length for every
later decode graph (which skips the same layer); its queries, attention, output projection and MLP are
dropped. In-place ops (e.g. a static cache's ``index_copy_``) are never erased. Without a cache (a loss
or a ``use_cache=False`` forward) the whole layer disappears.

``layers_for_speedup(model, target)`` turns a target decode speedup into a fraction with a bytes model:
at batch-1 decoding each step reads every weight once, so the speedup of skipping n layers is
``W / (W - n * w)`` with W the bytes of the weights the graph multiplies (embedding tables count only
where they are also multiplied, e.g. a tied lm_head) and w the bytes a skipped layer no longer reads.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from einfuse.ir.lower import op_name
from .base import PassContext, clone, erase_dead, finish, tensor_meta

_PASSTHROUGH = {"to", "identity", "to_float", "to_half", "to_bfloat16"}
_HEAVY = {"linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "einsum", "softmax", "log_softmax",
          "scaled_dot_product_attention", "embedding", "conv1d", "conv2d", "layer_norm", "group_norm"}


@dataclass
class LayerStack:
    stream: list[fx.Node]          # s_0 .. s_n (s_0: the stack's input; s_k: the k-th residual add)
    branch: list[set]              # branch[k]: FX nodes of add k+1's branch (depend on s_k, before s_{k+1})
    period: int                    # residual adds per layer
    offset: int                    # index in `stream` where the first layer starts

    @property
    def layers(self) -> int:
        return (len(self.stream) - 1 - self.offset) // self.period if self.period else 0

    def layer_input(self, j: int) -> fx.Node:
        return self.stream[self.offset + j * self.period]

    def layer_output(self, j: int) -> fx.Node:
        return self.stream[self.offset + (j + 1) * self.period]

    def layer_nodes(self, j: int) -> set:
        out = set()
        for k in range(self.offset + j * self.period, self.offset + (j + 1) * self.period):
            out |= self.branch[k]
            out.add(self.stream[k + 1])
        return out


def layers_to_skip(layers: int, fraction: float) -> list[int]:
    """ULS: the indices of the round(fraction * layers) layers to skip, spread evenly over the middle."""
    if layers <= 2 or fraction <= 0:
        return []
    n = min(int(math.floor(fraction * layers + 0.5)), layers - 2)
    middle = layers - 2
    return [1 + int(math.floor((i + 0.5) * middle / n)) for i in range(n)]


# -- finding the layers ---------------------------------------------------------------------------------

def _underlying(n: fx.Node) -> fx.Node:
    while (isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and op_name(n) in _PASSTHROUGH
           and n.args and isinstance(n.args[0], fx.Node)):
        a, b = tensor_meta(n), tensor_meta(n.args[0])
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            break
        n = n.args[0]
    return n


def _depends(o: fx.Node, r: fx.Node, order: dict) -> bool:
    """Whether o is computed from r (backward search, never below r in graph order)."""
    lo = order[r]
    stack, seen = [o], set()
    while stack:
        n = stack.pop()
        if n is r:
            return True
        if n in seen or order.get(n, -1) <= lo:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _residual_adds(gm: fx.GraphModule, order: dict) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(add, skip operand's underlying stream node, branch operand) for every residual add."""
    out = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or op_name(n) != "add" or n.kwargs or len(n.args) != 2:
            continue
        a, b = n.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        ta, tb, tn = tensor_meta(a), tensor_meta(b), tensor_meta(n)
        if ta is None or tb is None or tn is None or not tn.is_floating_point():
            continue
        if not (ta.shape == tb.shape == tn.shape and ta.dtype == tb.dtype == tn.dtype):
            continue
        for r, o in ((a, b), (b, a)):
            u = _underlying(r)
            if _depends(o, u, order):
                out.append((n, u, o))
                break
    return out


def _descendants(s: fx.Node, stop: int, order: dict) -> set:
    out, stack = set(), [s]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in out and order[u] < stop:
                out.add(u)
                stack.append(u)
    return out


def _ancestors_within(o: fx.Node, inside: set) -> set:
    out, stack = set(), [o]
    while stack:
        n = stack.pop()
        if n in out or n not in inside:
            continue
        out.add(n)
        stack.extend(n.all_input_nodes)
    return out


def _heavy_name(n: fx.Node) -> str | None:
    if n.op not in ("call_function", "call_method"):
        return None
    name = op_name(n)
    if name in _HEAVY:
        return name
    t = n.target
    mod = getattr(t, "__module__", "") or ""
    if mod.startswith("einfuse") or isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) \
            or type(t).__name__ == "CustomOpDef":
        return str(getattr(t, "__name__", t))
    return None


def _shape_key(n: fx.Node):
    """A graph input's shape, symbolic sizes as "sym" (each layer's cache length gets its own symbol)."""
    t = tensor_meta(n)
    if t is None:
        return type(n.meta.get("example_value")).__name__
    return tuple(str(d) if isinstance(d, int) else "sym" for d in t.shape)


def _signature(branch: set, order: dict):
    nodes = sorted(branch, key=order.__getitem__)
    heavy = tuple(h for h in map(_heavy_name, nodes) if h)
    inputs = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a.op in ("placeholder", "get_attr") and a not in inputs:
                inputs.append(a)
    # multisets: passes may place a fused op at a different spot in each layer's node order
    return tuple(sorted(heavy)), tuple(sorted(map(str, map(_shape_key, inputs))))


def find_layers(gm: fx.GraphModule) -> LayerStack | str:
    """The repeated residual blocks of a captured graph, or the reason there are none."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    adds = _residual_adds(gm, order)
    if not adds:
        return "no residual adds (s + f(s)) in the graph"
    nxt: dict[fx.Node, tuple] = {}
    for add, u, o in adds:
        if u not in nxt or order[add] < order[nxt[u][0]]:
            nxt[u] = (add, o)
    linked = {a for a, _ in nxt.values()}
    best: list = []
    for start in nxt:
        if start in linked:
            continue  # not the head of a chain
        chain, cur = [start], start
        while cur in nxt:
            cur = nxt[cur][0]
            chain.append(cur)
        if len(chain) > len(best):
            best = chain
    n = len(best) - 1
    if n < 2:
        return f"the longest residual chain has {n} add(s): no repeated blocks"
    branches, sigs = [], []
    for k in range(n):
        s, add = best[k], best[k + 1]
        inside = _descendants(s, order[add], order)
        o = nxt[s][1]
        br = _ancestors_within(o, inside)
        branches.append(inside)
        sigs.append(_signature(br, order))
    # the longest periodic run (most adds covered, then the shortest period)
    choice = None
    for p in range(1, n // 2 + 1):
        for off in range(0, n - 2 * p + 1):
            m = 0
            while off + m < n and sigs[off + m] == sigs[off + m % p]:
                m += 1
            reps = m // p
            if reps >= 2 and (choice is None or reps * p > choice[0] * choice[1]
                              or (reps * p == choice[0] * choice[1] and p < choice[1])):
                choice = (reps, p, off)
    if choice is None:
        return f"the residual chain of {n} adds does not repeat"
    reps, p, off = choice
    stream = best[: off + reps * p + 1]
    return LayerStack(stream, branches[: off + reps * p], p, off)


# -- the pass ------------------------------------------------------------------------------------------

def _pure(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False
    t = n.target
    if t in (operator.setitem,) or (isinstance(t, str) and t.endswith("_") and not t.endswith("__")):
        return False
    name = getattr(t, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return False
    schema = getattr(t, "_schema", None)
    if schema is not None and getattr(schema, "is_mutable", False):
        return False
    return not n.is_impure() if hasattr(n, "is_impure") else True


def skip_layers(gm: fx.GraphModule, stack: LayerStack, skip: list[int]) -> dict[int, list[str]]:
    """Bypass the given layers in place; returns {layer: names of the erased nodes}."""
    repl: dict[fx.Node, fx.Node] = {}
    candidates: dict[int, list[fx.Node]] = {}
    names = {}
    for j in sorted(skip):
        s_in = stack.layer_input(j)
        s_in = repl.get(s_in, s_in)
        s_out = stack.layer_output(j)
        s_out.replace_all_uses_with(s_in)
        repl[s_out] = s_in
        candidates[j] = [c for c in stack.layer_nodes(j) if _pure(c)]
        names[j] = {c: c.name for c in candidates[j]}
    alive_before = set(gm.graph.nodes)
    erase_dead(gm, [c for j in sorted(skip) for c in candidates[j]])
    alive = set(gm.graph.nodes)
    return {j: sorted(names[j][c] for c in candidates[j] if c in alive_before and c not in alive) for j in skip}


def fuse_layer_skip(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    fraction = float(getattr(ctx.config, "layer_skip", 0.0) or 0.0)
    if fraction <= 0:
        return gm  # off: the graph is untouched
    gm = clone(gm)
    stack = find_layers(gm)
    if isinstance(stack, str):
        ctx.new_region("layer_skip", False, [], "?", reason=f"no layers to skip: {stack}")
        return gm
    L = stack.layers
    skip = layers_to_skip(L, fraction)
    if not skip:
        ctx.new_region("layer_skip", False, [], stack.layer_output(0).name,
                       reason=f"{L} layers: round({fraction} * {L}) = 0 layers, or none between the first and last")
        return gm
    erased = skip_layers(gm, stack, skip)
    for j in skip:
        ctx.new_region("layer_skip", True, erased[j], stack.layer_output(j).name,
                       bindings={"layer": j, "layers": L, "skipped": list(skip), "period": stack.period,
                                 "fraction": fraction})
    return finish(gm)


# -- target speedup -> fraction ------------------------------------------------------------------------

def capture_graphs(model: Any, *args: Any, **kwargs: Any) -> list[fx.GraphModule]:
    """The FX graphs Dynamo captures for model(*args, **kwargs) (no passes run)."""
    graphs: list[fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    orig = getattr(type(model), "_einfuse_orig_class", None)
    target = functools.partial(orig.forward, model) if orig is not None else model
    compiled = torch.compile(target, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return graphs


def _weight_bytes(gm: fx.GraphModule, alive: set | None = None) -> dict[fx.Node, int]:
    """Bytes of each graph input a matrix op reads whole (weights): {placeholder: bytes}."""
    out = {}
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "get_attr"):
            continue
        t = tensor_meta(n)
        if t is None or t.dim() < 2:
            continue
        users = [u for u in n.users if alive is None or u in alive]
        if any(u.op in ("call_function", "call_method") and op_name(u) != "embedding" for u in users):
            out[n] = t.numel() * t.element_size()
    return out


_costs_cache = None


def skip_costs(model: Any, *example_args: Any, **example_kwargs: Any) -> tuple[int, int, int]:
    """(layers, bytes of weights multiplied per forward, bytes a skipped layer no longer reads).

    Captured from one forward (see ``layers_for_speedup``); remembered per model for the default inputs.
    """
    global _costs_cache
    from torch.utils.weak import WeakIdKeyDictionary
    if _costs_cache is None:
        _costs_cache = WeakIdKeyDictionary()
    default = not example_args and not example_kwargs
    if default and model in _costs_cache:
        return _costs_cache[model]
    if default:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise TypeError("layers_for_speedup: pass example inputs for a model without config.vocab_size")
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        example_kwargs = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=dev)}
    best = None
    for gm in capture_graphs(model, *example_args, **example_kwargs):
        stack = find_layers(gm)
        if not isinstance(stack, str) and (best is None or stack.layers > best[1].layers):
            best = (gm, stack)
    if best is None:
        raise ValueError("layers_for_speedup: no repeated residual blocks found in the captured graph")
    gm, stack = best
    L = stack.layers
    total = sum(_weight_bytes(gm).values())
    saved = 0
    if L > 2:
        work = clone(gm)
        skip_layers(work, find_layers(work), [L // 2])
        saved = total - sum(_weight_bytes(work, set(work.graph.nodes)).values())
    out = (L, total, saved)
    if default:
        _costs_cache[model] = out
    return out


def layers_for_speedup(model: Any, target: float, *example_args: Any, **example_kwargs: Any) -> float:
    """The layer_skip fraction expected to give `target` x decode speedup (bytes model; see module doc).

    The graph is captured from one forward: give example inputs, or leave them out for a model with a
    `config.vocab_size` (8 token ids are used). Returns the fraction of the fewest layers whose skipping
    reaches the target; raises ValueError if skipping every middle layer is not enough.
    """
    if not target >= 1.0:
        raise ValueError(f"target speedup must be >= 1, got {target}")
    L, total, saved = skip_costs(model, *example_args, **example_kwargs)
    if target == 1.0 or L <= 2:
        return 0.0
    if saved <= 0:
        raise ValueError("layers_for_speedup: skipping a layer saves no weight bytes")
    need = math.ceil(total * (1.0 - 1.0 / target) / saved - 1e-9)
    if need > L - 2:
        best_speed = total / (total - (L - 2) * saved)
        raise ValueError(f"a {target}x speedup needs {need} of {L} layers skipped; at most {L - 2} (first and "
                         f"last kept) give {best_speed:.2f}x")
    return need / L
