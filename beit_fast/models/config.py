"""BeitConfig and the named model presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

ATTN_IMPLS = ("auto", "eager", "sdpa", "fused")


@dataclass
class BeitConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000          # classification head size (0: no head, features only)
    vocab_size: int = 0              # > 0: masked-image-modeling model with an lm_head of this size
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0           # dropout after the MLP / projection and before the head
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_values: Optional[float] = 0.1   # layer scale; None or 0 disables it
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = True        # one table per block
    use_shared_rel_pos_bias: bool = False  # one table for all blocks (pretraining)
    use_mean_pooling: bool = True
    init_std: float = 0.02
    init_scale: float = 0.001            # head init scale (fine-tuning)
    layer_norm_eps: float = 1e-6
    attn_impl: str = "auto"              # auto: fused on CUDA unless fused=False, sdpa elsewhere
    fused: Optional[bool] = None         # fused block kernels: None = on for CUDA inputs
    fused_mlp: bool = False              # in the fused block, fc1 + GELU through linear_gelu (Triton GEMM with
    #                                      bias + GELU in its epilogue) instead of nn.Linear and nn.GELU (cuBLAS and
    #                                      PyTorch's GELU). Off by default: on the one GPU measured (H200, BEiT-B
    #                                      B=128 bf16) the Triton GEMM needed 1.06x cuBLAS's GPU time forward +
    #                                      backward, and a B=64 training step took 51.4 ms with it, 41.9 without
    grad_checkpointing: bool = False

    def __post_init__(self):
        self.validate()

    @property
    def window_size(self) -> tuple[int, int]:
        return (self.img_size // self.patch_size, self.img_size // self.patch_size)

    @property
    def num_patches(self) -> int:
        wh, ww = self.window_size
        return wh * ww

    def validate(self) -> None:
        if self.img_size <= 0 or self.patch_size <= 0 or self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be a positive multiple of patch_size ({self.patch_size})")
        for name in ("embed_dim", "depth", "num_heads", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio}")
        if not (self.layer_norm_eps > 0 and math.isfinite(self.layer_norm_eps)):
            raise ValueError(f"layer_norm_eps must be a finite number > 0, got {self.layer_norm_eps}")
        if self.init_values is not None and not (self.init_values >= 0 and math.isfinite(self.init_values)):
            raise ValueError(f"init_values (layer scale) must be None, 0 (no layer scale) or a finite number > 0, "
                             f"got {self.init_values}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.vocab_size < 0 or self.num_classes < 0:
            raise ValueError("vocab_size and num_classes must be >= 0")

    def replace(self, **kw) -> "BeitConfig":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown BeitConfig fields {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **kw)


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, init_values=0.1),
    "small": dict(embed_dim=384, depth=12, num_heads=6, init_values=0.1),
    "base": dict(embed_dim=768, depth=12, num_heads=12, init_values=0.1),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
}
# Fine-tuning layout: a table per block, mean pooling + fc_norm, no abs pos (timm/unilm registrations).
_CLS = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_abs_pos_emb=False, use_mean_pooling=True)
# Pretraining layout: one shared table, mask token, final norm + lm_head on masked tokens.
_MIM = dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=False, num_classes=0,
            vocab_size=8192)

PRESETS: dict[str, dict] = {}
for _size, _arch in _SIZES.items():
    PRESETS[f"beit_{_size}_patch16_224"] = dict(**_arch, **_CLS, img_size=224)
    PRESETS[f"beit_{_size}_patch16_224_8k_vocab"] = dict(**_arch, **_MIM, img_size=224)
for _size in ("base", "large"):
    PRESETS[f"beit_{_size}_patch16_384"] = dict(**_SIZES[_size], **_CLS, img_size=384)
PRESETS["beit_large_patch16_512"] = dict(**_SIZES["large"], **_CLS, img_size=512)
_TEST = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=0.1)
PRESETS["beit_test_patch4_32"] = dict(**_TEST, **_CLS, num_classes=10)
PRESETS["beit_test_patch4_32_mim"] = dict(**_TEST, **{**_MIM, "vocab_size": 512})


def preset_config(name: str, **overrides) -> BeitConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(PRESETS)}")
    return BeitConfig(**PRESETS[name]).replace(**overrides)
