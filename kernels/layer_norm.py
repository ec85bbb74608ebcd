"""Triton LayerNorm over the last dimension, forward and backward.

Forward `_layer_norm_fwd_kernel`: each program normalises BLOCK_M whole rows (BLOCK_C >= C, so a row is
read once), writes y and the per-row fp32 mean and rstd = 1 / sqrt(var + eps) (biased variance).

Backward `_layer_norm_bwd_kernel` (the apex / Liger two-stage pattern): a fixed grid of about
PROGRAMS_PER_SM programs per SM; program p walks a contiguous run of rows, writes dx for them and
accumulates dweight = sum dy*xhat and dbias = sum dy in fp32 registers, then stores one partial row into
(num_programs, C) fp32 buffers.
The launcher sums the partials over dim 0. No atomics: bitwise deterministic for a given device.

    xhat = (x - mean) * rstd,  g = dy * w
    dx   = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))

Launchers take 2-D tensors (rows, C) on a CUDA device, or CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cdiv, int32_addressable, next_power_of_2, on_device_of_first_arg
from ._launch import launch

# A whole row lives in registers; past this the kernels would spill (a looped variant is not written).
MAX_C = 16384


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,   # x, y (M, C); w, b (C,); mean, rstd fp32 (M,)
    M, C, eps,
    stride_xm, stride_xc, stride_ym, stride_yc,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask_m = rows < M
    mask_c = cols < C
    mask = mask_m[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yc, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=mask_m)
    tl.store(rstd_ptr + rows, rstd, mask=mask_m)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr,   # dy, x, dx (M, C); w (C,); mean, rstd (M,)
    dw_part_ptr, db_part_ptr,                          # fp32 (num_programs, C)
    M, C, rows_per_prog,
    stride_dym, stride_dyc, stride_xm, stride_xc, stride_dxm, stride_dxc,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    # per-thread partial sums over the program's rows, reduced across rows once after the loop: a tl.sum over
    # axis 0 inside it would cost a cross-warp reduction (shared memory and barriers) every BLOCK_M rows
    dw_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        mask = mask_m[:, None] & mask_c[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyc, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DX:
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / C
            c2 = tl.sum(g, axis=1) / C
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxc,
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(dw_part_ptr + pid * C + cols, tl.sum(dw_acc, axis=0), mask=mask_c)
    if NEED_DB:
        tl.store(db_part_ptr + pid * C + cols, tl.sum(db_acc, axis=0), mask=mask_c)


def _tile(C: int):
    """(BLOCK_M, BLOCK_C, num_warps): about 4096 elements per program, several rows when C is small."""
    block_c = next_power_of_2(max(C, 1))
    block_m = max(1, min(16, 4096 // block_c))
    num_warps = min(max(block_m * block_c // 512, 1), 8)
    return block_m, block_c, num_warps


# One program per SM leaves 8 warps per SM, each with one 4-row step of loads in flight: too few to stream dy
# and x at full bandwidth (the first GPU run timed this backward at 0.62 ms for BEiT-B's 25216 x 768 rows
# against 0.15 ms for F.layer_norm's, host time included). 4 per SM give 32 warps per SM, for 4x the
# (programs, C) fp32 partials (1.6 MB on an H100); bench/overhead.py separates kernel from host time.
PROGRAMS_PER_SM = 4


def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter


@on_device_of_first_arg
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """x (M, C) fp16/bf16/fp32; weight, bias (C,) or None, in x.dtype or fp32.

    Returns y (M, C) in x.dtype, mean (M,) fp32, rstd (M,) fp32.
    """
    M, C = x.shape
    y = torch.empty((M, C), device=x.device, dtype=x.dtype)
    mean = torch.empty((M,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M == 0 or C == 0:
        return y, mean, rstd
    block_m, block_c, num_warps = _tile(C)
    launch(_layer_norm_fwd_kernel, (cdiv(M, block_m),),
        x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
        M, C, eps, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return y, mean, rstd


@on_device_of_first_arg
def layer_norm_bwd(dy, x, weight, mean, rstd, need_dx=True, need_dw=True, need_db=True):
    """dy, x (M, C); weight (C,) or None; mean, rstd (M,) fp32 from layer_norm_fwd.

    Returns (dx (M, C) in x.dtype | None, dw (C,) fp32 | None, db (C,) fp32 | None); the caller casts dw,
    db to the parameters' dtype. need_dw is ignored when weight is None.
    """
    M, C = x.shape
    dy = int32_addressable(dy)
    need_dw = need_dw and weight is not None
    dx = torch.empty((M, C), device=x.device, dtype=x.dtype) if need_dx else None
    if M == 0 or C == 0:
        zeros = torch.zeros((C,), device=x.device, dtype=torch.float32)
        return dx, (zeros if need_dw else None), (zeros.clone() if need_db else None)
    block_m, block_c, num_warps = _tile(C)
    rows_per_prog = cdiv(M, min(_num_programs(x.device), M))
    rows_per_prog = cdiv(rows_per_prog, block_m) * block_m
    progs = cdiv(M, rows_per_prog)
    dw_part = torch.empty((progs, C), device=x.device, dtype=torch.float32) if need_dw else None
    db_part = torch.empty((progs, C), device=x.device, dtype=torch.float32) if need_db else None
    dummy = mean
    launch(_layer_norm_bwd_kernel, (progs,),
        dy, x, weight if weight is not None else dummy, mean, rstd, dx if dx is not None else dummy,
        dw_part if dw_part is not None else dummy, db_part if db_part is not None else dummy,
        M, C, rows_per_prog,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
        HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dx, (dw_part.sum(0) if need_dw else None), (db_part.sum(0) if need_db else None)
