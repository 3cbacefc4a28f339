"""The device check (``make gpu-check``): one command that proves the GPU engine on a CUDA machine.

Stages, each under its own time limit, so that a hung kernel still leaves
every log written so far:

1. build: the C++ extension in place, on every core (``--quick`` skips it:
   the CUDA checks do not use it);
2. tests: the suite's tests marked ``cuda`` (``pytest -m cuda``: the Triton
   engine against cuDNN-backed torch.nn and float64 torch.nn on the CPU,
   every strategy, the grid-barrier stress test), in one process per core
   sharing one Triton cache, each test under a timeout;
3. bench: fastrnn's Triton engine against torch.nn (cuDNN) over RNN-tanh,
   GRU and LSTM, float32 and bfloat16, B in {1, 8, 32, 128, 512}, H in {128,
   512, 1024}, T = 1024, forward and forward+backward, timed with CUDA
   events;
4. summary: tests passed/failed/skipped and the benchmark's speed-up table
   and summary line, printed last and written beside the other files.

Files, under ``--out`` (default ``$OUT``, else bench/results/gpu-check),
named by the device: ``<device>-tests.xml`` (junit), ``<device>-tests.log``,
``<device>-bench.log``, ``<device>.json`` and ``.csv`` (the records),
``<device>.png`` (the plot) and ``<device>-summary.txt``.

``--device cpu`` runs the same stages on CPU tensors under the Triton
interpreter, on a tiny grid and a few tests: it checks the command itself
without a GPU. The whole command takes at most about 5 minutes on the GPU
machine (``--quick``: 2); it exits non-zero when a stage fails, times out or
a test fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one form of the command runs, and the seconds each stage may take."""

    build_s: int | None  # None: no build stage
    tests_s: int
    bench_s: int
    tests: tuple  # pytest arguments selecting the tests
    test_timeout_s: int
    grid: dict  # the benchmark's --cells/--batch/--hidden/--steps/--dtypes
    min_run_time: float
    step_grid: dict  # the single-step benchmark's --cells/--batch/--hidden/--calls
    step_bench_s: int


CUDA_TESTS = ("tests", "-m", "cuda")
CUDA_GRID = dict(cells=["rnn", "gru", "lstm"], batch=[1, 8, 32, 128, 512],
                 hidden=[128, 512, 1024], steps=[1024], dtypes=["float32", "bfloat16"])
# On CPU only the command is checked: a few interpreter tests, a tiny grid.
CPU_TESTS = ("tests/test_triton.py", "-m", "cuda", "-k",
             "test_layer_matches_reference and T2-B3-H40 or test_tanh_accuracy")
CPU_GRID = dict(cells=["rnn", "gru", "lstm"], batch=[1, 8], hidden=[16], steps=[8],
                dtypes=["float32", "bfloat16"])

# One step per call (cells and length-1 layers), where the launch overhead is the cost.
STEP_CELLS = ["rnn_cell", "gru_cell", "lstm_cell", "rnn", "gru", "lstm"]
CUDA_STEP_GRID = dict(cells=STEP_CELLS, batch=[1, 32], hidden=[64, 256], calls=20)
CPU_STEP_GRID = dict(cells=["gru_cell", "lstm"], batch=[1], hidden=[16], calls=2)

PROFILES = {
    ("cuda", False): Profile(80, 120, 100, CUDA_TESTS, 90, CUDA_GRID, 0.05, CUDA_STEP_GRID, 40),
    ("cuda", True): Profile(None, 50, 40, ("tests/test_triton.py", "-m", "cuda"), 60,
                            dict(CUDA_GRID, batch=[1, 32, 512], hidden=[512]), 0.05,
                            dict(CUDA_STEP_GRID, batch=[1], hidden=[256]), 20),
    # The CPU grid runs under the interpreter in about 35 s on a busy 2-core machine.
    ("cpu", False): Profile(120, 90, 75, CPU_TESTS, 120, CPU_GRID, 0.01, CPU_STEP_GRID, 40),
    ("cpu", True): Profile(None, 90, 75, CPU_TESTS, 120, CPU_GRID, 0.01, CPU_STEP_GRID, 40),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default), or cpu to check the command under the Triton interpreter")
    parser.add_argument("--quick", action="store_true", help="no build, the Triton tests, a small grid")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join("bench", "results", "gpu-check"),
                        help="folder for the logs, records, plot and summary (default: $OUT)")
    return parser.parse_args(argv)


@dataclasses.dataclass
class Stage:
    name: str
    limit_s: int
    returncode: int | None = None  # None: stopped at its time limit
    seconds: float = 0.0
    log: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        status = (f"stopped at its {self.limit_s} s limit" if self.returncode is None
                  else "ok" if self.ok else f"exit {self.returncode}")
        return f"stage {self.name}: {status} in {self.seconds:.0f} s"


def run_stage(name: str, command: list[str], limit_s: int, env: dict, log: str | None) -> Stage:
    """Runs ``command`` in its own process group; past ``limit_s`` the whole group is killed."""
    stage = Stage(name, limit_s, log=log)
    print(f"== {name} (limit {limit_s} s): {' '.join(command)}", flush=True)
    start = time.monotonic()
    with open(log or os.devnull, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            stage.returncode = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
    stage.seconds = time.monotonic() - start
    print(f"== {stage.describe()}", flush=True)
    if not stage.ok and log:
        print(_tail(log, 25), flush=True)
    return stage


def _kill_group(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: str, lines: int) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def junit_counts(junit: str) -> dict | None:
    """{"passed", "failed", "errors", "skipped", "failures": [test ids]} from a junit file."""
    try:
        root = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = dict(passed=0, failed=0, errors=0, skipped=0, failures=[])
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        key = ("failed" if "failure" in kinds else "errors" if "error" in kinds
               else "skipped" if "skipped" in kinds else "passed")
        counts[key] += 1
        if key in ("failed", "errors"):
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def summarise(stages: list[Stage], junit: str, out: str, stem: str) -> tuple[str, bool]:
    """The summary text and whether everything passed; draws the plot if the benchmark could not."""
    from fastrnn.bench import report

    lines = [f"fastrnn device check on {stem}"] + [s.describe() for s in stages]
    counts = junit_counts(junit)
    ok = all(s.ok for s in stages)
    if counts is None:
        lines.append("tests: no junit report written")
        ok = False
    else:
        lines.append("tests: {passed} passed, {failed} failed, {errors} errors, {skipped} skipped"
                     .format(**counts))
        lines += [f"  FAILED {name}" for name in counts["failures"][:30]]
        ok = ok and not counts["failures"] and counts["passed"] > 0
    try:
        with open(os.path.join(out, stem + ".json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        lines.append("benchmark: no records written")
        return "\n".join(lines), False
    records = data["records"]
    png = os.path.join(out, stem + ".png")
    if records and not os.path.exists(png) and report.can_plot():
        report.write_plot(records, data["meta"], out)  # the benchmark stopped before its plot
    lines += [f"benchmark: {len(records)} records, {data['meta'].get('torch')} torch, "
              f"{data['meta'].get('triton')} triton, fastrnn backend {data['meta'].get('backend')}",
              report.table(records), report.summary(records)]
    return "\n".join(lines), ok and bool(records)


def merge_records(out: str, extra_out: str, stem: str) -> None:
    """Appends the records under ``extra_out`` to those under ``out`` and
    rewrites the JSON, CSV and plot there (the machine sends back 8 files at most)."""
    from fastrnn.bench import report

    try:
        with open(os.path.join(out, stem + ".json")) as f:
            data = json.load(f)
        with open(os.path.join(extra_out, stem + ".json")) as f:
            extra = json.load(f)["records"]
    except (OSError, ValueError):
        return  # the summary names what is missing
    records = data["records"] + extra
    report.write_records(records, data["meta"], out)
    if report.can_plot():
        report.write_plot(records, data["meta"], out)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.device, args.quick]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    # One Triton cache for every test process and the benchmark: each kernel compiles once.
    env.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fastrnn-triton-cache-"))
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    cores = os.cpu_count() or 1
    stages = []
    if profile.build_s is not None:
        stages.append(run_stage("build", [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
                                profile.build_s, dict(env, MAX_JOBS=str(cores)), os.path.join(out, "build.log")))

    sys.path.insert(0, ROOT)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here; `make gpu-check DEVICE=cpu` checks the "
              "command on CPU", file=sys.stderr)
        return 2
    from fastrnn.bench import measure, report

    stem = report.file_stem(measure.device_name(torch.device(args.device)))
    if stages:  # the build log is only kept where the build failed
        build_log = stages[0].log
        stages[0].log = os.path.join(out, f"{stem}-build.log")
        os.replace(build_log, stages[0].log)
        if stages[0].ok:
            os.remove(stages[0].log)
    junit = os.path.join(out, f"{stem}-tests.xml")
    stages.append(run_stage("tests", [
        sys.executable, "-m", "pytest", *profile.tests, "-n", str(cores), "-p", "no:cacheprovider",
        f"--timeout={profile.test_timeout_s}", f"--junitxml={junit}", "-q", "-rfE", "-o", "addopts="],
        profile.tests_s, env, os.path.join(out, f"{stem}-tests.log")))
    grid = profile.grid
    stages.append(run_stage("bench", [
        sys.executable, "-m", "fastrnn.bench", "--device", args.device, "--backend", "triton",
        "--cells", *grid["cells"], "--providers", "fastrnn", "torch", "--dtypes", *grid["dtypes"],
        "--batch", *map(str, grid["batch"]), "--hidden", *map(str, grid["hidden"]),
        "--steps", *map(str, grid["steps"]), "--modes", "forward", "forward_backward",
        "--min-run-time", str(profile.min_run_time), "--out", out],
        profile.bench_s, env, os.path.join(out, f"{stem}-bench.log")))
    steps, step_out = profile.step_grid, tempfile.mkdtemp(prefix="fastrnn-step-bench-")
    stages.append(run_stage("step-bench", [
        sys.executable, "-m", "fastrnn.bench", "--device", args.device, "--backend", "triton",
        "--cells", *steps["cells"], "--providers", "fastrnn", "torch", "--dtypes", "float32",
        "--batch", *map(str, steps["batch"]), "--hidden", *map(str, steps["hidden"]),
        "--modes", "step", "step_backward", "--calls", str(steps["calls"]),
        "--min-run-time", str(profile.min_run_time), "--out", step_out],
        profile.step_bench_s, env, os.path.join(out, f"{stem}-step-bench.log")))
    merge_records(out, step_out, stem)
    shutil.rmtree(step_out, ignore_errors=True)
    if stages[-1].ok and os.path.exists(stages[-1].log):
        os.remove(stages[-1].log)  # kept only where it failed: the machine sends back 8 files

    text, ok = summarise(stages, junit, out, stem)
    with open(os.path.join(out, f"{stem}-summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {', '.join(sorted(os.listdir(out)))} under {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
