"""`python -m beit_fast.info`: versions, the device, and which backend of every fused op runs here (and why not)."""
from __future__ import annotations

import importlib
import os
import platform

import torch

from . import _backend
from ._archs import arch_list
from .kernels import _settings
from .ops import OPS


def _versions() -> list[str]:
    lines = [f"beit_fast {importlib.import_module('beit_fast').__version__}",
             f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    err = _backend.triton_import_error()
    if err:
        lines.append(f"triton: not available ({err})")
    else:
        import triton
        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if _backend.interpret_mode() else ""))
        lines.append(_launch_line())
    mod, err = _backend.extension()
    archs = mod.cuda_archs() if mod is not None and hasattr(mod, "cuda_archs") else ""
    skipped = _backend.cuda_skip_reason() if mod is not None else ""
    lines.append(f"beit_fast._C: {'built ' + ('with' if mod.built_with_cuda() else 'without') + ' CUDA' if mod else err}"
                 + (f" (code for TORCH_CUDA_ARCH_LIST={arch_list(archs)})" if archs else "")
                 + (f" (setup.py skipped the CUDA sources because {skipped})" if skipped else ""))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB), "
                     f"{torch.cuda.device_count()} visible")
    else:
        lines.append("device: CPU only (no CUDA device visible)")
    lines.append(settings_line())
    lines += [f"settings problem: {p}" for p in settings_problems()]
    return lines


def _launch_line() -> str:
    """How Triton kernels are launched in this process (kernels/_launch.py)."""
    try:
        from beit_fast.kernels import _launch
    except Exception as e:   # a broken Triton install: the backend table says more
        return f"triton launches: unknown ({type(e).__name__}: {e})"
    if _backend.interpret_mode():
        return "triton launches: by the interpreter (TRITON_INTERPRET=1)"
    if _launch.ENABLED:
        args, hooks = _launch.CONVENTION
        return (f"triton launches: repeated ones from the compiled-kernel cache (this Triton's convention: "
                f"{args} arguments, {hooks.replace('_', ' ')} hooks)")
    why = ("BEIT_FAST_TRITON_LAUNCH=jit" if _launch.SETTING == "jit"
           else "this Triton's JITFunction.run is not one kernels/_launch.py knows")
    return f"triton launches: every one through JITFunction.run ({why})"


def settings_line(environ=None) -> str:
    """The BEIT_FAST_* environment settings in effect (kernel plan knobs, backend overrides, ...), so that a
    benchmark's record says which variant ran."""
    env = os.environ if environ is None else environ
    set_ = sorted(f"{k}={v}" for k, v in env.items() if k.startswith("BEIT_FAST_"))
    return "settings: " + (" ".join(set_) if set_ else "no BEIT_FAST_* variable set (defaults)")


# the BEIT_FAST_* variables beit_fast reads; a value check for those read at run time ("" = fine)
def _check_backend(v):
    return "" if v.strip() in _backend.BACKENDS + ("auto", "") else (
        f"BEIT_FAST_BACKEND must be one of {_backend.BACKENDS + ('auto',)} (or unset), got {v!r}: every op "
        "called with backend='auto' raises BackendUnavailable")


def _check_lsrn(v):
    return "" if v in ("", "warp", "block") else (
        f"BEIT_FAST_LSRN_FORWARD must be warp or block (or unset), got {v!r}: layer_scale_residual_norm's CUDA "
        "forward raises")


def _check_by(parse):
    def check(v):
        try:
            parse(v)
        except ValueError as e:
            return f"{e}: the Triton kernels refuse it when imported"
        return ""
    return check


_SETTINGS = {
    "BEIT_FAST_BACKEND": _check_backend,
    "BEIT_FAST_ATTN_DENSE_BIAS": _check_by(_settings.dense_bias_setting),
    "BEIT_FAST_TRITON_LAUNCH": _check_by(_settings.launch_setting),
    "BEIT_FAST_LSRN_FORWARD": _check_lsrn,
    "BEIT_FAST_LINEAR_GELU_RECOMPUTE": None,
    # build, tests and benchmarks
    **dict.fromkeys(["BEIT_FAST_CUDA", "BEIT_FAST_TEST_SEED", "BEIT_FAST_TRITON_INTERPRET", "BEIT_FAST_INSTAFAIL",
                     "BEIT_FAST_EMULATOR_ASAN", "BEIT_FAST_AOT_FULL", "BEIT_FAST_AOT_REPORT", "BEIT_FAST_AOT_JOBS",
                     "BEIT_FAST_GIT_SHA"]),
}


def settings_problems(environ=None) -> list[str]:
    """BEIT_FAST_* variables set to a value their reader refuses, and names beit_fast never reads (typos)."""
    env = os.environ if environ is None else environ
    out = []
    for k in sorted(k for k in env if k.startswith("BEIT_FAST_")):
        if k not in _SETTINGS:
            out.append(f"{k} is not a variable beit_fast reads (README: Environment variables); it does nothing")
        elif _SETTINGS[k] is not None and _SETTINGS[k](env[k]):
            out.append(_SETTINGS[k](env[k]))
    return out


def _op_modules():
    """(op, its module or None, why it failed to import or None, its backends) for every op."""
    for name, (module, backends) in OPS.items():
        try:
            yield name, importlib.import_module(module), None, backends
        except Exception as e:
            yield name, None, f"{module} failed to import ({type(e).__name__}: {e})", backends


def backend_table(device: str) -> list[tuple[str, str, list[str]]]:
    """(op, backend, reasons) for every op and backend on `device` ('cpu' or 'cuda')."""
    return [(name, b, [err] if err else _reasons(mod, b, device))
            for name, mod, err, backends in _op_modules() for b in backends]


def _reasons(mod, backend: str, device: str, auto: bool = False) -> list[str]:
    """Why `backend` of the op in module `mod` cannot run for tensors on `device` (empty: it can). An op
    whose module has `device_independent_reasons` (block_mask: masks are made on the CPU whatever the
    model's device) answers for itself; the others take the shared reasons, then the module's
    `environment_reasons`."""
    own = getattr(mod, "device_independent_reasons", None)
    if own is not None:
        return list(own(backend, auto))
    why = _backend.common_reasons(backend, [device], auto=auto)
    extra = getattr(mod, "environment_reasons", None)
    if extra is not None and not why:
        why = list(extra(backend, device))
    return why


def picked(device: str, rows) -> dict:
    """op -> (backend, note): the backend a call with backend='auto' runs for tensors on `device` (the
    BEIT_FAST_BACKEND override for the ops that have that backend, whether or not it can run), from
    backend_table's rows."""
    env = os.environ.get("BEIT_FAST_BACKEND", "auto").strip() or "auto"
    if env not in _backend.BACKENDS + ("auto",):
        return {}   # every call raises (the settings line says why)
    runs = {(op, b): not why for op, b, why in rows}
    out = {}
    for name, mod, err, backends in _op_modules():
        if env in backends:
            out[name] = (env, "<- BEIT_FAST_BACKEND" + ("" if runs[(name, env)] else ": calls raise"))
        elif err is None:   # auto's reasons hold the others' (and refuse the interpreter)
            first = next((b for b in backends if not _reasons(mod, b, device, auto=True)), None)
            if first is not None:
                out[name] = (first, "<- auto")
    return out


def main() -> None:
    print("\n".join(_versions()))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\nbackends for {dev} tensors (<- what a call runs):")
        rows = backend_table(dev)
        chosen = picked(dev, rows)
        for op, b, why in rows:
            mark = chosen[op][1] if chosen.get(op, (None,))[0] == b else ""
            print(f"  {op:27s} {b:10s} " + ("available" if not why else "unavailable: " + "; ".join(why))
                  + (f"  {mark}" if mark else ""))


if __name__ == "__main__":
    main()
