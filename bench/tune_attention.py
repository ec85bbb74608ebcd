"""Tile sweep for the fused attention kernels: which (block_m, block_n, num_warps, num_stages) each of the
three main kernels (forward, dK/dV + dBias partials, dQ) should use on this GPU.

The kernels take one fixed, named config per (dtype, padded head dim) (kernels/rel_pos_attention.py,
CONFIGS: no autotuner, so the table gradient stays reproducible across processes). This script measures
candidates for each kernel through the public op, exactly as the model calls it (packed (B, N, 3, H, D) qkv,
window-derived index, fp32 table with its gradient), changing one kernel's tile at a time:
  fwd    time of the forward                          (candidate forward tile, default backward tiles)
  dkdv   time of the backward (Delta, dK/dV, dQ, dTable) with a candidate dK/dV tile
  dq     time of the backward with a candidate dQ tile
On CUDA the sweep ranks by the pass's GPU time (its kernels summed, from torch.profiler; rows also keep the
per-kernel split and the wall time): the wall time of an eager call is the host's when the host takes longer
to issue it than the GPU to run it, which on the GPU machine measured so far was the backward's case.
Every candidate is first checked against the fp32 reference (output, dqkv, dtable); a candidate that does
not compile or does not fit (shared memory) is recorded as an error / skip and the sweep goes on. The
default config is measured first and again last (the summary takes its faster timing, so that a GPU still
settling in the first timing cannot inflate a gain); candidates are interleaved across the three kernels so that a run cut
short by --seconds still covers all three. The report ends with the best tile per kernel, its speed-up
over the default, and the CONFIGS entry to commit when the gain is worth it.

    python bench/tune_attention.py --out bench/out [--dtypes bf16] [--seconds 150] [--full]
    TRITON_INTERPRET=1 python bench/tune_attention.py --smoke --out /tmp/t   # CPU: two tiles per kernel
"""
import time

_STARTED = time.monotonic()   # --seconds counts from here, imports included

import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (Outcomes, Skip, base_parser, check_close, device_and_dtypes, environment, finish,  # noqa: E402
                    gpu_time, make_row, time_ms, write_report)
from bench_attention import CHECK_TOL  # noqa: E402

import torch  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from beit_fast.ops.rel_pos_attention import (not_supported_reasons, num_relative_distance,  # noqa: E402
                                             rel_pos_attention_qkvpacked, rel_pos_attention_ref)

KERNELS = ("fwd", "dkdv", "dq")
# (model, B, H, window, D)
QUICK_SHAPES = [("base", 128, 12, (14, 14), 64)]   # the target shape; what bench/gpu_check.sh runs
FULL_SHAPES = QUICK_SHAPES + [("large", 64, 16, (14, 14), 64), ("base", 32, 12, (24, 24), 64),
                              ("d128", 64, 6, (14, 14), 128)]
SMOKE_SHAPES = [("tiny", 2, 2, (4, 4), 16)]


def candidates(K, kernel: str, smoke: bool) -> list:
    """Tiles to try for one kernel. block_m / block_n mean what the kernel's TileConfig says (dkdv: query
    step of the inner loop / the program's key block; dq: the program's query block / key step); on a GPU
    each with the inner loop's tail peeled and not (TileConfig.tail; --smoke: two tiles, peeled)."""
    T = K.TileConfig
    if smoke:   # the interpreter: a few tiles, enough to exercise the sweep on the CPU
        return [T(64, 64), T(32, 32)]
    # the likelier winners on Hopper first (a run cut short by --seconds has tried those): large query
    # tiles, 8 warps, deeper pipelining
    grids = {
        "fwd": [(128, 64), (128, 128), (64, 64), (128, 32), (64, 128), (64, 32)],
        "dkdv": [(32, 64), (64, 64), (32, 128), (16, 64), (64, 128), (16, 128)],
        "dq": [(64, 32), (128, 32), (64, 64), (128, 64)],
    }[kernel]
    return [T(m, n, w, s, tail) for m, n in grids for w in (8, 4) for s in (3, 2) for tail in (True, False)]


def tile_str(t) -> str:
    return (f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}" + ("" if t.tail else " masked")
            + (" blocktail" if t.block_tail else "") + (" dense" if t.dense_bias else ""))


def queue(K, kernel: str, default, N: int, smoke: bool) -> list:
    """The default tile, then the same tile with its bias source (gathered in the kernel / dense expansion),
    its tail choice and its block-tail choice flipped in turn (the A/Bs the CONFIGS comment asks a GPU for),
    then the other candidates with the default's block tail and bias source, each followed by itself with
    the block tail flipped where that changes the last program's tile at this N (a 64-row forward tile with
    a 16-row last program covers N = 197 in 208 rows instead of 256), then the default timed again."""
    own = (lambda t: t.block_n) if kernel == "dkdv" else (lambda t: t.block_m)   # the program's own axis

    def block_tail_matters(t):   # (--smoke keeps the interpreter's few tiles)
        return smoke or K._block_tail(N, own(t), True) > 0

    first = [default, dataclasses.replace(default, dense_bias=not default.dense_bias),
             dataclasses.replace(default, tail=not default.tail)]
    first += [dataclasses.replace(default, block_tail=not default.block_tail)] if block_tail_matters(default) else []
    rest = []
    for t in candidates(K, kernel, smoke):
        t = dataclasses.replace(t, block_tail=default.block_tail, dense_bias=default.dense_bias)
        rest += [t] + ([dataclasses.replace(t, block_tail=not t.block_tail)]
                       if block_tail_matters(t) and not smoke else [])
    out = []
    for t in first + rest:
        if t not in out:
            out.append(t)
    # the default again at the end: its first timing runs on a GPU that has not yet settled (one committed
    # sweep's default forward read 0.56 ms, p20-p80 0.52-0.61, against 0.42 for a near-twin right after it);
    # the summary takes the default's faster timing, so a gain is never credited to warm-up
    return out + [default] if len(out) > 1 else out


class _Configs:
    """Makes the kernels' pick_configs return `cfgs` while active (the launchers look it up per call)."""

    def __init__(self, K, cfgs):
        self.K, self.cfgs = K, cfgs

    def __enter__(self):
        self.saved = self.K.pick_configs
        self.K.pick_configs = lambda *a, **k: self.cfgs

    def __exit__(self, *exc):
        self.K.pick_configs = self.saved


def make_case(B, H, window, D, dtype, device):
    N = window[0] * window[1] + 1
    R = num_relative_distance(window)
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    table = (torch.randn(R, H, device=device) * 0.5).requires_grad_()
    grad = torch.randn(B, N, H * D, device=device, dtype=dtype)
    return qkv, table, grad


def reference(qkv, table, grad, window, scale):
    """fp32 reference output (B, N, H*D) and gradients of qkv and the table."""
    qkv32 = qkv.detach().float().requires_grad_()
    table32 = table.detach().clone().requires_grad_()
    q, k, v = (qkv32.select(2, i).transpose(1, 2) for i in range(3))
    out = rel_pos_attention_ref(q, k, v, table32, window_size=window, scale=scale)
    out = out.transpose(1, 2).flatten(2)
    return (out.detach(),) + torch.autograd.grad(out, (qkv32, table32), grad.float())


def run_candidate(K, cfgs, kernel, qkv, table, grad, window, scale, expected, dtype, device, rep_ms):
    """Check one config set against the reference, then time the kernel's pass; returns the timing."""
    def fwd():
        return rel_pos_attention_qkvpacked(qkv, table, window_size=window, scale=scale, backend="triton")

    with _Configs(K, cfgs):
        try:
            out = fwd()
            got = (out,) + torch.autograd.grad(out, (qkv, table), grad, retain_graph=True)
        except OutOfResources as e:   # a tile over this GPU's shared memory / registers: not a failure
            raise Skip(f"does not fit: {e}") from None
        atol_frac, rtol = CHECK_TOL[dtype]
        for what, a, b in zip(("out", "dqkv", "dtable"), got, expected):
            check_close(f"{kernel} {what}", a, b, atol=atol_frac * b.abs().max().item(), rtol=rtol)
        if kernel == "fwd":
            call = fwd
        else:
            def call():
                return torch.autograd.grad(out, (qkv, table), grad, retain_graph=True)
        rep = dict(warmup=1, rep=3) if device == "cpu" else dict(cuda_rep_ms=rep_ms)
        t = time_ms(call, device, **rep)
        t.update(gpu_time(call, device) or {})   # CUDA: the pass's GPU time, what the sweep ranks by
        return t


def sweep(K, shape_key, case, window, scale, dtype, device, env, args, deadline, rows, outcomes, done):
    """All candidates of one (dtype, shape), interleaved across kernels, default first. Returns the
    per-kernel results {kernel: [(gpu_ms or None, wall ms, tile, is_default)]}. The report (with the summary
    so far, `done` being the finished sweeps) is rewritten after every tile, so a run cut short keeps both."""
    qkv, table, grad = case
    B, N, _, H, D = qkv.shape
    base = K.pick_configs(D, dtype, qkv.device)
    expected = reference(qkv, table, grad, window, scale)
    queues = {k: queue(K, k, getattr(base, k), N, args.smoke) for k in KERNELS}
    results = {k: [] for k in KERNELS}
    fwd_flops = 4.0 * B * H * N * N * D
    longest = max(len(q) for q in queues.values())
    for i in range(longest):
        for kernel in KERNELS:
            if i >= len(queues[kernel]):
                continue
            if time.monotonic() > deadline:
                outcomes.skipped.append(f"{kernel} {shape_key}: out of time after {i} tiles")
                return results
            tile = queues[kernel][i]
            is_default = tile == queues[kernel][0]
            cfgs = dataclasses.replace(base, **{kernel: tile})
            label = f"{kernel} {tile_str(tile)} {' '.join(map(str, shape_key))} {str(dtype).replace('torch.', '')}"
            with outcomes.guard(label):
                t = run_candidate(K, cfgs, kernel, qkv, table, grad, window, scale, expected, dtype, device,
                                  args.rep_ms)
                mode = "fwd" if kernel == "fwd" else "bwd"
                flops = fwd_flops * (1.0 if kernel == "fwd" else 2.5)
                gpu = {k: t.pop(k) for k in ("gpu_ms", "gpu_kernels_ms") if k in t}
                rows.append(make_row(f"attention_tile_{kernel}", tile_str(tile), mode, shape_key_dict(shape_key),
                                     dtype, t, env, flops=flops, default=is_default, **gpu))
                results[kernel].append((gpu.get("gpu_ms"), t["median_ms"], tile, is_default))
                print(f"  {label:45s} {t['median_ms']:8.3f} ms" + (f"  GPU {gpu['gpu_ms']:.3f} ms" if gpu else "")
                      + ("  (default)" if is_default else ""))
            write_report(rows, args.out, "tune_attention", outcomes, notes=[summary(done + [(dtype, shape_key, results)])])
    return results


def shape_key_dict(key):
    model, B, H, N, D = key
    return {"model": model, "B": B, "H": H, "N": N, "D": D}


def summary(sweeps) -> str:
    """The best tile per kernel next to the default, and the CONFIGS line it implies; `sweeps` is a list of
    (dtype, shape_key, {kernel: [(gpu_ms or None, wall ms, tile, is_default)]}). A kernel's tiles are ranked by
    their GPU time when every one has it, else all by their wall time (never the two mixed: a tile whose
    profile failed would be ranked by a time that also holds the host's and L2 flush's)."""
    lines = ["Best tile per kernel (the pass's GPU time on CUDA, from torch.profiler, else the median wall time, "
             "in ms; speed-up over the current default):", "",
             "| dtype | shape | kernel | default | ms | best | ms | speed-up |", "|---|---|---|---|---|---|---|---|"]
    suggestions = []
    for dtype, key, results in sweeps:
        best = {}
        for kernel in KERNELS:
            timed = results.get(kernel) or []
            if not timed:
                continue
            gpu = all(r[0] is not None for r in timed)
            res = [(r[0] if gpu else r[1], r[2], r[3]) for r in timed]
            b_ms, b_tile, _ = min(res, key=lambda r: r[0])
            best[kernel] = b_tile
            default = min((r for r in res if r[2]), key=lambda r: r[0], default=None)   # timed first and last
            d_cells = (f"{tile_str(default[1])} | {default[0]:.4g}" if default else "(failed or not run) | ")
            gain = f"{default[0] / b_ms:.3f}x" if default else ""
            lines.append(f"| {str(dtype).replace('torch.', '')} | {' '.join(map(str, key))} | {kernel} | "
                         f"{d_cells} | {tile_str(b_tile)} | {b_ms:.4g} | {gain} |")
        if len(best) == len(KERNELS):
            fmt = ", ".join(f"TileConfig({t.block_m}, {t.block_n}, {t.num_warps}, {t.num_stages}"
                            + ("" if t.tail else ", tail=False") + (", block_tail=True" if t.block_tail else "")
                            + (", dense_bias=True" if t.dense_bias else "") + ")"
                            for t in (best[k] for k in KERNELS))
            suggestions.append(f"{str(dtype).replace('torch.', '')} {' '.join(map(str, key))}: AttnConfigs({fmt})")
    if suggestions:
        lines += ["", "CONFIGS entries the measurements suggest (commit only gains beyond run-to-run noise):", ""]
        lines += [f"    {s}" for s in suggestions]
    return "\n".join(lines)


def main(argv=None):
    p = base_parser(__doc__)
    p.set_defaults(dtypes="bf16")
    p.add_argument("--seconds", type=float, default=150.0, help="stop starting new tiles after this long")
    p.add_argument("--full", action="store_true", help="also BEiT-L, N=577 and head dim 128 shapes")
    p.add_argument("--rep-ms", type=int, default=50, help="CUDA: milliseconds of calls timed per tile")
    args = p.parse_args(argv)
    deadline = _STARTED + args.seconds
    device, dtypes = device_and_dtypes(args)
    from beit_fast.kernels import rel_pos_attention as K
    env = environment(device)
    rows, outcomes, done = [], Outcomes(), []
    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES if args.full else QUICK_SHAPES
    for dtype in dtypes:
        for model, B, H, window, D in shapes:
            N = window[0] * window[1] + 1
            key = (model, B, H, N, D)
            print(f"{model} B={B} H={H} N={N} D={D} {dtype}")
            with outcomes.guard(f"{model} B={B} N={N} D={D} {dtype}"):
                case = make_case(B, H, window, D, dtype, device)
                why = not_supported_reasons("triton", *(case[0].select(2, i).transpose(1, 2) for i in range(3)),
                                            case[1], window_size=window)
                if why:
                    raise Skip("; ".join(why))
                results = sweep(K, key, case, window, D ** -0.5, dtype, device, env, args, deadline, rows,
                                outcomes, done)
                done.append((dtype, key, results))
                del case
    finish(rows, args.out, "tune_attention", outcomes, notes=[summary(done)])


if __name__ == "__main__":
    main()
