"""Linear + bias + exact GELU: y = GELU(x W^T + b), BEiT's MLP fc1 + act (nn.GELU(), erf form).

Backends ("triton", "reference"): the Triton GEMM with the bias and GELU in its epilogue
(kernels/linear_gelu.py), or the PyTorch reference. The Triton path is the custom op
`beit_fast::linear_gelu_triton` (+ `beit_fast::linear_gelu_triton_bwd`), with fake and autograd
registrations, so torch.compile(fullgraph=True) keeps it in the graph.

Backward: store or recompute the pre-activation Z = x W^T + b?
  store (default)  the forward also writes Z (M*N extra write, M*N activation memory, the same memory
                   eager nn.Linear -> nn.GELU keeps for GELU's input); the backward is one elementwise
                   pass dZ = dY * GELU'(Z) fused with the bias-gradient partial sums.
  recompute        nothing extra saved; the backward reruns the GEMM (2*M*N*K flops) with dY * GELU'(Z)
                   and the bias partials in its epilogue.
Rough H100 arithmetic for BEiT-B fc1 (M = 64*197, K = 768, N = 3072, bf16): storing moves about 4*M*N*2
bytes (~0.1 ms), recomputing costs one more GEMM (~0.09 ms at 700 TFLOP/s) plus reading dY and writing dZ
(~0.05 ms). Store is expected to win by a little and costs memory; the choice is pending a GPU
measurement (bench/bench_blocks.py times both: providers `ours` and `ours_recompute`), and
`recompute=True` or BEIT_FAST_LINEAR_GELU_RECOMPUTE=1 selects the other.
Either way dX = dZ W and dW = dZ^T X are cuBLAS matmuls and db is a fixed-order sum of fp32 partials.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from beit_fast._backend import choose, common_reasons, offset_span

from . import _checks as checks
from . import _eager

PREFERENCE = ("triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def recompute_default() -> bool:
    return os.environ.get("BEIT_FAST_LINEAR_GELU_RECOMPUTE", "0") not in ("", "0")


def linear_gelu_ref(x, weight, bias=None, upcast=False):
    """GELU(x W^T + b), exact erf GELU. upcast: compute in fp32 (fp64 stays fp64), return x.dtype."""
    if not upcast:
        return F.gelu(F.linear(x, weight, bias))
    dtype = x.dtype
    up = torch.float64 if dtype == torch.float64 else torch.float32
    bias = bias.to(up) if bias is not None else None
    return F.gelu(F.linear(x.to(up), weight.to(up), bias)).to(dtype)


def _check_inputs(x, weight, bias):
    """Shape/dtype/device errors are the caller's bug, not a backend's limit: ValueError."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("linear_gelu: x and weight must be tensors")
    if x.dim() < 1:
        raise ValueError("linear_gelu: x must have shape (..., K), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_gelu: weight must have shape (N, K) = (N, {x.shape[-1]}) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"linear_gelu: bias must have shape (N,) = ({N},) or be None, got {got}")
    tensors = [t for t in (x, weight, bias) if t is not None]
    if not x.is_floating_point() or any(t.dtype != x.dtype for t in tensors):
        raise ValueError("linear_gelu: x, weight and bias must share one floating dtype, got "
                         + ", ".join(str(t.dtype) for t in tensors))
    if any(t.device != x.device for t in tensors):
        raise ValueError("linear_gelu: x, weight and bias must be on one device, got "
                         + ", ".join(str(t.device) for t in tensors))


def not_supported_reasons(backend: str, x, weight=None, bias=None, *, auto: bool = False) -> list[str]:
    """Why `backend` cannot run these inputs (empty: it can). x may be a device (str) for `info`."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    why = common_reasons(backend, tensors, auto=auto)
    if backend == "triton" and isinstance(x, torch.Tensor):
        if x.dtype not in TRITON_DTYPES:
            why.append(f"the Triton kernel supports {[str(d) for d in TRITON_DTYPES]}, got {x.dtype}")
        if isinstance(weight, torch.Tensor) and x.dim() >= 1 and weight.dim() == 2:
            rows = x.numel() // max(x.shape[-1], 1)
            spans = {"x": offset_span(x), "weight": offset_span(weight), "output": rows * weight.shape[0]}
            big = {k: v for k, v in spans.items() if v >= 2**31}
            if big:
                why.append(f"{rows} rows x {x.shape[-1]} -> {weight.shape[0]} columns: the kernel's int32 offsets "
                           f"need every operand to span fewer than 2**31 elements, got {big}")
    return why


# ---------------------------------------------------------------------------------------------- custom ops

def _kernels():
    from beit_fast.kernels import linear_gelu as kernels  # imports triton: only when the op runs
    return kernels


def _linear_gelu_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      save_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), weight (N, K), bias (N,)? -> y (M, N), z (M, N) if save_preact else (0,)."""
    y, z = _kernels().linear_gelu_fwd(x, weight, bias, save_preact)
    return y, (z if z is not None else x.new_empty((0,)))


_linear_gelu_triton = torch.library.custom_op("beit_fast::linear_gelu_triton", mutates_args=())(_linear_gelu_impl)


@_linear_gelu_triton.register_fake
def _(x, weight, bias, save_preact):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), (x.new_empty((M, N)) if save_preact else x.new_empty((0,)))


def _linear_gelu_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          preact: Optional[torch.Tensor], need_dx: bool, need_dw: bool, need_db: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (M, K), dw (N, K), db (N,); a gradient not asked for (or db without bias) is (0,)."""
    dx, dw, db = _kernels().linear_gelu_bwd(dy, x, weight, bias, preact, need_dx, need_dw, need_db)
    empty = x.new_empty((0,))
    return (dx if dx is not None else empty,
            dw if dw is not None else empty.clone(),
            db if db is not None else empty.clone())


_linear_gelu_triton_bwd = torch.library.custom_op("beit_fast::linear_gelu_triton_bwd",
                                                  mutates_args=())(_linear_gelu_bwd_impl)


@_linear_gelu_triton_bwd.register_fake
def _(dy, x, weight, bias, preact, need_dx, need_dw, need_db):
    M, K = x.shape
    N = weight.shape[0]
    return (x.new_empty((M, K) if need_dx else (0,)),
            x.new_empty((N, K) if need_dw else (0,)),
            x.new_empty((N,) if need_db and bias is not None else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, save_preact = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)  # z's gradient arrives as None, not as an (M, N) zero tensor
    ctx.save_for_backward(x, weight, bias, z if save_preact else None)


def _backward(ctx, dy, _dz_unused):
    if dy is None:
        return None, None, None, None
    x, weight, bias, z = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = _eager.call_raw(_linear_gelu_bwd_impl, _linear_gelu_triton_bwd,
                                 dy, x, weight, bias, z, need_dx, need_dw, need_db and bias is not None)
    return (dx if need_dx else None, dw if need_dw else None,
            db if need_db and bias is not None else None, None)


_linear_gelu_triton.register_autograd(_backward, setup_context=_setup_context)
_LinearGeluFn = _eager.AutogradOp("LinearGeluTriton", _linear_gelu_impl, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------- public op

def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                backend: str = "auto", recompute: Optional[bool] = None) -> torch.Tensor:
    """y = GELU(x @ weight.T + bias), exact (erf) GELU as nn.GELU() (BEiT's MLP fc1 + act).

    x:      (..., K), any leading dims; fp16, bf16 or fp32 (fp64 on the reference backend)
    weight: (N, K), nn.Linear layout, x's dtype and device
    bias:   (N,) or None, x's dtype and device
    returns (..., N) in x's dtype.

    backend: "auto" (Triton on CUDA tensors, the reference on CPU tensors; BEIT_FAST_BACKEND overrides),
    "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "reference". A forced backend that cannot run
    raises BackendUnavailable with the reasons; bad shapes, dtypes or devices raise ValueError.
    Inside torch.autocast the inputs are cast to the autocast dtype first, as F.linear does.
    recompute: Triton backward recomputes the pre-activation instead of storing it (None: the
    BEIT_FAST_LINEAR_GELU_RECOMPUTE default, off); see the module docstring.
    Gradients flow to x, weight and bias, bitwise reproducible within a process (no atomics; the
    autotuned GEMM config, chosen once per shape and process, sets the summation order).
    """
    x, weight, bias = checks.autocast(x, weight, bias)   # as F.linear under autocast
    _check_inputs(x, weight, bias)
    chosen = choose("linear_gelu", backend,
                    lambda b, auto: not_supported_reasons(b, x, weight, bias, auto=auto), PREFERENCE)
    if chosen == "reference":
        return linear_gelu_ref(x, weight, bias)
    if recompute is None:
        recompute = recompute_default()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    K, N = x.shape[-1], weight.shape[0]
    if bias is not None:
        bias = bias.contiguous()       # the kernel reads it with unit stride
    y, _ = _eager.call(_linear_gelu_triton, _LinearGeluFn, x.reshape(math.prod(x.shape[:-1]), K), weight, bias,
                       needs_grad and not recompute)
    return y.view(*x.shape[:-1], N)
