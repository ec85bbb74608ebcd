"""The CUDA kernels of csrc/ (layer_scale_residual_norm, masked_patch_embed, the column sum) run on the CPU by
the emulator in tests/cuda_emulator, through the same launch code as on a GPU, and compared with the C++ CPU ops.

The CPU ops are the tested twins (test_layer_scale_residual_norm.py, test_masked_patch_embed.py check them
against the PyTorch references); the per-element formulas are shared, so what differs, and what these tests
check, is the CUDA side: thread/vector index math, launch geometry, block and warp reductions, the grid-stride
backward and its partial sums, the vectorized and scalar paths. Skipped where a GPU runs the real kernels."""
import contextlib
import os

import pytest
import torch

from beit_fast._backend import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
    pytest.mark.skipif(extension()[0] is None, reason="beit_fast._C is not built"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA kernels run for real there"),
]
fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(scope="module")
def emu():
    """Builds (once per torch version; ninja rebuilds what changed) and loads torch.ops.beit_fast_emulated."""
    csrc = os.path.join(ROOT, "csrc")
    here = os.path.join(ROOT, "tests", "cuda_emulator")
    # BEIT_FAST_EMULATOR_ASAN=1 builds it with AddressSanitizer, which then reports any kernel access outside
    # its tensors. The last test below runs this file so; by hand: LD_PRELOAD="$(gcc -print-file-name=libasan.so)
    # $(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 (libstdc++ too: ASan must see it).
    asan = os.environ.get("BEIT_FAST_EMULATOR_ASAN", "0") not in ("", "0")
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    name = "beit_fast_cuda_emulated" + ("_asan" if asan else "")
    with _build_directory(f"{name}-torch{torch.__version__}") as build_dir:
        from torch.utils.cpp_extension import load
        load(name=name, build_directory=build_dir,
             sources=[os.path.join(here, "emulated_ops.cpp"), os.path.join(csrc, "masked_patch_embed.cpp"),
                      os.path.join(csrc, "layer_scale_residual_norm.cpp")],
             extra_include_paths=[csrc, here],
             extra_cflags=["-O2", "-ffp-contract=off", "-DBEIT_FAST_NO_OP_REGISTRATION"] + sanitize,
             extra_ldflags=sanitize, is_python_module=False, verbose=False)
    return torch.ops.beit_fast_emulated


@contextlib.contextmanager
def _build_directory(tag: str):
    """build/cuda_emulator/<tag> in this checkout, held under an exclusive flock while torch builds and loads.

    torch's JIT loader guards a build with a `lock` file that it deletes when done; a build killed midway (a
    test run interrupted during the build) leaves that file behind, and every later load of the same
    directory then waits for it forever. Here only this fixture builds in the directory, always under the
    flock, which the OS releases when its holder dies: a `lock` file found while holding the flock is such a
    leftover and is removed. A private directory also keeps two torch versions (same Python and CUDA, so the
    same ~/.cache/torch_extensions folder) from sharing objects."""
    import fcntl
    import tempfile
    tag = tag.replace("+", "_")
    path = os.path.join(ROOT, "build", "cuda_emulator", tag)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:   # a read-only checkout: a per-user folder instead
        path = os.path.join(tempfile.gettempdir(), f"beit_fast_cuda_emulator_{os.getuid()}", tag)
        os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "flock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            stale = os.path.join(path, "lock")
            if os.path.exists(stale):
                os.remove(stale)
            yield path
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


class Counted:
    """What the emulator ran inside the with-block: launches, blocks, barriers, shuffles."""

    def __init__(self, emu):
        self.emu = emu

    def __enter__(self):
        self.start = self.emu.launch_stats()
        return self

    def __exit__(self, *exc):
        end = self.emu.launch_stats()
        self.launches, self.blocks, self.barriers, self.shuffles = (b - a for a, b in zip(self.start, end))


def close(actual, expected, dtype, name):
    # Same formulas, different summation order in the reductions: fp32 to a few ulps; low-precision outputs may
    # round to the neighbouring value.
    tol = {fp32: (2e-5, 2e-5), fp16: (2e-3, 2e-3), bf16: (1.6e-2, 1.6e-2)}[dtype]
    torch.testing.assert_close(actual, expected, atol=tol[0], rtol=tol[1], msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------ column sum

@pytest.mark.parametrize("rows,cols", [(1, 1), (33, 31), (100, 70), (7, 64)])
def test_column_sum(emu, rows, cols):
    part = torch.randn(rows, cols)
    with Counted(emu) as c:
        out = emu.column_sum(part)
    torch.testing.assert_close(out.double(), part.double().sum(0), atol=1e-5, rtol=1e-5)
    assert c.blocks == (cols + 31) // 32 and c.barriers == c.blocks


# ---------------------------------------------------------------------------- layer_scale_residual_norm

DTYPES = {"fp32": (fp32, fp32), "fp16": (fp16, fp16), "bf16": (bf16, bf16), "fp32+fp16": (fp32, fp16),
          "fp32+bf16": (fp32, bf16)}
# C for each launch plan. Vectorized (16-byte accesses: 4 fp32 or 8 fp16/bf16 elements), NV vectors per
# thread: fp32 768 / 1536 / 4096 / 6144 give NV = 1 / 2 / 4 / 8, fp16 768 / 3072 / 6144 / 12288 the same
# (fp32 3072 is NV 4; fp32 12288 is beyond the kernel: a clear error). Scalar fallback (C not a multiple of
# the vector width): 7 (one warp), 1001 (4 warps), 8191 (1024 threads, 32 warps: the whole shared array).
CHANNELS = [768, 1536, 3072, 4096, 6144, 12288, 7, 1001, 8191]


WARP_ROWS = 4   # the forward's warp-per-row plan: rows per block (kWarpRows)


def warp_plan(C, tx, aligned=True):
    """Whether the forward takes one row per warp: vectorized rows of at most 32 x 8 vectors."""
    vw = 16 // (torch.finfo(tx).bits // 8)
    return aligned and C % vw == 0 and C // vw <= 32 * 8


def plan_threads(C, tx, aligned=True):
    """The block size make_plan picks for a block per row (None: C too large for the CUDA kernel)."""
    vw = 16 // (torch.finfo(tx).bits // 8)
    if aligned and C % vw == 0:
        for nv in (1, 2, 4, 8):
            t = -(-(C // vw) // nv)
            if t <= 256:
                return -(-t // 32) * 32
    t = -(-C // 8)  # 8 scalars per thread
    return -(-t // 32) * 32 if t <= 1024 else None


def lsrn_inputs(B, N, C, tx, ty, gamma=True, scale=True, ln=True, ln_bias=True, misaligned=False):
    x = torch.randn(B, N, C).to(tx)
    if misaligned:
        x = misalign(x)
    y = torch.randn(B, N, C).to(ty)
    keep = torch.rand(B) < 0.7
    keep[-1] = True                       # one sample kept (else the branch would be all zero) ...
    keep[0] = keep[0] if B == 1 else False   # ... and with B > 1 one dropped
    return (x, y, 0.5 + torch.rand(C) if gamma else None, keep.float() / 0.7 if scale else None,
            1 + 0.2 * torch.randn(C) if ln else None, 0.2 * torch.randn(C) if ln and ln_bias else None)


def misalign(t):
    """A contiguous copy of t that starts one element past a 16-byte boundary: the kernels' scalar paths."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    buf[1:] = t.flatten()
    out = buf[1:].view(t.shape)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def forward_counts(rows, C, tx, plan, aligned=True):
    """(blocks, barriers, shuffles) of one forward launch, the LayerNorm included."""
    if plan == "warp" and warp_plan(C, tx, aligned):   # a warp per row: two warp sums of 5 shuffles, no barrier
        return -(-rows // WARP_ROWS), 0, rows * 2 * 5
    # a block per row: two block sums of two barriers each, each a warp sum of 5 shuffles in every warp
    return rows, 4 * rows, rows * 2 * 5 * (plan_threads(C, tx, aligned) // 32)


@pytest.mark.parametrize("plan", ["warp", "block"])
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("dt", list(DTYPES))
def test_lsrn_forward(emu, monkeypatch, dt, C, plan):
    """Both forward plans (BEIT_FAST_LSRN_FORWARD): a row per warp where the row fits (4 rows per block; the
    10 rows here leave the last block two warps without a row), else and with "block" a block per row."""
    monkeypatch.setenv("BEIT_FAST_LSRN_FORWARD", plan)
    tx, ty = DTYPES[dt]
    args = lsrn_inputs(2, 5, C, tx, ty)
    if plan_threads(C, tx) is None:
        with pytest.raises(RuntimeError, match="too large"):
            emu.layer_scale_residual_norm(*args, 1e-6)
        return
    with Counted(emu) as c:
        s, n, mean, rstd = emu.layer_scale_residual_norm(*args, 1e-6)
    s_ref, n_ref, mean_ref, rstd_ref = torch.ops.beit_fast.layer_scale_residual_norm(*args, 1e-6)
    assert torch.equal(s, s_ref), "the residual sum is elementwise: it must match bit for bit"
    close(mean, mean_ref, fp32, "mean")
    close(rstd, rstd_ref, fp32, "rstd")
    close(n, n_ref, tx, "n")
    assert (c.blocks, c.barriers, c.shuffles) == forward_counts(10, C, tx, plan)


def test_lsrn_long_misaligned_row_names_the_alignment(emu):
    """A 16-bit row past the scalar path's 8192 elements runs only vectorized: when a tensor is not 16-byte
    aligned the error names that, not C (12288 is within the vector path's 16384)."""
    args = lsrn_inputs(1, 2, 12288, bf16, bf16)
    emu.layer_scale_residual_norm(*args, 1e-6)
    with pytest.raises(RuntimeError, match="16-byte aligned") as e:
        emu.layer_scale_residual_norm(misalign(args[0]), *args[1:], 1e-6)
    assert "too large" not in str(e.value)
    with pytest.raises(RuntimeError, match="C = 8196 is too large"):   # not a multiple of 8: too large indeed
        emu.layer_scale_residual_norm(*lsrn_inputs(1, 2, 8196, bf16, bf16), 1e-6)


def test_lsrn_forward_plan_setting(emu, monkeypatch):
    """BEIT_FAST_LSRN_FORWARD accepts warp or block (empty, like unset: warp) and names itself when it is
    anything else."""
    args = lsrn_inputs(1, 3, 768, bf16, bf16)
    monkeypatch.setenv("BEIT_FAST_LSRN_FORWARD", "")
    with Counted(emu) as c:
        emu.layer_scale_residual_norm(*args, 1e-6)
    assert c.blocks == 1   # 3 rows, one block of warps
    monkeypatch.setenv("BEIT_FAST_LSRN_FORWARD", "rows")
    with pytest.raises(ValueError, match="BEIT_FAST_LSRN_FORWARD must be warp or block, got 'rows'"):
        emu.layer_scale_residual_norm(*args, 1e-6)


def misalign_params(args):
    """lsrn_inputs' args with gamma, ln_weight and ln_bias moved off 16-byte boundaries (their scalar loads)."""
    x, y, gamma, scale, w, b = args
    return (x, y, *(None if t is None else misalign(t) for t in (gamma,)), scale,
            *(None if t is None else misalign(t) for t in (w, b)))


@pytest.mark.parametrize("variant", ["no_norm", "no_layer_scale", "drop_path_no_layer_scale", "norm_without_bias",
                                     "misaligned", "misaligned_params", "misaligned_params_bf16"])
def test_lsrn_forward_variants(emu, variant):
    """Variants of the forward; the parameters (gamma, ln_weight, ln_bias) come as float4 loads when aligned
    (all other cases) and as scalars when not (misaligned_params: fp32 rows, one float4 per vector; bf16: two)."""
    kw = {"no_norm": dict(ln=False), "no_layer_scale": dict(gamma=False, scale=False),
          "drop_path_no_layer_scale": dict(gamma=False),
          "norm_without_bias": dict(ln_bias=False), "misaligned": dict(misaligned=True)}.get(variant, {})
    if variant == "misaligned_params_bf16":
        args = misalign_params(lsrn_inputs(3, 4, 768, bf16, bf16))
        got = emu.layer_scale_residual_norm(*args, 1e-5)
        ref = torch.ops.beit_fast.layer_scale_residual_norm(*args, 1e-5)
        assert torch.equal(got[0], ref[0])
        close(got[1], ref[1], bf16, "n")
        return
    args = lsrn_inputs(3, 4, 768, fp32, fp32, **kw)
    if variant == "misaligned_params":
        args = misalign_params(args)
    with Counted(emu) as c:
        got = emu.layer_scale_residual_norm(*args, 1e-5)
    ref = torch.ops.beit_fast.layer_scale_residual_norm(*args, 1e-5)
    assert torch.equal(got[0], ref[0])
    for name, a, b in zip(["n", "mean", "rstd"], got[1:], ref[1:]):
        assert (a is None) == (b is None), name
        if a is not None:
            close(a, b, fp32, name)
    blocks, _, shuffles = forward_counts(12, 768, fp32, "warp", aligned=variant != "misaligned")
    assert c.blocks == blocks and c.shuffles == (0 if variant == "no_norm" else shuffles)


def lsrn_backward_both(emu, args, grads, mask, sms, y_dtype):
    """The emulated and the CPU backward on the CPU forward's saved tensors."""
    x, y, gamma, scale, w, b = args
    s, _, mean, rstd = torch.ops.beit_fast.layer_scale_residual_norm(*args, 1e-6)
    common = (grads[0], grads[1], s, y, y_dtype, gamma, scale, w, b, mean, rstd, mask)
    with Counted(emu) as c:
        got = emu.layer_scale_residual_norm_backward(*common, sms)
    ref = torch.ops.beit_fast.layer_scale_residual_norm_backward(*common)
    return got, ref, c


def check_backward(got, ref, dtypes):
    for name, a, b, dtype in zip(["dx", "dy", "dgamma", "dln_weight", "dln_bias"], got, ref, dtypes):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if name in ("dx", "dy"):
            close(a, b, dtype, name)
        else:  # fp32 sums over the rows in another order: relative to the size of the terms
            torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item() + 1e-5, rtol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("C", [768, 1536, 6144, 7, 8191])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_lsrn_backward(emu, dt, C):
    tx, ty = DTYPES[dt]
    B, N = 3, 37  # 111 rows: with sms=1 the grid is 7 blocks, each walking ~16 rows (the grid-stride loop)
    args = lsrn_inputs(B, N, C, tx, ty)
    grads = (torch.randn(B, N, C).to(tx), torch.randn(B, N, C).to(tx))
    got, ref, c = lsrn_backward_both(emu, args, grads, [True] * 5, 1, ty)
    check_backward(got, ref, [tx, ty, fp32, fp32, fp32])
    colsum_blocks = 3 * -(-C // 32)  # a column sum per parameter gradient, one barrier per block
    assert c.launches == 4 and c.blocks == 7 + colsum_blocks
    assert c.barriers == 2 * 111 + colsum_blocks  # one block sum pair (2 barriers) per row
    assert c.shuffles == 111 * 2 * 5 * plan_threads(C, tx) // 32


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_lsrn_backward_long_rows(emu, dt):
    """C = 12288 (over 8192: the 16-byte vector path only, as BEiT-sized rows never are): every gradient."""
    tx, ty = DTYPES[dt]
    B, N, C = 2, 5, 12288
    args = lsrn_inputs(B, N, C, tx, ty)
    grads = (torch.randn(B, N, C).to(tx), torch.randn(B, N, C).to(tx))
    got, ref, _ = lsrn_backward_both(emu, args, grads, [True] * 5, 1, ty)
    check_backward(got, ref, [tx, ty, fp32, fp32, fp32])


@pytest.mark.parametrize("case", ["no_grad_norm", "no_grad_sum", "only_dx", "no_gamma_no_scale", "no_gamma",
                                  "sm_limited",
                                  "row_limited", "one_row", "misaligned_grad", "misaligned_y", "misaligned_params"])
def test_lsrn_backward_variants(emu, case):
    B, N, C = {"one_row": (1, 1, 768), "sm_limited": (3, 100, 768), "row_limited": (3, 100, 768)}.get(
        case, (2, 50, 768))
    args = lsrn_inputs(B, N, C, fp32, fp32, gamma=case not in ("no_gamma_no_scale", "no_gamma"),
                       scale=case != "no_gamma_no_scale")
    gs, gn = torch.randn(B, N, C), torch.randn(B, N, C)
    if case == "misaligned_grad":
        gn = misalign(gn)
    if case == "misaligned_y":  # y is read for the gamma gradient only
        args = (args[0], misalign(args[1])) + args[2:]
    if case == "misaligned_params":  # gamma and ln_weight as scalar loads
        args = misalign_params(args)
    grads = (None if case == "no_grad_sum" else gs, None if case == "no_grad_norm" else gn)
    mask = [True, False, False, False, False] if case == "only_dx" else [True] * 5
    if case in ("no_gamma_no_scale", "no_gamma"):
        mask[2] = False
    sms = {"sm_limited": 1, "row_limited": 132}.get(case, 2)
    got, ref, c = lsrn_backward_both(emu, args, grads, mask, sms, fp32)
    check_backward(got, ref, [fp32] * 5)
    rows = B * N
    grid = max(1, min(8 * sms, -(-rows // 16)))   # the emulator's launcher reports 8 resident blocks per SM
    colsum_blocks = sum(mask[2:]) * -(-C // 32) if case not in ("no_grad_norm",) else -(-C // 32)
    assert c.blocks == grid + colsum_blocks, (c.blocks, grid, colsum_blocks)
    aligned = case not in ("misaligned_grad", "misaligned_y")   # (the parameters do not choose the plan)
    assert c.shuffles == (0 if case == "no_grad_norm" else rows * 2 * 5 * plan_threads(C, fp32, aligned) // 32)


def test_lsrn_backward_is_deterministic(emu):
    args = lsrn_inputs(2, 40, 768, fp32, fp32)
    grads = (torch.randn(2, 40, 768), torch.randn(2, 40, 768))
    first, _, _ = lsrn_backward_both(emu, args, grads, [True] * 5, 1, fp32)
    again, _, _ = lsrn_backward_both(emu, args, grads, [True] * 5, 1, fp32)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------------- masked_patch_embed

# (image size, patch, Cin, C): vectorized pixel runs (patch width a multiple of 16 bytes' worth of elements:
# 4 for fp32, 8 for fp16/bf16) and the scalar path (patch 3, C = 7).
MPE_SHAPES = {"p8": (32, 8, 3, 48), "p4": (16, 4, 3, 40), "p3_c7": (12, 3, 2, 7)}


def mpe_inputs(B, size, patch, Cin, C, dtype, masked=True, pos=True, bias=True):
    P = (size // patch) ** 2
    images = torch.randn(B, Cin, size, size).to(dtype)
    weight = (0.1 * torch.randn(C, Cin, patch, patch)).to(dtype)
    mask = torch.rand(B, P) < 0.4 if masked else None
    return (images, weight, 0.1 * torch.randn(C) if bias else None, mask,
            torch.randn(1, 1, C) if masked else None, torch.randn(1, 1, C),
            0.1 * torch.randn(1, 1 + P, C) if pos else None)


@pytest.mark.parametrize("shape", list(MPE_SHAPES))
@pytest.mark.parametrize("dtype", [fp32, fp16, bf16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", ["masked", "unmasked_no_pos_no_bias", "misaligned_images", "tokens_in_dtype"])
def test_masked_patch_embed(emu, shape, dtype, variant):
    """fp32 tokens with 16-bit images (autocast's case): the epilogue reads the 16-bit GEMM output and writes
    fp32 tokens; tokens_in_dtype: everything in one dtype, the epilogue in place."""
    size, patch, Cin, C = MPE_SHAPES[shape]
    masked = variant != "unmasked_no_pos_no_bias"
    args = mpe_inputs(3, size, patch, Cin, C, dtype, masked=masked, pos=masked, bias=masked)
    if variant == "misaligned_images":
        args = (misalign(args[0]),) + args[1:]
    if variant == "tokens_in_dtype":
        args = args[:4] + tuple(t.to(dtype) for t in args[4:])
    with Counted(emu) as c:
        out = emu.masked_patch_embed(*args)
    ref = torch.ops.beit_fast.masked_patch_embed(*args)
    assert c.launches == 2  # gather, then the epilogue on the GEMM output
    B, P, K = 3, (size // patch) ** 2, Cin * patch * patch
    out_dtype = torch.promote_types(dtype, args[5].dtype)
    assert out.dtype == ref.dtype == out_dtype
    vw = 16 // (torch.finfo(dtype).bits // 8)
    gather_vec = vw if patch % vw == 0 and size % vw == 0 and variant != "misaligned_images" else 1
    vw_out = min(vw, 16 // (torch.finfo(out_dtype).bits // 8))   # 16-byte accesses of the wider type
    epilogue_vec = vw_out if C % vw_out == 0 else 1
    assert c.blocks == -(-B * (1 + P) * K // gather_vec // 256) + -(-B * (1 + P) * C // epilogue_vec // 256)
    close(out, ref, dtype, "out")
    grad = torch.randn_like(out)
    need = [True, True] + [t is not None for t in (args[2], args[4])] + [True, args[6] is not None]
    with Counted(emu) as c:
        got = emu.masked_patch_embed_backward(grad, *args, need)
    want = torch.ops.beit_fast.masked_patch_embed_backward(grad, *args, need)
    assert c.launches == 3 + need[2] + need[3]  # scatter, gather, token sums; column sums for dbias, dmask_token
    names = ["dimages", "dweight", "dbias", "dmask_token", "dcls_token", "dpos_embed"]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if name == "dimages":
            assert torch.equal(a, b), "d_images is a scatter of d_patches: bit for bit"
        else:
            tol = 1e-4 if dtype == fp32 else 2e-2
            torch.testing.assert_close(a.float(), b.float(), atol=tol * (b.abs().max().item() + 1), rtol=tol,
                                       msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------- the emulator itself

def test_emulator_reports_a_broken_barrier(emu):
    """A kernel where one lane waits at __syncthreads while its warp shuffles can never finish on a GPU; the
    emulator must say so instead of hanging or passing."""
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.broken_kernel_for_tests()


def _libasan():
    import shutil
    import subprocess
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    paths = [subprocess.run([gcc, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
             for lib in ("libasan.so", "libstdc++.so")]
    return paths if all(os.path.isabs(p) and os.path.exists(p) for p in paths) else None


@pytest.mark.skipif(os.environ.get("BEIT_FAST_EMULATOR_ASAN", "0") not in ("", "0"), reason="this is that run")
def test_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
    """Every test above again, with the emulated module built with AddressSanitizer: a kernel that reads or
    writes outside its tensors (a missing bounds check, a wrong vector width or stride) stops the run."""
    import subprocess
    import sys
    libs = _libasan()
    if libs is None:
        pytest.skip("needs gcc's libasan.so")
    env = dict(os.environ, BEIT_FAST_EMULATOR_ASAN="1", LD_PRELOAD=" ".join(libs),
               ASAN_OPTIONS=f"detect_leaks=0:log_path={tmp_path / 'asan'}")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                          "not address_sanitizer", __file__],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    reports = "".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert "ERROR: AddressSanitizer" not in reports, reports[:4000]
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, run.stdout[-2000:]
