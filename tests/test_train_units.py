"""Fast unit tests of the trainer's pieces, called directly with stub models, hand-built batches and files
(no training run): which checkpoint a run folder resolves to, what a resume sets aside, the evaluation
loop's metrics, the logged loss, and the fine-tuning loss's label smoothing."""
import dataclasses
import math
import os

import pytest
import torch

from beit_fast.train import engine, preset
from beit_fast.train.checkpoint import BEST, BEST_EMA, resolve_checkpoint, set_aside_later
from beit_fast.train.runtime import Runtime

CPU = torch.device("cpu")
K = 10   # classes of the hand-built logits


def _touch(folder, name, step=None):
    path = os.path.join(folder, name)
    if step is None:
        with open(path, "wb") as f:
            f.write(b"")
    else:
        torch.save({"step": step}, path)
    return path


# --- checkpoint files ----------------------------------------------------------------------------------------

def test_a_run_folder_resolves_to_its_latest_step_checkpoint(tmp_path):
    """resume / --init / eval given a run folder take its highest step (by number, not by name: an unpadded
    checkpoint-100.pt is later than checkpoint-20.pt), not the oldest one pruning left; the best checkpoint
    only when asked for it, or when there is no step checkpoint."""
    run = str(tmp_path)
    for name in ("checkpoint-0000010.pt", "checkpoint-100.pt", "checkpoint-20.pt", "checkpoint-0000009.pt"):
        _touch(run, name)
    best = _touch(run, BEST)
    assert resolve_checkpoint(run) == os.path.join(run, "checkpoint-100.pt")
    assert resolve_checkpoint(run, prefer_best=True) == best
    os.unlink(os.path.join(run, "checkpoint-100.pt"))
    assert resolve_checkpoint(run) == os.path.join(run, "checkpoint-20.pt")
    for name in ("checkpoint-0000010.pt", "checkpoint-20.pt", "checkpoint-0000009.pt"):
        os.unlink(os.path.join(run, name))
    assert resolve_checkpoint(run) == best
    single = _touch(run, "checkpoint-0000003.pt")
    assert resolve_checkpoint(single) == single                        # a file is itself


def test_resuming_sets_aside_only_what_was_saved_after_the_resume_step(tmp_path):
    """Resuming at step 20: the step checkpoints after 20 and a best checkpoint saved after 20 move to
    superseded-after-step-0000020/ (with a copy of the log); the step-20 checkpoint and a best checkpoint
    saved AT step 20 (the state being resumed: the resumed run must keep it to beat) stay."""
    run = str(tmp_path)
    for step in (10, 20, 30, 40):
        _touch(run, f"checkpoint-{step:07d}.pt", step)
    _touch(run, BEST, 20)
    _touch(run, BEST_EMA, 30)
    with open(os.path.join(run, "log.jsonl"), "w") as f:
        f.write('{"step": 10}\n{"step": 30}\n')
    target = set_aside_later(run, 20)
    assert target == os.path.join(run, "superseded-after-step-0000020")
    assert sorted(os.listdir(target)) == sorted(["checkpoint-0000030.pt", "checkpoint-0000040.pt", BEST_EMA,
                                                 "log.jsonl"])
    assert sorted(p for p in os.listdir(run) if p.endswith(".pt")) == sorted(
        ["checkpoint-0000010.pt", "checkpoint-0000020.pt", BEST])
    assert torch.load(os.path.join(run, BEST), weights_only=True)["step"] == 20
    assert set_aside_later(run, 20) is None                           # nothing after 20 is left


# --- evaluation ------------------------------------------------------------------------------------------------

def _ranked(label: int, rank: int) -> torch.Tensor:
    """K logits (distinct) in which class `label` has the `rank`-th highest value (1 = the argmax)."""
    order = [c for c in range(K) if c != label]
    order.insert(rank - 1, label)                  # order[j]: the class with the (j+1)-th highest logit
    logits = torch.empty(K)
    for j, c in enumerate(order):
        logits[c] = 0.5 * (K - j) + 0.01 * c       # strictly decreasing along `order` (0.01 * c < 0.5)
    ranks = torch.argsort(logits, descending=True).tolist()
    assert ranks.index(label) == rank - 1, (label, rank, ranks)   # the label really ranks `rank`-th
    return logits


def _cross_entropy(logits: torch.Tensor, label: int) -> float:
    z = [float(v) for v in logits]
    top = max(z)
    return top + math.log(sum(math.exp(v - top) for v in z)) - z[label]


def test_evaluate_counts_top1_top5_and_leaves_out_unreadable_placeholders():
    """engine.evaluate over hand-built logits (an identity model: the batch's images ARE the logits). Five
    readable images whose label ranks 1st, 3rd, 7th, 5th and 6th: top-1 1/5 = 20%, top-5 3/5 = 60% (rank 5 is
    in, rank 6 is not); the loss is the mean cross-entropy of those five. An unreadable placeholder (label 0,
    skipped = 1, here with class 0 its argmax) counts in no metric and in no divisor: n = 5,
    skipped_images = 1."""
    readable = [(3, 1), (7, 3), (2, 7), (5, 5), (0, 6)]           # (label, rank of the label)
    rows = [_ranked(label, rank) for label, rank in readable]
    placeholder = _ranked(0, 1)
    batch1 = (torch.stack(rows[:3] + [placeholder]), torch.tensor([3, 7, 2, 0]), torch.tensor([0, 0, 0, 1]))
    batch2 = (torch.stack(rows[3:]), torch.tensor([5, 0]), torch.tensor([0, 0]))
    for x, label, _ in [batch1, batch2]:
        assert x.shape == (len(label), K)
    model = torch.nn.Identity().train()
    got = engine.evaluate(model, [batch1, batch2], CPU, "fp32", Runtime(CPU))
    assert not model.training
    assert got["n"] == 5 and got["skipped_images"] == 1
    assert got["top1"] == pytest.approx(100.0 * 1 / 5)
    assert got["top5"] == pytest.approx(100.0 * 3 / 5)
    want = sum(_cross_entropy(r, label) for r, (label, _) in zip(rows, readable)) / 5
    assert got["loss"] == pytest.approx(want, rel=1e-6)


def test_evaluate_of_only_unreadable_images_counts_nothing():
    """A loader of placeholders only: no image evaluated (n = 0, every metric 0, no NaN from the
    cross-entropy of ignored labels), all of them skipped."""
    batch = (torch.stack([_ranked(0, 1), _ranked(0, 2)]), torch.tensor([0, 0]), torch.tensor([1, 1]))
    got = engine.evaluate(torch.nn.Identity(), [batch], CPU, "fp32", Runtime(CPU))
    assert got == {"loss": 0.0, "top1": 0.0, "top5": 0.0, "n": 0, "skipped_images": 2}


# --- logged loss ---------------------------------------------------------------------------------------------

def test_logged_loss_is_the_mean_over_finite_micro_batches():
    """With a loss scaler (fp16), a micro-batch whose loss overflowed is left out of the logged loss: losses
    2, inf, 4, NaN log (2 + 4) / 2 = 3, not 6 / 4; the accuracy is over every micro-batch. The sums are zeroed
    once read; a log with no finite loss reads NaN."""
    class Report:
        def message(self, text):
            pass
    rt = Runtime(CPU)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()
    sums = engine.log_sums(CPU)
    for loss, acc in ((2.0, 0.25), (float("inf"), 0.5), (4.0, 1.0), (float("nan"), 0.25)):
        engine.add_micro(sums, torch.tensor(loss), torch.tensor(acc))
    engine.add_update(sums, torch.tensor(0.0))
    got = engine.read_sums(sums, rt, scaler, 7, Report())
    assert got["loss"] == pytest.approx(3.0)
    assert got["acc"] == pytest.approx(2.0 / 4)
    assert got["skipped"] == 0 and got["skipped_images"] == 0
    assert torch.count_nonzero(sums) == 0
    engine.add_micro(sums, torch.tensor(float("inf")))
    assert math.isnan(engine.read_sums(sums, rt, scaler, 8, Report())["loss"])


# --- fine-tuning loss ----------------------------------------------------------------------------------------

def _smoothed(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(1 - s) on the label plus s spread evenly over all K classes (Szegedy et al.'s label smoothing)."""
    return (1 - smoothing) * torch.nn.functional.one_hot(labels, K).double() + smoothing / K


def test_finetune_loss_smooths_labels_without_mixup():
    """smoothing = s without mixup/cutmix: the criterion is the cross-entropy against (1-s) one-hot + s/K, i.e.
    (1-s) * NLL + s * mean over classes of -log p; with s = 0 plain cross-entropy."""
    from beit_fast.train.finetuning import _loss_fn
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, K, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 9, 5, 1])
    logp = torch.log_softmax(logits, -1)
    for s in (0.1, 0.3, 0.0):
        cfg = dataclasses.replace(preset("finetune", "demo"), num_classes=K, mixup=0.0, cutmix=0.0, smoothing=s)
        mixup, criterion = _loss_fn(cfg)
        assert mixup is None
        want = -(_smoothed(labels, s) * logp).sum(-1).mean()
        assert float(criterion(logits, labels)) == pytest.approx(float(want), rel=1e-9)
    plain = -logp[torch.arange(6), labels].mean()
    assert float(criterion(logits, labels)) == pytest.approx(float(plain), rel=1e-9)
    assert float(_loss_fn(dataclasses.replace(cfg, smoothing=0.3))[1](logits, labels)) != pytest.approx(
        float(plain), rel=1e-3)


def test_finetune_mixup_targets_are_label_smoothed():
    """With mixup, smoothing goes into the mixed soft targets (timm's Mixup(label_smoothing=s)): batch mode
    mixes image i with image B-1-i at one lam, read back from the mixed images (image 0 all ones, image B-1
    all zeros: mixed image 0 = lam), and the target must be lam * smooth(y) + (1 - lam) * smooth(y flipped);
    the criterion is the soft-target cross-entropy."""
    from beit_fast.train.finetuning import _loss_fn
    s = 0.2
    cfg = dataclasses.replace(preset("finetune", "demo"), num_classes=K, mixup=0.8, cutmix=0.0, mixup_prob=1.0,
                              smoothing=s, mixup_mode="batch")
    mixup, criterion = _loss_fn(cfg)
    assert mixup is not None
    images = torch.zeros(4, 3, 8, 8)
    images[0] = 1.0
    images[1] = 0.25
    images[2] = 0.75
    labels = torch.tensor([1, 4, 4, 7])
    mixed, targets = mixup(images.clone(), labels)
    lam = float(mixed[0, 0, 0, 0])
    assert 0.0 < lam < 1.0
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0))
    want = lam * _smoothed(labels, s) + (1 - lam) * _smoothed(labels.flip(0), s)
    assert torch.allclose(targets.double(), want, atol=1e-6)
    assert targets.min().item() == pytest.approx(s / K)       # classes in neither image keep s/K
    logits = torch.randn(4, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = criterion(logits, targets.double())
    assert float(got) == pytest.approx(float(-(want * torch.log_softmax(logits, -1)).sum(-1).mean()), rel=1e-6)


def test_cutmix_alone_turns_mixing_on_with_the_configs_settings():
    """unilm: mixup is active when mixup > 0 OR cutmix > 0; the Mixup gets the run's alphas, probabilities,
    mode, smoothing and class count, and the criterion is the soft-target cross-entropy."""
    from timm.loss import SoftTargetCrossEntropy

    from beit_fast.train.finetuning import _loss_fn
    cfg = dataclasses.replace(preset("finetune", "demo"), num_classes=K, mixup=0.0, cutmix=1.0, smoothing=0.1,
                              mixup_prob=0.7, mixup_switch_prob=0.25, mixup_mode="pair")
    mixup, criterion = _loss_fn(cfg)
    assert mixup is not None and isinstance(criterion, SoftTargetCrossEntropy)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.mode,
            mixup.label_smoothing, mixup.num_classes) == (0.0, 1.0, 0.7, 0.25, "pair", 0.1, K)


def test_only_fp16_scales_the_loss():
    """Dynamic loss scaling is for fp16 alone: bf16 has fp32's exponent range and fp32 needs none."""
    from beit_fast.train import runtime
    assert {p: runtime.grad_scaler(CPU, p).is_enabled() for p in ("fp32", "bf16", "fp16")} == \
        {"fp32": False, "bf16": False, "fp16": True}


def test_each_precision_autocasts_to_its_own_dtype():
    """bf16 runs the matmuls in bfloat16 and fp16 in float16 (a run asking for bf16 must not get fp16's range)."""
    from beit_fast.train import runtime
    a = torch.randn(4, 4)
    got = {}
    for p in ("fp32", "bf16", "fp16"):
        with runtime.autocast(CPU, p):
            got[p] = (a @ a).dtype
    assert got == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def test_unwrap_reaches_the_model_inside_torch_compile():
    """A compiled model's state dict (checkpoints, EMA) is the model's own, without the _orig_mod. prefix."""
    from beit_fast.train import runtime
    model = torch.nn.Linear(2, 2)
    assert runtime.unwrap(torch.compile(model)) is model


def test_a_launcher_without_local_rank_gives_each_rank_its_own_local_rank(monkeypatch):
    """Without LOCAL_RANK (a launcher that sets only WORLD_SIZE and RANK) the local rank is the rank, so that
    on one node each process takes its own GPU (cuda:RANK), not all of them cuda:0."""
    from beit_fast.train import runtime
    monkeypatch.setenv("WORLD_SIZE", "1")    # a world of one: no process group is joined
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    rt = runtime.setup("cpu")
    assert (rt.rank, rt.local_rank, rt.owns_group) == (3, 3, False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.setup("cpu").local_rank == 1


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_the_runs_drop_path_and_layer_scale_reach_the_model(kind):
    """drop_path is the stochastic-depth rate of the last block, linearly from 0 over the blocks (reference
    §1.4: linspace(0, drop_path_rate, depth)); layer_scale is the gammas' initial value."""
    cfg = dataclasses.replace(preset(kind, "demo"), drop_path=0.3, layer_scale=0.25,
                              model_overrides={"embed_dim": 32, "depth": 4, "num_heads": 2})
    model = engine.build_model(cfg, CPU)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(torch.all(b.gamma_1 == 0.25) and torch.all(b.gamma_2 == 0.25) for b in model.blocks)
