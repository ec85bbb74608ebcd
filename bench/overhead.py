"""Where the time of a call goes: host (Python + launch) against GPU kernel time, ours against PyTorch's.

For each op at BEiT-B training shapes (batch 128, bf16) and for a whole training step of the model, per call:
  host_us   the host's time to issue one call, the GPU not waited for (perf_counter over back-to-back calls;
            when the GPU is the slower side the host ends up waiting for queue space, so host_us is an upper
            bound that approaches gpu_us there)
  gpu_us    the time of the GPU work it launches (kernels, memsets and copies, from torch.profiler)
  median_ms the wall time per call of back-to-back calls (CUDA events around the loop): about
            max(host, gpu) once the queue is full; host-bound when host_us > gpu_us
The timed benchmarks (bench_attention / bench_blocks) flush L2 before every call, so a host-bound op shows
its host time there; this table says which ops are host-bound and by how much.

Providers: ours (the op with its backend forced, as bench_blocks does, and named in the row's `backend`: the
Triton kernels and the CUDA extension on CUDA; on the CPU the C++ op and, under TRITON_INTERPRET=1, the Triton
interpreter; skipped with the reason where that backend cannot run, never the reference in its place), eager /
sdpa (PyTorch's), and the training step's ours_fused and ours_reference (the model's own backend choice).

    python bench/overhead.py --out DIR [--smoke] [--providers ours,eager]   (--smoke: tiny CPU shapes, host time
    only; one shape, so no --quick)
"""
import contextlib
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (Outcomes, Skip, base_parser, device_and_dtypes, environment, finish, gpu_pass,  # noqa: E402
                    make_row, selected_providers, write_report)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import beit_fast.ops as ops  # noqa: E402
from beit_fast.models import create_model  # noqa: E402
from beit_fast.relpos import gather_bias, num_relative_distance, relative_position_index  # noqa: E402


def per_call(fn, device, n=50):
    """-> (host_us, median_ms of back-to-back calls); gpu_us comes from common.gpu_pass in a later pass"""
    for _ in range(5):
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        return host, host / 1e3
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / n


def with_backward(forward, leaves):
    """fn() = forward, then backward of a fixed random gradient into `leaves` (their .grad reset)."""
    grads = []

    def fn():
        out = forward()
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        if not grads:   # drawn once: the timed calls launch no RNG kernels
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grads)
        for t in leaves:
            t.grad = None
    return fn


PROVIDERS = ("ours", "eager", "sdpa", "ours_fused", "ours_reference")


def forced(op, backend, reasons_args, call):
    """-> (call, backend) when the op's `backend` can run on `reasons_args` (its not_supported_reasons), else a
    call that raises Skip with the reasons: an "ours" row never times another backend under its name."""
    why = importlib.import_module(f"beit_fast.ops.{op}").not_supported_reasons(backend, *reasons_args)
    if not why:
        return call, backend

    def unavailable():
        raise Skip(f"backend {backend!r}: " + "; ".join(why))
    return unavailable, backend


def cases(device, dtype, smoke):
    """(op, provider, forward, the backend it forces or None, leaves) of every op row."""
    B, N, C, H = (2, 17, 64, 2) if smoke else (128, 197, 768, 12)
    wh = 4 if smoke else 14
    hid = 4 * C
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    x, y = mk(B, N, C), mk(B, N, C)
    w, b, g = (torch.randn(C, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    W1, b1 = mk(hid, C), mk(hid)
    R = num_relative_distance((wh, wh))
    qkv = mk(B, N, 3, H, C // H)
    table = torch.randn(R, H, device=device, dtype=torch.float32, requires_grad=True)
    index = relative_position_index((wh, wh)).to(device)

    def sdpa_packed():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # contiguous, as timm and the reference model build it (the H200 re-check's row used a permuted,
        # non-contiguous mask: 4.47 ms of GPU time against bench_attention's 1.37 ms wall for SDPA)
        bias = gather_bias(table, index).unsqueeze(0).to(dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, N, C)

    def lsrn_eager():
        s = x + g * y
        return s, F.layer_norm(s, (C,), w, b, 1e-6)

    cpp = "cuda" if device == "cuda" else "cpp"   # the C++ op: its CUDA kernels on CUDA
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    yield ("layer_norm", "ours", *forced("layer_norm", "triton", (x, w, b),
                                         lambda: ops.layer_norm(x, w, b, backend="triton")), [x, w, b])
    yield "layer_norm", "eager", lambda: F.layer_norm(x, (C,), w, b, 1e-6), None, [x, w, b]
    yield ("layer_scale_residual_norm", "ours",
           *forced("layer_scale_residual_norm", cpp, (x, y, g, None, w, b),
                   lambda: ops.layer_scale_residual_norm(x, y, g, None, w, b, backend=cpp)), [x, y, g, w, b])
    yield "layer_scale_residual_norm", "eager", lsrn_eager, None, [x, y, g, w, b]
    yield ("linear_gelu", "ours", *forced("linear_gelu", "triton", (x, W1, b1),
                                          lambda: ops.linear_gelu(x, W1, b1, backend="triton")), [x, W1, b1])
    yield "linear_gelu", "eager", lambda: F.gelu(F.linear(x, W1, b1)), None, [x, W1, b1]
    yield ("rel_pos_attention_qkvpacked", "ours",
           *forced("rel_pos_attention", "triton", (q, k, v, table, (wh, wh)),
                   lambda: ops.rel_pos_attention_qkvpacked(qkv, table, window_size=(wh, wh), backend="triton")),
           [qkv, table])
    yield "rel_pos_attention_qkvpacked", "sdpa", sdpa_packed, None, [qkv, table]


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--model", default="beit_base_patch16_224", help="model of the training-step rows")
    p.add_argument("--batch", type=int, default=64, help="batch of the training-step rows")
    args = p.parse_args(argv)
    if args.quick:
        p.error("--quick: overhead.py has one shape (BEiT-B, batch 128), nothing to shorten")
    wanted = selected_providers(args, PROVIDERS)
    device, dtypes = device_and_dtypes(args)
    env = environment(device)
    rows, outcomes = [], Outcomes()

    pending = []   # (label, row, fn): the GPU-time pass after every host timing

    def add(op, prov, mode, shape, dtype, fn, backend=None):
        label = f"{op} {prov} {mode}"
        with outcomes.guard(label):
            host, wall_ms = per_call(fn, device)
            rows.append(make_row(op, prov, mode, shape, dtype, {"median_ms": wall_ms, "p20_ms": None,
                                                                  "p80_ms": None}, env,
                                 host_us=round(host, 1), gpu_us=None, backend=backend))
            pending.append((label, rows[-1], fn))
            print(f"{label}: host {host:.1f} us, back-to-back {wall_ms * 1e3:.1f} us")
        write_report(rows, args.out, "bench_overhead", outcomes)   # a time limit keeps what ran

    for dtype in dtypes:
        shape = {"B": 2, "N": 17, "C": 64} if args.smoke else {"B": 128, "N": 197, "C": 768}
        for op, prov, fwd, backend, leaves in cases(device, dtype, args.smoke):
            if prov in wanted:
                add(op, prov, "fwd", shape, dtype, fwd, backend)
                add(op, prov, "fwd_bwd", shape, dtype, with_backward(fwd, leaves), backend)
        name = "beit_test_patch4_32" if args.smoke else args.model
        batch = 2 if args.smoke else args.batch
        for prov, kw in (("ours_fused", dict(fused=True, attn_impl="fused")),
                         ("ours_reference", dict(fused=False, attn_impl="sdpa"))):
            if prov not in wanted:
                continue
            with outcomes.guard(f"train_step {prov}"):
                model = create_model(name, **kw).to(device).train()
                img = model.config.img_size
                images = torch.randn(batch, 3, img, img, device=device)
                target = torch.randint(0, model.config.num_classes, (batch,), device=device)
                autocast = dict(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

                def step(model=model, images=images, target=target, autocast=autocast):   # (bound now: the
                    with torch.autocast(**autocast):                                       # GPU pass is later)
                        loss = F.cross_entropy(model(images).float(), target)
                    loss.backward()
                    for q in model.parameters():
                        q.grad = None
                add("train_step", prov, "fwd_bwd", {"model": name, "B": batch}, dtype, step)
    if device == "cuda":
        # after every host timing of the run, all in one profiler session (see common.gpu_time on CUPTI and
        # common.profile_calls), each call 10 times back to back
        gpu_pass([(label, contextlib.nullcontext, [(row, (fn, None), None, None)]) for label, row, fn in pending],
                 device, outcomes, reps=10)
        for _, row, _ in pending:
            row["gpu_us"] = round(row["gpu_ms"] * 1e3, 1) if row.get("gpu_ms") else None
            print(f"{row['op']} {row['provider']} {row['mode']}: gpu {row['gpu_us']} us")
        write_report(rows, args.out, "bench_overhead", outcomes)
    finish(rows, args.out, "bench_overhead", outcomes)


if __name__ == "__main__":
    main()
