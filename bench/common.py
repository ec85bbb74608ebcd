"""The one helper every benchmark uses: timing, peak memory, environment, JSON rows, markdown tables.

A row is a flat dict: op, provider, mode (fwd|bwd|fwd_bwd), shape (dict), dtype, median_ms, p20_ms, p80_ms,
tflops, gbps, peak_mb, plus the environment (gpu, driver, torch, triton, cuda, git_sha, host). Rows are
written as JSON lines (`<name>.jsonl`) and a markdown table (`<name>.md`); bench/report.py merges files.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

# After a torch.profiler session Kineto leaves CUPTI attached unless TEARDOWN_CUPTI=1, and an attached CUPTI
# slows every later kernel launch on the host (pytorch/pytorch#144455, kineto#1539): wall-clock timings taken
# after gpu_time would carry it. Set before torch (and its profiler) load (the benchmark scripts import this
# module first); the benchmarks also take their GPU times after the wall-clock timings they would precede.
os.environ.setdefault("TEARDOWN_CUPTI", "1")

import torch  # noqa: E402

QUANTILES = (0.5, 0.2, 0.8)


# A compiled provider that hits Dynamo's recompile limit would fall back to eager (FlexAttention to its unfused
# version) and still pass its check: make that an error the benchmark records instead of a row it times.
try:
    import torch._dynamo.config as _dynamo_config
    for _flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):   # (torch 2.7+ name, 2.6's name)
        if hasattr(_dynamo_config, _flag):
            setattr(_dynamo_config, _flag, True)
            break
except ImportError:
    pass


class Skip(Exception):
    """A provider (or a whole case) that cannot run here; the reason is logged."""


class CheckFailed(Exception):
    """A provider whose result disagrees with the reference: reported, never timed."""


class Outcomes:
    """What did not become rows: providers skipped, failing their reference check, or raising an error.
    `with outcomes.guard(label):` keeps one provider's trouble from ending the whole benchmark."""

    def __init__(self):
        self.skipped, self.failed, self.errors = [], [], []

    @contextlib.contextmanager
    def guard(self, label: str):
        try:
            yield
        except Skip as e:
            self.skipped.append(f"{label}: {e}")
            print(f"  skip {label}: {e}")
        except CheckFailed as e:
            self.failed.append(label)
            print(f"  FAILED CHECK {label}: {e}")
        except torch.cuda.OutOfMemoryError:
            self.skipped.append(f"{label}: out of memory")
            print(f"  skip {label}: out of memory")
        except Exception as e:  # noqa: BLE001 -- an API difference, a compile error: record it and go on
            msg = " ".join(str(e).split())[:300]
            self.errors.append(f"{label}: {type(e).__name__}: {msg}")
            print(f"  ERROR {label}: {type(e).__name__}: {msg}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        # the BEIT_FAST_* knobs exported for the whole run (a provider may pin its own: see its script)
        "settings": {k: v for k, v in sorted(os.environ.items())
                     if k.startswith("BEIT_FAST_") and k != "BEIT_FAST_GIT_SHA"},
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["driver"] = _driver_version()
    else:
        env["gpu"] = None
        env["driver"] = None
    return env


def _git_sha() -> Optional[str]:
    """The commit measured, "-dirty" when the tree had changes; BEIT_FAST_GIT_SHA when set (a copy of the
    working tree without .git, as on a lent GPU machine, cannot say); None for an installed copy (beit_fast.bench),
    which is in no checkout of its own."""
    if os.environ.get("BEIT_FAST_GIT_SHA"):
        return os.environ["BEIT_FAST_GIT_SHA"]
    try:
        here = os.path.dirname(os.path.realpath(__file__))
        # only a checkout's own bench/ (its parent the work tree's top): a copy installed in a virtual
        # environment inside some other repository (a project's .venv) would name that project's commit
        top = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], cwd=here,
                                      stderr=subprocess.DEVNULL, text=True).strip()
        if os.path.realpath(top) != os.path.realpath(os.path.dirname(here)):
            return None
        return subprocess.check_output(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=here,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return None


def _driver_version() -> Optional[str]:
    try:
        return subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       text=True, stderr=subprocess.DEVNULL).strip().splitlines()[0]
    except Exception:
        return None


def time_ms(fn: Callable, device: str, *, warmup: int = 10, rep: int = 50, cuda_rep_ms: int = 100,
            setup: Optional[Callable[[], object]] = None, min_calls: int = 0) -> dict:
    """median / p20 / p80 in milliseconds of fn() or, with `setup`, of fn(setup()) with setup() run before
    each call and not timed (the backward alone: setup runs the forward, fn the backward over its fresh
    graph, so no graph is reused with retain_graph and compiled backwards keep their buffer donation).
    CUDA: CUDA events with L2 flushed before each call, over about `cuda_rep_ms` ms of calls
    (triton.testing.do_bench without setup), or `min_calls` calls when those take longer (a 100 ms training
    step would otherwise get 4); CPU: wall clock over `rep` calls after `warmup`."""
    if device == "cuda" and min_calls:
        cuda_rep_ms = max(cuda_rep_ms, min_calls * _estimate_ms(fn, setup))
    if device == "cuda" and setup is None:
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=cuda_rep_ms, quantiles=list(QUANTILES))
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    if device == "cuda":
        times = _cuda_times_with_setup(fn, setup, cuda_rep_ms)
    else:
        call = (lambda: fn(setup())) if setup is not None else fn
        for _ in range(warmup):
            call()
        times = []
        for _ in range(rep):
            arg = setup() if setup is not None else None
            t0 = time.perf_counter()
            fn(arg) if setup is not None else fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def _estimate_ms(fn, setup, calls: int = 3, warm: int = 2) -> float:
    """The mean GPU-synchronized time of a few calls of fn() (fn(setup()), setup not timed), in ms, after
    `warm` untimed calls (a first call's Triton compilation, autotuning or cudnn.benchmark search would
    otherwise inflate the estimate, and the timing sized from it, many times over)."""
    for _ in range(warm):
        fn(setup()) if setup is not None else fn()
    total = 0.0
    for _ in range(calls):
        arg = setup() if setup is not None else None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        torch.cuda.synchronize()
        total += time.perf_counter() - t0
    return total / calls * 1e3


def host_us(fn: Callable, rounds: int, calls: int, warmup: int = 20) -> float:
    """Median over `rounds` of the wall time per call of `calls` back-to-back calls, in microseconds (host
    time of CPU paths; nothing waits for a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def _cuda_times_with_setup(fn, setup, rep_ms: float) -> list[float]:
    """do_bench's method for fn(setup()): a few untimed calls, an estimate, then as many calls as fit in
    rep_ms (5 to 1000), each preceded by setup() and an L2 flush outside its pair of CUDA events."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def timed(n):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            arg = setup()
            flush.zero_()
            start.record()
            fn(arg)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    for _ in range(3):
        fn(setup())
    estimate = statistics.median(timed(5))
    return timed(max(5, min(1000, int(rep_ms / max(estimate, 1e-3)))))


# torch.cuda._sleep's kernel (ATen/cuda/Sleep.cu: "at::cuda::(anonymous namespace)::spin_kernel(long)"),
# launched right before and right after each profiled call: on the stream, the call's GPU work lies between
# the two, and setup's (issued before the first) does not
MARKER = "spin_kernel"


def _prelude() -> None:
    """Small kernels at the start of each profiler session, before the first marker (so never counted): CUPTI
    before CUDA 13.1 can lose, or zero the timestamps of, the first events of a session, more of them the
    longer the GPU was idle (pytorch/pytorch#192021)."""
    scratch = torch.zeros(256, device="cuda")
    for _ in range(16):
        scratch.add_(1)


def _marker() -> None:
    torch.cuda._sleep(1)


def profile_calls(calls, reps: int = 3) -> list:
    """The GPU work of `reps` calls of each of `calls` ((fn, setup or None, context factory or None): fn() or
    fn(setup()), setup untimed, inside context()) in ONE torch.profiler session, each call bracketed on the
    stream by marker kernels (MARKER). One session for a whole pass: with TEARDOWN_CUPTI=1 (set above) each
    session's CUPTI teardown runs asynchronously and can land inside the next session, which then records
    none or only part of its GPU activity (pytorch/kineto#1554; and consecutive sessions core-dumped in
    kineto#1169), so a session per call, back to back, could report a call's GPU time too low.
    Each fn is called once before the session (compiles, autotuning). -> per call: [{kernel name: ms} per rep]
    or the exception it raised; every non-exception entry None when the profile's markers cannot be matched
    to the calls made (the reason printed)."""
    from torch.profiler import ProfilerActivity, profile
    results: list = [None] * len(calls)
    for i, (fn, setup, context) in enumerate(calls):
        try:
            with (context or contextlib.nullcontext)():
                fn(setup()) if setup is not None else fn()
        except Exception as e:  # noqa: BLE001 -- the caller records it against the call
            results[i] = e
    brackets = []   # the call index of each bracketed call, in order
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _prelude()
        for i, (fn, setup, context) in enumerate(calls):
            if results[i] is not None:
                continue
            try:
                with (context or contextlib.nullcontext)():
                    for _ in range(reps):
                        arg = setup() if setup is not None else None
                        _marker()
                        brackets.append(i)
                        try:
                            fn(arg) if setup is not None else fn()
                        finally:
                            _marker()
            except Exception as e:  # noqa: BLE001
                results[i] = e
        torch.cuda.synchronize()
    # device-side work only: kernels, memsets, copies (not a record_function range's GPU-side span, which
    # would count its kernels twice: torch.compile's "## Call CompiledFxGraph ##", where the profiler has one)
    events = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA
                     and not getattr(ev, "is_user_annotation", False)), key=lambda ev: ev.time_range.start)
    bad = sum(ev.time_range.start < 0 or ev.time_range.elapsed_us() < 0 for ev in events)
    if bad:   # a zeroed timestamp (the CUPTI bug above) sorts the event out of place: it could count for another
        print(f"gpu_time: {bad} GPU events with invalid timestamps in the profile: no GPU times")
        return [r if isinstance(r, Exception) else None for r in results]
    buckets, current = [], None
    for ev in events:
        if MARKER in ev.name:
            if current is None:
                current = {}
            else:
                buckets.append(current)
                current = None
        elif current is not None:
            current[ev.name] = current.get(ev.name, 0.0) + ev.time_range.elapsed_us() / 1e3
    if len(buckets) != len(brackets) or current is not None:
        print(f"gpu_time: the profile holds {len(buckets)} marked calls, {len(brackets)} were made: no GPU times")
        return [r if isinstance(r, Exception) else None for r in results]
    per_call: list = [r if isinstance(r, Exception) else [] for r in results]
    for i, kernels in zip(brackets, buckets):
        if not isinstance(per_call[i], Exception):
            per_call[i].append(kernels)
    return per_call


def _summary(per_rep, with_setup: bool) -> Optional[dict]:
    """profile_calls' reps of one call -> {"gpu_ms", "gpu_kernels_ms"}: without setup the mean over the reps
    (back-to-back calls), with setup the median rep with its own split; None when nothing ran on the GPU."""
    if not per_rep:
        return None
    if with_setup:
        totals = [sum(k.values()) for k in per_rep]
        kernels = per_rep[sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]]
    else:
        kernels = {}
        for k in per_rep:
            for name, ms in k.items():
                kernels[name] = kernels.get(name, 0.0) + ms / len(per_rep)
    total = sum(kernels.values())
    if not total:
        print("gpu_time: the profiler recorded no GPU activity")
        return None
    return {"gpu_ms": total, "gpu_kernels_ms": {k: round(v, 5) for k, v in sorted(kernels.items(),
                                                                                    key=lambda kv: -kv[1])}}


def gpu_time(fn: Callable, device: str, setup: Optional[Callable[[], object]] = None,
             reps: int = 3) -> Optional[dict]:
    """GPU time of one call of fn() (or of fn(setup()), setup untimed): the summed durations of the kernels,
    memsets and copies it launches, from torch.profiler, in ms, and per kernel name. Without setup: the mean
    over `reps` back-to-back calls; with setup: the median of `reps` calls, with that call's own split (one
    profiler session either way: profile_calls). The host's time to issue the call is not in it: where the
    host is the slower side (a host-bound op), the wall-clock timing of time_ms shows the host and this shows
    the GPU's work. None on the CPU, or (with the reason printed) when the profiler fails: the wall-clock
    timing stands alone then. L2 is not flushed before the calls (warm), unlike time_ms. Callers time the
    wall clock first: profiling leaves CUPTI attached unless torn down (TEARDOWN_CUPTI=1, set above), which
    slows later launches on the host. Several calls to measure: gpu_pass (one session for all).
    -> {"gpu_ms": float, "gpu_kernels_ms": {name: ms}}"""
    if device != "cuda":
        return None
    try:
        (res,) = profile_calls([(fn, setup, None)], reps)
    except Exception as e:   # a profiler that cannot run here must not cost the measurement itself
        print(f"gpu_time: no GPU time ({type(e).__name__}: {e})")
        return None
    if isinstance(res, Exception):
        raise res
    return _summary(res, setup is not None)


def with_gpu_rates(gpu: Optional[dict], flops: Optional[float], nbytes: Optional[float]) -> dict:
    """gpu_time's result with gpu_tflops / gpu_gbps from the FLOPs / bytes of one call ({} without a GPU time)."""
    if not gpu or not gpu["gpu_ms"] > 0:
        return {}
    s = gpu["gpu_ms"] / 1e3
    return {**gpu, "gpu_tflops": flops / s / 1e12 if flops else None, "gpu_gbps": nbytes / s / 1e9 if nbytes else None}


def gpu_pass(pending, device: str, outcomes: "Outcomes", reps: int = 3) -> None:
    """The GPU's own time (gpu_time's, with with_gpu_rates) of every call a benchmark timed, added to its row,
    all in one profiler session (profile_calls: back-to-back sessions can lose GPU activity). Run after the
    wall-clock timings it would otherwise precede (see gpu_time on CUPTI). `pending`: (label, context
    factory, [(row, (call, setup), flops, nbytes)]) per provider; the context (the provider's settings) is
    entered around its calls again. A call that raises is recorded in `outcomes` under its label."""
    if device != "cuda":
        return
    flat = [(label, context, row, call, setup, flops, nbytes)
            for label, context, row_calls in pending for row, (call, setup), flops, nbytes in row_calls]
    try:
        results = profile_calls([(call, setup, context) for _, context, _, call, setup, _, _ in flat], reps)
    except Exception as e:  # noqa: BLE001 -- the profiler itself: the wall-clock rows stand alone
        print(f"gpu_time: no GPU times ({type(e).__name__}: {e})")
        return
    for (label, _, row, _, setup, flops, nbytes), res in zip(flat, results):
        with outcomes.guard(f"GPU time of {label}"):
            if isinstance(res, Exception):
                raise res
            gpu = with_gpu_rates(_summary(res, setup is not None), flops, nbytes)
            row.update(gpu)
            if gpu:
                print(f"  {label} {row['mode']}: GPU {gpu['gpu_ms']:.4f} ms")


def peak_mb(fn: Callable, device: str, setup: Optional[Callable[[], object]] = None) -> Optional[float]:
    """Peak memory allocated during one call of fn() (or of fn(setup()), setup's allocations counted as
    already there), above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    arg = setup() if setup is not None else None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(arg) if setup is not None else fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def make_row(op: str, provider: str, mode: str, shape: dict, dtype: torch.dtype, timing: dict, env: dict, *,
             flops: Optional[float] = None, nbytes: Optional[float] = None, peak: Optional[float] = None,
             **extra) -> dict:
    """One benchmark result. flops / nbytes are per call, from a formula written down by the caller."""
    med_s = timing["median_ms"] / 1e3
    row = {"op": op, "provider": provider, "mode": mode, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
           **timing,
           "tflops": (flops / med_s / 1e12) if flops else None,
           "gbps": (nbytes / med_s / 1e9) if nbytes else None,
           "peak_mb": peak}
    row.update(extra)
    row.update(env)
    return row


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def markdown_table(rows: list[dict]) -> str:
    cols = ["op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gpu_ms", "host_us", "gpu_us",
            "images_per_s", "tflops", "gpu_tflops", "gbps", "gpu_gbps", "pct_copy_bw", "gpu_pct_copy_bw", "peak_mb"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "shape":
                v = shape_str(v)
            elif isinstance(v, float):
                v = f"{v:.4g}"
            cells.append("" if v is None else str(v))
        out.append("| " + " | ".join(cells) + " |")
    hw = {r.get("gpu") or f"CPU ({r.get('cpu')})" for r in rows}
    out.append("")
    out.append(f"Hardware: {', '.join(sorted(hw))}; torch {rows[0].get('torch')}, triton {rows[0].get('triton')}, "
               f"CUDA {rows[0].get('cuda')}, git {rows[0].get('git_sha')}" if rows else "")
    settings = rows[0].get("settings") if rows else None
    if settings:
        out.append("Settings exported for the run: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    return "\n".join(out) + "\n"


def write_rows(rows: list[dict], out_dir: str, name: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, f"{name}.jsonl")
    mpath = os.path.join(out_dir, f"{name}.md")
    with open(jpath, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(mpath, "w") as f:
        f.write(markdown_table(rows))
    return jpath, mpath


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default="bench/out", help="folder for the JSON rows and markdown table")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, reference providers only, runs on the CPU (what CI runs)")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16, fp32")
    p.add_argument("--providers", default="all", help="comma list of providers, or all")
    p.add_argument("--quick", action="store_true",
                   help="the short sweep bench/gpu_check.sh runs (each script's docstring says which shapes)")
    return p


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtypes(s: str) -> list[torch.dtype]:
    try:
        return [DTYPES[x.strip()] for x in s.split(",") if x.strip()]
    except KeyError as e:
        raise SystemExit(f"unknown dtype {e}; expected a comma list of {sorted(DTYPES)}")


def device_and_dtypes(args) -> tuple[str, list[torch.dtype]]:
    """--smoke: the CPU in fp32; otherwise CUDA in the --dtypes asked for (a clear exit without a GPU)."""
    if args.smoke:
        return "cpu", [torch.float32]
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke test")
    return "cuda", parse_dtypes(args.dtypes)


def named_list(value: str, known, flag: str) -> tuple:
    """A comma list given to `flag`, every name one of `known` (a misspelt name is an error, not a comparison
    that silently leaves a provider or op out); `all` means every known one."""
    if value == "all":
        return tuple(known)
    names = tuple(x.strip() for x in value.split(",") if x.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown) or '(empty list)'}; known: {', '.join(known)}, or all")
    return names


def selected_providers(args, all_providers, smoke_default=None) -> tuple:
    """--providers as a tuple of known names; `all` means every provider (or `smoke_default` under --smoke)."""
    if args.providers == "all" and args.smoke and smoke_default is not None:
        return tuple(smoke_default)
    return named_list(args.providers, tuple(all_providers), "--providers")


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """Each provider is checked against the reference before it is timed: a wrong provider is not timed."""
    try:
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    except AssertionError as e:
        raise CheckFailed(f"provider {name} disagrees with the reference; not timing it:\n{e}") from None


def write_report(rows: list[dict], out_dir: str, name: str, outcomes: Optional[Outcomes] = None,
                 notes=()) -> Optional[str]:
    """The rows as JSON lines and a markdown table, with what was skipped, failed its check or raised.
    Called after every provider, so a run cut short by a time limit keeps what it measured."""
    if not rows:
        return None
    _, mpath = write_rows(rows, out_dir, name)
    o = outcomes or Outcomes()
    with open(mpath, "a") as f:
        if o.skipped:
            f.write("\nSkipped: " + "; ".join(o.skipped) + "\n")
        for note in notes:
            f.write("\n" + note + "\n")
        if o.failed:
            f.write("\nFailed the reference check (not timed): " + "; ".join(o.failed) + "\n")
        if o.errors:
            f.write("\nErrors (not timed): " + "; ".join(o.errors) + "\n")
    return mpath


def finish(rows: list[dict], out_dir: str, name: str, outcomes: Optional[Outcomes] = None, notes=()) -> None:
    """Write the report, print it, and exit non-zero when a provider failed its check or raised."""
    o = outcomes or Outcomes()
    if not rows:
        raise SystemExit("no provider ran" + "".join(f"; {k}: {v}" for k, v in
                                                     (("failed", o.failed), ("errors", o.errors)) if v))
    print(open(write_report(rows, out_dir, name, o, notes)).read())
    if o.failed or o.errors:
        raise SystemExit(f"providers disagree with the reference: {o.failed}; errors: {o.errors}")
