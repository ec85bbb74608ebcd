"""kernels/_launch.py: a launch from the cache of compiled kernels hands the launcher exactly what
JITFunction.run would, for every kernel the launchers use (tests/launch_worker.py drives them in a process
of its own, compiling for sm_90 under bench/fake_driver.py); the cache key tells apart what Triton
specializes on."""
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cached_launches_hand_the_launcher_what_triton_does():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BEIT_FAST_TRITON_LAUNCH")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "launch_worker.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 2:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    off, first, second = result["passes"]
    assert not off["enabled"] and first["enabled"] and second["enabled"]
    names = [name for name, _, _ in off["launches"]]
    # every kernel of kernels/ (the autotuned GEMM too), the attention with both bias sources
    assert {"_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel", "_table_grad_kernel",
            "_expand_bias_kernel", "_keep_mask_kernel", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel",
            "_dgelu_kernel", "_linear_gelu_kernel"} <= set(names), names
    assert off["jit_runs"] == len(names)            # the cache off: every launch through JITFunction.run
    assert 0 < first["jit_runs"] < len(names)        # filling it (repeated variants already hit)
    assert second["jit_runs"] == 0                   # then nothing goes through JITFunction.run
    for p in (first, second):
        assert len(p["launches"]) == len(names)
        for want, got in zip(off["launches"], p["launches"]):
            assert got == want, (want[0], got, want)
    assert result["ln_fwd_variants"] == 2            # a misaligned x compiled (and is launched) apart


def _launch_module(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("BEIT_FAST_TRITON_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("BEIT_FAST_TRITON_LAUNCH", value)
    from beit_fast.kernels import _launch
    return _launch


def test_launch_setting(monkeypatch):
    pytest.importorskip("triton")
    for value, want in ((None, "cached"), ("", "cached"), ("cached", "cached"), (" jit ", "jit")):
        assert _launch_module(monkeypatch, value)._launch_setting() == want
    with pytest.raises(ValueError, match="BEIT_FAST_TRITON_LAUNCH must be 'cached' or 'jit'"):
        _launch_module(monkeypatch, "fast")._launch_setting()


def test_key_tells_apart_what_triton_specializes_on():
    pytest.importorskip("triton")
    import torch
    _launch = importlib.import_module("beit_fast.kernels._launch")
    key = _launch._Cached.key
    base = torch.zeros(40)
    aligned, misaligned = base[:8], base[1:9]
    k = lambda *args, **kw: key(0, args, kw)  # noqa: E731
    assert k(aligned, 16, 1.0) == k(torch.ones(8), 16, 1.0)                      # another tensor, same kind
    assert k(aligned, 16) != k(misaligned, 16)                                   # 16-byte alignment
    assert k(aligned, 16) != k(aligned.half(), 16)                               # dtype
    assert k(aligned, 16) != k(aligned, 17) != k(aligned, 1)                     # ints exactly
    assert k(aligned, 1) != k(aligned, True) and k(aligned, 1) != k(aligned, 1.0)  # bool / float are not int
    assert k(aligned, None, BLOCK=64, num_warps=4) != k(aligned, None, BLOCK=64, num_warps=8)
    assert k(aligned, FLAG=True) != k(aligned, FLAG=1) != k(aligned, FLAG=1.0)      # in constexprs too
    assert key(0, (aligned,), {}) != key(1, (aligned,), {})                      # the device

    class Sub(torch.Tensor):
        pass
    assert k(aligned.as_subclass(Sub)) is None                                   # subclasses take Triton's path
