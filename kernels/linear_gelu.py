"""Triton kernels for Linear + bias + exact (erf) GELU, forward and backward.

Forward: one tiled GEMM Z = X W^T (fp32 accumulation) whose epilogue adds the bias and applies
GELU(z) = z * Phi(z), Phi(z) = 0.5 * (1 + erf(z / sqrt 2)); it can also store Z for the backward.

Backward, dZ = dY * GELU'(Z) with GELU'(z) = Phi(z) + z * phi(z), phi(z) = exp(-z^2/2) / sqrt(2 pi):
  store mode     (Z saved by the forward): one elementwise pass `_dgelu_kernel` reads dY and Z, writes dZ
                 and per-program fp32 column sums of dZ (the bias gradient's partials).
  recompute mode (nothing saved): the forward GEMM runs again with BACKWARD=True; its epilogue loads dY,
                 writes dZ and per-32-row fp32 column sums of dZ.
Either way db = partials.sum(0) in a fixed order (no atomics), and dX = dZ W, dW = dZ^T X are cuBLAS
matmuls: bitwise reproducible for a given GEMM config. The autotuner picks that config by timing, once per
shape and process, so two processes may sum in a different order (differences of rounding only).

Launchers take 2-D tensors on a CUDA device, or CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from beit_fast._backend import interpret_mode, tf32_matmul

from ._device import cdiv, int32_addressable, on_device_of_first_arg
from ._launch import launch

_INTERPRET = interpret_mode()   # as Triton reads TRITON_INTERPRET

# Rows per bias-gradient partial in recompute mode; every GEMM config's BLOCK_M is a multiple of it, so
# the partial buffer's shape does not depend on the config the autotuner picks.
DB_CHUNK_M = 32


def _gemm_config(name, bm, bn, bk, warps, stages):
    cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                        num_warps=warps, num_stages=stages)
    cfg.name = name  # for logs / benchmarks; Triton ignores the attribute
    return cfg


# Few, named configs. The big tiles are for BEiT's MLP (M = B*197, K 768/1024, N 3072/4096) in bf16/fp16;
# the 64-row ones for small batches. Under the interpreter one config keeps tests fast (no tuning).
GPU_GEMM_CONFIGS = GEMM_CONFIGS = {
    "m128_n256_k64_w8_s3": _gemm_config("m128_n256_k64_w8_s3", 128, 256, 64, 8, 3),
    "m128_n128_k64_w8_s4": _gemm_config("m128_n128_k64_w8_s4", 128, 128, 64, 8, 4),
    "m128_n128_k32_w4_s4": _gemm_config("m128_n128_k32_w4_s4", 128, 128, 32, 4, 4),
    "m64_n128_k64_w4_s4": _gemm_config("m64_n128_k64_w4_s4", 64, 128, 64, 4, 4),
    "m64_n64_k64_w4_s3": _gemm_config("m64_n64_k64_w4_s3", 64, 64, 64, 4, 3),
}
if _INTERPRET:
    GEMM_CONFIGS = {"interpret_m64_n128_k64": _gemm_config("interpret_m64_n128_k64", 64, 128, 64, 4, 1)}
_INTERPRET_CONFIG = next(iter(GEMM_CONFIGS.values()))


@triton.jit
def _gelu_cdf(z):
    # Phi(z) = 0.5 * (1 + erf(z / sqrt(2))), z in fp32
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    # d/dz [z * Phi(z)] = Phi(z) + z * exp(-z^2 / 2) / sqrt(2 pi)
    return _gelu_cdf(z) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _linear_gelu_kernel(
    x_ptr, w_ptr, b_ptr,           # X (M, K), W (N, K), bias (N,)
    out_ptr,                       # forward: Y (M, N); backward: dZ (M, N)
    z_ptr,                         # forward with STORE_Z: Z (M, N)
    dy_ptr,                        # backward: dY (M, N)
    part_ptr,                      # backward with WITH_DB: fp32 (cdiv(M, DB_CHUNK), N) column sums of dZ
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_om, stride_on, stride_zm, stride_zn, stride_dym, stride_dyn,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, BACKWARD: tl.constexpr, WITH_DB: tl.constexpr,
    DB_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share the W column tiles while they are in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    group_id = pid // pids_per_group
    first_pid_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # W^T tile (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue in two column halves (BLOCK_N / 2 each): GELU's erf/exp temporaries then live for half the
    # tile at a time, which keeps the big tiles free of register spills (tests/test_triton_compile.py).
    acc_a, acc_b = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    offs_h = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    _epilogue(acc_a, offs_m, offs_h, b_ptr, out_ptr, z_ptr, dy_ptr, part_ptr, pid_m, M, N,
              stride_om, stride_on, stride_zm, stride_zn, stride_dym, stride_dyn,
              HAS_BIAS, STORE_Z, BACKWARD, WITH_DB, DB_CHUNK, BLOCK_M)
    _epilogue(acc_b, offs_m, offs_h + BLOCK_N // 2, b_ptr, out_ptr, z_ptr, dy_ptr, part_ptr, pid_m, M, N,
              stride_om, stride_on, stride_zm, stride_zn, stride_dym, stride_dyn,
              HAS_BIAS, STORE_Z, BACKWARD, WITH_DB, DB_CHUNK, BLOCK_M)


@triton.jit
def _epilogue(acc, offs_m, offs_n, b_ptr, out_ptr, z_ptr, dy_ptr, part_ptr, pid_m, M, N,
              stride_om, stride_on, stride_zm, stride_zn, stride_dym, stride_dyn,
              HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, BACKWARD: tl.constexpr, WITH_DB: tl.constexpr,
              DB_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Bias, GELU (or dGELU) and the stores for the columns offs_n of the tile's fp32 accumulator."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if BACKWARD:
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask, other=0.0).to(tl.float32)
        dz = dy * _gelu_grad(acc)  # rows past M have dy = 0, hence dz = 0
        tl.store(out_ptrs, dz.to(out_ptr.dtype.element_ty), mask=mask)
        if WITH_DB:
            chunk_sums = tl.sum(tl.reshape(dz, (BLOCK_M // DB_CHUNK, DB_CHUNK, acc.shape[1])), axis=1)
            chunks = pid_m * (BLOCK_M // DB_CHUNK) + tl.arange(0, BLOCK_M // DB_CHUNK)
            part_ptrs = part_ptr + chunks[:, None] * N + offs_n[None, :]
            tl.store(part_ptrs, chunk_sums,
                     mask=(chunks[:, None] < tl.cdiv(M, DB_CHUNK)) & mask_n[None, :])
    else:
        tl.store(out_ptrs, (acc * _gelu_cdf(acc)).to(out_ptr.dtype.element_ty), mask=mask)
        if STORE_Z:
            tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn,
                     acc.to(z_ptr.dtype.element_ty), mask=mask)


# fp32 without TF32 (DOT_PRECISION "ieee") runs on the FMA units, and the large tiles only spill there (sm_90,
# ptxas: 1.7 KB at 128x256, 384 B at 128x128/k32) and add compiles (8 s and 5 s of the 24 s that all five
# take on the CI machine): the tuner tries the tiles of at most 128x128 with K steps of 64 only.
_IEEE_MAX_TILE = 128 * 128


def prune_gemm_configs(configs, named_args, **kwargs):
    """early_config_prune of the autotuner: the configs worth timing for this launch's dot precision."""
    if kwargs.get("DOT_PRECISION") != "ieee":
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _IEEE_MAX_TILE
             and c.kwargs["BLOCK_K"] == 64]
    return small or configs


if not _INTERPRET:
    # Under the interpreter the one config is passed at launch: no tuner (Triton < 3.4 builds a tuner's
    # benchmarker from the GPU driver when it is created, and the interpreter has none).
    _linear_gelu_kernel = triton.autotune(configs=list(GEMM_CONFIGS.values()),
                                          key=["M", "N", "K", "BACKWARD", "STORE_Z", "DOT_PRECISION"],
                                          prune_configs_by={"early_config_prune": prune_gemm_configs},
                                          )(_linear_gelu_kernel)


@triton.jit
def _dgelu_kernel(
    dy_ptr, z_ptr, dz_ptr, part_ptr,   # dY, Z, dZ (M, N); part fp32 (num_programs(1), N)
    M, N, blocks_per_prog,
    stride_dym, stride_dyn, stride_zm, stride_zn, stride_dzm, stride_dzn,
    WITH_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (n, p) owns columns [n*BLOCK_N, ...) and a contiguous run of row blocks; it sums dZ over
    # its rows in a fixed order and writes one partial row: no atomics.
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_block = pid_p * blocks_per_prog
    last_block = tl.minimum(first_block + blocks_per_prog, tl.cdiv(M, BLOCK_M))
    for mb in range(first_block, last_block):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn,
                    mask=mask, other=0.0).to(tl.float32)
        dz = dy * _gelu_grad(z)
        tl.store(dz_ptr + offs_m[:, None] * stride_dzm + offs_n[None, :] * stride_dzn,
                 dz.to(dz_ptr.dtype.element_ty), mask=mask)
        col_sum += tl.sum(dz, axis=0)
    if WITH_DB:
        tl.store(part_ptr + pid_p * N + offs_n, col_sum, mask=mask_n)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: honour torch's TF32 switch (off by default), so fp32 matches F.linear's accuracy.
    if dtype == torch.float32 and not tf32_matmul():
        return "ieee"
    return "tf32"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: the count only sets how many partial rows there are


def _gemm(x, weight, bias, out, z, dy, part, backward):
    M, K = x.shape
    N = weight.shape[0]
    dummy = out
    z_t = z if z is not None else dummy
    dy_t = dy if dy is not None else dummy
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    launch(_linear_gelu_kernel, grid,
        x, weight, bias if bias is not None else dummy, out, z_t, dy_t,
        part if part is not None else dummy,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), z_t.stride(0), z_t.stride(1), dy_t.stride(0), dy_t.stride(1),
        HAS_BIAS=bias is not None, STORE_Z=z is not None, BACKWARD=backward, WITH_DB=part is not None,
        DB_CHUNK=DB_CHUNK_M, DOT_PRECISION=_dot_precision(x.dtype),
        **(_INTERPRET_CONFIG.kwargs if _INTERPRET else {}),   # block sizes; warps mean nothing there
    )


@on_device_of_first_arg
def linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    save_preact: bool = True):
    """x (M, K), weight (N, K), bias (N,) or None, one dtype (fp16/bf16/fp32).

    Returns (y, z): y = GELU(x W^T + b) (M, N) in x.dtype; z the pre-activation (M, N) in x.dtype when
    save_preact, else None.
    """
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if save_preact else None
    if M > 0 and N > 0:
        _gemm(x, weight, bias, y, z, None, None, backward=False)
    return y, z


_DGELU_BLOCK_M, _DGELU_BLOCK_N, _DGELU_WARPS = 32, 128, 4


@on_device_of_first_arg
def linear_gelu_dz(dy, x, weight, bias, preact=None, with_db=True):
    """dZ = dY * GELU'(Z) (M, N) in x.dtype, and db (N,) fp32 (None unless with_db).

    Z is `preact` when given (store mode), else recomputed from x, weight, bias by the GEMM.
    """
    M, K = x.shape
    N = weight.shape[0]
    dy = int32_addressable(dy)
    dz = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return dz, (torch.zeros(N, device=x.device, dtype=torch.float32) if with_db else None)
    if preact is None:
        part = torch.empty((cdiv(M, DB_CHUNK_M), N), device=x.device, dtype=torch.float32) if with_db else None
        _gemm(x, weight, bias, dz, None, dy, part, backward=True)
    else:
        n_blocks_m = cdiv(M, _DGELU_BLOCK_M)
        n_blocks_n = cdiv(N, _DGELU_BLOCK_N)
        # about 4 programs per SM in all; each walks blocks_per_prog row blocks
        progs_m = max(1, min(n_blocks_m, (4 * _sm_count(x.device)) // n_blocks_n))
        blocks_per_prog = cdiv(n_blocks_m, progs_m)
        progs_m = cdiv(n_blocks_m, blocks_per_prog)
        part = torch.empty((progs_m, N), device=x.device, dtype=torch.float32) if with_db else None
        launch(_dgelu_kernel, (n_blocks_n, progs_m),
            dy, preact, dz, part if part is not None else dz,
            M, N, blocks_per_prog,
            dy.stride(0), dy.stride(1), preact.stride(0), preact.stride(1), dz.stride(0), dz.stride(1),
            WITH_DB=with_db, BLOCK_M=_DGELU_BLOCK_M, BLOCK_N=_DGELU_BLOCK_N, num_warps=_DGELU_WARPS,
        )
    return dz, (part.sum(0) if with_db else None)


@on_device_of_first_arg
def linear_gelu_bwd(dy, x, weight, bias, preact=None, need_dx=True, need_dw=True, need_db=True):
    """Gradients of y = GELU(x W^T + b) for dy (M, N).

    preact: the Z saved by linear_gelu_fwd (store mode) or None (recompute mode).
    Returns (dx (M, K) | None, dw (N, K) | None, db (N,) | None) in the dtypes of x, weight, bias.
    """
    with_db = need_db and bias is not None
    dz, db = linear_gelu_dz(dy, x, weight, bias, preact, with_db)
    dx = dz @ weight if need_dx else None
    dw = dz.t() @ x if need_dw else None
    return dx, dw, (db.to(bias.dtype) if with_db else None)
