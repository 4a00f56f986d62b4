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


# -- the fp64-referenced comparison shared by the pass tests ---------------------------------------

import copy  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return [out.loss] if getattr(out, "loss", None) is not None else []


def _run(model, args, kw):
    """Outputs and every gradient (params and float inputs) of a fixed weighted sum of the outputs."""
    model.zero_grad(set_to_none=True)
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
            for a in args]
    outs = _outputs(model(*args, **kw))
    g = torch.Generator().manual_seed(7)
    total = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    total.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    grads.update({f"arg{i}": a.grad.detach().clone() for i, a in enumerate(args)
                  if isinstance(a, torch.Tensor) and a.grad is not None})
    return [o.detach() for o in outs], grads


def _ref_args(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def check_against_fp64(model, args=(), kw=None, dtype=torch.float32, optimized=None):
    """Run eager, optimized and an fp64 reference; assert the numerics rule; return the optimized run."""
    kw = kw or {}
    ref = _run(copy.deepcopy(model).double(), _ref_args(args), kw)
    eager = _run(model, args, kw)
    fast = optimized if optimized is not None else __import__('einfuse').optimize(model)
    got = _run(fast, args, kw)
    tol = TOL[dtype]
    assert len(got[0]) == len(ref[0])
    for i, (o, e, r) in enumerate(zip(got[0], eager[0], ref[0])):
        assert o.shape == r.shape and o.dtype == e.dtype
        assert rel_err(o, r) <= rel_err(e, r) + tol, f"output {i}: {rel_err(o, r):.3e} vs {rel_err(e, r):.3e}"
    assert set(got[1]) == set(ref[1]) and got[1]
    for n in ref[1]:
        assert rel_err(got[1][n], ref[1][n]) <= rel_err(eager[1][n], ref[1][n]) + tol, n
    return fast
