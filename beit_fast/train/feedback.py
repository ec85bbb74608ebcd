"""What a run reports: a progress bar, JSON-lines logs, TensorBoard (when installed), images/s and MFU.

Only rank 0 writes. Values are read back from the device only on logging steps (every `log_every`), so
the loop does not synchronise with the GPU on every step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from typing import Optional

import torch

# Vendor datasheet peaks (TFLOP/s, dense) per GPU name, for MFU: (bf16/fp16 tensor cores, TF32 tensor
# cores, plain fp32). The longest name found in the device name as a whole word wins ("H100 PCIe" over
# "H100"); a GPU not listed (A10G, say) gets no MFU, nor does bf16 on a GPU without bf16 tensor cores
# (_NO_BF16). A MIG slice reports its whole GPU's name, so its MFU reads low. The FLOPs counted are the
# model's (train_flops_per_image): pretraining's tokenizer forward is not in them.
_PEAK_TFLOPS = {
    "H200 NVL": (835.0, 418.0, 60.0), "H200": (989.0, 494.0, 67.0), "GH200": (989.0, 494.0, 67.0),
    "H100 PCIe": (756.0, 378.0, 51.0), "H100 NVL": (835.0, 418.0, 60.0), "H100": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5), "L40S": (362.0, 183.0, 91.6), "L40": (181.0, 90.5, 90.5),
    "L4": (121.0, 60.0, 30.3), "A10": (125.0, 62.5, 31.2), "4090": (165.0, 82.6, 82.6),
    "V100": (125.0, 15.7, 15.7),
}
_NO_BF16 = ("V100",)   # fp16 tensor cores only


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s of this GPU for the run's precision (fp32: the TF32 peak when TF32 matmuls are enabled,
    the plain fp32 peak otherwise); None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    from beit_fast._backend import tf32_matmul
    return _peak_for_name(torch.cuda.get_device_name(device), precision, tf32_matmul())


def _peak_for_name(name: str, precision: str, tf32: bool = False) -> Optional[float]:
    # a key counts as a whole word: "A10" is not in "A100" or "A10G", "L4" not in "L40S"
    keys = [k for k in _PEAK_TFLOPS if re.search(r"(?<![0-9A-Za-z])" + re.escape(k) + r"(?![0-9A-Za-z])", name)]
    if not keys:
        return None
    key = max(keys, key=len)
    half, tf32_peak, fp32 = _PEAK_TFLOPS[key]
    if precision == "bf16" and key in _NO_BF16:
        return None
    if precision != "fp32":
        return 1e12 * half
    return 1e12 * (tf32_peak if tf32 else fp32)


def train_flops_per_image(cfg, masked_tokens: float = 0.0) -> float:
    """Matmul FLOPs of one image's forward + backward (3x forward), from the BeitConfig shapes.

    Per block (T = tokens + 1, D = width): qkv 6TD^2, q@k^T and attn@v 4T^2 D, proj 2TD^2, MLP 4 r T D^2.
    Patch embedding 2 N (C p^2) D; head: 2 M D V for the masked tokens (pretraining) or 2 D K."""
    n = (cfg.img_size // cfg.patch_size) ** 2
    t, d = n + 1, cfg.embed_dim
    block = 6 * t * d * d + 4 * t * t * d + 2 * t * d * d + 4 * cfg.mlp_ratio * t * d * d
    fwd = 2 * n * cfg.in_chans * cfg.patch_size ** 2 * d + cfg.depth * block
    fwd += 2 * masked_tokens * d * cfg.vocab_size if cfg.vocab_size else 2 * d * max(cfg.num_classes, 0)
    return 3.0 * fwd


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrite the JSON-lines log without the rows of steps > `step` (atomically; unreadable lines kept)."""
    from .checkpoint import atomic_write_bytes
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            row_step = 0
        if not (isinstance(row_step, int) and row_step > step):
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    if len(keep) != len(lines):
        atomic_write_bytes(path, b"".join(keep))


def _json_safe(row: dict) -> dict:
    """The row with every non-finite float (at any depth) as null, its key listed under "nonfinite" (e.g. a
    NaN loss when every micro-batch since the last row overflowed in fp16): strict JSON, which a bare NaN
    is not for most readers other than Python's."""
    bad = []

    def clean(v, key):
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(key)
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{key}.{k}" if key else k) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, key) for x in v]
        return v

    row = clean(row, "")
    if bad:
        row["nonfinite"] = sorted(set(bad))
    return row


class Reporter:
    """Progress bar + log.jsonl + TensorBoard for rank 0; a silent stand-in elsewhere."""

    def __init__(self, output_dir: str, total_steps: int, enabled: bool = True, progress: bool = True,
                 tensorboard: bool = True, desc: str = "train", resume_step: int = 0):
        """resume_step: the step of the checkpoint a resumed run starts from (0: none). Rows an interrupted run
        logged after it (a crash between two saves, or before the first) are dropped from log.jsonl and
        TensorBoard, so that the steps the resumed run repeats are not logged twice. (Only a resumed run finds
        a log.jsonl here: a new one refuses a folder holding one, config._check_output_dir_is_free.)"""
        self.enabled = enabled
        self.bar = self.tb = self.file = None
        self._t0, self._seen = time.perf_counter(), 0
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "log.jsonl")
        earlier = os.path.isfile(path)
        if earlier:
            _drop_rows_after(path, resume_step)
        self.file = open(path, "a")
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, desc=desc, dynamic_ncols=True, file=sys.stderr,
                            disable=None)  # disable=None: no bar when stderr is not a terminal
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: TensorBoard hides the events an earlier writer logged at steps >= it
                self.tb = SummaryWriter(os.path.join(output_dir, "tb"),
                                        purge_step=resume_step + 1 if earlier else None)
            except Exception:  # tensorboard not installed: JSON lines only
                self.tb = None
                self.message(f"TensorBoard is not installed; metrics go to {output_dir}/log.jsonl only")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def throughput(self, images: int) -> float:
        """Images/s since the previous call (wall clock over all ranks' work)."""
        now = time.perf_counter()
        rate = (images - self._seen) / max(now - self._t0, 1e-9)
        self._t0, self._seen = now, images
        return rate

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent in the block (evaluation, checkpoint saves) out of the next images/s and MFU."""
        t = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            # the clock restarted inside the block (advance_to, throughput): from the block's end then
            self._t0 = self._t0 + (now - t) if self._t0 <= t else now

    def advance_to(self, step: int, images: Optional[int] = None) -> None:
        """Move the bar to `step`; with `images` (those done by then, e.g. before a resume), also restart
        the images/s clock there, so the first rate after a resume counts only new images."""
        if images is not None:
            self._t0, self._seen = time.perf_counter(), images
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def log(self, row: dict, step: int) -> None:
        if not self.enabled:
            return
        shown, row = row, _json_safe(row)
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:   # (the raw values: a NaN loss is a point TensorBoard shows, not a gap)
            for k, v in shown.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.advance_to(step)
            show = {k: shown[k] for k in ("loss", "lr", "mlm_acc", "img_s", "mfu", "top1") if shown.get(k) is not None}
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in show.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
