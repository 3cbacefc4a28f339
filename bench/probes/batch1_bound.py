"""Batch-1 forward per step against one read of the weights it multiplies.

At batch 1 each step multiplies one row by W_hh (and W_hr with a
projection): the step cannot take less than the time to read those weights
from the cache level that holds them. This prints, for the batch-1 forward
rows of a benchmark record, that time and the ratio of the step's time to
it. The engine's split of a step across threads (csrc/cpu/team.cpp) decides
how much each core reads; the bandwidth per core of each buffer size comes
from read_bandwidth.cpp, run with as many threads as the benchmark had.

    python bench/probes/batch1_bound.py bench/results/amd-epyc-2-threads.csv bandwidth.csv
"""

import argparse
import bisect
import csv
import math

GATES = {"rnn": 1, "gru": 3, "lstm": 4, "lstm_proj": 4}
PROJECTION = {"lstm_proj": 0.5}  # proj_size as a fraction of H (fastrnn/bench/measure.py)


def threads_of_step(gate_rows, width, hidden, threads):
    """split_step (csrc/cpu/team.cpp) at B=1: units in blocks of 32 split by threads from 16384 multiply-adds a block."""
    units = math.ceil(hidden / 32)
    grain = max(1, 16384 // max(1, gate_rows * width // units))
    return 1 if units <= grain else min(threads, math.ceil(units / grain))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", help="a benchmark CSV (bench/results/*.csv)")
    parser.add_argument("bandwidth", help="read_bandwidth's CSV: KiB per thread, GB/s per thread")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with open(args.bandwidth) as f:
        sizes, rates = zip(*((float(r["KiB per thread"]), float(r["GB/s per thread"])) for r in csv.DictReader(f)))
    print("| cell | H | T | weights a step (KiB) | threads | KiB a thread | read (us) | step (us) | step / read |")
    print("|---|---|---|---|---|---|---|---|---|")
    with open(args.records) as f:
        for row in csv.DictReader(f):
            if row["provider"] != "fastrnn" or row["mode"] != "forward" or row["batch"] != "1":
                continue
            cell, hidden, steps = row["cell"], int(row["hidden"]), int(row["steps"])
            proj = int(hidden * PROJECTION.get(cell, 0))
            width = proj or hidden
            weight_bytes = 4 * (GATES[cell] * hidden * width + proj * hidden)
            threads = threads_of_step(GATES[cell] * hidden, width, hidden, args.threads)
            per_thread = weight_bytes / threads
            # The rate measured at the smallest buffer size that holds a thread's share.
            rate = rates[min(bisect.bisect_left(sizes, per_thread / 1024), len(rates) - 1)] * 1e9
            read_us = per_thread / rate * 1e6
            step_us = float(row["median_s"]) / steps * 1e6
            print(f"| {cell} | {hidden} | {steps} | {weight_bytes / 1024:.0f} | {threads} | "
                  f"{per_thread / 1024:.0f} | {read_us:.2f} | {step_us:.2f} | {step_us / read_us:.1f} |")


if __name__ == "__main__":
    main()
