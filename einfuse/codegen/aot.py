"""Ahead-of-time compilation of generated kernels for a CUDA target, without a GPU.

Triton ships ptxas, so `aot_compile` takes generated source through ttir, ttgir, llir and ptx
to a cubin for e.g. sm_90. The interpreter accepts more than the GPU compiler (tile shapes,
dtypes of tl.dot operands, layouts), so this is how CI checks that what codegen emits is what a
GPU build takes. Run it in a process that has not imported triton in interpreter mode.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from einfuse.ir.cascade import Cascade
from . import row
from .launch import _exec, generate_payload, kernel_key

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.bool: "i1", torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}


def aot_compile(c: Cascade, name: str, dtypes: dict[str, torch.dtype], config: dict, *, compute: str = "float32",
                arch: int = 90) -> dict[str, Any]:
    """Compile the generated kernel for `cuda:sm_<arch>` down to cubin; returns Triton's asm dict
    (ttir, ttgir, llir, ptx, cubin). Checks that the source is what the GPU compiler accepts,
    which the interpreter (more permissive) does not. Run it in a process that has not imported
    triton in interpreter mode. config: row programs {block_r, block, one_tile, num_warps};
    contraction programs {block_p, block_m, block_<full rank>..., num_warps, num_stages}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    payload = generate_payload(c, name, compute)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        fn = _exec("aot-" + kernel_key(c, name, compute, None), payload)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    meta = payload["meta"]
    acc = torch.float64 if compute == "float64" else torch.float32
    ptr_types = {}
    for t in meta.get("tensors", []) or [{"name": n, "kind": ""} for n, _ in meta["inputs"] + meta["outputs"]]:
        dt = acc if t.get("kind") == "colred" else dtypes[t["name"]]
        ptr_types[f"{row._ident(t['name'])}_ptr"] = "*" + _TRITON_TYPES[dt]
    if meta["program"] == "row":
        const = {"BLOCK_R": config["block_r"], meta["block_arg"]: config["block"],
                 "ONE_TILE": bool(config.get("one_tile"))}
    else:
        const = {"BLOCK_P": config["block_p"], "BLOCK_M": config["block_m"], "DOT_F32": False}
        for r in meta["full"]:
            const[f"BLOCK_{row._ident(r).upper()}"] = config[f"block_{r}"]
        for r in meta.get("contracted", ()):  # one block unless the config tiles the contraction
            const[f"{row._ident(r).upper()}_ONE_BLOCK"] = bool(config.get(f"one_block_{r}", True))
    sig = {a: ptr_types.get(a, "constexpr" if a in const else "i32") for a in fn.arg_names}
    src = ASTSource(fn, signature=sig, constexprs=const)
    opts = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts).asm
