"""The device check (``make gpu-check``) run end to end on CPU, as CI runs it.

``--device cpu`` runs the command's stages on CPU tensors under the Triton
interpreter; every file the GPU run returns must be written and well-formed,
within what the lent machine sends back (at most 8 files, plain names).
"""

import csv
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402

for _tool in ("xdist", "matplotlib", "pytest_timeout"):
    if importlib.util.find_spec(_tool) is None:
        pytest.skip(f"the device check needs {_tool}", allow_module_level=True)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=400)
    return out, result, time.monotonic() - start


def test_make_target_runs_the_script_on_cpu():
    recipe = subprocess.run(["make", "-n", "gpu-check", "DEVICE=cpu"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert "bench/gpu_check.py --device cpu" in recipe
    recipe = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    assert "python3 bench/gpu_check.py --device cuda" in recipe


def test_cpu_run_passes_within_its_budget(cpu_run):
    _, result, seconds = cpu_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert seconds < 180
    # The summary comes last: the test counts, then the speed-up table and line.
    tail = result.stdout.strip().splitlines()
    assert re.fullmatch(r"tests: \d+ passed, 0 failed, 0 errors, 0 skipped",
                        next(line for line in tail if line.startswith("tests: ")))
    assert tail[-2].startswith("speed-up over torch.nn: forward median")
    assert tail[-1].startswith("wrote ")


def test_every_file_is_written_and_well_formed(cpu_run):
    out, result, _ = cpu_run
    files = sorted(os.listdir(out))
    stems = {f.split("-tests")[0].split("-step-bench")[0].split("-bench")[0].split("-summary")[0]
             .rsplit(".", 1)[0] for f in files}
    assert len(stems) == 1, files
    stem = stems.pop()
    assert files == sorted(f"{stem}{suffix}" for suffix in (
        "-tests.xml", "-tests.log", "-bench.log", "-summary.txt", ".json", ".csv", ".png"))
    # What the device machine sends back: at most 8 plain-named files.
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    path = lambda suffix: os.path.join(out, stem + suffix)  # noqa: E731

    suite = ElementTree.parse(path("-tests.xml")).getroot()
    cases = list(suite.iter("testcase"))
    assert cases and not any(child.tag in ("failure", "error") for case in cases for child in case)
    assert "passed" in open(path("-tests.log")).read()

    with open(path(".json")) as f:
        data = json.load(f)
    assert data["meta"]["backend"] == "triton" and data["meta"]["triton"]
    grid = gpu_check.CPU_GRID
    expected = set(itertools.product(grid["cells"], grid["dtypes"], grid["batch"], grid["hidden"],
                                     grid["steps"], ["forward", "forward_backward"], ["fastrnn", "torch"]))
    steps = gpu_check.CPU_STEP_GRID
    expected |= set(itertools.product(steps["cells"], ["float32"], steps["batch"], steps["hidden"],
                                      [steps["calls"]], ["step", "step_backward"],
                                      ["fastrnn", "torch"]))
    records = data["records"]
    keys = ("cell", "dtype", "batch", "hidden", "steps", "mode", "provider")
    assert {tuple(r[k] for k in keys) for r in records} == expected
    for r in records:
        assert math.isfinite(r["median_s"]) and 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"], r
    with open(path(".csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == len(records)
    with open(path(".png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = open(path("-summary.txt")).read()
    assert "tests: " in summary and "speed-up over torch.nn: " in summary
    assert summary.strip() in result.stdout


def test_a_stage_past_its_limit_is_killed_with_its_children(tmp_path):
    # A hung kernel must not hang the command: the stage's whole process
    # group is killed at its limit, and the run goes on.
    log = str(tmp_path / "stage.log")
    command = [sys.executable, "-c", "import subprocess, sys, time; print('started', flush=True); "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    start = time.monotonic()
    stage = gpu_check.run_stage("hang", command, 2, dict(os.environ), log)
    assert time.monotonic() - start < 20
    assert stage.returncode is None and not stage.ok
    assert "stopped at its 2 s limit" in stage.describe()
    assert "started" in open(log).read()


def test_summary_fails_without_a_test_report(tmp_path):
    text, ok = gpu_check.summarise([], str(tmp_path / "missing.xml"), str(tmp_path), "none")
    assert not ok and "no junit report" in text and "no records" in text
