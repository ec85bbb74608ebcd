"""`beit-fast eval`: top-1 / top-5 of a classification checkpoint on a held-out split."""
from __future__ import annotations

import json
import os
import warnings

from . import checkpoint as ckpt
from . import config as config_mod
from . import engine, runtime
from .data import EpochBatchSampler, Samples, build_dataset, check_dataset, eval_transform, make_loader


def evaluate(config: config_mod.EvalConfig = None) -> dict:
    """Evaluate a fine-tuned checkpoint of this package (file, or a run folder: best, else latest)."""
    cfg = config_mod.check(config if config is not None else config_mod.EvalConfig())
    try:
        # a run folder: the best epoch of the weights evaluated (of the EMA weights with use_ema)
        path = ckpt.resolve_checkpoint(cfg.checkpoint, prefer_best=True,
                                       best_name=ckpt.BEST_EMA if cfg.use_ema else ckpt.BEST)
    except FileNotFoundError as e:
        raise config_mod.ConfigError(f"checkpoint: {e}") from None
    try:
        state = ckpt.load(path)
    except Exception as e:     # not a torch file, a pickle that is not weights-only, a truncated file, ...
        raise config_mod.ConfigError(f"{path} is not a beit_fast checkpoint ({ckpt.load_failure(e)})") from None
    if not isinstance(state, dict) or "model_config" not in state or "config" not in state:
        raise config_mod.ConfigError(f"{path} is not a beit_fast fine-tuning checkpoint (no model_config); "
                                     f"load foreign weights with beit_fast.models.load_checkpoint instead")
    run = state["config"]
    if state.get("kind") != "finetune":
        raise config_mod.ConfigError(f"{path} is a {state.get('kind')} checkpoint; eval needs a fine-tuned one")
    dataset = cfg.dataset or run["dataset"]
    data_path = cfg.data_path or run.get("data_path", "")
    try:
        check_dataset(dataset, data_path, ("val",))
    except (FileNotFoundError, ValueError) as e:
        raise config_mod.ConfigError(str(e)) from None

    return runtime.run(cfg.device, _evaluate, cfg, state, path, dataset, data_path)


def _evaluate(cfg, state: dict, path: str, dataset: str, data_path: str, rt) -> dict:
    from beit_fast.models import BeitConfig, build_model
    run = state["config"]
    model = build_model(BeitConfig(**state["model_config"]))
    key = "model_ema" if cfg.use_ema else "model"
    if key not in state:
        raise config_mod.ConfigError(f"{path} has no {key!r} weights (was EMA enabled?)")
    model.load_state_dict(state[key])
    model.to(rt.device)
    val = build_dataset(dataset, "val", data_path, run["img_size"], run.get("synthetic_size", 1024),
                        run.get("num_classes", 10), run.get("seed", 0), classes=state.get("classes"))
    if dataset == "folder" and state.get("classes") is None and not os.path.isdir(os.path.join(data_path, "train")):
        # a checkpoint that does not name its classes, and no train/ split to take them from
        n_model = model.config.num_classes
        if len(val.classes) != n_model:
            raise config_mod.ConfigError(
                f"{path} does not name its classes and {data_path!r} has no train/ split: val/'s {len(val.classes)} "
                f"class folders cannot be matched to the model's {n_model} classes")
        warnings.warn(f"{path} does not name its classes (written by an older beit_fast): the labels follow "
                      f"val/'s own class folders, which is right only if the training data had the same ones",
                      stacklevel=2)
    transform = eval_transform(run["img_size"], run.get("crop_pct", 1.0), run.get("interpolation", "bicubic"),
                               run["mean"], run["std"])
    sampler = EpochBatchSampler(len(val), cfg.batch_size * rt.world, 0, rt.rank, rt.world, shuffle=False,
                                drop_last=False)
    loader = make_loader(Samples(val, transform, 0, substitute=False), sampler, cfg.num_workers,
                         pin_memory=rt.device.type == "cuda")
    result = engine.evaluate(model, loader, rt.device, cfg.precision, rt)
    # what was evaluated, so that eval.json (replaced by each eval into the same folder) says which run it was
    result.update(checkpoint=path, weights=key, precision=cfg.precision, dataset=dataset, data_path=data_path)
    if rt.is_main:
        out_dir = cfg.output_dir or os.path.dirname(os.path.abspath(path))
        os.makedirs(out_dir, exist_ok=True)
        ckpt.atomic_write_bytes(os.path.join(out_dir, "eval.json"), json.dumps(result, indent=1).encode())
        print(f"{path}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f} "
              f"on {result['n']} held-out images"
              + (f" ({result['skipped_images']} unreadable, left out)" if result["skipped_images"] else ""),
              flush=True)
    return result
