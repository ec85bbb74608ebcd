"""The bf16 emulation of the Triton interpreter (tests/interpreter_bf16.py), checked against PyTorch's own bf16
arithmetic on the CPU: every op the kernels use on bf16 values, the casts with round-to-nearest-even ties,
tl.dot with fp32 accumulation; and the stock interpreter shown wrong without it."""
import os
import subprocess
import sys

import pytest
import torch

import interpreter_bf16

emulated = interpreter_bf16.needs_cpu_bf16()


@pytest.mark.skipif(not interpreter_bf16.interpreting(), reason="the Triton interpreter is not in use here")
def test_the_emulation_is_installed():
    """Where the interpreter runs the kernels, the bf16 tests must not all skip because the emulation failed to
    install (for example a Triton whose interpreter renamed what it wraps)."""
    assert interpreter_bf16.INSTALL_PROBLEM is None and interpreter_bf16.problem() is None, (
        interpreter_bf16.INSTALL_PROBLEM or interpreter_bf16.problem())

try:
    import triton
    import triton.language as tl
except Exception:   # pragma: no cover - the skip above says why
    triton = None

if triton is not None:

    @triton.jit
    def _elementwise_kernel(X, Y, ADD, SUB, MUL, DIV, MAX, LESS, WHERE, SCALED, FMA, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        x = tl.load(X + o)
        y = tl.load(Y + o)
        tl.store(ADD + o, x + y)
        tl.store(SUB + o, x - y)
        tl.store(MUL + o, x * y)
        tl.store(DIV + o, x / y)
        tl.store(MAX + o, tl.maximum(x, y))
        tl.store(LESS + o, (x < y).to(tl.int8))
        tl.store(WHERE + o, tl.where(x < y, x, y))
        tl.store(SCALED + o, x * 3 + 0.5)           # Python constants become bf16 scalars
        tl.store(FMA + o, tl.fma(x, y, x))

    @triton.jit
    def _cast_kernel(F32, F64, I32, BF_FROM_F32, BF_FROM_F64, BF_FROM_I32, F32_FROM_BF, F16_FROM_BF,
                     I32_FROM_BF, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        f = tl.load(F32 + o)
        tl.store(BF_FROM_F32 + o, f.to(tl.bfloat16))
        tl.store(BF_FROM_F64 + o, tl.load(F64 + o).to(tl.bfloat16))
        tl.store(BF_FROM_I32 + o, tl.load(I32 + o).to(tl.bfloat16))
        b = f.to(tl.bfloat16)
        tl.store(F32_FROM_BF + o, b.to(tl.float32))
        tl.store(F16_FROM_BF + o, b.to(tl.float16))
        tl.store(I32_FROM_BF + o, b.to(tl.int32))

    @triton.jit
    def _unary_kernel(X, ABS, NEG, MIN, CLAMP, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        x = tl.load(X + o)
        tl.store(ABS + o, tl.abs(x))
        tl.store(NEG + o, -x)
        tl.store(MIN + o, tl.minimum(x, 0.25))
        tl.store(CLAMP + o, tl.clamp(x, -1.0, 0.5))

    @triton.jit
    def _dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(A + rm[:, None] * K + rk[None, :])
        b = tl.load(B + rk[:, None] * N + rn[None, :])
        tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b))

    @triton.jit
    def _sum_kernel(X, OUT, BLOCK: tl.constexpr):
        tl.store(OUT, tl.sum(tl.load(X + tl.arange(0, BLOCK))))

    @triton.jit
    def _cumsum_kernel(X, OUT, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(OUT + o, tl.cumsum(tl.load(X + o), 0))

    @triton.jit
    def _scan_kernel(X, OUT, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(OUT + o, tl.associative_scan(tl.load(X + o), 0, tl.standard._sum_combine))

    @triton.jit
    def _max_kernel(X, OUT, BLOCK: tl.constexpr):
        tl.store(OUT, tl.reduce(tl.load(X + tl.arange(0, BLOCK)), 0, tl.standard._elementwise_max))

    @triton.jit
    def _fp8_kernel(X, OUT, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(OUT + o, tl.load(X + o).to(tl.float8e5).to(OUT.dtype.element_ty))


BLOCK = 256
bf16 = torch.bfloat16


@emulated
def test_elementwise_ops_round_like_torch():
    x = (torch.randn(BLOCK) * 4).to(bf16)
    y = (torch.randn(BLOCK) * 4).to(bf16)
    y[y == 0] = 1
    x[:8] = y[:8]                                   # equal operands: the comparison's edge
    outs = {n: torch.empty(BLOCK, dtype=bf16) for n in ("add", "sub", "mul", "div", "max", "where", "scaled", "fma")}
    outs["less"] = torch.empty(BLOCK, dtype=torch.int8)
    o = outs
    _elementwise_kernel[(1,)](x, y, o["add"], o["sub"], o["mul"], o["div"], o["max"], o["less"], o["where"],
                              o["scaled"], o["fma"], BLOCK=BLOCK)
    f, g = x.float(), y.float()
    want = {"add": x + y, "sub": x - y, "mul": x * y, "div": x / y, "max": torch.maximum(x, y),
            "less": (x < y).to(torch.int8), "where": torch.where(x < y, x, y),
            # one rounding per Triton op, as on a GPU
            "scaled": ((x * 3).float() + 0.5).to(bf16), "fma": (f * g + f).to(bf16)}
    for name in want:
        assert torch.equal(outs[name], want[name]), name


@emulated
def test_casts_round_to_nearest_even():
    # exact ties between two bf16 values (spacing 2^-7 at 1): 1 + 2^-8 -> 1 (even), 1 + 3 * 2^-8 -> 1 + 2^-6
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 3 * 2 ** -8), 2 ** -130, 4097.0, 0.0, -0.0])
    f32 = torch.cat([ties, torch.randn(BLOCK - ties.numel()) * 100])
    # float64 values just above or below the midpoint of two neighbouring bf16 values: rounding once picks the
    # side, rounding through float32 first (torch's own double -> bf16) would land on the midpoint and tie
    lo = (torch.randn(BLOCK) * 100).to(bf16)
    hi = (lo.view(torch.int16) + 1).view(bf16)          # the next bf16 away from zero
    side = torch.randint(0, 2, (BLOCK,)).bool()
    mid = (lo.double() + hi.double()) / 2
    f64 = mid + torch.where(side, 1.0, -1.0).double() * (hi.double() - lo.double()).abs() * 2 ** -30
    f64_want = torch.where(side == (lo.double() > 0), hi, lo)
    f64_want = torch.where(lo.double() == 0, lo, f64_want)   # keep the test's zero-free construction honest
    i32 = torch.randint(-100000, 100000, (BLOCK,), dtype=torch.int32)
    bf_f32, bf_f64, bf_i32 = (torch.empty(BLOCK, dtype=bf16) for _ in range(3))
    f32_bf, f16_bf, i32_bf = torch.empty(BLOCK), torch.empty(BLOCK, dtype=torch.float16), torch.empty_like(i32)
    _cast_kernel[(1,)](f32, f64, i32, bf_f32, bf_f64, bf_i32, f32_bf, f16_bf, i32_bf, BLOCK=BLOCK)
    assert torch.equal(bf_f32, f32.to(bf16))
    assert bf_f32[0].item() == 1.0 and bf_f32[1].item() == 1 + 2 ** -6
    nonzero = lo.double() != 0
    assert torch.equal(bf_f64[nonzero], f64_want[nonzero])
    assert torch.equal(bf_i32, i32.to(bf16))
    assert torch.equal(f32_bf, f32.to(bf16).float())
    assert torch.equal(f16_bf, f32.to(bf16).half())
    assert torch.equal(i32_bf, f32.to(bf16).to(torch.int32))


@emulated
def test_fp8_conversions_go_through_the_stock_ones():
    """bf16 -> fp8 (e5m2) -> bf16 gives what the stock interpreter gives for the same values in fp32: the
    emulation hands fp8 conversions to it through exact fp32 (it does not judge the stock fp8 rounding)."""
    x = (torch.randn(BLOCK) * 4).to(bf16)
    via_bf16, via_fp32 = torch.empty(BLOCK, dtype=bf16), torch.empty(BLOCK)
    _fp8_kernel[(1,)](x, via_bf16, BLOCK=BLOCK)
    _fp8_kernel[(1,)](x.float(), via_fp32, BLOCK=BLOCK)
    assert torch.equal(via_bf16.float(), via_fp32)


@emulated
def test_unary_ops_match_torch():
    """(exp, sqrt, erf, ... take only fp32 / fp64 in Triton: the kernels upcast before them.)"""
    x = (torch.randn(BLOCK) * 2).to(bf16)
    outs = [torch.empty(BLOCK, dtype=bf16) for _ in range(4)]
    _unary_kernel[(1,)](x, *outs, BLOCK=BLOCK)
    want = [x.abs(), -x, torch.minimum(x, torch.tensor(0.25, dtype=bf16)), x.clamp(-1.0, 0.5)]
    for name, o, w in zip(["abs", "neg", "minimum", "clamp"], outs, want):
        assert torch.equal(o, w), name


@emulated
def test_dot_multiplies_exactly_and_accumulates_in_fp32():
    a, b = torch.randn(32, 64).to(bf16), torch.randn(64, 16).to(bf16)
    c = torch.empty(32, 16)
    _dot_kernel[(1,)](a, b, c, M=32, N=16, K=64)
    exact = a.double() @ b.double()
    # 64 fp32 additions: a few fp32 ulps of the partial sums, far below one bf16 ulp
    torch.testing.assert_close(c.double(), exact, rtol=1e-5, atol=1e-5)


@emulated
@pytest.mark.parametrize("kind", ["sum", "cumsum", "scan", "max"])
def test_bf16_reductions_refuse_or_are_promoted(kind):
    """A reduction or scan the interpreter computes with numpy over bf16 values is not emulated and refuses,
    unless this Triton promotes bf16 to fp32 first (tl.cumsum and tl.max always do, tl.sum on 3.2): then the
    result is the fp32 one rounded once. tl.reduce / tl.associative_scan with Triton's own combine functions
    reach the refusals on every version."""
    from triton.runtime.errors import InterpreterError
    x = torch.randn(BLOCK).to(bf16)
    kernel, out, want, must_refuse = {
        "sum": (_sum_kernel, torch.empty(1, dtype=bf16), x.float().sum().reshape(1), False),
        "cumsum": (_cumsum_kernel, torch.empty(BLOCK, dtype=bf16), x.float().cumsum(0), False),
        "scan": (_scan_kernel, torch.empty(BLOCK, dtype=bf16), None, True),
        "max": (_max_kernel, torch.empty(1, dtype=bf16), None, True),
    }[kind]
    try:
        kernel[(1,)](x, out, BLOCK=BLOCK)
    except InterpreterError as e:
        assert "not emulated" in str(e)
        return
    assert not must_refuse, f"{kind} of bf16 values ran without the emulation's refusal"
    torch.testing.assert_close(out.float(), want.to(bf16).float(), rtol=2 ** -7, atol=1e-3)


@emulated
def test_the_stock_interpreter_gets_bf16_wrong():
    """Why the emulation exists: without it (a fresh process) the same dot is far off."""
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import test_interpreter_bf16 as t\n"
        "torch.manual_seed(0)\n"
        "a, b = torch.randn(32, 64).to(torch.bfloat16), torch.randn(64, 16).to(torch.bfloat16)\n"
        "c = torch.empty(32, 16)\n"
        "t._dot_kernel[(1,)](a, b, c, M=32, N=16, K=64)\n"
        "print((c.double() - a.double() @ b.double()).abs().max().item())\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) > 1.0


def test_beit_fast_refuses_bf16_under_the_stock_interpreter(monkeypatch):
    """beit_fast._backend.interpreter_bf16_problem: a reason exactly when the interpreter is on, a tensor is bf16
    (on any device: the interpreter copies them to the host) and the emulation has not marked the interpreter."""
    import triton.runtime.interpreter as ti

    from beit_fast._backend import interpreter_bf16_problem
    cpu, meta, f32 = (torch.empty(1, dtype=bf16), torch.empty(1, dtype=bf16, device="meta"), torch.empty(1))
    monkeypatch.setattr(ti, interpreter_bf16.MARK, False, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "cannot do bf16" in interpreter_bf16_problem([f32, cpu])
    assert "cannot do bf16" in interpreter_bf16_problem([meta])
    assert interpreter_bf16_problem([f32]) is None
    monkeypatch.setattr(ti, interpreter_bf16.MARK, True)
    assert interpreter_bf16_problem([cpu, meta]) is None
    monkeypatch.setattr(ti, interpreter_bf16.MARK, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert interpreter_bf16_problem([cpu]) is None      # not the interpreter: the other reasons apply
