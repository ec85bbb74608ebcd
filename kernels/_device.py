"""Triton launches a kernel on torch's *current* CUDA device and its current stream, whatever device the
arguments live on. A caller holding tensors on cuda:1 while cuda:0 is current (a model moved with
`.to("cuda:1")` in a process that never called `torch.cuda.set_device`) would otherwise get kernels on the
wrong GPU reading foreign pointers. The CUDA C++ ops take a device guard for the same reason."""
from __future__ import annotations

import functools

import torch


def on_device_of_first_arg(launcher):
    """Run `launcher(t, ...)` with t's CUDA device current (and so its current stream): a no-op for CPU
    tensors and when that device is current already."""
    @functools.wraps(launcher)
    def run(t, *args, **kwargs):
        dev = t.device
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)
    return run


# Host-side integer helpers for the launchers. triton.cdiv / triton.next_power_of_2 are ConstexprFunctions
# from Triton 3.8 on (callable from kernels too), about 2 us a call from the host on the CI machine; a
# launcher makes several per call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


GRID_YZ_MAX = 65535   # CUDA's limit on grid axes 1 and 2 (the ops' reasons read it too: no Triton import here)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2 for n >= 1."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def int32_addressable(t: torch.Tensor, batch_in_int64: bool = False) -> torch.Tensor:
    """`t`, or a contiguous copy when its strides reach an element offset of 2**31 or more: the kernels
    compute row * stride in int32 (with batch_in_int64, all but the first dim's: that term is int64). For
    incoming gradients, whose strides the caller does not choose (the backward of torch.cat along the last
    dim hands over a narrow view of a wider tensor); the forward refuses inputs whose own span is that large,
    so the copy fits."""
    from beit_fast._backend import offset_span
    # offset_span is 1 + the largest offset: a copy once that offset is 2**31 or more
    if t.numel() and offset_span(t[0] if batch_in_int64 else t) > 2**31:
        return t.contiguous()
    return t
