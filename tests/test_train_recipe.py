"""The optimisation recipe as the loops run it (from a mutation audit of the optimisation path): each update's
lr / weight decay / layer-decay scale from the schedule of its own step, pretraining's accumulation, and the
label-smoothed fine-tuning loss."""
import pytest
import torch

from test_train_loop import TINY, losses, tiny_finetune, tiny_pretrain, tokenizer_file  # noqa: F401  (a fixture)

from beit_fast.train import finetune, pretrain


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_each_update_uses_the_schedule_of_its_own_step(tmp_path, monkeypatch, kind, tokenizer_file):
    """Every optimizer update k (0-based, counted in updates, not micro-batches) runs at lr_at(k) x the group's
    layer-decay scale and, in the decayed groups only, at wd_at(k) (reference §5.2 / §6.2): read from the
    optimizer the moment it steps, with accumulation, a warmup, a cosine weight decay and (fine-tuning) layer
    decay 0.65; pretraining has no layer decay."""
    from beit_fast.train import engine
    from beit_fast.train.optim import Schedule, layer_id
    seen = []
    real = engine.optimizer_step

    def spy(model, optimizer, scaler, clip_grad):
        seen.append([(g["lr"], g["weight_decay"], g["lr_scale"], g["decayed"], g["names"][0])
                     for g in optimizer.param_groups])
        return real(model, optimizer, scaler, clip_grad)
    monkeypatch.setattr(engine, "optimizer_step", spy)
    common = dict(epochs=2, warmup_epochs=0.5, lr=3e-3, min_lr=1e-4, weight_decay=0.05, weight_decay_end=0.2,
                  batch_size=8, accum_steps=2, train_subset=64)
    if kind == "pretrain":
        cfg = tiny_pretrain(tmp_path, tokenizer_path=tokenizer_file, **common)
        pretrain(cfg)
        decay = None
    else:
        cfg = tiny_finetune(tmp_path, layer_decay=0.65, mixup=0.0, cutmix=0.0, eval_every_epochs=0, val_subset=16,
                            **common)
        finetune(cfg)
        decay = 0.65
    schedule = Schedule(cfg, steps_per_epoch=64 // (8 * 2))
    depth = TINY["depth"]
    assert len(seen) == 8 and schedule.warmup_steps == 2
    for step, groups in enumerate(seen):
        assert len(groups) == (2 if decay is None else 2 * (depth + 2)), step
        for lr, wd, scale, decayed, name in groups:
            want = 1.0 if decay is None else decay ** (depth + 1 - layer_id(name, depth))
            assert scale == pytest.approx(want, rel=1e-12), (step, name)
            assert lr == pytest.approx(schedule.lr_at(step) * want, rel=1e-12, abs=0), (step, name)
            assert wd == (pytest.approx(schedule.wd_at(step), rel=1e-12) if decayed else 0.0), (step, name)


def test_pretraining_accumulation_changes_nothing(tmp_path, tokenizer_file):
    """Two pretraining micro-batches of 8 accumulated give the losses and gradient norms of one batch of 16
    (the same images, masks and tokenizer codes). One masked patch per image, so each micro-batch's mean over its masked
    tokens is half the batch's sum: the accumulated gradient must be the mean of the two, not their sum."""
    kw = dict(epochs=1, drop_path=0.0, num_mask_patches=1, min_mask_patches=1, train_subset=64,
              tokenizer_path=tokenizer_file, tokenizer_dtype="fp32")   # auto: decided on the first micro-batch
    pretrain(tiny_pretrain(tmp_path / "b16", batch_size=16, **kw))
    pretrain(tiny_pretrain(tmp_path / "b8x2", batch_size=8, accum_steps=2, **kw))
    for key in ("loss", "grad_norm", "mlm_acc"):
        one, two = losses(tmp_path / "b16", key), losses(tmp_path / "b8x2", key)
        assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
        torch.testing.assert_close(torch.tensor([v for _, v in two]), torch.tensor([v for _, v in one]),
                                   rtol=1e-5, atol=1e-6, msg=key)


def test_finetuning_trains_on_the_label_smoothed_loss(tmp_path):
    """Without mixup the training loss is the label-smoothed cross-entropy, (1 - s) NLL + s mean(-log p): at
    lr 0 (the weights never move) the logged loss of each step is linear in s and moves with it. The head is
    initialised at full scale (init_scale 1): BEiT's 0.001 gives near-uniform logits, whose loss is log K at any s."""
    curves = {}
    for s in (0.0, 0.3, 0.6):
        finetune(tiny_finetune(tmp_path / str(s), epochs=1, lr=0.0, smoothing=s, mixup=0.0, cutmix=0.0,
                               drop_path=0.0, val_subset=16, model_overrides={**TINY, "init_scale": 1.0}))
        curves[s] = torch.tensor([v for _, v in losses(tmp_path / str(s))], dtype=torch.float64)
    assert len(curves[0.0]) == 4
    step1, step2 = curves[0.3] - curves[0.0], curves[0.6] - curves[0.3]
    assert bool((step1.abs() > 1e-3).all()), step1
    torch.testing.assert_close(step2, step1, rtol=1e-4, atol=1e-6)
