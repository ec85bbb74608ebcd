"""Load unilm, timm, mmseg and Hugging Face BEiT checkpoints into beit_fast models.

Never executes pickled code: torch files are read with weights_only=True, safetensors directly.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Union

import torch
import torch.nn.functional as F

from beit_fast.relpos import resize_rel_pos_bias_table, window_from_table_rows

_WRAPPERS = ("model", "module", "state_dict")


@dataclass
class LoadReport:
    source_format: str
    missing_keys: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)
    skipped_keys: list = field(default_factory=list)   # present but shape-incompatible (e.g. a new head)
    notes: list = field(default_factory=list)           # conversions applied

    def __str__(self) -> str:
        lines = [f"loaded a {self.source_format} checkpoint"]
        lines += [f"  note: {n}" for n in self.notes]
        for name in ("missing_keys", "unexpected_keys", "skipped_keys"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name.replace('_', ' ')} ({len(keys)}): {', '.join(keys)}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: what did not load (str() lists every key)."""
        parts = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("model keys missing from the checkpoint", self.missing_keys),
                                    ("checkpoint keys unused", self.unexpected_keys),
                                    ("keys of another shape skipped", self.skipped_keys)) if keys]
        return f"load_checkpoint ({self.source_format}): " + "; ".join(parts)


def read_state_dict(path: Union[str, os.PathLike]) -> dict:
    """The tensors of a checkpoint file; a folder stands for its weights file as `--init` takes it (a beit_fast
    run's latest checkpoint-*.pt, or a Hugging Face model folder's model.safetensors / pytorch_model.bin)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from beit_fast.train.checkpoint import resolve_checkpoint
        path = resolve_checkpoint(path, weights_folder=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file
        sd = load_file(path, device="cpu")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        # safetensors.torch.save_model stores each shared tensor once and names its aliases in the metadata
        for alias, kept in meta.items():
            if alias not in sd and kept in sd:
                sd[alias] = sd[kept]
        return sd
    try:
        # unilm's own training checkpoints also hold the run's argparse.Namespace ('args'): plain attributes,
        # allowed; anything else that is not weights still refuses to load
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError names the global that weights_only refused
        raise ValueError(f"{path} could not be read as a weights-only torch file (pickled code is never executed): {e}") from None


def unwrap(obj) -> dict:
    """unilm {'model': sd} / deepspeed {'module': sd} / mmseg {'state_dict': sd}, nested or not."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state dict of tensors (possibly under 'model', 'module' or 'state_dict')")
    sd = dict(obj)
    # DDP / deepspeed ('module.') and torch.compile ('_orig_mod.') wrappers, in any nesting
    while sd:
        prefix = next((p for p in ("module.", "_orig_mod.") if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# Hugging Face transformers -> unilm/timm names. Layer-local rules apply after `layer.{i}.` / `layers.{i}.`.
_HF_LAYER_RULES = [
    # transformers 4.x (as published)
    ("attention.attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.attention.query.weight", "attn.q.weight"),
    ("attention.attention.key.weight", "attn.k.weight"),
    ("attention.attention.value.weight", "attn.v.weight"),
    ("attention.attention.query.bias", "attn.q_bias"),
    ("attention.attention.value.bias", "attn.v_bias"),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    # transformers 5.x (in memory)
    ("relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.q_proj.weight", "attn.q.weight"),
    ("attention.k_proj.weight", "attn.k.weight"),
    ("attention.v_proj.weight", "attn.v.weight"),
    ("attention.q_proj.bias", "attn.q_bias"),
    ("attention.v_proj.bias", "attn.v_bias"),
    ("attention.o_proj.", "attn.proj."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    # both
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("lambda_1", "gamma_1"),
    ("lambda_2", "gamma_2"),
]
_HF_TOP_RULES = [
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.relative_position_bias.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table"),
    ("shared_position_bias.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table"),
    ("pooler.layernorm.", "fc_norm."),
    ("layernorm.", "norm."),
]
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.*)$")


def is_hf(sd: Mapping) -> bool:
    return any(k.startswith(("beit.", "data2vec_vision.", "embeddings.patch_embeddings")) for k in sd)


def convert_hf(sd: Mapping) -> dict:
    """transformers BeitModel / BeitForImageClassification / BeitForMaskedImageModeling, 4.x or 5.x names."""
    out, qkv = {}, {}
    for key, val in sd.items():
        k = key
        for prefix in ("beit.", "data2vec_vision."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if key.startswith("classifier."):
            out["head." + key[len("classifier."):]] = val
            continue
        if key.startswith(("lm_head.", "layernorm.")) and not key.startswith(("beit.",)):
            out[("norm." + key[len("layernorm."):]) if key.startswith("layernorm.") else key] = val
            continue
        if key.startswith(("beit.layernorm.", "data2vec_vision.layernorm.")) and "layernorm.weight" in sd \
                and "lm_head.weight" in sd:
            out[key] = val   # the encoder's own final norm of a use_mean_pooling=False MIM model: no slot here
            continue
        m = _HF_LAYER.match(k)
        if m:
            i, rest = m.group(1), m.group(2)
            for src, dst in _HF_LAYER_RULES:
                if rest.startswith(src):
                    rest = dst + rest[len(src):]
                    break
            else:
                out[key] = val  # unknown: reported as unexpected
                continue
            name = f"blocks.{i}.{rest}"
            if rest in ("attn.q.weight", "attn.k.weight", "attn.v.weight"):
                qkv.setdefault(i, {})[rest[5]] = val
            else:
                out[name] = val
            continue
        if "relative_position_index" in k:
            continue
        for src, dst in _HF_TOP_RULES:
            if k.startswith(src):
                out[dst + k[len(src):]] = val
                break
        else:
            out[key] = val
    for i, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Hugging Face checkpoint layer {i} lacks one of query/key/value weights")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _strip_mmseg(sd: dict) -> tuple[dict, bool]:
    if not any(k.startswith("backbone.") for k in sd):
        return sd, False
    return {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}, True


def convert_state_dict(obj, model) -> tuple[dict, LoadReport]:
    """Any supported layout -> this model's keys, with tables expanded/resized for this model."""
    sd = unwrap(obj)
    fmt = "unilm/timm"
    if is_hf(sd):
        sd, fmt = convert_hf(sd), "Hugging Face transformers"
    else:
        sd, mmseg = _strip_mmseg(sd)
        if mmseg:
            fmt = "mmseg (unilm segmentation)"
    report = LoadReport(fmt)
    dropped = [k for k in sd if k.endswith(("relative_position_index", "attn.k_bias"))]
    for k in dropped:
        del sd[k]
    if dropped:
        report.notes.append(f"dropped {len(dropped)} index/zero-bias buffers (recomputed by the model)")
    target = model.state_dict()
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in sd and shared not in target and "blocks.0.attn.relative_position_bias_table" in target:
        table, summed = sd.pop(shared), 0
        for i in range(len(model.blocks)):
            own = f"blocks.{i}.attn.relative_position_bias_table"
            if own in sd:   # a model with both tables adds both to its logits: one table holding their sum
                if sd[own].shape != table.shape:
                    raise ValueError(f"{own}: checkpoint table {tuple(sd[own].shape)} and its shared table "
                                     f"{tuple(table.shape)} differ in shape, so they cannot be summed")
                sd[own], summed = sd[own] + table, summed + 1
            else:
                sd[own] = table.clone()
        report.notes.append("expanded the shared relative position table into every block (fine-tuning layout)"
                            + (f", added to the {summed} blocks' own tables" if summed else ""))
    window = tuple(model.window_size)
    for k in list(sd):
        if k.endswith("relative_position_bias_table") and k in target and sd[k].shape != target[k].shape:
            src = window_from_table_rows(sd[k].shape[0])
            if sd[k].shape[1] != target[k].shape[1]:
                raise ValueError(f"{k}: the checkpoint's table {tuple(sd[k].shape)} is for {sd[k].shape[1]} attention "
                                 f"heads, the model's {tuple(target[k].shape)} for {target[k].shape[1]} (is it the "
                                 f"right model size?)")
            if src is None:
                raise ValueError(f"{k}: checkpoint table {tuple(sd[k].shape)} cannot be resized to {tuple(target[k].shape)}"
                                 f": {sd[k].shape[0]} rows is no square window's (2W-1)^2 + 3")
            sd[k] = resize_rel_pos_bias_table(sd[k], src, window)
            report.notes.append(f"resized {k} from window {src} to {window}")
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        sd["pos_embed"] = _resize_pos_embed(sd["pos_embed"], target["pos_embed"].shape[1] - 1)
        report.notes.append("resized pos_embed (bicubic, cls position kept)")
    for k in list(sd):
        if k in target and sd[k].shape != target[k].shape:
            if k.startswith(("head.", "lm_head.")):
                report.skipped_keys.append(k)
                del sd[k]
            else:
                raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)} does not fit the model's "
                                 f"{tuple(target[k].shape)} (is it the right model size?)")
    return sd, report


def _resize_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    cls, grid = pos[:, :1], pos[:, 1:]
    src = int(round(grid.shape[1] ** 0.5))
    dst = int(round(num_patches ** 0.5))
    if src * src != grid.shape[1] or dst * dst != num_patches:
        raise ValueError(f"cannot resize pos_embed with {grid.shape[1]} positions to {num_patches}")
    g = grid.reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(dst, dst), mode="bicubic", align_corners=False)
    return torch.cat([cls, g.permute(0, 2, 3, 1).reshape(1, dst * dst, -1).to(pos.dtype)], dim=1)


def _bare_model(model):
    """The model inside torch.compile's wrapper and DistributedDataParallel's (their state dicts prefix every key
    with _orig_mod. / module., which the checkpoint's keys, stripped of those prefixes, never carry)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def load_checkpoint(model, path_or_state_dict, strict: bool = False, warn: bool = True) -> LoadReport:
    """Load a checkpoint (path to .pth/.pt/.bin/.safetensors, or a (wrapped) state dict) into `model`.

    Returns a LoadReport listing missing, unexpected and skipped keys and the conversions applied; with
    strict=True any missing or unexpected key raises ValueError, else (when `warn`) a one-line warning names
    them. A checkpoint none of whose tensors fits a key of the model raises ValueError."""
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        obj = read_state_dict(obj)
    model = _bare_model(model)
    sd, report = convert_state_dict(obj, model)
    target = model.state_dict()
    if sd and not any(k in target for k in sd):
        raise ValueError(f"none of the checkpoint's {len(sd)} tensors matches a parameter of this model, so nothing "
                         f"would load (checkpoint keys: {', '.join(sorted(sd)[:4])}, ...; the model's: "
                         f"{', '.join(list(target)[:4])}, ...): is it a checkpoint of another kind of model?")
    result = model.load_state_dict(sd, strict=False)
    report.missing_keys = list(result.missing_keys)
    report.unexpected_keys = list(result.unexpected_keys)
    if strict and (report.missing_keys or report.unexpected_keys or report.skipped_keys):
        raise ValueError(f"strict load failed:\n{report}")
    if warn and (report.missing_keys or report.unexpected_keys or report.skipped_keys):
        warnings.warn(report.summary(), stacklevel=2)
    return report
