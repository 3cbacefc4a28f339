"""Turning benchmark records into the speed-up table, the summary line and
the JSON, CSV and PNG files."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics
from collections import defaultdict

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
    """One row per shape: fastrnn and torch.nn milliseconds and the speed-up per mode,
    and the fraction of the GEMM rate fastrnn reached forward+backward."""
    by_key = {(tuple(r[k] for k in SHAPE_KEYS), r["mode"], r["provider"]): r for r in records}
    header = (f"{'cell':<5}{'dtype':>9}{'B':>6}{'H':>6}{'T':>6} | {'fwd ms':>9}{'torch':>9}{'x':>7} |"
              f" {'f+b ms':>9}{'torch':>9}{'x':>7} | {'GEMM%':>6}")
    lines = [header, "-" * len(header)]
    for shape, modes in sorted(speedups(records).items()):
        cells = []
        for mode in ("forward", "forward_backward"):
            fast, base = by_key.get((shape, mode, "fastrnn")), by_key.get((shape, mode, "torch"))
            if fast and base:
                cells.append(f"{fast['median_s'] * 1e3:>9.2f}{base['median_s'] * 1e3:>9.2f}"
                             f"{modes[mode]:>7.2f}")
            else:
                cells.append(f"{'':>25}")
        fb = by_key.get((shape, "forward_backward", "fastrnn")) or by_key.get((shape, "forward", "fastrnn"))
        fraction = f"{100 * fb['gemm_fraction']:>6.1f}" if fb and fb.get("gemm_fraction") else f"{'':>6}"
        cell, dtype, batch, hidden, steps = shape
        lines.append(f"{cell:<5}{dtype:>9}{batch:>6}{hidden:>6}{steps:>6} | {cells[0]} | {cells[1]} | {fraction}")
    return "\n".join(lines)


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
    """Speed-up of fastrnn over torch.nn against hidden size, one line per
    batch size (and sequence length), one panel per cell, dtype and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = speedups(records)
    panels = sorted({(shape[0], shape[1], mode) for shape, modes in ratios.items() for mode in modes})
    columns = min(2, len(panels)) or 1
    rows = -(-len(panels) // columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for ax, (cell, dtype, mode) in zip(axes.flat, panels):
        lines = defaultdict(list)
        for (c, d, batch, hidden, steps), modes in ratios.items():
            if (c, d) == (cell, dtype) and mode in modes:
                lines[batch, steps].append((hidden, modes[mode]))
        for (batch, steps), points in sorted(lines.items()):
            points.sort()
            ax.plot([h for h, _ in points], [r for _, r in points], marker="o", label=f"B={batch}, T={steps}")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size")
        ax.set_ylabel("speed-up over torch.nn (x)")
        ax.set_title(f"{cell} {dtype} {mode.replace('_', '+')}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def file_stem(device_name: str) -> str:
    """A file-name-safe stem from the device name."""
    safe = "".join(c if c.isalnum() else "-" for c in device_name.lower())
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
