"""Worker of tests/test_triton_launch.py (its own process: Triton's compiler instead of the interpreter, and
bench/fake_driver.py as the driver, so the kernels compile for sm_90 and nothing runs).

Runs the launchers of kernels/ (attention forward and backward with both bias sources, dropout's keep mask,
LayerNorm forward and backward, linear_gelu's dGELU pass and its autotuned GEMM) three times: with
kernels._launch's cache off (every launch through JITFunction.run), then on twice (the first pass fills the
cache through JITFunction.run, the second must launch everything from it). Prints one JSON object: what each
pass's launcher received, reduced to comparable values, and how often JITFunction.run was entered in each pass.
Exit status 2 (and a reason) when this Triton cannot be driven so.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from fake_driver import Unsupported, install_fake_driver  # noqa: E402


def comparable(value):
    """A launcher argument as something json can hold and == can compare across passes: tensors by what
    the kernel sees of them (dtype, shape, strides, address alignment), everything else by value or type
    (the stream, function handle and metadata by type: the cached path passes the same objects)."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), list(value.stride()), value.data_ptr() % 16]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return [type(value).__name__, value]
    return ["object", type(value).__name__]


def scenarios(K_attn, K_ln, K_lg):
    from beit_fast.relpos import num_relative_distance
    torch.manual_seed(0)
    out = []
    for dtype, D, dense in ((torch.bfloat16, 64, None), (torch.bfloat16, 64, frozenset()),
                            (torch.float32, 32, frozenset(K_attn.KERNELS))):
        def attention(dtype=dtype, D=D, dense=dense):
            saved, K_attn.DENSE_BIAS = K_attn.DENSE_BIAS, dense
            try:
                B, H, window = 2, 2, (3, 3)
                N, R = 10, num_relative_distance((3, 3))
                qkv = torch.zeros(B, N, 3, H, D, dtype=dtype)
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                o = torch.zeros(B, N, H, D, dtype=dtype).transpose(1, 2)
                table = torch.zeros(R, H)
                lse = K_attn.rel_pos_attention_fwd(q, k, v, table, None, window, D ** -0.5, 0.0, None, o)
                dqkv = torch.zeros_like(qkv)
                dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
                inv = (torch.zeros(N * N, dtype=torch.int32), torch.zeros(R, dtype=torch.int32),
                       torch.zeros(R, dtype=torch.int32), 4)
                K_attn.rel_pos_attention_bwd(o, q, k, v, o, lse, table, None, window, D ** -0.5, 0.0, None,
                                             dq, dk, dv, inv)
            finally:
                K_attn.DENSE_BIAS = saved
        out.append(attention)
    out.append(lambda: K_attn.dropout_keep_mask(torch.tensor([7]), 2, 2, 10, 0.1))
    for dtype, C, misaligned in ((torch.float32, 768, False), (torch.float16, 100, True)):
        def layer_norm(dtype=dtype, C=C, misaligned=misaligned):
            base = torch.zeros(33 * C + 1, dtype=dtype)
            x = (base[1:] if misaligned else base[:-1]).view(33, C)   # a 2-byte offset: not 16-byte aligned
            w, b = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
            y, mean, rstd = K_ln.layer_norm_fwd(x, w, b, 1e-6)
            K_ln.layer_norm_bwd(y, x, w, mean, rstd)
        out.append(layer_norm)
    out.append(lambda: K_lg.linear_gelu_dz(torch.zeros(40, 64), torch.zeros(40, 32), torch.zeros(64, 32),
                                           torch.zeros(64), torch.zeros(40, 64), True))
    # the autotuned GEMM (under the stand-in driver its tuner keeps its first config)
    out.append(lambda: K_lg.linear_gelu_fwd(torch.zeros(40, 32, dtype=torch.bfloat16),
                                            torch.zeros(64, 32, dtype=torch.bfloat16),
                                            torch.zeros(64, dtype=torch.bfloat16)))
    return out


def main():
    try:
        launches = install_fake_driver(90)
        from triton.runtime.jit import JITFunction
    except (Unsupported, ImportError) as e:
        print(f"not available: {e}")
        return 2
    from beit_fast.kernels import _launch
    from beit_fast.kernels import layer_norm as K_ln
    from beit_fast.kernels import linear_gelu as K_lg
    from beit_fast.kernels import rel_pos_attention as K_attn
    gpu_configs = K_attn.pick_configs   # the GPU's tile configs (and their bias sources), not the interpreter's
    K_attn.pick_configs = lambda head_dim, dtype, device: gpu_configs(head_dim, dtype, torch.device("cuda"))
    if _launch.CONVENTION is None:
        print("not available: kernels._launch does not recognize this Triton's JITFunction.run")
        return 2
    entered = []
    real_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        entered.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)
    JITFunction.run = counting_run
    result = {"convention": list(_launch.CONVENTION), "passes": []}
    for enabled in (False, True, True):
        _launch.ENABLED = enabled
        launches.clear()
        entered.clear()
        for run in scenarios(K_attn, K_ln, K_lg):
            run()
        result["passes"].append({
            "enabled": enabled,
            "launches": [[name, list(grid), [comparable(a) for a in args]] for name, grid, args in launches],
            "jit_runs": len(entered),
        })
    # the cache told a misaligned tensor from an aligned one: two LayerNorm forward variants remembered
    cached = _launch._CACHED.get(id(K_ln._layer_norm_fwd_kernel))
    result["ln_fwd_variants"] = len({id(e.kernel) for e in cached.entries.values()}) if cached else 0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
