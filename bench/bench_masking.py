"""Block-wise mask generation: the C++ op against the pure-Python reference (CPU; masks are made in
DataLoader workers). Rows: time per batch of masks, and the speed-up of C++ over Python.

    python bench/bench_masking.py --out bench/out [--batch 256]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import CheckFailed, base_parser, environment, make_row, time_ms, write_rows  # noqa: E402

import torch  # noqa: E402

from beit_fast.masking import block_masks, not_supported_reasons  # noqa: E402


def check_masks(m, batch, window, target, ref_mean=None) -> float:
    """The masks are what BEiT's generator makes (the backends draw from different generators, so they agree
    in distribution, not bit for bit): (batch, H*W) bool, at most `target` masked per row, and a mean count
    within 2 of the reference's. Returns the mean count."""
    if m.shape != (batch, window[0] * window[1]) or m.dtype != torch.bool:
        raise CheckFailed(f"masks {tuple(m.shape)} {m.dtype}, expected ({batch}, {window[0] * window[1]}) bool")
    per_row = m.sum(1)
    mean = per_row.float().mean().item()
    if int(per_row.max()) > target or (ref_mean is not None and abs(mean - ref_mean) > 2):
        raise CheckFailed(f"masked counts per row: mean {mean:.1f} (reference {ref_mean}), max "
                          f"{int(per_row.max())} (target {target})")
    return mean


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    env = environment("cpu")
    rows = []
    threads = torch.get_num_threads()
    for window, target in [((14, 14), 75), ((24, 24), 230)]:
        shape = {"B": args.batch, "grid": f"{window[0]}x{window[1]}", "masked": target, "threads": threads}
        timings, counts = {}, {}
        for backend in ("reference", "cpp"):
            why = not_supported_reasons(backend)
            if why:
                print(f"skip {backend}: {'; '.join(why)}")
                continue
            counts[backend] = check_masks(block_masks(args.batch, window, target, seed=12345, backend=backend),
                                          args.batch, window, target, counts.get("reference"))
            seed = iter(range(10**6))
            fn = lambda: block_masks(args.batch, window, target, seed=next(seed), backend=backend)  # noqa: E731
            t = time_ms(fn, "cpu", warmup=2, rep=5 if args.smoke else 20)
            timings[backend] = t["median_ms"]
            rows.append(make_row("block_mask", backend, "fwd", shape, torch.bool, t, env))
        if len(timings) == 2:
            ratio = timings["reference"] / timings["cpp"]
            rows[-1]["speedup_vs_reference"] = ratio
            print(f"{shape['grid']}: C++ {timings['cpp']:.2f} ms, Python {timings['reference']:.2f} ms "
                  f"per {args.batch} masks -> {ratio:.1f}x")
    j, m = write_rows(rows, args.out, "bench_masking")
    print(open(m).read())


if __name__ == "__main__":
    main()
