"""Attention with a relative position bias gathered from a learnable (R, H) table, fused.

    out = softmax((q * scale) @ k^T + table[index].permute(2, 0, 1)) @ v

The Triton path takes the bias from the table in the kernels (for BEiT's window layout the index is part(query)
+ centre - part(key), from an (N,) array of per-token parts, with no (N, N) index load; or read from an explicit
(N, N) index): on a GPU the kernels read it from a per-call (H, N, N_pad) fp32 expansion that one small kernel
gathers from the table (1.9 MB for BEiT-B; query-major for the forward and dQ, key-major for dK/dV; fewer
instructions per tile than a gather per element, see kernels/rel_pos_attention.CONFIGS);
BEIT_FAST_ATTN_DENSE_BIAS chooses per kernel. It never materializes a (B, H, N, N) tensor: not the bias per
batch, the probabilities or their gradient; and it computes the table gradient deterministically (G per-batch-
group fp32 partials (G, H, N, N), each tile owned by one program, then a fixed-order segment sum; no atomics),
kept in dQ's memory until dQ is computed where they fit there. G does not grow with the batch beyond about 4
programs per SM, so a buffer of their own is bounded (64 MiB); at batch sizes below G it has G = B rows. No
torch.compile needed; the ops are registered through torch.library, so a compiled
model keeps them in one graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from beit_fast._backend import choose, common_reasons, offset_span
from . import _checks as checks
from . import _eager
from beit_fast.relpos import _index_cpu, num_relative_distance, relative_position_index  # noqa: F401 (re-exported)
from beit_fast.relpos import check_index_range_once
# the launchers put B*H on grid axes 1 and 2 (kernels.rel_pos_attention._bh_grid): B and H each up to this
from beit_fast.kernels._device import GRID_YZ_MAX

BACKENDS = ("triton", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


# ----------------------------------------------------------------------------------------------------------
# index and reference
# ----------------------------------------------------------------------------------------------------------

def rel_pos_attention_ref(q, k, v, bias_table, window_size=None, rel_index=None, scale=None, dropout_mask=None,
                          upcast=False):
    """Plain PyTorch: gather table[index] into (H, N, N), (q*scale) @ k^T + bias, softmax in fp32, @ v.

    q, k, v: (B, H, N, D); bias_table: (R, H); exactly one of window_size / rel_index (N, N).
    dropout_mask: optional (B, H, N, N) multiplier of the probabilities, e.g. keep.float() / (1 - p).
    upcast: compute in fp32 (for fp16/bf16 inputs) and return the input dtype. Returns (B, H, N, D).
    """
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    N, D = q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    index = rel_index if rel_index is not None else relative_position_index(window_size)
    index = index.to(device=q.device, dtype=torch.long)
    bias = bias_table[index.reshape(-1)].reshape(N, N, -1).permute(2, 0, 1)
    attn = (q * scale) @ k.transpose(-2, -1) + bias.to(q.dtype)
    attn = attn.float().softmax(-1) if attn.dtype != torch.float64 else attn.softmax(-1)
    if dropout_mask is not None:
        attn = attn * dropout_mask.to(attn.dtype)
    out = attn.to(v.dtype) @ v
    return out.to(dtype)


def _reference(q, k, v, table, window_size, rel_index, scale, dropout_p, dropout_seed=None):
    """With dropout_seed the keep-mask comes from a generator seeded with it (reproducible, though not the
    Triton kernels' mask: they hash positions in-kernel), else from torch's default generator."""
    mask = None
    if dropout_p > 0:
        gen = None
        if dropout_seed is not None:
            gen = torch.Generator(device=q.device)
            gen.manual_seed(int(_seed_tensor(dropout_p, dropout_seed, torch.device("cpu"))))
        keep = torch.rand(q.shape[:-1] + (q.shape[-2],), device=q.device, generator=gen) >= dropout_p
        mask = keep.to(torch.float32) / (1.0 - dropout_p)
    return rel_pos_attention_ref(q, k, v, table, window_size, rel_index, scale, dropout_mask=mask)


# ----------------------------------------------------------------------------------------------------------
# input checks and backend reasons
# ----------------------------------------------------------------------------------------------------------

def _check_window(window_size) -> tuple[int, int]:
    try:
        wh, ww = window_size
        if int(wh) != wh or int(ww) != ww or isinstance(wh, bool) or isinstance(ww, bool):
            raise ValueError   # 2.7 or True: not a window size (int() would truncate 2.7 to 2)
        wh, ww = int(wh), int(ww)
    except Exception:
        raise ValueError(f"window_size must be a pair of ints (Wh, Ww), got {window_size!r}") from None
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size must be positive (Wh, Ww), got {window_size!r}")
    return wh, ww


def _check_inputs(q, k, v, table, window_size, rel_index, scale, dropout_p, what="q, k, v"):
    """ValueError naming the expected shape for any inconsistent input; returns (Wh, Ww) or (0, 0)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("bias_table", table)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{what} must all have shape (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, N, D = q.shape
    if min(H, N, D) < 1:
        raise ValueError(f"{what} must have shape (B, H, N, D) with H, N, D >= 1, got {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{what} must share one floating dtype out of fp16, bf16, fp32, fp64; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if table.dim() != 2 or table.shape[1] != H:
        raise ValueError(f"bias_table must have shape (R, H) = (R, {H}), got {tuple(table.shape)}")
    if table.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"bias_table must be floating (fp16, bf16, fp32, fp64), got {table.dtype}")
    checks.one_device("rel_pos_attention", "q", q, k=k, v=v, bias_table=table,
                      rel_index=rel_index if isinstance(rel_index, Tensor) else None)
    if (window_size is None) == (rel_index is None):
        raise ValueError("give exactly one of window_size=(Wh, Ww) (BEiT's layout) or rel_index (N, N)")
    wh = ww = 0
    if window_size is not None:
        wh, ww = _check_window(window_size)
        if N != wh * ww + 1:
            raise ValueError(f"window_size {(wh, ww)} expects N = Wh*Ww + 1 = {wh * ww + 1} tokens "
                             f"(cls first), got N = {N}")
        R = num_relative_distance((wh, ww))
        if table.shape[0] != R:
            raise ValueError(f"bias_table must have shape ((2Wh-1)(2Ww-1)+3, H) = ({R}, {H}) for window_size "
                             f"{(wh, ww)}, got {tuple(table.shape)}")
    else:
        if not isinstance(rel_index, Tensor) or rel_index.shape != (N, N):
            got = tuple(rel_index.shape) if isinstance(rel_index, Tensor) else type(rel_index).__name__
            raise ValueError(f"rel_index must be an integer tensor of shape (N, N) = ({N}, {N}), got {got}")
        if rel_index.dtype.is_floating_point or rel_index.dtype.is_complex or rel_index.dtype == torch.bool:
            raise ValueError(f"rel_index must be an integer tensor, got {rel_index.dtype}")
        if not torch.compiler.is_compiling():   # any device, once per index tensor and version (a host sync;
            check_index_range_once(rel_index, table.shape[0])   # inside a compiled graph, unchecked)
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return wh, ww


def not_supported_reasons(backend: str, q, k, v, table, window_size=None, rel_index=None, dropout_p=0.0, *,
                          auto: bool = False) -> list[str]:
    """Why `backend` cannot run these inputs (empty list: it can). q, k, v: (B, H, N, D) views."""
    tensors = [q, k, v, table] + ([rel_index] if rel_index is not None else [])
    why = common_reasons(backend, tensors, auto=auto)
    if backend == "triton":
        if q.dtype not in _TRITON_DTYPES:
            why.append(f"the Triton kernel takes fp16, bf16 or fp32 inputs, got {q.dtype}")
        if table.dtype not in _TRITON_DTYPES:
            why.append(f"the Triton kernel takes an fp16, bf16 or fp32 bias_table, got {table.dtype}")
        if q.shape[-1] > MAX_HEAD_DIM:
            why.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
        span = max(offset_span(t[0]) for t in (q, k, v)) if q.shape[0] else 0
        if span >= 2**31:   # the batch term is int64 in the kernels; rows, heads and head dims are int32
            why.append(f"one batch element of q, k or v spans {span} elements (its strides), past the kernels' "
                       f"int32 offsets (2**31): make them contiguous (e.g. batch-first qkv)")
        if max(q.shape[0], q.shape[1]) > GRID_YZ_MAX:
            why.append(f"B = {q.shape[0]} or H = {q.shape[1]} exceeds the CUDA grid's limit {GRID_YZ_MAX} on the "
                       "axes the kernels launch batches and heads on (split the batch)")
    return why


def _choose(q, k, v, table, window_size, rel_index, dropout_p, backend):
    """The backend for this call; "reference" for batch 0 whatever was chosen (nothing to launch: the
    reference's empty result)."""
    chosen = choose("rel_pos_attention", backend,
                    lambda b, auto: not_supported_reasons(b, q, k, v, table, window_size, rel_index, dropout_p,
                                                          auto=auto),
                    BACKENDS)
    return "reference" if q.shape[0] == 0 else chosen


# ----------------------------------------------------------------------------------------------------------
# torch.library registration (Triton implementation)
# ----------------------------------------------------------------------------------------------------------

def _kernels():
    from beit_fast.kernels import rel_pos_attention as K
    return K


_INVERSE_CACHE: dict = {}


def _inverse_index(table, rel_index, wh, ww):
    """CSR inverse of the index: cached per window and device, and per explicit index tensor (rebuilt when it
    is changed in place), so the argsort and its host sync run once rather than every backward."""
    K = _kernels()
    R = table.shape[0]
    if rel_index is not None:
        return K.inverse_index_once(rel_index, R)
    key = (wh, ww, str(table.device))
    if key not in _INVERSE_CACHE:
        idx = _index_cpu(wh, ww).to(table.device)
        _INVERSE_CACHE[key] = K.build_inverse_index(idx, R)
    return _INVERSE_CACHE[key]


def _window(wh, ww):
    return None if wh == 0 else (wh, ww)


def _packed_views(qkv):
    """(B, N, 3, H, D) -> q, k, v as (B, H, N, D) strided views (no copy; two view ops, not six)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _attn_impl(q: Tensor, k: Tensor, v: Tensor, table: Tensor, rel_index: Optional[Tensor], wh: int, ww: int,
               scale: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    out = _kernels()._alloc(q.shape, q.dtype, q.device)
    lse = _kernels().rel_pos_attention_fwd(q, k, v, table, rel_index, _window(wh, ww), scale, dropout_p, seed, out)
    return out, lse


_attn_op = torch.library.custom_op("beit_fast::rel_pos_attention", mutates_args=())(_attn_impl)


@_attn_op.register_fake
def _(q, k, v, table, rel_index, wh, ww, scale, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _attn_bwd_impl(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, table: Tensor,
                   rel_index: Optional[Tensor], wh: int, ww: int, scale: float, dropout_p: float,
                   seed: Optional[Tensor], need_dtable: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    K = _kernels()
    dq, dk, dv = (K._alloc(q.shape, q.dtype, q.device) for _ in range(3))
    inv = _inverse_index(table, rel_index, wh, ww) if need_dtable else None
    dtable = K.rel_pos_attention_bwd(grad, q, k, v, out, lse, table, rel_index, _window(wh, ww), scale, dropout_p,
                                     seed, dq, dk, dv, inv, dq_scratch=True)
    dtable = dtable.to(table.dtype) if dtable is not None else table.new_zeros(table.shape)
    return dq, dk, dv, dtable


_attn_bwd_op = torch.library.custom_op("beit_fast::rel_pos_attention_backward", mutates_args=())(_attn_bwd_impl)


@_attn_bwd_op.register_fake
def _(grad, q, k, v, out, lse, table, rel_index, wh, ww, scale, dropout_p, seed, need_dtable):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), table.new_empty(table.shape)


def _no_zero_grads(ctx, output):
    """lse is an internal output: not differentiable, and the backward gets None for it (and for an unused
    out) instead of a zero tensor the autograd engine would allocate and fill every step."""
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _attn_setup(ctx, inputs, output):
    q, k, v, table, rel_index, wh, ww, scale, dropout_p, seed = inputs
    _no_zero_grads(ctx, output)
    ctx.save_for_backward(q, k, v, table, rel_index, seed, *output)
    ctx.args = (wh, ww, scale, dropout_p)


def _attn_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 10
    q, k, v, table, rel_index, seed, out, lse = ctx.saved_tensors
    wh, ww, scale, dropout_p = ctx.args
    dq, dk, dv, dtable = _eager.call_raw(_attn_bwd_impl, _attn_bwd_op, grad_out, q, k, v, out, lse, table,
                                         rel_index, wh, ww, scale, dropout_p, seed, ctx.needs_input_grad[3])
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dtable if need[3] else None, None, None, None, None, None, None)


torch.library.register_autograd("beit_fast::rel_pos_attention", _attn_backward, setup_context=_attn_setup)
_AttnFn = _eager.AutogradOp("RelPosAttentionTriton", _attn_impl, _attn_setup, _attn_backward)


def _packed_impl(qkv: Tensor, table: Tensor, rel_index: Optional[Tensor], wh: int, ww: int, scale: float,
                 dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    B, N, _, H, D = qkv.shape
    q, k, v = _packed_views(qkv)
    out = _kernels()._alloc((B, N, H * D), qkv.dtype, qkv.device)
    o4 = out.view(B, N, H, D).permute(0, 2, 1, 3)
    lse = _kernels().rel_pos_attention_fwd(q, k, v, table, rel_index, _window(wh, ww), scale, dropout_p, seed, o4)
    return out, lse


_packed_op = torch.library.custom_op("beit_fast::rel_pos_attention_qkvpacked", mutates_args=())(_packed_impl)


@_packed_op.register_fake
def _(qkv, table, rel_index, wh, ww, scale, dropout_p, seed):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H * D)), qkv.new_empty((B, H, N), dtype=torch.float32)


def _packed_bwd_impl(grad: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, table: Tensor,
                     rel_index: Optional[Tensor], wh: int, ww: int, scale: float, dropout_p: float,
                     seed: Optional[Tensor], need_dtable: bool) -> tuple[Tensor, Tensor]:
    K = _kernels()
    B, N, _, H, D = qkv.shape
    dqkv = K._alloc(qkv.shape, qkv.dtype, qkv.device)
    q, k, v = _packed_views(qkv)
    dq, dk, dv = _packed_views(dqkv)
    o4 = out.view(B, N, H, D).permute(0, 2, 1, 3)
    g4 = grad.reshape(B, N, H, D).permute(0, 2, 1, 3)
    inv = _inverse_index(table, rel_index, wh, ww) if need_dtable else None
    dtable = K.rel_pos_attention_bwd(g4, q, k, v, o4, lse, table, rel_index, _window(wh, ww), scale, dropout_p,
                                     seed, dq, dk, dv, inv, dq_scratch=True)
    dtable = dtable.to(table.dtype) if dtable is not None else table.new_zeros(table.shape)
    return dqkv, dtable


_packed_bwd_op = torch.library.custom_op("beit_fast::rel_pos_attention_qkvpacked_backward",
                                         mutates_args=())(_packed_bwd_impl)


@_packed_bwd_op.register_fake
def _(grad, qkv, out, lse, table, rel_index, wh, ww, scale, dropout_p, seed, need_dtable):
    return qkv.new_empty(qkv.shape), table.new_empty(table.shape)


def _packed_setup(ctx, inputs, output):
    qkv, table, rel_index, wh, ww, scale, dropout_p, seed = inputs
    _no_zero_grads(ctx, output)
    ctx.save_for_backward(qkv, table, rel_index, seed, *output)
    ctx.args = (wh, ww, scale, dropout_p)


def _packed_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 8
    qkv, table, rel_index, seed, out, lse = ctx.saved_tensors
    wh, ww, scale, dropout_p = ctx.args
    dqkv, dtable = _eager.call_raw(_packed_bwd_impl, _packed_bwd_op, grad_out, qkv, out, lse, table, rel_index,
                                   wh, ww, scale, dropout_p, seed, ctx.needs_input_grad[1])
    need = ctx.needs_input_grad
    return dqkv if need[0] else None, dtable if need[1] else None, None, None, None, None, None, None


torch.library.register_autograd("beit_fast::rel_pos_attention_qkvpacked", _packed_backward,
                                setup_context=_packed_setup)
_PackedFn = _eager.AutogradOp("RelPosAttentionQKVPackedTriton", _packed_impl, _packed_setup, _packed_backward)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------

def _seed_tensor(dropout_p, dropout_seed, device):
    if dropout_p <= 0:
        return None
    if dropout_seed is None:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    if isinstance(dropout_seed, Tensor):
        return dropout_seed.to(device=device, dtype=torch.int64).reshape(1)
    return torch.tensor([int(dropout_seed)], dtype=torch.int64, device=device)


def rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, bias_table: Tensor, *, window_size=None,
                      rel_index: Optional[Tensor] = None, scale: Optional[float] = None, dropout_p: float = 0.0,
                      backend: str = "auto", dropout_seed=None) -> Tensor:
    """softmax((q * scale) @ k^T + bias) @ v with bias[h, i, j] = bias_table[index[i, j], h].

    q, k, v: (B, H, N, D), fp16 / bf16 / fp32 (fp32 accumulation; fp64 on the reference backend), any
      strides. Triton: D <= 128 (any D, padded to a power of two inside), any N >= 1.
    bias_table: (R, H) learnable, any float dtype; its gradient comes back in its dtype (summed in fp32).
    window_size: (Wh, Ww) for BEiT's layout: N = Wh*Ww + 1 (cls token first), R = (2Wh-1)(2Ww-1) + 3, the
      index derived in-kernel (from an (N,) int32 array of per-token parts, cached per window). Or
      rel_index: (N, N) integer tensor for any other layout (exactly one). Its range check and inverse
      are cached per tensor, version counter and data pointer: change it with ordinary in-place ops, not
      through `.data` or a numpy / DLPack view of its memory (which PyTorch does not count as a change).
    scale: default D ** -0.5. dropout_p: attention-probability dropout (pass 0 in eval); dropout_seed
      (int or int64 tensor) fixes the in-kernel RNG, else one is drawn from torch's generator (the reference
      backend seeds a generator of its own with it: reproducible, but another mask than the kernels'; a
      torch.Generator made inside the call, which torch.compile(fullgraph=True) cannot trace: compile the
      reference's dropout without dropout_seed, or use the Triton backend).
    backend: "auto" (triton for GPU tensors, else reference), "triton", "reference"; BEIT_FAST_BACKEND
      overrides "auto". A forced backend that cannot run raises BackendUnavailable with the reasons.
    Under torch.autocast, q, k, v are cast to the autocast dtype as scaled_dot_product_attention casts them
    (fp64 left alone); the table keeps its dtype.
    Returns (B, H, N, D) in q's dtype, contiguous.

    Memory (Triton): the forward saves out and lse (B, H, N) fp32. The backward adds Delta (B, H, N) fp32,
    the gradients, and G fp32 dBias partials (G, H, N, N16), N16 = N rounded up to 16,
    G = kernels.rel_pos_attention.num_batch_groups: about 4 programs per SM, at most B, at most 64 MiB of
    partials unless one partial (H*N*N*4 bytes) is larger (H100: BEiT-B N=197 B=128 -> G=11, 22 MB;
    BEiT-L N=577 -> G=3, 66 MB). The partials live in the memory of dQ, which is computed last, whenever
    they fit there with at least half that G (then G is what fits): (B, H, N, D) dQ holds
    B*D*itemsize/(4*N16) groups (BEiT-B bf16 at B=128: 19); in the packed layout each token's H*D values hold
    floor(H*D*itemsize/(4*N16)) rows of N16 fp32 (BEiT-B bf16: one, so B/H groups, 10 at B=128; BEiT-L: two,
    8 at B=64); else they take a buffer of their own
    (kernels.rel_pos_attention._partials_layout). Plus a cached inverse index per window (an N*N int32
    permutation and two (R,) int32 arrays). Apart from that cached index the partials are the only
    N*N-sized data; they stop growing with the batch at G. The table gradient is bitwise reproducible for the
    same inputs, layout and GPU model (G depends on the SM count and on where the partials fit).
    The forward builds an (H, N, N_pad) fp32 expansion of the table, N_pad = N rounded up to 16 (BEiT-B
    N=197: 1.9 MB), and the backward two (dQ's query-major and dK/dV's key-major one), each freed when the
    call returns: on a GPU by default while one is at most 32 MiB (kernels.rel_pos_attention.DENSE_MAX_BYTES:
    BEiT-L at 384 px, 22 MB, yes; at 512 px, 68 MB, no); else, or with BEIT_FAST_ATTN_DENSE_BIAS=0, none:
    the kernels gather per element.
    """
    q, k, v = checks.autocast(q, k, v)   # as scaled_dot_product_attention under autocast; the table as it is
    wh, ww = _check_inputs(q, k, v, bias_table, window_size, rel_index, scale, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = _choose(q, k, v, bias_table, window_size, rel_index, dropout_p, backend)
    if chosen == "reference":
        return _reference(q, k, v, bias_table, window_size, rel_index, scale, dropout_p, dropout_seed)
    seed = _seed_tensor(dropout_p, dropout_seed, q.device)
    out, _ = _eager.call(_attn_op, _AttnFn, q, k, v, bias_table, rel_index, wh, ww, scale, float(dropout_p), seed)
    return out


def rel_pos_attention_qkvpacked(qkv: Tensor, bias_table: Tensor, *, window_size=None,
                                rel_index: Optional[Tensor] = None, scale: Optional[float] = None,
                                dropout_p: float = 0.0, backend: str = "auto", dropout_seed=None) -> Tensor:
    """Same as rel_pos_attention, on the qkv projection's output without a transposing copy.

    qkv: (B, N, 3, H, D) (e.g. `linear(x).view(B, N, 3, H, D)`), any strides. Returns (B, N, H*D), ready for
    the output projection. The gradient comes back as one (B, N, 3, H, D) tensor.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        got = tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must have shape (B, N, 3, H, D), got {got}")
    qkv, = checks.autocast(qkv)
    q, k, v = _packed_views(qkv)
    wh, ww = _check_inputs(q, k, v, bias_table, window_size, rel_index, scale, dropout_p, what="qkv (as q, k, v)")
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    chosen = _choose(q, k, v, bias_table, window_size, rel_index, dropout_p, backend)
    if chosen == "reference":
        out = _reference(q, k, v, bias_table, window_size, rel_index, scale, dropout_p, dropout_seed)
        return out.transpose(1, 2).reshape(B, N, H * D)
    seed = _seed_tensor(dropout_p, dropout_seed, qkv.device)
    out, _ = _eager.call(_packed_op, _PackedFn, qkv, bias_table, rel_index, wh, ww, scale, float(dropout_p), seed)
    return out


def dropout_keep_mask(seed, B: int, H: int, N: int, dropout_p: float, device="cpu") -> Tensor:
    """(B, H, N, N) bool keep-mask the Triton kernels draw for `seed` (test-only; materializes B*H*N*N)."""
    seed_t = _seed_tensor(dropout_p, seed, torch.device(device))
    return _kernels().dropout_keep_mask(seed_t, B, H, N, dropout_p)
