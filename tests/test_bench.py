"""The benchmark command on a tiny grid: its table, summary and files, and
the pytest-benchmark suite over the same cases."""

import collections
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

for _tool in ("matplotlib", "tqdm", "pytest_benchmark"):  # the `bench` extra
    pytest.importorskip(_tool)

from fastrnn.bench import measure  # noqa: E402
from fastrnn.bench.__main__ import main  # noqa: E402
from fastrnn.bench.report import file_stem  # noqa: E402

BATCHES, HIDDEN, STEPS, CALLS = [1, 3], [4, 6], [2], 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--out", str(out), "--min-run-time", "0.01", "--batch", *map(str, BATCHES),
            "--hidden", *map(str, HIDDEN), "--steps", *map(str, STEPS), "--calls", str(CALLS)]
    return out, argv


def test_command_writes_table_records_and_plot(run, capsys):
    out, argv = run
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "GFLOP/s" in printed
    assert "speed-up over torch.nn: forward median" in printed and "forward+backward median" in printed
    assert "step median" in printed and "step+backward median" in printed and "step us" in printed
    files = sorted(os.listdir(out))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1 and {os.path.splitext(f)[1] for f in files} == {".json", ".csv", ".png"}
    stem = os.path.join(out, stems.pop())

    with open(stem + ".json") as f:
        data = json.load(f)
    records = data["records"]
    assert data["meta"]["gemm_flops"] > 0 and data["meta"]["torch"]
    sequences = {(cell, batch, hidden, steps, mode, provider)
                 for cell in ("rnn", "gru", "lstm", "lstm_proj") for batch in BATCHES
                 for hidden in HIDDEN for steps in STEPS for mode in ("forward", "forward_backward")
                 for provider in ("fastrnn", "torch", "reference")}
    single_steps = {(cell, batch, hidden, CALLS, mode, provider)
                    for cell in measure.CELLS for batch in BATCHES for hidden in HIDDEN
                    for mode in ("step", "step_backward") for provider in ("fastrnn", "torch")}
    expected = sequences | single_steps
    got = {(r["cell"], r["batch"], r["hidden"], r["steps"], r["mode"], r["provider"]) for r in records}
    assert got == expected
    for r in records:
        assert r["dtype"] == "float32" and r["device"] and r["torch"] and r["fastrnn"]
        for key in ("median_s", "p20_s", "p80_s", "per_call_s", "flops", "achieved_flops",
                    "gemm_flops", "gemm_fraction"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["gemm_fraction"] == pytest.approx(r["achieved_flops"] / r["gemm_flops"])
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
        # Each step-mode run makes CALLS calls: a call is faster than the run.
        assert (r["per_call_s"] < r["median_s"]) == r["mode"].startswith("step")
    # The GEMM is timed in each case's rounds: one rate per case, shared by its providers.
    rates = {}
    for r in records:
        case = (r["cell"], r["batch"], r["hidden"], r["steps"], r["mode"])
        rates.setdefault(case, set()).add(r["gemm_flops"])
    assert all(len(v) == 1 for v in rates.values())

    with open(stem + ".csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert {(r["cell"], int(r["batch"]), int(r["hidden"]), int(r["steps"]), r["mode"], r["provider"])
            for r in rows} == expected

    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pytest_benchmark_suite_runs():
    env = dict(os.environ, FASTRNN_BENCH_GRID="quick")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(ROOT, "bench"), "-q", "-p", "no:cacheprovider",
         "-k", "not backward"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # The quick grid holds one shape per cell and mode; -k keeps forward and
    # step (3 providers for each sequence layer, 2 per single-step case).
    layers = [cell for cell in measure.CELLS if not measure.is_cell(cell)]
    assert f"{3 * len(layers) + 2 * len(measure.CELLS)} passed" in result.stdout


def test_compare_runs_probe(tmp_path):
    # Two builds' records: the second build twice as slow on one shape, the
    # first build run twice (its lowest median counts).
    fields = ["cell", "dtype", "batch", "hidden", "steps", "mode", "provider", "median_s"]
    def write(name, rows):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "records.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(fields)
            writer.writerows(rows)
    shape = ["gru", "float32", "16", "64", "100"]
    write("before1", [shape + ["forward", "fastrnn", "0.004"], shape + ["forward", "torch", "0.008"],
                      shape + ["forward_backward", "fastrnn", "0.010"]])
    write("before2", [shape + ["forward", "fastrnn", "0.002"], shape + ["forward", "torch", "0.006"],
                      shape + ["forward_backward", "fastrnn", "0.012"]])
    write("after1", [shape + ["forward", "fastrnn", "0.004"], shape + ["forward", "torch", "0.006"],
                     shape + ["forward_backward", "fastrnn", "0.005"]])
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "probes", "compare_runs.py"),
         "--before", str(tmp_path / "before*" / "*.csv"), "--after", str(tmp_path / "after*" / "*.csv")],
        capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    # Slowest change first: forward at half the speed (2 -> 4 ms), then forward+backward at 2x.
    assert lines[1] == " 0.50 | gru float32 16 64 100 forward | 2.000 | 4.000 | 3.00 | 1.50"
    assert lines[2] == " 2.00 | gru float32 16 64 100 forward_backward | 10.000 | 5.000 | nan | nan"
    assert lines[-1] == "2 shapes; slowest change 0.50x"


@pytest.mark.parametrize("name, stem", [
    ("Intel(R) Xeon(R) Processor (2 threads)", "intel-xeon-processor-2-threads"),
    ("AMD EPYC 9R14 96-Core Processor (2 threads)", "amd-epyc-9r14-96-core-processor-2-threads"),
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("Intel(TM) Core(tm) i7", "intel-core-i7"),
])
def test_result_file_names(name, stem):
    assert file_stem(name) == stem


def test_cpu_targets_probe(tmp_path):
    # forward 2x (meets 1.5x), forward+backward 2x at 80% of the GEMM rate
    # (meets 75%), a forward 1.2x at 50% (misses), a forward slower than
    # torch.nn at 105% (misses: never slower), a step slower than torch.nn.
    fields = ["cell", "dtype", "batch", "hidden", "steps", "mode", "provider", "median_s", "gemm_fraction"]
    rows = [["gru", "float32", "16", "64", "100", "forward", "fastrnn", "1", "0.3"],
            ["gru", "float32", "16", "64", "100", "forward", "torch", "2", "0.15"],
            ["gru", "float32", "16", "64", "100", "forward_backward", "fastrnn", "1", "0.8"],
            ["gru", "float32", "16", "64", "100", "forward_backward", "torch", "2", "0.4"],
            ["lstm", "float32", "64", "512", "100", "forward", "fastrnn", "1", "0.5"],
            ["lstm", "float32", "64", "512", "100", "forward", "torch", "1.2", "0.6"],
            ["lstm", "float32", "16", "256", "500", "forward", "fastrnn", "1", "1.05"],
            ["lstm", "float32", "16", "256", "500", "forward", "torch", "0.98", "1.07"],
            ["rnn_cell", "float32", "32", "64", "100", "step", "fastrnn", "1", "0.01"],
            ["rnn_cell", "float32", "32", "64", "100", "step", "torch", "0.8", "0.01"]]
    path = tmp_path / "records.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows(rows)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "probes", "cpu_targets.py"),
                             str(path)], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.splitlines()[1:] == [
        "lstm float32 16 256 500 forward | 0.98 | 105.0% | slower",
        "lstm float32 64 512 100 forward | 1.20 | 50.0% | 1.5x or 75%",
        "rnn_cell float32 32 64 100 step | 0.80 | 1.0% | slower",
        "gru float32 forward: 0 of 1 miss",
        "gru float32 forward_backward: 0 of 1 miss",
        "lstm float32 forward: 2 of 2 miss",
    ]


def test_calls_take_turns_in_whole_balanced_cycles():
    # One warm-up call each, ending where the cycle ends; then whole cycles
    # of balanced_order, until each call has run at least min_runs times
    # (4 here: two runs a cycle).
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timings = measure.time_calls(calls, torch.device("cpu"), min_run_time=0.0, min_runs=3)
    cycle = ["abc"[i] for i in measure.balanced_order(3)]
    assert order[2] == cycle[-1] and sorted(order[:3]) == list("abc")
    assert order[3:] == cycle * 2
    assert all(t["runs"] == 4 for t in timings.values())


@pytest.mark.parametrize("n", range(1, 9))
def test_balanced_order_puts_each_call_after_each_other_once(n):
    cycle = measure.balanced_order(n)
    assert collections.Counter(cycle) == {call: max(1, n - 1) for call in range(n)}
    # Pairs of consecutive calls, the cycle's last and first included.
    pairs = collections.Counter(zip(cycle, cycle[1:] + cycle[:1]))
    if n == 1:
        assert pairs == {(0, 0): 1}
    else:
        assert pairs == {(a, b): 1 for a in range(n) for b in range(n) if a != b}
