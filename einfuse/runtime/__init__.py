"""Runtime: fused ops as torch.library custom ops (CPU implementations here)."""
