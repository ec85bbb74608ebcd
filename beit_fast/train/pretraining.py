"""BEiT masked-image-modeling pretraining: `pretrain(PretrainConfig)` / `beit-fast pretrain`.

One step (reference §5.2): tokenize the second view (no grad) -> codes (B, N); labels = codes[mask];
logits = model(images, mask) for the masked positions only; loss = cross-entropy; AdamW with per-step
cosine lr / wd, gradient clipping, dynamic loss scaling in fp16.
"""
from __future__ import annotations

import hashlib
import os
import time

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import config as config_mod
from . import engine, runtime
from .data import EpochBatchSampler, Samples, Subset, TwoViewTransform, build_dataset, make_loader, seed_for
from .feedback import Reporter, peak_flops, train_flops_per_image
from .optim import Schedule, apply_schedule
from .tokenizer import choose_dtype, encode, load_tokenizer, token_meta


IGNORE = -100   # F.cross_entropy's default ignore_index


def pretrain(config: config_mod.PretrainConfig = None) -> dict:
    """Run pretraining (default: the digits demo); returns {'loss', 'mlm_acc', 'step', 'checkpoint', ...}."""
    cfg = config_mod.check(config if config is not None else config_mod.preset("pretrain"))          # every "cannot run" error happens here, before any work
    return runtime.run(cfg.device, _pretrain, cfg)


def _tokenizer(cfg, rt, dataset, second_size: int):
    """Load the tokenizer; for k-means without a file, fit one on the training set (rank 0) and save it."""
    if cfg.tokenizer == "kmeans" and not cfg.tokenizer_path:
        path = os.path.join(cfg.output_dir, "tokenizer.safetensors")
        if rt.is_main and not os.path.isfile(path):
            from .tokenizer_fitting import fit_on_dataset
            t0 = time.perf_counter()
            tok = fit_on_dataset(dataset, second_size, cfg.tokenizer_patch, cfg.tokenizer_vocab,
                                 cfg.tokenizer_fit_images, seed=cfg.seed, device=str(rt.device),
                                 num_workers=cfg.num_workers)
            tok.save(path)
            print(f"fit a k-means tokenizer ({cfg.tokenizer_vocab} codes, {cfg.tokenizer_patch}px patches) in "
                  f"{time.perf_counter() - t0:.1f} s -> {path}", flush=True)
        runtime.barrier(rt)
        return _load(cfg, "kmeans", path), path
    return _load(cfg, cfg.tokenizer, cfg.tokenizer_path), cfg.tokenizer_path


def _load(cfg, kind: str, path: str):
    """load_tokenizer, a file it refuses (a pickle with globals off the allow-list, wrong shapes, ...) a
    ConfigError naming it."""
    try:
        return load_tokenizer(kind, path)
    except Exception as e:   # unpickling, safetensors, shapes, ...: whatever the file is, it is not a tokenizer
        raise config_mod.ConfigError(f"tokenizer={kind}: cannot load {path!r} ({type(e).__name__}: {e})") from e


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pretrain(cfg, rt) -> dict:
    engine.prepare_output(cfg, rt)
    engine.seed_all(cfg.seed)                # identical initial weights on every rank
    device = rt.device
    dataset = build_dataset(cfg.dataset, "train", cfg.data_path, cfg.img_size, cfg.synthetic_size, seed=cfg.seed)
    if cfg.train_subset:
        dataset = Subset(dataset, cfg.train_subset)

    # --- tokenizer and model: the tokenizer's vocabulary sizes the model's lm_head
    grid = cfg.img_size // config_mod.model_patch_size(cfg)
    downsample = config_mod.tokenizer_downsample(cfg)
    second_size = cfg.second_img_size or grid * downsample
    tokenizer, tokenizer_path = _tokenizer(cfg, rt, dataset, second_size)
    tokenizer = tokenizer.to(device)
    if second_size // tokenizer.downsample != grid:
        raise config_mod.ConfigError(
            f"the tokenizer view ({second_size}px, {tokenizer.downsample}px per code) gives a "
            f"{second_size // tokenizer.downsample}x grid but the model has {grid}x{grid} patches")
    given = cfg.model_overrides.get("vocab_size", tokenizer.vocab_size)
    if given != tokenizer.vocab_size:   # check() knows the codes of all but a named k-means file
        raise config_mod.ConfigError(f"model_overrides.vocab_size={given!r} differs from the tokenizer's "
                                     f"{tokenizer.vocab_size} codes ({tokenizer_path}), the pretraining targets; "
                                     f"remove it")
    engine.seed_all(cfg.seed)
    model = engine.build_model(cfg, device, vocab_size=tokenizer.vocab_size)
    engine.seed_all(seed_for(cfg.seed, rt.rank))   # per-rank drop-path / dropout streams

    # --- data: two views + block mask per sample, seeded by (seed, epoch, index)
    from beit_fast.masking import MaskingGenerator
    masks = MaskingGenerator(model.patch_embed.window_size, cfg.num_mask_patches, cfg.min_mask_patches,
                             cfg.max_mask_patches, cfg.min_mask_aspect)
    transform = TwoViewTransform(cfg.img_size, second_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip,
                                 cfg.color_jitter, cfg.interpolation, cfg.second_interpolation, cfg.mean, cfg.std,
                                 tokenizer.pixel_mapping)
    global_batch = cfg.batch_size * rt.world
    steps_per_epoch = engine.steps_per_epoch(len(dataset), global_batch, cfg.accum_steps)
    sampler = EpochBatchSampler(len(dataset), global_batch, cfg.seed, rt.rank, rt.world,
                                num_batches=steps_per_epoch * cfg.accum_steps)
    loader = make_loader(Samples(dataset, transform, cfg.seed, masks), sampler, cfg.num_workers,
                         pin_memory=device.type == "cuda")

    # --- optimisation state
    schedule = Schedule(cfg, steps_per_epoch)
    tokenizer_sha256 = _file_sha256(tokenizer_path)   # the targets: a resumed run must keep them

    def same_tokenizer(state):   # before the checkpoint is loaded (a new vocabulary would not even fit)
        then = (state.get("metrics") or {}).get("tokenizer_sha256", tokenizer_sha256)   # (older runs: none)
        if then != tokenizer_sha256:
            raise config_mod.ConfigError(f"cannot resume: the tokenizer file {tokenizer_path!r} changed since the "
                                         f"checkpoint was saved (sha256 {then[:12]}... then, "
                                         f"{tokenizer_sha256[:12]}... now); its codes are the run's targets")

    train_model, optimizer, scaler, (step, start_epoch, start_batch, resumed) = engine.training_state(
        cfg, rt, model, check_state=same_tokenizer)

    report = Reporter(cfg.output_dir, schedule.total_steps, rt.is_main, cfg.progress, cfg.tensorboard, "pretrain",
                      resume_step=step)
    report.advance_to(step, images=step * global_batch * cfg.accum_steps)
    report.message(f"pretraining {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
                   f"{len(dataset)} images, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
                   f"global batch {global_batch * cfg.accum_steps}, {cfg.precision}, {rt.world} process(es), "
                   f"tokenizer {cfg.tokenizer} ({tokenizer.vocab_size} codes) {tokenizer_path}"
                   + (f"; resumed at step {step}" if step else ""))
    flops = train_flops_per_image(model.config, cfg.num_mask_patches)
    peak = peak_flops(device, cfg.precision)
    token_dtype = None                       # decided on the first batch, or kept from the resumed run
    if resumed.get("tokenizer_dtype"):
        token_dtype, why = choose_dtype(tokenizer, None, cfg.tokenizer_dtype, rt, resumed["tokenizer_dtype"])
        report.message(f"tokenizer runs in {why}")
    sums = engine.log_sums(device)
    # compiled: every step's masked positions padded to the most the masking gives, one shape for the graphs
    pad_to = cfg.batch_size * cfg.num_mask_patches if cfg.compile else 0
    skipped_images = int(resumed.get("skipped_images", 0))   # counted from the run's start, across resumes
    last = {k: resumed.get(k, float("nan")) for k in ("loss", "mlm_acc")}
    t_start = time.perf_counter()
    done = False

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        train_model.train()
        t_epoch = time.perf_counter()
        for batch_index, (images, views, _labels, bool_masked_pos, skipped) in enumerate(loader, sampler.start):
            # the masked positions counted on the CPU: selecting them on the GPU needs no host sync; a compiled
            # model gets them padded to one length (the padding's labels are ignored)
            masked_index, n_masked = engine.host_nonzero(bool_masked_pos, device, pad_to)
            images = images.to(device, non_blocking=True)
            views = views.to(device, non_blocking=True)
            bool_masked_pos = bool_masked_pos.to(device, non_blocking=True)
            masked_index = masked_index.to(device, non_blocking=True)
            engine.add_skipped_images(sums, skipped)
            micro = batch_index % cfg.accum_steps
            if micro == 0:
                apply_schedule(optimizer, schedule.lr_at(step), schedule.wd_at(step))

            if token_dtype is None:              # decided once (one host sync), the same on every rank
                token_dtype, why = choose_dtype(tokenizer, views, cfg.tokenizer_dtype, rt)
                report.message(f"tokenizer runs in {why}")
            labels = encode(tokenizer, views, token_dtype).reshape(-1).index_select(0, masked_index)   # (M,)
            if pad_to:
                labels[n_masked:] = IGNORE   # cross_entropy's ignore_index: the padding counts nowhere

            sync = runtime.no_sync(train_model, rt, active=micro < cfg.accum_steps - 1)
            with sync:
                with runtime.autocast(device, cfg.precision):
                    logits = train_model(images, bool_masked_pos, masked_index=masked_index)   # (M, vocab)
                loss = F.cross_entropy(logits.float(), labels)
                if step == cfg.inject_nonfinite_at_step:
                    loss = loss * float("inf")
                scaler.scale(loss / cfg.accum_steps).backward()
            with torch.no_grad():
                acc = (logits.argmax(-1) == labels).float().sum() / max(n_masked, 1)   # no padded row matches
                engine.add_micro(sums, loss, acc)
            if micro < cfg.accum_steps - 1:
                continue

            grad_norm, skipped_step = engine.optimizer_step(train_model, optimizer, scaler, cfg.clip_grad)
            engine.add_update(sums, skipped_step)
            step += 1
            end_of_epoch = batch_index + 1 == sampler.num_batches
            log_now, save_now, stop = engine.step_events(cfg, step, end_of_epoch)
            if log_now:
                got = engine.read_sums(sums, rt, scaler, step, report)
                last = {"loss": got["loss"], "mlm_acc": got["acc"]}
                skipped_images += got["skipped_images"]
                img_s = report.throughput(step * global_batch * cfg.accum_steps)
                report.log({"step": step, "epoch": epoch, **last, "lr": schedule.lr_at(step - 1),
                            "wd": schedule.wd_at(step - 1), "grad_norm": float(grad_norm),
                            "scale": got["scale"], "skipped": got["skipped"], "img_s": img_s,
                            "skipped_images": skipped_images,
                            "mfu": flops * img_s / (peak * rt.world) if peak else None},
                           step)
            if save_now:
                with report.paused():   # not counted in images/s
                    engine.save(cfg, rt, train_model, optimizer, scaler, None, step=step, epoch=epoch,
                                batch_in_epoch=batch_index + 1, kind="pretrain",
                                metrics={**last, **token_meta(token_dtype), "skipped_images": skipped_images,
                                         "tokenizer_sha256": tokenizer_sha256})
            if stop:
                done = True
                break
        if done:
            break
        report.message(f"epoch {epoch + 1}/{cfg.epochs}: loss {last['loss']:.4f}, masked-token accuracy "
                       f"{last['mlm_acc']:.3f} ({time.perf_counter() - t_epoch:.1f} s)")
        if not cfg.save_every_steps or step % cfg.save_every_steps:
            with report.paused():
                engine.save(cfg, rt, train_model, optimizer, scaler, None, step=step, epoch=epoch + 1,
                            batch_in_epoch=0, kind="pretrain",
                            metrics={**last, **token_meta(token_dtype), "skipped_images": skipped_images,
                                     "tokenizer_sha256": tokenizer_sha256})

    report.close()
    runtime.barrier(rt)   # rank 0 may still be writing (and pruning) its last checkpoint
    found = ckpt.step_checkpoints(cfg.output_dir)
    result = {**last, "step": step, "checkpoint": found[-1] if found else None,
              "seconds": time.perf_counter() - t_start, "skipped_images": skipped_images,
              "output_dir": cfg.output_dir}
    if rt.is_main:
        print(f"pretraining done: {step} steps, loss {last['loss']:.4f}, masked-token accuracy "
              f"{last['mlm_acc']:.3f}, {result['seconds']:.0f} s; checkpoint {result['checkpoint']}", flush=True)
    return result
