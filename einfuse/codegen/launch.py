"""Host side of the generated kernels: generate (through the cache), load, configure, launch.

`get_kernel(cascade, name)` returns a loaded kernel: the source comes from the kernel cache
(generated on a miss) and is executed from the verified bytes in memory (registered with
`linecache` so Triton can read it back); nothing is imported from a path. `launch_row` binds
tensors to a row program by rank: sizes are read off the inputs (a size-1 dimension
broadcasts, with stride 0), outputs are allocated (or written through given views, e.g. the
two halves of RoPE's output), and column reductions are finished on the host.

Launch configurations: under the interpreter one small fixed config (BLOCK_R <= 16, block
<= 64, at most 4 programs, so ragged tiles and the grid-stride loop are exercised); on a GPU
a small autotune over block sizes and warps, timed with triton.testing.do_bench and stored
in the kernel cache next to the kernel (key: kernel, sizes bucket, dtypes, device).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import linecache
import math
import os
import types
from dataclasses import dataclass
from typing import Any

import torch

from einfuse.ir.cascade import Cascade, canonical_text
from einfuse.runtime import cache as kcache
from einfuse.runtime import dispatch
from . import contraction, row
from .rules import CodegenError

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def codegen_hash() -> str:
    """Hash of the code generator's own source: a codegen change invalidates cached kernels."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(_HERE)):
        if name.endswith(".py") and name not in ("ops.py", "launch.py", "aot.py"):
            with open(os.path.join(_HERE, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


class KernelFailure(Exception):
    """Generating, compiling or launching a generated kernel failed."""

    def __init__(self, kernel: str, key: str, cause: str):
        super().__init__(f"{kernel}: {cause}")
        self.kernel, self.key, self.cause = kernel, key, cause


@dataclass
class Kernel:
    key: str
    name: str
    source: str
    meta: dict
    fn: Any


_loaded: dict[tuple, tuple[Cascade, Kernel]] = {}   # (id(cascade), name, compute, block, backend) -> kernel
_compiled: set[tuple] = set()
kcache.on_clear_memory(_loaded.clear)


def capability() -> str:
    if dispatch.interpreting() or not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def _versions() -> dict:
    import einfuse
    import triton
    return {"einfuse": getattr(einfuse, "__version__", "?"), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda}


def kernel_key(c: Cascade, name: str, compute: str, block: str | None) -> str:
    return kcache.make_key(
        kind="kernel", cascade=canonical_text(c), named=[str(c), list(c.inputs), list(c.outputs), c.name],
        kernel=name, compute=compute, block=block, codegen=codegen_hash(), backend=dispatch.backend(),
        capability=capability(), launch=_launch_space(), **_versions())


def _launch_space() -> str:
    return "interpreter-fixed-v1" if dispatch.interpreting() else "autotune-v1"


def generate_payload(c: Cascade, name: str, compute: str = "float32", block: str | None = None) -> dict:
    if c.splits:
        prog = contraction.analyse(c)
        return {"name": name, "source": contraction.emit(prog, name), "meta": prog.meta()}
    prog = row.analyse(c, block)
    source = row.emit(prog, name, compute)
    meta = prog.meta()
    meta["block_arg"] = f"BLOCK_{row._ident(prog.block).upper()}"
    meta["compute"] = compute
    return {"name": name, "source": source, "meta": meta}


def _check_interpreter() -> None:
    """Triton decides at import whether its own library functions are interpreted: a process
    that imported triton before setting TRITON_INTERPRET=1 cannot interpret kernels."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(tl.standard.sum, InterpretedFunction):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; set it before importing "
                           "torch or triton")


def get_kernel(c: Cascade, name: str, compute: str = "float32", block: str | None = None) -> Kernel:
    """The loaded kernel for cascade c. Fast path: the same cascade object (library builders are
    memoised) was loaded before in this process; else the kernel cache (memory, disk), else
    generate."""
    if dispatch.failure_injected(name):
        raise KernelFailure(name, "injected:" + name, "injected compile failure")
    memo = (id(c), name, compute, block, dispatch.backend())
    hit = _loaded.get(memo)
    if hit is not None and hit[0] is c:
        return hit[1]
    key = kernel_key(c, name, compute, block)
    if dispatch.interpreting():
        try:
            _check_interpreter()
        except RuntimeError as e:
            raise KernelFailure(name, key, str(e)) from e

    def build():
        kcache.bump("generated")
        return generate_payload(c, name, compute, block)
    try:
        payload = kcache.default_cache().get_or_build(key, build)
        fn = _exec(key, payload)
    except CodegenError as e:
        raise dispatch.Unsupported(str(e)) from e
    except Exception as e:
        raise KernelFailure(name, key, f"{type(e).__name__}: {e}") from e
    k = Kernel(key, name, payload["source"], payload["meta"], fn)
    _loaded[memo] = (c, k)
    return k


_fns: dict[tuple[str, str], Any] = {}


def _exec(key: str, payload: dict):
    """Execute verified source from memory; linecache lets Triton's inspect.getsource read it."""
    src = payload["source"]
    hit = _fns.get((key, src))
    if hit is not None:
        return hit
    fname = f"<einfuse-kernel-{key[:20]}>"
    linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
    mod = types.ModuleType(f"einfuse_generated_{key[:20]}")
    mod.__file__ = fname
    exec(compile(src, fname, "exec"), mod.__dict__)
    fn = getattr(mod, payload["name"])
    if not key.startswith("aot-"):
        _fns[(key, src)] = fn
    return fn


# ---------------------------------------------------------------------------------------
# launching a row program

def _np2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpreter_config(n_rows: int, size: int) -> dict:
    return {"block_r": min(_np2(n_rows), 16), "block": min(_np2(size), 64), "num_warps": 1, "programs": 4}


def _candidates(n_rows: int, size: int) -> list[dict]:
    """GPU launch configurations to time: a whole-row block or 1024-wide tiles, 1-16 rows per
    program (at least 256 elements per program), 2-8 warps."""
    full = _np2(size)
    out = []
    for blk in sorted({min(full, 8192), min(full, 1024)}):
        for br in (1, 2, 4, 8, 16):
            if br > _np2(n_rows) or br * blk > 8192 or br * blk < min(256, 16 * blk):
                continue
            for warps in ((4, 8) if br * blk >= 2048 else (2, 4)):
                out.append({"block_r": br, "block": blk, "num_warps": warps, "programs": 0})
    return out[:16] or [{"block_r": 1, "block": min(full, 8192), "num_warps": 4, "programs": 0}]


def launch_row(k: Kernel, inputs: dict[str, torch.Tensor], outputs: dict[str, Any],
               config: dict | None = None) -> dict[str, torch.Tensor]:
    """Bind tensors by rank and launch. outputs: name -> dtype (allocate) or a tensor to write."""
    meta = k.meta
    block, par = meta["block"], meta["parallel"]
    tens = meta["tensors"]
    sizes: dict[str, int] = {}
    device = None

    def see(name, t, ranks):
        if t.dim() != len(ranks):
            raise ValueError(f"{k.name}: {name} has {t.dim()} dims, the kernel expects ranks {ranks}")
        for r, s in zip(ranks, t.shape):
            if s != 1 and sizes.setdefault(r, s) != s:
                raise ValueError(f"{k.name}: rank {r} has size {s} in {name} and {sizes[r]} elsewhere")
    for t in tens:
        if t["role"] == "input":
            x = inputs[t["name"]]
            see(t["name"], x, t["ranks"])
            device = device or x.device
        elif isinstance(outputs.get(t["name"]), torch.Tensor) and t["kind"] != "colred":
            see(t["name"], outputs[t["name"]], t["ranks"])
    for r in list(par) + [block]:
        sizes.setdefault(r, 1)
    n_rows = math.prod(sizes[r] for r in par)
    size = sizes[block]

    bound: dict[str, torch.Tensor] = {}
    finals: dict[str, tuple] = {}
    compute = torch.float64 if meta.get("compute") == "float64" else torch.float32
    for t in tens:
        shape = [sizes[r] for r in t["ranks"]]
        if t["role"] == "input":
            bound[t["name"]] = inputs[t["name"]].expand(shape)
        elif t["kind"] == "colred":
            finals[t["name"]] = (t["reduce"], outputs[t["name"]])
        else:
            o = outputs[t["name"]]
            bound[t["name"]] = o if isinstance(o, torch.Tensor) else torch.empty(shape, dtype=o, device=device)
    result = {t["name"]: bound[t["name"]] for t in tens if t["role"] == "output" and t["kind"] != "colred"}

    if n_rows == 0 or size == 0:
        for name, (red, dt) in finals.items():
            fill = 0.0 if red == "sum" else float("-inf")
            result[name] = torch.full([size], fill, dtype=dt, device=device)
        return result

    interp = dispatch.interpreting()
    has_colred = bool(finals)

    def run_once(cfg: dict, partials: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        br, blk = cfg["block_r"], cfg["block"]
        n_blocks = -(-n_rows // br)
        programs = n_blocks
        if cfg.get("programs"):
            programs = min(n_blocks, cfg["programs"])
        elif has_colred:
            programs = min(n_blocks, 2 * _sm_count(device))
        parts = {}
        for name, (red, _) in finals.items():
            fill = 0.0 if red == "sum" else float("-inf")
            parts[name] = torch.full([programs, size], fill, dtype=compute, device=device)
        args: list[Any] = []
        for t in tens:
            args.append(parts[t["name"]] if t["kind"] == "colred" else bound[t["name"]])
        args += [sizes[r] for r in list(par) + [block]]
        for t in tens:
            if t["kind"] == "colred":
                args += list(parts[t["name"]].stride())
            else:
                args += list(bound[t["name"]].stride())
        args += [n_rows, programs]
        kw = {"BLOCK_R": br, meta["block_arg"]: blk, "ONE_TILE": size <= blk}
        if not interp:
            kw["num_warps"] = cfg["num_warps"]
            ident = (k.key, br, blk, size <= blk, cfg["num_warps"])
            if ident not in _compiled:
                _compiled.add(ident)
                kcache.bump("compiled")
        with _fp_quiet(interp):
            k.fn[(programs,)](*args, **kw)
        return parts

    if config is None:
        if interp:
            config = interpreter_config(n_rows, size)
        else:
            bucket = {"size": size, "rows": min(_np2(n_rows), 1 << 16)}
            config = _tuned(k, bucket, [str(t.dtype) for t in bound.values()], _candidates(n_rows, size), run_once)
    parts = run_once(config)
    dispatch.launches[k.name] += 1
    for name, (red, dt) in finals.items():
        p = parts[name]
        result[name] = (p.sum(0) if red == "sum" else p.amax(0)).to(dt)
    return result


@contextlib.contextmanager
def _fp_quiet(interp: bool):
    """The interpreter runs on numpy, which warns on inf/NaN in masked-off lanes; a GPU does not."""
    if not interp:
        yield
        return
    import numpy as np
    with np.errstate(all="ignore"):
        yield


@functools.cache
def _sm_count(device) -> int:
    if device is None or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tuned(k: Kernel, bucket: dict, dtypes: list[str], cands: list[dict], run_once) -> dict:
    """Autotune (GPU only): time the candidates once per (kernel, size bucket, dtypes, device)
    and keep the winner in the kernel cache; Triton's compiled artifacts go into our cache too."""
    tdir = kcache.triton_cache_dir()
    if tdir and "TRITON_CACHE_DIR" not in os.environ:
        os.environ["TRITON_CACHE_DIR"] = tdir
    if len(cands) == 1:
        return cands[0]
    key = kcache.make_key(kind="tune", kernel=k.key, bucket=bucket, dtypes=dtypes, capability=capability(),
                          candidates=cands)
    cache = kcache.default_cache()
    hit = cache.get(key)
    if hit is not None:
        return hit
    from triton.testing import do_bench
    best, best_t = cands[0], float("inf")
    for cfg in cands:
        try:
            t = do_bench(lambda: run_once(cfg), warmup=5, rep=20)
        except Exception:  # a config that does not compile (e.g. out of shared memory) is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    cache.put(key, best)
    return best


# ---------------------------------------------------------------------------------------
# launching a contraction program

MAX_FULL_BLOCK = 256   # a full rank (head dim, hidden size) wider than this is tiled: see contraction.py
FULL_TILE = 64         # ... in tiles of this many


def contraction_interpreter_config(sizes: dict[str, int]) -> dict:
    return {"block_p": 16, "block_m": 16, "num_warps": 4, "num_stages": 1}


def full_block(size: int, cfg: dict) -> int:
    """The block of a full rank: all of it (>= 16, a power of 2) up to cfg["max_full"], else tiles."""
    cap = cfg.get("max_full", MAX_FULL_BLOCK)
    b = max(16, _np2(size))
    return b if b <= cap else max(16, cfg.get("full_tile", min(FULL_TILE, cap)))


def _contraction_candidates() -> list[dict]:
    return [{"block_p": bp, "block_m": bm, "num_warps": nw, "num_stages": ns}
            for bp, bm, nw, ns in ((128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                                   (128, 128, 8, 2), (64, 128, 4, 2))]


def launch_contraction(k: Kernel, inputs: dict[str, torch.Tensor], outputs: dict[str, Any],
                       head_div: dict[str, int] | None = None, config: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor is [Z, heads, *its cascade ranks] (Z or heads may be 1: broadcast). head_div[t]
    maps query head h to t's head h // head_div[t] (grouped-query K and V)."""
    meta = k.meta
    par, (m, m1, m0), full = meta["par"], meta["split"], meta["full"]
    head_div = head_div or {}
    ranks = {n: rs for n, rs in meta["inputs"]} | {n: rs for n, rs in meta["outputs"]}
    sizes: dict[str, int] = {}
    Z = H = 1
    device = None
    for name, rs in meta["inputs"]:
        t = inputs[name]
        if t.dim() != len(rs) + 2:
            raise ValueError(f"{k.name}: {name} has {t.dim()} dims, expected [Z, heads, {', '.join(rs)}]")
        Z = max(Z, t.shape[0])
        H = max(H, t.shape[1] * head_div.get(name, 1))
        for r, s in zip(rs, t.shape[2:]):
            if s != 1 and sizes.setdefault(r, s) != s:
                raise ValueError(f"{k.name}: rank {r} is {s} in {name} and {sizes[r]} elsewhere")
        device = device or t.device
    for r in [par, m] + list(full):
        sizes.setdefault(r, 1)
    bound: dict[str, torch.Tensor] = {}
    for name, rs in meta["inputs"]:
        t = inputs[name]
        hd = H // head_div.get(name, 1)
        bound[name] = t.expand([Z if t.shape[0] != 1 else 1, hd if t.shape[1] != 1 else 1] + [sizes[r] for r in rs])
    for name, rs in meta["outputs"]:
        o = outputs[name]
        shape = [Z, H] + [sizes[r] for r in rs]
        bound[name] = o if isinstance(o, torch.Tensor) else torch.empty(shape, dtype=o, device=device)
    result = {n: bound[n] for n, _ in meta["outputs"]}
    if Z * H * sizes[par] == 0:
        return result
    interp = dispatch.interpreting()
    args: list[Any] = [bound[n] for n in ranks]
    args += [sizes[par], sizes[m]] + [sizes[r] for r in full] + [H]
    for n, rs in ranks.items():
        t = bound[n]
        st = list(t.stride())
        st[0] = st[0] if t.shape[0] != 1 else 0
        st[1] = st[1] if t.shape[1] != 1 else 0
        args += st + [head_div.get(n, 1)]

    def run_once(cfg: dict) -> None:
        kw = {"BLOCK_P": cfg["block_p"], "BLOCK_M": cfg["block_m"], "DOT_F32": interp}
        col_tiles = 1
        for r in full:
            b = full_block(sizes[r], cfg)
            kw[f"BLOCK_{row._ident(r).upper()}"] = b
            if r in meta.get("contracted", ()):
                kw[f"{row._ident(r).upper()}_ONE_BLOCK"] = b >= sizes[r]
            if r in meta.get("columns", ()):
                col_tiles = max(col_tiles, -(-sizes[r] // b))
        if not interp:
            kw.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            ident = (k.key, cfg["block_p"], cfg["block_m"], cfg["num_warps"], cfg["num_stages"],
                     tuple(sorted((a, b) for a, b in kw.items() if a.startswith("BLOCK_") or a.endswith("_ONE_BLOCK"))))
            if ident not in _compiled:
                _compiled.add(ident)
                kcache.bump("compiled")
        grid = (-(-sizes[par] // cfg["block_p"]), Z * H, col_tiles)
        with _fp_quiet(interp):
            k.fn[grid](*args, **kw)

    if config is None:
        if interp:
            config = contraction_interpreter_config(sizes)
        else:
            bucket = {r: sizes[r] for r in full} | {"p": min(_np2(sizes[par]), 1 << 14),
                                                    "m": min(_np2(sizes[m]), 1 << 14)}
            config = _tuned(k, bucket, [str(t.dtype) for t in bound.values()], _contraction_candidates(), run_once)
    run_once(config)
    dispatch.launches[k.name] += 1
    return result
