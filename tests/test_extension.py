"""beit_fast._C: the module imports, every op is declared with its schema, and kernels are registered for the
dispatch keys the build promises (CPU always; CUDA when built with CUDA)."""
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
