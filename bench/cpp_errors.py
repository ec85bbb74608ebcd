"""Do the C++ extension's argument errors reach Python on this machine, numbers included? Each case runs in
its own process, so that a crash (a signal instead of the expected ValueError) is reported per case instead
of ending the run. On the first GPU runs (bench/results/h200-*-2026-11-30) exactly the errors whose
messages held a number crashed their process (SIGSEGV) when the extension was built by the image's
/opt/gcc/bin/g++: a std::ostringstream made in a library that carries its own libstdc++ does not format
numbers (tests/test_cpp_messages.py rebuilds the sources with -static-libstdc++ to show it), so the
extension now builds its messages without streams (csrc/error_message.h). The first lines say how this
build links libstdc++ and what a stream made in it writes for 1234567 and 0.5 (diagnosis only).

    python bench/cpp_errors.py            # one line per case: ok / wrong error / CRASHED (signal)
Exit status: the number of cases that did not raise the expected error.
"""
import shutil
import subprocess
import sys

SETUP = "import torch, beit_fast.ops; ops = torch.ops.beit_fast\n"
# name -> (code that must raise, the exception type, a piece of its message)
CASES = {
    "torch's own TORCH_CHECK": ("torch.ones(2) + torch.ones(3)", "RuntimeError", "must match"),
    "block_mask height 0": ("ops.block_mask(2, 0, 14, 75, 16, -1, 0.3, 3.3, 0)", "ValueError",
                            "height and width must be positive, got 0x14"),
    "block_mask batch -1": ("ops.block_mask(-1, 14, 14, 75, 16, -1, 0.3, 3.3, 0)", "ValueError",
                            "batch must be >= 0, got -1"),
    "block_mask aspect (doubles)": ("ops.block_mask(2, 14, 14, 75, 16, -1, 2.5, 0.5, 0)", "ValueError",
                                    "got min_aspect=2.5, max_aspect=0.5"),
    "lsrn drop_path_scale shape": ("x = torch.ones(2, 4, 8); ops.layer_scale_residual_norm(x, x, None, "
                                   "torch.ones(3), None, None, 1e-6)", "ValueError",
                                   "drop_path_scale must have shape (B,) = (2,), got [3]"),
    "lsrn y dtype": ("x = torch.ones(2, 4, 8); ops.layer_scale_residual_norm(x, x.double(), None, None, None, "
                     "None, 1e-6)", "ValueError", "y must have x's dtype"),
    "lsrn ln_bias without ln_weight": ("x = torch.ones(2, 4, 8); ops.layer_scale_residual_norm(x, x, None, None, "
                                       "None, torch.ones(8), 1e-6)", "ValueError", "ln_bias was given"),
    "lsrn ln_bias without ln_weight, no grad": (
        "x = torch.ones(2, 4, 8)\nwith torch.no_grad(): ops.layer_scale_residual_norm(x, x, None, None, None, "
        "torch.ones(8), 1e-6)", "ValueError", "ln_bias was given"),
    "mpe weight dtype": ("ops.masked_patch_embed(torch.ones(1, 3, 8, 8), torch.ones(4, 3, 4, 4).double(), None, "
                         "None, None, torch.ones(1, 1, 4), None)", "ValueError", "weight must have the dtype"),
}


def run_case(code: str, exc: str, piece: str) -> subprocess.Popen:
    probe = (SETUP + "try:\n" + "".join(f"    {line}\n" for line in code.splitlines())
             + "except " + exc + " as e:\n"
             + f"    print('ok' if {piece!r} in str(e) else 'wrong message: ' + str(e)[:200])\n"
             + "else:\n    print('no error raised')\n")
    return subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def libstdcxx_linkage(so: str) -> str:
    """How the extension links libstdc++: as a shared library, or with a copy of it inside (it then defines
    std::ostream's number inserters itself)."""
    if not shutil.which("nm"):
        return "unknown (no nm)"
    syms = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True).stdout
    own = sum("_ZNSo9_M_insertI" in line for line in syms.splitlines())
    return (f"a copy inside the extension ({own} std::ostream number inserters defined there)" if own
            else "shared (std::ostream's number inserters come from libstdc++.so)")


def stream_probe() -> str:
    code = "import torch, beit_fast._C as c; print(repr(c._stream_format_probe()))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if p.returncode < 0:
        return f"CRASHED (signal {-p.returncode})"
    out = p.stdout.strip().splitlines()
    return out[-1] if p.returncode == 0 and out else f"failed (rc={p.returncode}): {p.stderr.strip()[-200:]}"


def main() -> int:
    where = subprocess.run([sys.executable, "-c", "import beit_fast._C as c; print(c.__file__)"],
                           capture_output=True, text=True)
    found = (where.stdout or where.stderr).strip().splitlines()[-1:]
    print(f"extension: {found}")
    if where.returncode == 0 and found:
        print(f"libstdc++: {libstdcxx_linkage(found[0])}")
        print(f"a stream in the extension writes {stream_probe()} for 1234567 and 0.5 (diagnosis only)")
    procs = {name: run_case(*case) for name, case in CASES.items()}
    bad = 0
    for name, p in procs.items():
        out, _ = p.communicate(timeout=300)
        lines = out.strip().splitlines()
        last = lines[-1] if lines else ""
        if p.returncode < 0:
            verdict = f"CRASHED (signal {-p.returncode})"
        elif p.returncode != 0 or last != "ok":
            verdict = f"FAILED (rc={p.returncode}): {last[:200]}"
        else:
            verdict = "ok"
        bad += verdict != "ok"
        print(f"{name:45s} {verdict}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
