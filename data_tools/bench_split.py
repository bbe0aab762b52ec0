"""Benchmark the split on large generated label files.

    python -m data_tools.bench_split [--rows 1000000] [--repeats 3]

Prints a table: rows, median seconds (read CSV + split + write CSV, and the split alone),
rows per second. A million rows take a few seconds on a 2-core laptop-class CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_tools.split import split_files, split_frame


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.bench_split")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{'rows':>10} {'split s':>9} {'file->file s':>13} {'rows/s':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            frame = generate_labels(rows)
            labels = Path(tmp) / f"label-{rows}.csv"
            frame.to_csv(labels, index=False)
            split_s = median_seconds(lambda f=frame: split_frame(f), args.repeats)
            files_s = median_seconds(
                lambda p=labels: split_files(p, Path(tmp) / "split.csv"), args.repeats
            )
            print(f"{rows:>10,} {split_s:>9.3f} {files_s:>13.3f} {rows / files_s:>12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
