"""Device profiles for the IO model and roofline estimates.

A profile gives the on-chip memory one thread block can use (M, the fast memory of
the IO model), the off-chip (HBM/DRAM) bandwidth, and peak FLOP rates: for matmuls
per dtype and for everything else (vector units, fp32).

GPU numbers are NVIDIA's data sheets (dense, no sparsity) and the CUDA programming
guide's shared-memory limits:
  * H100 SXM5: HBM3 3.35 TB/s; FP32 67 TFLOP/s; TF32 tensor 494.7; BF16/FP16 tensor
    989.4; FP64 tensor 67; shared memory per thread block up to 227 KB (cc 9.0).
  * A100 SXM4 80GB: HBM2e 2.039 TB/s; FP32 19.5 TFLOP/s; TF32 tensor 156; BF16/FP16
    tensor 312; FP64 tensor 19.5; shared memory per thread block up to 163 KB (cc 8.0).
fp32 matmuls are costed at the FP32 (non-tensor-core) rate, PyTorch's default
(`torch.backends.cuda.matmul.allow_tf32 = False`); pass `tf32=True` to `gpu_profile`
for TF32.

"cpu" is this machine, measured once (`measure_cpu`: a 64 MiB copy and a 1024^3 fp32
matmul, best of a few) and cached in ~/.cache/einfuse/cpu_profile.json; its M is the
per-core L2 cache (from sysfs, 1 MiB if unknown).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

__all__ = ["DeviceProfile", "H100", "A100", "PROFILES", "get_profile", "default_profile",
           "set_default_profile", "measure_cpu", "cpu_profile"]

TB = 1e12


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    smem_per_block: int                 # bytes: M, the fast memory one block/core works in
    mem_bw: float                       # bytes / s between slow and fast memory
    matmul_flops: dict = field(default_factory=dict)   # dtype name -> FLOP/s for contractions
    vector_flops: float = 0.0           # FLOP/s for everything else
    source: str = ""

    def matmul_rate(self, dtype: torch.dtype | str) -> float:
        key = str(dtype).replace("torch.", "")
        return self.matmul_flops.get(key) or self.matmul_flops.get("float32") or self.vector_flops


H100 = DeviceProfile(
    "H100", 227 * 1024, 3.35 * TB,
    {"float32": 67 * TB, "tf32": 494.7 * TB, "bfloat16": 989.4 * TB, "float16": 989.4 * TB, "float64": 67 * TB},
    67 * TB, "NVIDIA H100 SXM5 data sheet; CUDA guide: 227 KB shared memory per block (cc 9.0)")

A100 = DeviceProfile(
    "A100", 163 * 1024, 2.039 * TB,
    {"float32": 19.5 * TB, "tf32": 156 * TB, "bfloat16": 312 * TB, "float16": 312 * TB, "float64": 19.5 * TB},
    19.5 * TB, "NVIDIA A100 SXM4 80GB data sheet; CUDA guide: 163 KB shared memory per block (cc 8.0)")

PROFILES: dict[str, DeviceProfile] = {"H100": H100, "A100": A100}
_default = [os.environ.get("EINFUSE_DEVICE", "H100")]


def gpu_profile(name: str, tf32: bool = False) -> DeviceProfile:
    p = PROFILES[name]
    if tf32:
        p = replace(p, name=f"{name}-tf32", matmul_flops={**p.matmul_flops, "float32": p.matmul_flops["tf32"]})
    return p


def get_profile(p: "DeviceProfile | str | None" = None) -> DeviceProfile:
    """A profile by name ("H100", "A100", "cpu"), the default when None."""
    if isinstance(p, DeviceProfile):
        return p
    name = p or _default[0]
    if name.lower() == "cpu":
        return cpu_profile()
    return PROFILES[name]


def default_profile() -> DeviceProfile:
    return get_profile(None)


def set_default_profile(p: "DeviceProfile | str") -> None:
    """The profile report costs use (default "H100", or $EINFUSE_DEVICE)."""
    if isinstance(p, DeviceProfile):
        PROFILES[p.name] = p
        _default[0] = p.name
    else:
        get_profile(p)
        _default[0] = p


# ----------------------------------------------------------------------------------------
# this CPU

def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "einfuse" / "cpu_profile.json"


def _l2_bytes() -> int:
    try:
        base = Path("/sys/devices/system/cpu/cpu0/cache")
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() == "2":
                txt = (idx / "size").read_text().strip().upper()
                mult = {"K": 1024, "M": 1024 ** 2}.get(txt[-1], 1)
                return int(txt.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 1 << 20


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu(copy_mib: int = 64, n: int = 1024, reps: int = 5) -> DeviceProfile:
    """Measure this CPU: copy bandwidth (read + write bytes / s) and fp32 matmul FLOP/s."""
    x = torch.empty(copy_mib * 2 ** 20 // 4, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    t_copy = _best(lambda: y.copy_(x), reps)
    bw = 2 * x.numel() * 4 / t_copy
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm = _best(lambda: torch.mm(a, b), reps)
    mm = 2 * n ** 3 / t_mm
    z = torch.randn(x.numel() // 4)
    t_ew = _best(lambda: torch.mul(z, 1.5), reps)
    vec = z.numel() / t_ew
    return DeviceProfile("cpu", _l2_bytes(), bw, {"float32": mm, "float64": mm / 2, "bfloat16": mm, "float16": mm},
                         vec, f"measured on {platform.node()} with {torch.get_num_threads()} threads")


def cpu_profile(refresh: bool = False) -> DeviceProfile:
    """This CPU's profile, measured once and cached under ~/.cache/einfuse."""
    path = _cache_path()
    key = f"{platform.node()}/{platform.machine()}/{torch.get_num_threads()}"
    if not refresh and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return DeviceProfile(**data["profile"])
        except (OSError, ValueError, TypeError):
            pass
    p = measure_cpu()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "profile": asdict(p)}, indent=1))
    except OSError:
        pass
    PROFILES["cpu"] = p
    return p
