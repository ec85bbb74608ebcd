"""Test session setup. Triton kernels run through the interpreter when no GPU is present; the variable
must be set before triton is imported anywhere, so it is decided here without importing torch.
Override with BEIT_FAST_TRITON_INTERPRET=0|1."""
import os
import shutil
import subprocess


def _has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except Exception:
        return False
    return out.returncode == 0 and "GPU" in out.stdout


_forced = os.environ.get("BEIT_FAST_TRITON_INTERPRET")
if _forced is not None:
    os.environ["TRITON_INTERPRET"] = _forced
elif not _has_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from beit_fast._backend import INTERPRETER_PROBLEM  # noqa: E402  (imports torch, not triton)

_INTERPRETER_PROBLEM = INTERPRETER_PROBLEM if os.environ.get("TRITON_INTERPRET") == "1" else None
if _INTERPRETER_PROBLEM and _forced is None:   # the interpreter tests skip, saying why in the header
    os.environ["TRITON_INTERPRET"] = "0"


# bf16 under the interpreter: an emulation of bf16 arithmetic (tests/interpreter_bf16.py) lets the kernels'
# bf16 paths run on the CPU; its INSTALL_PROBLEM says why not when it could not be installed.
import interpreter_bf16  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not _INTERPRETER_PROBLEM:
    interpreter_bf16.install()

import random  # noqa: E402
import zlib  # noqa: E402

# Fresh random inputs every run; the session seed is printed so a failure can be replayed with
# BEIT_FAST_TEST_SEED=<seed>.
SESSION_SEED = int(os.environ.get("BEIT_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))
# pytest-xdist workers start after this runs in the controller and inherit its environment: one seed, the
# printed one, for all of them
os.environ["BEIT_FAST_TEST_SEED"] = str(SESSION_SEED)


def pytest_report_header(config):
    lines = [f"beit_fast: BEIT_FAST_TEST_SEED={SESSION_SEED}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
    if _INTERPRETER_PROBLEM:
        lines.append(f"beit_fast: Triton kernel tests on the CPU skipped: {_INTERPRETER_PROBLEM}")
    elif os.environ.get("TRITON_INTERPRET") == "1" and interpreter_bf16.INSTALL_PROBLEM:
        lines.append(f"beit_fast: bf16 Triton kernel tests on the CPU skipped: {interpreter_bf16.INSTALL_PROBLEM}")
    return lines


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ SESSION_SEED) % (2**31))
    yield


def pytest_runtest_logreport(report):
    """BEIT_FAST_INSTAFAIL=1 (bench/gpu_check.sh sets it): print each failure's traceback as it happens, so a
    run stopped by a time limit still shows why what ran failed."""
    if report.failed and os.environ.get("BEIT_FAST_INSTAFAIL", "0") not in ("", "0"):
        import sys
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
        sys.stderr.flush()
