"""The kernel cache: memory and disk hits, a second process that generates nothing, corrupt /
truncated / tampered entries rebuilt (never executed), concurrent writers, unsafe directories
refused, LRU eviction, and keys that change with everything the kernel depends on."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see tests/test_codegen.py)

import json  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from einfuse.codegen import launch, library  # noqa: E402
from einfuse.codegen import ops as K  # noqa: E402
from einfuse.runtime import cache as kcache  # noqa: E402
from einfuse.runtime import dispatch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a second process: run a few kernels against the CPU implementations, print the cache stats
SCRIPT = r"""
import json, os, sys, torch
from einfuse.codegen import ops as K
from einfuse.runtime.cache import cache_stats
from einfuse.runtime.ops.rmsnorm import _forward
from einfuse.runtime.ops.swiglu import _glu_fwd
ok = True
for i in range(int(sys.argv[1])):
    g = torch.Generator().manual_seed(i)
    x, w = torch.randn(5, 40 + i, generator=g), torch.randn(40 + i, generator=g)
    y, _ = K.rmsnorm_forward(x, w, 1e-6, 0.0)
    ok &= torch.allclose(y, _forward(x, w, 1e-6, 0.0)[0], rtol=1e-5, atol=1e-5)
    a, b = torch.randn(3, 17, generator=g), torch.randn(3, 17, generator=g)
    for act in ("silu", "gelu_tanh"):
        ok &= torch.allclose(K.glu_forward(a, b, act), _glu_fwd(a, b, act), rtol=1e-5, atol=1e-6)
print("RESULT" + json.dumps({"ok": bool(ok), "stats": cache_stats()}))
"""


def run_child(cache_dir, n=2, wait=True):
    env = dict(os.environ, TRITON_INTERPRET="1", EINFUSE_CACHE_DIR=str(cache_dir))
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, str(n)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    return finish(p) if wait else p


def finish(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-4000:]
    return json.loads(out.split("RESULT", 1)[1])


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("EINFUSE_CACHE_DIR", str(d))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kcache.clear_memory()
    dispatch.reset()
    yield d
    kcache.clear_memory()
    dispatch.reset()


def entries(d) -> list[str]:
    return sorted(str(d / n) for n in os.listdir(d) if n.endswith(".json"))


# ---------------------------------------------------------------------------------------

def test_memory_hit_then_disk_hit_after_clearing_memory(tmp_path):
    c = kcache.KernelCache(str(tmp_path / "c"))
    built = []
    payload = c.get_or_build("k1", lambda: built.append(1) or {"source": "x = 1\n"})
    before = kcache.cache_stats()
    assert c.get_or_build("k1", lambda: built.append(1)) == payload and built == [1]
    assert kcache.cache_stats()["memory_hits"] == before["memory_hits"] + 1
    c.clear_memory()
    assert c.get("k1") == payload
    assert kcache.cache_stats()["disk_hits"] == before["disk_hits"] + 1
    assert kcache.KernelCache(str(tmp_path / "c")).get("k1") == payload   # another instance reads it too
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o700           # created private
    assert stat.S_IMODE(os.stat(entries(tmp_path / "c")[0]).st_mode) == 0o600


def test_kernels_hit_memory_then_disk(cache_dir):
    x, w = torch.randn(3, 20), torch.randn(20)
    s0 = kcache.cache_stats()
    K.rmsnorm_forward(x, w, 1e-6, 0.0)
    s1 = kcache.cache_stats()
    assert s1["generated"] == s0["generated"] + 1 and s1["writes"] == s0["writes"] + 1
    K.rmsnorm_forward(x, w, 1e-6, 0.0)   # the loaded kernel: no lookup, no generation
    assert kcache.cache_stats()["generated"] == s1["generated"]
    kcache.clear_memory()
    y, _ = K.rmsnorm_forward(x, w, 1e-6, 0.0)
    s2 = kcache.cache_stats()
    assert s2["generated"] == s1["generated"] and s2["disk_hits"] == s1["disk_hits"] + 1
    torch.testing.assert_close(y, w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
    assert len(entries(cache_dir)) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "tamper"])
def test_a_damaged_entry_is_detected_rebuilt_and_never_executed(cache_dir, damage):
    x, w = torch.randn(4, 24), torch.randn(24)
    want, _ = K.rmsnorm_forward(x, w, 1e-6, 0.0)
    (path,) = entries(cache_dir)
    raw = open(path, "rb").read()
    if damage == "flip":
        i = raw.index(b"tl.rsqrt")
        bad = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]          # "ul.rsqrt": still valid JSON
    elif damage == "truncate":
        bad = raw[: len(raw) // 2]
    else:  # a plausible edit with the old hash: a kernel that would compute 1/rms -> rms
        entry = json.loads(raw)
        entry["payload"]["source"] = entry["payload"]["source"].replace("tl.rsqrt(", "tl.sqrt(")
        bad = json.dumps(entry).encode()
    assert bad != raw
    open(path, "wb").write(bad)
    kcache.clear_memory()
    s0 = kcache.cache_stats()
    with pytest.warns(kcache.CacheWarning, match="corrupt"):
        y, _ = K.rmsnorm_forward(x, w, 1e-6, 0.0)
    s1 = kcache.cache_stats()
    assert s1["corrupt"] == s0["corrupt"] + 1 and s1["generated"] == s0["generated"] + 1
    assert torch.equal(y, want)                       # the damaged source was not run
    assert open(path, "rb").read() == raw             # rebuilt in place, byte for byte
    kcache.clear_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kcache.CacheWarning)
        K.rmsnorm_forward(x, w, 1e-6, 0.0)            # and it verifies now


def test_two_processes_fill_one_directory_at_once_and_a_third_generates_nothing(tmp_path):
    d = tmp_path / "c"
    procs = [run_child(d, wait=False) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert all(r["ok"] for r in results)
    assert all(r["stats"]["generated"] + r["stats"]["disk_hits"] == 4 for r in results)  # 2 rmsnorm, 2 glu
    files = entries(d)
    assert len(files) == 4
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]   # no temp files left behind
    c = kcache.KernelCache(str(d))
    with warnings.catch_warnings():
        warnings.simplefilter("error", kcache.CacheWarning)
        for f in files:
            assert c.get(os.path.basename(f)[:-5]) is not None        # every entry verifies
    third = run_child(d)
    s = third["stats"]
    assert third["ok"] and s["generated"] == 0 and s["compiled"] == 0 and s["disk_hits"] == 4, s


def test_a_directory_writable_by_others_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.warns(kcache.CacheWarning, match="writable by other users"):
        c = kcache.KernelCache(str(d))
    assert c.dir is None
    assert c.get_or_build("k", lambda: {"v": 1}) == {"v": 1} and c.get("k") == {"v": 1}   # memory-only
    assert os.listdir(d) == []


def test_kernels_still_run_with_a_refused_directory(tmp_path, monkeypatch):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setenv("EINFUSE_CACHE_DIR", str(d))
    with pytest.warns(kcache.CacheWarning, match="writable by other users"):
        kcache.clear_memory()
        y = K.glu_forward(torch.ones(2, 3), torch.ones(2, 3), "silu")
    torch.testing.assert_close(y, torch.nn.functional.silu(torch.ones(2, 3)))
    assert os.listdir(d) == []
    kcache.clear_memory()


def test_a_read_only_directory_is_used_for_reads(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    kcache.KernelCache(str(d)).put("old", {"v": 1})
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(d) and m & os.W_OK else real_access(p, m))
    with pytest.warns(kcache.CacheWarning, match="read-only"):
        c = kcache.KernelCache(str(d))
    assert c.get("old") == {"v": 1}
    c.put("new", {"v": 2})
    assert c.get("new") == {"v": 2} and len(entries(d)) == 1


def test_lru_eviction_keeps_the_directory_bounded(tmp_path):
    d = tmp_path / "c"
    c = kcache.KernelCache(str(d), max_bytes=10_000)
    blob = "x" * 3000
    for i in range(3):
        c.put(f"k{i}", {"s": blob})
        os.utime(c.path(f"k{i}"), (time.time() - 100 + i, time.time() - 100 + i))
    c.clear_memory()
    assert c.get("k0") is not None            # a hit refreshes k0: k1 is now the oldest
    c.put("k3", {"s": blob})
    assert os.path.exists(c.path("k0")) and not os.path.exists(c.path("k1"))
    assert sum(os.path.getsize(f) for f in entries(d)) <= 10_000


def test_the_key_changes_with_everything_the_kernel_depends_on(monkeypatch):
    c = library.rmsnorm_forward(64, 1e-6)
    base = launch.kernel_key(c, "k", "float32", None)
    assert launch.kernel_key(library.rmsnorm_forward(64, 1e-6), "k", "float32", None) == base   # deterministic
    assert launch.kernel_key(library.rmsnorm_forward(64, 1e-5), "k", "float32", None) != base   # the cascade
    assert launch.kernel_key(c, "k", "float64", None) != base                                   # compute dtype
    assert launch.kernel_key(c, "k2", "float32", None) != base                                  # kernel name
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert launch.kernel_key(c, "k", "float32", None) != base                                   # a version
    monkeypatch.undo()
    monkeypatch.setattr(launch, "codegen_hash", lambda: "changed")
    assert launch.kernel_key(c, "k", "float32", None) != base                                   # the codegen source
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert launch.kernel_key(c, "k", "float32", None) != base                                   # the backend
    assert set(kcache.cache_stats()) >= {"generated", "compiled", "memory_hits", "disk_hits"}


def test_the_key_changes_with_the_device_capability_and_the_launch_space(monkeypatch):
    c = library.attention_backward_dq(0.125, "causal", 0.0)
    base = launch.kernel_key(c, "k", "float32", None)
    monkeypatch.setattr(launch, "capability", lambda: "sm90")
    sm90 = launch.kernel_key(c, "k", "float32", None)
    monkeypatch.setattr(launch, "capability", lambda: "sm80")
    assert len({base, sm90, launch.kernel_key(c, "k", "float32", None)}) == 3
    monkeypatch.undo()
    monkeypatch.setattr(launch, "_launch_space", lambda: "autotune-v2")
    assert launch.kernel_key(c, "k", "float32", None) != base
    # and with the cascade's constants (the constexpr bindings a kernel is specialised on)
    assert launch.kernel_key(library.attention_backward_dq(0.25, "causal", 0.0), "k", "float32", None) != base


def test_an_edit_to_the_code_generator_changes_its_hash_and_so_every_key(tmp_path, monkeypatch):
    """codegen_hash reads the generator's own source files: editing one (here a comment added to a
    copy of contraction.py) gives a new hash, so kernels generated by the old code are not reused."""
    import shutil
    src = os.path.dirname(launch.__file__)
    copy = tmp_path / "codegen"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(launch, "_HERE", str(copy))
    launch.codegen_hash.cache_clear()
    try:
        before = launch.codegen_hash()
        c = library.rmsnorm_forward(64, 1e-6)
        k_before = launch.kernel_key(c, "k", "float32", None)
        with open(copy / "contraction.py", "a") as f:
            f.write("\n# an edit\n")
        launch.codegen_hash.cache_clear()
        assert launch.codegen_hash() != before
        assert launch.kernel_key(c, "k", "float32", None) != k_before
    finally:
        monkeypatch.undo()
        launch.codegen_hash.cache_clear()
