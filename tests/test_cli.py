"""The `beit-fast` command line: parsing, overrides, errors, bench, info, fit-tokenizer."""
import argparse
import subprocess
import sys

import pytest
import yaml

import beit_fast
from beit_fast.cli import main


def test_print_config_applies_preset_yaml_set_and_flags(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.5\n")
    assert main(["finetune", "--preset", "beit_base_224", "--config", str(f), "--set", "lr=1e-4",
                 "--betas", "0.9,0.98", "--init", "x.pth", "--compile", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["preset"] == "beit_base_224" and cfg["layer_decay"] == 0.65
    assert cfg["epochs"] == 7 and cfg["lr"] == 1e-4 and cfg["betas"] == [0.9, 0.98]
    assert cfg["init"] == "x.pth" and cfg["compile"] is True
    assert main(["pretrain", "--resume", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["resume"] == "auto"


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["pretrain", "--preset", "nope"]) == 2
    assert "unknown pretrain preset 'nope'" in capsys.readouterr().err
    assert main(["pretrain", "--set", "epochz=3"]) == 2
    assert "did you mean epochs" in capsys.readouterr().err
    assert main(["finetune", "--dataset", "folder", "--data-path", str(tmp_path)]) == 2
    assert "no images in" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fit-tokenizer", "--dataset", "folder", "--data-path", str(tmp_path)]) == 2
    assert "no images in" in capsys.readouterr().err
    assert main(["fit-tokenizer", "--dataset", "folder"]) == 2
    assert "data_path" in capsys.readouterr().err


def test_flags_keep_text_as_written_and_split_only_tuples(capsys):
    """A text flag is the text given (a comma in a path, `yes`, `0755`); tuple flags split on commas."""
    assert main(["pretrain", "--output-dir", "runs/lr1e-3,wd0.05", "--data-path", "yes",
                 "--tokenizer-path", "0755", "--mean", "0.5,0.5,0.5", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["output_dir"] == "runs/lr1e-3,wd0.05" and cfg["data_path"] == "yes"
    assert cfg["tokenizer_path"] == "0755" and cfg["mean"] == [0.5, 0.5, 0.5]
    assert main(["finetune", "--auto-augment", "none", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["auto_augment"] is None


def _printed_config(argv, capsys) -> dict:
    assert main(argv + ["--print-config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_set_keeps_text_and_model_overrides_merge_in_any_order(capsys):
    """--set gives text fields the text written, as flags do; --model-overrides merges into the preset's
    mapping and comes before the dotted --set keys wherever it stands; null clears it."""
    cfg = _printed_config(["pretrain", "--set", "output_dir=0755", "--set", "data_path=12:30"], capsys)
    assert (cfg["output_dir"], cfg["data_path"]) == ("0755", "12:30")
    cfg = _printed_config(["pretrain", "--set", "model_overrides.num_heads=8", "--model-overrides", "{depth: 3}"],
                          capsys)
    assert cfg["model_overrides"] == {"embed_dim": 128, "depth": 3, "num_heads": 8, "use_abs_pos_emb": True}
    cfg = _printed_config(["pretrain", "--model-overrides", "null", "--set", "model_overrides.depth=2"], capsys)
    assert cfg["model_overrides"] == {"depth": 2}


def test_flags_beat_set_beats_yaml_and_betas_take_a_yaml_list(tmp_path, capsys):
    """Precedence (module docstring, README): preset < --config < --set < flag, whatever their order on the
    line; a tuple flag also takes YAML's list form ("[0.9,0.98]", not split at its comma)."""
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\nepochs: 3\nweight_decay: 0.2\n")
    for argv in (["--set", "lr=1e-4", "--lr", "2e-4"], ["--lr", "2e-4", "--set", "lr=1e-4"]):
        assert main(["finetune", "--config", str(f), *argv, "--set", "epochs=4", "--print-config"]) == 0
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert (cfg["lr"], cfg["epochs"], cfg["weight_decay"]) == (2e-4, 4, 0.2), (argv, cfg)
    assert main(["finetune", "--betas", "[0.9,0.98]", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["betas"] == [0.9, 0.98]
    f.write_text("preset: beit_large_224\n")
    for argv in (["--preset", "demo", "--set", "preset=beit_base_224"], ["--set", "preset=beit_base_224"]):
        assert main(["finetune", "--config", str(f), *argv, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["preset"] == argv[1].replace("preset=", ""), argv


def test_bare_fused_means_true(capsys):
    assert _printed_config(["pretrain", "--fused"], capsys)["fused"] is True
    assert _printed_config(["pretrain", "--fused", "none"], capsys)["fused"] is None


def test_help_states_what_a_command_runs_with_no_arguments(capsys):
    """The defaults shown are the default preset's (the demo for pretrain and finetune), and the flags that
    take no value say what they then mean."""
    from beit_fast.cli import build_parser
    from beit_fast.train import config as C
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {kind: {a.dest[6:]: a.help for a in commands.choices[kind]._actions if a.dest.startswith("field:")}
             for kind in commands.choices if kind in C.PRESETS}
    for kind, source in (("pretrain", "demo preset:"), ("finetune", "demo preset:"), ("eval", "default"),
                         ("fit-tokenizer", "default")):
        runs = C.preset(kind)
        for name, text in helps[kind].items():
            assert text.startswith(f"({source} {getattr(runs, name)!r}"), (kind, name, text)
    pretrain = helps["pretrain"]
    assert "bare --resume: auto" in pretrain["resume"] and "bare --compile: true" in pretrain["compile"]
    assert "null or {} clears it" in pretrain["model_overrides"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert "bench run a benchmark script: bench/bench_<name>.py of a checkout, or the copy installed" in listing


def test_print_config_checks_the_values(capsys):
    """--print-config refuses what the run would refuse for its values; the files it names are not looked at."""
    assert main(["pretrain", "--compile-mode", "max", "--print-config"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "compile_mode must be one of" in out.err
    assert _printed_config(["pretrain", "--tokenizer-path", "nowhere.safetensors"], capsys)["tokenizer_path"] == \
        "nowhere.safetensors"
    from beit_fast.train.config import list_presets
    for kind in ("pretrain", "finetune"):   # every preset shows (the reference's pretraining needs a dVAE file)
        for name in list_presets(kind):
            assert _printed_config([kind, "--preset", name], capsys)["preset"] == name


def test_eval_of_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    for name, content in (("text.pt", b"hello\n"), ("config.yaml", b"a: 1\n"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(content)
        assert main(["eval", "--checkpoint", str(tmp_path / name)]) == 2
        assert f"{tmp_path / name} is not a beit_fast checkpoint (" in capsys.readouterr().err


def test_fit_tokenizer_refuses_before_fitting(tmp_path, monkeypatch, capsys):
    """Too few patches for the codes, or an output that is a folder, fail before any patch is collected."""
    from beit_fast.train import tokenizer_fitting
    monkeypatch.setattr(tokenizer_fitting, "collect_patches", lambda *a, **k: pytest.fail("work started"))
    assert main(["fit-tokenizer", "--max-images", "2", "--output", str(tmp_path / "t.safetensors")]) == 2
    assert "vocab_size=512 needs at least 512 patches to fit k-means, but 2 images x 64 patches" in \
        capsys.readouterr().err
    assert main(["fit-tokenizer", "--output", str(tmp_path)]) == 2
    assert "is a folder; name the file to write" in capsys.readouterr().err
    # under torchrun every process would fit the same k-means: refused, naming the way that works
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["fit-tokenizer", "--output", str(tmp_path / "t.safetensors")]) == 2
    assert "fit-tokenizer runs in one process, but WORLD_SIZE=2 (torchrun)" in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(tokenizer_fitting, "collect_patches", lambda *a, **k: pytest.fail("work started (1 process)"))
    with pytest.raises(pytest.fail.Exception, match=r"work started \(1 process\)"):
        main(["fit-tokenizer", "--output", str(tmp_path / "t.safetensors")])


def test_user_errors_are_messages_before_any_work(tmp_path, capsys):
    """Values the run would trip over deep inside (a transform, the sampler, the model, YAML syntax) fail in
    the config check with a message and exit status 2, before a tokenizer is fitted or a folder written."""
    out = str(tmp_path / "run")
    cases = [
        (["pretrain", "--train-subset", "10"], "fewer than one optimizer step needs"),
        (["pretrain", "--set", "mean=0.5,0.5"], "mean must be 3 numbers"),
        (["pretrain", "--set", "crop_ratio=[3/4,4/3]"], "crop_ratio must be 2 numbers"),
        (["pretrain", "--set", "crop_scale=0.9,0.2"], "min <= max"),
        (["pretrain", "--set", "interpolation=cubic"], "interpolation must be one of"),
        (["pretrain", "--set", "second_interpolation=area"], "second_interpolation must be one of"),
        (["pretrain", "--set", "model_overrides.num_heads=3"], "num_heads"),
        (["pretrain", "--num-workers", "-1"], "num_workers must be >= 0"),
        (["pretrain", "--set", "betas=[0.9"], "not a valid YAML value"),
        (["pretrain", "--lr", "[1"], "--lr: '[1' is not a valid YAML value"),
        (["eval", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
        (["eval", "--batch-size", "0"], "batch_size must be >= 1"),
        (["eval", "--set", "model_overrides.depth=2"], "unknown EvalConfig field 'model_overrides.depth'"),
        (["fit-tokenizer", "--device", "gpu"], "device must be"),
        (["fit-tokenizer", "--max-images", "0"], "max_images must be >= 1"),
        (["fit-tokenizer", "--vocab-size", "0"], "vocab_size must be >= 1"),
    ]
    for argv, message in cases:
        flags = ["--output-dir", out] if argv[0] == "pretrain" else ["--output", out + ".st"] \
            if argv[0] == "fit-tokenizer" else []
        assert main(argv + flags) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    assert main(["pretrain", "--config", str(bad), "--output-dir", out]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_init_of_another_model_size_is_a_message(tmp_path, capsys):
    """--init with a checkpoint of another architecture (here the bare beit_test model's 2 heads against the
    demo preset's 4) exits 2 naming the heads and the model overrides (it was a traceback)."""
    import torch
    from beit_fast.models import create_model
    ckpt = tmp_path / "other.pth"
    torch.save(create_model("beit_test_patch4_32").state_dict(), ckpt)
    assert main(["finetune", "--init", str(ckpt), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--init {ckpt}" in err and "for 2 attention heads" in err and "for 4" in err, err
    assert "--model-overrides null" in err, err
    assert not (tmp_path / "run").exists()   # refused before the run folder is made


def test_list_presets(capsys):
    assert main(["pretrain", "--list-presets"]) == 0
    assert {"demo", "beit_base_224", "beit_large_224"} <= set(capsys.readouterr().out.split())


def test_bench_lists_and_explains_a_missing_folder(tmp_path, monkeypatch, capsys):
    assert main(["bench"]) == 0
    assert "benchmarks in" in capsys.readouterr().out
    from beit_fast.train import bench                # the Python API of `beit-fast bench`
    assert bench() == 0 and "attention" in capsys.readouterr().out
    assert bench("no_such_thing") == 2 and "no bench/bench_no_such_thing.py" in capsys.readouterr().err
    assert main(["bench", "no_such_thing"]) == 2
    # an installed (non-editable) package: the scripts come as beit_fast/bench, run from the caller's directory
    pkg = tmp_path / "site-packages" / "beit_fast"
    monkeypatch.setattr(beit_fast, "__file__", str(pkg / "__init__.py"))
    assert main(["bench", "attention"]) == 2
    assert "no benchmark scripts found" in capsys.readouterr().err
    (pkg / "bench").mkdir(parents=True)
    (pkg / "bench" / "common.py").write_text("")
    (pkg / "bench" / "bench_echo.py").write_text("import os, sys\nprint('ran', sys.argv[1:], os.getcwd())\n")
    monkeypatch.chdir(tmp_path)
    assert main(["bench"]) == 0 and "echo" in capsys.readouterr().out
    code = (f"import beit_fast; beit_fast.__file__ = {str(pkg / '__init__.py')!r}; "
            "from beit_fast.train import bench; raise SystemExit(bench('echo', '--x'))")
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and f"ran ['--x'] {tmp_path}" in proc.stdout, proc.stderr


def test_info_runs(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_fit_tokenizer_command(tmp_path, capsys):
    out = tmp_path / "tok.safetensors"
    assert main(["fit-tokenizer", "--output", str(out), "--img-size", "16", "--patch-size", "4",
                 "--vocab-size", "16", "--max-images", "64", "--iters", "3", "--num-workers", "0"]) == 0
    from beit_fast.train.tokenizer import load_tokenizer
    tok = load_tokenizer("kmeans", str(out))
    assert tok.vocab_size == 16 and tok.patch_size == 4
    # an existing tokenizer (a pretraining run's targets) is replaced only when asked
    again = ["fit-tokenizer", "--output", str(out), "--img-size", "16", "--patch-size", "4", "--vocab-size", "8",
             "--max-images", "64", "--iters", "3", "--num-workers", "0"]
    assert main(again) == 2 and "exists" in capsys.readouterr().err
    assert load_tokenizer("kmeans", str(out)).vocab_size == 16
    assert main(again + ["--overwrite"]) == 0 and load_tokenizer("kmeans", str(out)).vocab_size == 8


def test_a_tokenizer_file_that_does_not_load_is_a_config_error(tmp_path, capsys):
    """A DALL-E encoder file the loader refuses (here not a pickle at all) ends the run with the CLI's error
    message naming it, not a traceback."""
    bogus = tmp_path / "encoder.pkl"
    bogus.write_bytes(b"not a pickle")
    rc = main(["pretrain", "--tokenizer", "dvae", "--tokenizer-path", str(bogus), "--output-dir", str(tmp_path / "run"),
               "--second-img-size", "32", "--epochs", "1", "--train-subset", "64", "--num-workers", "0",
               "--progress", "false", "--tensorboard", "false", "--device", "cpu"])
    assert rc == 2 and f"tokenizer=dvae: cannot load {str(bogus)!r}" in capsys.readouterr().err


def test_a_kmeans_tokenizer_path_that_is_not_a_tokenizer_is_a_short_message(tmp_path, capsys):
    """A pickled module (a DALL-E encoder.pkl given as --tokenizer kmeans) or a file that is not a torch file at
    all: the message says it is not a k-means tokenizer file, without torch's advice to load it with
    weights_only=False (which would run the pickle's code)."""
    import torch
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    for name in ("module.pt", "garbage.pt"):
        rc = main(["pretrain", "--tokenizer", "kmeans", "--tokenizer-path", str(tmp_path / name),
                   "--output-dir", str(tmp_path / "run"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and f"{tmp_path / name} is not a k-means tokenizer file (UnpicklingError" in err, err
        assert "weights_only" not in err and "fit-tokenizer" in err, err


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "beit_fast.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for cmd in ("pretrain", "finetune", "eval", "fit-tokenizer", "bench", "info"):
        assert cmd in proc.stdout


def test_a_value_of_another_type_is_refused_never_converted(capsys):
    """A bool is not a number (--epochs true, --lr false), a fraction is not a count (--batch-size 3.5), an
    empty value is not null (--clip-grad '' would turn clipping off), and a number written 1e-1 in a tuple is a
    number (YAML 1.1 reads it as text); every YAML spelling of a bool means what it says, quoted too."""
    for argv, message in ((["--epochs", "true"], "epochs: expected int, got True"),
                          (["--lr", "false"], "lr: expected float, got False"),
                          (["--batch-size", "3.5"], "batch_size: expected int, got 3.5"),
                          (["--clip-grad", ""], "clip_grad: expected float, got ''")):
        assert main(["finetune", *argv, "--print-config"]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert _printed_config(["finetune", "--epochs", "3.0"], capsys)["epochs"] == 3
    for spelling, value in (("on", True), ("yes", True), ("1", True), ("off", False), ("no", False), ("0", False)):
        assert _printed_config(["finetune", "--compile", spelling], capsys)["compile"] is value, spelling
        assert _printed_config(["finetune", "--set", f"ema='{spelling}'"], capsys)["ema"] is value, spelling
    cfg = _printed_config(["finetune", "--std", "5e-1,0.25,1e-1", "--set", "betas=0.9,9.8e-1"], capsys)
    assert (cfg["std"], cfg["betas"]) == ([0.5, 0.25, 0.1], [0.9, 0.98])


def test_set_takes_everything_after_the_first_equals_and_dashed_names(tmp_path, capsys):
    """--set output_dir=runs/lr=1e-3 keeps the whole path; field names may be written with dashes, as their
    flags are (--set output-dir=..., a YAML file's keys too); --set without '=' is a message."""
    cfg = _printed_config(["finetune", "--set", "output_dir=runs/lr=1e-3", "--set", "init=a=b.pth"], capsys)
    assert (cfg["output_dir"], cfg["init"]) == ("runs/lr=1e-3", "a=b.pth")
    assert _printed_config(["finetune", "--set", "init='x.pth"], capsys)["init"] == "'x.pth"   # not in quotes
    cfg = _printed_config(["finetune", "--set", "output-dir=0755", "--set", "eval-batch-size=32"], capsys)
    assert (cfg["output_dir"], cfg["eval_batch_size"]) == ("0755", 32)
    f = tmp_path / "c.yaml"
    f.write_text("warmup-epochs: 3\nlayer-decay: 0.5\n")
    cfg = _printed_config(["finetune", "--config", str(f)], capsys)
    assert (cfg["warmup_epochs"], cfg["layer_decay"]) == (3.0, 0.5)
    assert main(["finetune", "--set", "lr", "--print-config"]) == 2
    assert "--set expects key=value, got 'lr'" in capsys.readouterr().err


def test_config_files_that_cannot_be_used_are_messages(tmp_path, capsys):
    """A missing file, a file that is not a mapping, another kind's saved config.yaml: exit 2 naming the file;
    an empty file (or one of comments only) changes nothing."""
    f = tmp_path / "c.yaml"
    for text in ("", "# nothing set yet\n"):
        f.write_text(text)
        assert _printed_config(["finetune", "--config", str(f)], capsys) == _printed_config(["finetune"], capsys)
    assert main(["finetune", "--config", str(tmp_path / "none.yaml"), "--print-config"]) == 2
    assert f"config file {str(tmp_path / 'none.yaml')!r} does not exist" in capsys.readouterr().err
    for text in ("- lr: 0.1\n", "just text\n"):
        f.write_text(text)
        assert main(["finetune", "--config", str(f), "--print-config"]) == 2, text
        assert "must hold a mapping of field: value" in capsys.readouterr().err, text
    from beit_fast.train import config as C
    C.save(C.preset("pretrain"), str(tmp_path))
    assert main(["finetune", "--config", str(tmp_path / "config.yaml"), "--print-config"]) == 2
    assert "holds a PretrainConfig, not a FinetuneConfig" in capsys.readouterr().err


def test_entry_leaves_a_torchrun_group_only_after_a_successful_run(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) the process leaves through os._exit with main's status, destroying the
    process group first only when the run succeeded; a single process exits through sys.exit."""
    import os

    from beit_fast import cli
    from beit_fast.train import runtime
    left, exits = [], []

    def fake_exit(rc):
        exits.append(rc)
        raise SystemExit(rc)
    monkeypatch.setattr(runtime, "leave_group", lambda: left.append(True))
    monkeypatch.setattr(os, "_exit", fake_exit)
    for world, rc, want_left, want_exits in (("2", 0, [True], [0]), ("2", 2, [], [2]), ("1", 0, [], [])):
        left.clear(), exits.clear()
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setattr(cli, "main", lambda rc=rc: rc)
        with pytest.raises(SystemExit) as e:
            cli.entry()
        assert (e.value.code, left, exits) == (rc, want_left, want_exits), (world, rc)


def test_what_would_fail_after_the_work_is_refused_before_it(tmp_path, monkeypatch, capsys):
    """An output that names no file (fit-tokenizer wrote it only after fitting: the fit was lost), an empty
    output_dir, a model_overrides field the run sets itself, a YAML key that YAML read as a bool or number:
    exit 2 with a message (they were tracebacks), before any work."""
    from beit_fast.train import tokenizer_fitting
    monkeypatch.setattr(tokenizer_fitting, "collect_patches", lambda *a, **k: pytest.fail("work started"))
    for output in ("", str(tmp_path / "tokenizers") + "/"):
        assert main(["fit-tokenizer", "--output", output]) == 2, output
        assert "names no file; name the file to write" in capsys.readouterr().err, output
    for kind in ("pretrain", "finetune"):
        assert main([kind, "--output-dir", ""]) == 2, kind
        assert "output_dir is empty" in capsys.readouterr().err, kind
    out = tmp_path / "run"
    assert main(["finetune", "--set", "model_overrides.img_size=32", "--output-dir", str(out)]) == 2
    assert "model_overrides.img_size=32 differs from img_size (16)" in capsys.readouterr().err
    assert not out.exists()
    f = tmp_path / "c.yaml"
    for text, key in (("yes: 1\n", "True"), ("1: 2\n", "1")):
        f.write_text(text)
        assert main(["finetune", "--config", str(f), "--print-config"]) == 2, text
        assert f"{key} is not a field name; quote the key" in capsys.readouterr().err, text


def test_a_yaml_key_given_twice_is_refused(tmp_path, capsys):
    """safe_load keeps the last of two equal keys silently: a second `lr:` further down a file (or a nested
    model_overrides key, or one inside a --set mapping) would quietly win. Each is an error naming the key."""
    f = tmp_path / "c.yaml"
    for text, key in (("lr: 1.0e-3\nepochs: 2\nlr: 5.0e-4\n", "lr"), ("model_overrides:\n  depth: 2\n  depth: 3\n",
                                                                          "depth")):
        f.write_text(text)
        assert main(["finetune", "--config", str(f), "--print-config"]) == 2, text
        assert f"found key '{key}' twice" in capsys.readouterr().err, text
    assert main(["finetune", "--set", "model_overrides={depth: 2, depth: 3}", "--print-config"]) == 2
    assert "found key 'depth' twice" in capsys.readouterr().err
    f.write_text("lr: 1.0e-3\nmodel_overrides: {depth: 2}\n")     # equal keys in different mappings are fine
    assert main(["finetune", "--config", str(f), "--print-config"]) == 0
    assert "lr: 0.001" in capsys.readouterr().out


def test_a_yaml_file_that_is_not_a_mapping_is_refused_and_an_empty_one_changes_nothing(tmp_path, capsys):
    """`[]` or `0` is not a mapping of field: value (it was taken as an empty file); an empty file, or one of
    comments only, changes nothing."""
    f = tmp_path / "c.yaml"
    for text, shown in (("[]\n", "list []"), ("0\n", "int 0")):
        f.write_text(text)
        assert main(["finetune", "--config", str(f), "--print-config"]) == 2, text
        assert f"must hold a mapping of field: value, not {shown}" in capsys.readouterr().err, text
    for text in ("", "# nothing yet\n"):
        f.write_text(text)
        assert main(["finetune", "--config", str(f), "--print-config"]) == 0, text
        capsys.readouterr()
    assert main(["finetune", "--print-config"]) == 0
    default = capsys.readouterr().out.split("\n", 1)[1]
    f.write_text("")
    main(["finetune", "--config", str(f), "--print-config"])
    assert capsys.readouterr().out.split("\n", 1)[1] == default
