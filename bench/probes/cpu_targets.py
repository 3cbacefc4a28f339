"""Which rows of one benchmark run miss the CPU engine's targets.

A whole-sequence row meets its target where fastrnn is at least
``--forward`` (forward) or ``--forward-backward`` (forward+backward) times
faster than torch.nn, or reaches ``--fraction`` of the GEMM rate measured
with it; every row, single steps included, should be at least as fast as
torch.nn. Prints each row that misses, then the count per cell and mode
of the whole-sequence rows that miss either target.

    python bench/probes/cpu_targets.py bench/results/intel-xeon-processor-2-threads.csv
"""

import argparse
import collections
import csv

SHAPE = ("cell", "dtype", "batch", "hidden", "steps", "mode")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="a CSV written by python -m fastrnn.bench")
    parser.add_argument("--forward", type=float, default=1.5)
    parser.add_argument("--forward-backward", type=float, default=3.0)
    parser.add_argument("--fraction", type=float, default=0.75)
    args = parser.parse_args()
    rows = {}
    with open(args.records, newline="") as f:
        for row in csv.DictReader(f):
            rows[tuple(row[k] for k in SHAPE), row["provider"]] = row
    needed = {"forward": args.forward, "forward_backward": args.forward_backward}
    misses, counts = collections.Counter(), collections.Counter()
    print("cell dtype B H T mode | speed-up | GEMM fraction | misses")
    for (shape, provider), row in sorted(rows.items()):
        torch_row = rows.get((shape, "torch"))
        if provider != "fastrnn" or torch_row is None:
            continue
        speedup = float(torch_row["median_s"]) / float(row["median_s"])
        fraction = float(row["gemm_fraction"] or "nan")
        mode = shape[-1]
        missed = []
        if mode in needed and not (speedup >= needed[mode] or fraction >= args.fraction):
            missed.append(f"{needed[mode]:g}x or {args.fraction:.0%}")
        if speedup < 1.0:
            missed.append("slower")
        if mode in needed:
            counts[shape[:2] + (mode,)] += 1
            misses[shape[:2] + (mode,)] += bool(missed)
        if missed:
            print(f"{' '.join(shape)} | {speedup:.2f} | {fraction:.1%} | {', '.join(missed)}")
    for key in sorted(counts):
        print(f"{' '.join(key)}: {misses[key]} of {counts[key]} miss")


if __name__ == "__main__":
    main()
