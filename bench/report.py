"""Turn benchmark JSON rows into markdown tables (and PNG bar charts when matplotlib is installed).

    python bench/report.py bench/results/<run> [more dirs or .jsonl files] [--baseline sdpa] [--png DIR]

For every (op, mode, shape, dtype) group it lists each provider's median time, TFLOP/s or GB/s, peak
memory, and its speed-up over the baseline provider measured in the same run.
"""
import argparse
import glob
import json
import os
from collections import OrderedDict


def load_rows(paths):
    rows = []
    for p in paths:
        files = sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
        for f in files:
            with open(f) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def _fmt(v, digits=4):
    return "" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def grouped(rows):
    groups = OrderedDict()
    for r in rows:
        key = (r["op"], r["mode"], json.dumps(r["shape"], sort_keys=True), r["dtype"])
        groups.setdefault(key, []).append(r)
    return groups


def markdown(rows, baselines=("sdpa", "eager", "reference", "timm", "ours_reference", "torch_compile")):
    out = []
    for (op, mode, shape, dtype), rs in grouped(rows).items():
        base = next((r for b in baselines for r in rs if r["provider"] == b), None)
        out.append(f"### {op} {mode} {' '.join(f'{k}={v}' for k, v in json.loads(shape).items())} {dtype}")
        out.append("| provider | median ms | p20 | p80 | TFLOP/s | GB/s | peak MB | speed-up vs " +
                   (base["provider"] if base else "-") + " |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(rs, key=lambda r: r["median_ms"]):
            sp = base["median_ms"] / r["median_ms"] if base else None
            out.append(f"| {r['provider']} | {_fmt(r['median_ms'])} | {_fmt(r.get('p20_ms'))} | {_fmt(r.get('p80_ms'))} | "
                       f"{_fmt(r.get('tflops'))} | {_fmt(r.get('gbps'))} | {_fmt(r.get('peak_mb'))} | "
                       f"{_fmt(sp, 3)}{'x' if sp else ''} |")
        out.append("")
    hw = sorted({(r.get("gpu") or f"CPU {r.get('cpu')}", r.get("torch"), r.get("triton"), r.get("git_sha")) for r in rows})
    for gpu, tv, trv, sha in hw:
        out.append(f"Measured on {gpu}, torch {tv}, Triton {trv}, git {sha}.")
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
    for i, ((op, mode, shape, dtype), rs) in enumerate(grouped(rows).items()):
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
    args = p.parse_args(argv)
    rows = load_rows(args.paths)
    if not rows:
        raise SystemExit(f"no benchmark rows found in {args.paths}")
    md = markdown(rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    else:
        print(md)
    if args.png:
        plots(rows, args.png)


if __name__ == "__main__":
    main()
