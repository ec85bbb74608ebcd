"""Parsers of the kernels' BEIT_FAST_* settings, importable without Triton (`python -m beit_fast.info` checks
the values with them)."""
from __future__ import annotations

KERNELS = ("fwd", "dkdv", "dq")   # the fused attention's kernels (rel_pos_attention.AttnConfigs' fields)


def dense_bias_setting(value: str):
    """BEIT_FAST_ATTN_DENSE_BIAS's value -> the kernels that read the bias from the dense expansion (frozenset
    of KERNELS names), whatever the tile configs say; None (unset or empty): the configs decide.
    "1": every kernel; "0": none (all gather); "fwd,dq" (comma-separated names): those, the others gather."""
    v = value.strip()
    if v == "":
        return None
    if v in ("0", "1"):
        return frozenset(KERNELS) if v == "1" else frozenset()
    names = frozenset(n.strip() for n in v.split(","))
    if not names <= set(KERNELS):
        raise ValueError(f"BEIT_FAST_ATTN_DENSE_BIAS must be 0, 1 or a comma-separated subset of {KERNELS} "
                         f"(or unset), got {v!r}")
    return names


def launch_setting(value: str) -> str:
    """BEIT_FAST_TRITON_LAUNCH's value -> "cached" (the default) or "jit"."""
    v = value.strip() or "cached"
    if v not in ("cached", "jit"):
        raise ValueError(f"BEIT_FAST_TRITON_LAUNCH must be 'cached' or 'jit' (or unset), got {v!r}")
    return v
