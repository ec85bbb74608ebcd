"""The BEiT encoder, its classification and masked-image-modeling models.

Parameter names follow unilm / timm (`blocks.{i}.attn.qkv.weight`, `gamma_1`, ...), so their state dicts
load directly. Numerics follow unilm: q scaled before q@k^T, LayerNorm eps 1e-6, exact GELU, q/v bias and
no k bias, cls token first, relative position bias from a (R, H) table.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import BeitConfig
from beit_fast.relpos import gather_bias, num_relative_distance, relative_position_index


def _trunc_normal_(t: torch.Tensor, std: float, bound: float) -> None:
    """Truncated normal with absolute cut-offs +-bound (unilm pretraining: bound = std; timm: 2)."""
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-bound, b=bound)


def _hooked(m: nn.Module) -> bool:
    """Whether the module has hooks of its own (forward, forward pre, backward, backward pre)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _chain_fusable(block: nn.Module) -> bool:
    """Whether the fused loop may run `block` by calling its forward_fused directly, with the next block's
    LayerNorm in its epilogue: a plain Block (not wrapped by checkpoint_wrapper or FSDP, not compiled by
    block.compile()) without hooks, and none on the submodules the fused block reads without calling. Any
    other block is called as a module (`block(x, fused=True)`), so that its hooks and wrappers run."""
    return (type(block) is Block and getattr(block, "_compiled_call_impl", None) is None and not _hooked(block)
            and not block.hooks_bypassed_by_fused())


def drop_path_scale(batch: int, p: float, training: bool, ref: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-sample stochastic depth as a (B,) scale: 0 for dropped samples, 1/(1-p) for kept ones.

    The fused and the reference block both use this, so the same RNG draws give the same model."""
    if p == 0.0 or not training:
        return None
    keep = 1.0 - p
    # in the residual stream's dtype (fp32 under autocast: both paths keep the stream in the parameters' dtype)
    return torch.empty(batch, device=ref.device, dtype=ref.dtype).bernoulli_(keep).div_(keep)


def _resolve_attn_impl(impl: str, x: torch.Tensor, has_table: bool, fused: Optional[bool] = None) -> str:
    """auto: the fused kernel on CUDA when there is a relative position table (it exists for that bias) and
    the model is not configured fused=False (the plain reference model); SDPA otherwise (CPU, a model with
    absolute position embeddings only, or fused=False). An explicit attn_impl is taken as given."""
    if impl != "auto":
        return impl
    return "fused" if x.is_cuda and has_table and fused is not False else "sdpa"


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.window_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.window_size[0] * self.window_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        expected = f"(B, {self.in_chans}, {self.img_size}, {self.img_size})"
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"images must be a 4-D tensor {expected}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_chans or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"images must have shape {expected}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor {expected}, got dtype {x.dtype}")
        w = self.proj.weight
        if x.device != w.device:
            raise ValueError(f"images {expected} must be on the model's device {w.device}, got {x.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"images {expected} must have the model's dtype {w.dtype} (or run under "
                             f"torch.autocast), got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, window_size=None, attn_impl: str = "auto",
                 fused: Optional[bool] = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_impl = attn_impl
        self.fused = fused   # False: "auto" attention is the reference path (SDPA) even on CUDA
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.window_size = tuple(window_size) if window_size else None
        if self.window_size:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_distance(self.window_size), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.window_size),
                                 persistent=False)
        else:
            self.relative_position_bias_table = None
        self.attn_drop_p = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: torch.Tensor, shared_table: Optional[torch.Tensor] = None,
                shared_index: Optional[torch.Tensor] = None, window_size=None) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C). The bias table is this block's own table plus the shared one."""
        B, N, C = x.shape
        table, index = self.relative_position_bias_table, getattr(self, "relative_position_index", None)
        window = self.window_size
        if shared_table is not None:
            table = shared_table if table is None else table + shared_table
            if index is None:
                index, window = shared_index, window_size
        qkv = self.qkv_linear(x).view(B, N, 3, self.num_heads, self.head_dim)
        dropout_p = self.attn_drop_p if self.training else 0.0
        impl = _resolve_attn_impl(self.attn_impl, x, table is not None, self.fused)
        if impl == "fused":
            from beit_fast.ops.rel_pos_attention import rel_pos_attention_qkvpacked
            if table is None:
                raise ValueError("attn_impl='fused' needs a relative position bias table "
                                 "(use_rel_pos_bias or use_shared_rel_pos_bias)")
            out = rel_pos_attention_qkvpacked(qkv, table, window_size=window, scale=self.scale,
                                              dropout_p=dropout_p)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            bias = None if table is None else gather_bias(table, index).unsqueeze(0)
            if impl == "eager":
                attn = (q * self.scale) @ k.transpose(-2, -1)
                if bias is not None:
                    attn = attn + bias
                attn = attn.softmax(dim=-1)
                attn = F.dropout(attn, dropout_p, training=dropout_p > 0)
                out = attn @ v
            else:  # sdpa: the gathered bias as a float mask, as timm does
                if bias is not None:
                    bias = bias.to(q.dtype)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                                     scale=self.scale)
            out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: Optional[float] = 0.1, window_size=None, attn_impl: str = "auto",
                 fused: Optional[bool] = None, eps: float = 1e-6, fused_mlp: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, window_size, attn_impl, fused)
        self.drop_path = drop_path
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.fused = fused
        self.fused_mlp = fused_mlp
        if init_values:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _residual(self, x, y, gamma, scale):
        if gamma is not None:
            y = gamma * y
        if scale is not None:
            y = y * scale.view(-1, 1, 1)
        return x + y

    def hooks_bypassed_by_fused(self) -> bool:
        """Whether a submodule that forward_fused reads the parameters of without calling it has hooks."""
        bypassed = (self.norm1, self.norm2, self.mlp) + ((self.mlp.fc1, self.mlp.act) if self.fused_mlp else ())
        return any(_hooked(m) for m in bypassed)

    def forward(self, x: torch.Tensor, shared_table=None, shared_index=None, window_size=None,
                fused: bool = False) -> torch.Tensor:
        """Reference block: x + dp(g1 * attn(norm1 x)); x + dp(g2 * mlp(norm2 x)). fused=True: the same through
        forward_fused (the fused model's path for a block it calls as a module), unless hooks on norm1, norm2
        or mlp would be bypassed by it: they run on the reference block then."""
        if fused and not self.hooks_bypassed_by_fused():
            return self.forward_fused(x, None, None, shared_table, shared_index, window_size)[0]
        B = x.shape[0]
        s1 = drop_path_scale(B, self.drop_path, self.training, x)
        x = self._residual(x, self.attn(self.norm1(x), shared_table, shared_index, window_size), self.gamma_1, s1)
        s2 = drop_path_scale(B, self.drop_path, self.training, x)
        return self._residual(x, self.mlp(self.norm2(x)), self.gamma_2, s2)

    def forward_fused(self, x: torch.Tensor, h: Optional[torch.Tensor], next_norm: Optional[nn.LayerNorm],
                      shared_table=None, shared_index=None, window_size=None):
        """Fused block. x: the residual stream, h = norm1(x) (made by the previous block's fused epilogue), or
        None to compute it here.

        Returns (x_out, next_norm(x_out)) -- the second is None when next_norm is None."""
        from beit_fast.ops.layer_scale_residual_norm import layer_scale_residual_norm
        from beit_fast.ops.linear_gelu import linear_gelu
        if h is None:
            from beit_fast.ops.layer_norm import layer_norm
            h = layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        B = x.shape[0]
        s1 = drop_path_scale(B, self.drop_path, self.training, x)
        a = self.attn(h, shared_table, shared_index, window_size)
        x, h2 = layer_scale_residual_norm(x, a, self.gamma_1, s1, self.norm2.weight, self.norm2.bias,
                                          self.norm2.eps)
        s2 = drop_path_scale(B, self.drop_path, self.training, x)
        fc1 = self.mlp.fc1
        hidden = linear_gelu(h2, fc1.weight, fc1.bias) if self.fused_mlp else self.mlp.act(fc1(h2))
        m = self.mlp.drop(self.mlp.fc2(hidden))
        if next_norm is None:
            return self._residual(x, m, self.gamma_2, s2), None
        return layer_scale_residual_norm(x, m, self.gamma_2, s2, next_norm.weight, next_norm.bias, next_norm.eps)


class RelativePositionBias(nn.Module):
    """The table shared by all blocks (pretraining layout): `rel_pos_bias.relative_position_bias_table`."""

    def __init__(self, window_size, num_heads: int):
        super().__init__()
        self.window_size = tuple(window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance(window_size), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)


class Beit(nn.Module):
    """The encoder: patch embedding, cls (and mask) token, optional abs pos, blocks. Heads in subclasses."""

    def __init__(self, config: BeitConfig):
        super().__init__()
        config.validate()
        if config.fused is not False:
            # Resolved now (it imports Triton once): the backend choice reads it, and torch.compile's first
            # trace of a model would otherwise record it unresolved and recompile the model on the next call.
            from beit_fast._backend import triton_import_error
            triton_import_error()
        self.config = c = config
        self.embed_dim = c.embed_dim
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.window_size = self.patch_embed.window_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.vocab_size > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, c.embed_dim)) if c.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(c.drop_rate)
        self.rel_pos_bias = (RelativePositionBias(self.window_size, c.num_heads)
                             if c.use_shared_rel_pos_bias else None)
        dpr = [x.item() for x in torch.linspace(0, c.drop_path_rate, c.depth)]
        self.blocks = nn.ModuleList([
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.drop_rate, c.attn_drop_rate, dpr[i],
                  c.init_values, self.window_size if c.use_rel_pos_bias else None, c.attn_impl, c.fused,
                  c.layer_norm_eps, c.fused_mlp)
            for i in range(c.depth)])
        self.grad_checkpointing = c.grad_checkpointing

    # ---- bookkeeping -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """unilm/timm: pos_embed and cls_token, plus every relative position table (timm)."""
        names = {"pos_embed", "cls_token"}
        names |= {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _use_fused(self, x: torch.Tensor) -> bool:
        f = self.config.fused
        return x.is_cuda if f is None else bool(f)

    def _init_weights(self, pretraining: bool) -> None:
        std = self.config.init_std
        bound = std if pretraining else 2.0  # unilm pretraining truncates at +-1 std; fine-tuning at +-2
        for t in (self.cls_token, self.mask_token, self.pos_embed):
            if t is not None:
                _trunc_normal_(t, std, bound)
        for m in self.modules():
            if isinstance(m, nn.Linear) or (pretraining and isinstance(m, nn.Conv2d)):
                _trunc_normal_(m.weight, std, bound)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer_id, blk in enumerate(self.blocks):  # unilm fix_init_weight
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (layer_id + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (layer_id + 1)))

    # ---- forward -----------------------------------------------------------------------------------
    def check_mask(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        B, P = x.shape[0], self.num_patches
        if not isinstance(bool_masked_pos, torch.Tensor):
            raise ValueError(f"bool_masked_pos must be a bool tensor (B, {P}) = ({B}, {P})")
        if bool_masked_pos.dim() == 3 and tuple(bool_masked_pos.shape[1:]) == tuple(self.window_size):
            bool_masked_pos = bool_masked_pos.flatten(1)
        if tuple(bool_masked_pos.shape) != (B, P):
            raise ValueError(f"bool_masked_pos must have shape (B, num_patches) = ({B}, {P}) "
                             f"(or (B, {self.window_size[0]}, {self.window_size[1]})), got {tuple(bool_masked_pos.shape)}")
        if bool_masked_pos.dtype != torch.bool:
            raise ValueError(f"bool_masked_pos must be a torch.bool tensor ({B}, {P}), "
                             f"got dtype {bool_masked_pos.dtype}")
        if bool_masked_pos.device != x.device:
            raise ValueError(f"bool_masked_pos ({B}, {P}) must be on the images' device {x.device}, "
                             f"got {bool_masked_pos.device}")
        return bool_masked_pos

    def embed(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
        if fused:
            from beit_fast.ops.masked_patch_embed import masked_patch_embed
            t = masked_patch_embed(x, self.patch_embed.proj.weight, self.patch_embed.proj.bias,
                                   bool_masked_pos, self.mask_token, self.cls_token, self.pos_embed)
            # Under autocast the op returns the fp32 tokens' dtype, as the reference's cat / blend promote it:
            # the residual stream stays in the parameters' dtype (a bf16 stream would round away BEiT-L's 1e-5
            # layer-scaled updates). The cast covers parameters of mixed dtypes.
            return t.to(self.cls_token.dtype)
        t = self.patch_embed(x)
        if bool_masked_pos is not None:
            w = bool_masked_pos.unsqueeze(-1).type_as(self.mask_token)
            t = t * (1 - w) + self.mask_token * w
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        if self.pos_embed is not None:
            t = t + self.pos_embed
        return t

    def forward_features(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None,
                         final_norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """(B, C, H, W) [+ (B, P) mask] -> (B, 1+P, D): the last block's output, `final_norm` applied."""
        self.patch_embed.check_input(x)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos given, but this model has no mask token (vocab_size=0)")
            bool_masked_pos = self.check_mask(x, bool_masked_pos)
        fused = self._use_fused(x)
        x = self.pos_drop(self.embed(x, bool_masked_pos, fused))
        shared = {}
        if self.rel_pos_bias is not None:
            shared = dict(shared_table=self.rel_pos_bias.relative_position_bias_table,
                          shared_index=self.rel_pos_bias.relative_position_index,
                          window_size=self.rel_pos_bias.window_size)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        if not fused:
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False, **shared) if ckpt else blk(x, **shared)
            return final_norm(x) if final_norm is not None else x
        from beit_fast.ops.layer_norm import layer_norm
        if ckpt or not all(_chain_fusable(blk) for blk in self.blocks):
            # Each block called as a module, normalizing its own input (the next block's LayerNorm is not fused
            # into this one's epilogue): under FSDP (a block's parameters exist only inside its own call), with
            # hooks, wrappers or compiled blocks (which run only when the block is called), and under
            # activation checkpointing (the chain would keep each block's normalized input too: 2x the memory)
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False, fused=True, **shared) if ckpt \
                    else blk(x, fused=True, **shared)
            return final_norm(x) if final_norm is not None else x
        # the final norm fuses into the last block's epilogue when it is a plain affine LayerNorm
        fuse_final = final_norm is not None and final_norm.weight is not None and not _hooked(final_norm)
        b0 = self.blocks[0]
        h = layer_norm(x, b0.norm1.weight, b0.norm1.bias, b0.norm1.eps)
        for i, blk in enumerate(self.blocks):
            nxt = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else (final_norm if fuse_final else None)
            x, h = blk.forward_fused(x, h, nxt, **shared)
        if final_norm is None:
            return x
        return h if fuse_final else final_norm(x)


class BeitForImageClassification(Beit):
    """Fine-tuning model: mean-pooled patch tokens -> fc_norm -> head (or cls token -> norm -> head)."""

    def __init__(self, config: BeitConfig):
        super().__init__(config)
        c = config
        self.norm = nn.Identity() if c.use_mean_pooling else nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps) if c.use_mean_pooling else None
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(c.embed_dim, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self._init_weights(pretraining=False)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(c.init_scale)
            self.head.bias.data.mul_(c.init_scale)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc_norm(x[:, 1:].mean(1)) if self.fc_norm is not None else x[:, 0]
        return self.head(self.head_drop(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes)."""
        norm = self.norm if isinstance(self.norm, nn.LayerNorm) else None
        return self.forward_head(self.forward_features(images, final_norm=norm))


class BeitForMaskedImageModeling(Beit):
    """Pretraining model: final norm on all tokens -> lm_head on the masked patch tokens only."""

    def __init__(self, config: BeitConfig):
        if config.vocab_size <= 0:
            raise ValueError("BeitForMaskedImageModeling needs vocab_size > 0")
        super().__init__(config)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self._init_weights(pretraining=True)

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor,
                return_all_tokens: bool = False, masked_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images (B, C, H, W), bool_masked_pos (B, P) bool -> logits (M, vocab) of the masked patches in
        row-major order of bool_masked_pos (labels = token_ids[bool_masked_pos]); with
        return_all_tokens, (B, P, vocab).

        masked_index: optional (M,) int64, `bool_masked_pos.flatten().nonzero().squeeze(1)` computed by the
        caller where it is cheap (on the CPU, before the mask goes to the GPU): selecting the masked tokens
        through it needs no host sync (a bool index on a CUDA tensor waits for the GPU to count them) and
        no graph break under torch.compile. It is trusted to match bool_masked_pos."""
        if bool_masked_pos is None:
            raise ValueError(f"bool_masked_pos (B, {self.num_patches}) bool is required for pretraining")
        x = self.forward_features(images, bool_masked_pos, final_norm=self.norm)
        if return_all_tokens:
            return self.lm_head(x[:, 1:])
        if masked_index is None:
            mask = bool_masked_pos.flatten(1) if bool_masked_pos.dim() == 3 else bool_masked_pos
            return self.lm_head(x[:, 1:][mask])
        P = self.num_patches
        if masked_index.dim() != 1 or masked_index.dtype != torch.int64 or masked_index.device != x.device:
            raise ValueError(f"masked_index must be a 1-D int64 tensor on {x.device} (flat positions in "
                             f"(B, {P}) of the masked patches), got {tuple(masked_index.shape)} "
                             f"{masked_index.dtype} on {masked_index.device}")
        # flat patch position b*P + p -> token row b*(P+1) + p + 1 of the contiguous (B, 1+P, C) output
        rows = masked_index + masked_index.div(P, rounding_mode="floor") + 1
        return self.lm_head(x.reshape(-1, x.shape[-1]).index_select(0, rows))
