"""Build beit_fast and its extension beit_fast._C.

Environment:
  BEIT_FAST_CUDA=auto|0|1   build the CUDA sources: auto = when a CUDA toolkit and a CUDA build of torch
                            are both present (no GPU needed); 1 = required (fail otherwise); 0 = never.
  TORCH_CUDA_ARCH_LIST      default "8.0;9.0+PTX" (A100, H100/H200; PTX for newer GPUs).
  MAX_JOBS                  parallel compile jobs (honoured by torch's ninja build).
  CUDA_HOME                 toolkit root; found by looking for the real nvcc when unset.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_version(home):
    """'13.0' from `nvcc --version` of the toolkit at home, or None."""
    import subprocess
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except Exception:
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _is_toolkit(folder):
    """A real toolkit has the runtime library (or its header) beside bin/nvcc; a wrapper script's folder does
    not. (lib*/ in NVIDIA's layout, targets/*/lib/ in its cross layout, lib/<triplet>/ and include/ in a
    Linux distribution's /usr.)"""
    if not os.path.isfile(os.path.join(folder, "bin", "nvcc")):
        return False
    return any(glob.glob(os.path.join(folder, *pattern)) for pattern in (
        ("lib*", "libcudart*"), ("targets", "*", "lib", "libcudart*"), ("lib*", "*-linux-gnu", "libcudart*"),
        ("include", "cuda_runtime.h")))


def _real_cuda_homes():
    """Toolkit folders whose bin/nvcc is the compiler itself (not a wrapper script on PATH); only the one
    CUDA_HOME (else CUDA_PATH) names when set."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return [env] if _is_toolkit(env) else []
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    found = []
    for c in candidates:
        if _is_toolkit(c):
            if os.path.realpath(c) not in {os.path.realpath(f) for f in found}:
                found.append(c)
    return found


def _cuda_decision(torch_cuda_version):
    mode = os.environ.get("BEIT_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"beit_fast setup: BEIT_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "BEIT_FAST_CUDA=0"
    why, home = None, None
    if torch_cuda_version is None:
        why = "the installed torch is a CPU-only build (torch.version.cuda is None)"
    else:
        homes = [(h, _toolkit_version(h)) for h in _real_cuda_homes()]
        want = torch_cuda_version.split(".")[0]
        # torch refuses a toolkit of another major version than its own build: take a matching one
        matching = [(h, v) for h, v in homes if v is not None and v.split(".")[0] == want]
        if matching:
            home = matching[0][0]
        elif homes:
            h, v = homes[0]
            why = (f"the CUDA toolkit at {h} is {v or 'of unknown version'} but torch was built with CUDA "
                   f"{torch_cuda_version} (the major versions must match; set CUDA_HOME to a {want}.x toolkit)")
        elif os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
            name = "CUDA_HOME" if os.environ.get("CUDA_HOME") else "CUDA_PATH"
            why = (f"{name}={os.environ[name]} is not a CUDA toolkit (it needs bin/nvcc and lib*/libcudart*; the "
                   f"folder of a wrapper script named nvcc is not one)")
        else:
            why = "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    if why:
        if mode == "1":
            sys.exit(f"beit_fast setup: BEIT_FAST_CUDA=1 but {why}")
        return False, why
    os.environ["CUDA_HOME"] = home
    return True, home


def _arch_token(arch_list: str) -> str:
    """beit_fast/_archs.py's arch_token (loaded by path: neither torch nor the package is importable yet)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_beit_fast_archs", os.path.join(ROOT, "beit_fast", "_archs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.arch_token(arch_list)


def _extensions():
    import torch  # imported here so that `setup.py --help` works without torch

    use_cuda, detail = _cuda_decision(torch.version.cuda)
    # cpp_extension reads CUDA_HOME when imported, so import it only after the decision.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # +PTX: newer GPUs JIT-compile it. Entries as torch reads them (an empty list would mean "the GPUs visible
    # now", none on a build machine; empty entries from stray separators are errors inside torch's build)
    archs = [a for a in re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "")) if a]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs) or "8.0;9.0+PTX"
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # The C++ standard is the one torch asks for (C++17 up to 2.9, C++20 after). -ffp-contract=off: g++ would
    # contract a*b+c into an FMA wherever the target has one (aarch64 hosts such as Grace, x86-64 with -mfma),
    # and the CUDA side is built with -fmad=false, so the shared __host__ __device__ formulas round alike.
    cxx_flags = ["-O3", "-ffp-contract=off"]
    if use_cuda:
        print(f"beit_fast setup: building CUDA sources with {detail} for TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
        ext = CUDAExtension(
            "beit_fast._C", cpp + cu,
            define_macros=[("BEIT_FAST_WITH_CUDA", "1"),
                           ("BEIT_FAST_CUDA_ARCHS", _arch_token(os.environ["TORCH_CUDA_ARCH_LIST"]))],
            # -fmad=false: no contraction of a*b+c into one FMA, as the CPU twins are compiled
            # (-ffp-contract=off), so the shared __host__ __device__ formulas round the same way on both
            # (memory-bound kernels: the extra instructions should cost little; not yet measured on a GPU)
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-fmad=false",
                                                           "-U__CUDA_NO_HALF_OPERATORS__",
                                                           "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]},
        )
    else:
        print(f"beit_fast setup: skipping CUDA sources because {detail}; building the C++ CPU ops only",
              flush=True)
        # the reason travels with the binary: `python -m beit_fast.info` repeats it (pip shows this line
        # only with -v); hex digits pass any compiler command line, and the first is always a digit
        ext = CppExtension("beit_fast._C", cpp, extra_compile_args={"cxx": cxx_flags},
                           define_macros=[("BEIT_FAST_CUDA_SKIPPED", detail.encode("utf-8", "backslashreplace").hex())])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="beit_fast",
    version="0.1.0",
    description="Fused kernels, model and trainer for BEiT masked-image-modeling pretraining and fine-tuning",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["beit_fast", "beit_fast.models", "beit_fast.ops", "beit_fast.train", "beit_fast.kernels",
              "beit_fast.bench"],
    # kernels/ and bench/ live at the top of the repository and install inside the package
    package_dir={"beit_fast.kernels": "kernels", "beit_fast.bench": "bench"},
    package_data={"beit_fast.bench": ["gpu_check.sh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "triton>=3.2; platform_system=='Linux'", "timm", "numpy", "safetensors",
                      "pyyaml", "pillow", "tqdm", "scikit-learn", "scipy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers", "tensorboard"]},
    entry_points={"console_scripts": ["beit-fast=beit_fast.cli:entry"]},
    zip_safe=False,
)
