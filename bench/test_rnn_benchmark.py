"""pytest-benchmark suite: fastrnn, torch.nn and the reference loop, per cell,
mode (whole sequences, and single steps per call), shape and dtype, on the
device present (CUDA if available).

    pytest bench/ --benchmark-json=results.json       # the default grid
    FASTRNN_BENCH_GRID=quick pytest bench/            # one shape; or "full"

The cases and the timed calls are those of ``python -m fastrnn.bench``
(fastrnn/bench/), which also prints the speed-up table and draws the plot.
On CUDA every timed call synchronises the device.
"""

import os

import pytest
import torch

from fastrnn.bench import measure
from fastrnn.bench.__main__ import cases, parse_args

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_GRID = os.environ.get("FASTRNN_BENCH_GRID", "default")
CASES = cases(parse_args([] if _GRID == "default" else [f"--{_GRID}"]), DEVICE)


def case_id(case):
    return f"{case.cell}-{case.dtype}-B{case.batch}-H{case.hidden}-T{case.steps}-{case.mode}"


@pytest.mark.parametrize("provider", measure.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer(benchmark, provider, case):
    if not measure.runs_provider(provider, case):
        pytest.skip("the reference loop runs on tiny shapes only")
    call = measure.make_call(provider, case, DEVICE)

    def synchronized():
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.group = case_id(case)
    benchmark.extra_info.update({**vars(case), "provider": provider,
                                 "device": measure.device_name(DEVICE), **measure.versions()})
    benchmark.pedantic(synchronized, warmup_rounds=1, rounds=5, iterations=1)
