"""Poisoned allocations for kernel tests: outputs start as NaN, so an element a kernel never writes shows."""
import torch


class PoisonedTorch:
    """torch, except that empty() returns NaN-filled memory (monkeypatch a kernel module's `torch` with it)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
