"""The kernel cache: a memory cache in front of a private disk cache.

An entry is a JSON-able payload (generated Triton source and its launch metadata, or an
autotuned launch configuration) stored under a key: the sha256 of everything the payload
depends on (`make_key`: canonical cascade text, einfuse/torch/triton/CUDA versions, the
codegen's own source, backend, device capability, launch config).

Disk layout: `<dir>/<key>.json` = {"format", "key", "payload", "sha256"}, where sha256 is the
hash of the canonical JSON of (key, payload). Safety, in order of what it defends against:
  * the directory is created 0700 and must be owned by us and not writable by group or
    others; otherwise it is refused with a warning and the cache is memory-only. This is
    the defence against tampering (nobody else can put code there);
  * every entry carries its own hash, verified on load: a truncated, corrupted or edited
    entry is reported with a warning, deleted and rebuilt, and never executed;
  * writes go to a temp file in the same directory and are `os.replace`d into place, so a
    reader sees a whole entry or none, and concurrent writers of one key are harmless;
  * a size bound (EINFUSE_CACHE_MAX_BYTES, default 256 MiB) evicts least-recently-used
    entries (a disk hit refreshes the entry's mtime).
A read-only directory is used for reads only (one warning).

`EINFUSE_CACHE_DIR` overrides the default `~/.cache/einfuse`; it is read when the default
cache is first used (and again if it changes).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
import warnings
from collections import Counter, OrderedDict
from typing import Any, Callable

FORMAT = 1
_stats: Counter[str] = Counter()


class CacheWarning(UserWarning):
    pass


def cache_stats() -> dict[str, int]:
    """Counters since process start: generated (cascade -> source), compiled (Triton
    compilations, GPU only), memory_hits, disk_hits, misses, corrupt, writes, evicted."""
    out = {k: 0 for k in ("generated", "compiled", "memory_hits", "disk_hits", "misses", "corrupt", "writes",
                          "evicted")}
    out.update(_stats)
    return out


def bump(name: str, n: int = 1) -> None:
    _stats[name] += n


def reset_stats() -> None:
    _stats.clear()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def make_key(**parts: Any) -> str:
    """sha256 over the canonical JSON of the given parts (all must be JSON-able)."""
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()


def _entry_hash(key: str, payload: Any) -> str:
    return hashlib.sha256(_canonical({"key": key, "payload": payload}).encode()).hexdigest()


def default_dir() -> str:
    return os.environ.get("EINFUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "einfuse")


class KernelCache:
    def __init__(self, directory: str | None = None, max_bytes: int | None = None, memory_entries: int = 512):
        self.memory: OrderedDict[str, Any] = OrderedDict()
        self.memory_entries = memory_entries
        self.max_bytes = max_bytes if max_bytes is not None else int(os.environ.get("EINFUSE_CACHE_MAX_BYTES", 256 << 20))
        self.requested_dir = directory
        self.dir: str | None = None          # None: memory only
        self.writable = False
        self.lock = threading.Lock()
        if directory is not None:
            self.dir, self.writable = _open_dir(directory)

    # -- lookup -------------------------------------------------------------------------
    def get(self, key: str) -> Any | None:
        with self.lock:
            if key in self.memory:
                self.memory.move_to_end(key)
                bump("memory_hits")
                return self.memory[key]
        payload = self._load(key)
        if payload is not None:
            bump("disk_hits")
            self._remember(key, payload)
        return payload

    def put(self, key: str, payload: Any) -> None:
        _canonical(payload)  # fail early on a payload that is not JSON-able
        self._remember(key, payload)
        if self.dir is not None and self.writable:
            self._store(key, payload)

    def get_or_build(self, key: str, build: Callable[[], Any]) -> Any:
        hit = self.get(key)
        if hit is not None:
            return hit
        bump("misses")
        payload = build()
        self.put(key, payload)
        return payload

    def clear_memory(self) -> None:
        with self.lock:
            self.memory.clear()

    def path(self, key: str) -> str | None:
        return os.path.join(self.dir, f"{key}.json") if self.dir is not None else None

    # -- internals ----------------------------------------------------------------------
    def _remember(self, key: str, payload: Any) -> None:
        with self.lock:
            self.memory[key] = payload
            self.memory.move_to_end(key)
            while len(self.memory) > self.memory_entries:
                self.memory.popitem(last=False)

    def _load(self, key: str) -> Any | None:
        p = self.path(key)
        if p is None:
            return None
        try:
            with open(p, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            warnings.warn(f"einfuse: cannot read kernel cache entry {p}: {e}", CacheWarning, stacklevel=3)
            return None
        why = ""
        try:
            entry = json.loads(raw.decode("utf-8"))
            if not isinstance(entry, dict) or entry.get("format") != FORMAT:
                why = "unknown format"
            elif entry.get("key") != key:
                why = "entry is for another key"
            elif entry.get("sha256") != _entry_hash(key, entry.get("payload")):
                why = "content hash mismatch"
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            why = f"unreadable ({type(e).__name__})"
        if why:
            bump("corrupt")
            warnings.warn(f"einfuse: kernel cache entry {p} is corrupt ({why}); discarding it and rebuilding",
                          CacheWarning, stacklevel=3)
            if self.writable:
                try:
                    os.remove(p)
                except OSError:
                    pass
            return None
        if self.writable:
            try:
                os.utime(p)  # LRU: a hit is a use
            except OSError:
                pass
        return entry["payload"]

    def _store(self, key: str, payload: Any) -> None:
        assert self.dir is not None
        data = _canonical({"format": FORMAT, "key": key, "payload": payload,
                           "sha256": _entry_hash(key, payload)}).encode()
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.dir)
        except OSError as e:
            warnings.warn(f"einfuse: cannot write to kernel cache {self.dir}: {e}; memory-only from now on",
                          CacheWarning, stacklevel=3)
            self.writable = False
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
            bump("writes")
        except OSError as e:
            warnings.warn(f"einfuse: kernel cache write failed ({e})", CacheWarning, stacklevel=3)
        finally:
            if os.path.exists(tmp):
                try:
                    os.remove(tmp)
                except OSError:
                    pass
        self._evict()

    def _evict(self) -> None:
        try:
            files = []
            for name in os.listdir(self.dir):
                if name.endswith(".json") and not name.startswith("."):
                    st = os.stat(os.path.join(self.dir, name))
                    files.append((st.st_mtime, st.st_size, name))
        except OSError:
            return
        total = sum(s for _, s, _ in files)
        for _, size, name in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                os.remove(os.path.join(self.dir, name))
                total -= size
                bump("evicted")
            except OSError:
                pass


def _open_dir(directory: str) -> tuple[str | None, bool]:
    """(directory to use or None, writable). Creates it 0700; refuses unsafe ones."""
    directory = os.path.abspath(directory)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        warnings.warn(f"einfuse: cannot create kernel cache directory {directory} ({e}); using a memory-only "
                      "cache", CacheWarning, stacklevel=4)
        return None, False
    try:
        st = os.stat(directory)
    except OSError as e:
        warnings.warn(f"einfuse: cannot stat kernel cache directory {directory} ({e}); using a memory-only cache",
                      CacheWarning, stacklevel=4)
        return None, False
    if not stat.S_ISDIR(st.st_mode):
        warnings.warn(f"einfuse: kernel cache path {directory} is not a directory; using a memory-only cache",
                      CacheWarning, stacklevel=4)
        return None, False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        warnings.warn(f"einfuse: kernel cache directory {directory} is owned by another user; refusing it "
                      "(memory-only cache)", CacheWarning, stacklevel=4)
        return None, False
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        warnings.warn(f"einfuse: kernel cache directory {directory} is writable by other users "
                      f"(mode {stat.S_IMODE(st.st_mode):o}); refusing it: others could plant code there. "
                      "Using a memory-only cache (chmod 700 the directory to use it)", CacheWarning, stacklevel=4)
        return None, False
    writable = os.access(directory, os.W_OK | os.X_OK)
    if not writable:
        warnings.warn(f"einfuse: kernel cache directory {directory} is read-only; new kernels are kept in memory "
                      "only", CacheWarning, stacklevel=4)
    return directory, writable


_default: KernelCache | None = None
_default_lock = threading.Lock()
_clear_hooks: list[Callable[[], None]] = []


def on_clear_memory(fn: Callable[[], None]) -> None:
    """Register a hook run by `clear_memory` (e.g. the table of loaded kernels)."""
    _clear_hooks.append(fn)


def clear_memory() -> None:
    """Drop everything held in memory (the next lookup goes to disk)."""
    default_cache().clear_memory()
    for fn in _clear_hooks:
        fn()


def default_cache() -> KernelCache:
    """The process-wide cache for `default_dir()` (re-opened when EINFUSE_CACHE_DIR changes)."""
    global _default
    d = default_dir()
    with _default_lock:
        if _default is None or _default.requested_dir != d:
            _default = KernelCache(d)
        return _default


def triton_cache_dir() -> str | None:
    """Where Triton's own compiled artifacts go (inside our cache, when it is usable)."""
    c = default_cache()
    if c.dir is None or not c.writable:
        return None
    p = os.path.join(c.dir, "triton")
    os.makedirs(p, mode=0o700, exist_ok=True)
    return p
