"""layer_scale_residual_norm: BEiT's residual update with LayerScale and DropPath, fused with the LayerNorm that
follows it (the next block's norm1, or this block's norm2).

    s = x + drop_path_scale[:, None, None] * (gamma * y)       the new residual stream
    n = LayerNorm(s; ln_weight, ln_bias, eps)                  the input of the next branch

Backends, fastest first: "cuda" (the extension's CUDA kernel), "cpp" (its C++ CPU kernel, the same per-element
math from csrc/layer_scale_residual_norm.cuh), "reference" (PyTorch). Kernels: csrc/layer_scale_residual_norm{.h,.cuh,.cpp,_cuda.cu}.

The fused forward reads x and y once and writes s and n once (the row stays in registers; two-pass variance);
it saves mean and rstd (fp32) for the backward. The backward reads s, y, and both output gradients once and
writes dx and dy once; the gamma / ln_weight / ln_bias gradients go through per-block fp32 partial sums and a
fixed-order reduction (bitwise reproducible, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks as checks
from . import _eager
from .._backend import choose, common_reasons, extension_op_reasons, register_extension_op

OP = "layer_scale_residual_norm"
PREFERENCE = ("cuda", "cpp", "reference")

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPP_DTYPES = _CUDA_DTYPES + (torch.float64,)


def layer_scale_residual_norm_ref(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor] = None,
                                  drop_path_scale: Optional[torch.Tensor] = None,
                                  ln_weight: Optional[torch.Tensor] = None, ln_bias: Optional[torch.Tensor] = None,
                                  eps: float = 1e-6, *, upcast: bool = False):
    """The unfused PyTorch computation (unilm / timm Block order). upcast=True computes in float64 and returns
    float64 tensors: the oracle for the low-precision error rule."""
    if upcast:
        x, y, gamma, drop_path_scale, ln_weight, ln_bias = (
            None if t is None else t.double() for t in (x, y, gamma, drop_path_scale, ln_weight, ln_bias))
    branch = y if gamma is None else gamma * y
    if drop_path_scale is not None:
        branch = drop_path_scale[:, None, None] * branch
    s = x + branch
    if ln_weight is None:
        return s, None
    return s, F.layer_norm(s, (s.shape[-1],), ln_weight, ln_bias, eps)


def environment_reasons(backend: str, device=None) -> list[str]:
    return extension_op_reasons(OP, backend)


def not_supported_reasons(backend: str, x: torch.Tensor, y: torch.Tensor, gamma=None, drop_path_scale=None,
                          ln_weight=None, ln_bias=None, *, auto: bool = False) -> list[str]:
    """Why `backend` cannot run these inputs (empty list: it can). Malformed inputs (wrong shapes) are not
    reasons: the op itself rejects them with a message naming the shapes."""
    tensors = [t for t in (x, y, gamma, drop_path_scale, ln_weight, ln_bias) if t is not None]
    why = common_reasons(backend, tensors, auto=auto)
    if backend in ("cuda", "cpp") and not why:
        why += environment_reasons(backend)
    if backend in ("cuda", "cpp"):
        allowed = _CUDA_DTYPES if backend == "cuda" else _CPP_DTYPES
        if x.dtype not in allowed:
            why.append(f"x has dtype {x.dtype}; the {backend} kernel supports {[str(d) for d in allowed]}")
        if y.dtype != x.dtype and not (x.dtype == torch.float32 and y.dtype in (torch.float16, torch.bfloat16)):
            why.append(f"y has dtype {y.dtype} and x {x.dtype}: the kernel needs equal dtypes, or x float32 "
                       "with y float16/bfloat16")
        if backend == "cuda" and x.dim() == 3 and x.shape[-1] > _SCALAR_MAX_C:
            # rows over 8192 need the 16-byte vector path: C a multiple of the vector width (and aligned data,
            # which the op makes: _aligned_or_copy)
            C = x.shape[-1]
            vec = 16 // x.element_size()
            if not (C % vec == 0 and C <= 2048 * vec):
                why.append(f"C = {C} exceeds the CUDA kernel's row limit")
    return why


_SCALAR_MAX_C = 8192   # the CUDA kernels' longest row without 16-byte vectors


def _aligned_or_copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """For rows over _SCALAR_MAX_C (the CUDA kernels' vector path only): t itself when it is contiguous from a
    16-byte aligned address, else a contiguous copy (fresh memory is aligned). While torch.compile traces,
    or for a tensor subclass (FakeTensor, AOTAutograd's FunctionalTensor), there is no address to read:
    always the copy."""
    if t is None:
        return None
    if (not torch.compiler.is_compiling() and type(t) in (torch.Tensor, torch.nn.Parameter)
            and t.is_contiguous() and t.data_ptr() % 16 == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _fake_forward(x, y, gamma, drop_path_scale, ln_weight, ln_bias, eps):
    s = x.new_empty(x.shape)
    if ln_weight is None:
        return s, None, None, None
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = x.new_empty(x.shape[:2], dtype=stats_dtype)
    return s, x.new_empty(x.shape), mean, torch.empty_like(mean)


def _fake_backward(grad_sum, grad_norm, sum, y, y_dtype, gamma, drop_path_scale, ln_weight, ln_bias, mean, rstd,
                   output_mask):
    C = sum.shape[-1]
    return (sum.new_empty(sum.shape) if output_mask[0] else None,
            sum.new_empty(sum.shape, dtype=y_dtype) if output_mask[1] else None,
            sum.new_empty((C,), dtype=gamma.dtype) if output_mask[2] else None,
            sum.new_empty((C,), dtype=ln_weight.dtype) if output_mask[3] else None,
            sum.new_empty((C,), dtype=ln_bias.dtype) if output_mask[4] else None)


def _setup_context(ctx, inputs, output):
    x, y, gamma, drop_path_scale, ln_weight, ln_bias, eps = inputs
    s, n, mean, rstd = output
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as a zero tensor
    ctx.y_dtype = y.dtype
    ctx.has = (gamma is not None, drop_path_scale is not None, ln_weight is not None, ln_bias is not None)
    want_gamma = gamma is not None and gamma.requires_grad
    want_scale = drop_path_scale is not None and drop_path_scale.requires_grad
    # y is kept only for the gamma (or drop_path_scale) gradient: the rest needs s, mean and rstd.
    ctx.save_for_backward(s, y if (want_gamma or want_scale) else None, gamma, drop_path_scale, ln_weight, ln_bias,
                          mean, rstd)


def _backward(ctx, grad_sum, grad_norm, _grad_mean, _grad_rstd):
    s, y, gamma, drop_path_scale, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    has_gamma, has_scale, has_ln, has_bias = ctx.has
    if grad_sum is None and grad_norm is None:
        return None, None, None, None, None, None, None
    want_scale = has_scale and need[3]
    if s.shape[-1] > _SCALAR_MAX_C and s.is_cuda:   # long rows take the vector path: aligned gradients
        grad_sum, grad_norm = _aligned_or_copy(grad_sum), _aligned_or_copy(grad_norm)
    mask = [need[0] or want_scale, need[1], has_gamma and need[2], has_ln and need[4], has_bias and need[5]]
    _eager.refuse_double_backward(OP, grad_sum, grad_norm, s, y, gamma, ln_weight, ln_bias)
    dx, dy, dgamma, dw, db = torch.ops.beit_fast.layer_scale_residual_norm_backward(
        grad_sum, grad_norm, s, y, ctx.y_dtype, gamma, drop_path_scale, ln_weight, ln_bias, mean, rstd, mask)
    dscale = None
    if want_scale:  # not a learnable tensor in BEiT; computed unfused for completeness
        acc = torch.promote_types(dx.dtype, torch.float32)   # fp64 inputs keep fp64 (fp32 lost 7 digits)
        branch = y.to(acc) if gamma is None else gamma.to(acc) * y.to(acc)
        dscale = (dx.to(acc) * branch).sum((1, 2)).to(drop_path_scale.dtype)
    return dx if need[0] else None, dy, dgamma, dscale, dw, db, None


register_extension_op(OP, _fake_forward, _fake_backward, _backward, _setup_context)
_Fn = _eager.ExtensionOp("LayerScaleResidualNorm", OP, _setup_context, _backward)


def _check_inputs(x, y, gamma, drop_path_scale, ln_weight, ln_bias, eps):
    """The C++ op's checks (csrc/layer_scale_residual_norm.cpp, prepare_forward), for every backend."""
    op = OP
    x, y = checks.tensor(op, "x", x), checks.tensor(op, "y", y)
    gamma, drop_path_scale = checks.tensor(op, "gamma", gamma, True), checks.tensor(op, "drop_path_scale", drop_path_scale, True)
    ln_weight, ln_bias = checks.tensor(op, "ln_weight", ln_weight, True), checks.tensor(op, "ln_bias", ln_bias, True)
    if x.dim() != 3 or x.shape[2] < 1:
        raise ValueError(f"{op}: x must have shape (B, N, C) with C >= 1, got {tuple(x.shape)}")
    B, _, Cx = x.shape
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    for name, t in (("x", x), ("y", y), ("gamma", gamma), ("drop_path_scale", drop_path_scale),
                    ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        checks.floating(op, name, t)
    for name, t in (("gamma", gamma), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        checks.shape(op, name, t, (Cx,), "(C,)")
    checks.shape(op, "drop_path_scale", drop_path_scale, (B,), "(B,)")
    if ln_bias is not None and ln_weight is None:
        raise ValueError(f"{op}: ln_bias was given without ln_weight")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    checks.one_device(op, "x", x, y=y, gamma=gamma, drop_path_scale=drop_path_scale, ln_weight=ln_weight,
                 ln_bias=ln_bias)


def layer_scale_residual_norm(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor] = None,
                              drop_path_scale: Optional[torch.Tensor] = None,
                              ln_weight: Optional[torch.Tensor] = None, ln_bias: Optional[torch.Tensor] = None,
                              eps: float = 1e-6, *, backend: str = "auto"):
    """Residual update with LayerScale and DropPath, fused with the following LayerNorm.

    Args:
        x: (B, N, C) residual stream; float32, float16, bfloat16 (float64 on the CPU).
        y: (B, N, C) branch output (attention or MLP); x's dtype, or float16/bfloat16 when x is float32 (AMP).
        gamma: (C,) LayerScale, or None (no layer scale). Any float dtype.
        drop_path_scale: (B,) per-sample DropPath factor (0 or 1/keep_prob), or None (no drop path).
        ln_weight, ln_bias: (C,) LayerNorm affine parameters. ln_weight None: no LayerNorm, only the sum is
            returned (the last block before a pooling head). ln_bias may be None (no bias).
        eps: LayerNorm epsilon (BEiT: 1e-6).
        backend: "auto" | "cuda" | "cpp" | "reference" (see beit_fast._backend).

    Returns:
        (s, n): s = x + drop_path_scale[:, None, None] * (gamma * y), shape (B, N, C); n = LayerNorm(s), same
        shape, or None when ln_weight is None. On the fused backends both have x's dtype (the reference follows
        PyTorch type promotion), and n is computed from s as stored.

    Gradients flow to x, y, gamma, ln_weight, ln_bias (and drop_path_scale, unfused, if it requires grad).
    """
    _check_inputs(x, y, gamma, drop_path_scale, ln_weight, ln_bias, eps)
    chosen = choose(OP, backend, lambda b, auto: not_supported_reasons(
        b, x, y, gamma, drop_path_scale, ln_weight, ln_bias, auto=auto), PREFERENCE)
    if chosen == "reference":
        return layer_scale_residual_norm_ref(x, y, gamma, drop_path_scale, ln_weight, ln_bias, eps)
    if chosen == "cuda" and x.shape[-1] > _SCALAR_MAX_C:   # long rows take the vector path: aligned x and y
        x, y = _aligned_or_copy(x), _aligned_or_copy(y)
    s, n, _, _ = _eager.call(torch.ops.beit_fast.layer_scale_residual_norm, _Fn, x, y, gamma, drop_path_scale,
                             ln_weight, ln_bias, float(eps))
    return s, n
