"""Ahead-of-time compile of every Triton kernel variant for sm_90 (H100) and sm_80 (A100), without a GPU.

The interpreter (TRITON_INTERPRET=1, how the other tests run here) never lowers to PTX, so it cannot see
bad tl.dot shapes, shared-memory overflow, ptxas failures or spills. This file compiles the kernels for
real GPU targets with Triton's bundled ptxas.

How the variants are found: a worker subprocess (TRITON_INTERPRET removed, one per (module, target))
calls the kernel modules' own launchers (linear_gelu_fwd / linear_gelu_dz, layer_norm_fwd / _bwd,
rel_pos_attention_fwd / _bwd, dropout_keep_mask) on `meta`-device tensors with every option the ops can
pass (dtype fp16/bf16/fp32, fp32 with TF32 on, bias / no bias, saved or recomputed pre-activation,
weight/bias present, mixed fp32 parameters, explicit index, dropout, table gradient, ...). Each
`kernel[grid](...)` launch is intercepted; block sizes, num_warps and num_stages are therefore those the
launchers pick (CONFIGS / pick_configs, GEMM_CONFIGS of the autotuner as its early_config_prune leaves
them, _tile, the _DGELU_* constants),
and the argument specialization (16-byte alignment, stride == 1, divisibility by 16) is computed by
Triton's own binder exactly as a launch on a GPU would. An autotuned kernel is expanded over all its
configs. Identical specializations are compiled once.

Shapes: BEiT-B (B=2, N=197 tokens, window 14x14, H=12, C=768, MLP 768 -> 3072); head dims 64 and 128 (the
two 16-bit attention configs; 128 = MAX_HEAD_DIM), 32 and 80 (padded); attention also at N = 50, 145 and 785
(other loop tails; bf16, sm_90); LayerNorm at one C per tile _tile() can return (C = 1, 2, 4, .. MAX_C) and
C = 768.

Budget (the whole file takes 2.5-3 min on 2 busy cores: compiling is CPU-heavy, a 128x256 fp32 GEMM alone takes
10-20 s; everything for both targets, ~1400 variants, takes ~40 min of CPU). Each scenario has a level:
  sm_90 (all of these): every GEMM config x fp16 / bf16 / fp32 / fp32+TF32 for the forward with bias and
  saved pre-activation, and x bf16 for the recompute backward with bias gradient; every attention config
  (d64, d128, fp32) x dtype with the heaviest flags (explicit index, dropout, fp32 table, table gradient)
  and, in bf16 and fp32, BEiT's training path (window index, no dropout, fp32 table, table gradient),
  plus head dims 32 and 80 (bf16, heaviest flags); every LayerNorm tile x dtype with all parameters and
  gradients, and at C = 768 (bf16, fp32) every parameter / gradient combination; every _dgelu_kernel
  variant (_delta, _table_grad and _keep_mask come with the attention scenarios).
  sm_80 (representative subset): every GEMM config x bf16 and fp32+TF32 (forward, heaviest flags), the
  attention kernels at head dim 64 and 128 x dtype with the heaviest flags, LayerNorm at C = 1, 768,
  MAX_C with all flags, every _dgelu_kernel variant.
  The rest (the other flag combinations: bias-less GEMMs, attention without table gradient, ...) only with
  BEIT_FAST_AOT_FULL=1, which compiles every variant for both targets (~20 min on 2 cores).
Set BEIT_FAST_AOT_REPORT=<dir> to keep the per-variant results (shared memory, registers, spills, seconds)
as JSON; BEIT_FAST_AOT_JOBS sets how many workers run at once (default: CPU count, at most 4).

Checks: every variant compiles (ptxas included); shared memory fits the target (227 KB sm_90, 163 KB
sm_80); every kernel launched by the modules has at least one compiled variant. An autotuned config
over the shared-memory limit is not an error (Triton's autotuner skips it, OutOfResources) as long as
another config of the same specialization fits; it is reported as a warning. A ptxas or lowering error
fails even for an autotuned config. On sm_90 every 16-bit kernel with a tl.dot uses Hopper's warpgroup MMA
(wgmma) and no warp-level mma.sync (counted in the PTX). Register spills (from the ptxas -v log) are
reported as warnings (one per test, listing the variants), not failures.

Skips (never false failures): no triton CUDA backend / ptxas, or a Triton whose private compile API
(binder, _pack_args, ASTSource, GPUTarget) is not the one this file was written against (3.8).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

MODULES = ("linear_gelu", "layer_norm", "rel_pos_attention")
FAMILIES = ("fp16", "bf16", "fp32")
# compute capability, shared-memory limit per block (opt-in maximum) in bytes
TARGETS = {"sm90": (90, 227 * 1024), "sm80": (80, 163 * 1024)}
KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
WORKER_TIMEOUT_S = 900

# Exit status of the worker when this Triton's compile API is not the expected one (-> skip).
_API_MISMATCH = 3
_NO_BACKEND = 4


# ==========================================================================================================
# worker side (runs in a subprocess without TRITON_INTERPRET; no pytest)
# ==========================================================================================================

class _ApiMismatch(Exception):
    pass


def _meta(shape, dtype):
    import torch
    return torch.empty(shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def _tf32(on: bool):
    import torch
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _dtypes():
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# Each scenario yields (family, level, description, thunk). The level says where its variants are compiled:
ALL, SM90, FULL = 0, 1, 2   # every target / sm_90 only / only with BEIT_FAST_AOT_FULL=1
# A variant produced by several scenarios gets the lowest level among them.


def _scenarios_linear_gelu(K):
    M, KD, N = 2 * 197, 768, 3072   # BEiT-B fc1, batch 2
    for fam, dt in _dtypes().items():
        for tf32 in ((False, True) if fam == "fp32" else (False,)):
            x, w, b = _meta((M, KD), dt), _meta((N, KD), dt), _meta((N,), dt)
            dy, z = _meta((M, N), dt), _meta((M, N), dt)
            t = "+tf32" if tf32 else ""
            # forward with bias and the saved pre-activation: every GEMM config, every dtype on sm_90; bf16 and
            # fp32+TF32 (its big tiles are over sm_80's shared memory: the autotuner must keep a fitting one)
            # on sm_80 too. fp32 without TF32 (FMA path) is the slowest to compile: sm_90 only.
            fwd_level = ALL if fam == "bf16" or tf32 else SM90
            for bias in (b, None):
                for save in (True, False):
                    lvl = fwd_level if bias is not None and save else FULL
                    yield (fam, lvl, f"fwd{t} bias={bias is not None} save_preact={save}",
                           lambda bias=bias, save=save, tf32=tf32:
                           _with_tf32(tf32, K.linear_gelu_fwd, x, w, bias, save))
            for bias, with_db in ((b, True), (b, False), (None, False)):   # recompute mode (BACKWARD=True)
                lvl = SM90 if fam == "bf16" and bias is not None and with_db else FULL
                yield (fam, lvl, f"dz-recompute{t} bias={bias is not None} with_db={with_db}",
                       lambda bias=bias, with_db=with_db, tf32=tf32:
                       _with_tf32(tf32, K.linear_gelu_dz, dy, x, w, bias, None, with_db))
            for with_db in (True, False):                                 # store mode (_dgelu_kernel)
                yield (fam, ALL, f"dz-store{t} with_db={with_db}",
                       lambda with_db=with_db, tf32=tf32: _with_tf32(tf32, K.linear_gelu_dz, dy, x, w, b, z, with_db))


def _with_tf32(on, fn, *args):
    with _tf32(on):
        return fn(*args)


def _ln_level(fam, C, max_c, all_flags, param_like_x):
    """Every tile with all parameters / gradients: sm_90 (and sm_80 at C = 1, 768, MAX_C); at BEiT's C, in
    bf16 and fp32, every flag combination with parameters in x's dtype, and fp32 parameters with all flags:
    sm_90."""
    if all_flags and param_like_x:
        return ALL if C in (1, 768, max_c) else SM90
    if C == 768 and fam != "fp16" and (all_flags or param_like_x):
        return SM90
    return FULL


def _scenarios_layer_norm(K):
    import torch
    M = 2 * 197
    # one C per tile _tile() can return (BLOCK_C = next power of two of C, 1 .. MAX_C), and BEiT's C
    cs, c = [], 1
    while c <= K.MAX_C:
        cs.append(c)
        c *= 2
    cs = sorted(set(cs) | {768})
    for fam, dt in _dtypes().items():
        pdts = (dt,) if dt == torch.float32 else (dt, torch.float32)   # parameters in x's dtype or fp32
        for C in cs:
            x, dy = _meta((M, C), dt), _meta((M, C), dt)
            mean, rstd = _meta((M,), torch.float32), _meta((M,), torch.float32)
            for pdt in pdts:
                w, b = _meta((C,), pdt), _meta((C,), pdt)
                pn = "fp32" if pdt == torch.float32 else fam
                for ww, bb in ((w, b), (w, None), (None, b), (None, None)):
                    lvl = _ln_level(fam, C, K.MAX_C, ww is not None and bb is not None, pdt == dt)
                    yield (fam, lvl, f"fwd C={C} param={pn} w={ww is not None} b={bb is not None}",
                           lambda x=x, ww=ww, bb=bb: K.layer_norm_fwd(x, ww, bb, 1e-6))
                for ww in (w, None):
                    for dx in (True, False):
                        for dw in ((True, False) if ww is not None else (False,)):
                            for db in (True, False):
                                if not (dx or dw or db):
                                    continue   # the op does not call the backward
                                lvl = _ln_level(fam, C, K.MAX_C, ww is not None and dx and dw and db, pdt == dt)
                                yield (fam, lvl, f"bwd C={C} param={pn} w={ww is not None} dx={dx} dw={dw} db={db}",
                                       lambda x=x, dy=dy, ww=ww, mean=mean, rstd=rstd, dx=dx, dw=dw, db=db:
                                       K.layer_norm_bwd(dy, x, ww, mean, rstd, dx, dw, db))


def _scenarios_rel_pos_attention(K):
    import torch
    B, H, (wh, ww) = 2, 12, (14, 14)
    N = wh * ww + 1
    R = (2 * wh - 1) * (2 * ww - 1) + 3
    seed = _meta((1,), torch.int64)
    index = _meta((N, N), torch.int64)
    inverse = (_meta((N * N,), torch.int32), _meta((R,), torch.int32), _meta((R,), torch.int32), 64)
    for fam, dt in _dtypes().items():
        tdts = (dt,) if dt == torch.float32 else (dt, torch.float32)   # table in q's dtype, or fp32 (AMP)
        # 64 (BEiT) and 128: the two 16-bit config families, 128 = MAX_HEAD_DIM; 32: a smaller BLOCK_D; 80: a
        # head dim padded to BLOCK_D = 128 (HEAD_D is a constexpr: its masks are another compile)
        for D in (32, 64, 80, 128):
            # the packed (B, N, 3, H, D) qkv layout and (B, N, H*D) output the model uses
            qkv = _meta((B, N, 3, H, D), dt)
            q, k, v = (qkv.select(2, i).permute(0, 2, 1, 3) for i in range(3))
            out = _meta((B, N, H * D), dt).view(B, N, H, D).permute(0, 2, 1, 3)
            gq, gk, gv = (_meta((B, N, 3, H, D), dt).select(2, i).permute(0, 2, 1, 3) for i in range(3))
            do = _meta((B, N, H * D), dt).view(B, N, H, D).permute(0, 2, 1, 3)
            lse = _meta((B, H, N), torch.float32)
            for tdt in tdts:
                table = _meta((R, H), tdt)
                tn = "fp32" if tdt == torch.float32 else fam
                for idx in (None, index):
                    for p in (0.0, 0.1):
                        s = seed if p > 0 else None
                        d = f"D={D} table={tn} index={idx is not None} dropout={p > 0}"
                        # heaviest flags (explicit index, dropout, fp32 table, table gradient): everywhere;
                        # BEiT's training path (window index, no dropout, fp32 table): sm_90. (The launchers
                        # pass the kernels an fp32 copy of any table, so both table dtypes give one variant.)
                        heavy = idx is not None and p > 0 and tdt == torch.float32
                        common = idx is None and p == 0 and tdt == torch.float32
                        if D in (32, 80):   # a smaller / padded BLOCK_D: heaviest flags, bf16, sm_90
                            lvl = SM90 if heavy and fam == "bf16" else FULL
                        else:
                            lvl = ALL if heavy else (SM90 if common and fam != "fp16" else FULL)
                        yield (fam, lvl, "fwd " + d,
                               lambda q=q, k=k, v=v, table=table, idx=idx, p=p, s=s, out=out:
                               K.rel_pos_attention_fwd(q, k, v, table, idx, (wh, ww), D ** -0.5, p, s, out))
                        for inv in (inverse, None):
                            yield (fam, lvl if inv is not None else FULL, f"bwd {d} dtable={inv is not None}",
                                   lambda q=q, k=k, v=v, table=table, idx=idx, p=p, s=s, out=out, do=do, lse=lse,
                                   inv=inv, gq=gq, gk=gk, gv=gv:
                                   K.rel_pos_attention_bwd(do, q, k, v, out, lse, table, idx, (wh, ww), D ** -0.5,
                                                           p, s, gq, gk, gv, inv))
    yield ("fp32", ALL, "dropout_keep_mask", lambda: K.dropout_keep_mask(seed, B, H, N, 0.1))
    # other token counts give other tails (TAIL_N, BLOCK_TAIL are constexprs): 7x7 (N = 50), 12x12 (145),
    # 28x28 (785, 448 px); BEiT's bf16 training path at head dim 64, sm_90
    for w in ((7, 7), (12, 12), (28, 28)):
        fwd, bwd = _beit_training_calls(K, B, H, w, 64, torch.bfloat16)
        N = w[0] * w[1] + 1
        yield ("bf16", SM90, f"fwd N={N} D=64", fwd)
        yield ("bf16", SM90, f"bwd N={N} D=64 dtable=True", bwd)


    # BEiT's bf16 training path with each bias source in every kernel (TileConfig.dense_bias; the GPU
    # configs read the dense expansions): all of them reading them, and all of them gathering from the
    # table (BEIT_FAST_ATTN_DENSE_BIAS=1 / 0), every target
    for dense in (True, False):
        yield ("bf16", ALL, f"fwd + bwd D=64 BEIT_FAST_ATTN_DENSE_BIAS={int(dense)}",
               lambda dense=dense: _bias_source_step(K, B, H, (14, 14), 64, torch.bfloat16, dense))


def _beit_training_calls(K, B, H, window, D, dt):
    """Thunks of BEiT's forward and backward (packed qkv, window index, fp32 table, table gradient) on meta
    tensors."""
    import torch
    wh, ww = window
    N, R = wh * ww + 1, (2 * wh - 1) * (2 * ww - 1) + 3
    qkv = _meta((B, N, 3, H, D), dt)
    q, k, v = (qkv.select(2, i).permute(0, 2, 1, 3) for i in range(3))
    out, do = (_meta((B, N, H * D), dt).view(B, N, H, D).permute(0, 2, 1, 3) for _ in range(2))
    gq, gk, gv = (_meta((B, N, 3, H, D), dt).select(2, i).permute(0, 2, 1, 3) for i in range(3))
    lse, table = _meta((B, H, N), torch.float32), _meta((R, H), torch.float32)
    inv = (_meta((N * N,), torch.int32), _meta((R,), torch.int32), _meta((R,), torch.int32), 64)
    scale = D ** -0.5
    return (lambda: K.rel_pos_attention_fwd(q, k, v, table, None, window, scale, 0.0, None, out),
            lambda: K.rel_pos_attention_bwd(do, q, k, v, out, lse, table, None, window, scale, 0.0, None,
                                            gq, gk, gv, inv))


def _bias_source_step(K, B, H, window, D, dt, dense):
    """BEiT's forward and backward with every kernel reading the dense bias expansion (dense) or gathering
    from the table (BEIT_FAST_ATTN_DENSE_BIAS's switch)."""
    saved, K.DENSE_BIAS = K.DENSE_BIAS, frozenset(K.KERNELS if dense else ())
    try:
        for call in _beit_training_calls(K, B, H, window, D, dt):
            call()
    finally:
        K.DENSE_BIAS = saved


SCENARIOS = {"linear_gelu": _scenarios_linear_gelu, "layer_norm": _scenarios_layer_norm,
             "rel_pos_attention": _scenarios_rel_pos_attention}


def _capture(module):
    """Replace `run` of every kernel object of `module` with a recorder (an autotuner is expanded over its
    configs; a heuristics wrapper runs as is); returns the list the launches go to:
    (kernel name, JITFunction, args, kwargs, autotune config name or None)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, KernelInterface
    launches, current_config = [], [None]

    def innermost(obj):
        while not isinstance(obj, JITFunction):
            obj = getattr(obj, "fn", None)
            if obj is None:
                raise _ApiMismatch("kernel wrapper without .fn")
        return obj

    for name, obj in vars(module).items():
        if not isinstance(obj, KernelInterface):
            continue
        jit = innermost(obj)

        def record(*args, _name=name, _jit=jit, grid=None, warmup=False, **kwargs):
            launches.append((_name, _jit, args, dict(kwargs), current_config[0]))
        jit.run = record
        if isinstance(obj, Autotuner):
            def expand(*args, _tuner=obj, grid=None, warmup=False, **kwargs):
                configs = _tuner.configs   # those its early_config_prune keeps for this launch
                if getattr(_tuner, "early_config_prune", None):
                    configs = _tuner.early_config_prune(configs, dict(zip(_tuner.arg_names, args)), **kwargs)
                for cfg in configs:
                    current_config[0] = getattr(cfg, "name", None) or str(cfg)
                    try:
                        _tuner.fn.run(*args, grid=grid, warmup=warmup, **{**kwargs, **cfg.all_kwargs()})
                    finally:
                        current_config[0] = None
            obj.run = expand
    return launches


def _specialize(jit, backend, args, kwargs):
    """(options, signature, constexprs, attrs) as JITFunction.run computes them for a launch."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return jit._pack_args(backend, kwargs, bound_args, specialization, options)


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
# tensor-core instructions in the PTX: wgmma (Hopper's warpgroup MMA, what sm_90 needs for full speed) or
# the older warp-level mma.sync (what Triton falls back to when a tile cannot use wgmma)
_PTX_MMA = {"wgmma": re.compile(r"^\s*wgmma\.mma_async", re.M), "mma_sync": re.compile(r"^\s*mma\.sync", re.M)}


def _short(v):
    return v if isinstance(v, (int, float, bool, str)) or v is None else str(v)


def _check_api():
    """Raise _ApiMismatch unless this Triton has the private compile API used here (checked on 3.8)."""
    import inspect

    from triton import knobs
    from triton.runtime import jit as jit_mod
    missing = [n for n in ("JITFunction", "create_function_from_signature") if not hasattr(jit_mod, n)]
    if missing or not hasattr(jit_mod.JITFunction, "_pack_args") or not hasattr(knobs, "nvidia"):
        raise _ApiMismatch(f"missing {missing or 'JITFunction._pack_args / triton.knobs.nvidia'}")
    want = {"create_function_from_signature": (jit_mod.create_function_from_signature, ["sig", "kparams", "backend"]),
            "JITFunction._pack_args": (jit_mod.JITFunction._pack_args,
                                       ["self", "backend", "kwargs", "bound_args", "specialization", "options"])}
    for name, (fn, params) in want.items():
        got = list(inspect.signature(fn).parameters)
        if got != params:
            raise _ApiMismatch(f"{name}{tuple(got)} is not {name}{tuple(params)}")
    try:
        from triton import Config
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.autotuner import Autotuner  # noqa: F401
    except ImportError as e:
        raise _ApiMismatch(str(e)) from None
    if not hasattr(Config, "all_kwargs"):
        raise _ApiMismatch("triton.Config.all_kwargs missing")
    if list(inspect.signature(ASTSource).parameters) != ["fn", "signature", "constexprs", "attrs"]:
        raise _ApiMismatch(f"ASTSource{tuple(inspect.signature(ASTSource).parameters)}")


def worker(module_name: str, target_name: str, out_path: str) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    full = os.environ.get("BEIT_FAST_AOT_FULL", "0") not in ("", "0")
    max_level = FULL if full else (SM90 if target_name == "sm90" else ALL)
    try:
        import triton
        _check_api()
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
    except (ImportError, _ApiMismatch) as e:
        print(f"triton compile API mismatch (triton {getattr(sys.modules.get('triton'), '__version__', '?')}): {e}")
        return _API_MISMATCH
    cc, _ = TARGETS[target_name]
    target = GPUTarget("cuda", cc, 32)
    try:
        backend = make_backend(target)
        ptxas = knobs.nvidia.ptxas.path
        if not ptxas or not os.path.exists(ptxas):
            raise RuntimeError(f"ptxas not found ({ptxas!r})")
    except Exception as e:  # noqa: BLE001
        print(f"no CUDA backend / ptxas in triton {triton.__version__}: {type(e).__name__}: {e}")
        return _NO_BACKEND
    knobs.nvidia.dump_ptxas_log = True   # ptxas -v goes to stdout: registers and spills

    import importlib
    module = importlib.import_module(f"beit_fast.kernels.{module_name}")
    try:
        launches = _capture(module)
    except _ApiMismatch as e:
        print(f"triton compile API mismatch (triton {triton.__version__}): {e}")
        return _API_MISMATCH
    variants: dict = {}
    # Errors from here on are real, not an API mismatch: a launcher that cannot run on meta tensors (update
    # the scenario) or a launch the binder rejects (a launcher bug). They fail the tests with the traceback.
    for fam, level, desc, thunk in SCENARIOS[module_name](module):
        start = len(launches)
        try:
            thunk()
        except Exception as e:
            raise RuntimeError(f"launcher scenario {module_name}: {desc!r} raised {type(e).__name__}") from e
        for name, jit, args, kwargs, cfg in launches[start:]:
            options, sig, constexprs, attrs = _specialize(jit, backend, args, kwargs)
            key = (name, repr(sorted(sig.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
            if key in variants:
                v = variants[key]
                v["scenarios"].append(desc)
                if level < v["level"]:
                    v.update(level=level, family=fam, scenarios=[desc] + v["scenarios"][:-1])
                continue
            declared = {p.name for p in jit.params if p.is_constexpr}   # not the specialized == 1 ints
            named = {jit.arg_names[p[0]]: _short(c) for p, c in constexprs.items()
                     if len(p) == 1 and jit.arg_names[p[0]] in declared}
            variants[key] = dict(kernel=name, family=fam, level=level, config=cfg, autotuned=cfg is not None,
                                 scenarios=[desc], constexprs=named, num_warps=options.num_warps,
                                 num_stages=options.num_stages, compiled=False, error=None, shared=None,
                                 regs=None, mma=None, spill_stores=None, spill_loads=None, seconds=None,
                                 spec=(jit, sig, constexprs, attrs, options))

    out = []
    for v in variants.values():
        jit, sig, constexprs, attrs, options = v.pop("spec")
        v["selected"] = v["level"] <= max_level
        out.append(v)
        if not v["selected"]:
            continue
        log = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                kern = triton.compile(ASTSource(jit, sig, constexprs, attrs), target=target,
                                      options=options.__dict__)
            v["compiled"] = True
            v["shared"] = int(kern.metadata.shared)
            ptx = kern.asm.get("ptx", "")
            v["mma"] = {kind: len(pat.findall(ptx)) for kind, pat in _PTX_MMA.items()}
        except Exception as e:  # noqa: BLE001 - every failure is reported with its variant
            msg = f"{type(e).__name__}: {e}"   # ptxas: the cause comes first; CompilationError: last
            v["error"] = msg if len(msg) <= 2500 else f"{msg[:1200]}\n[...]\n{msg[-1200:]}"
        v["seconds"] = round(time.perf_counter() - t0, 2)
        text = log.getvalue()
        m = _PTXAS_SPILL.search(text)
        if m:
            v["spill_stores"], v["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = _PTXAS_REGS.search(text)
        if m:
            v["regs"] = int(m.group(1))
    Path(out_path).write_text(json.dumps(dict(triton=triton.__version__, target=target_name, full=full,
                                              variants=out), indent=1))
    return 0


# ==========================================================================================================
# pytest side
# ==========================================================================================================

@functools.lru_cache(maxsize=None)
def _module_tree(module_name: str) -> ast.Module:
    """The parsed source of kernels/<module>.py (no import: triton must not load here under the interpreter)."""
    return ast.parse((KERNEL_DIR / f"{module_name}.py").read_text())


def _jit_functions(module_name: str) -> dict:
    """{name: FunctionDef} of the @triton.jit functions of kernels/<module>.py."""
    return {node.name: node for node in _module_tree(module_name).body if isinstance(node, ast.FunctionDef)
            and any(ast.unparse(dec).startswith(("triton.jit", "triton.autotune", "triton.heuristics", "jit"))
                    for dec in node.decorator_list)}


def _launched_kernels(module_name: str) -> list[str]:
    """Names of the @triton.jit functions of kernels/<module>.py that the module launches (`name[grid](...)`,
    or `launch(name, grid, ...)` through kernels/_launch.py)."""
    jit = _jit_functions(module_name)
    launched = set()
    for node in ast.walk(_module_tree(module_name)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in jit):
            launched.add(node.func.value.id)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "launch"
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in jit):
            launched.add(node.args[0].id)
    return sorted(launched)


def _dot_kernels(module_name: str) -> set:
    """The @triton.jit functions of kernels/<module>.py that call tl.dot, in their own body or through the
    module's other @triton.jit functions."""
    jit = _jit_functions(module_name)
    calls = {name: {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)} for name, fn in jit.items()}
    dots = {name for name, called in calls.items() if "tl.dot" in called}
    while True:
        more = {name for name, called in calls.items() if name not in dots and called & dots}
        if not more:
            return dots
        dots |= more


if __name__ != "__main__":
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pytest

    _PROCS: set = set()
    _PROCS_LOCK = threading.Lock()

    def _run_worker(module_name: str, target_name: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with tempfile.TemporaryDirectory(prefix="beit_fast_aot_") as tmp:
            # a private, cold cache: every variant really goes through ptxas (and its -v log), and nothing
            # is written to the user's ~/.triton
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
            out = os.path.join(tmp, "result.json")
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, __file__, module_name, target_name, out], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            with _PROCS_LOCK:
                _PROCS.add(proc)
            try:
                log, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return dict(error=f"AOT compile worker for {module_name} / {target_name} exceeded "
                                  f"{WORKER_TIMEOUT_S} s")
            finally:
                with _PROCS_LOCK:
                    _PROCS.discard(proc)
            wall = time.perf_counter() - t0
            tail = log[-6000:].strip()
            if proc.returncode in (_API_MISMATCH, _NO_BACKEND):
                return dict(skip=f"{module_name}/{target_name}: {tail.splitlines()[-1] if tail else 'skipped'}")
            if proc.returncode != 0 or not os.path.exists(out):
                return dict(error=f"worker for {module_name} / {target_name} failed (rc {proc.returncode}):\n{tail}")
            res = json.loads(Path(out).read_text())
        res["wall_s"] = round(wall, 1)
        report = os.environ.get("BEIT_FAST_AOT_REPORT")   # directory for the raw per-variant results
        if report:
            os.makedirs(report, exist_ok=True)
            Path(report, f"{module_name}_{target_name}.json").write_text(json.dumps(res, indent=1))
        return res

    # Cost order: the slowest workers start first.
    _ORDER = [(m, t) for m in ("rel_pos_attention", "linear_gelu", "layer_norm") for t in TARGETS]

    @pytest.fixture(scope="session")
    def aot_results(request):
        """Starts the workers the selected tests need, in parallel (BEIT_FAST_AOT_JOBS, default: the CPU
        count, at most 4: each takes ~1.3 GB), and maps (module, target) -> future of the worker's result."""
        me = Path(__file__).resolve()
        needed = set()
        for item in request.session.items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if Path(str(item.fspath)).resolve() == me and "module_name" in params:
                needed.add((params["module_name"], params["target_name"]))
        jobs = int(os.environ.get("BEIT_FAST_AOT_JOBS", 0)) or min(4, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        futures = {pair: pool.submit(_run_worker, *pair) for pair in _ORDER if pair in needed}
        yield futures
        for f in futures.values():
            f.cancel()
        with _PROCS_LOCK:
            for proc in list(_PROCS):   # interrupted session: stop the workers this fixture started
                proc.kill()
        pool.shutdown(wait=True)

    def _result(aot_results, module_name: str, target_name: str) -> dict:
        res = aot_results[(module_name, target_name)].result()
        if "skip" in res:
            pytest.skip(res["skip"])
        if "error" in res:
            pytest.fail(res["error"])
        return res

    def _describe(v: dict) -> str:
        cfg = f" config={v['config']}" if v["config"] else ""
        return (f"{v['kernel']} [{v['family']}]{cfg} warps={v['num_warps']} stages={v['num_stages']} "
                f"constexprs={v['constexprs']} (from: {v['scenarios'][0]})")

    @pytest.mark.parametrize("family", FAMILIES)
    @pytest.mark.parametrize("target_name", list(TARGETS))
    @pytest.mark.parametrize("module_name", MODULES)
    def test_kernels_compile(aot_results, module_name, target_name, family):
        res = _result(aot_results, module_name, target_name)
        _, smem_limit = TARGETS[target_name]
        mine = [v for v in res["variants"] if v["family"] == family and v["selected"]]
        assert mine, f"no {family} variant of {module_name} selected for {target_name}"
        failed = [f"{_describe(v)}\n    {v['error']}" for v in mine if not v["compiled"]]
        assert not failed, (f"{len(failed)}/{len(mine)} {family} variants of {module_name} do not compile for "
                            f"{target_name}:\n" + "\n".join(failed))
        # Shared memory: a fixed launch over the limit fails on the GPU (OutOfResources). An autotuned config
        # over it is skipped by Triton's autotuner: fine while another config of that specialization fits.
        over = [v for v in mine if v["shared"] > smem_limit]
        msg = [f"{_describe(v)}: shared memory {v['shared']} B > {smem_limit} B" for v in over if not v["autotuned"]]
        groups: dict = {}
        for v in mine:
            if v["autotuned"]:
                groups.setdefault((v["kernel"], v["scenarios"][0]), []).append(v)
        msg += [f"{k} ({s}): no autotune config fits in {smem_limit} B of shared memory"
                for (k, s), vs in groups.items() if all(v["shared"] > smem_limit for v in vs)]
        assert not msg, f"{module_name} on {target_name}:\n" + "\n".join(msg)
        # Tensor cores: on sm_90 every 16-bit tl.dot must lower to Hopper's warpgroup MMA (wgmma); Triton falls
        # back to the warp-level mma.sync (about half the peak) for tiles wgmma cannot take (fewer than 64
        # rows per warpgroup, num_warps not a multiple of 4).
        if target_name == "sm90" and family != "fp32":
            dots = _dot_kernels(module_name)
            assert dots or module_name == "layer_norm", f"no tl.dot found in kernels/{module_name}.py"
            # A variant with a block tail (BLOCK_TAIL: the last program's tile has fewer than 64 rows) runs that
            # one program on mma.sync by design; its full blocks should still use wgmma (checked here only as
            # "some wgmma": PTX counts cannot tell which dot each instruction came from).
            slow = [f"{_describe(v)}: PTX has {v['mma']['wgmma']} wgmma, {v['mma']['mma_sync']} mma.sync"
                    for v in mine if v["kernel"] in dots and (v["mma"]["wgmma"] == 0 or (
                        v["mma"]["mma_sync"] and not 0 < int(v["constexprs"].get("BLOCK_TAIL", 0)) < 64))]
            assert not slow, f"{module_name} on sm_90 without wgmma:\n" + "\n".join(slow)
        notes = [f"autotune config skipped at run time, shared {v['shared']} B > {smem_limit} B: {_describe(v)}"
                 for v in over]
        notes += [f"register spills {v['spill_stores']} B stores / {v['spill_loads']} B loads, {v['regs']} "
                  f"registers: {_describe(v)}" for v in mine if v["spill_stores"] or v["spill_loads"]]
        if notes:
            warnings.warn(f"{module_name} {family} on {target_name}, {len(notes)} of {len(mine)} variants:\n  "
                          + "\n  ".join(notes))

    @pytest.mark.parametrize("target_name", list(TARGETS))
    @pytest.mark.parametrize("module_name", MODULES)
    def test_every_kernel_has_compiled_variants(aot_results, module_name, target_name):
        res = _result(aot_results, module_name, target_name)
        launched = _launched_kernels(module_name)
        assert launched, f"no launched @triton.jit kernel found in kernels/{module_name}.py"
        counts = {k: sum(1 for v in res["variants"] if v["kernel"] == k and v["compiled"]) for k in launched}
        missing = [k for k, n in counts.items() if n == 0]
        assert not missing, (f"{module_name}: kernels without any compiled {target_name} variant (add a launcher "
                             f"scenario to tests/test_triton_compile.py): {missing}; counts {counts}")


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:4]))
