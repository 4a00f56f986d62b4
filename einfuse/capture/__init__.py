"""Capture: the torch.compile backend and what it records about each compilation."""

from einfuse.capture.backend import CompileRecord, compile_records, compile_stats

__all__ = ["CompileRecord", "compile_records", "compile_stats"]
