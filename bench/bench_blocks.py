"""The fused block ops and a whole BEiT block, training (fwd, bwd, fwd+bwd).

Ops and providers (each provider checked against the eager reference on the timed inputs before timing):
  masked_patch_embed          eager (conv -> mask blend -> cat cls), compile (the same under torch.compile),
                              ours (beit_fast extension: gather + cuBLAS + fused epilogue)
  layer_scale_residual_norm   eager (x + s * (g * y) then F.layer_norm), compile, ours (extension kernel),
                              ours_block_rows (CUDA: the same with BEIT_FAST_LSRN_FORWARD=block, the
                              forward on one block per row instead of one warp per row: an A/B),
                              apex (the eager residual + apex FusedLayerNorm, when apex imports)
  linear_gelu                 eager (F.gelu(F.linear)), compile, ours (beit_fast.ops.linear_gelu, Triton,
                              pre-activation stored for the backward: the default), ours_recompute (the
                              same op with recompute=True: the backward reruns the GEMM), apex (FusedDense
                              + F.gelu), when the op module imports
  layer_norm                  eager (F.layer_norm), compile, ours (beit_fast.ops.layer_norm, Triton), apex
                              (FusedLayerNorm), when the op module imports
  block                       eager (beit_fast.models.beit.Block.forward, SDPA attention, as timm),
                              compile (the same under torch.compile), ours (Block.forward_fused as the
                              model runs it by default: fused attention and layer_scale_residual_norm, fc1 +
                              GELU as nn.Linear + nn.GELU; it also produces the next block's norm1, which the
                              eager block leaves to its successor), ours_mlp_triton (the same with fc1 + GELU
                              through linear_gelu: fused_mlp=True)

Bytes each op must move (e = element size, M = B*N rows, params and (B, N) statistics ignored):
  masked_patch_embed  fwd: images B*Cin*H*W*e + weight C*K*e + out B*(1+P)*C*e + mask B*P
                      bwd (images need no grad): grad B*(1+P)*C*e + images + weight grad C*K*e
  layer_scale_residual_norm  fwd: read x, y, write s, n = 4*M*C*e;  bwd: read ds, dn, s, y, write dx, dy
                      = 6*M*C*e
  linear_gelu         fwd: x M*K*e + W N*K*e + y and the pre-activation 2*M*N*e (stored for the backward: ours,
                      eager's F.linear output; ours_recompute does not write it, so its GB/s reads high);
                      bwd: dy, preact, x, W read + dx, dW written
  layer_norm          fwd: read x, write y = 2*M*C*e;  bwd: read dy, x, write dx = 3*M*C*e
FLOPs: patch embed 2*B*P*C*K (fwd), the same for bwd (dW only); linear_gelu 2*M*N*K fwd, 4*M*N*K bwd;
block fwd = 24*M*C^2 + 4*B*N^2*C (qkv, proj, fc1, fc2; QK^T and PV), bwd = 2x the GEMMs + 2.5x attention.

    python bench/bench_blocks.py --out bench/out [--dtypes bf16] [--quick] [--ops block,layer_norm]
    (--quick: BEiT-B only, torch.compile only for layer_scale_residual_norm and the block: what
     bench/gpu_check.sh runs; every row of a memory-bound op carries pct_copy_bw, its GB/s as a percentage of
     that of a plain copy moving the same bytes, measured in the same run; on CUDA also gpu_ms / gpu_gbps /
     gpu_pct_copy_bw, the same by the GPU's own time (common.gpu_time), which a host-bound call's wall time
     does not show)
    python bench/bench_blocks.py --smoke --out /tmp/b     # CPU: tiny shapes, eager and cpp providers
"""
import contextlib
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (CheckFailed, Outcomes, Skip, base_parser, check_close, device_and_dtypes,  # noqa: E402
                    environment, finish, gpu_pass, make_row, named_list, peak_mb, selected_providers, time_ms,
                    write_report)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# the whole block first: its compiled row carries the block target, and a time limit cuts the end of a run
OPS = ("block", "layer_scale_residual_norm", "layer_norm", "masked_patch_embed", "linear_gelu")
MEMORY_BOUND = ("layer_scale_residual_norm", "layer_norm")   # measured against the copy bandwidth
PROVIDERS = ("eager", "ours", "ours_recompute", "ours_block_rows", "ours_mlp_triton", "apex",
             "compile")   # compiled ones last
# set while the provider runs (pinned on both sides of the A/B, whatever the caller's environment says)
PROVIDER_ENV = {"ours": {"BEIT_FAST_LSRN_FORWARD": "warp"}, "ours_block_rows": {"BEIT_FAST_LSRN_FORWARD": "block"}}
# (B, N or image size, C, heads): BEiT-B at batch 128 (and BEiT-L at 64 in the full sweep)
FULL = [dict(model="base", B=128, C=768, H=12), dict(model="large", B=64, C=1024, H=16)]
QUICK = [dict(model="base", B=128, C=768, H=12)]
SMOKE = [dict(model="tiny", B=2, C=64, H=2)]
# check against the eager reference in the same dtype: (atol as a fraction of max |ref|, rtol)
CHECK_TOL = {torch.bfloat16: (3e-2, 5e-2), torch.float16: (5e-3, 1e-2), torch.float32: (1e-4, 1e-4)}


def _apex(name):
    try:
        if name == "FusedLayerNorm":
            from apex.normalization import FusedLayerNorm
            return FusedLayerNorm
        from apex.fused_dense import FusedDense
        return FusedDense
    except Exception as e:
        raise Skip(f"apex {name} not importable ({type(e).__name__})")


def _module(name):
    try:
        import importlib
        return importlib.import_module(name)
    except Exception as e:
        raise Skip(f"{name} not importable ({type(e).__name__}: {e})")


def _leaf(t):
    return t.requires_grad_()


# ---------------------------------------------------------------------------------------------- cases
# Each case: dict(inputs=tuple, leaves=[tensors needing grad], grads=[one per used output], shape=dict,
# nbytes={mode: bytes}, flops={mode: flops}, providers={name: builder() -> fn(*inputs)}).

def case_masked_patch_embed(cfg, dtype, device, smoke):
    from beit_fast.ops.masked_patch_embed import masked_patch_embed, masked_patch_embed_ref, not_supported_reasons
    B, C = cfg["B"], cfg["C"]
    img, patch, Cin = (32, 8, 3) if smoke else (224, 16, 3)
    P, K = (img // patch) ** 2, Cin * patch * patch
    images = torch.randn(B, Cin, img, img, device=device, dtype=dtype)   # pixels need no gradient
    weight = _leaf(torch.randn(C, Cin, patch, patch, device=device, dtype=dtype) / K ** 0.5)
    bias = _leaf(torch.randn(C, device=device, dtype=dtype) * 0.02)
    mask = torch.rand(B, P, device=device) < 75 / 196
    mtok, cls = (_leaf(torch.randn(1, 1, C, device=device, dtype=dtype) * 0.02) for _ in range(2))
    inputs = (images, weight, bias, mask, mtok, cls, None)   # pretraining: mask, no absolute position
    e = images.element_size()
    fwd_b = images.numel() * e + weight.numel() * e + B * (1 + P) * C * e + mask.numel()
    bwd_b = B * (1 + P) * C * e + images.numel() * e + weight.numel() * e
    flops = 2.0 * B * P * C * K

    def ours():
        why = not_supported_reasons("cuda" if device == "cuda" else "cpp", *inputs)
        if why:
            raise Skip("; ".join(why))
        return lambda *a: masked_patch_embed(*a, backend="cuda" if device == "cuda" else "cpp")

    return dict(inputs=inputs, leaves=[weight, bias, mtok, cls], grads=[torch.randn(B, 1 + P, C, device=device,
                                                                                    dtype=dtype)],
                shape=dict(model=cfg["model"], B=B, img=img, patch=patch, C=C, masked="~38%"),
                nbytes=dict(fwd=fwd_b, bwd=bwd_b, fwd_bwd=fwd_b + bwd_b),
                flops=dict(fwd=flops, bwd=flops, fwd_bwd=2 * flops),
                providers=dict(eager=lambda: masked_patch_embed_ref,
                               compile=lambda: torch.compile(masked_patch_embed_ref, dynamic=False), ours=ours))


def case_layer_scale_residual_norm(cfg, dtype, device, smoke):
    from beit_fast.ops.layer_scale_residual_norm import (layer_scale_residual_norm, layer_scale_residual_norm_ref,
                                                         not_supported_reasons)
    B, C, N = cfg["B"], cfg["C"], 197 if not smoke else 17
    x, y = (_leaf(torch.randn(B, N, C, device=device, dtype=dtype)) for _ in range(2))
    gamma = _leaf(torch.full((C,), 0.1, device=device, dtype=dtype))
    w = _leaf(1 + 0.1 * torch.randn(C, device=device, dtype=dtype))
    b = _leaf(0.1 * torch.randn(C, device=device, dtype=dtype))
    keep = (torch.rand(B, device=device) < 0.9).to(dtype) / 0.9   # drop path 0.1
    inputs = (x, y, gamma, keep, w, b, 1e-6)
    e, MC = x.element_size(), B * N * C
    backend = "cuda" if device == "cuda" else "cpp"

    def ours():
        why = not_supported_reasons(backend, x, y, gamma, keep, w, b)
        if why:
            raise Skip("; ".join(why))
        return lambda *a: layer_scale_residual_norm(*a, backend=backend)

    def ours_block_rows():
        if backend != "cuda":
            raise Skip("the forward's block-per-row plan is a CUDA kernel choice")
        return ours()

    def apex():
        _apex("FusedLayerNorm")

        def fn(x, y, gamma, scale, w, b, eps):
            s = x + scale[:, None, None] * (gamma * y)
            return s, _apex_ln(s, w, b, eps)
        return fn

    return dict(inputs=inputs, leaves=[x, y, gamma, w, b], grads=[torch.randn(B, N, C, device=device, dtype=dtype)
                                                                   for _ in range(2)],
                shape=dict(model=cfg["model"], B=B, N=N, C=C),
                nbytes=dict(fwd=4 * MC * e, bwd=6 * MC * e, fwd_bwd=10 * MC * e), flops={},
                providers=dict(eager=lambda: layer_scale_residual_norm_ref,
                               compile=lambda: torch.compile(layer_scale_residual_norm_ref, dynamic=False),
                               ours=ours, ours_block_rows=ours_block_rows, apex=apex))


def _apex_ln(s, w, b, eps):
    # the functional form, so that the gradients land on the benchmark's own weight and bias
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    return fused_layer_norm_affine(s, w, b, (s.shape[-1],), eps)


def case_linear_gelu(cfg, dtype, device, smoke):
    mod = _module("beit_fast.ops.linear_gelu")
    B, C, N = cfg["B"], cfg["C"], 197 if not smoke else 17
    M, Kd, Nd = B * N, C, 4 * C
    x = _leaf(torch.randn(M, Kd, device=device, dtype=dtype))
    W = _leaf(torch.randn(Nd, Kd, device=device, dtype=dtype) / Kd ** 0.5)
    bias = _leaf(torch.randn(Nd, device=device, dtype=dtype) * 0.02)
    e = x.element_size()
    eager = lambda x, W, b: F.gelu(F.linear(x, W, b))  # noqa: E731

    def ours(recompute=False):
        why = mod.not_supported_reasons("triton", x, W, bias)
        if why:
            raise Skip("; ".join(why))
        return lambda *a: mod.linear_gelu(*a, backend="triton", recompute=recompute)

    def apex():
        dense = _apex("FusedDense")(Kd, Nd).to(device=device, dtype=dtype)
        # FusedDense with the benchmark's own weight and bias (cuBLASLt bias epilogue), then GELU
        return lambda x, W, b: F.gelu(torch.func.functional_call(dense, {"weight": W, "bias": b}, (x,)))

    # forward: x, W; y and the pre-activation the backward reads (ours' store mode, eager's F.linear output)
    fwd_b = (M * Kd + Nd * Kd + 2 * M * Nd) * e
    bwd_b = (M * Nd + M * Nd + M * Kd + Nd * Kd + M * Kd + Nd * Kd) * e   # dy, preact, x, W; dx, dW
    return dict(inputs=(x, W, bias), leaves=[x, W, bias], grads=[torch.randn(M, Nd, device=device, dtype=dtype)],
                shape=dict(model=cfg["model"], M=M, K=Kd, N=Nd),
                nbytes=dict(fwd=fwd_b, bwd=bwd_b, fwd_bwd=fwd_b + bwd_b),
                flops=dict(fwd=2.0 * M * Nd * Kd, bwd=4.0 * M * Nd * Kd, fwd_bwd=6.0 * M * Nd * Kd),
                providers=dict(eager=lambda: eager, compile=lambda: torch.compile(eager, dynamic=False), ours=ours,
                               ours_recompute=lambda: ours(recompute=True), apex=apex))


def case_layer_norm(cfg, dtype, device, smoke):
    mod = _module("beit_fast.ops.layer_norm")
    B, C, N = cfg["B"], cfg["C"], 197 if not smoke else 17
    x = _leaf(torch.randn(B, N, C, device=device, dtype=dtype))
    w = _leaf(1 + 0.1 * torch.randn(C, device=device, dtype=dtype))
    b = _leaf(0.1 * torch.randn(C, device=device, dtype=dtype))
    e, MC = x.element_size(), B * N * C
    eager = lambda x, w, b: F.layer_norm(x, (C,), w, b, 1e-6)  # noqa: E731

    def ours():
        why = mod.not_supported_reasons("triton", x, w, b)
        if why:
            raise Skip("; ".join(why))
        return lambda x, w, b: mod.layer_norm(x, w, b, 1e-6, backend="triton")

    def apex():
        _apex("FusedLayerNorm")
        return lambda x, w, b: _apex_ln(x, w, b, 1e-6)

    return dict(inputs=(x, w, b), leaves=[x, w, b], grads=[torch.randn(B, N, C, device=device, dtype=dtype)],
                shape=dict(model=cfg["model"], B=B, N=N, C=C),
                nbytes=dict(fwd=2 * MC * e, bwd=3 * MC * e, fwd_bwd=5 * MC * e), flops={},
                providers=dict(eager=lambda: eager, compile=lambda: torch.compile(eager, dynamic=False), ours=ours,
                               apex=apex))


def case_block(cfg, dtype, device, smoke):
    beit = _module("beit_fast.models.beit")
    if not hasattr(beit, "Block"):
        raise Skip("beit_fast.models.beit has no Block")
    B, C, H = cfg["B"], cfg["C"], cfg["H"]
    window = (4, 4) if smoke else (14, 14)
    N = window[0] * window[1] + 1
    fused_attn = "fused" if device == "cuda" else "sdpa"   # the fused attention kernel is Triton on CUDA
    torch.manual_seed(0)
    blk_ref = beit.Block(C, H, mlp_ratio=4.0, init_values=0.1, window_size=window, attn_impl="sdpa", fused=False)
    blk_ref = blk_ref.to(device=device, dtype=dtype).train()
    x = _leaf(torch.randn(B, N, C, device=device, dtype=dtype))
    leaves = [x] + list(blk_ref.parameters())
    nxt = torch.nn.LayerNorm(C, eps=1e-6).to(device=device, dtype=dtype)   # the next block's norm1
    with torch.no_grad():
        nxt.weight.uniform_(0.5, 1.5), nxt.bias.normal_(0, 0.1)

    def eager():
        return lambda x: blk_ref(x)

    def check_ref(x):   # what the fused block returns: its output and the next block's normalized input
        out = blk_ref(x)
        return out, nxt(out)

    def compiled():
        fn = torch.compile(blk_ref, dynamic=False)
        return lambda x: fn(x)

    def ours(mlp_triton=False):
        ln = _module("beit_fast.ops.layer_norm")
        blk = copy.deepcopy(blk_ref)   # same weights, its own gradients
        blk.attn.attn_impl = fused_attn
        blk.fused_mlp = mlp_triton

        def full(x):   # checked against eager: norm1 computed here
            return blk.forward_fused(x, ln.layer_norm(x, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps), nxt)

        h = ln.layer_norm(x, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps).detach().requires_grad_()

        def steady(x):
            # timed as in the fused model: h = norm1(x) arrives from the previous block's fused epilogue, and
            # this block makes the next block's norm1 (the eager block computes its own norm1 instead). The
            # backward takes gradients for both outputs and returns dh (the qkv input-gradient GEMM), as in
            # the model, so it does the same work as the eager block's.
            return blk.forward_fused(x, h, nxt)

        steady.check_fn = full
        steady.check_ref = check_ref
        steady.check_leaves = [x] + list(blk.parameters())
        steady.own_leaves = [x, h] + list(blk.parameters())
        return steady

    M = B * N
    fwd_flops = 24.0 * M * C * C + 4.0 * B * N * N * C
    bwd_flops = 2 * 24.0 * M * C * C + 2.5 * 4.0 * B * N * N * C
    grads = [torch.randn(B, N, C, device=device, dtype=dtype) for _ in range(2)]   # eager uses the first
    return dict(inputs=(x,), leaves=leaves, grads=grads,
                shape=dict(model=cfg["model"], B=B, N=N, C=C, heads=H, attn_ours=fused_attn),
                nbytes={}, flops=dict(fwd=fwd_flops, bwd=bwd_flops, fwd_bwd=fwd_flops + bwd_flops),
                providers=dict(eager=eager, compile=compiled, ours=ours,
                               ours_mlp_triton=lambda: ours(mlp_triton=True)))


CASES = dict(masked_patch_embed=case_masked_patch_embed, layer_scale_residual_norm=case_layer_scale_residual_norm,
             linear_gelu=case_linear_gelu, layer_norm=case_layer_norm, block=case_block)


# ---------------------------------------------------------------------------------------------- timing
def _outputs(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor)]


def _grad(fn, case, leaves, outs=None):
    outs = _outputs(fn(*case["inputs"])) if outs is None else outs
    n = min(len(outs), len(case["grads"]))
    return torch.autograd.grad(outs[:n], leaves, case["grads"][:n], allow_unused=True)


def check_provider(name, fn, case, expected, dtype):
    """Every output and the input / parameter gradients (through every output that has an upstream
    gradient) against the reference: the eager provider's, or the provider's own check_ref where it returns
    more than the timed eager provider (the fused block: also the next block's normalized input)."""
    leaves = getattr(fn, "check_leaves", getattr(fn, "own_leaves", case["leaves"]))
    outs = _outputs(getattr(fn, "check_fn", fn)(*case["inputs"]))
    exp_outs, exp_grads = reference(case, fn.check_ref) if hasattr(fn, "check_ref") else expected
    if len(outs) < len(exp_outs):
        raise CheckFailed(f"provider {name} returns {len(outs)} output(s), the reference {len(exp_outs)}; "
                          "not timing it")
    n = min(len(exp_outs), len(case["grads"]))
    got = torch.autograd.grad(outs[:n], leaves, case["grads"][:n], allow_unused=True)
    atol_frac, rtol = CHECK_TOL[dtype]
    for i, (a, b) in enumerate(zip(outs, exp_outs)):
        check_close(f"{name} (output {i})", a, b, atol=atol_frac * b.abs().max().item(), rtol=rtol)
    for i, (a, b) in enumerate(zip(got, exp_grads)):
        if b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        check_close(f"{name} (grad {i})", a, b, atol=atol_frac * (b.abs().max().item() + 1e-6), rtol=rtol)


def reference(case, fn=None):
    fn = fn or case["providers"]["eager"]()
    outs = _outputs(fn(*case["inputs"]))
    n = min(len(outs), len(case["grads"]))
    grads = torch.autograd.grad(outs[:n], case["leaves"], case["grads"][:n], allow_unused=True)
    return [o.detach() for o in outs], grads


def bench_provider(op, name, fn, case, dtype, device, env):
    leaves = getattr(fn, "own_leaves", case["leaves"])
    rep = dict(warmup=1, rep=3) if device == "cpu" else {}
    calls = {   # mode: (call, setup run untimed before each call: the backward's forward)
        "fwd": (lambda: fn(*case["inputs"]), None),
        "bwd": (lambda outs: _grad(fn, case, leaves, outs=outs), lambda: _outputs(fn(*case["inputs"]))),
        "fwd_bwd": (lambda: _grad(fn, case, leaves), None),
    }
    rows = []
    for mode, (call, setup) in calls.items():
        t = time_ms(call, device, setup=setup, **rep)
        peak = peak_mb(call, device, setup=setup)
        rows.append(make_row(op, name, mode, case["shape"], dtype, t, env, flops=case["flops"].get(mode),
                             nbytes=case["nbytes"].get(mode), peak=peak))
        r = rows[-1]
        print(f"  {name:8s} {mode:7s} {t['median_ms']:9.3f} ms  {r['gbps'] or 0:8.1f} GB/s  "
              f"{r['tflops'] or 0:7.2f} TFLOP/s  peak {peak if peak is None else round(peak, 1)} MB")
    return rows, [(r, calls[r["mode"]], case["flops"].get(r["mode"]), case["nbytes"].get(r["mode"])) for r in rows]


def gpu_times(pending, copies, device, outcomes):
    """The GPU-time pass (common.gpu_pass) over the providers' calls and the copies', then each memory-bound
    row's GB/s by GPU time as a fraction of a same-bytes copy's (gpu_pct_copy_bw)."""
    copy_rows = [(row, (call, None), None, row["shape"]["bytes"]) for row, call in copies.calls.values()
                 if "gpu_ms" not in row]   # (each copy once, with the first op that measured it)
    gpu_pass(([("copies", contextlib.nullcontext, copy_rows)] if copy_rows else []) + pending, device, outcomes)
    for _, _, row_calls in pending:
        for row, _, _, nbytes in row_calls:
            copy = copies.gpu_gbps(nbytes) if row.get("pct_copy_bw") is not None else None
            if copy and row.get("gpu_gbps"):
                row["gpu_pct_copy_bw"] = 100.0 * row["gpu_gbps"] / copy


class CopyBandwidth:
    """GB/s of a plain device copy that moves a given number of bytes (half read, half written), measured
    once per size in this run: the bar a memory-bound op's row is measured against (issue target: >= 80%).
    Same bytes, same launch and L2 conditions as the op, so neither side gains from its size. Each size
    measured is also a row (op "copy")."""

    def __init__(self, cfg, dtype, device, env, rows):
        self.cfg, self.dtype, self.device, self.env, self.rows = cfg, dtype, device, env, rows
        self.calls = {}   # elements -> (its row, the copy call): gpu_pass adds the GPU time

    def _n(self, nbytes: float) -> int:
        return max(1, int(nbytes) // (2 * torch.empty((), dtype=self.dtype).element_size()))

    def __call__(self, nbytes: float) -> float:
        """GB/s by wall time of a copy of `nbytes` (measured on the first call for that size)."""
        n = self._n(nbytes)
        if n not in self.calls:
            e = torch.empty((), dtype=self.dtype).element_size()
            src = torch.randn(n, device=self.device, dtype=self.dtype)
            dst = torch.empty_like(src)
            t = time_ms(lambda: dst.copy_(src), self.device,
                        **(dict(warmup=1, rep=3) if self.device == "cpu" else {}))
            shape = {"model": self.cfg["model"], "B": self.cfg["B"], "C": self.cfg["C"], "bytes": 2 * n * e}
            row = make_row("copy", "torch", "fwd", shape, self.dtype, t, self.env, nbytes=2 * n * e)
            self.rows.append(row)
            self.calls[n] = row, (lambda: dst.copy_(src))
            print(f"copy of {2 * n * e / 2**20:.1f} MiB {self.dtype}: {row['gbps']:.1f} GB/s")
        return self.calls[n][0]["gbps"]

    def gpu_gbps(self, nbytes: float):
        """GB/s by GPU time of that copy, once gpu_pass has measured it (else None)."""
        entry = self.calls.get(self._n(nbytes)) if nbytes else None
        return entry[0].get("gpu_gbps") if entry else None


@contextlib.contextmanager
def environ(values: dict):
    """os.environ updated with `values` inside the block (the C++ ops read their knobs at each launch)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--ops", default="all", help=f"comma list of {OPS}, or all")
    args = p.parse_args(argv)
    device, dtypes = device_and_dtypes(args)
    torch.backends.cudnn.benchmark = True   # as timm's train.py sets it (masked_patch_embed's baselines' conv)
    ops = named_list(args.ops, OPS, "--ops")
    wanted = selected_providers(args, PROVIDERS, smoke_default=("eager", "ours"))
    cfgs = SMOKE if args.smoke else QUICK if args.quick else FULL
    env = environment(device)
    rows, outcomes = [], Outcomes()
    pending = []   # (label, context, [(row, (call, setup), flops, nbytes)]): the GPU-time pass
    for dtype in dtypes:
        for cfg in cfgs:
            copy_gbps = CopyBandwidth(cfg, dtype, device, env, rows)
            for op in ops:
                print(f"{op} {cfg['model']} B={cfg['B']} C={cfg['C']} {dtype}")
                expected = None
                with outcomes.guard(f"{op} {cfg['model']} {dtype}"):
                    case = CASES[op](cfg, dtype, device, args.smoke)
                    expected = reference(case)
                if expected is None:
                    continue
                for name in wanted:
                    if name not in case["providers"]:
                        continue
                    if args.quick and name == "compile" and op not in ("layer_scale_residual_norm", "block"):
                        continue
                    def context(name=name):
                        return environ(PROVIDER_ENV.get(name, {}))
                    label = f"{op} {name} {cfg['model']} {dtype}"
                    with outcomes.guard(label), context():
                        fn = case["providers"][name]()
                        check_provider(name, fn, case, expected, dtype)
                        got, calls = bench_provider(op, name, fn, case, dtype, device, env)
                        for r in got:   # memory-bound ops: fraction of a copy of the same bytes
                            if op in MEMORY_BOUND and r.get("gbps"):
                                r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps(case["nbytes"][r["mode"]])
                        rows += got
                        pending.append((label, context, calls))
                    write_report(rows, args.out, "bench_blocks", outcomes)   # a time limit keeps what ran
                del expected
                # this op's GPU times, after its wall-clock timings (one profiler session; CUPTI torn down
                # after it: common.gpu_time), before the next op: a run that a time limit cuts keeps them
                gpu_times(pending, copy_gbps, device, outcomes)
                write_report(rows, args.out, "bench_blocks", outcomes)
                pending.clear()
                del case
    finish(rows, args.out, "bench_blocks", outcomes)


if __name__ == "__main__":
    main()
