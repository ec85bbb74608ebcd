"""The op tests' tolerances, in one table, and the two ways they are checked.

TOLERANCES[op][dtype] is a bound, or {tensor name: bound} where an op's outputs and gradients differ. An op
key with a suffix ("linear_gelu.autocast") names one particular check of that op. A bound is either
- Close(atol, rtol): torch.testing.assert_close, elementwise |actual - expected| <= atol + rtol * |expected|;
- TwoX(atol): the 2x rule, max|ours - ref| <= 2 * max|ref_lowp - ref| + slack, with ref the fp64 (or fp32)
  reference and ref_lowp PyTorch's own computation in the low-precision dtype. The slack is atol itself, or
  atol scaled by the reference's magnitude where the entry's comment says so (the test does the scaling).
Look entries up with tolerance(op, dtype, name); a missing entry is a KeyError, never a default.
"""
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Close:
    atol: float
    rtol: float


@dataclass(frozen=True)
class TwoX:
    atol: float


fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16

TOLERANCES = {
    # Triton against the fp32 reference in fp32; the 2x rule against fp64 in fp16/bf16 (dweight sums M rounded
    # products: an elementwise rtol does not fit low precision).
    "layer_norm": {
        fp32: Close(atol=1e-4, rtol=1e-4),
        fp16: TwoX(atol=1e-3),
        bf16: TwoX(atol=1e-2),
    },
    # as layer_norm (dW sums M rounded products); the 16-bit slack is atol plus one ulp of the largest exact
    # value (tests/test_linear_gelu.py: _two_x_with_ulp), here and under autocast
    "linear_gelu": {
        fp32: Close(atol=1e-4, rtol=1e-4),
        fp16: TwoX(atol=1e-3),
        bf16: TwoX(atol=1e-3),
    },
    # under autocast (16-bit compute, fp32 parameters): the 2x rule, against fp64 on the inputs autocast
    # rounds (an elementwise bound between two 16-bit results failed once: db 0.0112 off at |db| 0.06, bf16)
    "linear_gelu.autocast": {
        fp16: TwoX(atol=1e-3),
        bf16: TwoX(atol=1e-3),
    },
    # fp32 with torch's TF32 switch on: Triton's tf32 dots (operands cut to 10 mantissa bits) against the fp64
    # reference. cuBLAS rounds the operands where Triton truncates, so the two TF32 results are not compared
    # with each other; on the CPU the interpreter computes in fp32.
    "linear_gelu.tf32": {
        fp32: Close(atol=3e-2, rtol=1e-2),
    },
    # Triton against the fp64 reference. fp32 runs the dots in IEEE fp32; fp16 rounds p and dS to fp16 before
    # the dots (as flash-attention does). The packed dqkv uses dq's bound.
    "rel_pos_attention": {
        fp32: {"out": Close(atol=4e-6, rtol=2e-5), "dq": Close(atol=1e-5, rtol=2e-5),
               "dk": Close(atol=1e-5, rtol=2e-5), "dv": Close(atol=1e-5, rtol=2e-5),
               "dtable": Close(atol=4e-5, rtol=2e-5)},
        fp16: {"out": Close(atol=7e-4, rtol=3e-3), "dq": Close(atol=3e-3, rtol=3e-3),
               "dk": Close(atol=3e-3, rtol=3e-3), "dv": Close(atol=3e-3, rtol=3e-3),
               # dtable sums dS over every (query, key) pair of a relative offset, where the terms cancel; with
               # fp16 p / dS a seed gave 0.0148 at |dtable| = 1.42 (one of ~80 seeds at N=65, D=80)
               "dtable": Close(atol=2e-2, rtol=3e-3)},
    },
    # CUDA, every output and gradient, against fp64
    "rel_pos_attention.two_x": {
        fp16: TwoX(atol=1e-3),
        bf16: TwoX(atol=1e-2),
        fp32: TwoX(atol=1e-4),
    },
    # the fp16 reference with upcast=True (computed in fp32) against the fp64 plain eager attention
    "rel_pos_attention.reference_upcast": {
        fp16: Close(atol=3e-3, rtol=1e-2),
    },
    # BEIT_FAST_BACKEND=triton (the interpreter) against the reference, both fp32
    "rel_pos_attention.backend_env": {
        fp32: Close(atol=1e-5, rtol=1e-4),
    },
    # 2x rule against fp64; slack = atol * (1 + max|fp64 value|) plus one ulp of that value, per tensor
    "layer_scale_residual_norm": {
        fp32: TwoX(atol=1e-5),
        fp16: TwoX(atol=1e-3),
        bf16: TwoX(atol=4e-3),
    },
    # 2x rule against fp64; slack = atol * (1 + max|fp64 value|) per tensor
    "masked_patch_embed": {
        fp32: TwoX(atol=1e-5),
        fp16: TwoX(atol=1e-3),
        bf16: TwoX(atol=4e-3),
    },
    # Model level, fused against reference model: fp32 on the CPU (C++ twins), each gradient's atol scaled by
    # its own max|grad|; bf16 autocast on CUDA against the fp32 reference by the 2x rule, the logits' slack
    # atol, each gradient's atol * max|fp32 grad| (plus one bf16 ulp of it: tests/test_fused_model.py).
    "fused_model": {
        fp32: Close(atol=2e-5, rtol=2e-4),
        bf16: {"logits": TwoX(atol=1e-3), "grads": TwoX(atol=1e-3)},
    },
    # BEIT_FAST_BACKEND=triton: every Triton op of the model through its kernel (the interpreter on CPU)
    "fused_model.triton": {
        fp32: Close(atol=1e-4, rtol=1e-3),
    },
}


def tolerance(op, dtype, name=None):
    """The bound of TOLERANCES for op and dtype, and the tensor name where the op's entry distinguishes them."""
    entry = TOLERANCES[op][dtype]
    if isinstance(entry, dict):
        if name not in entry:
            raise KeyError(f"{op} {dtype}: no tolerance for tensor {name!r} (has {sorted(entry)})")
        return entry[name]
    return entry


def assert_close(name, actual, expected, bound):
    """torch.testing.assert_close within a Close bound; its message starts with name."""
    assert isinstance(bound, Close), f"{name}: {bound} is not an (atol, rtol) bound"
    torch.testing.assert_close(actual, expected, atol=bound.atol, rtol=bound.rtol, msg=lambda m: f"{name}: {m}")


def ulp(x: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype`'s numbers at magnitude x (0 for x = 0)."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(x)) if x > 0 else 0.0


def max_error(t, ref):
    """max |t - ref|, computed in ref's dtype (the fp64 or fp32 reference)."""
    return (t.to(ref.dtype) - ref).abs().max().item()


def assert_two_x(name, ours, ref_lowp, ref, atol):
    """The 2x rule: ours is at most twice as far from the (fp64 or fp32) reference ref as PyTorch's own
    computation ref_lowp in the same low precision, plus atol. Shapes are the caller's to check."""
    err, base = max_error(ours, ref), max_error(ref_lowp, ref)
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x PyTorch's {base:.3g} + {atol:.3g}"
