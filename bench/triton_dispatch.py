"""Host time of the Triton launchers (kernels/) per call: every launch through Triton's JITFunction.run against
launches from kernels._launch's cache of compiled kernels. CPU only, no GPU needed or used.

bench/fake_driver.py stands in for the CUDA driver: the kernels compile for sm_90 (the first calls take
seconds), launches reach the compiled kernels' launchers and do nothing there. What is timed is each launcher's
own Python (allocations, tile choice, argument lists) plus the dispatch of its launches, on BEiT-B shapes with
CPU tensors (the allocations are the CPU allocator's; on a GPU the caching allocator's and the driver's launch
come on top). linear_gelu's autotuned GEMM keeps its first config (no GPU to time them). Median of `--rounds`
rounds of `--calls` calls.

    python bench/triton_dispatch.py [--rounds 7] [--calls 200]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from common import host_us  # noqa: E402
from fake_driver import Unsupported, install_fake_driver  # noqa: E402


def _calls():
    from beit_fast.kernels import layer_norm as LN
    from beit_fast.kernels import linear_gelu as LG
    from beit_fast.kernels import rel_pos_attention as A
    from beit_fast.relpos import num_relative_distance
    gpu_configs = A.pick_configs   # the GPU's tile configs, not the interpreter's
    A.pick_configs = lambda head_dim, dtype, device: gpu_configs(head_dim, dtype, torch.device("cuda"))
    A.num_batch_groups = lambda *a: 11   # an H100's, BEiT-B B=128
    B, H, N, D, window = 128, 12, 197, 64, (14, 14)
    dt = torch.bfloat16
    qkv = torch.zeros(B, N, 3, H, D, dtype=dt)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.zeros(B, N, H * D, dtype=dt).view(B, N, H, D).permute(0, 2, 1, 3)
    dqkv = torch.zeros_like(qkv)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    R = num_relative_distance(window)
    table = torch.zeros(R, H)
    inv = (torch.zeros(N * N, dtype=torch.int32), torch.zeros(R, dtype=torch.int32),
           torch.zeros(R, dtype=torch.int32), 64)
    lse = A.rel_pos_attention_fwd(q, k, v, table, None, window, D ** -0.5, 0.0, None, o)
    x = torch.zeros(B * N, 768, dtype=dt)
    w, b = torch.ones(768, dtype=dt), torch.zeros(768, dtype=dt)
    y, mean, rstd = LN.layer_norm_fwd(x, w, b, 1e-6)
    W1, b1 = torch.zeros(3072, 768, dtype=dt), torch.zeros(3072, dtype=dt)
    return {
        "linear_gelu_fwd": lambda: LG.linear_gelu_fwd(x, W1, b1),
        "rel_pos_attention_fwd": lambda: A.rel_pos_attention_fwd(q, k, v, table, None, window, D ** -0.5, 0.0,
                                                                 None, o),
        "rel_pos_attention_bwd": lambda: A.rel_pos_attention_bwd(o, q, k, v, o, lse, table, None, window,
                                                                 D ** -0.5, 0.0, None, dq, dk, dv, inv,
                                                                 dq_scratch=True),   # as the ops call it
        "layer_norm_fwd": lambda: LN.layer_norm_fwd(x, w, b, 1e-6),
        "layer_norm_bwd": lambda: LN.layer_norm_bwd(y, x, w, mean, rstd),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    try:
        launches = install_fake_driver(90)
    except Unsupported as e:
        print(f"triton_dispatch: not available here: {e}")
        return 2
    import triton

    from beit_fast.kernels import _launch
    if _launch.CONVENTION is None:
        print("triton_dispatch: kernels._launch does not recognize this Triton's JITFunction.run")
        return 2
    calls = _calls()
    print("| launcher | launches per call | Triton's dispatch us | launch cache us | saved us |\n|---|---|---|---|---|")
    for name, fn in calls.items():
        got = []
        for enabled in (False, True):
            _launch.ENABLED = enabled
            got.append(host_us(fn, args.rounds, args.calls))
        launches.clear()
        fn()
        print(f"| {name} | {len(launches)} | {got[0]:.1f} | {got[1]:.1f} | {got[0] - got[1]:.1f} |")
        launches.clear()
    print(f"\nCPU: {os.cpu_count()} cores; torch {torch.__version__}; Triton {triton.__version__}; "
          f"Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
