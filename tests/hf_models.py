"""Tiny random-weight Hugging Face models built from configs (no downloads)."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def build(arch: str, attn: str = "eager", dtype=torch.float32, **overrides):
    import transformers as tf
    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(**{**TINY, **overrides})
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**TINY, "sliding_window": 4, **overrides})
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**TINY, **overrides})
        cls = tf.Qwen2ForCausalLM
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**{**TINY, "head_dim": 8, "hidden_activation": "gelu_pytorch_tanh", **overrides})
        cls = tf.GemmaForCausalLM
    elif arch == "phi3":
        cfg = tf.Phi3Config(**{**TINY, "partial_rotary_factor": 0.5, "pad_token_id": 0, **overrides})
        cls = tf.Phi3ForCausalLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **overrides)
        cls = tf.GPT2LMHeadModel
    elif arch == "bert":
        cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, **overrides)
        cls = tf.BertModel
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn
    model = cls(cfg).to(dtype)
    return model


def inputs(arch: str, batch: int = 2, seq: int = 7, labels: bool = True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (batch, seq), generator=g)
    kw = {"input_ids": ids}
    if labels and arch != "bert":
        kw["labels"] = ids
    return kw


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    den = ref.norm()
    return float((out - ref).norm() / den) if den > 0 else float((out - ref).norm())
