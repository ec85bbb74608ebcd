"""`beit-fast bench` from Python: run one of the repository's benchmark scripts (bench/bench_<name>.py).

    from beit_fast.train import bench
    bench("attention", "--quick", "--out", "bench/out")     # = `beit-fast bench attention --quick --out ...`
"""
from __future__ import annotations

import os
import subprocess
import sys


def run(name: str = "", *script_args: str) -> int:
    """Run bench/bench_<name>.py with script_args in a subprocess; returns its exit status (0 and a list of
    the scripts when name is empty, 2 when there is no such script or no bench/ folder)."""
    import beit_fast
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(beit_fast.__file__))), "bench")
    if not os.path.isdir(bench_dir):
        print("beit-fast bench: the benchmark scripts live in the repository's bench/ folder, which an installed "
              "(non-editable) package does not contain. Clone the repository and install it with "
              "`pip install -e .`, or run `python bench/<script>.py` from the checkout.", file=sys.stderr)
        return 2
    scripts = sorted(n[len("bench_"):-3] for n in os.listdir(bench_dir) if n.startswith("bench_") and n.endswith(".py"))
    if not name:
        print(f"benchmarks in {bench_dir}: {', '.join(scripts) or '(none yet)'}\n"
              f"run one with: beit-fast bench NAME [script arguments]")
        return 0
    name = name.removeprefix("bench_").removesuffix(".py")
    if name not in scripts:
        print(f"beit-fast bench: no bench/bench_{name}.py; available: {', '.join(scripts) or '(none)'}",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, os.path.join(bench_dir, f"bench_{name}.py"), *script_args]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=os.path.dirname(bench_dir))
