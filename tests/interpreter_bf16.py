"""bf16 for the Triton interpreter, for the tests: the kernels' bf16 paths checked on the CPU.

Triton's interpreter keeps a bf16 value as its 16 raw bits in a numpy uint16 array (numpy has no bf16). It
converts bf16 <-> fp32 correctly in an explicit cast, but every other operation works on the raw bits as if
they were integers (tl.dot, +, *, exp, ...), and its fp32 -> bf16 cast truncates where a GPU rounds to
nearest even. `install()` wraps the interpreter's builder so that each arithmetic operation on bf16 operands
decodes them to fp32, computes, and rounds a bf16 result back to nearest even through torch; tl.dot of bf16
operands multiplies the (exact) fp32 values and accumulates in fp32, which is what a tensor core does. Data
movement (loads, stores, tl.where, reshapes, transposes) moves bits and stays as it is. A bf16 reduction, scan
or atomic (which our kernels never do: they reduce in fp32) raises rather than return a wrong number.

It is test infrastructure, not a fast path: beit_fast itself refuses bf16 under the interpreter unless this
has been installed (beit_fast._backend.interpreter_bf16_problem).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import numpy as np
import torch

from beit_fast._backend import INTERPRETER_PROBLEM, BF16_EMULATION_MARK

MARK = BF16_EMULATION_MARK   # defined and read by beit_fast._backend (interpreter_bf16_problem)
_PATCHED = ("binary_op", "unary_op", "ternary_op", "create_fma", "create_dot", "cast_impl", "create_fp_to_fp",
            "create_erf", "create_rsqrt", "create_atomic_rmw", "create_atomic_cas")


def _bits_to_f32(bits) -> np.ndarray:
    a = np.array(bits, dtype=np.uint16).view(np.int16)
    return torch.from_numpy(a).view(torch.bfloat16).float().numpy()


def _f64_to_f32(x, odd: bool) -> np.ndarray:
    """float64 -> float32 toward zero; odd=True: round to odd (an inexact result gets its last bit set), so that
    rounding that to bf16 to nearest even rounds the float64 value once (torch's float64 -> bf16 goes through
    float32 to nearest, which rounds twice)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
        away = np.isfinite(x) & (np.abs(f.astype(np.float64)) > np.abs(x))
    f = np.where(away, np.nextafter(f, np.float32(0)), f).astype(np.float32)
    if odd:
        inexact = np.isfinite(x) & (f.astype(np.float64) != x)
        f = (f.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)
    return f


def _to_bits(x) -> np.ndarray:
    """float array (any float dtype) -> bf16 bits, rounded to nearest even once."""
    a = np.array(x)
    a = _f64_to_f32(a, odd=True) if a.dtype == np.float64 else a.astype(np.float32)
    return torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def problem() -> Optional[str]:
    """Why the bf16 Triton kernels cannot run in this test process (None: a GPU, or the emulated interpreter)."""
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "needs a GPU or TRITON_INTERPRET=1"
    module = sys.modules.get("triton.runtime.interpreter")
    if module is None or not getattr(module, MARK, False):
        return "the bf16 emulation of the Triton interpreter is not installed (tests/conftest.py installs it)"
    return None


INSTALL_PROBLEM: Optional[str] = "install() was not called"


def install() -> Optional[str]:
    """Patch the interpreter of the imported Triton; returns why it could not (None: installed), and keeps
    that in INSTALL_PROBLEM."""
    global INSTALL_PROBLEM
    INSTALL_PROBLEM = _install()
    return INSTALL_PROBLEM


def _install() -> Optional[str]:
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except Exception as e:  # pragma: no cover - Triton missing
        return f"triton cannot be imported: {e}"
    if getattr(ti, MARK, False):
        return None
    B = getattr(ti, "InterpreterBuilder", None)
    R = getattr(ti, "ReduceOps", None)
    missing = [n for n in _PATCHED if B is None or not hasattr(B, n)] + \
              [n for n in ("sum", "min_max") if R is None or not hasattr(R, n)]
    if missing or not hasattr(ti, "TensorHandle"):
        return f"this Triton's interpreter lacks {missing or ['TensorHandle']} (bf16 emulation written for 3.2-3.8)"
    TH, bf16 = ti.TensorHandle, tl.bfloat16

    def is_bf16(h) -> bool:
        return h.dtype.scalar == bf16

    def val(h) -> np.ndarray:
        """A handle's values as numbers: bf16 decoded to fp32, anything else as it is."""
        return _bits_to_f32(h.data) if is_bf16(h) else h.data

    def result(out, dtype):
        """Wrap a computed result of handle dtype `dtype`: a float result of a bf16 op is rounded to bf16; a
        comparison is an int1 handle (the stock interpreter would tag its 0/1 with the operands' bf16)."""
        out = np.asarray(out)
        if out.dtype == np.bool_:  # a comparison
            return TH(out, tl.int1)
        return TH(_to_bits(out) if dtype == bf16 else out, dtype)

    orig = {n: getattr(B, n) for n in _PATCHED}
    orig_sum, orig_min_max = R.sum, R.min_max

    def wrap(name, fn):
        functools.update_wrapper(fn, orig[name])
        setattr(B, name, fn)

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return orig["binary_op"](self, lhs, rhs, op)
        return result(op(val(lhs), val(rhs)), lhs.dtype.scalar)

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return orig["unary_op"](self, arg, op)
        return result(op(val(arg)), bf16)

    def ternary_op(self, lhs, rhs, other, op):
        # tl.where selects bits; anything else (clamp) computes
        if op is np.where or not any(is_bf16(h) for h in (lhs, rhs, other)):
            return orig["ternary_op"](self, lhs, rhs, other, op)
        return result(op(val(lhs), val(rhs), val(other)), other.dtype.scalar)

    def create_fma(self, x, y, z):
        if not any(is_bf16(h) for h in (x, y, z)):
            return orig["create_fma"](self, x, y, z)
        return result(val(x) * val(y) + val(z), z.dtype.scalar)

    def create_dot(self, a, b, d, *args, **kwargs):
        if not (is_bf16(a) or is_bf16(b) or is_bf16(d)):
            return orig["create_dot"](self, a, b, d, *args, **kwargs)
        acc = val(d).astype(np.float32)
        return result(np.matmul(val(a).astype(np.float32), val(b).astype(np.float32)) + acc, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if not (is_bf16(src) or dst == bf16):
            return orig["cast_impl"](self, src, dst_type)
        if dst == bf16:
            return TH(_to_bits(val(src).astype(np.float64) if src.data.dtype.kind in "iub" else val(src)), bf16)
        return TH(val(src).astype(ti._get_np_dtype(dst_type)), dst)

    def is_fp8(t) -> bool:
        return t.primitive_bitwidth == 8 and t.is_floating()

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        if not (is_bf16(src) or dst == bf16):
            return orig["create_fp_to_fp"](self, src, dst_type, rounding_mode)
        if is_fp8(dst):      # bf16 -> fp32 (exact), then the stock fp32 -> fp8
            return orig["create_fp_to_fp"](self, TH(val(src), tl.float32), dst_type, rounding_mode)
        if is_fp8(src.dtype.scalar):   # the stock fp8 -> fp32 (exact), then to bf16
            return TH(_to_bits(orig["create_fp_to_fp"](self, src, tl.float32, rounding_mode).data), bf16)
        if dst == bf16 and rounding_mode is not None and "RTZ" in str(rounding_mode):
            f = _f64_to_f32(val(src), odd=False)                         # toward zero, then drop the low bits
            return TH((f.view(np.uint32) >> 16).astype(np.uint16), bf16)
        return cast_impl(self, src, dst_type)

    def create_erf(self, arg):
        if not is_bf16(arg):
            return orig["create_erf"](self, arg)
        return result(np.vectorize(__import__("math").erf, otypes=[np.float64])(val(arg)), bf16)

    def create_rsqrt(self, arg):
        if not is_bf16(arg):
            return orig["create_rsqrt"](self, arg)
        return result(1 / np.sqrt(val(arg)), bf16)

    def refuse(name):
        def fn(self, *args):
            if any(isinstance(a, TH) and is_bf16(a) for a in args):
                raise NotImplementedError(f"{name} on bf16 values is not emulated (tests/interpreter_bf16.py)")
            return orig[name](self, *args)
        return fn

    def reduce_sum(self, input):
        if input.dtype.scalar == bf16:
            raise NotImplementedError("tl.sum of bf16 values is not emulated (tests/interpreter_bf16.py)")
        return orig_sum(self, input)

    def reduce_min_max(self, input, *args, **kwargs):
        v = input[0] if isinstance(input, tuple) else input
        if v.dtype.scalar == bf16:
            raise NotImplementedError("tl.min / tl.max of bf16 values is not emulated (tests/interpreter_bf16.py)")
        return orig_min_max(self, input, *args, **kwargs)

    for name, fn in (("binary_op", binary_op), ("unary_op", unary_op), ("ternary_op", ternary_op),
                     ("create_fma", create_fma), ("create_dot", create_dot), ("cast_impl", cast_impl),
                     ("create_fp_to_fp", create_fp_to_fp), ("create_erf", create_erf),
                     ("create_rsqrt", create_rsqrt), ("create_atomic_rmw", refuse("create_atomic_rmw")),
                     ("create_atomic_cas", refuse("create_atomic_cas"))):
        wrap(name, fn)
    R.sum, R.min_max = functools.wraps(orig_sum)(reduce_sum), functools.wraps(orig_min_max)(reduce_min_max)
    S = getattr(ti, "ScanOps", None)
    for name in ("cumsum", "cumprod"):
        if S is not None and hasattr(S, name):
            def scan(self, input, _orig=getattr(S, name), _name=name):
                if input.dtype.scalar == bf16:
                    raise NotImplementedError(f"tl.{_name} of bf16 values is not emulated (tests/interpreter_bf16.py)")
                return _orig(self, input)
            setattr(S, name, functools.wraps(getattr(S, name))(scan))
    if not hasattr(B, "get_bf16"):   # a bf16 scalar constant (`x * 2` with x bf16)
        B.get_bf16 = lambda self, value: TH(_to_bits(np.array([value], dtype=np.float64)), bf16)
    setattr(ti, MARK, True)
    return None


def needs_bf16():
    """pytest mark: skip unless bf16 Triton kernels can run (a GPU, or the interpreter with the emulation)."""
    import pytest
    why = problem()
    return pytest.mark.skipif(why is not None, reason=f"bf16 Triton kernels: {why}")


def interpreting() -> bool:
    """Whether this test process runs the Triton kernels through the interpreter (no GPU, TRITON_INTERPRET=1,
    an interpreter that works with this numpy)."""
    return (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
            and not INTERPRETER_PROBLEM)


def needs_cpu_bf16():
    """pytest mark: skip unless bf16 Triton kernels run on CPU tensors here (the interpreter, emulated)."""
    import pytest
    why = problem() if interpreting() else "the Triton interpreter is not in use here"
    return pytest.mark.skipif(why is not None, reason=f"bf16 Triton kernels on the CPU: {why}")


def refused_without_emulation(monkeypatch):
    """Take the emulation's mark off for one test: beit_fast must then refuse bf16 under the interpreter."""
    module = sys.modules.get("triton.runtime.interpreter")
    if module is not None:
        monkeypatch.setattr(module, MARK, False, raising=False)
