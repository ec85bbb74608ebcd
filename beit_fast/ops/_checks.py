"""Input checks shared by the ops' Python front ends: a caller's bad shape, dtype or device is a ValueError
naming what was expected, raised before a backend is chosen, so the PyTorch reference (the fallback when the
extension is missing) refuses what the C++ / CUDA kernels refuse instead of broadcasting it."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


# the dtypes torch.autocast casts to its lower precision (fp64 and integer tensors it leaves alone); the ops
# that cast their own inputs under autocast (linear_gelu, masked_patch_embed, rel_pos_attention) cast these only
AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_on(t) -> bool:
    """Whether torch.autocast is on for the device type of tensor `t`."""
    return isinstance(t, torch.Tensor) and t.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(t.device.type)


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes tensor `t` in: the autocast dtype for fp32 / fp16 / bf16 while it is on,
    else t's own."""
    return torch.get_autocast_dtype(t.device.type) if autocast_on(t) and t.dtype in AUTOCAST_ELIGIBLE else t.dtype


def autocast(*tensors):
    """Inside torch.autocast (on the first tensor's device type), the tensors cast to the autocast dtype as
    F.linear / scaled_dot_product_attention would cast them (a custom op has no autocast rule of its own);
    None, non-tensors and fp64 pass unchanged. Outside autocast: unchanged."""
    if not autocast_on(tensors[0]):
        return tensors
    return tuple(t.to(autocast_dtype(t)) if isinstance(t, torch.Tensor) else t for t in tensors)


def tensor(op: str, name: str, t, optional: bool = False) -> Optional[torch.Tensor]:
    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor{' or None' if optional else ''}, "
                         f"got {type(t).__name__}")
    return t


def floating(op: str, name: str, t: Optional[torch.Tensor]) -> None:
    if t is not None and not t.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")


def shape(op: str, name: str, t: Optional[torch.Tensor], want: Sequence[int], described: str) -> None:
    """t (when given) must have exactly the shape `want`, described symbolically as `described`."""
    if t is not None and tuple(t.shape) != tuple(want):
        raise ValueError(f"{op}: {name} must have shape {described} = {tuple(want)}, got {tuple(t.shape)}")


def one_device(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must "
                             f"be on one device")
