"""Call counters for fused ops.

Every fused op's implementation calls `bump(name)` once per call, so tests can
assert that a fusion really ran (not only that outputs match). Counters are
process-global and cheap; `snapshot()`/`reset()` are for tests and reports.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

_calls: Counter[str] = Counter()


def bump(name: str) -> None:
    _calls[name] += 1


def get(name: str) -> int:
    return _calls[name]


def snapshot() -> dict[str, int]:
    return dict(_calls)


def reset() -> None:
    _calls.clear()


@contextmanager
def counting():
    """Yield a Counter of the fused-op calls made inside the block."""
    before = Counter(_calls)
    delta: Counter[str] = Counter()
    try:
        yield delta
    finally:
        after = Counter(_calls)
        after.subtract(before)
        delta.update({k: v for k, v in after.items() if v})
