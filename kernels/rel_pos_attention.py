"""Triton kernels: attention with a relative position bias gathered from a learnable (R, H) table.

Flash-attention-2 structure, non-causal, any N (N = 197 is the common case; the partial last block of each axis
is masked or peeled, see below):
  _fwd_kernel      one program per (Q-block, b*h): online softmax in base 2, saves lse (log2 units).
  _delta_kernel    Delta = rowsum(O * dO), fp32.
  _dkdv_kernel     one program per (K-block, h, batch group g): loops over its batches and all Q blocks,
                   writes dK, dV and owns the fp32 partial dBias_g[h, K-block, :] (stored key-major) with
                   plain read-modify-writes, no atomics: the table gradient is bitwise reproducible.
  _table_grad_kernel  dTable[r, h] = sum_g sum_{(i,j): index[i,j] = r} dBias_g[h, j, i] in a fixed order,
                   through a padded inverse index (CSR: sorted flat positions, start, count).
  _dq_kernel       one program per (Q-block, b*h): loops over all K blocks. It runs last: until then the
                   partials may live in dQ's own memory (_partials_layout), which it then overwrites.

Inner loops (keys in the forward and dQ kernels, queries in dK/dV) run N // BLOCK whole blocks with no mask on
that axis, then, where the tile config peels it (TileConfig.tail), the N % BLOCK remaining tokens in the
smallest power-of-two tile >= 16 that holds them (_tail): BEiT's N = 197 = 3 * 64 + 5 costs 3 * 64 + 16 = 208
columns per row instead of 256. Where the config does not peel (dK/dV, fp32: see CONFIGS), every step of the
inner loop is masked. The programs' own blocks keep their full tile (the MMA's row count; rows past N are
masked on load and store), except
the program of the last N % BLOCK rows of its own axis (queries; dK/dV: keys) where the config asks
(TileConfig.block_tail): a 16- or 32-row tile, on mma.sync (sm_90's wgmma needs 64 rows), for BEiT's 5 last
tokens instead of a 64-row tile.

For BEiT's layout (cls token first, the 3 cls entries last in the table) the bias index is computed from
per-token parts (an (N,) array per window: index = part(query) + centre - part(key)), with no (N, N) index
load; an explicit (N, N) index is loaded when one is given.
q, k, v, o and their gradients are addressed through strides, so the packed (B, N, 3, H, D) qkv layout
and the (B, N, H*D) output are read and written without copies.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from ._device import GRID_YZ_MAX, cdiv, int32_addressable, next_power_of_2, on_device_of_first_arg
from ._launch import launch
from ._settings import KERNELS, dense_bias_setting
from beit_fast.relpos import PerIndexTensor, check_index_range_once

LOG2E = 1.4426950408889634
# where the kernels take the bias from (their BIAS_SRC): BEiT's window layout, gathered through per-token
# parts; an explicit (N, N) index, gathered; a dense (H, N, N_pad) expansion made per call (_expand_bias),
# query-major ([h, i, j]: the forward and dQ kernels, whose tiles run along keys) or key-major ([h, j, i]:
# dK/dV, whose tiles run along queries), so that a tile's rows are contiguous either way.
# The launchers pass the plain ints (Triton 3.2 refuses a tl.constexpr object as an argument: it is callable).
SRC_WINDOW_ID, SRC_INDEX_ID, SRC_DENSE_ID, SRC_DENSE_T_ID = 0, 1, 2, 3
SRC_WINDOW: tl.constexpr = tl.constexpr(SRC_WINDOW_ID)
SRC_INDEX: tl.constexpr = tl.constexpr(SRC_INDEX_ID)
SRC_DENSE: tl.constexpr = tl.constexpr(SRC_DENSE_ID)
SRC_DENSE_T: tl.constexpr = tl.constexpr(SRC_DENSE_T_ID)
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)

# Tests set this to fill outputs with NaN before the kernels write them (catches unwritten elements).
POISON_OUTPUTS = False


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int   # query rows per tile
    block_n: int   # key columns per tile
    num_warps: int = 4
    num_stages: int = 2
    tail: bool = True  # peel the inner loop's last N % block tokens into a smaller tile (_tail); else mask every step
    block_tail: bool = False  # the program holding the last N % block rows of its own axis (queries; dK/dV: keys)
    #                           uses a smaller tile (_block_tail), on mma.sync where it has fewer than 64 rows
    dense_bias: bool = False  # read the bias from a per-call (H, N, N_pad) expansion of the table (_expand_bias)
    #                           instead of gathering each element from the table in the kernel; same values


@dataclasses.dataclass(frozen=True)
class AttnConfigs:
    fwd: TileConfig
    dkdv: TileConfig   # block_m: query step of the inner loop, block_n: the program's key block
    dq: TileConfig     # block_m: the program's query block, block_n: key step of the inner loop


# Few, named configs chosen by padded head dim and dtype (no autotune: the dBias partial layout depends on
# block_n, and a fixed choice keeps the table gradient reproducible across processes). Chosen so that the
# main sm_90 builds (window-derived index, no dropout, fp16/bf16) have no register spills with Triton 3.6 and
# 3.8; the explicit-index + dropout variants spill a little (up to 72 B with Triton 3.8, 192 B with 3.6), and
# with Triton 3.6 so does the fp32 forward at head dim 128 (1 KB; other fp32 tiles spill more there).
# Peeled tails (TileConfig.tail) where they cost no spills on sm_90 with Triton 3.8: the 16-bit forward and
# dQ kernels (their registers stay within a few of the masked loop's); not dK/dV (238 -> 255 registers and
# 92 B of spills at head dim 64) nor fp32 (up to 1.5 KB of spills). Block tails (TileConfig.block_tail: the
# program of the last N % block rows of its own axis runs a 16- or 32-row tile on mma.sync, wgmma needing 64
# rows) for dQ and, at head dim 64, dK/dV: for BEiT's N = 197 the 5 last queries / keys then cost a 16-row
# tile instead of a 64-row one (dK/dV's tail program: 326 SASS instructions per inner step instead of 722).
# No new spills on the BEiT path then; dK/dV at head dim 128 would spill 24 B with 3.6, so it stays off there.
# (2026-11-30, bench/sass_report.py: BEiT-B's bf16 dK/dV has 255 registers and spills 160 B with Triton 3.8,
# 40 B with 3.6, all outside its inner loop, in the per-batch code.) The forward's
# 128-row blocks gain nothing from one at N = 197 (69 rows left).
# tests/test_triton_compile.py reports all of these.
# Tuned once on a GPU (bench/tune_attention.py, H200, Triton 3.6, BEiT-B B=128 bf16, one timing per tile:
# bench/results/h200-gpu_check-2026-11-30): 4 warps beat 8 for the 128x64 forward (0.362 ms against 0.563 ms
# for the former 8-warp default; its four 4-warp variants averaged 0.39 ms, its five 8-warp ones 0.48 ms) and
# for the 32x64 dK/dV (0.772 ms against 1.057 ms, a single timing; the next GPU run re-times it); dQ's best
# was within 1.3% of its default, which stays.
# Bias source (TileConfig.dense_bias): all three kernels read the per-call dense expansion (the forward and
# dQ a query-major one, dK/dV a key-major one, so that each tile's rows are contiguous). Chosen offline from
# their sm_90 SASS (bench/sass_report.py, BEiT-B bf16), not yet from a GPU timing: with Triton 3.6 (the GPU
# image's) the gather makes the forward's inner loop (one 128x64 key block) 1357 instructions, 136 of them
# global loads (4-byte cp.async gathers, one per bias element a thread holds, up to 32 cache lines a warp),
# against 698 instructions and 24 vector loads reading the expansion; dQ's 454 against 266; dK/dV's (one
# 32-query step) 734 against 553, its spills 40 B against 8 (Triton 3.8: forward 967 against 702, dQ 309
# against 267, dK/dV 619 against 475 and 160 B of spills against none; head dim 128 and fp32 shrink too).
# (Reading the query-major expansion, dK/dV's loop grew to 819.) The interpreter config gathers (CI runs
# both sources through the dense-bias tests). bench_attention's providers ours (these), ours_gather and
# ours_dkdv_gather are the A/B; BEIT_FAST_ATTN_DENSE_BIAS overrides per kernel.
# Since dK/dV reads and writes its dBias partial rows whole (padded to 16, _partial_rows), as 16-byte
# vectors, its inner loop is 452 instructions with Triton 3.6 (was 553; 3.8: 382, was 475), spills 8 B
# with 3.6 and 16 B with 3.8, outside that loop.
_NO_TAIL = dict(tail=False)
_DENSE = dict(dense_bias=True)
CONFIGS = {
    "interpret": AttnConfigs(TileConfig(64, 64), TileConfig(64, 64), TileConfig(64, 64)),
    "16bit_d64": AttnConfigs(TileConfig(128, 64, 4, 2, **_DENSE),
                             TileConfig(32, 64, 4, 2, tail=False, block_tail=True, **_DENSE),
                             TileConfig(64, 32, 4, 3, block_tail=True, **_DENSE)),
    "16bit_d128": AttnConfigs(TileConfig(128, 64, 8, 2, **_DENSE), TileConfig(16, 64, 8, 2, **_NO_TAIL, **_DENSE),
                              TileConfig(64, 32, 8, 2, block_tail=True, **_DENSE)),
    "fp32": AttnConfigs(TileConfig(64, 32, 8, 2, **_NO_TAIL, **_DENSE), TileConfig(32, 32, 8, 2, **_NO_TAIL, **_DENSE),
                        TileConfig(32, 32, 8, 2, **_NO_TAIL, **_DENSE)),
}


assert KERNELS == tuple(f.name for f in dataclasses.fields(AttnConfigs))


def _dense_bias_setting(value=None):
    """BEIT_FAST_ATTN_DENSE_BIAS (or `value`) parsed by kernels/_settings.py. An A/B knob: the values, and so
    the results, are bitwise the same either way."""
    return dense_bias_setting(os.environ.get("BEIT_FAST_ATTN_DENSE_BIAS", "") if value is None else value)


DENSE_BIAS = _dense_bias_setting()   # read once at import; bench/bench_attention.py sets it per provider
# The tile configs' dense bias only where one expansion is at most this large (BEiT-B at 224 px: 1.9 MB; BEiT-L
# at 384 px: 22 MB; at 512 px it would be 68 MB, twice in the backward): beyond it the kernels gather, unless
# BEIT_FAST_ATTN_DENSE_BIAS asks for the expansion explicitly.
DENSE_MAX_BYTES = 32 << 20
_DENSE_VARIANTS: dict = {}


def pick_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttnConfigs:
    if device.type == "cpu":
        cfgs = CONFIGS["interpret"]
    elif dtype == torch.float32:
        cfgs = CONFIGS["fp32"]
    else:
        cfgs = CONFIGS["16bit_d64"] if _block_d(head_dim) <= 64 else CONFIGS["16bit_d128"]
    return cfgs if DENSE_BIAS is None else with_dense_bias(cfgs, DENSE_BIAS)


def with_dense_bias(cfgs: AttnConfigs, dense) -> AttnConfigs:
    """`cfgs` with TileConfig.dense_bias set for the kernels named in `dense` (an iterable of KERNELS names)
    and cleared for the others; `dense` True / False: all / none (cached: one object per input)."""
    if isinstance(dense, str):   # "fwd" would be the letters f, w, d
        raise TypeError(f"with_dense_bias: dense must be True, False or names of kernels from {KERNELS} "
                        f"(an iterable), got the string {dense!r}")
    dense = frozenset(KERNELS if dense is True else () if dense is False else dense)
    key = (cfgs, dense)
    if key not in _DENSE_VARIANTS:
        _DENSE_VARIANTS[key] = AttnConfigs(**{k: dataclasses.replace(getattr(cfgs, k), dense_bias=k in dense)
                                              for k in KERNELS})
    return _DENSE_VARIANTS[key]


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _tail(n: int, block: int, peel: bool = True) -> int:
    """Tile of the last step of a kernel's inner loop: the loop runs N // block whole blocks without masks,
    then the N % block remaining tokens in the smallest power of two >= 16 that holds them (0: none). BEiT's
    N = 197 = 3 * 64 + 5 then does 3 * 64 + 16 = 208 columns of work instead of 4 * 64 = 256. 16 is the
    smallest tile an sm_90 wgmma takes as its N or K extent (the tail never sets M, the MMA's row count).
    -1 when not `peel`: the loop masks every step (the tile configs say which kernels peel; see CONFIGS)."""
    if not peel:
        return -1
    rem = n % block
    return 0 if rem == 0 else min(block, max(16, next_power_of_2(rem)))


# ----------------------------------------------------------------------------------------------------------
# device functions
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _token_part(IDX, t, N, add, BIAS_SRC: tl.constexpr):
    """BEiT's layout: the part of the relative-position index that depends on token t alone (IDX is then the
    launcher's (N,) int32 array, see _window_parts), plus `add`; 0 + add past N. Unused (zeros) with an
    explicit index or a dense bias (BIAS_SRC 1, 2)."""
    if BIAS_SRC != SRC_WINDOW:
        part = tl.zeros(t.shape, tl.int32)
    else:
        part = tl.load(IDX + t, mask=t < N, other=0) + add
    return part


@triton.jit
def _bias_tile(TBL, IDX, h, qi, kj, qpart, kpart, N, R, s_tr, s_th, s_ii, s_ij, BIAS_SRC: tl.constexpr):
    """fp32 tile of log2(e) * table[index[i, j], h] (the launchers pass the table pre-scaled, see _BiasArgs).
    qi / kj: query / key indices, one a column and the other a row vector (the tile is (queries, keys) or
    (keys, queries) accordingly); qpart / kpart: their _token_part values (query side with the centre added).
    Outside the N x N square the values are table entries at arbitrary in-range indices (zeros from a dense
    bias): the callers mask those rows and columns (with selects, so even a non-finite entry cannot leak).
    BIAS_SRC: SRC_WINDOW gathers through the window parts, SRC_INDEX through the explicit (N, N) index;
    SRC_DENSE loads the launcher's (H, N, N_pad) expansion of the same values (_expand_bias; TBL is that
    tensor, s_th / s_ii its head / row strides): a plain tile load, no gather; SRC_DENSE_T its key-major
    transpose (s_ij the row stride), for tiles whose contiguous axis is the queries (dK/dV)."""
    if BIAS_SRC == SRC_DENSE:   # columns masked at the padded row length s_ii (a multiple of 16, zeros past
        #                         N): a mask constant over 16 columns lets the load be vectorized
        return tl.load(TBL + h.to(tl.int64) * s_th + qi * s_ii + kj, mask=(qi < N) & (kj < s_ii), other=0.0)
    if BIAS_SRC == SRC_DENSE_T:   # key-major [h, j, i]: rows of s_ij queries (a multiple of 16, zeros past N)
        return tl.load(TBL + h.to(tl.int64) * s_th + kj * s_ij + qi, mask=(kj < N) & (qi < s_ij), other=0.0)
    if BIAS_SRC == SRC_INDEX:
        valid = (qi < N) & (kj < N)
        idx = tl.load(IDX + qi * s_ii + kj * s_ij, mask=valid, other=0).to(tl.int32)
        return tl.load(TBL + h * s_th + idx * s_tr, mask=valid, other=0.0)
    # unilm's index for patch tokens is part(i) + centre - part(j) (see _window_parts), in [0, 2 * centre]
    # also past N, where the parts are 0: the gather needs no mask.
    idx = tl.where(kj == 0, R - 2, qpart - kpart)                  # any query -> cls key
    idx = tl.where(qi == 0, tl.where(kj == 0, R - 1, R - 3), idx)  # cls query -> cls key / any other key
    return tl.load(TBL + h * s_th + idx * s_tr)


@triton.jit
def _dropout_keep(seed, bh, qi, kj, N, dropout_p):
    """Keep-mask of one tile (orientation as in _bias_tile): 32-bit Philox keyed by the whole 64-bit seed,
    the 64-bit counter ((b*H + h) * N + i) * N + j split into its two low counter words by hand (tl.rand
    with an int64 offset does that from Triton 3.4 on; 3.2 and 3.3 run 64-bit Philox then, about 8x the
    instructions). (The head once went into the key's high word: seed s + 2**32 gave seed s's masks one head
    over.)"""
    c = (bh.to(tl.int64) * N + qi) * N + kj
    lo = c.to(tl.uint32)
    zero = lo * 0
    r, _, _, _ = tl.random.philox(seed.to(tl.int64), lo, (c >> 32).to(tl.uint32), zero, zero)
    return tl.random.uint_to_uniform_float(r) >= dropout_p


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _kv_scores(q, K, V, TBL, IDX, h, offs_m, qpart, offs_n, kv_mask, offs_d, s_kn, s_kd, s_vn, s_vd,
               s_tr, s_th, s_ii, s_ij, N, R, qk_scale, BIAS_SRC: tl.constexpr, DOT_PREC: tl.constexpr):
    """k and v of one key block (rows offs_n, loaded under kv_mask) and the (queries, keys) logits in base 2,
    q.k * qk_scale + log2(e) * bias, for the forward and dQ loops."""
    k = tl.load(K + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    kpart = _token_part(IDX, offs_n, N, 0, BIAS_SRC)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s += _bias_tile(TBL, IDX, h, offs_m[:, None], offs_n[None, :], qpart[:, None], kpart[None, :], N, R,
                    s_tr, s_th, s_ii, s_ij, BIAS_SRC)
    return k, v, s


@triton.jit
def _fwd_step(q, K, V, TBL, IDX, seed, bh, h, offs_m, qpart, m_i, l_i, acc, start_n, offs_d, d_ok,
              s_kn, s_kd, s_vn, s_vd, s_tr, s_th, s_ii, s_ij, N, R, qk_scale, dropout_p,
              BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, BIAS_SRC: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """One key block of the online softmax. MASK_N: the block may reach past N (the tail), else every key
    is valid and no key mask is built."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_N:
        kv_mask = (offs_n[:, None] < N) & d_ok
    else:
        kv_mask = d_ok
    k, v, s = _kv_scores(q, K, V, TBL, IDX, h, offs_m, qpart, offs_n, kv_mask, offs_d, s_kn, s_kd, s_vn, s_vd,
                         s_tr, s_th, s_ii, s_ij, N, R, qk_scale, BIAS_SRC, DOT_PREC)
    if MASK_N:
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose keys so far all have a -inf bias (an explicit rel_index masking pairs through a -inf table
    # row; finfo.min too, once scaled by log2(e)) keeps m = -inf: exponentiate against 0 then, not -inf
    # (-inf - -inf is NaN, which spread into the row's output and every gradient).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _bh_index():
    """b*H + h of this program: grid axis 1 plus axis 2 times axis 1's size (_bh_grid)."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)


@triton.jit
def _bh_program(K, V, SEED, H, s_kb, s_kh, s_vb, s_vh, HAS_DROPOUT: tl.constexpr):
    """For a program on grid axes 1 and 2 (b*H + h, see _bh_grid): (b*H + h, b, h, K and V moved to that batch
    and head, the dropout seed (0 without dropout))."""
    bh = _bh_index()
    b = (bh // H).to(tl.int64)
    h = bh % H
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    return bh, b, h, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, seed


@triton.jit
def _fwd_rows(Q, K, V, TBL, IDX, O, LSE, seed, b, h, bh, start_m,
              s_qb, s_qh, s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_ob, s_oh, s_on, s_od, s_tr, s_th, s_ii, s_ij,
              N, R, centre, qk_scale, dropout_p,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              TAIL_N: tl.constexpr, BIAS_SRC: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Output rows [start_m, start_m + BLOCK_M) of one (batch, head); K and V point at that (batch, head)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=(offs_m[:, None] < N) & d_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qpart = _token_part(IDX, offs_m, N, centre, BIAS_SRC)
    if TAIL_N < 0:   # no peeled tail: every key block masked
        for start_n in range(0, N, BLOCK_N):
            m_i, l_i, acc = _fwd_step(q, K, V, TBL, IDX, seed, bh, h, offs_m, qpart, m_i, l_i, acc, start_n, offs_d,
                                      d_ok, s_kn, s_kd, s_vn, s_vd, s_tr, s_th, s_ii, s_ij, N, R, qk_scale, dropout_p,
                                      BLOCK_N, True, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
    n_full = (N // BLOCK_N) * BLOCK_N
    if TAIL_N >= 0:
        for start_n in range(0, n_full, BLOCK_N):    # whole key blocks: no key mask
            m_i, l_i, acc = _fwd_step(q, K, V, TBL, IDX, seed, bh, h, offs_m, qpart, m_i, l_i, acc, start_n, offs_d,
                                      d_ok, s_kn, s_kd, s_vn, s_vd, s_tr, s_th, s_ii, s_ij, N, R, qk_scale, dropout_p,
                                      BLOCK_N, False, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
    if TAIL_N > 0:   # the N % BLOCK_N last keys, in the smallest tile that holds them (see _tail)
        m_i, l_i, acc = _fwd_step(q, K, V, TBL, IDX, seed, bh, h, offs_m, qpart, m_i, l_i, acc, n_full, offs_d,
                                  d_ok, s_kn, s_kd, s_vn, s_vd, s_tr, s_th, s_ii, s_ij, N, R, qk_scale, dropout_p,
                                  TAIL_N, True, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
    acc = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
             acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & d_ok)
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit
def _fwd_kernel(Q, K, V, TBL, IDX, SEED, O, LSE,
                s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                s_ob, s_oh, s_on, s_od, s_tr, s_th, s_ii, s_ij,
                H, N, R, centre, qk_scale, dropout_p,
                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                TAIL_N: tl.constexpr, BLOCK_TAIL: tl.constexpr, BIAS_SRC: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h, K, V, seed = _bh_program(K, V, SEED, H, s_kb, s_kh, s_vb, s_vh, HAS_DROPOUT)
    # (a tile shape is a compile-time constant: one call per shape, none compiled with a BLOCK_TAIL of 0)
    if BLOCK_TAIL > 0:   # the program of the last N % BLOCK_M queries uses a BLOCK_TAIL-row tile (_block_tail)
        if pid_m == N // BLOCK_M:
            _fwd_rows(Q, K, V, TBL, IDX, O, LSE, seed, b, h, bh, pid_m * BLOCK_M,
                      s_qb, s_qh, s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_ob, s_oh, s_on, s_od, s_tr, s_th, s_ii, s_ij,
                      N, R, centre, qk_scale, dropout_p,
                      HEAD_D, BLOCK_D, BLOCK_TAIL, BLOCK_N, TAIL_N, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
        else:
            _fwd_rows(Q, K, V, TBL, IDX, O, LSE, seed, b, h, bh, pid_m * BLOCK_M,
                      s_qb, s_qh, s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_ob, s_oh, s_on, s_od, s_tr, s_th, s_ii, s_ij,
                      N, R, centre, qk_scale, dropout_p,
                      HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, TAIL_N, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
    else:
        _fwd_rows(Q, K, V, TBL, IDX, O, LSE, seed, b, h, bh, pid_m * BLOCK_M,
                  s_qb, s_qh, s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_ob, s_oh, s_on, s_od, s_tr, s_th, s_ii, s_ij,
                  N, R, centre, qk_scale, dropout_p,
                  HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, TAIL_N, BIAS_SRC, HAS_DROPOUT, DOT_PREC)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _delta_kernel(O, DO, DELTA, s_ob, s_oh, s_on, s_od, s_gb, s_gh, s_gn, s_gd, H, N,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = _bh_index()
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_D)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _partial_rows(DB, rows, part_rows, part_pitch, part_stride):
    """Pointers to the starts of dBias partial rows `rows` (int32; row (g*H + h)*N + key j holds queries
    0..N-1): part_rows rows part_pitch fp32 apart in each chunk, chunks part_stride fp32 apart
    (PartialsLayout; part_rows is 1, which Triton specializes, except in the packed layout's chunks).
    The pitch and stride are multiples of 16 where they can be: 16-byte aligned rows, vector accesses."""
    return DB + (rows // part_rows).to(tl.int64) * part_stride + (rows % part_rows) * part_pitch


@triton.jit
def _dkdv_step(k, v, Q, DO, LSE, DELTA, TBL, IDX, DB_ROWS, seed, b, b32, g, bh, h, offs_n, n_ok, kpart, dk, dv, start_m,
               offs_d, d_ok, s_qb, s_qh, s_qn, s_qd, s_gb, s_gh, s_gn, s_gd, s_tr, s_th, s_ii, s_ij,
               N, R, centre, qk_scale, dropout_p, part_pitch,
               BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, BIAS_SRC: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               NEED_DBIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """One query block of the dK/dV loop (and the program's dBias tile for it). Transposed tiles (keys x
    queries): p^T and dS^T come out of the MMA in the layout the dK/dV products consume, and the dBias
    partial (stored key-major) is written along contiguous queries. MASK_M: the block may reach past N.
    DB_ROWS: per key of the block, the start of its partial row (_partial_rows), part_pitch fp32 long."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASK_M:
        m_ok = offs_m < N
        row_mask = m_ok[:, None] & d_ok
        valid = m_ok[None, :] & n_ok[:, None]
    else:
        row_mask = d_ok
        valid = n_ok[:, None]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd, mask=row_mask, other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd, mask=row_mask, other=0.0)
    if MASK_M:
        lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m)
        delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m)
    qpart = _token_part(IDX, offs_m, N, centre, BIAS_SRC)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    st += _bias_tile(TBL, IDX, h, offs_m[None, :], offs_n[:, None], qpart[None, :], kpart[:, None], N, R,
                     s_tr, s_th, s_ii, s_ij, BIAS_SRC)
    pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], N, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        pt_drop = tl.where(keep, pt * inv_keep, 0.0)
        dpt = tl.where(keep, dpt * inv_keep, 0.0)
    else:
        pt_drop = pt
    dv += tl.dot(pt_drop.to(do.dtype), do, input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])   # gradient w.r.t. the natural-unit logits scale*q.k + bias
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    if NEED_DBIAS:
        # The whole padded row, not only queries < N: the mask is then constant over 16 queries and the
        # accesses are vectors. dst is 0 past N (pt is); the reduction reads queries < N only.
        db_ptr = DB_ROWS[:, None] + offs_m[None, :]
        row_ok = n_ok[:, None] & (offs_m < part_pitch)[None, :]
        prev = tl.load(db_ptr, mask=row_ok & (b32 != g), other=0.0)
        tl.store(db_ptr, prev + dst, mask=row_ok)
    return dk, dv


@triton.jit
def _dkdv_keys(Q, K, V, TBL, IDX, DO, LSE, DELTA, DK, DV, DB, seed, h, g, start_n,
               s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
               s_gb, s_gh, s_gn, s_gd, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
               s_tr, s_th, s_ii, s_ij, B, H, N, R, centre, G, part_rows, part_pitch, part_stride, sm_scale,
               qk_scale, dropout_p, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, BIAS_SRC: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               NEED_DBIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV of keys [start_n, start_n + BLOCK_N) for the batches of group g, and their dBias tiles."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # this program owns dBias_g[h, K-block, :] (stored key-major): the group's first batch writes, later ones add
    DB_ROWS = _partial_rows(DB, (g * H + h) * N + offs_n, part_rows, part_pitch, part_stride)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    n_ok = offs_n < N
    kv_mask = n_ok[:, None] & d_ok
    kpart = _token_part(IDX, offs_n, N, 0, BIAS_SRC)
    m_full = (N // BLOCK_M) * BLOCK_M
    for b32 in range(g, B, G):
        b = tl.cast(b32, tl.int64)
        bh = b32 * H + h
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if TAIL_M < 0:   # no peeled tail: every query block masked
            for start_m in range(0, N, BLOCK_M):
                dk, dv = _dkdv_step(k, v, Q, DO, LSE, DELTA, TBL, IDX, DB_ROWS, seed, b, b32, g, bh, h, offs_n, n_ok,
                                    kpart, dk, dv, start_m, offs_d, d_ok, s_qb, s_qh, s_qn, s_qd, s_gb, s_gh, s_gn,
                                    s_gd, s_tr, s_th, s_ii, s_ij, N, R, centre, qk_scale, dropout_p, part_pitch,
                                    BLOCK_M, True, BIAS_SRC, HAS_DROPOUT, NEED_DBIAS, DOT_PREC)
        else:
            for start_m in range(0, m_full, BLOCK_M):    # whole query blocks: no query mask
                dk, dv = _dkdv_step(k, v, Q, DO, LSE, DELTA, TBL, IDX, DB_ROWS, seed, b, b32, g, bh, h, offs_n, n_ok,
                                    kpart, dk, dv, start_m, offs_d, d_ok, s_qb, s_qh, s_qn, s_qd, s_gb, s_gh, s_gn,
                                    s_gd, s_tr, s_th, s_ii, s_ij, N, R, centre, qk_scale, dropout_p, part_pitch,
                                    BLOCK_M, False, BIAS_SRC, HAS_DROPOUT, NEED_DBIAS, DOT_PREC)
        if TAIL_M > 0:   # the N % BLOCK_M last queries, in the smallest tile that holds them (see _tail)
            dk, dv = _dkdv_step(k, v, Q, DO, LSE, DELTA, TBL, IDX, DB_ROWS, seed, b, b32, g, bh, h, offs_n, n_ok, kpart,
                                dk, dv, m_full, offs_d, d_ok, s_qb, s_qh, s_qn, s_qd, s_gb, s_gh, s_gn, s_gd,
                                s_tr, s_th, s_ii, s_ij, N, R, centre, qk_scale, dropout_p, part_pitch,
                                TAIL_M, True, BIAS_SRC, HAS_DROPOUT, NEED_DBIAS, DOT_PREC)
        if NEED_DBIAS:
            # the next batch reads this program's dBias tiles back with another thread layout: make the
            # stores visible to the whole CTA first (one barrier per batch)
            tl.debug_barrier()
        tl.store(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dkdv_kernel(Q, K, V, TBL, IDX, SEED, DO, LSE, DELTA, DK, DV, DB,
                 s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                 s_gb, s_gh, s_gn, s_gd, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
                 s_tr, s_th, s_ii, s_ij,
                 B, H, N, R, centre, G, part_rows, part_pitch, part_stride, sm_scale, qk_scale, dropout_p,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 TAIL_M: tl.constexpr, BLOCK_TAIL: tl.constexpr, BIAS_SRC: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, NEED_DBIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    # (a tile shape is a compile-time constant: one call per shape, none compiled with a BLOCK_TAIL of 0)
    if BLOCK_TAIL > 0:   # the program of the last N % BLOCK_N keys uses a BLOCK_TAIL-row tile (_block_tail)
        if pid_n == N // BLOCK_N:
            _dkdv_keys(Q, K, V, TBL, IDX, DO, LSE, DELTA, DK, DV, DB, seed, h, g, pid_n * BLOCK_N,
                       s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                       s_gb, s_gh, s_gn, s_gd, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
                       s_tr, s_th, s_ii, s_ij, B, H, N, R, centre, G, part_rows, part_pitch, part_stride, sm_scale,
                       qk_scale, dropout_p, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_TAIL, TAIL_M, BIAS_SRC, HAS_DROPOUT,
                       NEED_DBIAS, DOT_PREC)
        else:
            _dkdv_keys(Q, K, V, TBL, IDX, DO, LSE, DELTA, DK, DV, DB, seed, h, g, pid_n * BLOCK_N,
                       s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                       s_gb, s_gh, s_gn, s_gd, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
                       s_tr, s_th, s_ii, s_ij, B, H, N, R, centre, G, part_rows, part_pitch, part_stride, sm_scale,
                       qk_scale, dropout_p, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, TAIL_M, BIAS_SRC, HAS_DROPOUT,
                       NEED_DBIAS, DOT_PREC)
    else:
        _dkdv_keys(Q, K, V, TBL, IDX, DO, LSE, DELTA, DK, DV, DB, seed, h, g, pid_n * BLOCK_N,
                   s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                   s_gb, s_gh, s_gn, s_gd, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
                   s_tr, s_th, s_ii, s_ij, B, H, N, R, centre, G, part_rows, part_pitch, part_stride, sm_scale,
                   qk_scale, dropout_p, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, TAIL_M, BIAS_SRC, HAS_DROPOUT,
                   NEED_DBIAS, DOT_PREC)


@triton.jit
def _dq_step(q, do, lse, delta, K, V, TBL, IDX, seed, bh, h, offs_m, m_ok, qpart, dq, start_n, offs_d, d_ok,
             s_kn, s_kd, s_vn, s_vd, s_tr, s_th, s_ii, s_ij, N, R, qk_scale, dropout_p,
             BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, BIAS_SRC: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """One key block of the dQ loop. MASK_N: the block may reach past N (the tail)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_N:
        kv_mask = (offs_n[:, None] < N) & d_ok
        valid = m_ok[:, None] & (offs_n[None, :] < N)
    else:
        kv_mask = d_ok
        valid = m_ok[:, None]
    k, v, s = _kv_scores(q, K, V, TBL, IDX, h, offs_m, qpart, offs_n, kv_mask, offs_d, s_kn, s_kd, s_vn, s_vd,
                         s_tr, s_th, s_ii, s_ij, N, R, qk_scale, BIAS_SRC, DOT_PREC)
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_rows(Q, K, V, TBL, IDX, DO, LSE, DELTA, DQ, seed, b, h, bh, start_m,
             s_qb, s_qh, s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gb, s_gh, s_gn, s_gd, s_dqb, s_dqh, s_dqn, s_dqd,
             s_tr, s_th, s_ii, s_ij, N, R, centre, sm_scale, qk_scale, dropout_p,
             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             TAIL_N: tl.constexpr, BIAS_SRC: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ rows [start_m, start_m + BLOCK_M) of one (batch, head); K and V point at that (batch, head)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    m_ok = offs_m < N
    row_mask = m_ok[:, None] & d_ok
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd, mask=row_mask, other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd, mask=row_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qpart = _token_part(IDX, offs_m, N, centre, BIAS_SRC)
    n_full = (N // BLOCK_N) * BLOCK_N
    if TAIL_N < 0:   # no peeled tail: every key block masked
        for start_n in range(0, N, BLOCK_N):
            dq = _dq_step(q, do, lse, delta, K, V, TBL, IDX, seed, bh, h, offs_m, m_ok, qpart, dq, start_n, offs_d,
                          d_ok, s_kn, s_kd, s_vn, s_vd, s_tr, s_th, s_ii, s_ij, N, R, qk_scale, dropout_p,
                          BLOCK_N, True, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
    else:
        for start_n in range(0, n_full, BLOCK_N):    # whole key blocks: no key mask
            dq = _dq_step(q, do, lse, delta, K, V, TBL, IDX, seed, bh, h, offs_m, m_ok, qpart, dq, start_n, offs_d,
                          d_ok, s_kn, s_kd, s_vn, s_vd, s_tr, s_th, s_ii, s_ij, N, R, qk_scale, dropout_p,
                          BLOCK_N, False, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
    if TAIL_N > 0:   # the N % BLOCK_N last keys, in the smallest tile that holds them (see _tail)
        dq = _dq_step(q, do, lse, delta, K, V, TBL, IDX, seed, bh, h, offs_m, m_ok, qpart, dq, n_full, offs_d,
                      d_ok, s_kn, s_kd, s_vn, s_vd, s_tr, s_th, s_ii, s_ij, N, R, qk_scale, dropout_p,
                      TAIL_N, True, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqn + offs_d[None, :] * s_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _dq_kernel(Q, K, V, TBL, IDX, SEED, DO, LSE, DELTA, DQ,
               s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
               s_gb, s_gh, s_gn, s_gd, s_dqb, s_dqh, s_dqn, s_dqd, s_tr, s_th, s_ii, s_ij,
               H, N, R, centre, sm_scale, qk_scale, dropout_p,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               TAIL_N: tl.constexpr, BLOCK_TAIL: tl.constexpr, BIAS_SRC: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h, K, V, seed = _bh_program(K, V, SEED, H, s_kb, s_kh, s_vb, s_vh, HAS_DROPOUT)
    # (a tile shape is a compile-time constant: one call per shape, none compiled with a BLOCK_TAIL of 0)
    if BLOCK_TAIL > 0:   # the program of the last N % BLOCK_M queries uses a BLOCK_TAIL-row tile (_block_tail)
        if pid_m == N // BLOCK_M:
            _dq_rows(Q, K, V, TBL, IDX, DO, LSE, DELTA, DQ, seed, b, h, bh, pid_m * BLOCK_M,
                     s_qb, s_qh, s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gb, s_gh, s_gn, s_gd, s_dqb, s_dqh, s_dqn, s_dqd,
                     s_tr, s_th, s_ii, s_ij, N, R, centre, sm_scale, qk_scale, dropout_p,
                     HEAD_D, BLOCK_D, BLOCK_TAIL, BLOCK_N, TAIL_N, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
        else:
            _dq_rows(Q, K, V, TBL, IDX, DO, LSE, DELTA, DQ, seed, b, h, bh, pid_m * BLOCK_M,
                     s_qb, s_qh, s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gb, s_gh, s_gn, s_gd, s_dqb, s_dqh, s_dqn, s_dqd,
                     s_tr, s_th, s_ii, s_ij, N, R, centre, sm_scale, qk_scale, dropout_p,
                     HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, TAIL_N, BIAS_SRC, HAS_DROPOUT, DOT_PREC)
    else:
        _dq_rows(Q, K, V, TBL, IDX, DO, LSE, DELTA, DQ, seed, b, h, bh, pid_m * BLOCK_M,
                 s_qb, s_qh, s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gb, s_gh, s_gn, s_gd, s_dqb, s_dqh, s_dqn, s_dqd,
                 s_tr, s_th, s_ii, s_ij, N, R, centre, sm_scale, qk_scale, dropout_p,
                 HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, TAIL_N, BIAS_SRC, HAS_DROPOUT, DOT_PREC)


@triton.jit
def _table_grad_kernel(DB, PERM, START, COUNT, DT, G, H, N, R, MAX_COUNT, part_rows, part_pitch, part_stride,
                       s_dtr, s_dth, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    h = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    start = tl.load(START + offs_r, mask=r_ok, other=0)
    count = tl.load(COUNT + offs_r, mask=r_ok, other=0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for c0 in range(0, MAX_COUNT, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = offs_c[None, :] < count[:, None]
        flat = tl.load(PERM + start[:, None] + offs_c[None, :], mask=m, other=0)   # j * N + i (int32)
        key = flat // N
        query = flat - key * N
        for g in range(0, G):
            rows = _partial_rows(DB, (g * H + h) * N + key, part_rows, part_pitch, part_stride)
            acc += tl.load(rows + query, mask=m, other=0.0)
    tl.store(DT + offs_r * s_dtr + h * s_dth, tl.sum(acc, 1), mask=r_ok)


@triton.jit
def _keep_mask_kernel(SEED, OUT, H, N, dropout_p, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = _bh_index()
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(SEED)
    for start_n in range(0, N, BLOCK):
        offs_n = start_n + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], N, dropout_p)
        tl.store(OUT + bh.to(tl.int64) * N * N + offs_m[:, None] * N + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m[:, None] < N) & (offs_n[None, :] < N))


@triton.jit
def _expand_bias_kernel(TBL, IDX, OUT, OUT_T, N, R, centre, s_tr, s_th, s_ii, s_ij, s_oh, s_oi,
                        BIAS_SRC: tl.constexpr, QUERY_MAJOR: tl.constexpr, KEY_MAJOR: tl.constexpr,
                        BLOCK: tl.constexpr):
    """OUT[h, i, j] (QUERY_MAJOR) and / or OUT_T[h, j, i] (KEY_MAJOR) = log2(e) * bias[h, i, j] for i, j < N,
    rows padded to s_oi elements with zeros (both outputs have the same strides). Program axis 0 walks
    queries, axis 1 keys (up to N or the padded s_oi: see _expand_bias)."""
    qi = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    kj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(2)
    qpart = _token_part(IDX, qi, N, centre, BIAS_SRC)
    kpart = _token_part(IDX, kj, N, 0, BIAS_SRC)
    vals = _bias_tile(TBL, IDX, h, qi[:, None], kj[None, :], qpart[:, None], kpart[None, :], N, R,
                      s_tr, s_th, s_ii, s_ij, BIAS_SRC).to(tl.float32) * LOG2E_C
    if QUERY_MAJOR:   # rows of queries, zeros in the padding columns
        tl.store(OUT + h.to(tl.int64) * s_oh + qi[:, None] * s_oi + kj[None, :], tl.where(kj[None, :] < N, vals, 0.0),
                 mask=(qi[:, None] < N) & (kj[None, :] < s_oi))
    if KEY_MAJOR:     # rows of keys, padded along the queries
        tl.store(OUT_T + h.to(tl.int64) * s_oh + kj[None, :] * s_oi + qi[:, None], tl.where(qi[:, None] < N, vals, 0.0),
                 mask=(kj[None, :] < N) & (qi[:, None] < s_oi))


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

def _alloc(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


_PARTS_CACHE: dict = {}


def _window_parts(wh: int, ww: int, device: torch.device) -> torch.Tensor:
    """(N,) int32, N = wh*ww + 1: for patch token t >= 1 at grid position p = t - 1 (row-major over wh x ww),
    part(t) = (p // ww) * (2 ww - 1) + p % ww; 0 for the cls token (t = 0). unilm's index of (query i, key j)
    for patch tokens, (p_i // ww - p_j // ww + wh - 1) * (2 ww - 1) + (p_i % ww - p_j % ww + ww - 1), is then
    part(i) + centre - part(j) with centre = (wh - 1) * (2 ww - 1) + ww - 1: the kernels gather through one
    subtraction per element and divide nothing. Built once per window and device, on the device (no
    host-to-device copy), and cached once written: a build on one stream is waited for before any other
    stream can read the cached tensor. A build under CUDA graph capture is not cached: its kernels run only
    when the graph replays (the tensor is written before the graph's own kernels read it, on each replay)."""
    key = (wh, ww, str(device))
    parts = _PARTS_CACHE.get(key)
    if parts is not None:
        return parts
    p = torch.arange(-1, wh * ww, dtype=torch.int32, device=device).clamp_(min=0)
    parts = ((p // ww) * (2 * ww - 1) + p % ww).contiguous()
    if parts.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return parts
        torch.cuda.current_stream(parts.device).synchronize()
    _PARTS_CACHE[key] = parts
    return parts


class _BiasArgs:
    """What the kernels need to find the bias: R, centre and, per kernel (for_kernel), its TBL, IDX, strides and
    BIAS_SRC.
    Gathering kernels get the table as a contiguous fp32 (H, R) copy scaled by log2(e): one head's row is
    contiguous, so the gather of neighbouring keys (neighbouring table rows) hits one or two cache lines
    instead of ~H, and the kernels, which work in base 2, add the gathered values without a multiply. Kernels
    whose tile config says dense_bias get the (H, N, N_pad) expansion of the same fp32 values instead
    (_expand_bias): query-major, or key-major for dK/dV (key_major). Each form is built once per launcher call,
    when a kernel asks for it."""

    def __init__(self, table, rel_index, window_size, N):
        self.table, self.N, self.R = table, N, table.shape[0]
        if rel_index is not None:
            self.idx, self.s_ii, self.s_ij, self.centre, self.src = (
                rel_index, rel_index.stride(0), rel_index.stride(1), 0, SRC_INDEX_ID)
        else:
            wh, ww = window_size
            self.idx, self.s_ii, self.s_ij, self.src = _window_parts(wh, ww, table.device), 0, 0, SRC_WINDOW_ID
            self.centre = (wh - 1) * (2 * ww - 1) + ww - 1
        self._gather = self._dense = self._dense_t = None
        # whether a tile config's dense_bias is honoured (see DENSE_MAX_BYTES)
        self.dense_ok = DENSE_BIAS is not None or table.shape[1] * N * _padded_row(N) * 4 <= DENSE_MAX_BYTES

    def expand(self, query_major: bool, key_major: bool) -> None:
        """Build the dense expansions asked for that are not built yet, both in one launch (_expand_bias)."""
        want_q = self.dense_ok and query_major and self._dense is None
        want_k = self.dense_ok and key_major and self._dense_t is None
        if want_q or want_k:
            q, k = _expand_bias(self, query_major=want_q, key_major=want_k)
            self._dense = q if q is not None else self._dense
            self._dense_t = k if k is not None else self._dense_t

    def for_kernel(self, cfg: TileConfig, key_major: bool = False) -> tuple:
        """(TBL, IDX, s_tr, s_th, s_ii, s_ij, BIAS_SRC) for a kernel launched with tile config `cfg`; key_major:
        the kernel's tiles run along queries (dK/dV), so its dense expansion is the key-major one."""
        if cfg.dense_bias and self.dense_ok and key_major:
            self.expand(False, True)
            d = self._dense_t
            return d, self.idx, 0, d.stride(0), 1, d.stride(1), SRC_DENSE_T_ID
        if cfg.dense_bias and self.dense_ok:
            self.expand(True, False)
            d = self._dense
            return d, self.idx, 0, d.stride(0), d.stride(1), 1, SRC_DENSE_ID
        if self._gather is None:
            t = self.table
            table_hr = torch.empty((t.shape[1], t.shape[0]), dtype=torch.float32, device=t.device)
            torch.mul(t.t().to(torch.float32), LOG2E, out=table_hr)   # one kernel for an fp32 table
            self._gather = table_hr
        t = self._gather
        return t, self.idx, t.stride(1), t.stride(0), self.s_ii, self.s_ij, self.src


def _padded_row(N: int) -> int:
    """Row length of the dense expansions and pitch of the dBias partials' rows: N rounded up to 16 fp32, so
    that rows start 64-byte aligned and Triton, which marks integer arguments divisible by 16, can prove it
    (vector loads and stores along the rows)."""
    return cdiv(N, 16) * 16


def _expand_bias(b: _BiasArgs, query_major: bool = True, key_major: bool = False) -> tuple:
    """(query-major, key-major) expansions, each (H, N, N_pad) fp32 or None when not asked for: [h, i, j] =
    log2(e) * table[index[i, j], h] for i, j < N (the values the gathering kernels add, bitwise) and 0 for
    N <= j < N_pad, rows padded to N_pad = a multiple of 16 elements (aligned vector loads); the key-major one
    its transpose, [h, j, i], padded along i. One launch over the table as the model stores it."""
    table, N = b.table, b.N
    H = table.shape[1]
    n_pad = _padded_row(N)
    out = _alloc((H, N, n_pad), torch.float32, table.device) if query_major else None
    out_t = _alloc((H, N, n_pad), torch.float32, table.device) if key_major else None
    ref = out if out is not None else out_t
    BLOCK = 32
    grid = (cdiv(n_pad if key_major else N, BLOCK), cdiv(n_pad if query_major else N, BLOCK), H)
    launch(_expand_bias_kernel, grid,
        table, b.idx, ref if out is None else out, ref if out_t is None else out_t, N, b.R, b.centre,
        table.stride(0), table.stride(1), b.s_ii, b.s_ij, ref.stride(0), ref.stride(1),
        BIAS_SRC=b.src, QUERY_MAJOR=query_major, KEY_MAJOR=key_major, BLOCK=BLOCK)
    return out, out_t


def _block_tail(n: int, block: int, on: bool) -> int:
    """Rows of the program that holds the last N % block rows of its own axis (queries in the forward and dQ
    kernels, keys in dK/dV) when `on` and a smaller power-of-two tile holds them (0: a full block)."""
    t = _tail(n, block, on)
    return t if 0 < t < block else 0


def _seed_arg(seed, table):
    return seed if seed is not None else table   # never read when dropout is off


@on_device_of_first_arg
def rel_pos_attention_fwd(q, k, v, table, rel_index, window_size, scale, dropout_p, seed, out):
    """q, k, v: (B, H, N, D) views with any strides; out: (B, H, N, D) view to write (any strides).
    Returns lse (B, H, N) fp32 in log2 units of the scaled logits."""
    B, H, N, D = q.shape
    cfg = pick_configs(D, q.dtype, q.device).fwd
    lse = _alloc((B, H, N), torch.float32, q.device)
    if rel_index is not None:
        check_index_range_once(rel_index, table.shape[0])
    bias = _BiasArgs(table, rel_index, window_size, N)
    tbl, idx, s_tr, s_th, s_ii, s_ij, src = bias.for_kernel(cfg)
    grid = (cdiv(N, cfg.block_m),) + _bh_grid(B, H)
    launch(_fwd_kernel, grid,
        q, k, v, tbl, idx, _seed_arg(seed, tbl), out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), s_tr, s_th, s_ii, s_ij,
        H, N, bias.R, bias.centre, scale * LOG2E, float(dropout_p),
        HEAD_D=D, BLOCK_D=_block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        TAIL_N=_tail(N, cfg.block_n, cfg.tail), BLOCK_TAIL=_block_tail(N, cfg.block_m, cfg.block_tail),
        BIAS_SRC=src, HAS_DROPOUT=dropout_p > 0, DOT_PREC=_dot_prec(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return lse


def _bh_grid(B: int, H: int) -> tuple:
    """Grid axes 1 and 2 for B*H (batch, head) programs: (B*H, 1) while that fits axis 1, else (d*H, B/d)
    with d the largest divisor of B that keeps d*H within the limit (exact: no idle programs). B and H up
    to GRID_YZ_MAX each (the op's reasons refuse more)."""
    if B * H <= GRID_YZ_MAX:
        return (B * H, 1)
    d = max(x for x in range(1, max(GRID_YZ_MAX // H, 1) + 1) if B % x == 0)
    return (d * H, B // d)


def num_batch_groups(B: int, H: int, N: int, device: torch.device) -> int:
    """G, the number of fp32 dBias partials (G, H, N, N) wanted: about 4 (K-block, h, g) programs per SM, at
    most B, at most 64 MiB of partials (at least one). A function of shape and device only, so reproducible
    (_partials_layout may take fewer to fit them into dQ's memory)."""
    if device.type != "cuda":
        return min(B, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = cdiv(4 * sms, H * cdiv(N, 64))
    cap = max(1, (64 << 20) // (H * N * N * 4))
    return max(1, min(B, want, cap))


@dataclasses.dataclass(frozen=True)
class PartialsLayout:
    """Where the G fp32 dBias partials live: row (g*H + h)*N + j (key j) holds queries 0..N-1;
    `rows_per_chunk` rows `row_pitch` fp32 apart in each chunk, chunks `chunk_stride` fp32 apart from `buf`'s
    first element (_partial_rows)."""
    buf: torch.Tensor
    G: int
    rows_per_chunk: int
    row_pitch: int
    chunk_stride: int
    in_dq: bool

    def args(self) -> tuple:
        return self.G, self.rows_per_chunk, self.row_pitch, self.chunk_stride


def _dq_as_chunks(dq: torch.Tensor, N: int):
    """dQ's memory as fp32 chunks, (fp32 view, fp32 per chunk, chunk stride in fp32, chunks), or None: a
    contiguous dQ in chunks of one row pitch, or for dQ in the packed (B, N, 3, H, D) layout (or any with
    each token's H*D values contiguous and tokens equally spaced) one chunk per token."""
    B, H, _, D = dq.shape
    size = dq.element_size()
    if dq.numel() == 0 or dq.data_ptr() % 16 or (dq.numel() * size) % 4:
        return None
    if dq.is_contiguous():   # chunks of one row each
        flat, pitch = dq.view(-1).view(torch.float32), _padded_row(N)
        return flat, pitch, pitch, flat.numel() // pitch
    s_b, s_h, s_n, s_d = dq.stride()
    if s_d == 1 and s_h == D and s_b == N * s_n and s_n >= H * D and (D * size) % 4 == 0 and (s_n * size) % 4 == 0:
        return dq.view(torch.float32), H * D * size // 4, s_n * size // 4, B * N
    return None


def _partials_layout(dq: torch.Tensor, G: int, H: int, N: int, in_dq: bool) -> PartialsLayout:
    """G partials in dQ's memory when `in_dq` (dQ is this call's own, unaliased output, written last) and they
    fit with at least half the G asked for (fewer groups, fewer programs: more parallelism is not worth an
    extra buffer below that); else a buffer of their own, (G*H*N, _padded_row(N)) fp32."""
    pitch = _padded_row(N)
    chunks = _dq_as_chunks(dq, N) if in_dq else None
    if chunks is not None:
        buf, per_chunk, stride, count = chunks
        rows = per_chunk // pitch
        fit = count * rows // (H * N) if rows else 0
        if 2 * fit >= G and fit >= 1:
            return PartialsLayout(buf, min(G, fit), rows, pitch, stride, True)
    return PartialsLayout(_alloc((G * H * N, pitch), torch.float32, dq.device), G, 1, pitch, pitch, False)


@on_device_of_first_arg
def rel_pos_attention_bwd(do, q, k, v, out, lse, table, rel_index, window_size, scale, dropout_p, seed,
                          dq, dk, dv, inverse_index=None, dq_scratch=False):
    """Writes dq, dk, dv (views with any strides, same shapes as q, k, v). When `inverse_index`
    (perm, start, count, max_count) is given, also returns dTable (R, H) fp32, else None.
    dq_scratch: dq is this call's own output, aliasing no input (freshly allocated): its memory holds the
    table gradient's partials until dQ itself is computed (last).
    Extra memory: Delta (B, H, N) fp32 and, for the table gradient, G fp32 partials (G, H, N, N rounded up
    to 16) with G = num_batch_groups(...) (<= 64 MiB unless a single partial is larger) unless they fit into dq
    (_partials_layout); with a dense_bias tile config, the (H, N, N_pad) fp32 bias expansions (_expand_bias)."""
    B, H, N, D = q.shape
    do = int32_addressable(do, batch_in_int64=True)   # its strides are the caller's (a narrow view of a cat)
    cfgs = pick_configs(D, q.dtype, q.device)
    BLOCK_D = _block_d(D)
    prec = _dot_prec(q.dtype)
    has_drop = dropout_p > 0
    bias = _BiasArgs(table, rel_index, window_size, N)
    R, centre = bias.R, bias.centre
    seed_t = _seed_arg(seed, table)

    delta = _alloc((B, H, N), torch.float32, q.device)
    launch(_delta_kernel, (cdiv(N, 64),) + _bh_grid(B, H),
        out, do, delta, *out.stride(), *do.stride(), H, N, HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_M=64)

    need_dbias = inverse_index is not None
    G = num_batch_groups(B, H, N, q.device)
    # (without the table gradient the partials' pointer is never used: any fp32 tensor does)
    part = _partials_layout(dq, G, H, N, dq_scratch) if need_dbias else PartialsLayout(delta, G, 1, 16, 16, False)
    bias.expand(cfgs.dq.dense_bias, cfgs.dkdv.dense_bias)   # both expansions (if wanted) in one launch
    c = cfgs.dkdv
    tbl, idx, s_tr, s_th, s_ii, s_ij, src = bias.for_kernel(c, key_major=True)
    launch(_dkdv_kernel, (cdiv(N, c.block_n), H, part.G),
        q, k, v, tbl, idx, seed_t, do, lse, delta, dk, dv, part.buf,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), s_tr, s_th, s_ii, s_ij,
        B, H, N, R, centre, *part.args(), scale, scale * LOG2E, float(dropout_p),
        HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_M=c.block_m, BLOCK_N=c.block_n, TAIL_M=_tail(N, c.block_m, c.tail),
        BLOCK_TAIL=_block_tail(N, c.block_n, c.block_tail), BIAS_SRC=src, HAS_DROPOUT=has_drop,
        NEED_DBIAS=need_dbias, DOT_PREC=prec, num_warps=c.num_warps, num_stages=c.num_stages)

    dtable = None
    if need_dbias:   # before dQ: the partials may occupy dq's memory
        perm, start, count, max_count = inverse_index
        dtable = _alloc((R, H), torch.float32, q.device)
        BLOCK_R, BLOCK_C = 16, 64
        launch(_table_grad_kernel, (cdiv(R, BLOCK_R), H),
            part.buf, perm, start, count, dtable, part.G, H, N, R, max_count, *part.args()[1:], *dtable.stride(),
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
        if POISON_OUTPUTS and part.in_dq:
            dq.fill_(float("nan"))   # so that a dQ element the kernel leaves unwritten still shows

    c = cfgs.dq
    tbl, idx, s_tr, s_th, s_ii, s_ij, src = bias.for_kernel(c)
    launch(_dq_kernel, (cdiv(N, c.block_m),) + _bh_grid(B, H),
        q, k, v, tbl, idx, seed_t, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), s_tr, s_th, s_ii, s_ij,
        H, N, R, centre, scale, scale * LOG2E, float(dropout_p),
        HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_M=c.block_m, BLOCK_N=c.block_n, TAIL_N=_tail(N, c.block_n, c.tail),
        BLOCK_TAIL=_block_tail(N, c.block_m, c.block_tail), BIAS_SRC=src, HAS_DROPOUT=has_drop,
        DOT_PREC=prec, num_warps=c.num_warps, num_stages=c.num_stages)

    return dtable


_INVERSE_INDEXES = PerIndexTensor()      # explicit index -> its build_inverse_index(index, R)


def inverse_index_once(index: torch.Tensor, num_rel: int):
    """build_inverse_index, once per index tensor and version (the argsort and its host sync)."""
    inverse = _INVERSE_INDEXES.get(index, num_rel)
    if inverse is None:
        inverse = build_inverse_index(index, num_rel)
        _INVERSE_INDEXES.put(index, num_rel, inverse)
    return inverse


def build_inverse_index(index: torch.Tensor, num_rel: int):
    """Padded inverse of an (N, N) query-by-key index into [0, num_rel), over the key-major dBias layout:
    (perm, start, count, max_count) with perm the flat positions j*N + i sorted by index value (stable),
    start / count per table row. Built once per window."""
    check_index_range_once(index, num_rel)
    flat = index.t().reshape(-1).to(torch.int64)
    perm = torch.argsort(flat, stable=True).to(torch.int32)
    count = torch.zeros(num_rel, dtype=torch.int64, device=flat.device)
    count.scatter_add_(0, flat, torch.ones_like(flat))   # integer adds: exact and order-free
    start = torch.cumsum(count, 0) - count
    max_count = int(count.max().item()) if num_rel > 0 else 0
    return perm, start.to(torch.int32), count.to(torch.int32), max_count


@on_device_of_first_arg
def dropout_keep_mask(seed: torch.Tensor, B: int, H: int, N: int, dropout_p: float) -> torch.Tensor:
    """(B, H, N, N) bool keep-mask the kernels use for this seed (test-only: it materializes B*H*N*N)."""
    out = torch.empty((B, H, N, N), dtype=torch.int8, device=seed.device)
    BLOCK = 32
    launch(_keep_mask_kernel, (cdiv(N, BLOCK),) + _bh_grid(B, H), seed, out, H, N, float(dropout_p), BLOCK=BLOCK)
    return out.bool()
