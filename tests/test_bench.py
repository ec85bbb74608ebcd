"""The benchmarks' CPU smoke modes (what CI can run): each writes JSON rows with the environment and a
markdown table, every provider having passed its reference check; report.py merges them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from beit_fast._backend import INTERPRETER_PROBLEM, extension

# the tests that run or expect the extension's C++ ops (.ci/run checks beit_fast._C imports before any test)
needs_ext = pytest.mark.skipif(extension()[0] is None, reason="beit_fast._C is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mb", "torch",
            "triton", "cuda", "git_sha", "gpu"}


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BEIT_FAST_BACKEND")}
    r = subprocess.run([sys.executable] + args + ["--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("script, extra, providers", [
    ("bench_attention", ["--check-determinism"], {"eager", "sdpa"}),
    ("bench_blocks", ["--providers", "eager,ours,compile"], {"eager", "ours", "compile"}),
    pytest.param("bench_masking", ["--batch", "16"], {"reference", "cpp"}, marks=needs_ext),
    ("bench_model", ["--providers", "timm,hf,ours_reference,ours_fused,ours_fused_mlp_triton,ours_fused_attn_sdpa,"
                                    "ours_attn_only"],
     {"timm", "hf", "ours_reference", "ours_fused", "ours_fused_mlp_triton", "ours_fused_attn_sdpa", "ours_attn_only"}),
])
def test_smoke(script, extra, providers, tmp_path):
    _run([f"bench/{script}.py", "--smoke"] + extra, tmp_path)
    with open(tmp_path / f"{script}.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
    assert providers <= {r["provider"] for r in rows}
    md = (tmp_path / f"{script}.md").read_text()
    assert "| op | provider |" in md and "Hardware:" in md
    rep = subprocess.run([sys.executable, "bench/report.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0 and "speed-up vs" in rep.stdout, rep.stderr
    if script == "bench_blocks":   # memory-bound rows against a copy of their own bytes, logged as copy rows
        copies = {r["shape"]["bytes"]: r["gbps"] for r in rows if r["op"] == "copy"}
        bound = [r for r in rows if r["op"] in ("layer_scale_residual_norm", "layer_norm")]
        assert bound and all(r["pct_copy_bw"] > 0 for r in bound) and len(copies) >= 3


def test_rows_and_table_record_exported_settings(tmp_path, monkeypatch):
    """Every row carries the BEIT_FAST_* knobs exported for the run (not the git sha override), and the
    markdown names them under the hardware line."""
    common = _bench_module("common")
    monkeypatch.setenv("BEIT_FAST_LSRN_FORWARD", "block")
    monkeypatch.setenv("BEIT_FAST_GIT_SHA", "abc1234")
    env = common.environment("cpu")
    assert env["settings"].get("BEIT_FAST_LSRN_FORWARD") == "block" and "BEIT_FAST_GIT_SHA" not in env["settings"]
    row = common.make_row("op", "p", "fwd", {"B": 1}, torch.float32,
                          {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}, env)
    assert row["settings"] == env["settings"] and row["git_sha"] == "abc1234"
    common.write_rows([row], str(tmp_path), "x")
    assert "Settings exported for the run: " in (tmp_path / "x.md").read_text()
    assert "BEIT_FAST_LSRN_FORWARD=block" in (tmp_path / "x.md").read_text()


def test_attention_ours_and_dense_bias_smoke(tmp_path):
    """bench_attention's fused providers under the interpreter: each checked against the reference, then timed
    (the dense-bias providers through BEIT_FAST_ATTN_DENSE_BIAS's module switch, restored afterwards)."""
    env = {k: v for k, v in os.environ.items() if k != "BEIT_FAST_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "bench/bench_attention.py", "--smoke", "--providers",
                        "ours,ours_gather,ours_dkdv_gather,ours_jit_launch",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(tmp_path / "bench_attention.jsonl") as f:
        rows = [json.loads(line) for line in f]
    got = {(r["provider"], r["mode"]) for r in rows}
    assert got == {(p, m) for p in ("ours", "ours_gather", "ours_dkdv_gather", "ours_jit_launch")
                   for m in ("fwd", "bwd", "fwd_bwd")}, got


@needs_ext
def test_overhead_smoke(tmp_path):
    """bench/overhead.py on the CPU: host time per call of every op, ours and PyTorch's, and a training step.
    An "ours" row is the op on the backend it forces, named in the row (the C++ op here); without
    TRITON_INTERPRET=1 the Triton ops' rows are skipped with the reason (they were the reference, under "ours")."""
    _run(["bench/overhead.py", "--smoke"], tmp_path)
    with open(tmp_path / "bench_overhead.jsonl") as f:
        rows = [json.loads(line) for line in f]
    got = {(r["op"], r["provider"], r["mode"]) for r in rows}
    for op, theirs in (("layer_norm", "eager"), ("layer_scale_residual_norm", "eager"), ("linear_gelu", "eager"),
                       ("rel_pos_attention_qkvpacked", "sdpa")):
        assert {(op, theirs, m) for m in ("fwd", "fwd_bwd")} <= got
    assert {("train_step", p, "fwd_bwd") for p in ("ours_fused", "ours_reference")} <= got
    assert all(r["host_us"] > 0 and r["median_ms"] > 0 and r["gpu_us"] is None for r in rows)
    ours = {(r["op"], r["mode"]): r["backend"] for r in rows if r["provider"] == "ours"}
    assert ours == {("layer_scale_residual_norm", m): "cpp" for m in ("fwd", "fwd_bwd")}, ours
    md = (tmp_path / "bench_overhead.md").read_text()
    for op in ("layer_norm", "linear_gelu", "rel_pos_attention_qkvpacked"):
        assert f"{op} ours fwd: backend 'triton': tensors are on the CPU and TRITON_INTERPRET=1 is not set" in md


def test_overhead_honours_providers_and_rejects_quick(tmp_path, capsys):
    overhead = _bench_module("overhead")
    overhead.main(["--smoke", "--providers", "sdpa", "--out", str(tmp_path)])
    with open(tmp_path / "bench_overhead.jsonl") as f:
        assert {json.loads(line)["provider"] for line in f} == {"sdpa"}
    for argv, message in ((["--quick"], "--quick: overhead.py has one shape"),
                          (["--providers", "ours,ourz"], "--providers: unknown ourz; known: ours, eager")):
        with pytest.raises(SystemExit) as e:
            overhead.main(["--smoke", "--out", str(tmp_path)] + argv)
        assert message in f"{e.value.code} {capsys.readouterr().err}"


@pytest.mark.parametrize("script, argv, message", [
    ("bench_blocks", ["--ops", "layer_norm", "--providers", "eager,compiled"],
     "--providers: unknown compiled; known: eager, ours"),
    ("bench_blocks", ["--ops", "layernorm"], "--ops: unknown layernorm; known: block, "),
    ("bench_attention", ["--providers", "eager,sdpa_timm"], "--providers: unknown sdpa_timm; known: eager, "),
    ("bench_model", ["--providers", "ours"], "--providers: unknown ours; known: ours_reference, "),
])
def test_a_misspelt_provider_or_op_is_refused(script, argv, message, tmp_path):
    """A name no provider / op has was skipped without a word (bench_blocks: a comparison without its
    torch.compile rows, exit status 0)."""
    with pytest.raises(SystemExit) as e:
        _bench_module(script).main(["--smoke", "--out", str(tmp_path)] + argv)
    assert message in str(e.value.code)
    assert not os.path.exists(tmp_path / f"{script}.jsonl")     # refused before anything ran


@needs_ext
def test_eager_overhead_runs_both_paths():
    """bench/eager_overhead.py: a row per op and mode with a time for the fast path and the registered op."""
    r = subprocess.run([sys.executable, "bench/eager_overhead.py", "--rounds", "1", "--calls", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    got = {(c[0].strip(), c[1].strip()) for c in rows[1:]}
    ops = ("layer_norm", "linear_gelu", "rel_pos_attention_qkvpacked", "layer_scale_residual_norm",
           "masked_patch_embed")
    assert got == {(op, m) for op in ops for m in ("fwd", "fwd_bwd")}, got
    assert all(float(c[2]) > 0 and float(c[3]) > 0 for c in rows[1:])
    launched = r.stdout.rsplit("Triton ", 1)[1]   # "3.8.0: 552 launches stubbed, 0 programs interpreted"
    assert int(launched.split(": ")[1].split()[0]) > 0 and launched.rstrip().endswith(", 0 programs interpreted")


def test_eager_overhead_fails_when_the_interpreter_runs_a_kernel():
    """Were the launch stub not to hold (as the stub of InterpretedFunction.run did not on Triton 3.2-3.5,
    where the timings then included the interpreted kernels), eager_overhead says so and fails: here its stub
    of GridExecutor.__call__ is undone after the import."""
    script = ("import os, sys\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "import triton.runtime.interpreter as I\n"
              "call = I.GridExecutor.__call__\n"
              "sys.path.insert(0, 'bench')\n"
              "import eager_overhead\n"
              "I.GridExecutor.__call__ = call\n"
              "eager_overhead.main(['--rounds', '1', '--calls', '1'])\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "the interpreter ran" in r.stderr and "kernel programs while layer_norm fwd was timed" in r.stderr, \
        r.stderr[-3000:]


def test_triton_dispatch_times_both_launch_paths():
    """bench/triton_dispatch.py: a row per launcher, with how many kernels it launches and a host time through
    Triton's dispatch and through the launch cache (stand-in driver, sm_90 compiles, nothing runs)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "bench/triton_dispatch.py", "--rounds", "1", "--calls", "2"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode == 2 and "not available here" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    got = {c[0].strip(): [float(x) for x in c[1:]] for c in rows[1:]}
    assert set(got) == {"rel_pos_attention_fwd", "rel_pos_attention_bwd", "layer_norm_fwd", "layer_norm_bwd",
                        "linear_gelu_fwd"}
    # the forward: its expansion and kernel; the backward: Delta, both expansions (one launch), dK/dV, dQ, dTable
    assert got["rel_pos_attention_fwd"][0] == 2 and got["rel_pos_attention_bwd"][0] == 5
    assert all(v[1] > 0 and v[2] > 0 for v in got.values())


@needs_ext
def test_cpp_errors_reach_python():
    """bench/cpp_errors.py: every argument error of the extension raised as its ValueError, case by case."""
    r = subprocess.run([sys.executable, "bench/cpp_errors.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines[0].startswith("extension: ") and "_C" in lines[0]
    assert lines[1].startswith("libstdc++: ") and lines[2].startswith("a stream in the extension writes ")
    cases = lines[3:]
    assert len(cases) == len(_bench_module("cpp_errors").CASES), r.stdout
    assert all(line.rstrip().endswith(" ok") for line in cases), r.stdout


def test_time_ms_with_setup_times_only_the_call():
    """bwd rows: setup (the forward) runs before every call, untimed, and hands the call its result."""
    common = _bench_module("common")
    made, got = [], []

    def setup():
        made.append(len(made))
        return made[-1]

    t = common.time_ms(got.append, "cpu", warmup=2, rep=5, setup=setup)
    assert made == list(range(7)) and got == made
    assert 0 <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]


def test_time_ms_min_calls_stretches_the_cuda_timing(monkeypatch):
    """min_calls: a call estimated at 50 ms gets 10 x 50 ms of timing instead of cuda_rep_ms (400 ms: 8 calls);
    a short one keeps cuda_rep_ms. (do_bench and the estimate are stand-ins: no GPU needed.)"""
    import triton.testing
    common = _bench_module("common")
    asked = []
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup, rep, quantiles: asked.append(rep) or (1.0, 0.9, 1.1))
    for estimate, want in ((50.0, 500.0), (0.5, 400)):
        monkeypatch.setattr(common, "_estimate_ms", lambda fn, setup, est=estimate: est)
        t = common.time_ms(lambda: None, "cuda", cuda_rep_ms=400, min_calls=10)
        assert asked[-1] == want and t == {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1}


def test_min_calls_estimate_leaves_out_first_call_compilation(monkeypatch):
    """The estimate that sizes a min_calls timing skips the first calls: a 0.3 s first call (Triton
    compilation, cudnn.benchmark's search) made a 1 ms step look like 100 ms and its timing 100x too long."""
    import time
    common = _bench_module("common")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    calls = []

    def step(arg=None):
        calls.append(arg)
        time.sleep(0.3 if len(calls) == 1 else 0.001)

    assert common._estimate_ms(step, None) < 50 and len(calls) == 5
    calls.clear()
    assert common._estimate_ms(step, lambda: "fwd") < 50 and calls == ["fwd"] * 5


def _stand_in_profiler(monkeypatch):
    """A stand-in torch.profiler and GPU (none here): launch(name, ms) puts a kernel on the one stream (a clock
    tick each); a profiler session's events are the kernels launched while it is open, plus a host event, in
    no particular order; torch.cuda._sleep launches ATen's spin_kernel. -> (launch, state: sessions opened)."""
    import types
    state = {"t": 0, "open": None, "sessions": 0}

    def launch(name, ms):
        state["t"] += 1
        if state["open"] is not None:
            state["open"].append(types.SimpleNamespace(
                name=name, device_type=torch.autograd.DeviceType.CUDA,
                time_range=types.SimpleNamespace(start=state["t"], elapsed_us=lambda: ms * 1e3)))

    class Profile:
        def __init__(self, activities):
            self.evs = [types.SimpleNamespace(name="host", device_type=torch.autograd.DeviceType.CPU,
                                              time_range=types.SimpleNamespace(start=0, elapsed_us=lambda: 5e3))]

        def __enter__(self):
            state["sessions"] += 1
            state["open"] = self.evs
            return self

        def __exit__(self, *exc):
            state["open"] = None

        def events(self):
            return self.evs[::-1]

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    spin = "at::cuda::(anonymous namespace)::spin_kernel(long)"   # ATen's name for torch.cuda._sleep's kernel
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: launch(spin, 1e-3))
    monkeypatch.setattr(_bench_module("common"), "_prelude", lambda: [launch("prelude", 0.25) for _ in range(3)])
    return launch, state


def test_gpu_time_sums_kernels_per_call(monkeypatch):
    """common.gpu_time on a stand-in profiler: per call, the kernels' durations are summed by name; with setup
    the median call is reported with its own split and setup's kernels (launched just before each call) are
    not counted; without, the mean of back-to-back calls; host-side events never count; one profiler session
    per gpu_time whatever `reps`; the marker kernels themselves are not counted."""
    common = _bench_module("common")
    launch, state = _stand_in_profiler(monkeypatch)
    per_call = iter([[("k1", 1.0)], [("k1", 2.0), ("k2", 1.0), ("k1", 1.0)], [("k1", 9.0)],
                     [("k1", 0.5), ("k2", 0.5)]])   # the untimed first call, then the 3 profiled ones

    def fn(arg=None):
        for name, ms in next(per_call):
            launch(name, ms)

    def setup():
        launch("forward", 7.0)
        return 0
    got = common.gpu_time(fn, "cuda", setup=setup, reps=3)
    assert got == {"gpu_ms": 4.0, "gpu_kernels_ms": {"k1": 3.0, "k2": 1.0}}   # totals 4, 9, 1: median 4
    assert state["sessions"] == 1
    assert common.gpu_time(lambda: None, "cpu") is None
    per_call = iter([[]] + [[("k1", 1.0), ("k2", 0.5)], [("k1", 2.0), ("k2", 0.5)], [("k1", 1.5), ("k2", 0.5)]])
    assert common.gpu_time(fn, "cuda", reps=3) == {"gpu_ms": 2.0, "gpu_kernels_ms": {"k1": 1.5, "k2": 0.5}}
    assert state["sessions"] == 2


def test_gpu_pass_is_one_profiler_session(monkeypatch, capsys):
    """A GPU-time pass profiles every row's calls in ONE torch.profiler session, each call's kernels told apart
    by the marker kernels around it: with TEARDOWN_CUPTI=1 a session's CUPTI teardown runs asynchronously and
    can land in the next session, which then records none or part of its GPU work (pytorch/kineto#1554), so
    back-to-back sessions (3 per backward row before) could under-report a row's GPU time. A row whose call
    raises is an error under its label and the other rows keep their times; markers that cannot be matched
    give no GPU times rather than wrong ones."""
    import contextlib
    common = _bench_module("common")
    launch, state = _stand_in_profiler(monkeypatch)
    inside = []

    @contextlib.contextmanager
    def context():
        inside.append(True)
        yield
        inside.pop()

    def op(ms):
        def call(arg=None):
            assert inside   # the provider's settings hold during its calls
            launch("k", ms)
        return call

    def broken():
        raise RuntimeError("boom")
    rows = [{"mode": m} for m in ("fwd", "bwd", "fwd_bwd", "fwd")]
    pending = [("ours", context, [(rows[0], (op(1.0), None), 2e9, None),
                                  (rows[1], (op(2.0), lambda: launch("forward", 5.0)), None, 1e9),
                                  (rows[2], (op(3.0), None), None, None)]),
               ("bad", context, [(rows[3], (broken, None), None, None)])]
    outcomes = common.Outcomes()
    common.gpu_pass(pending, "cuda", outcomes)
    assert state["sessions"] == 1
    assert [r.get("gpu_ms") for r in rows] == [1.0, 2.0, 3.0, None]
    assert rows[0]["gpu_tflops"] == 2e9 / 1e-3 / 1e12 and rows[1]["gpu_gbps"] == 1e9 / 2e-3 / 1e9
    assert len(outcomes.errors) == 1 and outcomes.errors[0].startswith("GPU time of bad: RuntimeError: boom")
    # a profile whose markers do not pair up (a lost event): no GPU times, never a misattributed one
    monkeypatch.setattr(common, "_marker", lambda: None)
    rows = [{"mode": "fwd"}]
    common.gpu_pass([("ours", context, [(rows[0], (op(1.0), None), None, None)])], "cuda", common.Outcomes())
    assert "gpu_ms" not in rows[0] and "no GPU times" in capsys.readouterr().out
    # an event whose timestamp CUPTI zeroed (relative start < 0) sorts out of place, possibly into another
    # call's markers: no GPU times then either
    monkeypatch.undo()
    launch, state = _stand_in_profiler(monkeypatch)
    rows = [{"mode": "fwd"}, {"mode": "bwd"}]

    def zeroed(arg=None):
        launch("k", 1.0)
        if state["open"]:   # (in the profiled calls; the first call runs before the session)
            state["open"][-1].time_range.start = -10**9
    common.gpu_pass([("ours", context, [(rows[0], (op(1.0), None), None, None),
                                        (rows[1], (zeroed, None), None, None)])], "cuda", common.Outcomes())
    assert "gpu_ms" not in rows[0] and "gpu_ms" not in rows[1]
    assert "invalid timestamps" in capsys.readouterr().out


def test_block_benchmark_gpu_pass_after_each_op(tmp_path, monkeypatch):
    """bench_blocks takes the GPU times of each op right after its wall-clock timings, not once after every op
    of the configuration: gpu_check.sh runs it last, under the deadline, and a cut run lost all its GPU times."""
    bb = _bench_module("bench_blocks")
    passes = []
    monkeypatch.setattr(bb, "gpu_times", lambda pending, copies, device, outcomes:
                        passes.append(sorted({label.split()[0] for label, _, _ in pending})))
    bb.main(["--smoke", "--out", str(tmp_path), "--ops", "layer_norm,layer_scale_residual_norm",
             "--providers", "eager"])
    assert passes == [["layer_norm"], ["layer_scale_residual_norm"]]


def test_gpu_pass_adds_gpu_times_and_rates(monkeypatch):
    """common.gpu_pass: each pending row gets its call's GPU time and the TFLOP/s / GB/s it implies, inside its
    provider's context; nothing happens off CUDA. bench_blocks.gpu_times adds the copies' rows and each
    memory-bound row's fraction of a same-bytes copy's GB/s by GPU time."""
    import contextlib
    common, blocks = _bench_module("common"), _bench_module("bench_blocks")
    entered = []

    @contextlib.contextmanager
    def context():
        entered.append(True)
        yield
    times = {"op": 0.5, "copy": 0.25}   # ms per call, by what the call is
    def profile_calls(calls, reps):   # a stand-in for the profiler session: each call's kernels, per rep
        out = []
        for call, setup, ctx in calls:
            with (ctx or contextlib.nullcontext)():
                out.append([{"k": times[call()]}] * reps)
        return out
    monkeypatch.setattr(common, "profile_calls", profile_calls)
    row = {"mode": "fwd", "pct_copy_bw": 40.0}
    pending = [("ours", context, [(row, (lambda: "op", None), 2e9, 1e9)])]
    common.gpu_pass(pending, "cpu", common.Outcomes())
    assert row == {"mode": "fwd", "pct_copy_bw": 40.0} and not entered
    common.gpu_pass(pending, "cuda", common.Outcomes())
    assert entered and row["gpu_ms"] == 0.5 and row["gpu_tflops"] == 2e9 / 5e-4 / 1e12
    assert row["gpu_gbps"] == 1e9 / 5e-4 / 1e9
    copies = blocks.CopyBandwidth({"model": "m", "B": 1, "C": 1}, torch.float32, "cpu", {}, [])
    copies.calls[copies._n(1e9)] = ({"shape": {"bytes": 1e9}, "mode": "fwd"}, lambda: "copy")
    blocks.gpu_times(pending, copies, "cuda", common.Outcomes())
    assert copies.gpu_gbps(1e9) == 1e9 / 2.5e-4 / 1e9 and row["gpu_pct_copy_bw"] == 50.0


def test_report_baselines_and_machines():
    """--baseline gives one speed-up column per named provider; rows of two GPUs are never compared."""
    report = _bench_module("report")
    row = lambda prov, ms, gpu, **kw: dict(op="attn", mode="fwd_bwd", shape={"B": 1}, dtype="bfloat16",  # noqa: E731
                                           provider=prov, median_ms=ms, gpu=gpu, **kw)
    rows = [row("ours", 1.0, "H100"), row("flex", 2.0, "H100"), row("sdpa", 3.0, "H100"),
            row("ours", 4.0, "A100", pct_copy_bw=85.0), row("sdpa", 8.0, "A100")]
    md = report.markdown(rows, ["flex", "sdpa"])
    h100, a100 = md.split("### ")[1:3]
    assert "(H100)" in h100 and "speed-up vs flex | speed-up vs sdpa" in h100 and "| ours | 1 |" in h100
    assert h100.splitlines()[3].endswith("| 2x | 3x |")          # ours, the fastest, sorted first
    assert "speed-up vs flex" not in a100 and "% of copy" in a100 and "| 85 |" in a100
    assert "| ours | 4 |" in a100 and a100.splitlines()[3].endswith("| 2x |")
    default = report.markdown(rows)
    assert default.count("speed-up vs sdpa") == 2 and "speed-up vs flex" not in default
    assert "GPU ms" not in md
    # rows with the GPU's own time (bench_attention on CUDA): a GPU ms column and GPU-time speed-ups
    rows = [row("ours", 1.4, "H100", gpu_ms=0.7), row("sdpa", 1.4, "H100", gpu_ms=1.4)]
    md = report.markdown(rows, ["sdpa"])
    assert "| provider | median ms | p20 | p80 | GPU ms |" in md and "GPU-time speed-up vs sdpa" in md
    ours = next(line for line in md.splitlines() if line.startswith("| ours |"))
    assert "| 0.7 |" in ours and ours.endswith("| 1x | 2x |")
    rows = [row("ours", 0.2, "H100", gpu_ms=0.05, pct_copy_bw=25.0, gpu_pct_copy_bw=88.0)]
    md = report.markdown(rows)
    assert "| % of copy | % of copy (GPU time) |" in md and "| 25 | 88 |" in md


def test_report_never_compares_two_runs(tmp_path):
    """Two runs merged: each keeps its own tables and baselines (ours of run b was divided by run a's sdpa);
    a run without a git sha (null) does not break the machine lines; overhead.py's gpu_us shows as GPU ms."""
    report = _bench_module("report")
    row = lambda prov, ms, sha, **kw: dict(op="attn", mode="fwd_bwd", shape={"B": 1}, dtype="bfloat16",  # noqa: E731
                                           provider=prov, median_ms=ms, gpu="H200", git_sha=sha, **kw)
    for run, rows in (("a", [row("sdpa", 2.0, "abc"), row("ours", 4.0, "abc")]),
                      ("b", [row("sdpa", 3.0, None), row("ours", 1.0, None, gpu_us=500.0)])):
        (tmp_path / run).mkdir()
        (tmp_path / run / "bench_attention.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = report.load_rows([str(tmp_path / "a"), str(tmp_path / "b")])
    md = report.markdown(rows, ["sdpa"])
    a, b = md.split("### ")[1:3]
    assert a.splitlines()[0].endswith(f"[{tmp_path / 'a'}]") and b.splitlines()[0].endswith(f"[{tmp_path / 'b'}]")
    assert a.count("| ours |") == 1 and "| ours | 4 |" in a and "| 0.5x |" in a
    assert b.count("| ours |") == 1 and "| ours | 1 |" in b and "| 3x |" in b and "| 0.5 |" in b   # GPU ms
    assert "git abc" in md and "git None" in md
    assert "[" not in report.markdown(report.load_rows([str(tmp_path / "a")])).splitlines()[0]
    # files of one folder (gpu_check passes its bench_*.jsonl one by one) are one run
    (tmp_path / "a" / "bench_model.jsonl").write_text(json.dumps(dict(row("timm", 5.0, "abc"), op="step")) + "\n")
    one = report.load_rows([str(tmp_path / "a" / "bench_attention.jsonl"), str(tmp_path / "a" / "bench_model.jsonl")])
    assert len({r["_run"] for r in one}) == 1 and "[" not in report.markdown(one)


def test_one_provider_error_does_not_end_the_benchmark(tmp_path):
    """A provider that raises (an API difference, a compile error) or fails its check is recorded and the run
    goes on; the report lists it and the exit status is non-zero."""
    common = _bench_module("common")
    out = common.Outcomes()
    env = common.environment("cpu")
    timing = {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}
    rows = []
    with out.guard("good"):
        rows.append(common.make_row("op", "good", "fwd", {"n": 1}, "float32", timing, env))
    with out.guard("broken"):
        raise TypeError("unexpected keyword 'scale'")
    with out.guard("wrong"):
        common.check_close("wrong", common.torch.ones(3), common.torch.zeros(3), atol=0.0, rtol=0.0)
    with out.guard("skipped"):
        raise common.Skip("needs CUDA")
    assert len(rows) == 1 and out.failed == ["wrong"] and out.skipped == ["skipped: needs CUDA"]
    assert out.errors == ["broken: TypeError: unexpected keyword 'scale'"]
    with pytest.raises(SystemExit, match="errors"):
        common.finish(rows, str(tmp_path), "x", out)
    md = (tmp_path / "x.md").read_text()
    assert "| op | good | fwd |" in md
    assert "Errors (not timed): broken: TypeError" in md and "Failed the reference check (not timed): wrong" in md


def _bench_module(name):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import importlib
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_model_benchmark_check_catches_a_wrong_model(mode, monkeypatch):
    """bench_model checks logits of randomized weights: a provider that computes something else (here the
    attention's qkv projection scaled) fails its check and is not timed; the unchanged one passes."""
    bm = _bench_module("bench_model")
    env = bm.environment("cpu")
    name = "beit_test_patch4_32_mim" if mode == "pretrain" else "beit_test_patch4_32"
    ref, ref_logits = bm.build("ours_reference", name, mode)
    ref.eval()
    x, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, ref.num_patches, dtype=torch.bool)
    mask[:, :20] = True
    inputs = (x, mask, torch.zeros(40 if mode == "pretrain" else 2, dtype=torch.long), mask.flatten().nonzero()[:, 0])
    tol = {torch.float32: 1e-3}
    row = bm.time_provider("ours_reference", name, mode, ref, ref_logits, inputs, torch.float32, 2, "cpu", env, tol)
    assert row["provider"] == "ours_reference"
    build = bm.build

    def wrong(provider, name, mode):
        model, fn = build(provider, name, mode)
        fwd = model.blocks[0].attn.forward
        model.blocks[0].attn.forward = lambda h, *a, **k: fwd(1.5 * h, *a, **k)
        return model, fn
    monkeypatch.setattr(bm, "build", wrong)
    with pytest.raises(bm.CheckFailed, match="of the largest logit"):
        bm.time_provider("ours_reference", name, mode, ref, ref_logits, inputs, torch.float32, 2, "cpu", env, tol)

    def wrong_backward(provider, name, mode):   # same logits, no gradient reaches the blocks before the last
        model, fn = build(provider, name, mode)
        model.blocks[-1].register_full_backward_pre_hook(lambda mod, grad_out: (torch.zeros_like(grad_out[0]),))
        return model, fn
    monkeypatch.setattr(bm, "build", wrong_backward)
    with pytest.raises(bm.CheckFailed, match="the gradient of .* differs from the reference"):
        bm.time_provider("ours_reference", name, mode, ref, ref_logits, inputs, torch.float32, 2, "cpu", env, tol)


def test_masking_benchmark_checks_the_masks():
    """bench_masking times the C++ op only after its masks pass a distribution check against the reference's:
    all-empty masks, rows over the target and the wrong shape fail."""
    from beit_fast.masking import block_masks
    bm, CheckFailed = _bench_module("bench_masking"), _bench_module("common").CheckFailed
    ref = bm.check_masks(block_masks(64, (14, 14), 75, seed=1, backend="reference"), 64, (14, 14), 75)
    assert 70 < ref <= 75
    bm.check_masks(block_masks(64, (14, 14), 75, seed=2), 64, (14, 14), 75, ref)   # auto: C++ when built
    for bad in (torch.zeros(64, 196, dtype=torch.bool), torch.ones(64, 196, dtype=torch.bool),
                torch.zeros(64, 195, dtype=torch.bool)):
        with pytest.raises(CheckFailed):
            bm.check_masks(bad, 64, (14, 14), 75, ref)


@needs_ext
def test_block_benchmark_checks_every_output_and_gradient():
    """bench_blocks checks a provider's every output, the gradients through all of them, and their number:
    a layer_scale_residual_norm whose normalized output's gradient is doubled, one that returns only the
    residual, and a fused block whose second output (the next block's norm1) is wrong all fail their check
    (only the first output's gradient and zip-paired outputs were compared); the real ones pass."""
    from beit_fast.ops.layer_scale_residual_norm import layer_scale_residual_norm_ref as lsrn
    bb, CheckFailed = _bench_module("bench_blocks"), _bench_module("common").CheckFailed
    case = bb.CASES["layer_scale_residual_norm"](bb.SMOKE[0], torch.float32, "cpu", True)
    expected = bb.reference(case)
    bb.check_provider("ours", case["providers"]["ours"](), case, expected, torch.float32)

    class _DoubleGrad(torch.autograd.Function):
        forward = staticmethod(lambda ctx, t: t.view_as(t))
        backward = staticmethod(lambda ctx, g: 2 * g)

    def doubled(*a):
        s, n = lsrn(*a)
        return s, _DoubleGrad.apply(n)
    for wrong, match in ((doubled, "grad"), (lambda *a: lsrn(*a)[:1], "returns 1 output")):
        with pytest.raises(CheckFailed, match=match):
            bb.check_provider("wrong", wrong, case, expected, torch.float32)
    case = bb.CASES["block"](bb.SMOKE[0], torch.float32, "cpu", True)
    expected = bb.reference(case)
    ours = case["providers"]["ours"]()
    bb.check_provider("ours", ours, case, expected, torch.float32)
    bb.check_provider("eager", case["providers"]["eager"](), case, expected, torch.float32)
    full = ours.check_fn
    ours.check_fn = lambda x: (lambda o, h: (o, 3 * h - 1))(*full(x))
    with pytest.raises(CheckFailed, match="output 1"):
        bb.check_provider("ours", ours, case, expected, torch.float32)


@pytest.mark.skipif(bool(INTERPRETER_PROBLEM), reason=f"the Triton interpreter cannot run here: {INTERPRETER_PROBLEM}")
def test_tune_attention_smoke(tmp_path):
    """The tile sweep on the CPU through the Triton interpreter: every kernel gets its default, the default
    with its bias source (dense expansion / gather), its tail choice and its block-tail choice flipped in
    turn, and one other tile, each checked against the reference before it is timed, and the default again;
    the report names the best per kernel, against the default's faster timing."""
    env = {k: v for k, v in os.environ.items() if k != "BEIT_FAST_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "bench/tune_attention.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(tmp_path / "tune_attention.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for r_ in rows:
        assert REQUIRED <= set(r_), REQUIRED - set(r_)
    by_kernel = {}
    for r_ in rows:
        by_kernel.setdefault(r_["op"], []).append(r_)
    assert set(by_kernel) == {"attention_tile_fwd", "attention_tile_dkdv", "attention_tile_dq"}
    for op, rs in by_kernel.items():
        assert [x["provider"] for x in rs] == ["64x64 w4 s2", "64x64 w4 s2 dense", "64x64 w4 s2 masked",
                                               "64x64 w4 s2 blocktail", "32x32 w4 s2", "64x64 w4 s2"], op
        assert [x["default"] for x in rs] == [True] + [False] * (len(rs) - 2) + [True], op   # again, last
    md = (tmp_path / "tune_attention.md").read_text()
    assert "Best tile per kernel" in md and md.count("AttnConfigs(TileConfig(") == 1
    # the speed-up is over the default's faster timing (first 0.56 ms, again 0.42 ms; best other 0.40 ms)
    tune = _bench_module("tune_attention")
    from beit_fast.kernels.rel_pos_attention import TileConfig
    d, o = TileConfig(64, 64, 4, 2), TileConfig(32, 32, 4, 2)
    def fwd_line(res):
        return next(x for x in tune.summary([(torch.bfloat16, ("base", 1, 1, 197, 64), {"fwd": res})]
                                            ).splitlines() if "| fwd |" in x)
    line = fwd_line([(0.56, 9.0, d, True), (0.40, 9.0, o, False), (0.42, 9.0, d, True)])   # GPU times
    assert line.endswith("| 64x64 w4 s2 | 0.42 | 32x32 w4 s2 | 0.4 | 1.050x |"), line
    # a tile without a GPU time (its profile failed): the kernel's tiles are all ranked by wall time, never a
    # GPU time against a wall time (which holds the host's and the L2 flush's time too)
    line = fwd_line([(0.56, 0.70, d, True), (None, 0.60, o, False), (0.42, 0.65, d, True)])
    assert line.endswith("| 64x64 w4 s2 | 0.65 | 32x32 w4 s2 | 0.6 | 1.083x |"), line


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_model_benchmark_rows_carry_tflops(mode):
    """bench_model's rows have a TFLOP/s like every other benchmark's (they had tflops null): the step's nominal
    matmul FLOPs, as the trainer's MFU counts them (pretraining's head over the masked patches), per second."""
    from beit_fast.train.feedback import train_flops_per_image
    bm = _bench_module("bench_model")
    name = "beit_test_patch4_32_mim" if mode == "pretrain" else "beit_test_patch4_32"
    ref, ref_logits = bm.build("ours_reference", name, mode)
    ref.eval()
    x, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, ref.num_patches, dtype=torch.bool)
    mask[:, :20] = True
    inputs = (x, mask, torch.zeros(40 if mode == "pretrain" else 2, dtype=torch.long), mask.flatten().nonzero()[:, 0])
    row = bm.time_provider("ours_reference", name, mode, ref, ref_logits, inputs, torch.float32, 2, "cpu",
                           bm.environment("cpu"), {torch.float32: 1e-3})
    flops = 2 * train_flops_per_image(ref.config, 20.0 if mode == "pretrain" else 0.0)
    assert row["tflops"] == pytest.approx(flops / (row["median_ms"] / 1e3) / 1e12)


def test_git_sha_of_an_installed_copy_is_none(tmp_path, monkeypatch):
    """An installed copy of bench/ (beit_fast/bench in a virtual environment) inside some other repository, such as
    a project's .venv, recorded that project's commit as the git sha of the beit_fast measured."""
    import importlib.util
    import shutil
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    monkeypatch.delenv("BEIT_FAST_GIT_SHA", raising=False)   # (gpu_check.sh exports it)
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "project"], cwd=tmp_path, check=True)
    copy = tmp_path / ".venv" / "site-packages" / "beit_fast" / "bench"
    copy.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "bench", "common.py"), copy)
    spec = importlib.util.spec_from_file_location("installed_bench_common", copy / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    assert common._git_sha() is None
