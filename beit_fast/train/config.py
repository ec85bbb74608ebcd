"""Run configurations: dataclasses, named presets, YAML files and `key=value` overrides.

Precedence (lowest first): the dataclass defaults, the named preset, a YAML file, command-line overrides.
`resolve(kind, preset=..., yaml_path=..., overrides=...)` returns the final dataclass; `check(config)`
raises ConfigError for anything that would fail later (missing files, unknown names, bad values) so that
a bad run stops before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class RunConfig:
    """Fields shared by pretraining and fine-tuning."""
    preset: str = ""
    output_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    num_threads: int = 0                 # CPU intra-op threads (torch.set_num_threads); 0: torch's default
    # data
    dataset: str = "digits"              # digits (built into scikit-learn) | folder (ImageFolder) | synthetic
    data_path: str = ""                  # folder: root holding train/ and val/ (or the class folders directly)
    train_subset: int = 0                # >0: use only N training images, spread over the set (tests, smoke runs)
    synthetic_size: int = 1024
    num_workers: int = 2
    img_size: int = 32
    interpolation: str = "bicubic"
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    # model (any BeitConfig field can be changed through model_overrides)
    model: str = ""
    model_overrides: dict = field(default_factory=dict)
    fused: Optional[bool] = None         # None: fused kernels on CUDA, reference elsewhere
    attn_impl: str = "auto"              # auto | eager | sdpa | fused
    drop_path: float = 0.1
    layer_scale: Optional[float] = 0.1   # LayerScale init (gamma); None or 0 disables it
    grad_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"        # torch.compile mode: default | reduce-overhead (CUDA graphs: the
    #                                      host's per-op time drops out) | max-autotune | max-autotune-no-cudagraphs
    # optimisation
    optimizer: str = "adamw"             # adamw | apex_adam | apex_lamb
    batch_size: int = 64                 # per process
    accum_steps: int = 1
    epochs: int = 10
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    warmup_steps: int = -1               # >=0 overrides warmup_epochs
    weight_decay: float = 0.05
    weight_decay_end: Optional[float] = None   # None: constant weight decay
    weight_decay_exclusions: str = "all"  # all: no decay for tokens and position tables | unilm: as unilm (optim.py)
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = 3.0
    precision: str = "bf16"              # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    # checkpoints
    save_every_steps: int = 0            # 0: at the end of every epoch only
    keep_last: int = 2                   # step checkpoints kept (>= 1; the best ones are kept besides)
    resume: str = ""                     # "" | "auto" (latest in output_dir) | a checkpoint file or folder
    stop_at_step: int = 0                # >0: stop after this step as if interrupted (schedule unchanged)
    # distributed
    distributed: str = "ddp"             # ddp | fsdp (FSDP2 per-block sharding; only under torchrun, WORLD_SIZE > 1)
    # feedback
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True             # when torch.utils.tensorboard is importable
    inject_nonfinite_at_step: int = -1   # test hook: multiply the loss of this step by inf


@dataclass
class PretrainConfig(RunConfig):
    output_dir: str = "runs/pretrain-demo"
    model: str = "beit_base_patch16_224_8k_vocab"
    tokenizer: str = "kmeans"            # kmeans (fit on your data) | dvae (DALL-E encoder weights)
    tokenizer_path: str = ""             # kmeans: "" fits one into output_dir; dvae: required
    tokenizer_vocab: int = 8192          # kmeans vocabulary when it is fitted here
    tokenizer_patch: int = 8             # kmeans: pixels per token side in the tokenizer view
    tokenizer_fit_images: int = 10000
    tokenizer_dtype: str = "auto"        # auto (bf16 when it gives identical codes) | bf16 | fp32 | fp16 (DALL-E's own)
    second_img_size: int = 0             # tokenizer view; 0: window size x tokenizer downsampling
    second_interpolation: str = "lanczos"
    num_mask_patches: int = 75
    min_mask_patches: int = 16
    max_mask_patches: Optional[int] = None
    min_mask_aspect: float = 0.3


@dataclass
class FinetuneConfig(RunConfig):
    output_dir: str = "runs/finetune-demo"
    model: str = "beit_base_patch16_224"
    init: str = ""                       # checkpoint (this package, unilm, timm or HF), file or folder
    num_classes: int = 1000
    layer_decay: float = 0.65
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    crop_pct: Optional[float] = None     # eval resize = img_size / crop_pct; None: 224/256 below 384 px, else 1
    eval_batch_size: int = 0             # 0: same as batch_size
    val_subset: int = 0                  # >0: evaluate on N held-out images only, spread over the set (smoke runs)
    eval_every_epochs: int = 1
    ema: bool = False
    ema_decay: float = 0.9999
    min_lr: float = 1e-6
    warmup_epochs: float = 20.0
    epochs: int = 100
    lr: float = 4e-3
    clip_grad: Optional[float] = None


@dataclass
class EvalConfig:
    checkpoint: str = "runs/finetune-demo"   # file or folder (best, else latest)
    dataset: str = ""                    # "" : the dataset the checkpoint was trained on
    data_path: str = ""
    batch_size: int = 256
    num_workers: int = 2
    device: str = "auto"
    precision: str = "bf16"
    use_ema: bool = False
    output_dir: str = ""                 # "" : the checkpoint's folder (eval.json goes there)


@dataclass
class TokenizerFitConfig:
    output: str = "runs/tokenizer/kmeans.safetensors"
    dataset: str = "digits"
    data_path: str = ""
    img_size: int = 32                   # tokenizer view size
    patch_size: int = 4
    vocab_size: int = 512
    max_images: int = 10000
    max_patches: int = 200000
    iters: int = 25
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    overwrite: bool = False               # replace an existing output file (a run pretrained with it could not resume)


# ----------------------------------------------------------------------------------------------- presets
def _pretrain_demo() -> PretrainConfig:
    """A tiny BEiT on scikit-learn's digits (8x8 upsampled to 16px, 4px patches: a 4x4 grid), with a k-means
    tokenizer fit on the fly; a few minutes on 2 CPU cores."""
    return PretrainConfig(
        preset="demo", output_dir="runs/pretrain-demo", dataset="digits", img_size=16,
        model="beit_test_patch4_32_mim", model_overrides=dict(DEMO_ARCH), drop_path=0.0, layer_scale=0.1,
        tokenizer="kmeans", tokenizer_vocab=64, tokenizer_patch=4, second_img_size=16,
        second_interpolation="bicubic", crop_scale=(0.67, 1.0), crop_ratio=(0.8, 1.25), hflip=0.0,
        color_jitter=0.0, num_mask_patches=6, min_mask_patches=2, max_mask_patches=None,
        batch_size=64, epochs=30, lr=2e-3, min_lr=1e-5, warmup_epochs=2, weight_decay=0.05,
        clip_grad=3.0, precision="fp32", num_workers=0, num_threads=1, log_every=10)


def _pretrain_beit(size: str, data: str = "in1k") -> PretrainConfig:
    """unilm BEiT pretraining (reference §5.1): 16 GPUs x 128 images, DALL-E tokenizer on a 112px view.
    in1k: 800 epochs with 10 warmup epochs, ImageNet mean/std (--imagenet_default_mean_and_std);
    in22k: 150 epochs with 10000 warmup steps, mean/std 0.5 (the script's default). The reference gives one
    command (BEiT-B) and layer scale 1e-5 for BEiT-L: the large presets take that and BEiT-B's other values."""
    in1k = data == "in1k"
    schedule = (dict(epochs=800, warmup_epochs=10, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) if in1k
                else dict(epochs=150, warmup_steps=10000, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    suffix = "" if in1k else "_in22k"
    return PretrainConfig(
        preset=f"beit_{size}_224{suffix}", output_dir=f"runs/pretrain-beit-{size}{suffix.replace('_', '-')}",
        dataset="folder", img_size=224, model=f"beit_{size}_patch16_224_8k_vocab", drop_path=0.1,
        layer_scale=0.1 if size == "base" else 1e-5,
        tokenizer="dvae", tokenizer_dtype="fp16", tokenizer_vocab=8192, second_img_size=112,
        second_interpolation="lanczos", crop_scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, num_mask_patches=75,
        min_mask_patches=16,
        batch_size=128, lr=1.5e-3, min_lr=1e-5, weight_decay=0.05,
        betas=(0.9, 0.999), clip_grad=3.0, precision="fp16", num_workers=10, save_every_steps=5000, log_every=50,
        **schedule)


def _finetune_demo() -> FinetuneConfig:
    """Fine-tune the demo BEiT on digits (from --init, or from random initialisation for comparison)."""
    return FinetuneConfig(
        preset="demo", output_dir="runs/finetune-demo", dataset="digits", img_size=16, num_classes=10,
        model="beit_test_patch4_32", model_overrides=dict(DEMO_ARCH), drop_path=0.1, layer_scale=0.1,
        crop_scale=(0.85, 1.0), crop_ratio=(0.8, 1.25), hflip=0.0, color_jitter=0.0, auto_augment=None,
        re_prob=0.0, crop_pct=1.0, mixup=0.0, cutmix=0.0, smoothing=0.1, layer_decay=0.75,
        batch_size=64, epochs=15, lr=2e-3, min_lr=1e-5, warmup_epochs=1, weight_decay=0.05,
        clip_grad=None, precision="fp32", num_workers=0, num_threads=1, log_every=10)


# unilm's ImageNet-1k fine-tuning recipes (reference §6.1), per (size, starting checkpoint), for 8 GPUs:
# pt22k (self-supervised only): batch 1024, mixup/cutmix; pt22k_ft22k (also fine-tuned on ImageNet-22k):
# batch 512, a short run at a small lr, no mixup
_FINETUNE_RECIPES = {
    ("base", "pt22k"): dict(lr=4e-3, warmup_epochs=20, epochs=100, layer_decay=0.65, drop_path=0.1,
                            batch_size=128, accum_steps=1, weight_decay=0.05, mixup=0.8, cutmix=1.0),
    ("large", "pt22k"): dict(lr=1e-3, warmup_epochs=5, epochs=50, layer_decay=0.75, drop_path=0.2,
                             batch_size=64, accum_steps=2, weight_decay=0.05, mixup=0.8, cutmix=1.0),
    ("base", "pt22k_ft22k"): dict(lr=2e-5, warmup_epochs=5, epochs=30, layer_decay=0.85, drop_path=0.1,
                                  batch_size=64, accum_steps=1, weight_decay=1e-8, mixup=0.0, cutmix=0.0),
    ("large", "pt22k_ft22k"): dict(lr=2e-5, warmup_epochs=5, epochs=30, layer_decay=0.9, drop_path=0.4,
                                   batch_size=32, accum_steps=2, weight_decay=1e-8, mixup=0.0, cutmix=0.0),
}


def _finetune_beit(size: str, start: str = "pt22k") -> FinetuneConfig:
    """unilm BEiT fine-tuning on ImageNet-1k from a `start` checkpoint (_FINETUNE_RECIPES)."""
    suffix = "" if start == "pt22k" else "_ft22k"
    return FinetuneConfig(
        preset=f"beit_{size}_224{suffix}", output_dir=f"runs/finetune-beit-{size}{suffix.replace('_', '-')}",
        dataset="folder", img_size=224, model=f"beit_{size}_patch16_224", num_classes=1000,
        layer_scale=0.1 if size == "base" else 1e-5, min_lr=1e-6,
        smoothing=0.1, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, color_jitter=0.4, hflip=0.5,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=None, precision="fp16", num_workers=10,
        clip_grad=None, log_every=50, **_FINETUNE_RECIPES[size, start])


# The demo architecture: the registered test-sized model, made a little wider and deeper. On a 4x4 patch
# grid absolute position embeddings (a BeitConfig option; unilm's attention-analysis checkpoint has them)
# let both pretraining and fine-tuning converge within minutes; relative position biases stay on.
# The demo presets also pin one CPU thread: its matrices are too small to gain from more, and a second
# spinning OpenMP thread makes steps 10x slower whenever the CPU is shared.
DEMO_ARCH = {"embed_dim": 128, "depth": 4, "num_heads": 4, "use_abs_pos_emb": True}

PRESETS = {
    "pretrain": {"demo": _pretrain_demo, "beit_base_224": lambda: _pretrain_beit("base"),
                 "beit_large_224": lambda: _pretrain_beit("large"),
                 "beit_base_224_in22k": lambda: _pretrain_beit("base", "in22k"),
                 "beit_large_224_in22k": lambda: _pretrain_beit("large", "in22k")},
    "finetune": {"demo": _finetune_demo, "beit_base_224": lambda: _finetune_beit("base"),
                 "beit_large_224": lambda: _finetune_beit("large"),
                 "beit_base_224_ft22k": lambda: _finetune_beit("base", "pt22k_ft22k"),
                 "beit_large_224_ft22k": lambda: _finetune_beit("large", "pt22k_ft22k")},
    "eval": {"default": EvalConfig},
    "fit-tokenizer": {"default": TokenizerFitConfig,
                      "dall_e_like": lambda: TokenizerFitConfig(img_size=112, patch_size=8, vocab_size=8192,
                                                                dataset="folder")},
}
DEFAULT_PRESET = {"pretrain": "demo", "finetune": "demo", "eval": "default", "fit-tokenizer": "default"}


def list_presets(kind: str) -> list:
    return sorted(PRESETS[kind])


def preset(kind: str, name: str = ""):
    name = name or DEFAULT_PRESET[kind]
    if name not in PRESETS[kind]:
        raise ConfigError(f"unknown {kind} preset {name!r}; choose one of {list_presets(kind)}")
    return PRESETS[kind][name]()


# ----------------------------------------------------------------------------------------------- overrides
def _coerce(name: str, value: Any, typ) -> Any:
    """Convert a YAML-parsed value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if value is None or isinstance(value, (str, os.PathLike)):
            return os.fspath(value or "")
        # YAML typed it (0755 -> 493, 1.10 -> 1.1, yes -> True, 12:30 -> 750): its text is gone, so no guess
        raise ConfigError(f"{name}: expected text, but YAML read {value!r} as a {type(value).__name__}; quote the "
                          f"value ({name}: '...') to keep it as written")
    elif typ is tuple:
        if isinstance(value, str) and "," in value:
            value = [yaml.safe_load(v) for v in value.split(",")]
        if isinstance(value, (list, tuple)):
            return tuple(float(v) if isinstance(v, str) and _is_number(v) else v for v in value)
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise ConfigError(f"{name}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def apply_overrides(config, overrides: dict):
    """A copy of `config` with `overrides` ({field: value}) applied; unknown fields are an error. A mapping
    given for model_overrides merges into the current one (null or {} clears it) and is applied before the
    dotted model_overrides.<field> keys, wherever they stand."""
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    items = [(key.replace("-", "_"), value) for key, value in overrides.items()]
    for key, value in sorted(items, key=lambda item: item[0].startswith("model_overrides.")):
        if (key == "model_overrides" or key.startswith("model_overrides.")) and "model_overrides" in names:
            sub = dict(changes.get("model_overrides", getattr(config, "model_overrides")))
            if key == "model_overrides":
                given = _coerce(key, value, Optional[dict])
                sub = {**sub, **given} if given else {}
            else:                                                       # model_overrides.depth=6
                sub[key.split(".", 1)[1]] = value
            changes["model_overrides"] = sub
            continue
        if key not in names:
            near = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ConfigError(f"unknown {type(config).__name__} field {key!r}{hint}")
        changes[key] = _coerce(key, value, hints[key])
    return dataclasses.replace(config, **changes)


def is_text(typ) -> bool:
    """A text field (str or Optional[str]): its value is the text given, never re-typed by YAML."""
    return typ is str or typ == Optional[str]


def parse_set(items, cls=None) -> dict:
    """['lr=1e-3', 'betas=[0.9,0.98]'] -> {'lr': 0.001, 'betas': [0.9, 0.98]} (values parsed as YAML). The text
    fields of the dataclass `cls` take the text as written, as their flags do (YAML would read 0755 as 493 and
    yes as True); a value in YAML quotes ('0755', "a b") loses its quotes."""
    hints = typing.get_type_hints(cls) if cls is not None else {}
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        quoted = len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\""
        text = is_text(hints.get(key.replace("-", "_"))) and not quoted
        out[key] = raw if text else parse_yaml_value(raw, f"--set {key}")
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a key given twice in one mapping (safe_load keeps the last silently, so a
    second `lr:` further down a file would quietly win over the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:       # an unhashable key: the base constructor's error names it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml_text(text):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_yaml_value(raw: str, what: str):
    """One value written as YAML ("" for an empty string); ConfigError naming `what` when it is not YAML."""
    if not raw.strip():
        return ""
    try:
        return _load_yaml_text(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: {raw!r} is not a valid YAML value ({' '.join(str(e).split())})") from None


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            data = _load_yaml_text(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:    # an empty file (or only comments) changes nothing
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of field: value, not "
                          f"{type(data).__name__} {data!r:.60}")
    keys = [k for k in data if not isinstance(k, str)]
    if keys:   # YAML reads yes/no/on/off, numbers and null as such, keys too
        raise ConfigError(f"config file {path!r}: {keys[0]!r} is not a field name; quote the key ('{keys[0]}': ...) "
                          f"if it is one")
    return data


def resolve(kind: str, preset_name: str = "", yaml_path: str = "", overrides: Optional[dict] = None):
    """Defaults < preset < YAML file < overrides. The preset is named by preset_name (the --preset flag),
    else overrides' `preset` (--set preset=...), else the YAML file's own `preset`."""
    from_file = load_yaml(yaml_path) if yaml_path else {}
    overrides = dict(overrides or {})
    set_name = overrides.pop("preset", None)
    name = preset_name or set_name or from_file.pop("preset", "") or ""
    from_file.pop("preset", None)
    config = preset(kind, name)
    saved_kind = from_file.pop("kind", None)        # written by save(): config.yaml of an earlier run
    if saved_kind and saved_kind != type(config).__name__:
        raise ConfigError(f"{yaml_path} holds a {saved_kind}, not a {type(config).__name__}")
    if saved_kind and "model_overrides" in from_file:
        config = dataclasses.replace(config, model_overrides={})   # a run's saved mapping is whole: not merged
    config = _follow_model(config, {**from_file, **overrides})
    config = apply_overrides(config, from_file)
    return apply_overrides(config, overrides)


def _follow_model(config, given: dict):
    """When the user names another model than the preset's, the preset's architecture changes (model_overrides,
    e.g. the demo's width-128 4-block BEiT) and image size belong to the preset's model, not to the named one:
    they are dropped (the named model's registered img_size is used, and a PretrainConfig's tokenizer view
    is sized automatically) unless the user sets img_size too; model_overrides given alongside (a mapping or
    dotted model_overrides.<field> keys) change the named model. The recipe (lr, masking, augmentation) stays
    the preset's: --preset beit_base_224 gives the reference recipe."""
    keys = {k.replace("-", "_") for k in given}   # dotted model_overrides.<field> keys change one field
    if "model" not in given or given["model"] == config.model:
        return config
    from beit_fast.models import PRESETS as MODELS
    name = given["model"]
    changes = {"model_overrides": {}}
    if "img_size" not in keys and name in MODELS and "img_size" in MODELS[name]:
        changes["img_size"] = MODELS[name]["img_size"]
    if isinstance(config, PretrainConfig) and "second_img_size" not in keys:
        changes["second_img_size"] = 0
    return dataclasses.replace(config, **changes)


def to_dict(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def save(config, folder: str) -> None:
    """Write config.yaml and config.json (the fully resolved configuration) into `folder`, atomically."""
    from .checkpoint import atomic_write_bytes
    d = to_dict(config)
    d["kind"] = type(config).__name__
    atomic_write_bytes(os.path.join(folder, "config.yaml"), yaml.safe_dump(d, sort_keys=False).encode())
    atomic_write_bytes(os.path.join(folder, "config.json"), json.dumps(d, indent=1).encode())


# ----------------------------------------------------------------------------------------------- checks
def model_fields(cfg) -> dict:
    """The BeitConfig fields of the run's model (preset + overrides), without building it."""
    from beit_fast.models import PRESETS as MODELS
    from beit_fast.models import BeitConfig
    if cfg.model not in MODELS:
        near = difflib.get_close_matches(cfg.model, list(MODELS), n=3)
        raise ConfigError(f"unknown model {cfg.model!r}" + (f" (did you mean {', '.join(near)}?)" if near else "")
                          + f"; known models: {sorted(MODELS)}")
    valid = {f.name for f in dataclasses.fields(BeitConfig)}
    bad = sorted(set(cfg.model_overrides) - valid)
    if bad:
        raise ConfigError(f"model_overrides: unknown BeitConfig fields {bad}; valid: {sorted(valid)}")
    owned = {"img_size": ("img_size", cfg.img_size), "in_chans": ("the data's RGB images", 3)}
    if isinstance(cfg, FinetuneConfig):
        owned["num_classes"] = ("num_classes", cfg.num_classes)
    for key, (source, value) in owned.items():   # build_model applies model_overrides last: the run would break
        if key in cfg.model_overrides and cfg.model_overrides[key] != value:
            raise ConfigError(f"model_overrides.{key}={cfg.model_overrides[key]!r} differs from {source} "
                              f"({value!r}), which the run's data and loss use; "
                              + (f"set {key} instead" if source == key else "remove it"))
    fields = {**dataclasses.asdict(BeitConfig()), **MODELS[cfg.model], **cfg.model_overrides}
    fields["img_size"] = cfg.model_overrides.get("img_size", cfg.img_size)
    return fields


def model_patch_size(cfg) -> int:
    return int(model_fields(cfg)["patch_size"])


def tokenizer_downsample(cfg) -> int:
    """Pixels per visual token in the tokenizer view: 8 for the DALL-E encoder; for k-means the saved file's
    patch size when tokenizer_path names one, else tokenizer_patch (the one to fit)."""
    if cfg.tokenizer == "dvae":
        return 8
    if cfg.tokenizer_path:
        from .tokenizer import KMeansTokenizer
        try:
            return KMeansTokenizer.file_patch_size(cfg.tokenizer_path)
        except Exception as e:
            raise ConfigError(f"tokenizer_path {cfg.tokenizer_path!r}: {e}") from None
    return cfg.tokenizer_patch


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _one_of(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def fsdp_runs_on_cpu() -> bool:
    """torch's per-module FSDP records events on the device's streams; older torch has no CPU stream events."""
    import torch
    return hasattr(torch.cpu, "Stream") and hasattr(torch.cpu.Stream, "record_event")


def _check_output_dir_is_free(cfg) -> None:
    """A run that does not continue the run in output_dir must not write into it: its checkpoint pruning
    (by step) would delete the new checkpoints and keep the old ones, `latest` would name the old run's, a
    k-means tokenizer fit there would be reused whatever tokenizer_vocab says, and the logs would mix."""
    from .checkpoint import BEST, BEST_EMA, step_checkpoints
    folder = cfg.output_dir
    found = step_checkpoints(folder) if os.path.isdir(folder) else []
    names = [BEST, BEST_EMA, "log.jsonl"]
    if isinstance(cfg, PretrainConfig) and cfg.tokenizer == "kmeans" and not cfg.tokenizer_path:
        names.append("tokenizer.safetensors")    # the file this run would fit, or silently reuse
    found += [os.path.join(folder, f) for f in names if os.path.isfile(os.path.join(folder, f))]
    if not found:
        return
    if cfg.resume == "auto":
        return
    if cfg.resume:
        target = cfg.resume if os.path.isdir(cfg.resume) else os.path.dirname(cfg.resume) or "."
        if os.path.realpath(target) == os.path.realpath(folder):
            return
    listed = ", ".join(os.path.basename(p) for p in found[-3:])
    raise ConfigError(f"output_dir {folder!r} already holds an earlier run ({listed}); pass --resume (resume=auto) to "
                      f"continue that run, or choose another --output-dir (a new run there would delete or reuse "
                      f"its files)")


def _torchrun_world() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_cuda_device(device: str) -> None:
    import torch
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device=auto or cpu")
    if device == "cuda":
        return
    index = device[len("cuda:"):]
    if _torchrun_world() > 1:
        raise ConfigError(f"device={device!r} would put every torchrun process on the same GPU; use device=cuda "
                          f"(each process takes cuda:LOCAL_RANK) or auto")
    if int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} but this machine has {torch.cuda.device_count()} GPU(s): "
                          f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def _check_device(device: str, values_only: bool = False) -> None:
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not values_only:
        _check_cuda_device(device)


def _at_least(cfg, minimum, *names, most=math.inf) -> None:
    """Each named field must be a number in [minimum, most]; NaN and infinities fail, None (an option that
    is off) passes."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not (minimum <= value <= most and math.isfinite(value)):
            rule = f">= {minimum}" if most == math.inf else f"in [{minimum}, {most}]"
            kind = "a finite number " if isinstance(value, float) else ""
            raise ConfigError(f"{name} must be {kind}{rule}, got {value}")


def _numbers(name: str, value, count: int, ok=lambda v: True, rule: str = "") -> None:
    """`value` must be `count` real numbers each passing `ok` (rule: what ok asks, for the message)."""
    good = (isinstance(value, (tuple, list)) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v) for v in value))
    if not good:
        raise ConfigError(f"{name} must be {count} numbers{rule} (e.g. --set {name}="
                          f"{','.join(['0.5'] * count)}), got {value!r}")


def _check_auto_augment(policy: Optional[str], img_size: int) -> None:
    """timm parses the policy only when the training transform is built: build one here (no image touched)."""
    if not policy:
        return
    from timm.data import create_transform
    try:
        create_transform(img_size, is_training=True, auto_augment=policy)
    except Exception as e:     # timm asserts, int() of a malformed magnitude, ...
        raise ConfigError(f"auto_augment must be a timm policy (e.g. rand-m9-mstd0.5-inc1, augmix-m5-w3, original, "
                          f"v0, 3a) or null, got {policy!r} ({type(e).__name__}: {e})") from None


def _aspect_share(grid: int, area: float, min_aspect: float, max_aspect: float) -> float:
    """The share of the generator's log-aspect range [min_aspect, max_aspect] in which a block of `area`
    patches fits a grid x grid patch grid. The block-wise generator (reference section 2) places h x w =
    round(sqrt(t a)) x round(sqrt(t / a)) patches only where h and w are below the grid's side: t a and t / a
    below (grid - 1/2)^2."""
    side2 = (grid - 0.5) ** 2
    lo, hi = max(min_aspect, area / side2), min(max_aspect, side2 / area)
    return max(math.log(hi / lo), 0.0) / math.log(max_aspect / min_aspect) if hi > lo else 0.0


def _check_a_block_fits(grid: int, most: int, min_patches: int, min_aspect: float, max_aspect: float) -> None:
    """Refuse masking settings whose smallest block fits nowhere: every mask would be empty and the first
    step's loss (over no masked patch) NaN. The generator draws block areas between min_mask_patches and the
    patches it may still mask (`most`: num_mask_patches, or max_mask_patches when smaller), whichever is
    smaller; min_aspect and max_aspect as masking._check_args resolved them."""
    smallest = min(min_patches, most)
    if _aspect_share(grid, smallest, min_aspect, max_aspect) > 0:
        return
    good = max((t for t in range(1, grid * grid + 1)
                if _aspect_share(grid, t, min_aspect, max_aspect) >= 0.5), default=1)
    raise ConfigError(f"min_mask_patches={min_patches}: no block of {smallest} patches fits a {grid}x{grid} patch "
                      f"grid (a block's sides must be below {grid}, its aspect ratio within [{min_aspect:g}, "
                      f"{max_aspect:g}]), so every mask would be empty; at most {good} lets blocks take half "
                      f"the aspect ratios or more")


def _check_run_values(cfg, fields: dict) -> None:
    """Value ranges of a RunConfig that the run would otherwise trip over deep inside (a transform, the
    sampler, the model, the optimizer), or take silently for something else."""
    _at_least(cfg, 0, "num_workers", "train_subset", "num_threads", "save_every_steps", "stop_at_step", "lr",
              "min_lr", "weight_decay", "weight_decay_end", "warmup_epochs", "eps", "clip_grad", "color_jitter",
              "layer_scale")
    if not cfg.output_dir:
        raise ConfigError("output_dir is empty; name the run's folder (e.g. --output-dir runs/my-run)")
    _at_least(cfg, -1, "warmup_steps")
    _at_least(cfg, 1, "synthetic_size", "keep_last")
    _at_least(cfg, 0, "hflip", "drop_path", most=1)
    channels = int(fields.get("in_chans", 3))
    _numbers("mean", cfg.mean, channels)
    _numbers("std", cfg.std, channels, lambda v: v > 0, " > 0")
    _numbers("crop_scale", cfg.crop_scale, 2, lambda v: 0 < v <= 1, " in (0, 1]")
    _numbers("crop_ratio", cfg.crop_ratio, 2, lambda v: v > 0, " > 0")
    for name in ("crop_scale", "crop_ratio"):
        lo, hi = getattr(cfg, name)
        if lo > hi:
            raise ConfigError(f"{name} must be (min, max) with min <= max, got {getattr(cfg, name)!r}")
    _numbers("betas", cfg.betas, 2, lambda v: 0 <= v < 1, " in [0, 1)")
    from .data import INTERPOLATIONS
    _one_of("interpolation", cfg.interpolation, INTERPOLATIONS)
    if isinstance(cfg, PretrainConfig):
        _one_of("second_interpolation", cfg.second_interpolation, INTERPOLATIONS)
        _at_least(cfg, 1, "tokenizer_vocab", "tokenizer_patch", "tokenizer_fit_images")
        _at_least(cfg, 0, "second_img_size")
    if isinstance(cfg, FinetuneConfig):
        _at_least(cfg, 0, "eval_batch_size", "val_subset", "eval_every_epochs", "mixup", "cutmix")
        # layer_decay: 1 is none; above 1 the lower layers would learn faster than the head (unilm ignores it)
        _at_least(cfg, 0, "smoothing", "mixup_prob", "mixup_switch_prob", "re_prob", "ema_decay", "layer_decay",
                  most=1)
        _one_of("mixup_mode", cfg.mixup_mode, ("batch", "pair", "elem"))
        _check_auto_augment(cfg.auto_augment, cfg.img_size)


def _train_images(cfg) -> int:
    """Images in the training split, after train_subset."""
    from .data import build_dataset
    n = len(build_dataset(cfg.dataset, "train", cfg.data_path, cfg.img_size, cfg.synthetic_size))
    return min(n, cfg.train_subset) if cfg.train_subset else n


def _check_one_step_fits(cfg, n: int) -> None:
    """The training split (n images) must hold one optimizer step's images over all processes."""
    from .engine import steps_per_epoch
    steps_per_epoch(n, cfg.batch_size * _torchrun_world(), cfg.accum_steps)   # ValueError naming the numbers


def _check_kmeans_fit(codes: int, images: int, per_image: int, max_patches: int, names: tuple) -> None:
    """k-means needs one patch per code at least: `images` images of `per_image` patches, kept <= max_patches.
    names: the fields of the codes and the image count, for the message."""
    patches = min(images * per_image, max_patches)
    if patches < codes:
        raise ConfigError(f"{names[0]}={codes} needs at least {codes} patches to fit k-means, but {images} images x "
                          f"{per_image} patches (at most {max_patches}) give {patches}; lower {names[0]} or use more "
                          f"images ({names[1]}, the dataset)")


def check(config, values_only: bool = False):
    """Validate a run config; raises ConfigError naming the field to change. Returns the config.
    values_only: check the values alone (as --print-config does), not the files, data, GPUs or packages they
    name, nor the output folder."""
    from .data import build_dataset, check_dataset
    cfg = config
    if isinstance(cfg, EvalConfig):
        _check_device(cfg.device, values_only)
        _at_least(cfg, 1, "batch_size")
        _at_least(cfg, 0, "num_workers")
        _one_of("precision", cfg.precision, ("fp32", "bf16", "fp16"))
    if isinstance(cfg, TokenizerFitConfig):
        _check_device(cfg.device, values_only)
        _at_least(cfg, 1, "img_size", "patch_size", "vocab_size", "max_images", "iters")
        _at_least(cfg, 0, "num_workers")
        if cfg.img_size % cfg.patch_size:
            raise ConfigError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.max_patches < cfg.vocab_size:
            raise ConfigError(f"max_patches ({cfg.max_patches}) must be >= vocab_size ({cfg.vocab_size}): k-means "
                              f"needs at least one patch per code")
        if not os.path.basename(cfg.output):     # "" or a folder's name ending in a slash: the fit's work is lost
            raise ConfigError(f"output {cfg.output!r} names no file; name the file to write (e.g. "
                              f"{os.path.join(cfg.output, 'kmeans.safetensors')!r})")
        if os.path.isdir(cfg.output) and not values_only:
            raise ConfigError(f"output {cfg.output!r} is a folder; name the file to write (e.g. "
                              f"{os.path.join(cfg.output, 'kmeans.safetensors')!r})")
        if os.path.isfile(cfg.output) and not cfg.overwrite and not values_only:
            raise ConfigError(f"output {cfg.output!r} exists (a pretraining run may use it: one resumed after it "
                              f"changed is refused); name another --output, or pass --overwrite")
    if isinstance(cfg, (RunConfig,)):
        _one_of("precision", cfg.precision, ("fp32", "bf16", "fp16"))
        _one_of("optimizer", cfg.optimizer, ("adamw", "apex_adam", "apex_lamb"))
        _one_of("distributed", cfg.distributed, ("ddp", "fsdp"))
        _one_of("attn_impl", cfg.attn_impl, ("auto", "eager", "sdpa", "fused"))
        _one_of("weight_decay_exclusions", cfg.weight_decay_exclusions, ("all", "unilm"))
        _one_of("compile_mode", cfg.compile_mode, COMPILE_MODES)
        _at_least(cfg, 1, "batch_size", "accum_steps", "epochs", "log_every")
        _check_device(cfg.device, values_only)
        if cfg.distributed == "fsdp" and cfg.optimizer.startswith("apex"):
            raise ConfigError(f"optimizer={cfg.optimizer} is not supported with distributed=fsdp (apex's fused "
                              f"kernels take plain tensors, not FSDP's sharded DTensors, and LAMB's trust ratio "
                              f"would be computed per shard); use optimizer=adamw")
        if cfg.distributed == "fsdp" and getattr(cfg, "ema", False):
            raise ConfigError("ema=true is not supported with distributed=fsdp (the EMA copy would be a full, "
                              "unsharded model on every rank); use distributed=ddp, or ema=false")
        if cfg.distributed == "fsdp" and not fsdp_runs_on_cpu() and not values_only:
            import torch
            if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
                raise ConfigError(f"distributed=fsdp on the CPU needs a newer torch than {torch.__version__} (its "
                                  f"FSDP has no CPU streams; torch 2.11 has them, 2.6 does not); use distributed=ddp "
                                  f"here, or GPUs")
        if cfg.optimizer.startswith("apex") and not values_only:
            try:
                import apex.optimizers  # noqa: F401
            except ImportError:
                raise ConfigError(f"optimizer={cfg.optimizer} needs NVIDIA apex, which is not installed; "
                                  f"install it or use optimizer=adamw (torch's fused AdamW on CUDA)") from None
        fields = model_fields(cfg)
        if fields["img_size"] % fields["patch_size"]:
            raise ConfigError(f"img_size {fields['img_size']} is not a multiple of patch_size {fields['patch_size']}")
        if cfg.resume and cfg.resume != "auto" and not os.path.exists(cfg.resume) and not values_only:
            raise ConfigError(f"resume={cfg.resume!r} does not exist (use resume=auto to continue the run in "
                              f"output_dir if it has a checkpoint)")
    try:
        if isinstance(cfg, RunConfig):
            _check_run_values(cfg, fields)
            from beit_fast.models import BeitConfig
            BeitConfig(**fields)   # the model's own checks (heads dividing the width, ...): ValueError
        if isinstance(cfg, PretrainConfig):
            if fields["vocab_size"] <= 0:
                raise ConfigError(f"model {cfg.model!r} is a classification model; pretraining needs a masked-image-"
                                  f"modeling model (a name ending in _8k_vocab or _mim)")
            _one_of("tokenizer", cfg.tokenizer, ("kmeans", "dvae"))
            codes = 8192 if cfg.tokenizer == "dvae" else None if cfg.tokenizer_path else cfg.tokenizer_vocab
            given = cfg.model_overrides.get("vocab_size", codes)
            if codes is not None and given != codes:   # the tokenizer's codes are the targets
                raise ConfigError(f"model_overrides.vocab_size={given!r} differs from the tokenizer's {codes} codes "
                                  f"(the pretraining targets); remove it"
                                  + (", or set tokenizer_vocab" if cfg.tokenizer == "kmeans" else ""))
            _one_of("tokenizer_dtype", cfg.tokenizer_dtype, ("auto", "bf16", "fp32", "fp16"))
            if cfg.tokenizer == "dvae" and not cfg.tokenizer_path and not values_only:   # a file it names
                raise ConfigError("tokenizer=dvae needs tokenizer_path=<DALL-E encoder.pkl or state dict>; nothing "
                                  "is downloaded at run time (or use tokenizer=kmeans, fit on your own images)")
            if cfg.tokenizer_path and not os.path.isfile(cfg.tokenizer_path) and not values_only:
                raise ConfigError(f"tokenizer file {cfg.tokenizer_path!r} not found"
                                  + (" (make one with `beit-fast fit-tokenizer`, or leave tokenizer_path empty to "
                                     "fit one automatically)" if cfg.tokenizer == "kmeans" else
                                     " (nothing is downloaded at run time: fetch "
                                     "https://cdn.openai.com/dall-e/encoder.pkl yourself)"))
            grid = fields["img_size"] // fields["patch_size"]
            reads_file = cfg.tokenizer == "kmeans" and cfg.tokenizer_path   # its patch size is in the file
            per_code = None if values_only and reads_file else tokenizer_downsample(cfg)
            if per_code and cfg.second_img_size and cfg.second_img_size != grid * per_code:
                raise ConfigError(f"second_img_size={cfg.second_img_size}: the tokenizer gives one code per "
                                  f"{per_code}px, so a {grid}x{grid} patch grid needs a {grid * per_code}px view "
                                  f"(or second_img_size=0 for automatic)")
            if not 0 < cfg.num_mask_patches <= grid * grid:
                raise ConfigError(f"num_mask_patches must be in [1, {grid * grid}], got {cfg.num_mask_patches}")
            from ..masking import _check_args
            try:
                _, _, max_mask, max_aspect = _check_args(grid, cfg.num_mask_patches, cfg.min_mask_patches,
                                                         cfg.max_mask_patches, cfg.min_mask_aspect, None)
            except ValueError as e:   # the generator's names: min_num_patches is min_mask_patches, ...
                raise ConfigError(f"masking (num/min/max_mask_patches, min_mask_aspect): {e}") from None
            _check_a_block_fits(grid, min(cfg.num_mask_patches, max_mask), cfg.min_mask_patches,
                                cfg.min_mask_aspect, max_aspect)
            if not values_only:
                check_dataset(cfg.dataset, cfg.data_path, ("train",))
                n = _train_images(cfg)
                _check_one_step_fits(cfg, n)
                if cfg.tokenizer == "kmeans" and not cfg.tokenizer_path:   # fit on the first images, one code a patch
                    _check_kmeans_fit(cfg.tokenizer_vocab, min(n, cfg.tokenizer_fit_images), grid * grid,
                                      TokenizerFitConfig.max_patches, ("tokenizer_vocab", "tokenizer_fit_images"))
        elif isinstance(cfg, FinetuneConfig):
            if fields["vocab_size"] > 0:
                raise ConfigError(f"model {cfg.model!r} is a pretraining model; fine-tune a classification model "
                                  f"(e.g. beit_base_patch16_224) and pass the pretraining checkpoint as init")
            if cfg.init and not values_only:
                from .checkpoint import resolve_checkpoint
                try:
                    resolve_checkpoint(cfg.init, weights_folder=True)
                except FileNotFoundError as e:
                    raise ConfigError(f"init: {e}") from None
            if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
                raise ConfigError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
            if cfg.num_classes < 1:
                raise ConfigError("num_classes must be >= 1")
            if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
                raise ConfigError(f"crop_pct must be in (0, 1] (evaluation resizes to img_size / crop_pct), or "
                                  f"null for unilm's choice, got {cfg.crop_pct}")
            if not values_only:
                check_dataset(cfg.dataset, cfg.data_path, ("train", "val"))
                _check_one_step_fits(cfg, _train_images(cfg))
        elif isinstance(cfg, TokenizerFitConfig) and not values_only:
            world = _torchrun_world()
            if world > 1:   # every process would fit the same k-means (on the same GPU) and write one file
                raise ConfigError(f"fit-tokenizer runs in one process, but WORLD_SIZE={world} (torchrun): run it "
                                  f"without torchrun, or leave tokenizer_path empty in pretraining, where rank 0 "
                                  f"fits the tokenizer and the other processes wait for it")
            check_dataset(cfg.dataset, cfg.data_path, ("train",))
            images = min(len(build_dataset(cfg.dataset, "train", cfg.data_path, cfg.img_size)), cfg.max_images)
            _check_kmeans_fit(cfg.vocab_size, images, (cfg.img_size // cfg.patch_size) ** 2, cfg.max_patches,
                              ("vocab_size", "max_images"))
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    if isinstance(cfg, RunConfig) and not values_only:
        _check_output_dir_is_free(cfg)    # last: the errors above say more about what to fix
    return cfg
