"""bench/gpu_check.sh driven without a GPU: PYTHON is a stand-in (a shell script) that logs each call and
plays the build, pytest, the benchmarks and report.py, so that the script's own logic runs in seconds: its
exit status and verdict, a reused OUTDIR, GPU_CHECK_BENCH's names and the summary's test line."""
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv is logged to $FAKE_LOG; FAKE_* variables choose what each call does
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "CALL: $*" >>"$FAKE_LOG"
case "$1 $2" in
  "-m pip") echo "pip install"; [ "$BEIT_FAST_CUDA" = 1 ] && exit ${FAKE_CUDA_BUILD_RC:-0}; exit 0;;
  "-m pytest")
    if [[ " $* " == *" --deselect "* ]]; then   # the rest of the suite
      echo "tests/test_y.py::t PASSED"
      [ -n "${FAKE_REST_CUT:-}" ] || echo "============ 7 passed in 2.00s ============"
      exit ${FAKE_REST_RC:-0}
    fi
    echo "tests/test_x.py::t PASSED"; echo "====== 3 passed, 1 skipped in 1.23s ======"; exit ${FAKE_GPU_RC:-0};;
  "-m beit_fast.info") echo "info"; exit 0;;
  "-c "*) exit 1;;   # no pytest-timeout, no xdist
esac
name=$(basename "$1" .py); shift
out=""
while [ $# -gt 0 ]; do case "$1" in --out) out=$2; shift;; --name) name=$2;; esac; shift; done
case "$name" in
  cpp_errors|report) echo "$name ran"; exit 0;;
  overhead) name=bench_overhead;;
esac
echo '{"row": 1}' >"$out/$name.jsonl"; echo "| table $name |" >"$out/$name.md"
[ -n "${FAKE_IGNORE_TERM:-}" ] && trap '' TERM   # (inherited by sleep: ignored signals survive exec)
var=FAKE_SLEEP_$name; sleep "${!var:-0}"
var=FAKE_RC_$name; exit "${!var:-0}"
"""


def _gpu_check(tmp_path, out=None, **env):
    """Run bench/gpu_check.sh OUT with the stand-in python -> (CompletedProcess, OUT, the stand-in's calls)."""
    fake = tmp_path / "fakepy"
    if not fake.exists():
        fake.write_text(FAKE_PYTHON)
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = out or tmp_path / "out"
    log = tmp_path / "calls.log"
    log.write_text("")
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    full = {k: v for k, v in os.environ.items() if k in keep}
    full.update(PYTHON=str(fake), FAKE_LOG=str(log), BEIT_FAST_GIT_SHA="test", **env)
    r = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=ROOT, env=full, capture_output=True,
                       text=True, timeout=120)
    return r, out, log.read_text().splitlines()


def _verdict(out):
    return (out / "summary.md").read_text().rstrip().splitlines()[-1]


def test_clean_run_exits_0_with_both_test_lines(tmp_path):
    r, out, calls = _gpu_check(tmp_path, GPU_CHECK_REST="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert _verdict(out) == "verdict: passed (every step asked for)"
    assert "tests: GPU-facing: 3 passed, 1 skipped in 1.23s; rest: 7 passed in 2.00s" in summary
    for step in ("bench_model", "bench_attention", "bench_overhead", "bench_blocks"):
        assert f"| {step} | ok |" in summary


@pytest.mark.parametrize("env, what", [
    ({"FAKE_GPU_RC": "1"}, "tests_gpu FAILED (rc=1)"),
    ({"FAKE_REST_RC": "1", "GPU_CHECK_REST": "1"}, "tests_rest FAILED (rc=1)"),   # in the background
    ({"FAKE_RC_bench_attention": "1"}, "bench_attention FAILED (rc=1)"),
    ({"FAKE_CUDA_BUILD_RC": "1"}, "build FAILED (rc=1)"),   # (the build without CUDA passes: the run goes on)
])
def test_a_failed_step_fails_the_run(tmp_path, env, what):
    r, out, calls = _gpu_check(tmp_path, GPU_CHECK_BENCH="attention", **env)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert _verdict(out).startswith("verdict: FAILED: ") and what in _verdict(out), _verdict(out)
    assert any("bench_attention.py" in c for c in calls)   # a failed step does not stop the others


def test_a_step_cut_by_the_deadline_fails_the_run(tmp_path):
    """bench_model takes the time left (17 s - 5 s of margin, 3 s of it): bench_attention, with under 10 s,
    is not run, and that is no pass."""
    r, out, calls = _gpu_check(tmp_path, GPU_CHECK_SECONDS="17", GPU_CHECK_BENCH="model attention",
                               FAKE_SLEEP_bench_model="3")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "| bench_attention | not run (out of time) | 0 s |" in (out / "summary.md").read_text()
    assert "bench_attention not run (out of time)" in _verdict(out)


def test_a_step_that_ignores_its_time_limit_is_killed(tmp_path):
    """A step still running when its limit's TERM comes (ignored here) is killed 10 s later, so that the
    script keeps its deadline; the summary says it was killed, and that is no pass."""
    import time
    t0 = time.monotonic()
    r, out, calls = _gpu_check(tmp_path, GPU_CHECK_SECONDS="20", GPU_CHECK_BENCH="model", GPU_CHECK_TESTS="",
                               FAKE_SLEEP_bench_model="90", FAKE_IGNORE_TERM="1")
    assert time.monotonic() - t0 < 60, "the step outlived its limit by more than the kill delay"
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "| bench_model | KILLED (rc=137: still running 10 s past its" in summary, summary
    assert "bench_model KILLED" in _verdict(out)


def test_a_cut_pytest_log_says_so_under_its_own_name(tmp_path):
    r, out, calls = _gpu_check(tmp_path, GPU_CHECK_REST="1", FAKE_REST_CUT="1", GPU_CHECK_BENCH="")
    assert "tests: GPU-facing: 3 passed, 1 skipped in 1.23s; rest: no pytest summary (cut short)" in \
        (out / "summary.md").read_text()


def test_a_reused_outdir_keeps_nothing_of_the_earlier_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = {"summary.md": "old", "tests.log": "=== 99 failed in 9.99s ===\n", "build.log": "=== build (old)\n",
             "bench.log": "old", "bench_old.jsonl": "{}\n", "bench_old.md": "| old |", "tune_attention.jsonl": "{}\n",
             "tune_attention.md": "| old |"}
    for name, text in stale.items():
        (out / name).write_text(text)
    (out / "notes.txt").write_text("mine")
    r, out, calls = _gpu_check(tmp_path, out=out, GPU_CHECK_BENCH="attention", GPU_CHECK_TESTS="tests/test_x.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["bench.log", "bench_attention.jsonl", "build.log", "notes.txt", "summary.md",
                                       "tests.log"]
    summary = (out / "summary.md").read_text()
    assert "99 failed" not in summary and "| old |" not in summary and "old" not in (out / "build.log").read_text()
    report = [c for c in calls if "bench/report.py" in c]
    assert len(report) == 1 and f"{out}/bench_attention.jsonl --baseline" in report[0], report


def test_bench_names_take_commas_and_unknown_ones_stop_the_run(tmp_path):
    r, out, calls = _gpu_check(tmp_path, GPU_CHECK_BENCH="attention,overhead", GPU_CHECK_TESTS="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ran = [c for c in calls if c.startswith("CALL: bench/") and "report.py" not in c and "cpp_errors" not in c]
    assert [c.split()[1] for c in ran] == ["bench/bench_attention.py", "bench/overhead.py"], ran
    (out / "summary.md").write_text("the earlier run's")
    r, out, calls = _gpu_check(tmp_path, GPU_CHECK_BENCH="attention, atention")
    assert r.returncode == 2 and calls == []
    assert "unknown GPU_CHECK_BENCH step 'atention'" in r.stderr and "model, attention, overhead" in r.stderr
    assert (out / "summary.md").read_text() == "the earlier run's"   # nothing done, nothing removed
