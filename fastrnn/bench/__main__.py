"""python -m fastrnn.bench: how much faster is fastrnn than torch.nn here?

Times fastrnn, torch.nn (cuDNN on CUDA, PyTorch's own kernels on CPU) and,
on tiny shapes, the plain reference loop, forward and forward+backward over
whole sequences, and one step per call (cells and length-1 layers, without
grad and with a backward per call), over a grid of shapes on the device
present (CUDA if available). Prints a table
of speed-ups per shape and a summary line, measures the machine's float32
GEMM rate to report the FLOP/s fastrnn reaches as a fraction of it, and
writes the records as JSON and CSV and a PNG plot under --out.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import fastrnn
from fastrnn.bench import measure, report

# (batch, hidden, steps) grids per device; dtypes per device.
GRIDS = {
    "cpu": {
        "quick": dict(batch=[16], hidden=[64], steps=[50]),
        "default": dict(batch=[1, 16, 64], hidden=[64, 256, 512], steps=[100, 500]),
        "full": dict(batch=[1, 16, 64, 256], hidden=[64, 128, 256, 512, 1024], steps=[100, 500, 1000]),
    },
    "cuda": {
        "quick": dict(batch=[8], hidden=[128], steps=[256]),
        "default": dict(batch=[1, 8, 32, 128, 512], hidden=[64, 128, 256, 512, 1024], steps=[256, 1024]),
        "full": dict(batch=[1, 8, 32, 128, 512, 1024], hidden=[64, 128, 256, 512, 1024, 2048],
                     steps=[64, 256, 1024, 4096]),
    },
}
# (batch, hidden) grids of the step modes on every device, which make
# STEP_CALLS calls per timed run.
STEP_GRIDS = {"quick": dict(batch=[1], hidden=[64]), "default": dict(batch=[1, 32], hidden=[64, 256]),
              "full": dict(batch=[1, 32, 128], hidden=[64, 256, 1024])}
STEP_CALLS = 100
GEMM = "gemm"  # the yardstick GEMM among a case's timed calls (not a provider)
DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a one-shape smoke grid")
    size.add_argument("--full", action="store_true", help="the large grid")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    parser.add_argument("--cells", nargs="+", choices=list(measure.CELLS), default=list(measure.CELLS))
    parser.add_argument("--dtypes", nargs="+", choices=list(measure.DTYPES))
    parser.add_argument("--modes", nargs="+", choices=list(measure.MODES), default=list(measure.MODES))
    parser.add_argument("--providers", nargs="+", choices=list(measure.PROVIDERS),
                        default=list(measure.PROVIDERS))
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (overrides the grid)")
    parser.add_argument("--hidden", nargs="+", type=int, help="hidden sizes (overrides the grid)")
    parser.add_argument("--steps", nargs="+", type=int, help="sequence lengths (overrides the grid)")
    parser.add_argument("--calls", type=int, default=STEP_CALLS,
                        help=f"single-step calls per timed run in the step modes (default {STEP_CALLS})")
    parser.add_argument("--backend", choices=fastrnn.BACKENDS, default="auto",
                        help="the engine fastrnn's layers run on (default: auto)")
    parser.add_argument("--min-run-time", type=float, default=0.3,
                        help="seconds of timed calls per case and provider")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON, CSV and PNG")
    return parser.parse_args(argv)


def cases(args: argparse.Namespace, device: torch.device) -> list[measure.Case]:
    size = "quick" if args.quick else "full" if args.full else "default"
    dtypes = args.dtypes or DEFAULT_DTYPES[device.type]
    result = []
    for cell, dtype, mode in itertools.product(args.cells, dtypes, args.modes):
        if not measure.runs_mode(cell, mode):
            continue
        step = mode in measure.STEP_MODES
        grid = STEP_GRIDS[size] if step else GRIDS[device.type][size]
        batches, hiddens = args.batch or grid["batch"], args.hidden or grid["hidden"]
        lengths = [args.calls] if step else args.steps or grid["steps"]
        result += [measure.Case(cell, dtype, batch, hidden, steps, mode)
                   for batch, hidden, steps in itertools.product(batches, hiddens, lengths)]
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    machine = {"device": measure.device_name(device), **measure.versions()}
    rate = measure.gemm_rate(device)
    gemm, gemm_flops = measure.gemm_call(device)
    versions = ", ".join(f"{k} {v}" for k, v in machine.items() if k != "device")
    print(f"{machine['device']}: float32 GEMM {rate / 1e9:.1f} GFLOP/s; {versions}")
    meta = {**machine, "gemm_flops": rate, "backend": args.backend, "command": sys.argv}
    records, paths = [], {}
    for case in _progress(cases(args, device)):
        # The providers of a case run by turns, so that their ratio is measured
        # under the same conditions on a machine whose speed drifts; so does
        # the GEMM whose rate their FLOP/s are a fraction of.
        calls = {provider: measure.make_call(provider, case, device, args.backend)
                 for provider in args.providers if measure.runs_provider(provider, case)}
        if not calls:
            continue
        timings = measure.time_calls({**calls, GEMM: gemm}, device, args.min_run_time)
        case_rate = gemm_flops / timings.pop(GEMM)["median_s"]
        records += [measure.record(case, provider, timing, machine, case_rate)
                    for provider, timing in timings.items()]
        # Written after every case, so a run stopped early keeps what it measured.
        paths = report.write_records(records, meta, args.out)
    print(report.table(records))
    print(report.summary(records))
    if report.can_plot():
        paths["png"] = report.write_plot(records, meta, args.out)
    print("wrote " + ", ".join(paths.values()))
    return 0


def _progress(cases: list) -> list:
    """``cases`` behind a tqdm progress bar, or as they are without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(f"fastrnn.bench: {report.EXTRA_HINT}", file=sys.stderr)
        return cases
    return tqdm(cases, desc="benchmark", unit="case", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
