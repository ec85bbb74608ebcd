"""Turn benchmark JSON rows into markdown tables (and PNG bar charts when matplotlib is installed).

    python bench/report.py bench/results/<run> [more dirs or .jsonl files] [--baseline sdpa,flex,compile]
                           [--png DIR] [--out FILE]

For every (op, mode, shape, dtype, GPU, run) group it lists each provider's median time (and GPU time, where the
rows have it), TFLOP/s or GB/s, the percentage of a same-bytes copy's bandwidth (memory-bound ops), peak
memory, and its speed-up over each baseline provider of the group (measured in the same run, on the same GPU;
by GPU time too where there is one). --baseline names them (a comma
list); by default the first of sdpa, eager, reference, timm, ours_reference, torch_compile found. Each folder
is one run (a .jsonl file given: its folder): merging runs gives each its own tables (named by the folder),
never ratios across runs.
bench/overhead.py's GPU time (gpu_us) shows as GPU ms.
"""
import argparse
import glob
import json
import os
from collections import OrderedDict


def load_rows(paths):
    """The rows of every .jsonl file of the given folders / files, each tagged with its run (`_run`: the
    folder given, or the folder of the file given)."""
    rows = []
    for p in paths:
        files = sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
        for f in files:
            with open(f) as fh:
                for line in fh:
                    if line.strip():
                        r = json.loads(line)
                        if r.get("gpu_ms") is None and r.get("gpu_us") is not None:   # bench/overhead.py
                            r["gpu_ms"] = r["gpu_us"] / 1e3
                        r["_run"] = os.path.normpath(p if os.path.isdir(p) else os.path.dirname(p) or ".")
                        rows.append(r)
    return rows


def _fmt(v, digits=4):
    return "" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


DEFAULT_BASELINES = ("sdpa", "eager", "reference", "timm", "ours_reference", "torch_compile")


def grouped(rows):
    """Rows by (op, mode, shape, dtype, GPU, run): speed-ups never compare two machines or two runs."""
    groups = OrderedDict()
    for r in rows:
        key = (r["op"], r["mode"], json.dumps(r["shape"], sort_keys=True), r["dtype"],
               r.get("gpu") or f"CPU {r.get('cpu')}", r.get("_run"))
        groups.setdefault(key, []).append(r)
    return groups


def markdown(rows, baselines=None):
    """baselines=None: one speed-up column, against the first of DEFAULT_BASELINES in the group; else a
    column per named baseline present in the group."""
    out = []
    several_runs = len({r.get("_run") for r in rows}) > 1
    for (op, mode, shape, dtype, hw, run), rs in grouped(rows).items():
        if baselines is None:
            bases = [next((r for b in DEFAULT_BASELINES for r in rs if r["provider"] == b), None)][:1]
            bases = [b for b in bases if b is not None]
        else:
            bases = [r for b in baselines for r in rs if r["provider"] == b]
        pct = any(r.get("pct_copy_bw") is not None for r in rs)
        gpu = any(r.get("gpu_ms") is not None for r in rs)   # the GPU's own time (bench_attention on CUDA)
        out.append(f"### {op} {mode} {' '.join(f'{k}={v}' for k, v in json.loads(shape).items())} {dtype} ({hw})"
                   + (f" [{run}]" if several_runs else ""))
        gpct = any(r.get("gpu_pct_copy_bw") is not None for r in rs)
        cols = (["provider", "median ms", "p20", "p80"] + (["GPU ms"] if gpu else []) + ["TFLOP/s", "GB/s"]
                + (["% of copy"] if pct else []) + (["% of copy (GPU time)"] if gpct else []) + ["peak MB"]
                + [f"speed-up vs {b['provider']}" for b in bases]
                + ([f"GPU-time speed-up vs {b['provider']}" for b in bases] if gpu else []))
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in sorted(rs, key=lambda r: r["median_ms"]):
            cells = [r["provider"], _fmt(r["median_ms"]), _fmt(r.get("p20_ms")), _fmt(r.get("p80_ms"))]
            cells += [_fmt(r.get("gpu_ms"))] if gpu else []
            cells += [_fmt(r.get("tflops")), _fmt(r.get("gbps"))] + ([_fmt(r.get("pct_copy_bw"), 3)] if pct else [])
            cells += [_fmt(r.get("gpu_pct_copy_bw"), 3)] if gpct else []
            cells.append(_fmt(r.get("peak_mb")))
            cells += [f"{_fmt(b['median_ms'] / r['median_ms'], 3)}x" for b in bases]
            if gpu:
                cells += [f"{_fmt(b['gpu_ms'] / r['gpu_ms'], 3)}x" if b.get("gpu_ms") and r.get("gpu_ms") else ""
                          for b in bases]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    hw = {(r.get("gpu") or f"CPU {r.get('cpu')}", r.get("torch"), r.get("triton"), r.get("git_sha"),
           r.get("_run") if several_runs else None) for r in rows}
    for gpu, tv, trv, sha, run in sorted(hw, key=lambda t: tuple("" if v is None else str(v) for v in t)):
        out.append(f"Measured on {gpu}, torch {tv}, Triton {trv}, git {sha}" + (f" [{run}]." if run else "."))
    return "\n".join(out) + "\n"


def plots(rows, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG plots")
        return
    os.makedirs(out_dir, exist_ok=True)
    for i, ((op, mode, shape, dtype, _hw, _run), rs) in enumerate(grouped(rows).items()):
        fig, ax = plt.subplots(figsize=(6, 2 + 0.3 * len(rs)))
        ax.barh([r["provider"] for r in rs], [r["median_ms"] for r in rs])
        ax.set_xlabel("median ms (lower is better)")
        ax.set_title(f"{op} {mode} {dtype}\n{shape}", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{i:03d}_{op}_{mode}.png"), dpi=100)
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+")
    p.add_argument("--png", default=None, help="folder for PNG bar charts")
    p.add_argument("--out", default=None, help="write the markdown here instead of stdout")
    p.add_argument("--baseline", default=None,
                   help="comma list of providers to give a speed-up column each (default: the first of "
                        f"{', '.join(DEFAULT_BASELINES)} in each group)")
    args = p.parse_args(argv)
    rows = load_rows(args.paths)
    if not rows:
        raise SystemExit(f"no benchmark rows found in {args.paths}")
    baselines = [b.strip() for b in args.baseline.split(",") if b.strip()] if args.baseline else None
    md = markdown(rows, baselines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    else:
        print(md)
    if args.png:
        plots(rows, args.png)


if __name__ == "__main__":
    main()
