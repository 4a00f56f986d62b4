"""Layer skipping (Unified Layer Skipping): layers found in the captured graph, KV cache, generate()."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import einfuse
from einfuse.models import TinyLlama, TinyLlamaConfig
from einfuse.passes.layer_skip import capture_graphs, find_layers, layers_to_skip
from einfuse.runtime import counters
from hf_models import build

P = ("layer_skip",)


# ------------------------------------------------------------------------------------------ ULS choice

@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 6, 7, 12, 24, 30, 32])
@pytest.mark.parametrize("f", [0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_layers_to_skip_count_and_spread(L, f):
    skip = layers_to_skip(L, f)
    want = min(int(f * L + 0.5), max(L - 2, 0))
    assert len(skip) == want
    assert skip == sorted(set(skip))
    assert all(1 <= j <= L - 2 for j in skip)  # first and last layer kept
    if len(skip) >= 2:
        kept_runs = [b - a - 1 for a, b in zip([0] + skip, skip + [L - 1])]  # kept middle layers between skips
        inner = kept_runs[1:-1]
        assert not inner or max(inner) - min(inner) <= 1  # evenly spread
        assert abs(kept_runs[0] - kept_runs[-1]) <= 1  # centred in the middle


def test_layers_to_skip_examples():
    assert layers_to_skip(30, 0.1) == [5, 15, 24]
    assert layers_to_skip(6, 0.5) == [1, 3, 4]
    assert layers_to_skip(6, 0.34) == [2, 4]


# ------------------------------------------------------------------------------------- finding layers

def _graph(model, *args, **kwargs):
    torch._dynamo.reset()
    return max(capture_graphs(model, *args, **kwargs), key=lambda g: len(g.graph.nodes))


def _gpt2(layers):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=64, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return tf.GPT2LMHeadModel(cfg).eval()


def _bert(layers):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    return tf.BertModel(cfg).eval()


@pytest.mark.parametrize("arch, layers", [("llama", 3), ("gpt2", 4)])
def test_layers_are_found_as_repeated_residual_blocks(arch, layers):
    model = build(arch, num_hidden_layers=layers).eval() if arch == "llama" else _gpt2(layers)
    stack = find_layers(_graph(model, torch.randint(0, 96, (1, 6))))
    assert not isinstance(stack, str), stack
    assert (stack.layers, stack.period) == (layers, 2)  # attention + MLP residual adds per layer


def test_layers_found_in_a_hand_written_model():
    model = TinyLlama(TinyLlamaConfig(vocab_size=96, hidden=32, intermediate=48, layers=5)).eval()
    stack = find_layers(_graph(model, torch.randint(0, 96, (1, 6))))
    assert (stack.layers, stack.period) == (5, 2)


def test_post_norm_stack_is_reported_not_skipped():
    model = _bert(4)
    ids = torch.randint(0, 96, (1, 6))
    torch._dynamo.reset()
    fast = einfuse.optimize(model, passes=P, layer_skip=0.5)
    with torch.no_grad():
        got = fast(input_ids=ids).last_hidden_state
        want = model(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)
    reasons = [r.reason for r in fast.einfuse_report.unfused if r.kind == "layer_skip"]
    assert reasons and all(r.startswith("no layers to skip:") for r in reasons)


# ------------------------------------------------------------------------------------- skipping

@pytest.fixture(scope="module")
def llama6():
    # SDPA attention: its decode graphs give each layer's cache length its own symbol
    return build("llama", attn="sdpa", num_hidden_layers=6).eval()


def _identity_layers(model, skip):
    """A reference copy whose skipped decoder layers return their input, keeping their KV cache valid the
    way the pass does (the layer's K/V projections of its input are still appended to the cache)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    ref = copy.deepcopy(model)

    def skipped(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None, **kw):
        if past_key_values is not None:
            attn = self.self_attn
            h = self.input_layernorm(hidden_states)
            shape = (*h.shape[:-1], -1, attn.head_dim)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            cos, sin = position_embeddings
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            past_key_values.update(k, v, attn.layer_idx)
        return hidden_states

    for j in skip:
        layer = ref.model.layers[j]
        layer.forward = types.MethodType(skipped, layer)
    return ref


def test_skip_zero_is_exactly_the_original_model(llama6):
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    fast = einfuse.optimize(llama6, passes=P, layer_skip=0.0)
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, llama6(ids).logits)
    assert all(not p.changed for p in fast.einfuse_report.passes)
    assert not fast.einfuse_report.regions


def test_the_skipped_layers_are_the_uls_ones_and_the_rest_is_exact(llama6):
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    fast = einfuse.optimize(llama6, passes=P, layer_skip=0.5)
    with torch.no_grad():
        got = fast(ids, use_cache=False).logits
        want = _identity_layers(llama6, [1, 3, 4])(ids, use_cache=False).logits
        dense = llama6(ids, use_cache=False).logits
    regions = [r for r in fast.einfuse_report.regions if r.kind == "layer_skip"]
    assert [r.bindings["layer"] for r in regions] == [1, 3, 4] and all(r.fused for r in regions)
    assert regions[0].bindings["layers"] == 6 and regions[0].bindings["period"] == 2
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)
    # without a cache the whole layer is gone: none of its projections is computed
    erased = " ".join(n for r in regions for n in r.nodes)
    assert erased.count("linear") + erased.count("down_proj") + erased.count("attn_output") >= 3 * 5


def test_generate_with_kv_cache(llama6):
    skip = layers_to_skip(6, 0.34)
    assert skip == [2, 4]
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    fast = einfuse.optimize(llama6, passes=P, layer_skip=0.34)
    ref = _identity_layers(llama6, skip)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got = fast.generate(ids, **kw)
    want = ref.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)  # decoding keeps working, through 3 captured graphs
    for a, b in zip(got.scores, want.scores):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # every layer's cache entries are valid (the skipped layers' K/V were computed from their input)
    c_fast, c_ref = got.past_key_values, want.past_key_values
    assert c_fast.layers[2].keys.shape[-2] == 7 + 3 - 1
    for j in range(6):
        assert torch.allclose(c_fast.layers[j].keys, c_ref.layers[j].keys, atol=1e-6), j
        assert torch.allclose(c_fast.layers[j].values, c_ref.layers[j].values, atol=1e-6), j
    # the layers are found and skipped in every graph: prefill, first decode, dynamic-length decode
    assert fast.einfuse_report.graphs == 3 and fast.einfuse_report.fusions["layer_skip"] == 2 * 3


def test_layers_for_speedup_bytes_model(llama6):
    torch._dynamo.reset()
    params = dict(llama6.named_parameters())
    total = sum(p.numel() for n, p in params.items() if p.dim() == 2 and "embed_tokens" not in n)
    per_layer = sum(p.numel() for n, p in params.items() if n.startswith("model.layers.2.") and p.dim() == 2
                    and "k_proj" not in n and "v_proj" not in n)  # K/V still computed for the cache
    for target in (1.0, 1.1, 1.3, 1.6):
        f = einfuse.layers_for_speedup(llama6, target)
        n = round(f * 6)
        assert len(layers_to_skip(6, f)) == n
        assert total / (total - n * per_layer) >= target - 1e-9
        assert n == 0 or total / (total - (n - 1) * per_layer) < target  # the fewest layers that do it
    with pytest.raises(ValueError, match="at most 4"):
        einfuse.layers_for_speedup(llama6, 10.0)


def test_composes_with_the_fusions_and_sparsity():
    """The full pipeline: the fusions, then layer skipping, then sparsity on the fused glu_mlp calls."""
    model = build("llama", num_hidden_layers=4).eval()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    fast = einfuse.optimize(model, layer_skip=0.25, sparsity={"method": "moc", "target": 0.5})
    with counters.counting() as calls:
        out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                            do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
    rep = fast.einfuse_report
    assert {r.bindings["layer"] for r in rep.regions if r.kind == "layer_skip" and r.fused} == {2}
    assert {r.bindings["form"] for r in rep.regions if r.kind == "sparsity" and r.fused} == {"glu_mlp"}
    # per forward: 3 kept layers' MLPs sparse, 2 norms each for 3 kept layers + the skipped layer's
    # input norm (its K/V still feed the cache) + the final norm
    assert calls["sparsity"] == 2 * 3 and calls["rmsnorm"] == 2 * (2 * 3 + 1 + 1)
    assert calls["attention"] == 2 * 3 and "swiglu" not in calls
    keys = {r.bindings["key"] for r in rep.regions if r.kind == "sparsity"}
    assert keys == {f"model.layers.{j}.mlp.down_proj.weight" for j in (0, 1, 3)}  # the skipped MLP is gone


def test_two_layers_leave_nothing_to_skip_and_say_why():
    model = build("llama").eval()
    torch._dynamo.reset()
    rep = einfuse.inspect(model, torch.randint(0, 96, (1, 6)), config=einfuse.OptimizeConfig(passes=P, layer_skip=0.3))
    assert [r.reason for r in rep.unfused] == ["2 layers: round(0.3 * 2) = 0 layers, or none between the first and last"]


def test_composes_with_quantization():
    """int8 weights: layers still found and skipped; quantized MLPs stay dense with the reason."""
    model = copy.deepcopy(build("llama", num_hidden_layers=4).eval())  # quantize= changes it in place
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    fast = einfuse.optimize(model, passes=("layer_skip", "sparsity"), quantize="int8", layer_skip=0.25,
                            sparsity={"method": "moc", "target": 0.5})
    with counters.counting() as calls:
        out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                            do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    rep = fast.einfuse_report
    assert {r.bindings["layer"] for r in rep.regions if r.kind == "layer_skip" and r.fused} == {2}
    # per forward: 3 kept layers x 7 projections + the skipped layer's K and V (its cache stays valid)
    assert calls["quantized_linear"] == 2 * (3 * 7 + 2) and "sparsity" not in calls
    reasons = [r.reason for r in rep.unfused if r.kind == "sparsity"]
    assert reasons and all("projections are quantized" in r for r in reasons)
