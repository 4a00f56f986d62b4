"""A hand-written Llama-style model that spells the math differently from Hugging Face.

- RMSNorm as `x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w`
- Meta's complex-number RoPE (`torch.view_as_complex` / `view_as_real`), applied in [B, S, H, D] layout
- `F.silu(a) * b` for the gated MLP
- an explicit causal mask with `masked_fill(..., float("-inf"))` and division by sqrt(d)
- a loss spelled `F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())`

einfuse finds the same fusions here as in Hugging Face's Llama, because it
matches what is computed, not how it is written.

    python examples/handwritten_llama.py
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Norm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end).float()
    return torch.polar(torch.ones(end, dim // 2), torch.outer(t, freqs))


def apply_rotary(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis[None, :, None, :]
    xq_out = torch.view_as_real(xq_ * f).flatten(3)
    xk_out = torch.view_as_real(xk_ * f).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x, freqs_cis):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.h, self.hd)
        k = self.wk(x).view(b, s, self.h, self.hd)
        v = self.wv(x).view(b, s, self.h, self.hd)
        q, k = apply_rotary(q, k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, s, -1)
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.attn_norm, self.attn = Norm(d), Attention(d, heads)
        self.mlp_norm, self.mlp = Norm(d), MLP(d, hidden)

    def forward(self, x, freqs_cis):
        x = x + self.attn(self.attn_norm(x), freqs_cis)
        return x + self.mlp(self.mlp_norm(x))


class HandwrittenLlama(nn.Module):
    def __init__(self, vocab=128, d=48, heads=4, hidden=96, layers=2, max_seq=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = Norm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(d // heads, max_seq), persistent=False)

    def forward(self, tokens, targets=None):
        s = tokens.shape[1]
        x = self.tok(tokens)
        for blk in self.blocks:
            x = blk(x, self.freqs_cis[:s])
        logits = self.out(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())


def main():
    import einfuse
    torch.manual_seed(0)
    model = HandwrittenLlama()
    tokens = torch.randint(0, 128, (2, 24))
    report = einfuse.inspect(model, tokens, tokens)
    print("fusions found:", report.fusions)
    for r in report.unfused:
        print("not fused:", r.summary())
    fast = einfuse.optimize(model)
    loss = fast(tokens, tokens)
    loss.backward()
    ref = model(tokens, tokens)
    print(f"loss: optimized {loss.item():.6f}  eager {ref.item():.6f}")


if __name__ == "__main__":
    main()
