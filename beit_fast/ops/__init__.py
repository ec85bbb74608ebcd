"""Fused ops. Each op lives in its own module with its PyTorch reference (`<op>_ref`), its torch.library
registration, `not_supported_reasons(backend, ...)` and the public function.

OPS lists every op for `python -m beit_fast.info`: name -> (module, backends in preference order).
The public functions are imported lazily so that `import beit_fast.ops` stays cheap and never fails.
"""
import importlib

OPS = {
    "rel_pos_attention": ("beit_fast.ops.rel_pos_attention", ("triton", "reference")),
    "masked_patch_embed": ("beit_fast.ops.masked_patch_embed", ("cuda", "cpp", "reference")),
    "layer_scale_residual_norm": ("beit_fast.ops.layer_scale_residual_norm", ("cuda", "cpp", "reference")),
    "linear_gelu": ("beit_fast.ops.linear_gelu", ("triton", "reference")),
    "layer_norm": ("beit_fast.ops.layer_norm", ("triton", "reference")),
    "block_mask": ("beit_fast.masking", ("cpp", "reference")),
}

_PUBLIC = {
    "rel_pos_attention": "beit_fast.ops.rel_pos_attention",
    "rel_pos_attention_qkvpacked": "beit_fast.ops.rel_pos_attention",
    "masked_patch_embed": "beit_fast.ops.masked_patch_embed",
    "layer_scale_residual_norm": "beit_fast.ops.layer_scale_residual_norm",
    "linear_gelu": "beit_fast.ops.linear_gelu",
    "layer_norm": "beit_fast.ops.layer_norm",
}

__all__ = sorted(_PUBLIC) + ["OPS", "op_module"]


def op_module(name):
    return importlib.import_module(OPS[name][0])


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'beit_fast.ops' has no attribute {name!r}")
