"""LayerNorm over the last dimension (BEiT's norm1/norm2/fc_norm, eps 1e-6).

Backends ("triton", "reference"): the Triton row kernels of kernels/layer_norm.py (forward saves fp32
mean/rstd; backward writes dx and per-program fp32 partial sums of dweight/dbias, summed in a fixed
order: deterministic, no atomics), or the PyTorch reference. The Triton path is the custom op
`beit_fast::layer_norm_triton` (+ `beit_fast::layer_norm_triton_bwd`) with fake and autograd
registrations, so torch.compile(fullgraph=True) keeps it in the graph.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from beit_fast._backend import choose, common_reasons, offset_span

from . import _eager

PREFERENCE = ("triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_C = 16384  # kernels.layer_norm.MAX_C (not imported: that module needs triton)


def layer_norm_ref(x, weight=None, bias=None, eps=1e-6, upcast=False):
    """F.layer_norm over the last dim. Computes in fp32 when upcast or when the parameters' dtype differs
    from x's (fp64 stays fp64); returns x.dtype."""
    dtype = x.dtype
    params = [t for t in (weight, bias) if t is not None]
    if upcast or any(t.dtype != dtype for t in params):
        up = torch.float64 if torch.float64 in [dtype] + [t.dtype for t in params] else torch.float32
        x = x.to(up)
        weight = weight.to(up) if weight is not None else None
        bias = bias.to(up) if bias is not None else None
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(dtype)


def _check_inputs(x, weight, bias):
    """Shape/dtype/device errors are the caller's bug, not a backend's limit: ValueError."""
    if not isinstance(x, torch.Tensor):
        raise ValueError("layer_norm: x must be a tensor")
    if x.dim() < 1:
        raise ValueError("layer_norm: x must have shape (..., C), got a 0-d tensor")
    if not x.is_floating_point():
        raise ValueError(f"layer_norm: x must be floating point, got {x.dtype}")
    C = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"layer_norm: {name} must have shape (C,) = ({C},) for x of shape {tuple(x.shape)} "
                             f"or be None, got {got}")
        if t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"layer_norm: {name} must be {x.dtype} (x's dtype) or torch.float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise ValueError(f"layer_norm: weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}")


def not_supported_reasons(backend: str, x, weight=None, bias=None, *, auto: bool = False) -> list[str]:
    """Why `backend` cannot run these inputs (empty: it can). x may be a device (str) for `info`."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    why = common_reasons(backend, tensors, auto=auto)
    if backend == "triton" and isinstance(x, torch.Tensor):
        dtypes = {t.dtype for t in tensors}
        if not dtypes <= set(TRITON_DTYPES):
            why.append(f"the Triton kernel supports {[str(d) for d in TRITON_DTYPES]}, got {sorted(map(str, dtypes))}")
        if x.shape[-1] > MAX_TRITON_C:
            why.append(f"C = {x.shape[-1]} > {MAX_TRITON_C}: the kernel keeps a whole row in registers")
        if max(offset_span(x), x.numel()) >= 2**31:   # y and dx are dense (M, C) even when x overlaps itself
            why.append(f"x spans {offset_span(x)} elements (numel {x.numel()}): the kernel's int32 offsets need "
                       "fewer than 2**31")
    return why


# ---------------------------------------------------------------------------------------------- custom ops

def _kernels():
    from beit_fast.kernels import layer_norm as kernels  # imports triton: only when the op runs
    return kernels


def _layer_norm_impl(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, C), weight/bias (C,)? -> y (M, C) x.dtype, mean (M,) fp32, rstd (M,) fp32."""
    return _kernels().layer_norm_fwd(x, weight, bias, eps)


_layer_norm_triton = torch.library.custom_op("beit_fast::layer_norm_triton", mutates_args=())(_layer_norm_impl)


@_layer_norm_triton.register_fake
def _(x, weight, bias, eps):
    M, C = x.shape
    return x.new_empty((M, C)), x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32)


def _layer_norm_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                         mean: torch.Tensor, rstd: torch.Tensor, param_dtype: torch.dtype,
                         need_dx: bool, need_dw: bool, need_db: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (M, C) x.dtype, dw (C,), db (C,) in param_dtype; a gradient not asked for is (0,)."""
    dx, dw, db = _kernels().layer_norm_bwd(dy, x, weight, mean, rstd, need_dx, need_dw, need_db)
    empty = x.new_empty((0,))
    return (dx if dx is not None else empty,
            dw.to(param_dtype) if dw is not None else empty.clone(),
            db.to(param_dtype) if db is not None else empty.clone())


_layer_norm_triton_bwd = torch.library.custom_op("beit_fast::layer_norm_triton_bwd",
                                                 mutates_args=())(_layer_norm_bwd_impl)


@_layer_norm_triton_bwd.register_fake
def _(dy, x, weight, mean, rstd, param_dtype, need_dx, need_dw, need_db):
    M, C = x.shape
    return (x.new_empty((M, C) if need_dx else (0,)),
            x.new_empty((C,) if need_dw and weight is not None else (0,),
                        dtype=param_dtype if need_dw and weight is not None else x.dtype),
            x.new_empty((C,) if need_db else (0,), dtype=param_dtype if need_db else x.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # mean's and rstd's gradients arrive as None, not as zero tensors
    ctx.save_for_backward(x, weight, mean, rstd)
    param = weight if weight is not None else bias
    ctx.param_dtype = param.dtype if param is not None else x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_dw = need_dw and weight is not None
    need_db = need_db and ctx.has_bias
    dx, dw, db = _eager.call_raw(_layer_norm_bwd_impl, _layer_norm_triton_bwd,
                                 dy, x, weight, mean, rstd, ctx.param_dtype, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None)


_layer_norm_triton.register_autograd(_backward, setup_context=_setup_context)
_LayerNormFn = _eager.AutogradOp("LayerNormTriton", _layer_norm_impl, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------- public op

def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (biased variance).

    x:      (..., C), any leading dims (1 token, 197, 273, ...); fp16, bf16 or fp32 (fp64: reference only)
    weight: (C,) or None; x's dtype or fp32 (mixed precision, apex MixedFusedLayerNorm style)
    bias:   (C,) or None; same dtype as weight
    returns (..., C) in x's dtype; statistics are computed in fp32.

    backend: "auto" (Triton on CUDA tensors, the reference on CPU tensors; BEIT_FAST_BACKEND overrides),
    "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "reference". A forced backend that cannot run
    raises BackendUnavailable with the reasons; bad shapes, dtypes or devices raise ValueError.
    Gradients flow to x, weight and bias; the parameter gradients are deterministic.
    """
    _check_inputs(x, weight, bias)
    if not eps >= 0:   # NaN too: the reference would return NaN, the kernel garbage
        raise ValueError(f"layer_norm: eps must be >= 0, got {eps}")
    chosen = choose("layer_norm", backend,
                    lambda b, auto: not_supported_reasons(b, x, weight, bias, auto=auto), PREFERENCE)
    if chosen == "reference":
        return layer_norm_ref(x, weight, bias, eps)
    C = x.shape[-1]
    weight = weight.contiguous() if weight is not None else None    # the kernel reads them with unit stride
    bias = bias.contiguous() if bias is not None else None
    y, _, _ = _eager.call(_layer_norm_triton, _LayerNormFn, x.reshape(math.prod(x.shape[:-1]), C), weight, bias, float(eps))
    return y.view(x.shape)
