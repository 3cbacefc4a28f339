"""Times fastrnn against torch.nn on the CPU, forward and forward+backward.

Prints one row per shape with the speed-up of fastrnn over torch.nn (ratio
of medians measured in the same run) and checks both give the same output.

    python bench/compare.py [--cells rnn gru] [--batch 16 64] [--hidden 64 256 512] [--time 100 500]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch.utils import benchmark

import fastrnn

CELLS = {"rnn": (torch.nn.RNN, fastrnn.RNN), "gru": (torch.nn.GRU, fastrnn.GRU)}


def median_seconds(fn, min_run_time: float) -> float:
    fn()  # warm-up
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_run_time).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--hidden", nargs="+", type=int, default=[64, 256, 512])
    parser.add_argument("--time", nargs="+", type=int, default=[100, 500])
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()

    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32")
    print(f"{'cell':<5}{'B':>5}{'H':>6}{'T':>6} | {'fwd ms':>9}{'torch':>9}{'x':>7} |"
          f" {'f+b ms':>9}{'torch':>9}{'x':>7}")
    speedups = []
    for cell, batch, hidden, steps in itertools.product(args.cells, args.batch, args.hidden,
                                                        args.time):
        torch_cls, fast_cls = CELLS[cell]
        torch.manual_seed(0)
        reference = torch_cls(hidden, hidden)
        fast = fast_cls(hidden, hidden)
        fast.load_state_dict(reference.state_dict())
        x = torch.randn(steps, batch, hidden)
        torch.testing.assert_close(fast(x)[0], reference(x)[0], rtol=1e-4, atol=1e-4)
        row = []
        for module in (fast, reference):
            def forward():
                with torch.no_grad():
                    module(x)

            def forward_backward():
                output, h_n = module(x)
                (output.sum() + h_n.sum()).backward()

            row.append((median_seconds(forward, args.min_run_time),
                        median_seconds(forward_backward, args.min_run_time)))
        (fast_fwd, fast_fb), (torch_fwd, torch_fb) = row
        speedups.append((torch_fwd / fast_fwd, torch_fb / fast_fb))
        print(f"{cell:<5}{batch:>5}{hidden:>6}{steps:>6} | {fast_fwd * 1e3:>9.2f}{torch_fwd * 1e3:>9.2f}"
              f"{torch_fwd / fast_fwd:>7.2f} | {fast_fb * 1e3:>9.2f}{torch_fb * 1e3:>9.2f}"
              f"{torch_fb / fast_fb:>7.2f}")
    fwd, fb = zip(*speedups)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    print(f"speed-up over torch.nn: forward median {median(fwd):.2f}x (min {min(fwd):.2f}x), "
          f"forward+backward median {median(fb):.2f}x (min {min(fb):.2f}x)")


if __name__ == "__main__":
    main()
