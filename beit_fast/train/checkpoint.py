"""Checkpoints: atomic writes, RNG state capture, keep-last-N and best, finding the one to resume.

A checkpoint is one torch file `checkpoint-<step>.pt` (or `checkpoint-best.pt`, `checkpoint-best-ema.pt`) holding
  model (state dict, the key load_checkpoint looks for), model_ema, optimizer, scaler,
  step (optimizer updates done), epoch, batch_in_epoch (global batches of `epoch` already consumed),
  rng (per rank: python, numpy, torch, cuda), config (the resolved run config), model_config, kind, metrics.
Writes go to a temporary file in the same folder, are fsync'ed, then os.replace'd over the target, so a
crash never leaves a truncated checkpoint under the final name.
"""
from __future__ import annotations

import glob
import os
import random
import re
import tempfile
import warnings
from typing import Optional

import numpy as np
import torch

_STEP_FILE = re.compile(r"checkpoint-(\d+)\.pt$")
BEST = "checkpoint-best.pt"            # fine-tuning: the best held-out top-1
BEST_EMA = "checkpoint-best-ema.pt"    # fine-tuning with EMA: the EMA weights' best


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write) -> None:
    """write(f) fills a temporary file in path's folder, which is fsync'ed and renamed over `path`: readers see
    the old file or the whole new one, never a part. The file gets the permissions a plain open() would give
    (0666 less the umask; mkstemp's own are 0600, which would hide checkpoints from the other users of a
    shared cluster)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: str) -> None:
    """torch.save straight into the temporary file (no in-memory copy of the whole checkpoint)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def rng_state() -> dict:
    """Every RNG the loop draws from, in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own GPU only (the current device): with one GPU per rank, and whatever
        # CUDA_VISIBLE_DEVICES says, the resumed rank restores the generator it will draw from
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # written by an earlier version: one state per visible GPU
            i = torch.cuda.current_device()
            if i >= len(cuda):
                warnings.warn(f"the checkpoint holds CUDA RNG states for {len(cuda)} GPUs, none for GPU {i}: "
                              "its CUDA generator is not restored")
                return
            cuda = cuda[i]
        torch.cuda.set_rng_state(cuda)


def _numbered_checkpoints(folder: str) -> list:
    """(step, path) of the checkpoint-<step>.pt files in `folder`, oldest step first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), "checkpoint-*.pt")):
        m = _STEP_FILE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def step_checkpoints(folder: str) -> list:
    """checkpoint-<step>.pt files in `folder`, oldest step first."""
    return [p for _, p in _numbered_checkpoints(folder)]


# the weights file of a Hugging Face model folder (save_pretrained / a hub snapshot), in its preference order
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def resolve_checkpoint(path: str, prefer_best: bool = False, weights_folder: bool = False,
                       best_name: str = BEST) -> str:
    """A checkpoint file from a file or a run folder (latest step checkpoint; or best when prefer_best;
    best_name: checkpoint-best-ema.pt for the EMA weights' best epoch).
    weights_folder: a folder without run checkpoints may also be a Hugging Face model folder (for --init)."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        best = os.path.join(path, best_name)
        steps = step_checkpoints(path)
        if prefer_best and os.path.isfile(best):
            return best
        if steps:
            return steps[-1]
        if os.path.isfile(best):
            return best
        if weights_folder:
            found = [os.path.join(path, f) for f in HF_WEIGHTS if os.path.isfile(os.path.join(path, f))]
            if found:
                return found[0]
            raise FileNotFoundError(f"no checkpoint-*.pt (a beit_fast run) or {' / '.join(HF_WEIGHTS)} (a Hugging "
                                    f"Face model folder) in folder {path!r}; pass the checkpoint file itself")
        raise FileNotFoundError(f"no checkpoint-*.pt in folder {path!r}")
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")


def save_step_checkpoint(state: dict, folder: str, step: int, keep_last: int) -> str:
    """Write checkpoint-<step>.pt atomically, then delete all but the newest `keep_last` step checkpoints."""
    path = os.path.join(folder, f"checkpoint-{step:07d}.pt")
    atomic_torch_save(state, path)
    old = step_checkpoints(folder)
    for stale in old[: max(len(old) - max(keep_last, 1), 0)]:
        os.unlink(stale)
    return path


def saved_step(path: str) -> Optional[int]:
    """The `step` a checkpoint of this package was saved at (None when it cannot be read or has none), without
    reading its tensors (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else None


SUPERSEDED = "superseded-after-step-"   # + the resumed step (7 digits), and -2, -3, ... when taken


def set_aside_later(folder: str, step: int) -> Optional[str]:
    """Resuming at `step` in `folder` abandons what the run there did after it: its later step checkpoints and
    a best checkpoint saved after it would otherwise outlive the resumed run's (pruning keeps the highest
    steps, `resume=auto`, `--init` and `eval` pick them) and the log rows after `step` are dropped. They are
    moved, with a copy of log.jsonl as it was, into folder/superseded-after-step-<step>/ (nothing is
    deleted). Returns that folder, or None when the run there had nothing after `step`."""
    later = [p for s, p in _numbered_checkpoints(folder) if s > step]
    for name in (BEST, BEST_EMA):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            got = saved_step(path)
            if got is not None and got > step:
                later.append(path)
    if not later:
        return None
    base = os.path.join(folder, f"{SUPERSEDED}{step:07d}")
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    os.makedirs(target)
    log = os.path.join(folder, "log.jsonl")
    if os.path.isfile(log):
        with open(log, "rb") as f:
            atomic_write_bytes(os.path.join(target, "log.jsonl"), f.read())
    for path in later:
        os.replace(path, os.path.join(target, os.path.basename(path)))
    return target


def load(path: str) -> dict:
    """Read a checkpoint written by this package with weights_only=True (no code runs while loading)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_failure(e: BaseException) -> str:
    """Why torch.load refused a file, for a message: the error's type and its first sentence (torch's own
    advice, such as loading with weights_only=False, left out)."""
    first = str(e).strip().split(". ")[0].split("\n")[0]
    return f"{type(e).__name__}: {first}"
