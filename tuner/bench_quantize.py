"""Benchmark: a trial's float Keras model against its LiteRT variants, side by side in one run.

    python -m tuner.bench_quantize --results results/NAME [--trial ID] [--calibration-images 200]

For the trial (default: the most accurate of the search's front), on this machine, in one
process: the Keras model's latency (:func:`tuner.model.measure.measure_latency`: batch 1, 3
warm-up runs, the median of 10) and validation accuracy, then each variant of
:mod:`tuner.report.quantize` (``float32``, ``float16``, ``dynamic``, ``int8``,
``int8-mixed``) converted, run in the LiteRT interpreter on the same validation images, and
timed by the same rule on the same pixels. Prints one row a variant (validation accuracy,
its change against Keras, latency, speed-up, file size) and ends with ``int8 latency:
N.Nx`` (Keras latency over int8 LiteRT latency), ``int8 accuracy: -0.0XX against float32``
(LiteRT's) and int8-mixed's line: the layers it kept in float, its latency against LiteRT
float32's and its accuracy change. Nothing is written to the search's folder; test is never
read.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data_tools import cli
from data_tools.errors import InputError, run_cli


def build_parser() -> argparse.ArgumentParser:
    from tuner.report import quantize

    parser = cli.parser("tuner.bench_quantize", __doc__)
    parser.add_argument("--results", required=True, help="a search's results/NAME folder")
    parser.add_argument("--trial", help="trial id (default: the front's most accurate)")
    parser.add_argument(
        "--calibration-images", type=int, default=quantize.CALIBRATION_IMAGES, help="int8's"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the trial, score it in Keras on validation, convert and measure every
    variant, print the table and the int8 lines; exit 1 when int8 could not be converted."""
    args = build_parser().parse_args(argv)
    from rich.console import Console

    from tuner.model.measure import device_name, measure_latency
    from tuner.report import evaluate, export, quantize, rebuild

    console = Console(highlight=False, soft_wrap=True)
    folder = Path(args.results)
    config, trials = rebuild.load_search(folder)
    row = _trial(folder, trials, args.trial)
    size = int(row["image_size"])
    model, how = rebuild.trial_model(folder, row, config)
    pixels, labels, _ = evaluate.split_pixels(config, size, "validation")
    model, _ = export.in_float32(model, pixels if export.mixed_policies(model) else None, console)
    probs = evaluate.probabilities(model, pixels)
    row["val_accuracy"] = float((probs.argmax(1) == labels).mean())
    row["latency_ms"], _, spread = measure_latency(model, size)
    calibration = quantize.calibration_pixels(config, size, args.calibration_images)
    with tempfile.TemporaryDirectory() as tmp:
        measured = quantize.measure_variants(
            model, row, (pixels, labels), calibration, Path(tmp), report=_steps
        )
    print(
        f"trial {row['trial_id']}: {row['backbone']} {size}px ({how}); {len(labels)} "
        f"validation images; on {device_name()}"
    )
    return _print_table(row, measured, spread)


def _trial(folder: Path, trials: pd.DataFrame, trial_id: str | None) -> pd.Series:
    """The finished trial ``trial_id``, else the most accurate on the latency front."""
    from tuner.report import results

    done = trials[trials["status"].isin(results.FINISHED)]
    if trial_id is not None:
        row = done[done["trial_id"].astype(str) == trial_id]
        if row.empty:
            raise InputError(
                f"--trial {trial_id}: no finished trial of that id in {folder}/trials.csv"
            )
    else:
        front = done[results.pareto_flags(done)]
        row = front.sort_values("val_accuracy", ascending=False, kind="stable")
    if row.empty:
        raise InputError(f"{folder} has no finished trial: run or resume the search first")
    return row.iloc[0].copy()


def _print_table(row: pd.Series, measured: list[dict], spread: float) -> int:
    """The table (Keras float32, then each LiteRT variant) and the int8 lines; returns the
    exit code."""
    from tuner.report import quantize

    print(f"{'model':<18}{'val acc':>9}{'vs Keras':>10}{'ms/image':>10}{'speed-up':>10}{'MB':>8}")
    keras_mb = float(row["model_bytes"]) / 1e6 if pd.notna(row.get("model_bytes")) else 0.0
    print(
        f"{'Keras float32':<18}{row['val_accuracy']:>9.4f}{'':>10}{row['latency_ms']:>10.2f}"
        f"{'1.0x':>10}{keras_mb:>8.2f}"
    )
    ratios = {}
    for line in measured:
        name = f"LiteRT {line['variant']}"
        if line["status"] != "completed":
            print(f"{name:<18}failed: {line['reason']}")
            continue
        ratios[line["variant"]] = row["latency_ms"] / line["latency_ms"]
        print(
            f"{name:<18}{line['val_accuracy']:>9.4f}"
            f"{line['val_accuracy'] - row['val_accuracy']:>+10.4f}{line['latency_ms']:>10.2f}"
            f"{ratios[line['variant']]:>9.1f}x{line['file_bytes'] / 1e6:>8.2f}"
        )
    print(f"Keras latency spread (IQR) {spread:.2f} ms")
    if "int8" not in ratios:
        print("int8 latency: n/a (the int8 conversion failed)")
        return 1
    print(f"int8 latency: {ratios['int8']:.1f}x")
    by_variant = {line["variant"]: line for line in measured if line["status"] == "completed"}
    lite = by_variant.get("float32")
    if lite is not None:
        change = by_variant["int8"]["val_accuracy"] - lite["val_accuracy"]
        print(f"int8 accuracy: {change:+.3f} against float32")
    mixed = by_variant.get(quantize.MIXED)
    if mixed is not None and lite is not None:
        within = (
            f"within {quantize.MIXED_TOLERANCE:g}"
            if not mixed["reason"]
            else f"not within {quantize.MIXED_TOLERANCE:g}"
        )
        print(
            f"int8-mixed: {mixed['float_layers']} layer(s) in float; latency "
            f"{lite['latency_ms'] / mixed['latency_ms']:.1f}x LiteRT float32's; accuracy "
            f"{mixed['val_accuracy'] - lite['val_accuracy']:+.3f} against float32 ({within} of "
            "the float model's)"
        )
    return 0


def _steps(line: str) -> None:
    """int8-mixed's search, as it goes (the variants' own lines come in the table)."""
    if line.lstrip().startswith("int8-mixed"):
        print(line, flush=True)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
