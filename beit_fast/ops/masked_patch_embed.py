"""masked_patch_embed: BEiT's input stage in one op.

    x = Conv2d(images; weight, bias, kernel = stride = patch)          (B, P, C)
    x = x * (1 - w) + mask_token * w,  w = bool_masked_pos[..., None]     masked patches -> mask_token
    x = cat(cls_token, x) + pos_embed                                     (B, 1 + P, C)

Backends, fastest first: "cuda", "cpp" (extension kernels, csrc/masked_patch_embed.*), "reference" (PyTorch).

Design (chosen for the H100, not measured here): a convolution whose kernel equals its stride is a GEMM over
non-overlapping patches, so the op is
  1. gather: a small kernel copies the pixels of every unmasked patch into a (B*(1+P), K) patch matrix
     (K = Cin*ph*pw, 16-byte accesses; cls and masked rows are written as zeros without reading pixels);
  2. one cuBLAS GEMM (at::mm) writes patches @ weight.view(C, K)^T straight into the (B, 1+P, C) output
     (under autocast, into a scratch buffer in the autocast dtype);
  3. an epilogue kernel rewrites the output in place: + bias, mask_token at masked patches, cls_token in row
     0, + pos_embed (fp32 math, one read and one write; under autocast it reads the 16-bit GEMM output and
     writes the fp32 tokens, so the cls and mask rows keep their fp32 values as in the reference).
cuBLAS is the fastest GEMM available for this shape (K = 768, C = 768/1024, M = B*197), and the surrounding
work is bandwidth-bound elementwise code, which is where fusion pays. Masked rows still pass through the GEMM
as zero rows: skipping them would need the number of unmasked rows on the host (a device sync every step,
stalling the launch queue), while the GEMM is a small share of the model. Masked rows contribute exactly
nothing to the weight and bias gradients (their patch rows are zero and their output gradient goes to
mask_token). Backward: dW = grad^T @ patches (cuBLAS, patch matrix re-gathered rather than saved),
dimages = scatter(grad @ W) (zero at masked patches), and bias / mask_token / cls_token / pos_embed gradients
from one pass over grad that sums over the batch in a fixed order (deterministic).

The output dtype is the reference's type promotion: images' dtype (the autocast dtype under autocast)
promoted with cls_token's, mask_token's (when there is a mask) and pos_embed's: fp32 under autocast with fp32
parameters. The backward casts the output gradient to the GEMM dtype for the weight and image gradients (as
the reference's conv backward does) and sums the token gradients from it as it comes.

One difference from the reference, deliberate: non-finite pixels inside a masked patch do not leak into the
output (the reference's x * (1 - w) turns inf into nan).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks as checks
from . import _eager
from .._backend import choose, common_reasons, extension_op_reasons, register_extension_op

OP = "masked_patch_embed"
PREFERENCE = ("cuda", "cpp", "reference")

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPP_DTYPES = _CUDA_DTYPES + (torch.float64,)
# csrc/masked_patch_embed_kernels.cuh's kMaxElements: int32 indices, and the last block of 256 threads must not wrap
CUDA_MAX_ELEMENTS = 2**31 - 1 - 256


def masked_patch_embed_ref(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           bool_masked_pos: Optional[torch.Tensor], mask_token: Optional[torch.Tensor],
                           cls_token: torch.Tensor,
                           pos_embed: Optional[torch.Tensor] = None, *, upcast: bool = False) -> torch.Tensor:
    """unilm's order: conv -> flatten -> mask blend -> cat(cls) -> + pos_embed. upcast=True computes in float64
    and returns float64 (the oracle for the low-precision error rule)."""
    if upcast:
        images, weight, bias, mask_token, cls_token, pos_embed = (
            None if t is None else t.double() for t in (images, weight, bias, mask_token, cls_token, pos_embed))
    x = F.conv2d(images, weight, bias, stride=tuple(weight.shape[-2:])).flatten(2).transpose(1, 2)
    if bool_masked_pos is not None:
        w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
        x = x * (1 - w) + mask_token * w
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if pos_embed is not None:
        x = x + pos_embed
    return x


def environment_reasons(backend: str, device=None) -> list[str]:
    return extension_op_reasons(OP, backend)


def not_supported_reasons(backend: str, images: torch.Tensor, weight: torch.Tensor, bias=None, bool_masked_pos=None,
                          mask_token=None, cls_token=None, pos_embed=None, *, auto: bool = False) -> list[str]:
    """Why `backend` cannot run these inputs (empty list: it can). Malformed inputs (wrong shapes) are not
    reasons: the op rejects them with a message naming the shapes."""
    tensors = [t for t in (images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed) if t is not None]
    why = common_reasons(backend, tensors, auto=auto)
    if backend in ("cuda", "cpp") and not why:
        why += environment_reasons(backend)
    if backend in ("cuda", "cpp"):
        allowed = _CUDA_DTYPES if backend == "cuda" else _CPP_DTYPES
        dtype = checks.autocast_dtype(images)
        if dtype not in allowed:
            why.append(f"images have dtype {dtype}; the {backend} kernel supports {[str(d) for d in allowed]}")
        elif cls_token is not None:
            out = _output_dtype(dtype, bool_masked_pos, mask_token, cls_token, pos_embed)
            if out not in allowed:
                why.append(f"the tokens have dtype {out} (images' {dtype} promoted with the cls/mask token and "
                           f"position embedding dtypes); the {backend} kernel writes {[str(d) for d in allowed]}")
        if images.dtype != weight.dtype and not checks.autocast_on(images):
            why.append(f"images ({images.dtype}) and weight ({weight.dtype}) differ in dtype")
        if backend == "cuda" and images.dim() == 4 and weight.dim() == 4:
            B, _, H, W = images.shape
            P = (H // max(weight.shape[2], 1)) * (W // max(weight.shape[3], 1))
            rows = B * (1 + P)
            largest = max(images.numel(), rows * weight[0].numel(), rows * weight.shape[0])
            if largest > CUDA_MAX_ELEMENTS:
                why.append(f"a tensor of {largest} elements; the CUDA kernels index with int32 and take at most "
                           f"2^31 - 1 - 256 = {CUDA_MAX_ELEMENTS}")
    return why


def _output_dtype(compute_dtype, bool_masked_pos, mask_token, cls_token, pos_embed) -> torch.dtype:
    """csrc/masked_patch_embed.cpp's out_dtype: the reference's promotion of the conv output with the tokens."""
    dtype = torch.promote_types(compute_dtype, cls_token.dtype)
    if bool_masked_pos is not None and mask_token is not None:
        dtype = torch.promote_types(dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


def _fake_forward(images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed):
    B, _, H, W = images.shape
    P = (H // weight.shape[2]) * (W // weight.shape[3])
    return images.new_empty((B, 1 + P, weight.shape[0]),
                            dtype=_output_dtype(images.dtype, bool_masked_pos, mask_token, cls_token, pos_embed))


def _fake_backward(grad_out, images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed, output_mask):
    like = (images, weight, bias, mask_token, cls_token, pos_embed)
    return tuple(t.new_empty(t.shape) if need and t is not None else None for t, need in zip(like, output_mask))


def _setup_context(ctx, inputs, output):
    images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed = inputs
    # images and weight are inputs the caller holds anyway; the patch matrix is re-gathered in the backward.
    ctx.save_for_backward(images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed)


def _backward(ctx, grad_out):
    images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], bias is not None and need[2], mask_token is not None and need[4], need[5],
            pos_embed is not None and need[6]]
    _eager.refuse_double_backward(OP, grad_out, images, weight, bias, mask_token, cls_token, pos_embed)
    dimages, dweight, dbias, dmask, dcls, dpos = torch.ops.beit_fast.masked_patch_embed_backward(
        grad_out, images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed, mask)
    return dimages, dweight, dbias, None, dmask, dcls, dpos


register_extension_op(OP, _fake_forward, _fake_backward, _backward, _setup_context)
_Fn = _eager.ExtensionOp("MaskedPatchEmbed", OP, _setup_context, _backward)


def _check_inputs(images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed):
    """The C++ op's checks (csrc/masked_patch_embed.cpp, prepare), for every backend: ValueError."""
    op = OP
    images, weight = checks.tensor(op, "images", images), checks.tensor(op, "weight", weight)
    bias, bool_masked_pos = checks.tensor(op, "bias", bias, True), checks.tensor(op, "bool_masked_pos", bool_masked_pos, True)
    mask_token, pos_embed = checks.tensor(op, "mask_token", mask_token, True), checks.tensor(op, "pos_embed", pos_embed, True)
    cls_token = checks.tensor(op, "cls_token", cls_token)
    if images.dim() != 4:
        raise ValueError(f"{op}: images must have shape (B, Cin, H, W), got {tuple(images.shape)}")
    B, Cin, H, W = images.shape
    if weight.dim() != 4 or weight.shape[1] != Cin or min(weight.shape) < 1:
        raise ValueError(f"{op}: weight must have shape (C, Cin, ph, pw) with Cin = images.size(1) = {Cin}, got "
                         f"weight {tuple(weight.shape)} for images {tuple(images.shape)}")
    Cout, _, ph, pw = weight.shape
    if H < 1 or W < 1 or H % ph or W % pw:
        raise ValueError(f"{op}: the image size {H}x{W} must be a positive multiple of the patch size {ph}x{pw} "
                         f"(images {tuple(images.shape)}, weight {tuple(weight.shape)})")
    P = (H // ph) * (W // pw)
    for name, t in (("images", images), ("weight", weight), ("bias", bias), ("mask_token", mask_token),
                    ("cls_token", cls_token), ("pos_embed", pos_embed)):
        checks.floating(op, name, t)
    if images.dtype != weight.dtype and not checks.autocast_on(images):
        raise ValueError(f"{op}: weight must have the dtype of images ({images.dtype}), got {weight.dtype}")
    checks.shape(op, "bias", bias, (Cout,), "(C,)")
    checks.shape(op, "mask_token", mask_token, (1, 1, Cout), "(1, 1, C)")
    checks.shape(op, "cls_token", cls_token, (1, 1, Cout), "(1, 1, C)")
    checks.shape(op, "pos_embed", pos_embed, (1, 1 + P, Cout), "(1, 1 + P, C)")
    if bool_masked_pos is not None:
        if mask_token is None:
            raise ValueError(f"{op}: bool_masked_pos was given without mask_token")
        if bool_masked_pos.dtype != torch.bool:
            raise ValueError(f"{op}: bool_masked_pos must be bool, got {bool_masked_pos.dtype}")
        checks.shape(op, "bool_masked_pos", bool_masked_pos, (B, P), "(B, P)")
    checks.one_device(op, "images", images, weight=weight, bias=bias, bool_masked_pos=bool_masked_pos,
                 mask_token=mask_token, cls_token=cls_token, pos_embed=pos_embed)


def masked_patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       bool_masked_pos: Optional[torch.Tensor], mask_token: Optional[torch.Tensor],
                       cls_token: torch.Tensor,
                       pos_embed: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """Patch embedding + mask-token replacement + cls token + absolute position embedding.

    Args:
        images: (B, Cin, H, W) with H, W multiples of the patch size; float32, float16, bfloat16 (float64 on the
            CPU).
        weight: (C, Cin, ph, pw) the Conv2d weight of patch_embed.proj, images' dtype (under autocast both are
            cast to the autocast dtype, as conv2d would be).
        bias: (C,) the Conv2d bias, or None. Any float dtype.
        bool_masked_pos: (B, P) bool with P = (H/ph)*(W/pw), True = masked; or None (fine-tuning: no masking,
            mask_token unused and gets no gradient).
        mask_token: (1, 1, C), or None when bool_masked_pos is None. cls_token: (1, 1, C). pos_embed:
            (1, 1+P, C) or None (BEiT's default: relative position bias instead). Any float dtype.
        backend: "auto" | "cuda" | "cpp" | "reference" (see beit_fast._backend).

    Returns:
        (B, 1+P, C): row 0 = cls_token (+ pos_embed[:, 0]); row 1+p = mask_token if patch p is masked, else
        conv(patch p) + bias; then + pos_embed[:, 1+p]. dtype: as the reference's type promotion gives it,
        images' (the autocast dtype under autocast) promoted with the tokens' and pos_embed's (see above).
    """
    _check_inputs(images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed)
    chosen = choose(OP, backend, lambda b, auto: not_supported_reasons(
        b, images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed, auto=auto), PREFERENCE)
    if chosen == "reference":
        return masked_patch_embed_ref(images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed)
    images, weight = checks.autocast(images, weight)   # as conv2d under autocast
    if bool_masked_pos is None:
        mask_token = None  # unused without a mask: no gradient, as in the reference
    return _eager.call(torch.ops.beit_fast.masked_patch_embed, _Fn, images, weight, bias, bool_masked_pos,
                       mask_token, cls_token, pos_embed)
