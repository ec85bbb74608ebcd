"""A stand-in for Triton's CUDA driver on a machine without a GPU (bench/sass_report.py, the launch tests,
bench/triton_dispatch.py).

Installed as Triton's active driver, it makes `kernel[grid](...)` on CPU tensors go through JITFunction.run's
whole host path as on a GPU: argument binding and specialization (alignment of the tensors' addresses,
ints equal to 1 or divisible by 16), the cache key, a real compile for the chosen target (Triton's bundled
ptxas) on a miss, the compiled kernel's launcher; an autotuner keeps its first config (nothing can be
timed). Nothing is loaded and nothing runs: the launcher records
(kernel name, grid, the arguments it was given: the stream, function handle, metadata, hooks, then the
kernel's own) in the list install_fake_driver returns.
"""
from __future__ import annotations

import os
import shutil

import torch


class Unsupported(RuntimeError):
    """This Triton has no CUDA backend, bundled tools or driver API this module was written against (3.2-3.8)."""


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary tool bundled with Triton (cuobjdump, nvdisasm, ptxas), else on PATH."""
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        path = shutil.which(name) or ""
    if not path:
        raise Unsupported(f"no {name} (neither bundled with Triton nor on PATH)")
    return path


def install_fake_driver(arch: int = 90) -> list:
    """Make Triton's active driver one that compiles for sm_`arch` and loads / launches nothing (call before
    the first launch; TRITON_INTERPRET must be unset when the kernels are defined). Returns the list each
    launch appends (name, (gx, gy, gz), args after the grid) to."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaDriver
        from triton.runtime.driver import driver
    except ImportError as e:
        raise Unsupported(f"Triton's CUDA backend is not importable: {e}") from e
    launches = []
    import inspect
    from triton.compiler.compiler import CompiledKernel
    # module, function, n_regs, n_spills (and, from Triton 3.4 on, the most threads a block may have)
    loaded = (0, 0, 0, 0, 1024) if "n_max_threads" in inspect.getsource(CompiledKernel._init_handles) else (0, 0, 0, 0)

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return loaded

        def unload_module(self, module):
            pass

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448 if arch >= 90 else 166912, "multiprocessor_count": 132,
                    "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                    "mem_bus_width": 5120}

    class Launcher:
        def __init__(self, src, metadata):
            self.name = metadata.name

        def __call__(self, gx, gy, gz, *args):
            launches.append((self.name, (gx, gy, gz), args))

    class FakeDriver(CudaDriver):
        def __init__(self):    # CudaDriver's own builds a C module against libcuda: not here
            self.utils = Utils()
            self.launcher_cls = Launcher
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        @staticmethod
        def is_active():
            return True

    driver.set_active(FakeDriver())
    # nothing runs, so nothing can be timed: an autotuner "times" every config alike and keeps the first one its
    # pruning leaves
    from triton.runtime import autotuner
    autotuner.Autotuner._bench = lambda self, *args, config=None, **kwargs: [1.0, 1.0, 1.0]
    return launches
