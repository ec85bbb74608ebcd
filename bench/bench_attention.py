"""Attention with a learnable relative position bias table, training (fwd, bwd, fwd+bwd).

Providers (each checked against the fp32 reference before it is timed):
  eager    timm's unfused path: gather the (H, N, N) bias, q@k^T + bias, softmax, @v (B*H*N*N scores)
  sdpa     timm's fused path: gather the bias, F.scaled_dot_product_attention(attn_mask=bias in q's dtype);
           the mask gradient flows back through the gather into the table (mem-efficient kernel on CUDA)
  flex     FlexAttention under torch.compile, score_mod = score + table[index[q, k], h] (atomics for dTable)
  xformers memory_efficient_attention with the gathered bias expanded to (B, H, N, N), when importable
  ours     beit_fast.ops.rel_pos_attention, Triton, as shipped (deterministic dTable; the kernels read the
           bias from a per-call (H, N, N_pad) fp32 expansion of the table, query-major for the forward and
           dQ, key-major for dK/dV: the tile configs' dense_bias, BEIT_FAST_ATTN_DENSE_BIAS ignored)
  ours_gather      the same with every kernel gathering the bias from the table per element
           (BEIT_FAST_ATTN_DENSE_BIAS=0: the measured default of the first GPU runs)
  ours_dkdv_gather the same with only dK/dV gathering (BEIT_FAST_ATTN_DENSE_BIAS=fwd,dq)
           (the three give bitwise the same results; bench/sass_report.py shows their loops' SASS)
  ours_jit_launch  ours with every Triton launch through JITFunction.run, not kernels/_launch.py's cache of
           compiled kernels (BEIT_FAST_TRITON_LAUNCH=jit: host time only, the same kernels run)

Each row also has gpu_ms / gpu_tflops on CUDA: the GPU's own time for the call (its kernels summed, from
torch.profiler; gpu_kernels_ms splits it per kernel), which median_ms (wall clock) shows only when the GPU is
the slower side: an eager op whose host takes longer to issue it than the GPU to run it times its host.
They are measured in a second pass after each shape's wall-clock timings (see common.gpu_time on CUPTI),
with warm L2 (the wall-clock timing flushes it before each call).
FLOPs (written down, as flash-attention counts them): fwd = 4 * B * H * N^2 * D (two matmuls),
bwd = 2.5 * fwd (five matmuls, recompute included), fwd_bwd = 3.5 * fwd.

    python bench/bench_attention.py --out bench/out [--dtypes bf16,fp16] [--quick] [--check-determinism]
    python bench/bench_attention.py --smoke --out /tmp/b     # CPU: eager and sdpa at a tiny shape
"""
import contextlib
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (Outcomes, Skip, base_parser, check_close, device_and_dtypes, environment, finish,  # noqa: E402
                    gpu_pass, make_row, peak_mb, selected_providers, time_ms, write_report)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from beit_fast.ops.rel_pos_attention import (not_supported_reasons, num_relative_distance,  # noqa: E402
                                             rel_pos_attention, rel_pos_attention_ref, relative_position_index)

# ours before the compiled ones (time limits). OURS_VARIANTS: (the kernels that read the bias from the
# per-call (H, N, N_pad) expansion instead of gathering it from the table, None: the tile configs decide;
# whether Triton launches go through kernels/_launch.py's cache), the A/Bs of ours
OURS_VARIANTS = {"ours": (None, True), "ours_gather": ((), True), "ours_dkdv_gather": (("fwd", "dq"), True),
                 "ours_jit_launch": (None, False)}
PROVIDERS = ("eager", "sdpa", "ours", "ours_gather", "ours_dkdv_gather", "ours_jit_launch", "flex", "xformers")
REFERENCE_PROVIDERS = ("eager", "sdpa")
MODELS = {"base": 12, "large": 16}   # heads; D = 64
# (model, B, window): BEiT-B/L at 224 (N = 197) and 384 (N = 577)
FULL_SHAPES = [(m, b, w) for m in ("base", "large") for w in ((14, 14), (24, 24)) for b in (64, 128, 256)]
QUICK_SHAPES = [("base", 128, (14, 14)), ("large", 64, (14, 14))]   # what bench/gpu_check.sh runs
SMOKE_SHAPES = [("tiny", 2, (4, 4))]
# check against the fp32 reference: (atol as a fraction of max |ref|, rtol) per dtype
CHECK_TOL = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 1e-2), torch.float32: (1e-4, 1e-4)}


def _bias(table, index, N):
    """(H, N, N), contiguous as timm makes it (a permuted view would slow the eager provider's broadcast add)."""
    return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()


# What a FlexAttention user passes when inductor's default tiles do not fit in shared memory (torch 2.11 on an
# H200 at BEiT's shapes with this score_mod: "out of resource ... Required: 278528 Hardware limit: 232448"):
# 64-wide forward tiles, 32-wide backward tiles, one pipeline stage.
FLEX_SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
                    "num_stages": 1}


def _flex_kernel_options(compiled, q, k, v, table, score_mod, scale):
    """None (inductor's defaults) when they compile for a forward and backward at this shape, else
    FLEX_SMALL_TILES (printed, so that the log says which ran)."""
    leaves = [t for t in (q, k, v, table) if t.requires_grad]
    try:
        out = compiled(q, k, v, score_mod=score_mod, scale=scale)
        if leaves:
            torch.autograd.grad(out.float().sum(), leaves)
        return None
    except Exception as e:  # inductor raises its own error types; only shared memory is retried
        if "out of resource" not in str(e):
            raise
        why = next(line for line in str(e).splitlines() if "out of resource" in line).strip()
        print(f"  flex: default tiles do not fit ({why[:160]}); "
              f"using kernel_options={FLEX_SMALL_TILES}")
        return dict(FLEX_SMALL_TILES)


def make_provider(name, window, scale, device, dtype):
    """fn(q, k, v, table) -> out (B, H, N, D) for one provider, or raise Skip."""
    N = window[0] * window[1] + 1
    index = relative_position_index(window).to(device)
    if name == "eager":
        def eager(q, k, v, table):
            attn = (q * scale) @ k.transpose(-2, -1) + _bias(table, index, N)   # fp32 like timm under autocast
            return attn.softmax(-1).to(v.dtype) @ v
        return eager
    if name == "sdpa":
        def sdpa(q, k, v, table):
            mask = _bias(table, index, N).unsqueeze(0).to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return sdpa
    if name == "flex":
        if device != "cuda":
            raise Skip("FlexAttention's fused kernel needs CUDA and torch.compile")
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except Exception as e:
            raise Skip(f"FlexAttention unavailable: {e}")
        # Each (shape, dtype) compiles flex_attention anew, and Dynamo counts every one against the same
        # function's recompile limit (8): the full sweep's 9th case would run the unfused fallback. Earlier
        # cases' compiled providers are done with by now, so their caches can go.
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        state = {}

        def flex(q, k, v, table):
            if state.get("table") is not table:   # one score_mod per table object: no recompiles
                idx = index

                def score_mod(score, b, h, qi, ki):
                    return score + table[idx[qi, ki], h]
                state.update(table=table, mod=score_mod)
            if "options" not in state:
                state["options"] = _flex_kernel_options(compiled, q, k, v, table, state["mod"], scale)
            return compiled(q, k, v, score_mod=state["mod"], scale=scale, kernel_options=state["options"])
        return flex
    if name == "xformers":
        try:
            import xformers.ops as xops
        except Exception as e:
            raise Skip(f"xformers not importable ({type(e).__name__})")
        if device != "cuda":
            raise Skip("xformers needs CUDA")

        def xformers_attn(q, k, v, table):
            B, H = q.shape[:2]
            pad = (N + 7) // 8 * 8
            # full (B, H, N, N) bias (its bias gradient needs one) in a buffer whose rows are 8-aligned
            bias = torch.empty(B, H, N, pad, device=q.device, dtype=q.dtype)[..., :N]
            bias.copy_(_bias(table, index, N).to(q.dtype).expand(B, -1, -1, -1))
            out = xops.memory_efficient_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_bias=bias, scale=scale)
            return out.transpose(1, 2)
        return xformers_attn
    if name in OURS_VARIANTS:
        probe = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)
        why = not_supported_reasons("triton", probe, probe, probe, torch.empty(1, 1, device=device))
        if why:
            raise Skip("; ".join(why))

        def ours(q, k, v, table):
            return rel_pos_attention(q, k, v, table, window_size=window, scale=scale, backend="triton")
        return ours
    raise ValueError(name)


@contextlib.contextmanager
def dense_bias(kernels, cached_launch: bool = True):
    """Inside the block the fused attention kernels named in `kernels` (True / False: all / none) read the
    dense bias expansion and the others gather from the table, and with None the tile configs decide,
    whatever BEIT_FAST_ATTN_DENSE_BIAS says (kernels.rel_pos_attention.DENSE_BIAS); Triton launches go
    through kernels/_launch.py's cache when `cached_launch` (and this Triton allows it), whatever
    BEIT_FAST_TRITON_LAUNCH says. So the "ours*" providers stay the sides of their A/Bs."""
    K = importlib.import_module("beit_fast.kernels.rel_pos_attention")
    L = importlib.import_module("beit_fast.kernels._launch")
    on = None if kernels is None else frozenset(K.KERNELS if kernels is True else () if kernels is False
                                                else kernels)
    saved = K.DENSE_BIAS, L.ENABLED
    K.DENSE_BIAS, L.ENABLED = on, cached_launch and L.CONVENTION is not None
    try:
        yield
    finally:
        K.DENSE_BIAS, L.ENABLED = saved


def make_inputs(B, H, N, D, R, dtype, device):
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    table = (torch.randn(R, H, device=device) * 0.5).requires_grad_()   # fp32 parameter, as the model stores it
    grad = torch.randn(B, H, N, D, device=device, dtype=dtype)
    return [q, k, v, table], grad


def reference_result(leaves, grad, window, scale):
    """fp32 reference output and gradients (q, k, v, table) for these inputs."""
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = rel_pos_attention_ref(*ref_leaves, window_size=window, scale=scale)
    return (ref.detach(),) + torch.autograd.grad(ref, ref_leaves, grad.float())


def check_provider(name, fn, leaves, grad, expected, dtype):
    """Output and every gradient against the fp32 reference, on the benchmarked inputs."""
    out = fn(*leaves)
    got = (out,) + torch.autograd.grad(out, leaves, grad)
    atol_frac, rtol = CHECK_TOL[dtype]
    for what, a, b in zip(("out", "dq", "dk", "dv", "dtable"), got, expected):
        check_close(f"{name} ({what})", a, b, atol=atol_frac * b.abs().max().item(), rtol=rtol)


def table_grad_deterministic(fn, leaves, grad, repeats=3):
    first = torch.autograd.grad(fn(*leaves), leaves, grad)[3]
    return all(torch.equal(first, torch.autograd.grad(fn(*leaves), leaves, grad)[3]) for _ in range(repeats - 1))


def bench_one(name, fn, shape, leaves, grad, dtype, device, env, args):
    """Wall-clock time and peak memory of each mode; -> (rows, [(row, (call, setup), flops, None)]) for the
    GPU-time pass (common.gpu_pass)."""
    B, H, N, D = leaves[0].shape
    fwd_flops = 4.0 * B * H * N * N * D
    extra = {}
    if args.check_determinism:
        extra["table_grad_deterministic"] = table_grad_deterministic(fn, leaves, grad)
    rows = []
    timed = {   # mode: (call, setup run untimed before each call (bwd: the forward), FLOPs)
        "fwd": (lambda: fn(*leaves), None, fwd_flops),
        "bwd": (lambda out: torch.autograd.grad(out, leaves, grad), lambda: fn(*leaves), 2.5 * fwd_flops),
        "fwd_bwd": (lambda: torch.autograd.grad(fn(*leaves), leaves, grad), None, 3.5 * fwd_flops),
    }
    rep = dict(warmup=2, rep=5) if device == "cpu" else {}
    for mode in ("fwd", "bwd", "fwd_bwd"):
        call, setup, flops = timed[mode]
        t = time_ms(call, device, setup=setup, **rep)
        peak = peak_mb(call, device, setup=setup)
        rows.append(make_row("rel_pos_attention", name, mode, shape, dtype, t, env, flops=flops, peak=peak, **extra))
        print(f"  {name:8s} {mode:7s} {t['median_ms']:9.3f} ms  "
              f"{rows[-1]['tflops'] or 0:7.2f} TFLOP/s  peak {peak if peak is None else round(peak, 1)} MB"
              + (f"  deterministic dTable: {extra['table_grad_deterministic']}" if extra else ""))
    return rows, [(r, timed[r["mode"]][:2], timed[r["mode"]][2], None) for r in rows]


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--check-determinism", action="store_true",
                   help="add a column: is each provider's table gradient bitwise reproducible (3 runs)")
    args = p.parse_args(argv)
    device, dtypes = device_and_dtypes(args)
    # under --smoke "ours" runs on the CPU only when asked for, under TRITON_INTERPRET=1
    wanted = selected_providers(args, PROVIDERS, smoke_default=REFERENCE_PROVIDERS)
    shapes = SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else FULL_SHAPES
    env = environment(device)
    rows, outcomes = [], Outcomes()
    pending = []   # for the GPU-time pass after a shape's wall timings (common.gpu_pass)
    for dtype in dtypes:
        for model, B, window in shapes:
            H, D = MODELS.get(model, 2), 64 if model in MODELS else 16
            N = window[0] * window[1] + 1
            scale = D ** -0.5
            shape = {"model": model, "B": B, "H": H, "N": N, "D": D}
            print(f"{model} B={B} H={H} N={N} D={D} {dtype}")
            expected = None
            with outcomes.guard(f"reference {model} B={B} N={N} {dtype}"):
                leaves, grad = make_inputs(B, H, N, D, num_relative_distance(window), dtype, device)
                expected = reference_result(leaves, grad, window, scale)
            if expected is None:
                continue
            for name in wanted:
                def context(name=name):
                    return dense_bias(*OURS_VARIANTS[name]) if name in OURS_VARIANTS else contextlib.nullcontext()
                label = f"{name} {model} B={B} N={N} {dtype}"
                with outcomes.guard(label), context():
                    fn = make_provider(name, window, scale, device, dtype)
                    check_provider(name, fn, leaves, grad, expected, dtype)
                    got, calls = bench_one(name, fn, shape, leaves, grad, dtype, device, env, args)
                    rows += got
                    pending.append((label, context, calls))
                # after every provider, so a run cut short by a time limit keeps what it measured
                write_report(rows, args.out, "bench_attention", outcomes)
            # this shape's GPU times, after all its wall-clock timings (the next shape's flex provider resets
            # Dynamo, which would make this one's compile again)
            gpu_pass(pending, device, outcomes)
            write_report(rows, args.out, "bench_attention", outcomes)
            pending.clear()
            del leaves, grad, expected
    notes = []
    if args.check_determinism:
        det = {}
        for r in rows:
            key = (r["provider"], r["dtype"])
            det[key] = det.get(key, True) and r["table_grad_deterministic"]
        notes.append("Table gradient bitwise reproducible (3 runs): "
                     + ", ".join(f"{p} {d}: {v}" for (p, d), v in sorted(det.items())))
    finish(rows, args.out, "bench_attention", outcomes, notes=notes)


if __name__ == "__main__":
    main()
