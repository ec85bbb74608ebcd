"""GPU architectures of the extension's CUDA build, written down by setup.py and read back by the backend
choice (which must not pick the "cuda" backend on a GPU the build has no code for). No imports beyond the
standard library: setup.py loads this file by path, before torch or the package are importable.

setup.py turns TORCH_CUDA_ARCH_LIST into one C identifier (`arch_token`) that the extension reports through
`beit_fast._C.cuda_archs()`: "8.0;9.0+PTX" -> "sm8v0_sm9v0_ptx9v0", "9.0a" -> "sm9v0a"."""
from __future__ import annotations

import re
from typing import Optional


def arch_token(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST -> setup.py's code; "unknown" when an entry is not X.Y[a][+PTX] (torch's named
    architectures such as "Ampere")."""
    parts = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if m is None:
            return "unknown"
        parts.append(f"sm{m.group(1)}v{m.group(2)}{m.group(3)}")
        if m.group(4):   # torch emits compute_90a for 9.0a+PTX: PTX for that one architecture only
            parts.append(f"ptx{m.group(1)}v{m.group(2)}{m.group(3)}")
    return "_".join(parts) or "unknown"


def parse_archs(token: str) -> Optional[tuple]:
    """setup.py's code -> (machine code, PTX): sets of (major, minor, arch-specific); None when unknown (an
    older build, named architectures)."""
    sass, ptx = set(), set()
    for part in (token or "").split("_"):
        m = re.fullmatch(r"(sm|ptx)(\d+)v(\d+)([a-z]?)", part)
        if m is None:
            return None
        (sass if m.group(1) == "sm" else ptx).add((int(m.group(2)), int(m.group(3)), bool(m.group(4))))
    return (sass, ptx) if sass or ptx else None


def arch_list(token: str) -> str:
    """setup.py's code back in TORCH_CUDA_ARCH_LIST's syntax ("sm8v0_sm9v0_ptx9v0" -> "8.0;9.0+PTX"); the
    code itself when it does not parse."""
    parts = []
    for part in (token or "").split("_"):
        m = re.fullmatch(r"(sm|ptx)(\d+)v(\d+)([a-z]?)", part)
        if m is None:
            return token
        arch = f"{m.group(2)}.{m.group(3)}{m.group(4)}"
        if m.group(1) == "sm":
            parts.append(arch)
        elif parts and parts[-1] == arch:
            parts[-1] += "+PTX"
        else:
            parts.append(arch + "+PTX")
    return ";".join(parts) or token


def archs_run_on(archs: tuple, capability: tuple) -> bool:
    """Whether code built for `archs` (parse_archs) runs on a GPU of compute capability (major, minor):
    machine code of the same major and an equal or lower minor (exactly equal for an arch-specific "a"
    build), or PTX of an equal or lower capability (exactly equal for "a" PTX), which the driver compiles."""
    sass, ptx = archs
    major, minor = capability
    return (any(M == major and (m == minor if a else m <= minor) for M, m, a in sass)
            or any(((M, m) == (major, minor)) if a else ((M, m) <= (major, minor)) for M, m, a in ptx))
