"""Configs, presets, overrides, schedules, parameter groups, and early failure of bad configs."""
import dataclasses
import math
import os

import pytest
import torch

import beit_fast
from beit_fast.train import ConfigError, FinetuneConfig, PretrainConfig, preset, resolve
from beit_fast.train import config as C
from beit_fast.train.optim import Schedule, cosine_at, layer_id, param_groups


def test_presets_and_reference_recipes():
    assert set(C.list_presets("pretrain")) >= {"demo", "beit_base_224", "beit_large_224"}
    b = preset("pretrain", "beit_base_224")
    assert (b.lr, b.batch_size, b.epochs, b.warmup_epochs, b.clip_grad, b.drop_path, b.layer_scale) == \
        (1.5e-3, 128, 800, 10, 3.0, 0.1, 0.1)
    assert (b.num_mask_patches, b.min_mask_patches, b.second_img_size, b.tokenizer) == (75, 16, 112, "dvae")
    assert b.tokenizer_dtype == "fp16" and preset("pretrain").tokenizer_dtype == "auto"   # DALL-E's own on CUDA
    assert preset("pretrain", "beit_large_224").layer_scale == 1e-5
    fb, fl = preset("finetune", "beit_base_224"), preset("finetune", "beit_large_224")
    assert (fb.lr, fb.layer_decay, fb.epochs, fb.warmup_epochs, fb.drop_path, fb.mixup, fb.cutmix) == \
        (4e-3, 0.65, 100, 20, 0.1, 0.8, 1.0)
    assert (fl.lr, fl.layer_decay, fl.epochs, fl.drop_path, fl.batch_size * fl.accum_steps) == (1e-3, 0.75, 50, 0.2, 128)
    # ImageNet-22k pretraining (§5.1) and fine-tuning a pt22k_ft22k checkpoint on ImageNet-1k (§6.1)
    p22 = preset("pretrain", "beit_base_224_in22k")
    assert (p22.epochs, p22.warmup_steps, p22.mean, p22.std, p22.lr) == (150, 10000, (0.5,) * 3, (0.5,) * 3, 1.5e-3)
    assert b.mean == (0.485, 0.456, 0.406) and b.warmup_steps == -1
    for size, decay, dp, per_gpu in (("base", 0.85, 0.1, 64), ("large", 0.9, 0.4, 64)):
        f = preset("finetune", f"beit_{size}_224_ft22k")
        assert (f.lr, f.layer_decay, f.epochs, f.warmup_epochs, f.drop_path, f.weight_decay, f.mixup, f.cutmix,
                f.batch_size * f.accum_steps) == (2e-5, decay, 30, 5, dp, 1e-8, 0.0, 0.0, per_gpu)
    # every preset excludes tokens and position tables from weight decay (unilm's rule only on request)
    for kind in ("pretrain", "finetune"):
        assert {preset(kind, n).weight_decay_exclusions for n in C.list_presets(kind)} == {"all"}
    assert preset("pretrain").preset == "demo" and preset("finetune").preset == "demo"


# reference §6.1 (beit_reference.md, unilm's ImageNet-1k fine-tuning recipes), the rows as written there:
# | start ckpt -> target | model | eff. batch | lr | warmup/epochs | layer_decay | drop_path | wd | other |
REFERENCE_FINETUNE_ROWS = """
| pt22k → IN-1k | base | 8×128 = 1024 | **4e-3** | 20 / **100** | **0.65** | 0.1 | 0.05 | mixup 0.8, cutmix 1.0 |
| pt22k → IN-1k | large | 8×64×2 = 1024 | 1e-3 | 5 / 50 | **0.75** | 0.2 | 0.05 | mixup 0.8, cutmix 1.0 |
| pt22k_ft22k → IN-1k | base | 8×64 = 512 | 2e-5 | 5 / 30 | 0.85 | 0.1 | 1e-8 | no mixup |
| pt22k_ft22k → IN-1k | large | 8×32×2 = 512 | 2e-5 | 5 / 30 | 0.9 | 0.4 | 1e-8 | no mixup |
"""


@pytest.mark.parametrize("row", REFERENCE_FINETUNE_ROWS.strip().splitlines(),
                         ids=["base-pt22k", "large-pt22k", "base-pt22k_ft22k", "large-pt22k_ft22k"])
def test_finetune_presets_match_every_reference_recipe_row(row):
    """Each fine-tuning preset (base/large x pt22k/pt22k_ft22k) has the reference row's lr, warmup and total
    epochs, layer decay, drop path and weight decay (the rows are parsed, not restated), and its per-GPU batch
    x accumulation x 8 GPUs is the row's effective batch."""
    cells = [c.replace("*", "").strip() for c in row.strip().strip("|").split("|")]
    start, size = cells[0].split(" ")[0], cells[1]
    warmup, epochs = (int(v) for v in cells[4].split("/"))
    f = preset("finetune", f"beit_{size}_224" + ("" if start == "pt22k" else "_ft22k"))
    assert (f.lr, f.warmup_epochs, f.epochs, f.layer_decay, f.drop_path, f.weight_decay) == \
        (float(cells[3]), warmup, epochs, float(cells[5]), float(cells[6]), float(cells[7])), row
    assert 8 * f.batch_size * f.accum_steps == int(cells[2].split("=")[1]), row
    assert f.warmup_steps == -1, row                     # the warmup is in epochs, as the row gives it
    if "no mixup" in cells[8]:
        assert (f.mixup, f.cutmix) == (0.0, 0.0), row
    else:
        assert (f.mixup, f.cutmix) == (0.8, 1.0), row


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: demo\nlr: 0.01\nbetas: [0.9, 0.98]\nmodel_overrides: {depth: 3}\n")
    cfg = resolve("pretrain", "", str(f), {"lr": "2e-3", "epochs": 3, "model_overrides.num_heads": 2,
                                           "clip_grad": "none", "compile": "true"})
    assert isinstance(cfg, PretrainConfig)
    assert cfg.lr == 2e-3 and cfg.epochs == 3 and cfg.betas == (0.9, 0.98) and cfg.clip_grad is None
    assert cfg.compile is True and cfg.model_overrides["depth"] == 3 and cfg.model_overrides["num_heads"] == 2
    C.save(cfg, str(tmp_path))
    again = resolve("pretrain", "", str(tmp_path / "config.yaml"))
    assert again == cfg


def test_a_model_overrides_mapping_merges_and_null_clears(tmp_path):
    """A whole model_overrides mapping (YAML file, --model-overrides) merges into the preset's, as the dotted
    keys do, and is applied before them; null or {} clears it. A run's saved config.yaml is taken whole."""
    f = tmp_path / "run.yaml"
    f.write_text("model_overrides:\n  depth: 6\n")
    assert resolve("pretrain", yaml_path=str(f)).model_overrides == {**C.DEMO_ARCH, "depth": 6}
    cfg = resolve("pretrain", overrides={"model_overrides.num_heads": 8, "model_overrides": {"depth": 3}})
    assert cfg.model_overrides == {**C.DEMO_ARCH, "depth": 3, "num_heads": 8}
    for empty in (None, {}, "null"):
        assert resolve("finetune", overrides={"model_overrides": empty}).model_overrides == {}
    f.write_text("model_overrides:\n")
    assert resolve("finetune", yaml_path=str(f)).model_overrides == {}
    for overrides in ({"model_overrides": None, "model_overrides.depth": 2},
                      {"model": "beit_base_patch16_224", "model_overrides": {"depth": 2}}):
        cfg = resolve("finetune", overrides=overrides)
        assert cfg.model_overrides == {"depth": 2}
        C.save(cfg, str(tmp_path))
        assert resolve("finetune", yaml_path=str(tmp_path / "config.yaml")) == cfg


def test_text_fields_keep_their_text(tmp_path):
    """--set gives a text field the text written (YAML would make 0755 493, yes True, 12:30 750); a YAML file
    whose value YAML re-typed is refused with a hint to quote it, never silently altered."""
    got = C.parse_set(["output_dir=0755", "data_path=yes", "init=12:30", "auto_augment=none", "device='1.10'",
                       "lr=0.001", "model_overrides.depth=2"], FinetuneConfig)
    assert got == {"output_dir": "0755", "data_path": "yes", "init": "12:30", "auto_augment": "none",
                   "device": "1.10", "lr": 1e-3, "model_overrides.depth": 2}
    assert resolve("finetune", overrides=got).auto_augment is None
    f = tmp_path / "run.yaml"
    for text in ("output_dir: 1.10", "data_path: off", "output_dir: 0755", "init: [a]"):
        f.write_text(text + "\n")
        with pytest.raises(ConfigError, match=f"{text.split(':')[0]}: expected text, but YAML read .* quote the value"):
            resolve("finetune", yaml_path=str(f))
    f.write_text("output_dir: '1.10'\ndata_path:\n")
    cfg = resolve("finetune", yaml_path=str(f))
    assert (cfg.output_dir, cfg.data_path) == ("1.10", "")


@pytest.mark.parametrize("kind, changes, message", [
    ("pretrain", dict(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
    ("pretrain", dict(min_lr=float("inf")), "min_lr must be a finite number >= 0, got inf"),
    ("pretrain", dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
    ("pretrain", dict(stop_at_step=-5), "stop_at_step must be >= 0, got -5"),
    ("finetune", dict(keep_last=0), "keep_last must be >= 1, got 0"),     # (0 kept one: not "keep all")
    # the demo's 4x4 grid: blocks are at most 3 patches a side, so every mask was empty and the loss NaN
    ("pretrain", dict(num_mask_patches=14, min_mask_patches=14),
     "min_mask_patches=14: no block of 14 patches fits a 4x4 patch grid .* at most 6 lets blocks take half"),
    ("pretrain", dict(tokenizer_vocab=0), "tokenizer_vocab must be >= 1"),
    ("pretrain", dict(tokenizer_fit_images=0), "tokenizer_fit_images must be >= 1"),
    ("pretrain", dict(tokenizer_vocab=5000, tokenizer_fit_images=16),
     "tokenizer_vocab=5000 needs at least 5000 patches to fit k-means, but 16 images x 16 patches"),
    ("pretrain", dict(tokenizer_vocab=2000, train_subset=64), "but 64 images x 16 patches"),   # fit on the subset
    ("finetune", dict(eval_batch_size=-1), "eval_batch_size must be >= 0"),
    ("finetune", dict(val_subset=-3), "val_subset must be >= 0"),
    ("finetune", dict(mixup_mode="foo"), r"mixup_mode must be one of \['batch', 'pair', 'elem'\], got 'foo'"),
    ("finetune", dict(re_prob=2.0), r"re_prob must be a finite number in \[0, 1\]"),
    ("finetune", dict(auto_augment="bogus"), "auto_augment must be a timm policy .* got 'bogus'"),
    ("finetune", dict(auto_augment="rand-n2.5"), "auto_augment must be a timm policy .* got 'rand-n2.5'"),
    # an EMA decay outside [0, 1] makes the average diverge (1.5) or flip sign every step (-0.5)
    ("finetune", dict(ema=True, ema_decay=1.5), r"ema_decay must be a finite number in \[0, 1\], got 1.5"),
    ("finetune", dict(ema=True, ema_decay=-0.5), r"ema_decay must be a finite number in \[0, 1\], got -0.5"),
    # layer decay above 1 made the lower layers' lr larger than the head's (unilm ignores such a value)
    ("finetune", dict(layer_decay=1.1), r"layer_decay must be a finite number in \[0, 1\], got 1.1"),
    # the training loop logs every log_every steps (a modulo); a flip probability above 1 would flip every image
    ("finetune", dict(log_every=0), "log_every must be >= 1, got 0"),
    ("pretrain", dict(hflip=1.5), r"hflip must be a finite number in \[0, 1\], got 1.5"),
    ("finetune", dict(betas=(0.9, 1.0)), r"betas must be 2 numbers in \[0, 1\)"),
    ("finetune", dict(std=(0.5, 0.0, 0.5)), "std must be 3 numbers > 0"),      # normalisation divides by it
    ("finetune", dict(cutmix=1.0, mixup=0.0, batch_size=63), "mixup/cutmix need an even batch_size, got 63"),
    ("finetune", dict(crop_pct=1.5), r"crop_pct must be in \(0, 1\]"),
    ("finetune", dict(mixup=-0.5), "mixup must be a finite number >= 0"),
    ("finetune", dict(cutmix=-1.0), "cutmix must be a finite number >= 0"),
    ("finetune", dict(num_classes=0), "num_classes must be >= 1"),
    ("finetune", dict(num_threads=-1), "num_threads must be >= 0"),
    ("finetune", dict(warmup_steps=-2), "warmup_steps must be >= -1, got -2"),
    ("finetune", dict(resume="no/such/checkpoint.pt"), "resume='no/such/checkpoint.pt' does not exist"),
    ("finetune", dict(attn_impl="flash"), "attn_impl must be one of"),
    ("finetune", dict(optimizer="sgd"), "optimizer must be one of"),
    ("finetune", dict(distributed="deepspeed"), "distributed must be one of"),
    ("pretrain", dict(tokenizer="vqgan"), r"tokenizer must be one of \['kmeans', 'dvae'\], got 'vqgan'"),
    ("pretrain", dict(tokenizer_dtype="int8"), "tokenizer_dtype must be one of"),
    ("pretrain", dict(second_img_size=-16), "second_img_size must be >= 0"),
    ("pretrain", dict(num_mask_patches=17), r"num_mask_patches must be in \[1, 16\], got 17"),
    ("eval", dict(precision="fp8"), "precision must be one of"),
])
def test_values_the_run_would_trip_over_are_refused(tmp_path, kind, changes, message):
    """Each of these passed check() and then failed, or ran as something else, after the run had started."""
    with pytest.raises(ConfigError, match=message):
        C.check(dataclasses.replace(preset(kind), output_dir=str(tmp_path), **changes))


def test_values_at_the_bounds_pass(tmp_path):
    """The limits are inclusive where the run takes them: a fixed crop (scale and ratio (1, 1)), every patch
    masked, exactly one patch per k-means code (max_patches = vocab_size, images x patches = vocab_size)."""
    C.check(dataclasses.replace(preset("finetune"), output_dir=str(tmp_path / "f"), crop_scale=(1.0, 1.0),
                                crop_ratio=(1.0, 1.0)))
    C.check(dataclasses.replace(preset("pretrain"), output_dir=str(tmp_path / "p"), num_mask_patches=16))
    C.check(C.TokenizerFitConfig(output=str(tmp_path / "t.safetensors"), img_size=32, patch_size=4, vocab_size=128,
                                 max_images=2, max_patches=128))


def test_fit_tokenizer_values_are_checked_before_the_data(tmp_path):
    """--print-config (values_only) refuses what fit-tokenizer would for its values (a view that is not whole
    patches, no k-means iteration), and not an existing output file, which it does not look at."""
    for changes, message in ((dict(img_size=30, patch_size=4), "img_size 30 is not a multiple of patch_size 4"),
                             (dict(iters=0), "iters must be >= 1, got 0")):
        with pytest.raises(ConfigError, match=message):
            C.check(C.TokenizerFitConfig(output=str(tmp_path / "t.safetensors"), **changes), values_only=True)
    (tmp_path / "t.safetensors").write_bytes(b"")       # the output file is not looked at either
    C.check(C.TokenizerFitConfig(output=str(tmp_path / "t.safetensors")), values_only=True)


def test_one_step_counts_every_torchrun_process(tmp_path, monkeypatch):
    """Under torchrun each of WORLD_SIZE processes takes batch_size images a step: 100 images hold one step
    of one process's 64, not of two processes'."""
    cfg = dataclasses.replace(preset("pretrain"), output_dir=str(tmp_path), train_subset=100)
    monkeypatch.setenv("WORLD_SIZE", "1")
    C.check(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="fewer than one optimizer step needs"):
        C.check(cfg)


def test_commands_without_a_preset_run_the_dataclass_defaults():
    assert preset("eval") == C.EvalConfig() and preset("fit-tokenizer") == C.TokenizerFitConfig()
    assert resolve("eval") == C.EvalConfig()


def test_timm_policies_and_mixup_modes_pass(tmp_path):
    for policy in ("rand-m9-mstd0.5-inc1", "augmix-m5-w3", "original", "v0", "3a", None):
        C.check(dataclasses.replace(preset("finetune"), output_dir=str(tmp_path), auto_augment=policy,
                                    mixup=0.8, mixup_mode="pair"))


def test_unknown_names_fail_clearly():
    with pytest.raises(ConfigError, match="unknown pretrain preset 'nope'.*demo"):
        resolve("pretrain", "nope")
    with pytest.raises(ConfigError, match="did you mean lr"):
        resolve("finetune", overrides={"lrr": 1})
    with pytest.raises(ConfigError, match="expected int"):
        resolve("finetune", overrides={"epochs": "many"})
    with pytest.raises(ConfigError, match="unknown model"):
        C.check(dataclasses.replace(preset("finetune"), model="beit_huge"))
    with pytest.raises(ConfigError, match="model_overrides: unknown BeitConfig fields"):
        C.check(dataclasses.replace(preset("finetune"), model_overrides={"widht": 3}))
    with pytest.raises(ConfigError, match="classification model"):
        C.check(dataclasses.replace(preset("pretrain"), model="beit_test_patch4_32"))
    with pytest.raises(ConfigError, match="precision"):
        C.check(dataclasses.replace(preset("pretrain"), precision="fp8"))
    # masking settings the block generator refuses fail here, not after the k-means tokenizer was fitted
    for bad, match in (({"min_mask_aspect": 0.0}, "min_aspect must be > 0"),
                       ({"min_mask_patches": 0}, "min_num_patches must be >= 1"),
                       ({"min_mask_aspect": -1.0}, "min_aspect must be > 0")):
        with pytest.raises(ConfigError, match=f"masking .*{match}"):
            C.check(dataclasses.replace(preset("pretrain"), **bad))
    with pytest.raises(ConfigError, match="ema=true is not supported with distributed=fsdp"):
        C.check(dataclasses.replace(preset("finetune"), ema=True, distributed="fsdp"))
    if C.fsdp_runs_on_cpu():
        C.check(dataclasses.replace(preset("finetune"), distributed="fsdp", device="cpu"))   # CPU (gloo) too
    else:
        with pytest.raises(ConfigError, match="distributed=fsdp on the CPU needs a newer torch"):
            C.check(dataclasses.replace(preset("finetune"), distributed="fsdp", device="cpu"))


def test_missing_files_fail_before_any_work(tmp_path, monkeypatch):
    # If a check let these through, building the model would be the first thing to run: make that fatal.
    import beit_fast.models  # noqa: F401  (run alone, nothing has imported the subpackage yet)
    monkeypatch.setattr(beit_fast.models, "create_model", lambda *a, **k: pytest.fail("work started"))
    from beit_fast.train import finetune, pretrain
    with pytest.raises(ConfigError, match="tokenizer=dvae needs tokenizer_path"):
        pretrain(dataclasses.replace(preset("pretrain"), tokenizer="dvae", output_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="not found.*nothing is downloaded"):
        pretrain(dataclasses.replace(preset("pretrain"), tokenizer="dvae", tokenizer_path=str(tmp_path / "e.pkl")))
    with pytest.raises(ConfigError, match="fit-tokenizer"):
        pretrain(dataclasses.replace(preset("pretrain"), tokenizer_path=str(tmp_path / "k.safetensors")))
    empty = tmp_path / "data"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="no images in"):
        pretrain(dataclasses.replace(preset("pretrain"), dataset="folder", data_path=str(empty)))
    with pytest.raises(ConfigError, match="is not a folder"):
        pretrain(dataclasses.replace(preset("pretrain"), dataset="folder", data_path=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="init: checkpoint .* does not exist"):
        finetune(dataclasses.replace(preset("finetune"), init=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="apex"):
        finetune(dataclasses.replace(preset("finetune"), optimizer="apex_lamb"))
    with pytest.raises(ConfigError, match="optimizer=apex_adam is not supported with distributed=fsdp"):
        pretrain(dataclasses.replace(preset("pretrain"), optimizer="apex_adam", distributed="fsdp"))
    assert not (tmp_path / "a").exists()


def test_a_new_run_refuses_a_used_output_dir(tmp_path):
    """Only a resumed run may write into a folder that holds another run's checkpoints or tokenizer: step
    pruning would delete the new run's checkpoints and keep the old ones, and the old tokenizer would be reused."""
    used = tmp_path / "used"
    used.mkdir()
    cfg = dataclasses.replace(preset("pretrain"), output_dir=str(used))
    C.check(cfg)                                   # an empty folder is fine
    from beit_fast.train.tokenizer import KMeansTokenizer   # a tokenizer fit there, named by the run: fine
    KMeansTokenizer(torch.rand(16, 48), torch.zeros(48), torch.ones(48), 4, 3).save(str(used / "tokenizer.safetensors"))
    C.check(dataclasses.replace(cfg, tokenizer_path=str(used / "tokenizer.safetensors")))
    C.check(dataclasses.replace(preset("finetune"), output_dir=str(used)))
    for name in ("tokenizer.safetensors", "log.jsonl", "checkpoint-0000660.pt"):
        (used / name).write_bytes(b"")
        with pytest.raises(ConfigError, match=f"already holds an earlier run .*{name}.*--resume"):
            C.check(cfg)
    C.check(dataclasses.replace(cfg, resume="auto"))
    C.check(dataclasses.replace(cfg, resume=str(used / "checkpoint-0000660.pt")))
    C.check(dataclasses.replace(cfg, resume=str(used)))
    elsewhere = tmp_path / "other" / "checkpoint-0000010.pt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        C.check(dataclasses.replace(cfg, resume=str(elsewhere)))
    fine = dataclasses.replace(preset("finetune"), output_dir=str(used))
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        C.check(fine)


def test_finetune_warns_when_init_was_pretrained_with_other_normalisation(tmp_path):
    """The BEiT-B presets follow the reference (ImageNet mean/std for IN-1k pretraining, 0.5/0.5 for
    fine-tuning pt22k weights): fine-tuning this package's own pretraining checkpoint says when they differ,
    and the flags it suggests parse to the pretraining values."""
    from beit_fast.train.finetuning import normalisation_mismatch
    run = tmp_path / "pre"
    run.mkdir()
    C.save(preset("pretrain", "beit_base_224"), str(run))
    path = str(run / "checkpoint-0000010.pt")
    fine = preset("finetune", "beit_base_224")
    msg = normalisation_mismatch(fine, path)
    assert msg and "mean=[0.485, 0.456, 0.406]" in msg and "mean=[0.5, 0.5, 0.5]" in msg
    flags = dict(zip(*[iter(msg.split("pass ")[1].split(" to match")[0].split())] * 2))
    fixed = resolve("finetune", "beit_base_224", overrides={"mean": flags["--mean"], "std": flags["--std"]})
    assert normalisation_mismatch(fixed, path) is None
    assert normalisation_mismatch(fine, str(tmp_path / "unilm.pth")) is None      # no config beside it
    C.save(fine, str(run))                         # a fine-tuning run's folder: nothing to compare with
    assert normalisation_mismatch(preset("finetune", "beit_base_224"), path) is None


def test_normalisation_that_differs_in_one_value_is_a_mismatch(tmp_path):
    """One channel of the mean, or the std alone, differing from the pretraining run's is a mismatch too."""
    from beit_fast.train.finetuning import normalisation_mismatch
    C.save(dataclasses.replace(preset("pretrain"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), str(tmp_path))
    path = str(tmp_path / "checkpoint-0000010.pt")
    fine = dataclasses.replace(preset("finetune"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert normalisation_mismatch(fine, path) is None
    for change in (dict(mean=(0.5, 0.45, 0.5)), dict(std=(0.25, 0.25, 0.25))):
        msg = normalisation_mismatch(dataclasses.replace(fine, **change), path)
        assert msg and "--mean 0.5,0.5,0.5 --std 0.5,0.5,0.5" in msg, change


def test_init_from_a_hugging_face_model_folder(tmp_path):
    """--init accepts a save_pretrained / hub snapshot folder (model.safetensors preferred over
    pytorch_model.bin); a folder with neither says what it looked for."""
    from beit_fast.train.checkpoint import resolve_checkpoint
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors / pytorch_model.bin"):
        resolve_checkpoint(str(hf), weights_folder=True)
    with pytest.raises(ConfigError, match="init: no checkpoint"):
        C.check(dataclasses.replace(preset("finetune"), init=str(hf), output_dir=str(tmp_path / "ft")))
    (hf / "pytorch_model.bin").write_bytes(b"")
    assert resolve_checkpoint(str(hf), weights_folder=True) == str(hf / "pytorch_model.bin")
    (hf / "model.safetensors").write_bytes(b"")
    assert resolve_checkpoint(str(hf), weights_folder=True) == str(hf / "model.safetensors")
    C.check(dataclasses.replace(preset("finetune"), init=str(hf), output_dir=str(tmp_path / "ft")))
    with pytest.raises(FileNotFoundError, match="no checkpoint-"):
        resolve_checkpoint(str(hf))                # resume / eval want a run's checkpoint


def test_cosine_schedule_matches_unilm_array():
    import numpy as np
    base, final, epochs, niter, warm = 1e-3, 1e-5, 3, 7, 4
    # unilm beit/utils.py cosine_scheduler, written out
    warmup = np.linspace(0, base, warm)
    iters = np.arange(epochs * niter - warm)
    ref = np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])
    ours = [cosine_at(s, base, final, epochs * niter, warm) for s in range(epochs * niter)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)
    sch = Schedule(FinetuneConfig(lr=1e-3, min_lr=1e-5, epochs=3, warmup_epochs=1, weight_decay=0.05), 7)
    assert sch.lr_at(0) == 0.0 and math.isclose(sch.lr_at(6), 1e-3) and sch.wd_at(10) == 0.05


def test_schedule_warmup_steps_and_weight_decay_follow_unilm():
    """Schedule against unilm's cosine_scheduler (beit/utils.py, reference §5.2) written out: the lr warms up
    over warmup_steps when that is >= 0 (0 means no warmup at all, not "use warmup_epochs"), else over
    warmup_epochs; the weight decay runs its own cosine from weight_decay to weight_decay_end with no warmup
    (unilm builds wd_schedule_values with warmup_epochs=0)."""
    import numpy as np

    def unilm(base, final, epochs, niter, warmup_iters):
        warmup = np.linspace(0, base, warmup_iters)
        iters = np.arange(epochs * niter - warmup_iters)
        return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])

    epochs, niter = 4, 5
    cfg = FinetuneConfig(lr=2e-3, min_lr=1e-6, epochs=epochs, warmup_epochs=2, weight_decay=0.04,
                         weight_decay_end=0.4)
    steps = range(epochs * niter)
    for warmup_steps, warmup_iters in ((-1, 2 * niter), (0, 0), (3, 3)):
        sch = Schedule(dataclasses.replace(cfg, warmup_steps=warmup_steps), niter)
        assert sch.warmup_steps == warmup_iters, warmup_steps
        np.testing.assert_allclose([sch.lr_at(s) for s in steps], unilm(2e-3, 1e-6, epochs, niter, warmup_iters),
                                   rtol=1e-12, atol=0, err_msg=f"lr, warmup_steps={warmup_steps}")
        np.testing.assert_allclose([sch.wd_at(s) for s in steps], unilm(0.04, 0.4, epochs, niter, 0),
                                   rtol=1e-12, atol=0, err_msg=f"wd, warmup_steps={warmup_steps}")
    no_warmup = Schedule(dataclasses.replace(cfg, warmup_steps=0), niter)
    assert math.isclose(no_warmup.lr_at(0), 2e-3) and math.isclose(no_warmup.wd_at(0), 0.04)   # full at step 0
    assert math.isclose(no_warmup.wd_at(epochs * niter - 1), 0.4, rel_tol=0.02)
    # weight_decay_end=None: constant weight decay, warmup or not
    const = Schedule(dataclasses.replace(cfg, weight_decay_end=None), niter)
    assert {const.wd_at(s) for s in steps} == {0.04}


def test_apply_schedule_sets_scaled_lr_and_decays_only_decayed_groups():
    """apply_schedule, called every step (reference §5.2: lr_g = lr * lr_scale; wd only for groups with
    wd > 0), on the groups the trainer builds: each group's lr is the step's lr times its layer-decay scale
    (the head at 1, earlier layers smaller), and the groups without decay keep weight_decay 0 however many
    times it is applied; a real AdamW step then leaves a no-decay parameter with a zero gradient unchanged."""
    from beit_fast.train.optim import apply_schedule
    model = beit_fast.create_model("beit_test_patch4_32", use_abs_pos_emb=True)
    depth, decay = len(model.blocks), 0.5
    groups = param_groups(model, 0.05, decay)
    opt = torch.optim.AdamW(groups, lr=1.0, weight_decay=0.05)
    for lr, wd in ((3e-3, 0.05), (1e-3, 0.2), (7e-4, 0.3)):
        apply_schedule(opt, lr, wd)
        for g in opt.param_groups:
            lid = layer_id(g["names"][0], depth)
            assert math.isclose(g["lr"], lr * decay ** (depth + 1 - lid), rel_tol=1e-12), g["names"]
            assert g["weight_decay"] == (wd if g["decayed"] else 0.0), g["names"]
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert math.isclose(lrs["head.weight"], 7e-4) and math.isclose(lrs["cls_token"], 7e-4 * decay ** (depth + 1))
    assert math.isclose(lrs["blocks.0.attn.qkv.weight"], 7e-4 * decay ** depth)
    # a step with zero gradients: only weight decay moves a parameter, and only a decayed one
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.gamma_1", "head.bias"):
        assert torch.equal(after[name], before[name]), name
    w = "blocks.1.mlp.fc1.weight"
    torch.testing.assert_close(after[w], before[w] * (1 - lrs[w] * 0.3), rtol=1e-6, atol=0)


def test_pos_embed_is_never_decayed():
    """Absolute position embeddings (a BeitConfig option, on in the demo presets) are in unilm's
    no_weight_decay() = {pos_embed, cls_token} (reference §1.7) and so excluded under both rules."""
    model = beit_fast.create_model("beit_test_patch4_32", use_abs_pos_emb=True)
    for exclusions in ("all", "unilm"):
        for layer_decay in (None, 0.75):
            groups = param_groups(model, 0.05, layer_decay, exclusions=exclusions)
            no_decay = {n for g in groups if not g["decayed"] for n in g["names"]}
            assert {"pos_embed", "cls_token"} <= no_decay, (exclusions, layer_decay)
            assert all(g["weight_decay"] == 0.0 for g in groups if "pos_embed" in g["names"])


def test_param_groups_decay_and_layer_scales():
    model = beit_fast.create_model("beit_test_patch4_32_mim")
    groups = param_groups(model, 0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    for name in ("cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table", "blocks.0.gamma_1",
                 "blocks.0.norm1.weight", "blocks.0.attn.q_bias", "blocks.1.mlp.fc1.bias", "norm.weight"):
        assert name in no_decay, name
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "lm_head.weight", "patch_embed.proj.weight"} <= decay
    assert len(no_decay) + len(decay) == len(list(model.parameters()))
    # unilm's optimizer factory (reference §1.7): the mask token and the relative position table are decayed,
    # everything else as above
    groups = param_groups(model, 0.05, exclusions="unilm")
    no_decay_unilm = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert no_decay - no_decay_unilm == {"mask_token", "rel_pos_bias.relative_position_bias_table"}
    assert no_decay_unilm <= no_decay and "cls_token" in no_decay_unilm
    per_layer = beit_fast.create_model("beit_test_patch4_32")   # fine-tuning: one table per block
    decayed = {n for g in param_groups(per_layer, 0.05, exclusions="unilm") if g["decayed"] for n in g["names"]}
    assert {f"blocks.{i}.attn.relative_position_bias_table" for i in range(len(per_layer.blocks))} <= decayed
    with pytest.raises(ValueError, match=r"weight_decay_exclusions must be one of \['all', 'unilm'\], got 'timm'"):
        param_groups(model, 0.05, exclusions="timm")
    with pytest.raises(ConfigError, match="weight_decay_exclusions must be one of"):
        C.check(dataclasses.replace(preset("finetune"), weight_decay_exclusions="none"))
    cls = beit_fast.create_model("beit_test_patch4_32")
    depth = len(cls.blocks)
    assert layer_id("patch_embed.proj.weight", depth) == 0 and layer_id("blocks.1.attn.qkv.weight", depth) == 2
    assert layer_id("head.weight", depth) == depth + 1 and layer_id("rel_pos_bias.x", depth) == depth + 1
    scales = {n: g["lr_scale"] for g in param_groups(cls, 0.05, 0.5) for n in g["names"]}
    assert scales["cls_token"] == 0.5 ** 3 and scales["blocks.0.attn.qkv.weight"] == 0.5 ** 2
    assert scales["blocks.1.mlp.fc1.weight"] == 0.5 and scales["head.weight"] == 1.0
    assert sum(len(g["params"]) for g in param_groups(cls, 0.05, 0.5)) == len(list(cls.parameters()))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    from beit_fast.train.checkpoint import atomic_torch_save, save_step_checkpoint, step_checkpoints
    for step in (1, 2, 3, 4):
        save_step_checkpoint({"step": step, "t": torch.ones(2)}, str(tmp_path), step, keep_last=2)
    assert [os.path.basename(p) for p in step_checkpoints(str(tmp_path))] == \
        ["checkpoint-0000003.pt", "checkpoint-0000004.pt"]
    atomic_torch_save({"x": 1}, str(tmp_path / "other.pt"))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, umask):
    """mkstemp creates 0600 files; checkpoints, configs and tokenizers get 0666 less the umask, like open()."""
    from beit_fast.train.checkpoint import atomic_torch_save, atomic_write_bytes
    old = os.umask(umask)
    try:
        atomic_torch_save({"t": torch.ones(3)}, str(tmp_path / "ck.pt"))
        atomic_write_bytes(str(tmp_path / "config.yaml"), b"a: 1\n")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "plain").st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in ("ck.pt", "config.yaml"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == want, name
    assert torch.equal(torch.load(tmp_path / "ck.pt", weights_only=True)["t"], torch.ones(3))


def test_naming_another_model_drops_the_presets_architecture(tmp_path):
    """--model without --preset: the demo preset's architecture changes (width 128, 4 blocks, abs. position
    embeddings) and 16 px images belong to its own model; the named model is built as registered."""
    from beit_fast.train.config import model_fields, resolve
    demo = resolve("finetune")
    assert demo.model_overrides and demo.img_size == 16
    cfg = resolve("finetune", overrides={"model": "beit_base_patch16_224"})
    f = model_fields(cfg)
    assert cfg.model_overrides == {} and cfg.img_size == 224 and (f["embed_dim"], f["depth"]) == (768, 12)
    assert resolve("finetune", overrides={"model": "beit_large_patch16_384"}).img_size == 384
    pre = resolve("pretrain", overrides={"model": "beit_base_patch16_224_8k_vocab"})
    assert pre.model_overrides == {} and pre.img_size == 224 and pre.second_img_size == 0
    # what the user sets alongside is kept
    cfg = resolve("finetune", overrides={"model": "beit_base_patch16_224", "img_size": 256,
                                         "model_overrides.depth": 6})
    assert cfg.img_size == 256 and cfg.model_overrides == {"depth": 6}
    assert resolve("finetune", overrides={"model": demo.model}).model_overrides == demo.model_overrides
    # a model named in a YAML file is followed as one named on the command line
    f = tmp_path / "run.yaml"
    f.write_text("model: beit_base_patch16_224\n")
    cfg = resolve("finetune", yaml_path=str(f))
    assert cfg.model_overrides == {} and cfg.img_size == 224


def test_apex_optimizers_are_built_without_their_own_clipping(monkeypatch):
    """apex is not installable here: a stand-in module records what the trainer passes. FusedLAMB clips at
    max_grad_norm=1.0 by default; the trainer clips itself (clip_grad), so LAMB's clipping must be off."""
    import sys
    import types

    from beit_fast.models import create_model
    from beit_fast.train.config import preset
    from beit_fast.train.optim import build_optimizer
    made = {}

    def recorder(kind):
        def make(groups, **kw):
            made[kind] = kw
            return torch.optim.SGD(groups, lr=kw["lr"])
        return make
    apex = types.ModuleType("apex")
    apex.optimizers = types.SimpleNamespace(FusedAdam=recorder("adam"), FusedLAMB=recorder("lamb"))
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    model = create_model("beit_test_patch4_32")
    for name in ("apex_lamb", "apex_adam"):
        build_optimizer(dataclasses.replace(preset("finetune"), optimizer=name, clip_grad=3.0), model)
    assert made["lamb"]["max_grad_norm"] == float("inf")
    assert made["adam"]["adam_w_mode"] is True and "max_grad_norm" not in made["adam"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_saved_kmeans_tokenizer_sizes_the_tokenizer_view(tmp_path, suffix):
    """A k-means tokenizer file fit with 4 px patches, named in a config whose tokenizer_patch says 8: the
    view is sized from the file (4 px per code), and a view size that does not fit is refused by check()."""
    from beit_fast.train.config import ConfigError, check, tokenizer_downsample
    from beit_fast.train.tokenizer import KMeansTokenizer
    path = str(tmp_path / f"kmeans{suffix}")
    KMeansTokenizer(torch.rand(16, 48), torch.zeros(48), torch.ones(48), 4, 3).save(path)
    cfg = dataclasses.replace(preset("pretrain"), output_dir=str(tmp_path / "run"), tokenizer_path=path,
                              tokenizer_patch=8, second_img_size=0)
    assert tokenizer_downsample(cfg) == 4
    check(cfg)
    with pytest.raises(ConfigError, match=r"one code per 4px, so a 4x4 patch grid needs a 16px view"):
        check(dataclasses.replace(cfg, second_img_size=32))
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="is not a k-means tokenizer file"):
        check(dataclasses.replace(cfg, tokenizer_path=str(tmp_path / "other.pt")))


def _gpus(monkeypatch, count):
    """Stand in for a machine with `count` GPUs (only torch.cuda's device queries are answered)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cuda_device_checks(monkeypatch):
    cfg = preset("finetune")
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    for ok in ("cuda", "cuda:1", "auto"):
        C.check(dataclasses.replace(cfg, device=ok))
    with pytest.raises(ConfigError, match=r"device='cuda:2' but this machine has 2 GPU\(s\): cuda:0 \.\. cuda:1"):
        C.check(dataclasses.replace(cfg, device="cuda:2"))
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'cuda1'"):
        C.check(dataclasses.replace(cfg, device="cuda1"))
    monkeypatch.setenv("WORLD_SIZE", "2")   # under torchrun an explicit GPU would be every process's GPU
    with pytest.raises(ConfigError, match="device='cuda:0' would put every torchrun process on the same GPU"):
        C.check(dataclasses.replace(cfg, device="cuda:0"))
    C.check(dataclasses.replace(cfg, device="cuda"))
    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        C.check(dataclasses.replace(cfg, device="cuda"))
    for bad in ("cuda:", "cuda:x", "gpu", "cuda1"):   # the format is checked first, with or without a GPU
        with pytest.raises(ConfigError, match=f"device must be auto, cpu, cuda or cuda:N, got '{bad}'"):
            C.check(dataclasses.replace(cfg, device=bad))


def test_each_process_takes_its_own_gpu(monkeypatch):
    from beit_fast.train.runtime import pick_device
    _gpus(monkeypatch, 4)
    assert [pick_device("cuda", r) for r in range(4)] == [torch.device(f"cuda:{r}") for r in range(4)]
    assert pick_device("cuda:2", 0) == torch.device("cuda:2")
    with pytest.raises(RuntimeError, match="local rank 4 has no GPU of its own: this process sees 4 GPUs"):
        pick_device("cuda", 4)
    _gpus(monkeypatch, 1)   # one GPU per process (the launcher set CUDA_VISIBLE_DEVICES per task)
    assert pick_device("cuda", 3) == torch.device("cuda:0")
    assert pick_device("cpu", 3) == torch.device("cpu")


@pytest.mark.parametrize("backend,failed,destroyed,at_exit", [
    ("nccl", False, False, True), ("nccl", True, False, False), ("gloo", True, True, True),
    ("gloo", False, False, True)])
def test_a_failed_rank_does_not_wait_on_nccl_shutdown(monkeypatch, backend, failed, destroyed, at_exit):
    """A finished run keeps the group (the next run in the process reuses it; destroyed at exit or by the CLI
    before its os._exit); a failed rank leaves a gloo group at once and an NCCL group never, not at exit
    either (NCCL's shutdown would wait for the peers' collectives)."""
    import torch.distributed as dist

    from beit_fast.train import runtime
    calls = []
    monkeypatch.setattr(runtime, "_LEAVE_AT_EXIT", [True])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    runtime.teardown(runtime.Runtime(torch.device("cpu"), rank=1, world=2, owns_group=True), failed=failed)
    assert calls == ([] if failed else ["barrier"]) + (["destroy"] if destroyed else [])
    calls.clear()
    runtime.leave_group()   # what atexit (or the CLI) does at the end
    assert calls == (["destroy"] if at_exit else [])


@pytest.mark.parametrize("mode, passed", [("default", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_mode_reaches_torch_compile(monkeypatch, mode, passed):
    from beit_fast.train import engine, runtime
    seen = []
    monkeypatch.setattr(engine.torch, "compile", lambda model, **kw: seen.append(kw) or model)
    cfg = C.check(dataclasses.replace(preset("finetune"), compile=True, compile_mode=mode, device="cpu"))
    rt = runtime.Runtime(torch.device("cpu"))
    model = beit_fast.create_model("beit_test_patch4_32")
    engine.training_state(cfg, rt, model)
    assert seen == [{"mode": passed}]


def test_bad_compile_mode_is_refused():
    with pytest.raises(ConfigError, match=r"compile_mode must be one of \['default', 'reduce-overhead'"):
        C.check(dataclasses.replace(preset("finetune"), compile_mode="fast"))


# --- the BEiT recipes' optimiser settings and the optimizer the trainer builds from them ------------------------

def test_presets_carry_unilms_optimiser_settings():
    """The settings the BEiT presets take from unilm's scripts and README commands besides the reference
    table's columns (reference §5.1 and §6.1 "always-on defaults"): AdamW with betas (0.9, 0.999) and eps 1e-8,
    a constant weight decay (weight_decay_end None: unilm sets it to weight_decay), min_lr 1e-5 for pretraining
    and 1e-6 for fine-tuning, clipping at 3.0 in pretraining only, label smoothing 0.1, timm Mixup with
    mixup_prob 1.0 / switch 0.5 / batch mode, EMA off (decay 0.9999 when turned on)."""
    for name in ("beit_base_224", "beit_large_224", "beit_base_224_in22k", "beit_large_224_in22k"):
        p = preset("pretrain", name)
        assert (p.optimizer, p.lr, p.min_lr, p.weight_decay, p.weight_decay_end, p.betas, p.eps, p.clip_grad,
                p.drop_path, p.batch_size, p.accum_steps) == \
            ("adamw", 1.5e-3, 1e-5, 0.05, None, (0.9, 0.999), 1e-8, 3.0, 0.1, 128, 1), name
    for name in ("beit_base_224", "beit_large_224", "beit_base_224_ft22k", "beit_large_224_ft22k"):
        f = preset("finetune", name)
        assert (f.optimizer, f.min_lr, f.weight_decay_end, f.betas, f.eps, f.clip_grad, f.smoothing) == \
            ("adamw", 1e-6, None, (0.9, 0.999), 1e-8, None, 0.1), name
        assert (f.mixup_prob, f.mixup_switch_prob, f.mixup_mode, f.ema, f.ema_decay) == \
            (1.0, 0.5, "batch", False, 0.9999), name
        assert (f.auto_augment, f.re_prob, f.color_jitter, f.crop_pct) == ("rand-m9-mstd0.5-inc1", 0.25, 0.4, None), name


def test_a_one_step_warmup_is_unilms_linspace():
    """unilm's warmup is np.linspace(0, lr, warmup_iters): one warmup step is [0.0], the start value, not lr."""
    import numpy as np
    epochs, niter = 2, 5
    cfg = FinetuneConfig(lr=2e-3, min_lr=1e-6, epochs=epochs, warmup_steps=1, weight_decay=0.05)
    sch = Schedule(cfg, niter)
    iters = np.arange(epochs * niter - 1)
    ref = np.concatenate([np.linspace(0, 2e-3, 1),
                          1e-6 + 0.5 * (2e-3 - 1e-6) * (1 + np.cos(np.pi * iters / len(iters)))])
    np.testing.assert_allclose([sch.lr_at(s) for s in range(epochs * niter)], ref, rtol=1e-12, atol=0)
    assert sch.lr_at(0) == 0.0


def test_the_optimizer_takes_the_configs_betas_and_eps():
    """betas and eps reach every param group of the AdamW the trainer builds (e.g. BEiT v2's 300-epoch recipe
    uses betas (0.9, 0.98)); torch's defaults equal the presets' values, so only other values tell."""
    from beit_fast.train.optim import build_optimizer
    model = beit_fast.create_model("beit_test_patch4_32")
    cfg = dataclasses.replace(preset("finetune"), betas=(0.8, 0.98), eps=1e-6, weight_decay=0.07)
    opt = build_optimizer(cfg, model, layer_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW)
    assert {(tuple(g["betas"]), g["eps"]) for g in opt.param_groups} == {((0.8, 0.98), 1e-6)}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.07}


@pytest.mark.parametrize("kind, overrides, message", [
    ("finetune", {"img_size": 32}, r"model_overrides.img_size=32 differs from img_size \(16\).*set img_size instead"),
    ("pretrain", {"img_size": 32}, r"model_overrides.img_size=32 differs from img_size \(16\)"),
    ("finetune", {"num_classes": 5}, r"model_overrides.num_classes=5 differs from num_classes \(10\)"),
    ("finetune", {"in_chans": 1}, r"model_overrides.in_chans=1 differs from the data's RGB images \(3\)"),
    ("pretrain", {"vocab_size": 32}, r"model_overrides.vocab_size=32 differs from the tokenizer's 64 codes"),
])
def test_model_overrides_of_what_the_run_sets_itself_are_refused(tmp_path, kind, overrides, message):
    """build_model applies model_overrides last: a model for 32 px images fed the 16 px data, a 5-class head on
    10 classes, 1-channel patches on RGB images, a vocabulary other than the tokenizer's all passed check() and
    failed at the first step (pretraining: after the tokenizer was fitted; and the log.jsonl left behind made
    the folder refuse a new run). The run's own values pass."""
    cfg = dataclasses.replace(preset(kind), output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        C.check(dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, **overrides}), values_only=True)
    same = {k: {"in_chans": 3, "vocab_size": cfg.__dict__.get("tokenizer_vocab")}.get(k, getattr(cfg, k, None))
            for k in overrides}
    C.check(dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, **same}))
