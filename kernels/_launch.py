"""Launch a Triton kernel without Triton's per-call dispatch when the call repeats one seen before.

`kernel[grid](*args, **kwargs)` runs JITFunction.run on every call: it binds and specializes every argument,
builds a cache key string, looks the compiled kernel up, checks the globals the kernel read, and only then
calls the compiled kernel's launcher. With the attention kernels' ~45 arguments that takes about 20 us of host
time a launch on the 2-core CI machine (`python bench/triton_dispatch.py` measures the launchers through a
stand-in driver), about as much as the rest of an op's Python; a training step launches ~130 such kernels,
and on the GPU machine measured so far the fused step was host-bound (bench/results).

`launch(kernel, grid, *args, **kwargs)` keeps, per kernel, the compiled kernels of the calls it has seen,
under a key that holds at least everything Triton specializes on: every int, str, None, float, bool and
constexpr exactly (a bool or float never equal to an int), each tensor's dtype and whether its address is
16-byte aligned, the compile options (num_warps, ...) and the current device. A call whose key was seen
launches that compiled kernel exactly as JITFunction.run's last step does (the same launcher, stream,
metadata, hooks and argument tuple, for the calling convention of the installed Triton: every bound argument
from Triton 3.3 on, the non-constexpr ones in 3.2); any other call goes through `kernel[grid]` itself, which
compiles if needed, and its compiled kernel is remembered. An autotuned kernel (triton.autotune) is launched
the same way with the config its tuner chose for that key (fixed once tuned) and the grid that config gives.
Not taken (always `kernel[grid]`): the interpreter, a Triton whose JITFunction.run this module does not
recognize, tensor subclasses, a kernel whose parameters are not all passed, a callable grid without an
autotuner, a config with a pre_hook, and with BEIT_FAST_TRITON_LAUNCH=jit (read at import; an A/B knob).

Not seen by this path, as they are not by a compiled kernel: changing TRITON_DEBUG (knobs.runtime.debug),
knobs.compilation.instrumentation_mode or a global a kernel reads after its first launch in the process, and
JITFunction.pre_run_hooks (which Triton itself does not use for these kernels).
"""
from __future__ import annotations

import inspect
import operator
import os

import torch

from ._settings import launch_setting

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_EXACT = frozenset((int, str, type(None)))   # kept as they are in the key
_SUBCLASS = object()


def _other_key(a):
    """The key part of an argument that is not an int, str or None."""
    t = type(a)
    if t is _Tensor or t is _Parameter:
        return a.dtype, a.data_ptr() & 15 == 0
    if isinstance(a, _Tensor):
        return _SUBCLASS
    return t, a   # floats and bools never equal to an int; constexpr-like values (dtypes, ...) must hash


MAX_ENTRIES = 256   # compiled variants remembered per kernel (shapes, dtypes, tiles: bench/tune_attention.py
#                    tries ~80 per kernel); later ones take Triton's path


def _launch_setting() -> str:
    return launch_setting(os.environ.get("BEIT_FAST_TRITON_LAUNCH", ""))


def _convention():
    """(argument convention, hook source) of the installed Triton's JITFunction.run, or None if unknown:
    ("all" | "non_constexpr", "knobs" | "compiled_kernel")."""
    try:
        from triton.runtime.jit import JITFunction
        src = inspect.getsource(JITFunction.run)
    except Exception:   # no Triton, no source
        return None
    if "kernel.run(" not in src:
        return None
    if "*bound_args.values())" in src:
        args = "all"
    elif "*non_constexpr_vals)" in src:
        args = "non_constexpr"
    else:
        return None
    if "knobs.runtime.launch_enter_hook" in src:
        hooks = "knobs"
    elif "CompiledKernel.launch_enter_hook" in src:
        hooks = "compiled_kernel"
    else:
        return None
    return args, hooks


SETTING = _launch_setting()
CONVENTION = _convention()
# Whether launch() may skip Triton's dispatch in this process (the interpreter's kernels are no JITFunction)
ENABLED = SETTING == "cached" and CONVENTION is not None


class _Entry:
    __slots__ = ("kernel", "tail", "extra", "grid")

    def __init__(self, kernel, tail_names, extra=None, grid=None):
        self.kernel = kernel
        # the parameters after the positional arguments, from the keyword arguments, in signature order
        getter = operator.itemgetter(*tail_names) if tail_names else (lambda kw: ())
        self.tail = getter if len(tail_names) != 1 else (lambda kw, g=getter: (g(kw),))
        self.extra = extra   # an autotuner's chosen config: its keyword arguments, added to the call's
        self.grid = grid     # the grid a callable grid gave for this key (autotuned launches)


class _Cached:
    """The remembered compiled kernels of one JITFunction, or of the JITFunction an Autotuner wraps (its
    config for a key is fixed once tuned: the key holds every int, so the tuner's own key too)."""

    def __init__(self, fn):
        from triton.runtime.driver import driver
        self.fn = fn
        self.tuner = type(fn).__name__ == "Autotuner"
        jit = fn.fn if self.tuner else fn
        self.driver = driver
        self.names = list(jit.arg_names)
        self.constexpr = [p.is_constexpr for p in jit.params]
        self.entries: dict = {}
        if CONVENTION[1] == "knobs":
            from triton import knobs
            self.runtime = knobs.runtime
        else:
            self.runtime = None

    @staticmethod
    def key(device, args, kwargs):
        """None when a tensor subclass (or a tensor without storage) is among the arguments."""
        parts = [a if type(a) in _EXACT else _other_key(a) for a in args]
        if _SUBCLASS in parts:
            return None
        constexprs = tuple([(k, v if type(v) in _EXACT else _other_key(v)) for k, v in kwargs.items()])
        return device, constexprs, tuple(parts)

    def __call__(self, grid, args, kwargs):
        try:
            drv = self.driver.active
            device = drv.get_current_device()
            key = self.key(device, args, kwargs)
            entry = self.entries.get(key) if key is not None else None
        except Exception:   # no driver, no data pointer (meta tensors), an unhashable argument: Triton's path,
            return self.fn[grid](*args, **kwargs)   # which raises what is really wrong
        if entry is None:
            kernel = self.fn[grid](*args, **kwargs)
            if key is not None and len(self.entries) < MAX_ENTRIES:
                self._remember(key, kernel, grid, args, kwargs)
            return kernel
        kernel = entry.kernel
        if entry.extra is not None:
            kwargs = {**kwargs, **entry.extra}
            grid = entry.grid
        bound = args + entry.tail(kwargs)
        if CONVENTION[0] == "non_constexpr":
            bound = tuple(v for v, c in zip(bound, self.constexpr) if not c)
        if self.runtime is not None:
            enter, exit_ = self.runtime.launch_enter_hook, self.runtime.launch_exit_hook
        else:
            cls = type(kernel)
            enter, exit_ = cls.launch_enter_hook, cls.launch_exit_hook
        stream = drv.get_current_stream(device)
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, kernel.function,
                   kernel.packed_metadata, kernel.launch_metadata(grid, stream, *bound), enter, exit_, *bound)
        return kernel


    def _remember(self, key, kernel, grid, args, kwargs):
        """Keep what a launch through Triton compiled and launched, when it can be launched again directly: a
        compiled kernel (not a test's recorder), every parameter passed, no callable grid (an autotuned
        launch's grid is evaluated for its config here: fixed for the key), no config pre_hook."""
        if not all(hasattr(kernel, a) for a in ("function", "packed_metadata", "launch_metadata")):
            return
        extra, fixed_grid = None, None
        if self.tuner:
            config = getattr(self.fn, "best_config", None)
            if config is None or config.pre_hook is not None or type(self.fn.fn).__name__ != "JITFunction":
                return
            extra = dict(config.all_kwargs())
            kwargs = {**kwargs, **extra}
            fixed_grid = grid(dict(zip(self.names, args), **kwargs)) if callable(grid) else grid
        elif callable(grid):
            return
        tail = self.names[len(args):]
        if all(n in kwargs for n in tail):
            self.entries[key] = _Entry(kernel, tail, extra, fixed_grid)


_CACHED: dict = {}   # id(JITFunction) -> _Cached (a JITFunction's own hash rehashes its source key)


def launch(fn, grid, *args, **kwargs):
    """fn[grid](*args, **kwargs), through the remembered compiled kernel when this call's key was seen."""
    if not ENABLED or type(fn).__name__ not in ("JITFunction", "Autotuner"):
        return fn[grid](*args, **kwargs)
    cached = _CACHED.get(id(fn))
    if cached is None or cached.fn is not fn:
        cached = _CACHED[id(fn)] = _Cached(fn)
    return cached(grid, args, kwargs)


def clear() -> None:
    """Forget every remembered compiled kernel (tests)."""
    _CACHED.clear()
