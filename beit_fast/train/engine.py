"""Pieces both training loops share: output folder, seeding, model building, the optimizer step,
checkpoint save / resume, evaluation. The loops themselves live in pretraining.py and finetuning.py."""
from __future__ import annotations

import dataclasses
import os
import random
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import config as config_mod
from . import runtime
from .data import Subset


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def prepare_output(cfg, rt: runtime.Runtime, folder: bool = True) -> None:
    """Apply num_threads; create the output folder (rank 0; folder=False: later, by a second call). The
    resolved config.yaml / .json are written by training_state once a resume has been accepted: a refused
    one leaves the folder's config as it was."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if not folder:
        return
    if rt.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
    runtime.barrier(rt)


def build_model(cfg, device: torch.device, **fields):
    """beit_fast.create_model(cfg.model, ...) with the run's regularisation and kernel choices."""
    from beit_fast.models import create_model
    overrides = dict(drop_path_rate=cfg.drop_path, init_values=cfg.layer_scale or None, attn_impl=cfg.attn_impl,
                     fused=cfg.fused, grad_checkpointing=cfg.grad_checkpointing, img_size=cfg.img_size)
    overrides.update(fields)
    overrides.update(cfg.model_overrides)
    model = create_model(cfg.model, **overrides).to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def training_state(cfg, rt, model, ema=None, check_state=None, **optimizer_kw):
    """Wrap the model (DDP / FSDP), then build the optimizer (FSDP replaces the parameters by shards
    first), the loss scaler, restore a resumed run, compile when asked. check_state(state): a caller's own
    refusal of the checkpoint to resume, before anything is loaded or set aside (see resume).

    Returns (train_model, optimizer, scaler, (step, epoch, batch_in_epoch, metrics))."""
    from .optim import build_optimizer
    train_model = runtime.wrap(model, rt, cfg.distributed)
    optimizer = build_optimizer(cfg, model, device_type=rt.device.type, **optimizer_kw)
    scaler = runtime.grad_scaler(rt.device, cfg.precision)
    position = resume(cfg, rt, train_model, optimizer, scaler, ema, check_state)
    if rt.is_main:   # the config of the run that now goes on in this folder
        config_mod.save(cfg, cfg.output_dir)
    if cfg.compile:
        train_model = torch.compile(train_model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    return train_model, optimizer, scaler, position


def optimizer_step(model, optimizer, scaler, clip_grad: Optional[float]):
    """Unscale, clip, step (skipped by the scaler on inf/nan gradients), update the scale, zero grads.

    Returns (grad_norm, skipped), both 0-dim tensors on the gradients' device; skipped is 1.0 when the loss
    scaler skipped this update (fp16, non-finite gradients), else 0.0. Neither is read back here: the loops
    add them up and read them on logging steps only, so a step never waits for the GPU."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    if not params:
        grad_norm = torch.zeros(())
    elif clip_grad or runtime.is_sharded(model):
        # the norm covers every rank's shard under FSDP (DTensor gradients); inf = measure only
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
    else:
        grad_norm = _total_norm([p.grad for p in params])
    skipped = _found_inf(scaler, optimizer, device)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def _total_norm(grads) -> torch.Tensor:
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)   # torch >= 2.6: grouped (foreach) norms
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    return torch.norm(torch.stack([g.detach().float().norm() for g in grads]))


def _found_inf(scaler, optimizer, device) -> torch.Tensor:
    """1.0 when the scaler's inf/nan check (made by unscale_) will skip this optimizer's step, else 0.0; a
    device tensor (GradScaler.get_scale() would be a host sync). Under FSDP the check is already reduced
    over ranks; DDP gradients are identical on every rank."""
    if not scaler.is_enabled():
        return torch.zeros((), device=device)
    found = [f.to(device, non_blocking=True).sum()
             for f in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values()]
    if not found:   # no gradients at all: nothing to skip
        return torch.zeros((), device=device)
    return (torch.stack(found).sum() > 0).float()


def save(cfg, rt, model, optimizer, scaler, ema, *, step: int, epoch: int, batch_in_epoch: int, kind: str,
         metrics: Optional[dict] = None, best: bool = False, best_ema: bool = False,
         keep: bool = True, classes: Optional[list] = None) -> Optional[str]:
    """Collective: every rank calls it (RNG states are gathered); rank 0 writes the file(s). classes: the
    class names of the labels (fine-tuning), which `eval` labels a held-out folder by."""
    rngs = runtime.gather_objects(ckpt.rng_state(), rt)
    # under FSDP a collective every rank takes part in; a plain model is copied to host memory by rank 0 alone
    if rt.is_main or runtime.is_sharded(model):
        model_sd = runtime.model_state_dict(model)
        optim_sd = runtime.optimizer_state_dict(model, optimizer)
    if not rt.is_main:
        return None
    inner = runtime.unwrap(model)
    state = {
        "model": model_sd, "optimizer": optim_sd, "scaler": scaler.state_dict(),
        "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "world": rt.world,
        "sharded": runtime.is_sharded(model),
        "rng": rngs, "kind": kind, "metrics": metrics or {}, "data_subset": Subset.LAYOUT,
        "config": config_mod.to_dict(cfg), "model_config": dataclasses.asdict(inner.config),
    }
    if classes is not None:
        state["classes"] = [str(c) for c in classes]
    if ema is not None:
        state["model_ema"] = {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
    # The best files first: the step checkpoint is the resume point and carries best_top1, which a resumed run
    # must beat before it writes a best file again (a crash between the two writes left a best score no file held).
    path = None
    for wanted, name in ((best, ckpt.BEST), (best_ema, ckpt.BEST_EMA)):
        if wanted:
            path_best = os.path.join(cfg.output_dir, name)
            ckpt.atomic_torch_save(state, path_best)
            path = path or path_best
    if keep:
        path = ckpt.save_step_checkpoint(state, cfg.output_dir, step, cfg.keep_last)
    return path


def resume_path(cfg) -> Optional[str]:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = ckpt.step_checkpoints(cfg.output_dir)
        return found[-1] if found else None
    return ckpt.resolve_checkpoint(cfg.resume)


def _resume_path_everywhere(cfg, rt) -> Optional[str]:
    """Rank 0 picks the checkpoint and every rank loads that one (ranks on other nodes must see the same
    output folder: one that cannot read the file fails with its name, rather than silently starting over).
    When rank 0 cannot pick one, every rank raises (none is left waiting in a collective)."""
    path = failure = None
    if rt.is_main:
        try:
            path = resume_path(cfg)
        except Exception as e:  # raised again below, on every rank
            failure = e
    path, why = runtime.broadcast_object((path, None if failure is None else f"{type(failure).__name__}: {failure}"),
                                         rt)
    if failure is not None:
        raise failure
    if why is not None:
        raise RuntimeError(f"rank 0 could not pick the checkpoint to resume from: {why}")
    return path


def resume(cfg, rt, model, optimizer, scaler, ema, check_state=None) -> tuple:
    """Restore model, optimizer, scaler, EMA, RNG states; returns (step, epoch, batch_in_epoch, metrics).
    Every refusal (the layout checks here, check_resumable, check_state(state)) comes before the model is
    loaded and before later checkpoints are set aside.

    Call it after `runtime.wrap` and after building the optimizer (FSDP shards the loaded state)."""
    path = _resume_path_everywhere(cfg, rt)
    if path is None:
        return 0, 0, 0, {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rank {rt.rank} cannot read the checkpoint rank 0 resumes from: {path} (the "
                                f"output folder must be shared by every node)")
    state = ckpt.load(path)
    if state.get("world", 1) != rt.world:   # (every rank sees the same checkpoint: all raise)
        raise config_mod.ConfigError(f"{path} was written by a run with {state.get('world')} processes; resume it "
                                     f"with the same number ({rt.world} now) so that RNG streams and data shards "
                                     f"match")
    if bool(state.get("sharded", False)) != runtime.is_sharded(model):
        was = "distributed=fsdp" if state.get("sharded") else "distributed=ddp (or one process)"
        raise config_mod.ConfigError(f"{path} was written with {was}; resume it the same way (its optimizer state "
                                     f"is laid out for that), or start a new run with --init from it")
    if getattr(cfg, "train_subset", 0) and state.get("data_subset") != Subset.LAYOUT:
        raise config_mod.ConfigError(f"{path} was written by an older beit_fast whose train_subset took the first "
                                     f"{cfg.train_subset} images (now: images spread over the split): resuming "
                                     f"would go on with other images; start a new run (finetune: --init from it)")
    changed = check_resumable(cfg, state.get("config") or {}, path)
    if check_state is not None:
        check_state(state)
    runtime.load_model_state(model, state["model"])
    load_optimizer_state(model, optimizer, state["optimizer"])
    if state["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    else:   # (an enabled GradScaler refuses the empty state a bf16 / fp32 run saves)
        changed.append("loss scaler: the checkpoint has none (it was not an fp16 run); fp16 loss scaling starts "
                       "at its initial scale")
    if ema is not None and "model_ema" in state:
        ema.module.load_state_dict(state["model_ema"])
    elif ema is not None:   # EMA turned on for the resumed run: start it from the resumed weights
        ema.set(runtime.unwrap(model))
        changed.append("ema: the checkpoint has no EMA weights; the EMA starts from the resumed model's")
    ckpt.set_rng_state(state["rng"][rt.rank])
    if rt.is_main:
        if changed:
            warnings.warn(f"resuming {path} with settings changed since it was saved (they apply from step "
                          f"{state['step']} on): " + "; ".join(changed), stacklevel=2)
        aside = ckpt.set_aside_later(cfg.output_dir, state["step"])
        if aside:
            warnings.warn(f"resuming at step {state['step']}: the checkpoints the run in {cfg.output_dir} saved "
                          f"after that step (and its log.jsonl as it was) were moved to {aside}", stacklevel=2)
    return state["step"], state["epoch"], state["batch_in_epoch"], dict(state.get("metrics") or {})


# What fixes the order of the training data and the position in it (batch_in_epoch counts global batches):
# a resumed run must keep them (a changed parameter grouping is matched by name: regroup_saved)
RESUME_FIXED = ("seed", "dataset", "train_subset", "synthetic_size", "batch_size", "accum_steps",
                "weight_decay_exclusions")


def check_resumable(cfg, saved: dict, path: str) -> list:
    """Raise ConfigError when `cfg` changes a RESUME_FIXED field of the saved run's config `saved`; return the
    other changed fields ("name: old -> new"), which the resumed run applies (the schedule, lr, weight decay,
    layer decay, ...)."""
    current = config_mod.to_dict(cfg)
    ignore = {"resume", "stop_at_step", "output_dir", "preset", "init", "progress", "tensorboard", "num_workers",
              "num_threads", "inject_nonfinite_at_step", "device", "log_every"}
    fixed, other = [], []
    for name in sorted(set(current) & set(saved)):
        if name in ignore or current[name] == saved[name]:
            continue
        if name == "data_path" and saved[name] and current[name] and \
                os.path.realpath(saved[name]) == os.path.realpath(current[name]):
            continue
        (fixed if name in RESUME_FIXED else other).append(f"{name}: {saved[name]!r} -> {current[name]!r}")
    if fixed:
        raise config_mod.ConfigError(
            f"cannot resume {path}: " + "; ".join(fixed) + ". These fix the order of the training data and the "
            "position in it (or the optimizer state's layout): resume with the values the run was saved with, "
            "or start a new run in another output folder (finetune: --init from this checkpoint)")
    return other


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this optimizer's implementation flags: load_state_dict
    replaces each param group by the saved one, flags included, so a checkpoint written on the CPU would
    turn CUDA's fused AdamW off (and GradScaler would then pass it arguments the foreach path rejects)."""
    # Every setting of this optimizer's groups (all but their parameters and apex's per-group `step`) goes
    # into the saved groups before loading: the implementation flags, because load_state_dict places each
    # state's `step` by the saved flags (a fused / capturable step tensor lives on the parameter's device),
    # and the hyperparameters the resumed run's config gives (layer decay's lr_scale, betas, eps, ...), which
    # load_state_dict would otherwise replace by the saved run's
    kept = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in optimizer.param_groups]
    saved = regroup_saved(state["param_groups"], optimizer.param_groups)
    state = {**state, "param_groups": [{**g, **mine} for g, mine in zip(saved, kept)]}
    runtime.load_optimizer_state(model, optimizer, state)


def regroup_saved(saved_groups: list, groups: list) -> list:
    """The saved param groups laid out as this optimizer's `groups`, matched by parameter name (every group
    optim.param_groups builds names its parameters): turning layer decay on or off at a resume changes the
    grouping (2 groups against 2 per layer id), and load_state_dict pairs groups by position. Each regrouped
    group lists the saved state's keys (indices, or names under FSDP) of its parameters, in this optimizer's
    order, with the other settings of the saved group its first parameter was in."""
    if len(saved_groups) == len(groups) and all(s.get("names") == g.get("names")
                                                for s, g in zip(saved_groups, groups)):
        return saved_groups
    if not all("names" in g for g in (*saved_groups, *groups)):
        raise ValueError("the checkpoint's optimizer groups do not match this run's and carry no parameter "
                         "names to match them by (resume with the settings the run was saved with)")
    where = {name: (g, key) for g in saved_groups for name, key in zip(g["names"], g["params"])}
    missing = [n for g in groups for n in g["names"] if n not in where]
    if missing or len(where) != sum(len(g["names"]) for g in groups):
        extra = sorted(set(where) - {n for g in groups for n in g["names"]})
        raise ValueError(f"the checkpoint's optimizer state does not cover this run's parameters (missing: "
                         f"{missing[:5]}, not in this model: {extra[:5]})")
    return [{**where[g["names"][0]][0], "names": list(g["names"]),
             "params": [where[n][1] for n in g["names"]]} for g in groups]


@torch.no_grad()
def evaluate(model, loader, device, precision: str, rt) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy over the loader (summed over ranks). Samples the loader
    marks as unreadable (their last field, `skipped`, nonzero: data.Samples(substitute=False)) count in no
    metric and in `skipped_images`; `n` is the number of images evaluated."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, count, unreadable
    batches, images = 0, None
    for batch in loader:
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        ok = batch[-1].to(device, non_blocking=True) == 0
        labels = torch.where(ok, labels, -100)   # cross_entropy's ignore_index; never among the top-5
        with runtime.autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        count = ok.sum().double()
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(1).sum().double(), count, len(labels) - count])
        batches += 1
    _even_out_forwards(model, rt, batches, loader, images, device, precision)
    sums = runtime.all_reduce(sums, rt, op="sum").tolist()
    n = max(sums[3], 1.0)
    return {"loss": sums[0] / n, "top1": 100.0 * sums[1] / n, "top5": 100.0 * sums[2] / n, "n": int(sums[3]),
            "skipped_images": int(sums[4])}


def host_nonzero(mask: torch.Tensor, device: torch.device, pad_to: int = 0) -> tuple:
    """(flat positions (int64) of the True entries of a CPU bool mask, their count), pinned when they go on to
    a GPU (a non_blocking copy from pageable memory would wait for the GPU). pad_to > 0: padded with position
    0 to that length (at least the count), so that a compiled model sees one shape every step (a changing
    count would make CUDA graphs record the model again for each new one)."""
    idx = mask.reshape(-1).nonzero().squeeze(1)
    n = idx.numel()
    if pad_to:
        if n > pad_to:
            raise ValueError(f"{n} masked patches in the batch, more than the {pad_to} the padding allows")
        idx = torch.cat((idx, idx.new_zeros(pad_to - n)))
    return (idx.pin_memory() if device.type == "cuda" else idx), n


def log_sums(device) -> torch.Tensor:
    """What the loops add up between logging steps, on the device: [sum of the finite losses, sum of the
    accuracies, finite micro-batches, micro-batches, skipped updates, skipped unreadable images]."""
    return torch.zeros(6, device=device)


def add_micro(sums: torch.Tensor, loss: torch.Tensor, acc: Optional[torch.Tensor] = None) -> None:
    """Add one micro-batch's loss (and accuracy) to the running sums; no host sync."""
    loss = loss.detach().float()
    finite = torch.isfinite(loss)
    acc = torch.zeros_like(loss) if acc is None else acc.float()
    sums[:4] += torch.stack([torch.where(finite, loss, torch.zeros_like(loss)), acc, finite.float(),
                             torch.ones_like(loss)])


def add_update(sums: torch.Tensor, skipped: torch.Tensor) -> None:
    """Count one optimizer update (skipped: optimizer_step's flag) in the running sums; no host sync."""
    sums[4] += skipped


def add_skipped_images(sums: torch.Tensor, skipped: torch.Tensor) -> None:
    """Count the unreadable images a batch skipped (the loader's per-sample CPU counts); no host sync."""
    n = int(skipped.sum())
    if n:
        sums[5] += n


def step_events(cfg, step: int, end_of_epoch: bool) -> tuple:
    """(log, save, stop) after optimizer step `step`. Every save also logs: the sums are read first, so a
    non-finite loss stops the run before it is written to a checkpoint."""
    stop = bool(cfg.stop_at_step and step >= cfg.stop_at_step)
    save = bool(cfg.save_every_steps and step % cfg.save_every_steps == 0) or stop
    return step % cfg.log_every == 0 or end_of_epoch or save, save, stop


# GradScaler halves its scale at every skipped update. Updates still being skipped once it is below this
# (DeepSpeed's default minimum scale; unilm's fine-tuning runs use DeepSpeed) are not failing from an fp16
# overflow that a smaller scale can cure.
MIN_LOSS_SCALE = 1.0


def read_sums(sums: torch.Tensor, rt, scaler, step: int, report) -> dict:
    """Read the running sums over all ranks (the one host sync, on logging steps) and zero them.

    Returns loss (mean over the finite micro-batches), acc, skipped (updates the loss scaler skipped since
    the last log), skipped_images (unreadable images skipped since the last log, all ranks) and scale. A
    non-finite loss with no loss scaler to skip its update stops the run, and so do updates still skipped
    with a loss scale below MIN_LOSS_SCALE."""
    loss_sum, acc_sum, finite, micro, skipped, bad_images = runtime.all_reduce(sums, rt, op="sum").tolist()
    sums.zero_()
    skipped = round(skipped / rt.world)          # every rank skips the same updates
    if micro > finite and not scaler.is_enabled():
        raise FloatingPointError(f"non-finite loss in {micro - finite:.0f} of the last {micro:.0f} micro-batches "
                                 f"(step {step}); stopping (try precision=fp16 with loss scaling, a lower lr "
                                 f"or clip_grad)")
    scale = scaler.get_scale() if scaler.is_enabled() else None
    if scale is not None and scale < MIN_LOSS_SCALE and skipped:
        raise FloatingPointError(f"the fp16 loss scale fell to {scale:g}, below {MIN_LOSS_SCALE:g} (step {step}, "
                                 f"{skipped} update(s) skipped since the previous log): the loss or its gradients "
                                 f"are non-finite at any scale; stopping (try a lower lr, clip_grad, or "
                                 f"precision=bf16)")
    if skipped:
        report.message(f"step {step}: {skipped} update(s) since the previous log skipped (non-finite "
                       f"gradients); loss scale now {scale:g}")
    return {"loss": loss_sum / finite if finite else float("nan"), "acc": acc_sum / micro if micro else float("nan"),
            "skipped": skipped, "skipped_images": round(bad_images), "scale": scale}


def _even_out_forwards(model, rt, batches: int, loader, images, device, precision) -> None:
    """A rank whose share of the uneven last batch is empty ran one forward fewer than the others; under
    FSDP every forward all-gathers parameters, so it runs discarded ones until it has run len(loader)
    (the number of global batches, the same on every rank: the count needs no collective)."""
    if not (rt.distributed and runtime.is_sharded(model)):
        return
    missing = len(loader) - batches
    if missing > 0:
        cfg = runtime.unwrap(model).config
        dummy = (images[:1] if images is not None else
                 torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size, device=device))
        for _ in range(missing):
            with runtime.autocast(device, precision):
                model(dummy)


def steps_per_epoch(n_images: int, global_batch: int, accum: int) -> int:
    steps = (n_images // global_batch) // accum
    if steps < 1:
        raise ValueError(f"{n_images} training images are fewer than one optimizer step needs "
                         f"({global_batch} per batch x {accum} accumulation steps); lower batch_size")
    return steps
