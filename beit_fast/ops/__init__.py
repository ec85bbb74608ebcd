"""Fused ops. Each op lives in its own module with its PyTorch reference (`<op>_ref`), its torch.library
registration, `not_supported_reasons(backend, ...)` and the public function.

OPS lists every op for `python -m beit_fast.info`: name -> (module, backends in preference order).
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

# Imported eagerly: `import beit_fast.ops.linear_gelu` would otherwise bind the submodule, not the function,
# to `beit_fast.ops.linear_gelu`. Triton and the kernels in `kernels/` are imported on first use; the C++
# extension beit_fast._C is not: beit_fast._backend, which the op modules import, imports it at import time
# (and records why when it cannot).
from .._backend import BackendUnavailable  # noqa: E402,F401 (what a forced backend that cannot run raises)
from .layer_norm import layer_norm  # noqa: E402
from .layer_scale_residual_norm import layer_scale_residual_norm  # noqa: E402
from .linear_gelu import linear_gelu  # noqa: E402
from .masked_patch_embed import masked_patch_embed  # noqa: E402
from .rel_pos_attention import rel_pos_attention, rel_pos_attention_qkvpacked  # noqa: E402

__all__ = ["OPS", "op_module", "layer_norm", "layer_scale_residual_norm", "linear_gelu", "masked_patch_embed",
           "rel_pos_attention", "rel_pos_attention_qkvpacked"]


def op_module(name):
    return importlib.import_module(OPS[name][0])
