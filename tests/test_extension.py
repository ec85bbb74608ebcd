"""beit_fast._C: the module imports, every op is declared with its schema, and kernels are registered for the
dispatch keys the build promises (CPU always; CUDA when built with CUDA)."""
import os

import pytest
import torch

from beit_fast._backend import extension

_C, _why = extension()
pytestmark = pytest.mark.skipif(_C is None, reason=f"beit_fast._C is not built: {_why}")

CPU_AND_CUDA_OPS = [
    "masked_patch_embed",
    "masked_patch_embed_backward",
    "layer_scale_residual_norm",
    "layer_scale_residual_norm_backward",
]
SCHEMA_ARGS = {
    "block_mask": ["batch", "height", "width", "num_masking_patches", "min_num_patches", "max_num_patches",
                   "min_aspect", "max_aspect", "seed"],
    "masked_patch_embed": ["images", "weight", "bias", "bool_masked_pos", "mask_token", "cls_token", "pos_embed"],
    "layer_scale_residual_norm": ["x", "y", "gamma", "drop_path_scale", "ln_weight", "ln_bias", "eps"],
}


def has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"beit_fast::{op}", key)


def test_module_imports():
    import beit_fast._C as mod

    assert isinstance(mod.built_with_cuda(), bool)


@pytest.mark.parametrize("op", CPU_AND_CUDA_OPS + ["block_mask"])
def test_op_is_declared(op):
    assert hasattr(torch.ops.beit_fast, op)


@pytest.mark.parametrize("op", list(SCHEMA_ARGS))
def test_schema_arguments(op):
    schema = getattr(torch.ops.beit_fast, op).default._schema
    assert [a.name for a in schema.arguments] == SCHEMA_ARGS[op]


@pytest.mark.parametrize("op", CPU_AND_CUDA_OPS)
def test_cpu_kernel_registered(op):
    assert has_kernel(op, "CPU")


def test_block_mask_runs_without_tensor_arguments():
    # No tensor argument selects no backend key: block_mask is registered for every key (it runs on the CPU).
    assert has_kernel("block_mask", "CPU") and has_kernel("block_mask", "CompositeExplicitAutograd")
    assert torch.ops.beit_fast.block_mask(2, 14, 14, 75, 16, -1, 0.3, 1 / 0.3, 0).device.type == "cpu"


@pytest.mark.parametrize("op", CPU_AND_CUDA_OPS)
def test_cuda_kernel_registered_when_built_with_cuda(op):
    if not _C.built_with_cuda():
        assert not has_kernel(op, "CUDA")
        pytest.skip("built without CUDA sources")
    assert has_kernel(op, "CUDA")


@pytest.mark.parametrize("module, op", [("masked_patch_embed", "masked_patch_embed"),
                                        ("layer_scale_residual_norm", "layer_scale_residual_norm")])
def test_autograd_and_fake_registered(module, op):
    import importlib

    importlib.import_module(f"beit_fast.ops.{module}")
    assert has_kernel(op, "Autograd")
    assert has_kernel(op, "Meta") and has_kernel(f"{op}_backward", "Meta")


def test_the_build_reports_its_gpu_architectures():
    """setup.py writes TORCH_CUDA_ARCH_LIST into the extension (beit_fast/_archs.py's code), so the backend
    choice can tell a GPU the CUDA build has no code for; without CUDA the list is empty."""
    from beit_fast._archs import parse_archs
    archs = _C.cuda_archs()
    if not _C.built_with_cuda():
        assert archs == ""
        pytest.skip("built without CUDA sources")
    assert archs == "unknown" or parse_archs(archs) is not None, archs


def test_a_build_without_cuda_says_why(monkeypatch):
    """setup.py records why it skipped the CUDA sources in the extension (pip shows its build line only with
    -v): the cuda backend's reason and `python -m beit_fast.info` repeat it. This build: the reason is there
    exactly when the CUDA sources are not."""
    import subprocess
    import sys
    from beit_fast import _backend
    assert (_C._cuda_skip_reason_hex() == "") == _C.built_with_cuda()
    # the message a CPU-only build gives (its binary stood in for by its recorded text)
    fake = type("FakeC", (), {"_cuda_skip_reason_hex": staticmethod(lambda: b"BEIT_FAST_CUDA=0".hex())})
    monkeypatch.setattr(_backend, "_EXTENSION", (fake, None))
    monkeypatch.setattr(_backend, "extension_has_cuda", lambda: False)
    assert _backend.cuda_skip_reason() == "BEIT_FAST_CUDA=0"
    assert any("built without its CUDA sources because BEIT_FAST_CUDA=0" in r
               for r in _backend.common_reasons("cuda", [torch.zeros(1)]))
    # and setup.py hands the reason to the compiler (hex: any text survives the command line)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import runpy, sys; sys.argv = ['setup.py', '--name']; import setuptools; got = {}; "
              "setuptools.setup = lambda **kw: got.update(kw); ns = runpy.run_path('setup.py'); "
              "print(dict(ns['ext_modules'][0].define_macros))")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=dict(os.environ, BEIT_FAST_CUDA="0"),
                         capture_output=True, text=True, timeout=300)
    assert f"'BEIT_FAST_CUDA_SKIPPED': '{b'BEIT_FAST_CUDA=0'.hex()}'" in out.stdout, out.stdout + out.stderr


def test_arch_codes_read_back_as_the_arch_list():
    """info shows the build's architectures in TORCH_CUDA_ARCH_LIST's own syntax, not setup.py's code."""
    from beit_fast._archs import arch_list, arch_token
    for given, shown in (("8.0;9.0+PTX", "8.0;9.0+PTX"), ("9.0a", "9.0a"), ("7.5 8.6", "7.5;8.6"),
                         ("9.0a+PTX", "9.0a+PTX"), ("7.5+PTX;8.0", "7.5+PTX;8.0")):
        assert arch_list(arch_token(given)) == shown, given
    assert arch_list("unknown") == "unknown"


def test_arch_codes_say_which_gpus_the_code_runs_on():
    from beit_fast._archs import arch_token, archs_run_on, parse_archs
    assert arch_token("8.0;9.0+PTX") == "sm8v0_sm9v0_ptx9v0" and arch_token("7.5 8.6") == "sm7v5_sm8v6"
    assert arch_token("Ampere") == "unknown" and parse_archs("unknown") is None and parse_archs("") is None
    default = parse_archs(arch_token("8.0;9.0+PTX"))
    runs = {cap: archs_run_on(default, cap) for cap in ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))}
    assert runs == {(7, 0): False, (7, 5): False, (8, 0): True, (8, 6): True, (8, 9): True, (9, 0): True,
                    (10, 0): True, (12, 0): True}   # sm_80 code runs on 8.x; compute_90 PTX on 9.0 and newer
    sm90a = parse_archs(arch_token("9.0a"))
    assert archs_run_on(sm90a, (9, 0)) and not archs_run_on(sm90a, (10, 0))
    assert not archs_run_on(parse_archs(arch_token("8.0")), (9, 0))
    # 9.0a+PTX: torch emits compute_90a, PTX the driver compiles for 9.0 only (it passed for 10.0)
    sm90a_ptx = parse_archs(arch_token("9.0a+PTX"))
    assert arch_token("9.0a+PTX") == "sm9v0a_ptx9v0a"
    assert archs_run_on(sm90a_ptx, (9, 0)) and not archs_run_on(sm90a_ptx, (10, 0))


def test_backends_refuse_a_gpu_they_have_no_code_for(monkeypatch):
    """On a GPU older than the build's architectures the cuda backend is refused (auto falls back to the
    reference), and the Triton kernels below compute capability 8.0 (stand-ins for the GPU query)."""
    from beit_fast import _archs
    from beit_fast import _backend as B
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(B, "_EXTENSION_HAS_CUDA", True)
    monkeypatch.setattr(B, "_CUDA_ARCHS_TEXT", "sm8v0_sm9v0_ptx9v0")
    monkeypatch.setattr(B, "_CUDA_ARCHS", _archs.parse_archs("sm8v0_sm9v0_ptx9v0"))
    for cap, refused in (((7, 5), True), ((8, 6), False), ((9, 0), False)):
        monkeypatch.setattr(B, "device_capability", lambda index, cap=cap: cap)
        why = " ".join(B.common_reasons("cuda", ["cuda"]))
        assert ("not for this GPU's compute capability 7.5" in why) == refused, (cap, why)
        why = " ".join(B.common_reasons("triton", ["cuda"]))
        assert ("need compute capability 8.0 or newer" in why) == refused, (cap, why)
