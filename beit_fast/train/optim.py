"""Schedules (pure functions of the step), parameter groups (weight decay, layer-wise lr decay), optimizers.

The schedule is unilm's `cosine_scheduler` (beit/utils.py) evaluated per optimizer step instead of being
precomputed into an array: a linear warmup `linspace(start, base, warmup)` (both ends included), then
`final + (base - final) * (1 + cos(pi * i / (total - warmup))) / 2`.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch


def cosine_at(step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0,
              start: float = 0.0) -> float:
    """Value of unilm's per-iteration cosine schedule at `step` (0-based); pure."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return start
        return start + (base - start) * step / (warmup_steps - 1)
    span = max(total_steps - warmup_steps, 1)
    i = min(step - warmup_steps, span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / span))


class Schedule:
    """lr_at(step) and wd_at(step) for one run; `step` counts optimizer updates from 0."""

    def __init__(self, config, steps_per_epoch: int):
        self.total_steps = max(int(config.epochs * steps_per_epoch), 1)
        warmup = config.warmup_steps if config.warmup_steps >= 0 else round(config.warmup_epochs * steps_per_epoch)
        self.warmup_steps = min(int(warmup), self.total_steps)
        self.lr, self.min_lr = config.lr, config.min_lr
        self.wd = config.weight_decay
        self.wd_end = config.weight_decay if config.weight_decay_end is None else config.weight_decay_end

    def lr_at(self, step: int) -> float:
        return cosine_at(step, self.lr, self.min_lr, self.total_steps, self.warmup_steps)

    def wd_at(self, step: int) -> float:
        return cosine_at(step, self.wd, self.wd_end, self.total_steps, 0)


def apply_schedule(optimizer, lr: float, wd: float) -> None:
    """Set each group's lr (times its layer-decay scale) and weight decay (groups with decay only)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("decayed", False):
            group["weight_decay"] = wd


# Parameters never decayed besides the 1-D ones (biases, norms, layer-scale gammas) and names ending in
# `.bias`, per `weight_decay_exclusions`:
#   "all"    tokens and position tables too (the default): timm's convention (its no_weight_decay() names
#            every relative position table) plus the mask token
#   "unilm"  only unilm's no_weight_decay() = {pos_embed, cls_token}: its optimizer factory decays the mask token
#            and the relative position tables (beit_reference.md §1.7), as the BEiT recipes were trained
NO_DECAY_NAMES = {
    "all": re.compile(r"(^|\.)(cls_token|mask_token|pos_embed|relative_position_bias_table|gamma_[12])$"),
    "unilm": re.compile(r"(^|\.)(cls_token|pos_embed)$"),
}


def wants_weight_decay(name: str, param: torch.Tensor, exclusions: str = "all") -> bool:
    """Whether `name` is decayed under the `exclusions` rule (see NO_DECAY_NAMES)."""
    return not (param.ndim <= 1 or name.endswith(".bias") or NO_DECAY_NAMES[exclusions].search(name))


def layer_id(name: str, depth: int) -> int:
    """unilm's layer id (beit/optim_factory.py): 0 embeddings, i+1 for blocks.i, depth+1 for the rest."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return depth + 1
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def param_groups(model, weight_decay: float, layer_decay: Optional[float] = None, exclusions: str = "all") -> list:
    """Groups keyed by (layer, decay) with 'weight_decay' and 'lr_scale' (= layer_decay ** (depth + 1 - id));
    `exclusions` names the parameters without weight decay (NO_DECAY_NAMES)."""
    if exclusions not in NO_DECAY_NAMES:
        raise ValueError(f"weight_decay_exclusions must be one of {sorted(NO_DECAY_NAMES)}, got {exclusions!r}")
    depth = len(model.blocks) if hasattr(model, "blocks") else 0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = wants_weight_decay(name, p, exclusions)
        lid = layer_id(name, depth) if layer_decay is not None and layer_decay != 1.0 else 0
        scale = layer_decay ** (depth + 1 - lid) if layer_decay is not None and layer_decay != 1.0 else 1.0
        key = (lid, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale, "decayed": decay}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(config, model, layer_decay: Optional[float] = None, device_type: str = "cpu"):
    """AdamW (torch's fused kernel on CUDA), or apex FusedAdam / FusedLAMB when asked for."""
    groups = param_groups(model, config.weight_decay, layer_decay, config.weight_decay_exclusions)
    kw = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=(device_type == "cuda") or None, **kw)
    if config.optimizer in ("apex_adam", "apex_lamb"):
        try:
            from apex.optimizers import FusedAdam, FusedLAMB
        except ImportError as e:
            raise RuntimeError(f"optimizer={config.optimizer!r} needs NVIDIA apex, which is not importable "
                               f"({e}); install apex or use optimizer=adamw") from e
        if config.optimizer == "apex_adam":
            return FusedAdam(groups, adam_w_mode=True, **kw)
        # FusedLAMB clips the global gradient norm inside step() (max_grad_norm, default 1.0); the trainer
        # already clips (clip_grad, after unscaling fp16 gradients), so LAMB's own clipping is switched off
        # (a norm is never above inf) rather than silently clipping at 1.0 when clip_grad says otherwise
        return FusedLAMB(groups, max_grad_norm=float("inf"), **kw)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")
