"""One backend chooser for every fused op.

Backends:
  "cuda"      the extension's (or a Triton-free) CUDA kernel, tensors on a CUDA device
  "cpp"       the extension's C++ CPU kernel (same per-element math as the CUDA kernel)
  "triton"    a Triton kernel: tensors on a GPU, or on the CPU under TRITON_INTERPRET=1
  "reference" the PyTorch reference: runs everywhere

`backend="auto"` takes the first backend of the op's preference order with no reason against it; on CPU
tensors Triton is never chosen automatically (the interpreter is a test tool, not a fast path).
`BEIT_FAST_BACKEND` overrides "auto" for every op that has that backend. A forced backend that cannot run raises BackendUnavailable listing
every reason.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.autograd import forward_ad

from ._archs import archs_run_on, parse_archs

BACKENDS = ("cuda", "cpp", "triton", "reference")


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run these inputs here; the message lists why."""


def _load_extension():
    try:
        return importlib.import_module("beit_fast._C"), None
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        return None, (f"beit_fast._C is not importable ({type(e).__name__}: {e}); reinstall with "
                      "`pip install --no-build-isolation .`")


# Resolved once at import, so that the backend choice is plain attribute reads that torch.compile can
# trace without a graph break.
_EXTENSION = _load_extension()
_EXTENSION_HAS_CUDA = bool(_EXTENSION[0] is not None and _EXTENSION[0].built_with_cuda())


def extension():
    """(module, None) when beit_fast._C imports, else (None, reason)."""
    return _EXTENSION


def cuda_skip_reason() -> str:
    """Why the extension was built without its CUDA sources, as setup.py said ("" when not known)."""
    mod = _EXTENSION[0]
    try:
        return bytes.fromhex(mod._cuda_skip_reason_hex()).decode() if hasattr(mod, "_cuda_skip_reason_hex") else ""
    except ValueError:
        return ""


# what the extension's CUDA code was built for (None: no CUDA, or not known: then no check)
_CUDA_ARCHS_TEXT = (_EXTENSION[0].cuda_archs() if _EXTENSION_HAS_CUDA and hasattr(_EXTENSION[0], "cuda_archs")
                    else "")
_CUDA_ARCHS = parse_archs(_CUDA_ARCHS_TEXT)


def _assume_constant(fn):
    """torch.compile evaluates fn once while tracing and keeps its result (a device query is no graph op)."""
    dynamo = getattr(torch, "_dynamo", None)
    return dynamo.assume_constant_result(fn) if hasattr(dynamo, "assume_constant_result") else fn


_CAPABILITIES: dict = {}


@_assume_constant
def device_capability(index) -> tuple:
    """(major, minor) of CUDA device `index` (None: the current one), queried once per device."""
    if index is None:
        index = torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITIES[index]


def _cuda_index(tensors):
    """The index of the first CUDA tensor's device (None: a device string, or no index: the current one)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return t.device.index
    return None


TRITON_MIN_CAPABILITY = (8, 0)   # Ampere: the tile configs' shared memory, bf16 (kernels/ tested there)


def extension_has_cuda() -> bool:
    """Whether beit_fast._C has its CUDA sources (read once at import: a pybind call is a graph break)."""
    return _EXTENSION_HAS_CUDA


def _triton_reads_a_boolean() -> bool:
    """Whether the installed Triton reads TRITON_INTERPRET as a boolean (3.4+: knobs.runtime.interpret) rather
    than as exactly "1" (3.2 / 3.3: the jit decorator's own test), from its version, without importing it."""
    try:
        from importlib.metadata import version
        major, minor = (int(x) for x in version("triton").split(".")[:2])
    except Exception:   # no Triton (or an unreadable version): its own reading does not matter then
        return False
    return (major, minor) >= (3, 4)


_BOOLEAN_ENV = _triton_reads_a_boolean()


def interpret_mode() -> bool:
    """Whether TRITON_INTERPRET turns Triton's interpreter on, read as the installed Triton reads it: from 3.4
    on as its boolean knob does (1, true, yes, on or y, in any case, unstripped: "false", "off" or "no" leave
    it off), in 3.2 / 3.3 only the exact value "1". Off, CPU tensors have no Triton backend. Plain Python over
    os.environ (torch.compile traces the backend choice; Triton's own knob reads it in C++)."""
    value = os.environ.get("TRITON_INTERPRET", "0")
    if _BOOLEAN_ENV:
        return value.lower() in ("1", "true", "yes", "on", "y")
    return value == "1"


# set on triton.runtime.interpreter by the test suite's bf16 emulation (tests/interpreter_bf16.py)
BF16_EMULATION_MARK = "BEIT_FAST_BF16_EMULATED"


def interpreter_bf16_problem(tensors) -> Optional[str]:
    """Why the Triton interpreter cannot run a kernel on these tensors in bf16 (None: it can, the interpreter
    is off, or none is bf16). The interpreter (whatever the tensors' device: it copies them to the host) keeps
    bf16 as raw bits and computes on them as integers; the test suite installs an emulation
    (tests/interpreter_bf16.py) that marks the interpreter module, and then bf16 runs."""
    if not interpret_mode() or not any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in tensors):
        return None
    module = sys.modules.get("triton.runtime.interpreter")
    if module is not None and getattr(module, BF16_EMULATION_MARK, False):
        return None
    return "the Triton interpreter cannot do bf16 arithmetic"


def tf32_matmul() -> bool:
    """torch's TF32 switch for fp32 matmuls, whichever API set it. torch >= 2.9 has `fp32_precision` (the
    legacy `allow_tf32` setter updates it too), and reading `allow_tf32` raises once the new API was used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:                      # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":                    # inherit the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _version_tuple(v: str) -> tuple:
    """'2.4.1' -> (2, 4); '3.6.0+git...' -> (3, 6)."""
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_interpreter_versions() -> Optional[str]:
    """Why the Triton interpreter cannot run the kernels here (None: it can). Triton < 3.7's interpreter turns
    one-element arrays into Python ints with int(), which numpy >= 2.4 refuses (every loop bound fails)."""
    from importlib import metadata
    try:
        triton_v, numpy_v = metadata.version("triton"), metadata.version("numpy")
    except metadata.PackageNotFoundError:
        return None
    if _version_tuple(triton_v) < (3, 7) and _version_tuple(numpy_v) >= (2, 4):
        return (f"the interpreter of Triton {triton_v} fails with numpy {numpy_v} (it calls int() on "
                f"1-element arrays); use numpy<2.4 or Triton>=3.7")
    return None


# read once, at import: the backend choice is traced by torch.compile, which cannot trace importlib.metadata
INTERPRETER_PROBLEM = check_interpreter_versions()


_TRITON_ERROR = []


def triton_import_error():
    """None when Triton imports, else why not (computed once; a plain list, not lru_cache, so that
    torch.compile can trace the backend choice without a warning)."""
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_ERROR.append(None)
        except Exception as e:
            _TRITON_ERROR.append(f"triton is not importable ({type(e).__name__}: {e})")
    return _TRITON_ERROR[0]


def _devices(tensors: Iterable) -> set:
    """Device types of the tensors; a str or torch.device stands for a tensor on that device."""
    out = set()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            out.add(t.device.type)
        elif isinstance(t, (str, torch.device)):
            out.add(torch.device(t).type)
    return out


def offset_span(t: torch.Tensor) -> int:
    """1 + the largest element offset a kernel computes for `t` (sum of (size - 1) x |stride|): what its int32
    index x stride products must hold. A view with gaps (a slice of a wider tensor) spans more than its numel."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))


def forward_ad_active(tensors: Sequence) -> bool:
    """Whether forward-mode AD is pushing tangents through this call: a torch.func.jvp (or jacfwd) transform,
    or a torch.autograd.forward_ad dual level with a dual tensor among `tensors`. The fused kernels have no
    forward-mode formula, and their registrations would drop the tangents without a word (no tangent, or a
    zero one); the references compute them."""
    if torch.compiler.is_compiling():
        return False
    if getattr(forward_ad, "_current_level", -1) >= 0:
        try:
            if any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
                return True
        except RuntimeError:   # a vmap inside the dual level (jvp of vmap): unpack_dual has no batching rule,
            return True        # so the tangents cannot be seen; the reference is right either way
    if torch._C._are_functorch_transforms_active():
        try:
            jvp = torch._C._functorch.TransformType.Jvp
            return any(ci.key() == jvp for ci in torch._C._functorch.get_interpreter_stack() or ())
        except AttributeError:   # a torch without these internals: the transforms' own checks apply
            return False
    return False


def common_reasons(backend: str, tensors: Sequence, *, auto: bool = False) -> list[str]:
    """Reasons, shared by all ops, why `backend` cannot run on these tensors (or devices, for `info`)."""
    devs = _devices(tensors)
    why = []
    if backend != "reference" and any(isinstance(t, torch.Tensor) for t in tensors) and forward_ad_active(tensors):
        why.append("forward-mode AD (torch.func.jvp / torch.autograd.forward_ad) is active and the fused kernels "
                   "have no forward-mode formula: the reference computes the tangents")
    if len(devs) > 1:
        why.append(f"tensors are on several device types {sorted(devs)}")
    dev = next(iter(devs)) if len(devs) == 1 else None
    if backend == "cuda":
        mod, err = extension()
        if err:
            why.append(err)
        elif not extension_has_cuda():
            skipped = cuda_skip_reason()
            why.append("beit_fast._C was built without its CUDA sources" + (f" because {skipped}" if skipped else
                       " (see the build log line 'skipping CUDA sources')"))
        elif dev == "cuda" and _CUDA_ARCHS is not None and torch.cuda.is_available():
            cap = device_capability(_cuda_index(tensors))
            if not archs_run_on(_CUDA_ARCHS, cap):
                why.append(f"beit_fast._C's CUDA kernels were built for {_CUDA_ARCHS_TEXT}, not for this "
                           f"GPU's compute capability {cap[0]}.{cap[1]}: rebuild with TORCH_CUDA_ARCH_LIST including "
                           f"{cap[0]}.{cap[1]}")
        if dev != "cuda":
            why.append(f"the cuda backend needs CUDA tensors, got {dev} tensors")
    elif backend == "cpp":
        _, err = extension()
        if err:
            why.append(err)
        if dev != "cpu":
            why.append(f"the cpp backend needs CPU tensors, got {dev} tensors")
    elif backend == "triton":
        err = triton_import_error()
        if err:
            why.append(err)
        if dev == "cpu":
            if not interpret_mode():
                why.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set (set it before importing triton)")
            elif INTERPRETER_PROBLEM:
                why.append(INTERPRETER_PROBLEM)
            elif auto:
                why.append("auto never picks the Triton interpreter for CPU tensors; pass backend='triton'")
        elif dev != "cuda":
            why.append(f"the triton backend needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {dev}")
        elif torch.cuda.is_available() and device_capability(_cuda_index(tensors)) < TRITON_MIN_CAPABILITY:
            cap = device_capability(_cuda_index(tensors))
            why.append(f"the Triton kernels need compute capability {TRITON_MIN_CAPABILITY[0]}."
                       f"{TRITON_MIN_CAPABILITY[1]} or newer (Ampere+); this GPU's is {cap[0]}.{cap[1]}")
        bf16_problem = interpreter_bf16_problem(tensors)
        if bf16_problem:
            why.append(bf16_problem)
    elif backend != "reference":
        why.append(f"unknown backend {backend!r}; expected one of {BACKENDS + ('auto',)}")
    return why


def choose(op: str, backend: str, reasons: Callable[[str, bool], list[str]], preference: Sequence[str]) -> str:
    """Pick the backend for one call.

    reasons(backend, auto) -> list of reasons it cannot run (empty = it can).
    preference: the op's backends, fastest first; "reference" must be last.
    """
    forced_by = ""
    if backend == "auto":
        # The override applies to the ops that have that backend; the others stay on auto, so that
        # BEIT_FAST_BACKEND=triton runs every Triton kernel of a model and leaves the C++ ops alone.
        env = os.environ.get("BEIT_FAST_BACKEND", "auto").strip() or "auto"
        if env in preference:
            backend, forced_by = env, f" (chosen by BEIT_FAST_BACKEND={env}; unset it for 'auto')"
        elif env not in BACKENDS + ("auto",):
            raise BackendUnavailable(f"BEIT_FAST_BACKEND={env!r} is not one of {BACKENDS + ('auto',)}")
    if backend == "auto":
        for b in preference:
            if not reasons(b, True):
                return b
        raise BackendUnavailable(f"{op}: no backend can run these inputs: " + "; ".join(
            f"{b}: {', '.join(reasons(b, True))}" for b in preference))
    if backend not in preference:
        raise BackendUnavailable(f"{op}: backend {backend!r} is not one of this op's backends {tuple(preference)} (or 'auto')")
    why = reasons(backend, False)
    if why:
        raise BackendUnavailable(f"{op}: backend {backend!r}{forced_by} cannot run here: " + "; ".join(why))
    return backend


_HAS_KERNEL: dict = {}


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for `beit_fast::op` under CPU / CUDA. Remembered per
    (op, key), and filled for both keys when an op module registers its op at import, so that the backend
    choice under torch.compile is a dict read (the dispatcher query is a graph break)."""
    key = (qualname, dispatch_key)
    if key not in _HAS_KERNEL:
        try:
            _HAS_KERNEL[key] = bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key))
        except RuntimeError:  # no such op
            _HAS_KERNEL[key] = False
    return _HAS_KERNEL[key]


def register_extension_op(op: str, fake_forward, fake_backward, backward, setup_context) -> bool:
    """Fake (meta) functions for `beit_fast::<op>` and `beit_fast::<op>_backward` and the autograd formula
    of the forward, for an op the C++ extension defines. Does nothing (returns False) when the extension
    did not load or has no CPU kernel for the op; call once per process, at the op module's import."""
    mod, _ = extension()
    if mod is None or not has_kernel(f"beit_fast::{op}", "CPU"):
        return False
    has_kernel(f"beit_fast::{op}", "CUDA")   # remembered now, read by extension_op_reasons at call time
    torch.library.register_fake(f"beit_fast::{op}")(fake_forward)
    torch.library.register_fake(f"beit_fast::{op}_backward")(fake_backward)
    torch.library.register_autograd(f"beit_fast::{op}", backward, setup_context=setup_context)
    return True


def extension_op_reasons(op: str, backend: str) -> list[str]:
    """Input-independent reasons (shown by `python -m beit_fast.info`) why the extension's `backend`
    ("cuda" or "cpp") cannot run `beit_fast::<op>`: an extension built before the op existed, or without
    its CUDA kernel."""
    key = {"cuda": "CUDA", "cpp": "CPU"}.get(backend)
    if key is not None and extension()[0] is not None and not has_kernel(f"beit_fast::{op}", key):
        return [f"beit_fast._C has no {key} kernel for beit_fast::{op} (rebuild the extension)"]
    return []
