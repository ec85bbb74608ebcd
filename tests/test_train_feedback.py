"""What a run reports: the FLOP count behind MFU, the GPU peak table, TensorBoard scalars."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from beit_fast import create_model
from beit_fast.masking import block_masks
from beit_fast.train.feedback import Reporter, peak_flops, train_flops_per_image


@pytest.mark.parametrize("name", ["beit_test_patch4_32", "beit_test_patch4_32_mim"])
def test_flop_formula_equals_counted_forward_flops(name):
    """MFU's numerator: the formula's forward share (a third of it) is exactly what torch counts for the
    model's matmuls and the patch-embedding convolution, classification and masked-image-modeling alike."""
    model = create_model(name, attn_impl="eager", fused=False).eval()
    images = torch.randn(3, 3, 32, 32)
    args = (images,)
    masked = 0.0
    if model.config.vocab_size:
        mask = block_masks(3, model.patch_embed.window_size, 20, seed=1)
        args, masked = (images, mask), float(mask.sum()) / 3
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    per_image = counter.get_total_flops() / 3
    assert per_image > 0
    assert train_flops_per_image(model.config, masked) / 3 == pytest.approx(per_image, rel=1e-9)


def test_peak_table_per_gpu_and_precision(monkeypatch):
    assert peak_flops(torch.device("cpu"), "bf16") is None
    names = iter(["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "Some Future GPU"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    assert peak_flops(torch.device("cuda:0"), "bf16") == 989e12
    import beit_fast._backend as backend
    with monkeypatch.context() as m:     # fp32 runs: TF32 tensor cores only when TF32 matmuls are on
        m.setattr(backend, "tf32_matmul", lambda: True)
        assert peak_flops(torch.device("cuda:0"), "fp32") == 494e12
    with monkeypatch.context() as m:
        m.setattr(backend, "tf32_matmul", lambda: False)
        assert peak_flops(torch.device("cuda:0"), "fp32") == 67e12
    assert peak_flops(torch.device("cuda:0"), "fp16") == 312e12
    assert peak_flops(torch.device("cuda:0"), "bf16") is None          # unknown: no MFU rather than a wrong one


@pytest.mark.parametrize("name, bf16", [
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", None), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla V100-SXM2-16GB", None)])
def test_peak_names_match_whole_words(name, bf16):
    from beit_fast.train.feedback import _peak_for_name
    assert _peak_for_name(name, "bf16") == bf16


def test_fp16_only_gpu_has_an_fp16_peak():
    from beit_fast.train.feedback import _peak_for_name
    assert _peak_for_name("Tesla V100-SXM2-16GB", "fp16") == 125e12


def test_throughput_after_a_resume_counts_only_new_images(monkeypatch):
    """The first rate after a resume is the new images over the time since the resume (clock stubbed)."""
    from beit_fast.train import feedback
    now = [100.0]
    monkeypatch.setattr(feedback.time, "perf_counter", lambda: now[0])
    report = Reporter("unused", total_steps=10, enabled=False)
    now[0] = 500.0
    report.advance_to(1000, images=64000)          # resumed at step 1000: images and clock restart here
    now[0] = 502.0
    assert report.throughput(64000 + 64) == 32.0   # 64 new images in 2 s (not 64064 in 402 s)
    now[0] = 503.0
    assert report.throughput(64000 + 64 + 16) == 16.0


def test_paused_time_is_left_out_of_the_rate(monkeypatch):
    """Time inside Reporter.paused() (evaluation, saves) is not training time; a clock restarted inside the
    block (a resume's advance_to) counts from the block's end (clock stubbed)."""
    from beit_fast.train import feedback
    now = [0.0]
    monkeypatch.setattr(feedback.time, "perf_counter", lambda: now[0])
    report = Reporter("unused", total_steps=10, enabled=False)
    now[0] = 2.0
    with report.paused():
        now[0] = 1002.0
    now[0] = 1004.0
    assert report.throughput(64) == 16.0            # 64 images in 4 s of training (not in 1004 s)
    with report.paused():
        now[0] = 1010.0
        report.advance_to(5, images=80)
        now[0] = 1020.0
    now[0] = 1021.0
    assert report.throughput(96) == 16.0            # 16 images in the 1 s after the block (not in -9 s)


def test_tensorboard_gets_every_numeric_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    report = Reporter(str(tmp_path), total_steps=2, progress=False, tensorboard=True)
    assert report.tb is not None
    report.log({"step": 1, "loss": 2.5, "lr": 1e-3, "skipped": False, "mfu": None}, 1)
    report.log({"step": 2, "loss": 2.0, "lr": 2e-3, "skipped": False, "mfu": None, "top1": 50.0}, 2)
    report.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert sorted(scalars) == ["loss", "lr", "top1"]                     # no step / bool / None series
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["loss"] for r in rows] == [2.5, 2.0]


def test_tensorboard_after_a_crash_and_resume_has_every_step_once(tmp_path):
    """A run logs steps 1..5, saves at step 3 and crashes; resumed from step 3 it logs 4..6 again. TensorBoard
    (reading both event files, as it would) then shows steps 1..6 once each: the first run's 1..3 (the
    resume step's row is not repeated by the resumed run, so it must not be purged) and the resumed run's
    4..6 in place of the first run's 4, 5. log.jsonl holds the same rows."""
    pytest.importorskip("tensorboard")
    import time
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    first = Reporter(str(tmp_path), total_steps=6, progress=False, tensorboard=True)
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)}, step)
    first.close()                                     # the crash (after step 5, last checkpoint at step 3)
    time.sleep(1.1)   # a later process: its event file's name (second-resolution time stamp) sorts after
    resumed = Reporter(str(tmp_path), total_steps=6, progress=False, tensorboard=True, resume_step=3)
    for step in range(4, 7):
        resumed.log({"step": step, "loss": 10.0 * step}, step)
    resumed.close()
    assert len(list((tmp_path / "tb").iterdir())) == 2
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == want
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == want


def test_log_rows_are_strict_json(tmp_path):
    """A NaN loss (every micro-batch since the last row overflowed in fp16) or any other non-finite value, at
    any depth, is written as null with its key listed under "nonfinite": a bare NaN is not JSON outside
    Python."""
    report = Reporter(str(tmp_path), total_steps=2, progress=False, tensorboard=False)
    report.log({"step": 1, "loss": float("nan"), "lr": 0.1, "eval": {"top1": float("inf"), "n": 3}}, 1)
    report.log({"step": 2, "loss": 2.5, "lr": 0.1}, 2)
    report.close()
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))  # noqa
    rows = [strict(line) for line in open(tmp_path / "log.jsonl")]
    assert rows[0] == {"step": 1, "loss": None, "lr": 0.1, "eval": {"top1": None, "n": 3},
                       "nonfinite": ["eval.top1", "loss"]}
    assert rows[1] == {"step": 2, "loss": 2.5, "lr": 0.1}


def test_tensorboard_plots_a_nan_loss(tmp_path):
    """log.jsonl writes a NaN loss as null (strict JSON), but TensorBoard gets the NaN: a point on the curve
    that says what happened, not a silent gap."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    report = Reporter(str(tmp_path), total_steps=3, progress=False, tensorboard=True)
    for step, loss in ((1, 2.0), (2, float("nan")), (3, 1.5)):
        report.log({"step": step, "loss": loss}, step)
    report.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in points] == [1, 2, 3] and points[1][1] != points[1][1] and points[2] == (3, 1.5)


def test_each_log_row_is_on_disk_when_logged(tmp_path):
    """log.jsonl is written through as the run goes (a `tail -f`, or a run killed before it closes its
    Reporter, sees every row logged so far), not when the Reporter closes."""
    report = Reporter(str(tmp_path), total_steps=3, progress=False, tensorboard=False)
    try:
        for step in (1, 2):
            report.log({"step": step, "loss": 1.0 / step}, step)
            rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
            assert [r["step"] for r in rows] == list(range(1, step + 1))
    finally:
        report.close()


def test_non_finite_values_in_lists_are_null_too(tmp_path):
    report = Reporter(str(tmp_path), total_steps=1, progress=False, tensorboard=False)
    report.log({"step": 1, "per_layer": [0.5, float("nan")], "eval": {"pair": (float("-inf"), 2)}}, 1)
    report.close()
    row = json.loads(open(tmp_path / "log.jsonl").read())
    assert row == {"step": 1, "per_layer": [0.5, None], "eval": {"pair": [None, 2]},
                   "nonfinite": ["eval.pair", "per_layer"]}
