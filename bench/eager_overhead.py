"""Host time per call of the fused ops' Python layers on the CPU, kernel launches stubbed out: the eager fast
path (beit_fast/ops/_eager.py) against the torch.library registration it bypasses.

The Triton ops run under TRITON_INTERPRET=1 with the interpreter's launch replaced by a no-op, so what is
timed is the wrapper, the argument checks, the backend choice, the autograd machinery and the launcher's own
Python (it fails, naming the Triton, if the interpreter runs a kernel's program anyway, or if a Triton op's
timing launched nothing); the C++ ops (layer_scale_residual_norm, masked_patch_embed) run their CPU kernels on
tiny inputs.
Forward only and forward+backward, median of 7 rounds of 300 calls. CPU only (no GPU needed or used).

    python bench/eager_overhead.py [--rounds 7] [--calls 300]
"""
import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.interpreter as _interpreter  # noqa: E402

# Launches do nothing: GridExecutor.__call__ runs a launch's programs in Triton 3.2-3.8 (InterpretedFunction.run
# is no stub point: in 3.2-3.5 __init__ sets it per instance and __getitem__ builds a GridExecutor itself). The
# launches are counted, and so is every program the interpreter still runs (set_grid_idx: once per program).
LAUNCHES, PROGRAMS = [0], [0]


def _no_launch(self, *args, **kwargs):
    LAUNCHES[0] += 1


def _program(self, *args, _set=_interpreter.InterpreterBuilder.set_grid_idx):
    PROGRAMS[0] += 1
    return _set(self, *args)


_interpreter.GridExecutor.__call__ = _no_launch
_interpreter.InterpreterBuilder.set_grid_idx = _program

from beit_fast.ops import _eager  # noqa: E402
from common import host_us  # noqa: E402


TRITON_OPS = ("layer_norm", "linear_gelu", "rel_pos_attention_qkvpacked")


def _inputs():
    g = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    ln = importlib.import_module("beit_fast.ops.layer_norm")
    lg = importlib.import_module("beit_fast.ops.linear_gelu")
    at = importlib.import_module("beit_fast.ops.rel_pos_attention")
    ls = importlib.import_module("beit_fast.ops.layer_scale_residual_norm")
    mp = importlib.import_module("beit_fast.ops.masked_patch_embed")
    x, w, b, W, bW = g(2, 4, 64), g(64), g(64), g(256, 64), g(256)
    qkv, table = g(2, 5, 3, 2, 16), g(at.num_relative_distance((2, 2)), 2)
    xs, ys, gs = g(1, 1, 8), g(1, 1, 8), g(8)
    img, pw, pb, tok, cls = g(1, 3, 8, 8), g(4, 3, 4, 4), g(4), g(1, 1, 4), g(1, 1, 4)
    mask = torch.tensor([[True, False, False, True]])
    return {
        "layer_norm": lambda: ln.layer_norm(x, w, b, backend="triton"),
        "linear_gelu": lambda: lg.linear_gelu(x, W, bW, backend="triton"),
        "rel_pos_attention_qkvpacked": lambda: at.rel_pos_attention_qkvpacked(qkv, table, window_size=(2, 2),
                                                                               backend="triton"),
        "layer_scale_residual_norm": lambda: ls.layer_scale_residual_norm(xs, ys, gs, None, gs, gs,
                                                                           backend="cpp")[1],
        "masked_patch_embed": lambda: mp.masked_patch_embed(img, pw, pb, mask, tok, cls, backend="cpp"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args(argv)
    # the stubbed kernels leave their outputs as allocated (uninitialised memory), and the gradients the
    # backward accumulates from them can be denormal: CPU arithmetic on those took linear_gelu's fwd_bwd from
    # ~0.3 to ~30 ms in some runs. Flushed to zero, the timing is the Python's alone.
    torch.set_flush_denormal(True)
    ops = _inputs()
    fast_eager = _eager.eager
    print("| op | mode | fast path us | registered op us |\n|---|---|---|---|")
    launched = 0
    for name, fwd in ops.items():
        def fwd_bwd(fwd=fwd):
            out = fwd()
            out.backward(torch.ones_like(out))
        for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            got = []
            for on in (True, False):
                _eager.eager = fast_eager if on else (lambda *a: False)
                before = LAUNCHES[0]
                try:
                    got.append(host_us(fn, args.rounds, args.calls))
                finally:
                    _eager.eager = fast_eager
                if PROGRAMS[0]:
                    raise SystemExit(f"eager_overhead: the interpreter ran {PROGRAMS[0]} kernel programs while "
                                     f"{name} {mode} was timed: the launch stub does not hold for Triton "
                                     f"{triton.__version__}, the times would include the interpreted kernels")
                if name in TRITON_OPS and LAUNCHES[0] == before:
                    raise SystemExit(f"eager_overhead: {name} {mode} launched no Triton kernel through the stub "
                                     f"(Triton {triton.__version__}): its time is not that of the launch path")
                launched += LAUNCHES[0] - before
            print(f"| {name} | {mode} | {got[0]:.1f} | {got[1]:.1f} |")
    print(f"\nCPU: {os.cpu_count()} cores; torch {torch.__version__}; Python {sys.version.split()[0]}; "
          f"Triton {triton.__version__}: {launched} launches stubbed, {PROGRAMS[0]} programs interpreted")


if __name__ == "__main__":
    main()
