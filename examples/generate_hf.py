"""Inference with `generate()` through einfuse.

`einfuse.optimize(model).generate(...)` runs the optimized forward at every decoding step (prefill and
one token at a time with the KV cache); greedy decoding gives the same tokens as eager. A small
random-weight Llama on bytes: nothing is downloaded.

    python examples/generate_hf.py --prompt "ROMEO:" --tokens 40
"""

from __future__ import annotations

import argparse
import time

import torch

import einfuse
from einfuse.runtime import counters

from train_hf_loop import tiny_llama


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args(argv)

    model = tiny_llama(a.layers).eval()
    ids = torch.tensor([list(a.prompt.encode("utf-8"))])
    fast = einfuse.optimize(model)
    kw = dict(max_new_tokens=a.tokens, do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.no_grad(), counters.counting() as calls:
        out = fast.generate(ids, **kw)
    t1 = time.perf_counter()
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    same = torch.equal(out, ref)
    new = out[0, ids.shape[1]:].tolist()
    print(f"generated {len(new)} tokens in {t1 - t0:.1f} s (includes compilation): {bytes(new)!r}")
    print("same tokens as eager generate():", same)
    print("fused-op calls:", dict(calls))
    return {"tokens": out, "reference": ref, "same": same, "calls": dict(calls)}


if __name__ == "__main__":
    main()
