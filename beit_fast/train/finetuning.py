"""BEiT image-classification fine-tuning: `finetune(FinetuneConfig)` / `beit-fast finetune`.

Reference §6: start from a pretraining checkpoint (this package's, unilm's, timm's or Hugging Face's,
through beit_fast.models.load_checkpoint, which expands the shared relative-position table per layer),
layer-wise lr decay, mixup/cutmix with label smoothing (timm), drop path, optional EMA, top-1/top-5 on the
held-out split after every `eval_every_epochs` epochs; the best top-1 is kept as checkpoint-best.pt.
"""
from __future__ import annotations

import json
import os
import time
import warnings

import torch

from . import checkpoint as ckpt
from . import config as config_mod
from . import engine, runtime
from .data import EpochBatchSampler, Samples, Subset, build_dataset, classify_transform, make_loader, seed_for
from .feedback import Reporter, peak_flops, train_flops_per_image
from .optim import Schedule, apply_schedule


def normalisation_mismatch(cfg, init_path: str):
    """A warning text when `init_path` comes from a beit_fast pretraining run (its config.json lies beside it)
    that normalised images with another mean/std than this fine-tuning will (the BEiT-B/L presets follow the
    reference: ImageNet mean/std for the IN-1k pretraining recipe, 0.5/0.5 for fine-tuning pt22k weights);
    None otherwise."""
    saved = os.path.join(os.path.dirname(os.path.abspath(init_path)), "config.json")
    try:
        with open(saved) as f:
            pre = json.load(f)
    except (OSError, ValueError):
        return None
    if pre.get("kind") != "PretrainConfig" or "mean" not in pre or "std" not in pre:
        return None
    was = (tuple(pre["mean"]), tuple(pre["std"]))
    now = (tuple(cfg.mean), tuple(cfg.std))
    if all(abs(a - b) < 1e-6 for x, y in zip(was, now) for a, b in zip(x, y)):
        return None
    return (f"init checkpoint {init_path} was pretrained on images normalised with mean={list(was[0])} "
            f"std={list(was[1])}, but this fine-tuning uses mean={list(now[0])} std={list(now[1])}; pass "
            f"--mean {','.join(map(str, was[0]))} --std {','.join(map(str, was[1]))} to match it")


def finetune(config: config_mod.FinetuneConfig = None) -> dict:
    """Fine-tune + evaluate (default: the digits demo from random init); returns {'top1', 'top5', 'best_top1', ...}."""
    cfg = config_mod.check(config if config is not None else config_mod.preset("finetune"))
    return runtime.run(cfg.device, _finetune, cfg)


def _loss_fn(cfg):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=cfg.num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def _finetune(cfg, rt) -> dict:
    engine.prepare_output(cfg, rt, folder=False)
    device = rt.device
    train_set = build_dataset(cfg.dataset, "train", cfg.data_path, cfg.img_size, cfg.synthetic_size,
                              cfg.num_classes, cfg.seed)
    val_set = build_dataset(cfg.dataset, "val", cfg.data_path, cfg.img_size, cfg.synthetic_size,
                            cfg.num_classes, cfg.seed)
    if cfg.train_subset:
        train_set = Subset(train_set, cfg.train_subset)
    if cfg.val_subset:
        val_set = Subset(val_set, cfg.val_subset)
    if len(train_set.classes) > cfg.num_classes:
        raise config_mod.ConfigError(f"the training data has {len(train_set.classes)} classes but num_classes="
                                     f"{cfg.num_classes} (--num-classes {len(train_set.classes)})")
    if len(train_set.classes) < cfg.num_classes and rt.is_main:
        warnings.warn(f"the training data has {len(train_set.classes)} classes, the classification head "
                      f"num_classes={cfg.num_classes} outputs: {cfg.num_classes - len(train_set.classes)} of them "
                      f"never train, and top-5 counts them (--num-classes {len(train_set.classes)} makes the head "
                      f"fit the data)", stacklevel=2)

    # --- model, initialised from a checkpoint when given
    engine.seed_all(cfg.seed)
    model = engine.build_model(cfg, device, num_classes=cfg.num_classes)
    init_note = "random initialisation"
    if cfg.init:
        from beit_fast.models import load_checkpoint
        path = ckpt.resolve_checkpoint(cfg.init, weights_folder=True)
        try:
            load_report = load_checkpoint(model, path, warn=False)   # logged whole in init_note
        except ValueError as e:   # a checkpoint of another model size, or not a weights file
            raise config_mod.ConfigError(
                f"--init {path}: {e}\n(the model built here is {cfg.model} with model_overrides "
                f"{cfg.model_overrides or '{}'}; set --model / --model-overrides to the checkpoint's architecture: "
                f"--model-overrides null keeps the named model's own)") from None
        init_note = f"{path}\n{load_report}"
        mismatch = normalisation_mismatch(cfg, path)
        if mismatch and rt.is_main:
            warnings.warn(mismatch, stacklevel=2)
    engine.prepare_output(cfg, rt)   # after the data's and --init's errors: a refused run leaves no folder
    engine.seed_all(seed_for(cfg.seed, rt.rank))
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.ema_decay)

    # --- data
    global_batch = cfg.batch_size * rt.world
    steps_per_epoch = engine.steps_per_epoch(len(train_set), global_batch, cfg.accum_steps)
    sampler = EpochBatchSampler(len(train_set), global_batch, cfg.seed, rt.rank, rt.world,
                                num_batches=steps_per_epoch * cfg.accum_steps)
    loader = make_loader(Samples(train_set, classify_transform(cfg, train=True), cfg.seed), sampler,
                         cfg.num_workers, pin_memory=device.type == "cuda")
    eval_batch = (cfg.eval_batch_size or cfg.batch_size) * rt.world
    val_sampler = EpochBatchSampler(len(val_set), eval_batch, cfg.seed, rt.rank, rt.world, shuffle=False,
                                    drop_last=False)
    val_samples = Samples(val_set, classify_transform(cfg, train=False), cfg.seed, substitute=False)
    val_loader = make_loader(val_samples, val_sampler, cfg.num_workers, pin_memory=device.type == "cuda")
    mixup, criterion = _loss_fn(cfg)

    # --- optimisation state
    schedule = Schedule(cfg, steps_per_epoch)
    train_model, optimizer, scaler, (step, start_epoch, start_batch, metrics) = engine.training_state(
        cfg, rt, model, ema, layer_decay=cfg.layer_decay)
    best_top1 = metrics.get("best_top1", -1.0)
    best_ema_top1 = metrics.get("best_ema_top1", -1.0)

    report = Reporter(cfg.output_dir, schedule.total_steps, rt.is_main, cfg.progress, cfg.tensorboard, "finetune",
                      resume_step=step)
    report.advance_to(step, images=step * global_batch * cfg.accum_steps)
    report.message(f"fine-tuning {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) "
                   f"from {init_note}\n{len(train_set)} train / {len(val_set)} held-out images, "
                   f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, global batch "
                   f"{global_batch * cfg.accum_steps}, {cfg.precision}, {rt.world} process(es)"
                   + (f"; resumed at step {step}" if step else ""))
    flops = train_flops_per_image(model.config)
    peak = peak_flops(device, cfg.precision)
    sums = engine.log_sums(device)
    skipped_images = int(metrics.get("skipped_images", 0))   # counted from the run's start, across resumes
    last = {"loss": metrics.get("loss", float("nan"))}
    result = {}
    t_start = time.perf_counter()
    done = False

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        train_model.train()
        t_epoch = time.perf_counter()
        for batch_index, (images, targets, skipped) in enumerate(loader, sampler.start):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            engine.add_skipped_images(sums, skipped)
            micro = batch_index % cfg.accum_steps
            if micro == 0:
                apply_schedule(optimizer, schedule.lr_at(step), schedule.wd_at(step))
            if mixup is not None:
                images, targets = mixup(images, targets)

            sync = runtime.no_sync(train_model, rt, active=micro < cfg.accum_steps - 1)
            with sync:
                with runtime.autocast(device, cfg.precision):
                    logits = train_model(images)
                loss = criterion(logits.float(), targets)
                if step == cfg.inject_nonfinite_at_step:
                    loss = loss * float("inf")
                scaler.scale(loss / cfg.accum_steps).backward()
            engine.add_micro(sums, loss)
            if micro < cfg.accum_steps - 1:
                continue

            grad_norm, skipped_step = engine.optimizer_step(train_model, optimizer, scaler, cfg.clip_grad)
            engine.add_update(sums, skipped_step)
            step += 1
            if ema is not None:
                ema.update(runtime.unwrap(train_model), step=step)
            end_of_epoch = batch_index + 1 == sampler.num_batches
            log_now, save_now, stop = engine.step_events(cfg, step, end_of_epoch)
            if log_now:
                got = engine.read_sums(sums, rt, scaler, step, report)
                last = {"loss": got["loss"]}
                skipped_images += got["skipped_images"]
                img_s = report.throughput(step * global_batch * cfg.accum_steps)
                report.log({"step": step, "epoch": epoch, **last, "lr": schedule.lr_at(step - 1),
                            "wd": schedule.wd_at(step - 1), "grad_norm": float(grad_norm),
                            "scale": got["scale"], "skipped": got["skipped"], "img_s": img_s,
                            "skipped_images": skipped_images,
                            "mfu": flops * img_s / (peak * rt.world) if peak else None}, step)
            if save_now:
                with report.paused():
                    engine.save(cfg, rt, train_model, optimizer, scaler, ema, step=step, epoch=epoch,
                                batch_in_epoch=batch_index + 1, kind="finetune", classes=train_set.classes,
                                metrics={**last, "best_top1": best_top1, "best_ema_top1": best_ema_top1,
                                         "skipped_images": skipped_images})
            if stop:
                done = True
                break
        if done:
            break

        # --- end of epoch: evaluate, keep the best, save (not counted in images/s)
        with report.paused():
            is_last = epoch + 1 == cfg.epochs
            best = best_ema = False
            if is_last or (cfg.eval_every_epochs and (epoch + 1) % cfg.eval_every_epochs == 0):
                result = engine.evaluate(train_model, val_loader, device, cfg.precision, rt)
                # held-out images left out as unreadable; skipped_images stays the training count
                result["eval_skipped_images"] = result.pop("skipped_images")
                best = result["top1"] > best_top1
                best_top1 = max(best_top1, result["top1"])
                if ema is not None:   # the EMA weights' best epoch is kept apart (checkpoint-best-ema.pt)
                    result["ema_top1"] = engine.evaluate(ema.module, val_loader, device, cfg.precision, rt)["top1"]
                    best_ema = result["ema_top1"] > best_ema_top1
                    best_ema_top1 = max(best_ema_top1, result["ema_top1"])
                    result["best_ema_top1"] = best_ema_top1
                report.log({"step": step, "epoch": epoch, "eval": result, "top1": result["top1"],
                            "best_top1": best_top1}, step)
                report.message(f"epoch {epoch + 1}/{cfg.epochs}: train loss {last['loss']:.4f}, held-out top-1 "
                               f"{result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                               f"({time.perf_counter() - t_epoch:.1f} s)")
            metrics = {**last, **result, "best_top1": best_top1, "best_ema_top1": best_ema_top1,
                       "skipped_images": skipped_images}
            engine.save(cfg, rt, train_model, optimizer, scaler, ema, step=step, epoch=epoch + 1, batch_in_epoch=0,
                        kind="finetune", metrics=metrics, best=best, best_ema=best_ema, classes=train_set.classes)

    report.close()
    runtime.barrier(rt)   # rank 0 may still be writing (and pruning) its last checkpoint
    found = ckpt.step_checkpoints(cfg.output_dir)
    out = {**last, **result, "best_top1": best_top1, "step": step, "checkpoint": found[-1] if found else None,
           "seconds": time.perf_counter() - t_start, "skipped_images": skipped_images, "output_dir": cfg.output_dir}
    if rt.is_main and result:
        print(f"fine-tuning done: {step} steps, held-out top-1 {result['top1']:.2f}% (best {best_top1:.2f}%), "
              f"top-5 {result['top5']:.2f}%, {out['seconds']:.0f} s; checkpoint {out['checkpoint']}", flush=True)
    return out
