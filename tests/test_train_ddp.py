"""Two gloo processes under torchrun (the real CLI) match one process with the same global batch."""
import json
import os
import signal
import socket
import subprocess
import sys


ARGS = ["finetune", "--img-size", "16", "--model-overrides", "{embed_dim: 32, depth: 2, num_heads: 2}",
        "--train-subset", "64", "--epochs", "1", "--warmup-epochs", "0.5", "--num-workers", "0",
        "--progress", "false", "--log-every", "1", "--drop-path", "0", "--eval-batch-size", "90",
        "--tensorboard", "false"]


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
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError("timed out:\n" + stdout[-2000:] + stderr[-3000:]) from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    return [r["loss"] for r in rows if "eval" not in r], [r for r in rows if "eval" in r][-1]["eval"]


def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    cli = [sys.executable, "-m", "beit_fast.cli"]
    single, ev1 = _run(cli + ARGS + ["--batch-size", "16"], tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "beit_fast.cli"]
    ddp, ev2 = _run(torchrun + ARGS + ["--batch-size", "8"], tmp_path / "two")
    assert len(single) == len(ddp) == 4
    for a, b in zip(single, ddp):   # same images per global batch; only the float reduction order differs
        assert abs(a - b) <= 1e-4 * abs(a), (single, ddp)
    assert ev1["n"] == ev2["n"] == 360 and abs(ev1["top1"] - ev2["top1"]) <= 100 / 360 + 1e-9
    # rank 0 alone wrote the log and the checkpoints
    assert sum(1 for r in open(tmp_path / "two" / "log.jsonl") if '"eval"' not in r) == 4
    assert os.path.isfile(tmp_path / "two" / "checkpoint-0000004.pt")
