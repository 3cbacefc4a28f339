"""Turning benchmark records into the speed-up table, the summary line and
the JSON, CSV and PNG files."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import statistics
from collections import defaultdict

from fastrnn.bench.measure import STEP_MODES

SHAPE_KEYS = ("cell", "dtype", "batch", "hidden", "steps")
EXTRA_HINT = ('no progress bar and no plot without tqdm and matplotlib: pip install "fastrnn[bench]"')


def speedups(records: list[dict]) -> dict:
    """{shape: {mode: torch.nn time / fastrnn time}} for shapes timed by both."""
    times = defaultdict(dict)
    for row in records:
        times[tuple(row[k] for k in SHAPE_KEYS), row["mode"]][row["provider"]] = row["median_s"]
    result = defaultdict(dict)
    for (shape, mode), by_provider in times.items():
        if "fastrnn" in by_provider and "torch" in by_provider:
            result[shape][mode] = by_provider["torch"] / by_provider["fastrnn"]
    return dict(result)


def summary(records: list[dict]) -> str:
    """'speed-up over torch.nn: forward median ..x (min ..x), forward+backward ...'."""
    by_mode = defaultdict(list)
    for modes in speedups(records).values():
        for mode, ratio in modes.items():
            by_mode[mode].append(ratio)
    parts = [f"{mode.replace('_', '+')} median {statistics.median(r):.2f}x (min {min(r):.2f}x)"
             for mode, r in by_mode.items()]
    return "speed-up over torch.nn: " + ", ".join(parts)


def table(records: list[dict]) -> str:
    """The whole-sequence table, one row per shape: fastrnn and torch.nn
    milliseconds and the speed-up per mode, and the fraction of the GEMM rate
    fastrnn reached forward+backward; then the step table: microseconds per call."""
    by_key = {(tuple(r[k] for k in SHAPE_KEYS), r["mode"], r["provider"]): r for r in records}
    ratios = speedups(records)

    def columns(shape, mode, scale, key):
        fast, base = by_key.get((shape, mode, "fastrnn")), by_key.get((shape, mode, "torch"))
        if not (fast and base):
            return f"{'':>25}"
        return f"{fast[key] * scale:>9.2f}{base[key] * scale:>9.2f}{ratios[shape][mode]:>7.2f}"

    header = (f"{'cell':<10}{'dtype':>9}{'B':>6}{'H':>6}{'T':>6} | {'fwd ms':>9}{'torch':>9}{'x':>7} |"
              f" {'f+b ms':>9}{'torch':>9}{'x':>7} | {'GEMM%':>6}")
    sequences = [header, "-" * len(header)]
    step_header = (f"{'cell':<10}{'dtype':>9}{'B':>6}{'H':>6}{'calls':>6} | {'step us':>9}{'torch':>9}"
                   f"{'x':>7} | {'+bwd us':>9}{'torch':>9}{'x':>7}")
    steps = [step_header, "-" * len(step_header)]
    for shape, modes in sorted(ratios.items()):
        cell, dtype, batch, hidden, length = shape
        row = f"{cell:<10}{dtype:>9}{batch:>6}{hidden:>6}{length:>6}"
        if any(mode in STEP_MODES for mode in modes):
            cells = [columns(shape, mode, 1e6, "per_call_s") for mode in STEP_MODES]
            steps.append(f"{row} | {cells[0]} | {cells[1]}")
        if any(mode not in STEP_MODES for mode in modes):
            cells = [columns(shape, mode, 1e3, "median_s") for mode in ("forward", "forward_backward")]
            fb = (by_key.get((shape, "forward_backward", "fastrnn"))
                  or by_key.get((shape, "forward", "fastrnn")))
            fraction = (f"{100 * fb['gemm_fraction']:>6.1f}" if fb and fb.get("gemm_fraction")
                        else f"{'':>6}")
            sequences.append(f"{row} | {cells[0]} | {cells[1]} | {fraction}")
    tables = [lines for lines in (sequences, steps) if len(lines) > 2]
    return "\n\n".join("\n".join(lines) for lines in tables)


def write_json(records: list[dict], meta: dict, path: str) -> None:
    """Writes ``{"meta": meta, "records": records}`` to ``path``."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)


def write_csv(records: list[dict], path: str) -> None:
    """Writes the records to ``path`` as CSV, one row each."""
    fields = list(records[0]) if records else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def plot(records: list[dict], path: str, title: str) -> None:
    """Speed-up of fastrnn over torch.nn against hidden size: for whole
    sequences one line per batch size and length, one panel per cell, dtype
    and mode; for single steps one line per cell and batch size, one panel
    per dtype and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(lambda: defaultdict(list))  # {panel: {line label: [(hidden, ratio)]}}
    for (cell, dtype, batch, hidden, steps), modes in speedups(records).items():
        for mode, ratio in modes.items():
            if mode in STEP_MODES:
                panel, label = (f"{dtype} {mode.replace('_', '+')} (per call)"), f"{cell}, B={batch}"
            else:
                panel, label = f"{cell} {dtype} {mode.replace('_', '+')}", f"B={batch}, T={steps}"
            lines[panel][label].append((hidden, ratio))
    panels = sorted(lines)
    columns = min(2, len(panels)) or 1
    rows = -(-len(panels) // columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, points in sorted(lines[panel].items()):
            points.sort()
            ax.plot([h for h, _ in points], [r for _, r in points], marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size")
        ax.set_ylabel("speed-up over torch.nn (x)")
        ax.set_title(panel)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def file_stem(device_name: str) -> str:
    """A file-name-safe stem from the device name, without trademark marks
    ("Intel(R) Xeon(R) Processor (2 threads)" -> "intel-xeon-processor-2-threads")."""
    name = re.sub(r"\((r|tm)\)", "", device_name.lower())
    safe = "".join(c if c.isalnum() else "-" for c in name)
    return "-".join(part for part in safe.split("-") if part)


def can_plot() -> bool:
    """Whether matplotlib is installed (the ``bench`` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def _stem(meta: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, file_stem(meta["device"]))


def write_records(records: list[dict], meta: dict, out_dir: str) -> dict:
    """Writes <stem>.json and .csv under out_dir; returns their paths."""
    stem = _stem(meta, out_dir)
    paths = {"json": stem + ".json", "csv": stem + ".csv"}
    write_json(records, meta, paths["json"])
    write_csv(records, paths["csv"])
    return paths


def write_plot(records: list[dict], meta: dict, out_dir: str) -> str:
    """Writes <stem>.png under out_dir; returns its path."""
    path = _stem(meta, out_dir) + ".png"
    plot(records, path, f"fastrnn vs torch.nn on {meta['device']}")
    return path
