"""Train a Hugging Face causal LM with einfuse in a plain PyTorch loop.

`einfuse.optimize(model)` returns a module that shares the model's parameters; its forward runs the
fused ops (attention, RMSNorm, SwiGLU, RoPE and the logit-free loss) and backward runs through them,
so the optimizer updates the original model. The data is byte-level text (tiny Shakespeare when
--text points at it), the model a small random-weight Llama built from a config: nothing is
downloaded.

    python examples/train_hf_loop.py --text ../shared/data/tinyshakespeare.txt --steps 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import einfuse
from einfuse.runtime import counters

FALLBACK_TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
                 "First Citizen: You are all resolved rather to die than to famish? ") * 20


def byte_batches(text: str, batch: int, seq: int, steps: int, seed: int = 0):
    """`steps` random windows of `seq + 1` bytes, as token ids in [0, 256)."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()])


def tiny_llama(layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", help="a text file to train on (bytes as tokens)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args(argv)

    text = Path(a.text).read_text() if a.text else FALLBACK_TEXT
    model = tiny_llama(a.layers)
    model.train()
    fast = einfuse.optimize(model)                      # shares model's parameters
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    losses = []
    t0 = time.perf_counter()
    with counters.counting() as calls:
        for step, ids in enumerate(byte_batches(text, a.batch, a.seq, a.steps)):
            loss = fast(input_ids=ids, labels=ids).loss  # the fused, logit-free loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"{a.steps} steps in {time.perf_counter() - t0:.1f} s (the first includes compilation)")
    print("fusions:", fast.einfuse_report.fusions)
    print("fused-op calls:", dict(calls))
    return {"losses": losses, "calls": dict(calls), "fusions": fast.einfuse_report.fusions}


if __name__ == "__main__":
    main()
