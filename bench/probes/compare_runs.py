"""fastrnn's time per shape in two sets of benchmark records (two builds).

Each set is one or more CSV files written by ``python -m fastrnn.bench``,
runs of one build alternated with the other's in one session. Per shape the
lowest median over a set's runs is taken (the machine's noise only adds
time), and the rows are printed slowest change first: the second build's
speed relative to the first's, and each build's speed-up over torch.nn.

    python bench/probes/compare_runs.py --before 'old/*/*.csv' --after 'new/*/*.csv'
"""

import argparse
import collections
import csv
import glob

SHAPE = ("cell", "dtype", "batch", "hidden", "steps", "mode")


def lowest_medians(pattern):
    """{shape: {provider: lowest median_s}} over the CSV files ``pattern`` matches."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no records match {pattern!r}")
    best = collections.defaultdict(dict)
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                shape, provider = tuple(row[k] for k in SHAPE), row["provider"]
                seconds = float(row["median_s"])
                best[shape][provider] = min(seconds, best[shape].get(provider, seconds))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="glob of the first build's CSV records")
    parser.add_argument("--after", required=True, help="glob of the second build's CSV records")
    args = parser.parse_args()
    before, after = lowest_medians(args.before), lowest_medians(args.after)
    rows = []
    for shape in before.keys() & after.keys():
        b, a = before[shape], after[shape]
        if "fastrnn" in b and "fastrnn" in a:
            over_torch = [t["torch"] / t["fastrnn"] if "torch" in t else float("nan") for t in (b, a)]
            rows.append((b["fastrnn"] / a["fastrnn"], shape, b["fastrnn"], a["fastrnn"], *over_torch))
    print("after/before speed | " + " ".join(SHAPE) + " | before ms | after ms"
          " | x torch.nn before | x torch.nn after")
    for change, shape, b, a, over_b, over_a in sorted(rows):
        print(f"{change:5.2f} | {' '.join(shape)} | {b * 1e3:.3f} | {a * 1e3:.3f}"
              f" | {over_b:.2f} | {over_a:.2f}")
    print(f"{len(rows)} shapes; slowest change {min(rows)[0]:.2f}x" if rows else "no shapes in common")


if __name__ == "__main__":
    main()
