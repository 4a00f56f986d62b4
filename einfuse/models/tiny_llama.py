"""A tiny Llama-style decoder written in plain torch (no transformers needed).

It has everything the fusions look for — RMSNorm, rotary embeddings, grouped
query attention with a causal mask, a SwiGLU MLP, a tied lm_head and a
shifted cross-entropy loss — spelled the way hand-written models spell them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 256
    hidden: int = 64
    intermediate: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_seq: int = 128
    eps: float = 1e-5
    rope_theta: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 / torch.sqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.c = c
        hd = c.hidden // c.heads
        self.attn_norm = RMSNorm(c.hidden, c.eps)
        self.wq = nn.Linear(c.hidden, c.heads * hd, bias=False)
        self.wk = nn.Linear(c.hidden, c.kv_heads * hd, bias=False)
        self.wv = nn.Linear(c.hidden, c.kv_heads * hd, bias=False)
        self.wo = nn.Linear(c.heads * hd, c.hidden, bias=False)
        self.mlp_norm = RMSNorm(c.hidden, c.eps)
        self.gate = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x, cos, sin, mask):
        c = self.c
        b, s, _ = x.shape
        hd = c.hidden // c.heads
        h = self.attn_norm(x)
        q = self.wq(h).view(b, s, c.heads, hd).transpose(1, 2)
        k = self.wk(h).view(b, s, c.kv_heads, hd).transpose(1, 2)
        v = self.wv(h).view(b, s, c.kv_heads, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = c.heads // c.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        x = x + self.wo(attn.transpose(1, 2).reshape(b, s, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, config: TinyLlamaConfig | None = None):
        super().__init__()
        c = self.config = config or TinyLlamaConfig()
        self.embed = nn.Embedding(c.vocab_size, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)
        self.lm_head = nn.Linear(c.hidden, c.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        hd = c.hidden // c.heads
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None):
        b, s = ids.shape
        pos = torch.arange(s, device=ids.device).float()
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin, mask)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return loss
