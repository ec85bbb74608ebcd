"""Two gloo processes under torchrun (the real CLI), with DDP and with FSDP, match one process with the same
global batch; an FSDP run stopped and resumed matches one that never stopped."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from beit_fast.train.config import fsdp_runs_on_cpu


ARGS = ["finetune", "--img-size", "16", "--model-overrides", "{embed_dim: 32, depth: 2, num_heads: 2}",
        "--train-subset", "64", "--epochs", "1", "--warmup-epochs", "0.5", "--num-workers", "0",
        "--progress", "false", "--log-every", "1", "--drop-path", "0", "--eval-batch-size", "90",
        "--tensorboard", "false", "--device", "cpu"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # own session: a hang is cleaned up with torchrun's workers, not just torchrun
    proc = subprocess.Popen(cmd + ["--output-dir", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill them by ancestry, then torchrun's group
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError("timed out:\n" + stdout[-2000:] + stderr[-3000:]) from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    evals = [r["eval"] for r in rows if "eval" in r]
    return [r["loss"] for r in rows if "eval" not in r], evals[-1] if evals else None


def _descendants(root: int) -> list:
    """PIDs of every live process descended from `root` (Linux /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _torchrun():
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "beit_fast.cli"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run every two-process run is compared with."""
    return _run([sys.executable, "-m", "beit_fast.cli"] + ARGS + ["--batch-size", "16"],
                tmp_path_factory.mktemp("one"))


def _assert_matches(single, run):
    (a_losses, a_eval), (b_losses, b_eval) = single, run
    assert len(a_losses) == len(b_losses) == 4
    for a, b in zip(a_losses, b_losses):   # same images per global batch; only the float reduction order differs
        assert abs(a - b) <= 1e-4 * abs(a), (a_losses, b_losses)
    assert a_eval["n"] == b_eval["n"] == 360 and abs(a_eval["top1"] - b_eval["top1"]) <= 100 / 360 + 1e-9


def test_two_process_gloo_ddp_matches_single_process(tmp_path, single):
    _assert_matches(single, _run(_torchrun() + ARGS + ["--batch-size", "8"], tmp_path))
    # rank 0 alone wrote the log and the checkpoints
    assert sum(1 for r in open(tmp_path / "log.jsonl") if '"eval"' not in r) == 4
    assert os.path.isfile(tmp_path / "checkpoint-0000004.pt")


needs_cpu_fsdp = pytest.mark.skipif(not fsdp_runs_on_cpu(), reason="this torch's FSDP cannot run on the CPU")


@needs_cpu_fsdp
@pytest.mark.parametrize("fused", ["false", "true"])
def test_two_process_gloo_fsdp_matches_single_process(tmp_path, single, fused):
    fsdp = ARGS + ["--batch-size", "8", "--distributed", "fsdp", "--fused", fused]
    _assert_matches(single, _run(_torchrun() + fsdp, tmp_path))
    # the checkpoint holds full (unsharded) tensors under the model's own names: it loads into a plain model
    from beit_fast.models import BeitConfig, build_model
    from beit_fast.train.checkpoint import load
    state = load(str(tmp_path / "checkpoint-0000004.pt"))
    assert state["sharded"] is True and state["world"] == 2
    model = build_model(BeitConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    assert set(state["optimizer"]["state"]) == {n for n, _ in model.named_parameters()}


@needs_cpu_fsdp
def test_fsdp_stop_and_resume_matches_uninterrupted(tmp_path):
    # 359 held-out images in batches of 2 x 179: the last global batch holds one image, so rank 1 has none;
    # FSDP's forwards are collectives, and that rank must still run one (a deadlock otherwise)
    fsdp = ARGS + ["--batch-size", "8", "--distributed", "fsdp", "--fused", "true", "--val-subset", "359",
                   "--eval-batch-size", "179"]
    whole, whole_eval = _run(_torchrun() + fsdp, tmp_path / "whole")
    assert whole_eval["n"] == 359
    _run(_torchrun() + fsdp + ["--stop-at-step", "2"], tmp_path / "parts")
    resumed, _ = _run(_torchrun() + fsdp + ["--resume"], tmp_path / "parts")
    assert len(whole) == 4 and resumed == whole, (whole, resumed)   # the log holds steps 1-2, then 3-4: exact
    # a sharded checkpoint is not resumed by an unsharded (DDP) run: a clear error, before any training
    cmd = _torchrun() + ARGS + ["--batch-size", "8", "--resume", str(tmp_path / "parts" / "checkpoint-0000002.pt"),
                                "--output-dir", str(tmp_path / "ddp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode != 0 and "written with distributed=fsdp" in out.stdout + out.stderr, out.stderr[-3000:]
    assert "beit-fast finetune: error: " in out.stderr, out.stderr[-3000:]   # the CLI's message, no traceback
    assert not os.path.exists(tmp_path / "ddp" / "log.jsonl") or \
        all('"step"' not in r for r in open(tmp_path / "ddp" / "log.jsonl"))


@needs_cpu_fsdp
def test_fsdp_mixed_precision_matches_single_process(tmp_path):
    """bf16: FSDP gathers the parameters and reduces gradients in fp32, autocast casts the GEMM weights; losses
    track a one-process bf16 autocast run, and the saved weights stay fp32."""
    bf16 = ARGS + ["--precision", "bf16"]
    one = _run([sys.executable, "-m", "beit_fast.cli"] + bf16 + ["--batch-size", "16"], tmp_path / "one")
    two = _run(_torchrun() + bf16 + ["--batch-size", "8", "--distributed", "fsdp", "--fused", "true"], tmp_path / "two")
    _assert_matches(one, two)
    from beit_fast.train.checkpoint import load
    state = load(str(tmp_path / "two" / "checkpoint-0000004.pt"))
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}


# sitecustomize.py for the workers of the run below: records, in every fused block call, the dtypes of the
# residual stream, the layer-scale gamma and the block's table, and rank 0 prints each new combination
_DTYPE_PROBE = """
import os
from beit_fast.models import beit
seen = set()
forward_fused = beit.Block.forward_fused
def probe(self, x, *args, **kwargs):
    table = self.attn.relative_position_bias_table
    key = (str(x.dtype), str(self.gamma_1.dtype), str(table.dtype) if table is not None else "shared")
    if key not in seen and os.environ.get("RANK") == "0":
        print("SEEN", key, flush=True)
    seen.add(key)
    return forward_fused(self, x, *args, **kwargs)
beit.Block.forward_fused = probe
"""


@needs_cpu_fsdp
def test_fsdp_keeps_the_residual_stream_and_layer_scale_in_fp32(tmp_path):
    """A bf16 FSDP run of the trainer: every block gets the fp32 residual stream and fp32 gammas and tables, as
    in a one-process run (a bf16 stream or gamma rounds away BEiT-L's 1e-5 layer-scaled updates)."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(_DTYPE_PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "probe")] + sys.path))
    cmd = _torchrun() + ARGS + ["--precision", "bf16", "--batch-size", "8", "--distributed", "fsdp",
                                "--fused", "true", "--train-subset", "16", "--output-dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    seen = {line for line in out.stdout.splitlines() if line.startswith("SEEN")}
    assert seen == {"SEEN ('torch.float32', 'torch.float32', 'torch.float32')"}, out.stdout[-2000:]


_API_TWICE = """
import json, os, sys
from beit_fast.train import config as C, finetune
out = sys.argv[1]
small = {"img_size": 16, "model_overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "train_subset": 64,
         "epochs": 1, "batch_size": 8, "num_workers": 0, "progress": False, "tensorboard": False, "device": "cpu",
         "val_subset": 40, "eval_batch_size": 20}
init = ""
for i in range(3):
    r = finetune(C.resolve("finetune", "demo", overrides={**small, "output_dir": f"{out}/run{i}", "init": init}))
    init = r["checkpoint"]
    with open(f"{out}/result-{os.environ['RANK']}.jsonl", "a") as f:   # (the trainer quiets ranks > 0's output)
        f.write(json.dumps({"rank": os.environ["RANK"], "run": i, "checkpoint": init}) + "\\n")
"""


def test_python_api_runs_repeatedly_in_one_torchrun_process(tmp_path):
    """Three fine-tunings from one script under torchrun (each from the last one's checkpoint): the process
    group is made once and kept (made again from torchrun's store, gloo read the first group's stale addresses:
    connection refused, or a hang), and every rank gets the checkpoint rank 0 wrote (it listed the folder
    while rank 0 was still saving: None, so the next run started from random weights on that rank)."""
    script = tmp_path / "api_twice.py"
    script.write_text(_API_TWICE)
    cmd = _torchrun()[:-2] + [str(script), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, start_new_session=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for rank in "01" for line in open(tmp_path / f"result-{rank}.jsonl")]
    assert len(rows) == 6, r.stdout[-3000:]
    for i in range(3):
        got = {row["rank"]: row["checkpoint"] for row in rows if row["run"] == i}
        assert got["0"] is not None and got["0"] == got["1"] and os.path.isfile(got["0"]), got
        assert os.path.dirname(got["0"]) == str(tmp_path / f"run{i}")


def test_one_visible_gpu_for_two_local_processes_is_refused(monkeypatch):
    """torchrun starting 2 processes on a node whose processes see one GPU would put both on cuda:0 (NCCL's
    "Duplicate GPU" later): refused up front, as with more processes than GPUs."""
    from beit_fast.train.runtime import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="start at most 1 processes per node"):
        pick_device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")   # a launcher that gave this task its own GPU
    assert pick_device("cuda", 1) == torch.device("cuda:0")


def test_ddp_stop_and_resume_matches_uninterrupted(tmp_path):
    """DDP with every per-rank random stream in use (drop path, mixup/cutmix), EMA and gradient accumulation:
    a run stopped mid-epoch and resumed logs the uninterrupted run's losses and ends with its weights, EMA and
    optimizer state, bitwise (each rank restores its own RNG state, not rank 0's). The ranks' streams differ
    (a per-rank seed), and the checkpoint refuses a resume with another number of processes."""
    ddp = ARGS + ["--batch-size", "8", "--accum-steps", "2", "--train-subset", "128", "--epochs", "2",
                  "--drop-path", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--ema", "true", "--ema-decay", "0.9"]
    whole, whole_eval = _run(_torchrun() + ddp, tmp_path / "whole")
    _run(_torchrun() + ddp + ["--stop-at-step", "3"], tmp_path / "parts")
    # one process cannot go on with a two-process run: a clear error before any step
    stopped = str(tmp_path / "parts" / "checkpoint-0000003.pt")
    one = [sys.executable, "-m", "beit_fast.cli"] + ddp + ["--resume", stopped, "--output-dir", str(tmp_path / "one")]
    out = subprocess.run(one, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 2 and "written by a run with 2 processes" in out.stderr, out.stderr[-3000:]
    assert not os.path.exists(tmp_path / "one" / "log.jsonl")
    resumed, resumed_eval = _run(_torchrun() + ddp + ["--resume", "auto"], tmp_path / "parts")
    assert len(whole) == 8 and resumed == whole, (whole, resumed)
    assert resumed_eval == whole_eval
    from beit_fast.train.checkpoint import load
    a, b = (load(str(tmp_path / run / "checkpoint-0000008.pt")) for run in ("whole", "parts"))
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(x, y) for i in a["optimizer"]["state"] for x, y in
               zip(a["optimizer"]["state"][i].values(), b["optimizer"]["state"][i].values()))
    assert a["world"] == 2 and not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=needs_cpu_fsdp)])
def test_two_process_gradient_accumulation_matches_single_process(tmp_path, single, mode):
    """2 processes x 4 images x 2 accumulated micro-batches: the gradients of the micro-batches that skip the
    all-reduce / reduce-scatter (no_sync) still reach every rank, so the per-step losses and the held-out
    top-1 match one process with 16 images per step (FSDP: gradient sync switched back on after no_sync)."""
    run = _run(_torchrun() + ARGS + ["--batch-size", "4", "--accum-steps", "2", "--distributed", mode], tmp_path)
    _assert_matches(single, run)
