"""Benchmark the split on large generated label files.

    python -m data_tools.bench_split [--rows 1000000] [--repeats 3]

Prints a table: rows, median seconds of the split alone and of file to file in this
process, then, as a user runs it, ``python -m data_tools.split`` as a process (interpreter
start and imports included) beside a plain pandas script of the same algorithm run the same
way (:data:`PLAIN_PANDAS`: ``read_csv``, per-row string methods, ``groupby().cumcount()``,
``to_csv``), and the ratio of the two. Both write the same file (checked).
"""

from __future__ import annotations

import argparse
import filecmp
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_tools import cli
from data_tools.split import split_files, split_frame

PLAIN_PANDAS = r"""
import hashlib, sys
import pandas as pd
labels, out = sys.argv[1:3]
frame = pd.read_csv(labels, dtype=str, keep_default_na=False)
def key(object_id):
    last = object_id.split(".", 1)[0][-2:]
    try:
        return int(last, 16) if last and last.strip("0123456789abcdefABCDEF") == "" else None
    except ValueError:
        return None
def fallback(object_id):
    return hashlib.sha1(object_id.encode()).digest()[-1]
keys = frame["objectId"].map(lambda t: k if (k := key(t)) is not None else fallback(t))
frame["type"] = "train"
for name, low, high in (("test", 0, 24), ("validation", 25, 49)):
    bucket = frame[(keys >= low) & (keys <= high)]
    smallest = bucket["value"].value_counts().reindex(frame["value"].unique(), fill_value=0).min()
    keep = bucket.groupby("value", sort=False).cumcount() < smallest
    frame.loc[keep[keep].index, "type"] = name
frame.to_csv(out, index=False)
"""


def process_seconds(argv: list[str], repeats: int) -> float:
    """Median wall time of a command, as a user runs it (a fresh interpreter each time)."""
    return median_seconds(lambda: subprocess.run(argv, check=True, capture_output=True), repeats)


def generate_labels(rows: int, seed: int = 0) -> pd.DataFrame:
    """Hex objectIds (as in the reference data) with a 1:2 class imbalance."""
    rng = np.random.default_rng(seed)
    ids = [f"{value:032x}.jpg" for value in rng.integers(0, 2**63, size=rows, dtype=np.int64)]
    ids = [f"{i:08x}{text}" for i, text in enumerate(ids)]  # unique
    values = np.where(rng.random(rows) < 1 / 3, "0", "1")
    return pd.DataFrame({"objectId": ids, "value": values})


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("data_tools.bench_split", __doc__)
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="label files' sizes",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(
        f"{'rows':>10} {'split s':>9} {'file->file s':>13} {'rows/s':>12} "
        f"{'CLI process s':>14} {'plain pandas s':>15} {'speed-up':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            frame = generate_labels(rows)
            labels = Path(tmp) / f"label-{rows}.csv"
            frame.to_csv(labels, index=False)
            split_s = median_seconds(lambda f=frame: split_frame(f), args.repeats)
            files_s = median_seconds(
                lambda p=labels: split_files(p, Path(tmp) / "split.csv"), args.repeats
            )
            by_cli, plain = Path(tmp) / "cli.csv", Path(tmp) / "plain.csv"
            cli_s = process_seconds(
                [
                    sys.executable,
                    "-m",
                    "data_tools.split",
                    "--labels",
                    str(labels),
                    "--out",
                    str(by_cli),
                ],
                args.repeats,
            )
            plain_s = process_seconds(
                [sys.executable, "-c", PLAIN_PANDAS, str(labels), str(plain)], args.repeats
            )
            if not filecmp.cmp(by_cli, plain, shallow=False):
                raise SystemExit(f"the CLI and the plain script disagree on {rows} rows")
            print(
                f"{rows:>10,} {split_s:>9.3f} {files_s:>13.3f} {rows / files_s:>12,.0f} "
                f"{cli_s:>14.2f} {plain_s:>15.2f} {plain_s / cli_s:>8.1f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
