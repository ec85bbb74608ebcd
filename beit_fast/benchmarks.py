"""`beit-fast bench` from Python: run one of the benchmark scripts (bench/bench_<name>.py in the repository,
installed with the package as beit_fast.bench).

    from beit_fast.train import bench
    bench("attention", "--quick", "--out", "bench/out")     # = `beit-fast bench attention --quick --out ...`
"""
from __future__ import annotations

import os
import subprocess
import sys


def find_scripts() -> tuple[str, str] | None:
    """(folder of the benchmark scripts, working directory to run them in), or None: the repository's bench/
    next to the package (a checkout, an editable install: run from the repository's root, where their
    default output paths point), else the copy installed inside the package as beit_fast.bench (run from
    the caller's working directory)."""
    import beit_fast
    pkg = os.path.dirname(os.path.abspath(beit_fast.__file__))
    repo_bench = os.path.join(os.path.dirname(pkg), "bench")
    if os.path.isfile(os.path.join(repo_bench, "common.py")):
        return repo_bench, os.path.dirname(repo_bench)
    installed = os.path.join(pkg, "bench")
    if os.path.isfile(os.path.join(installed, "common.py")):
        return installed, os.getcwd()
    return None


def run(name: str = "", *script_args: str) -> int:
    """Run bench_<name>.py (find_scripts) with script_args in a subprocess; returns its exit status (0 and a list
    of the scripts when name is empty, 2 when there is no such script or no benchmark folder)."""
    found = find_scripts()
    if found is None:
        print("beit-fast bench: no benchmark scripts found: neither a bench/ folder next to the beit_fast "
              "package (a checkout) nor beit_fast/bench inside it (an installed package). Reinstall beit_fast "
              "(`pip install .` or `pip install -e .` from the repository).", file=sys.stderr)
        return 2
    folder, cwd = found
    scripts = sorted(n[len("bench_"):-3] for n in os.listdir(folder)
                     if n.startswith("bench_") and n.endswith(".py"))
    if not name:
        print(f"benchmarks in {folder}: {', '.join(scripts) or '(none yet)'}\n"
              f"run one with: beit-fast bench NAME [script arguments]")
        return 0
    name = name.removeprefix("bench_").removesuffix(".py")
    if name not in scripts:
        print(f"beit-fast bench: no bench/bench_{name}.py; available: {', '.join(scripts) or '(none)'}",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, os.path.join(folder, f"bench_{name}.py"), *script_args]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=cwd)
