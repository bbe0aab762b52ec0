"""The reference hash split: balanced test and validation buckets, everything else train.

    python -m data_tools.split --labels label.csv --out split_label.csv

For each row (DESIGN.md, "The split"):

* key = the last two characters of the objectId, after removing everything from its first
  '.', read as a hexadecimal number (upper or lower case), so 0..255. An objectId whose last
  two characters are not hexadecimal (``cat_zz.jpg``, an empty stem) takes instead the last
  byte of the SHA-1 of the whole objectId text (UTF-8).
* key in the test range (default 0-24) -> test; in the validation range (default 25-49)
  -> validation; otherwise train.
* in test and in validation separately, every class keeps only as many rows as the smallest
  class has there: the first ones in file order; the surplus goes to train.

The output keeps the input's rows in input order, with columns ``objectId,value,type``.
Everything here is vectorised (pandas/numpy); a million rows split in about a second
(``python -m data_tools.bench_split``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_tools import ingest
from data_tools.atomic import atomic_path, write_text
from data_tools.errors import InputError, preview, run_cli

DEFAULT_TEST_RANGE = (0, 24)
DEFAULT_VALIDATION_RANGE = (25, 49)
_HEX_DIGITS = "0123456789abcdefABCDEF"
# Every 1- or 2-character hexadecimal string and its value: a dict lookup in pandas' C code
# replaces a per-row int(text, 16).
_HEX_VALUE = {
    "".join(chars): int("".join(chars), 16)
    for width in (1, 2)
    for chars in itertools.product(_HEX_DIGITS, repeat=width)
}


def split_keys(object_ids: pd.Series) -> np.ndarray:
    """The 0..255 key of each objectId (see the module docstring)."""
    ids = pd.Series(object_ids, dtype=str).reset_index(drop=True)
    stem = ids.str.split(".", n=1).str[0]
    keys = stem.str[-2:].map(_HEX_VALUE)
    not_hex = keys.isna().to_numpy()
    if not_hex.any():  # the fallback is per row, but only for objectIds that are not hex
        keys[not_hex] = [hashlib.sha1(text.encode("utf-8")).digest()[-1] for text in ids[not_hex]]
    return keys.to_numpy(dtype=np.int64)


def assign_types(
    keys: np.ndarray,
    labels: pd.Series,
    test_range: tuple[int, int] = DEFAULT_TEST_RANGE,
    validation_range: tuple[int, int] = DEFAULT_VALIDATION_RANGE,
) -> np.ndarray:
    """``train``/``validation``/``test`` for each row: hash buckets, then class balancing."""
    labels = pd.Series(labels, dtype=str).reset_index(drop=True)
    classes = labels.unique()
    types = np.full(len(labels), "train", dtype=object)
    for name, (low, high) in (("test", test_range), ("validation", validation_range)):
        in_bucket = np.flatnonzero((keys >= low) & (keys <= high))
        bucket = labels.iloc[in_bucket]
        smallest = bucket.value_counts().reindex(classes, fill_value=0).min()
        # cumcount numbers each class's rows 0, 1, 2, ... in file order.
        keep = bucket.groupby(bucket, sort=False).cumcount().to_numpy() < smallest
        types[in_bucket[keep]] = name
    return types


def split_frame(
    frame: pd.DataFrame,
    test_range: tuple[int, int] = DEFAULT_TEST_RANGE,
    validation_range: tuple[int, int] = DEFAULT_VALIDATION_RANGE,
) -> pd.DataFrame:
    """``objectId,value,type`` for a labels frame, in its row order.

    Raises when a class has no row in the test or the validation range: balancing would
    then leave every class with zero images there.
    """
    check_ranges(test_range, validation_range)
    keys = split_keys(frame["objectId"])
    values = frame["value"].to_numpy()
    for name, (low, high) in (("test", test_range), ("validation", validation_range)):
        present = set(values[(keys >= low) & (keys <= high)])
        absent = ingest.class_names([v for v in pd.unique(values) if v not in present])
        if absent:
            raise InputError(
                f"class(es) {preview(absent)} get no {name} images: no objectId of that class "
                f"has a key in the {name} range {low}-{high}, so balancing would leave every "
                f"class with none; add images, merge classes, or widen --{name}-range"
            )
    types = assign_types(keys, frame["value"], test_range, validation_range)
    return pd.DataFrame({"objectId": frame["objectId"].to_numpy(), "value": values, "type": types})


def check_ranges(test_range: tuple[int, int], validation_range: tuple[int, int]) -> None:
    """Ranges must lie in 0..255, run low to high, and not overlap."""
    for name, (low, high) in (("test", test_range), ("validation", validation_range)):
        if not 0 <= low <= high <= 255:
            raise InputError(
                f"--{name}-range {low}-{high} is invalid: give LOW-HIGH with "
                f"0 <= LOW <= HIGH <= 255"
            )
    if test_range[0] <= validation_range[1] and validation_range[0] <= test_range[1]:
        raise InputError(
            f"--test-range {test_range[0]}-{test_range[1]} and --validation-range "
            f"{validation_range[0]}-{validation_range[1]} overlap: make them disjoint"
        )


def counts_table(split: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Rows per split (train, validation, test, all) and class, as a printable table."""
    table = pd.crosstab(split["type"], split["value"], margins=True, margins_name="all")
    order = [t for t in ingest.SPLIT_TYPES if t in table.index] + ["all"]
    return table.reindex(index=order, columns=[*classes, "all"], fill_value=0)


def split_files(
    labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    test_range: tuple[int, int] = DEFAULT_TEST_RANGE,
    validation_range: tuple[int, int] = DEFAULT_VALIDATION_RANGE,
    max_bad_fraction: float = 0.05,
) -> pd.DataFrame:
    """Read, validate, split and write; returns the split frame.

    ``labels`` is a label CSV or a folder with one sub-folder per class. With ``images`` (or
    for a class folder) every image is checked: missing files are an error; files that
    cannot be decoded are left out and listed in ``<out stem>.excluded.csv``, unless more
    than ``max_bad_fraction`` of them are bad. Writes ``out`` and ``<out stem>.classes.txt``
    (the class order), each atomically, and only once every check has passed.
    """
    check_ranges(test_range, validation_range)
    frame, paths = _read_input(Path(labels), images)
    excluded = pd.DataFrame(columns=["objectId", "path", "reason"])
    if paths is not None:
        excluded = _unreadable_rows(frame, paths, max_bad_fraction)
        frame = frame[~frame["objectId"].isin(excluded["objectId"])].reset_index(drop=True)
        ingest.check_classes(frame["value"], f"labels {labels} after leaving out bad images")
    split = split_frame(frame, test_range, validation_range)
    out = Path(out)
    with atomic_path(out) as tmp:
        split.to_csv(tmp, index=False)
    write_text(sidecar(out, "classes.txt"), "\n".join(ingest.class_names(split["value"])) + "\n")
    report = sidecar(out, "excluded.csv")
    if len(excluded):
        with atomic_path(report) as tmp:
            excluded.to_csv(tmp, index=False)
    else:
        report.unlink(missing_ok=True)  # a report from an earlier run would mislead
    return split


def sidecar(out: Path, suffix: str) -> Path:
    """``split_label.csv`` -> ``split_label.<suffix>`` beside it."""
    return out.with_name(f"{out.stem}.{suffix}")


def _read_input(
    labels: Path, images: str | os.PathLike[str] | None
) -> tuple[pd.DataFrame, pd.Series | None]:
    if labels.is_dir():
        folder = ingest.scan_class_folders(labels)
        return folder[["objectId", "value"]], folder["path"]
    frame = ingest.read_label_csv(labels)
    if images is None:
        return frame, None
    return frame, ingest.resolve_paths(frame, images)


def _unreadable_rows(
    frame: pd.DataFrame, paths: pd.Series, max_bad_fraction: float
) -> pd.DataFrame:
    from data_tools.pipeline import find_unreadable  # TensorFlow only when images are checked

    bad = find_unreadable(paths.tolist())
    excluded = pd.DataFrame(
        {
            "objectId": frame["objectId"].iloc[bad].to_numpy(),
            "path": paths.iloc[bad].to_numpy(),
            "reason": "TensorFlow cannot decode it (corrupt or not an image)",
        }
    )
    if len(bad) > max_bad_fraction * len(frame):
        raise InputError(
            f"{len(bad)} of {len(frame)} images cannot be decoded "
            f"({preview(excluded['path'].tolist(), 3)}), more than the allowed "
            f"{max_bad_fraction:.0%}: fix or remove them, or raise "
            f"--max-bad-fraction"
        )
    return excluded


def parse_range(text: str) -> tuple[int, int]:
    """``'0-24'`` -> ``(0, 24)`` (argparse type)."""
    try:
        low, high = (int(part) for part in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LOW-HIGH, e.g. 0-24") from None
    return low, high


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--labels",
        required=True,
        help="label CSV (objectId,value) or a folder with one sub-folder per class",
    )
    parser.add_argument("--out", required=True, help="split CSV to write (objectId,value,type)")
    parser.add_argument("--images", help="image folder: check every label has a readable image")
    parser.add_argument(
        "--test-range",
        type=parse_range,
        default=DEFAULT_TEST_RANGE,
        metavar="LOW-HIGH",
        help="keys that go to test (default 0-24)",
    )
    parser.add_argument(
        "--validation-range",
        type=parse_range,
        default=DEFAULT_VALIDATION_RANGE,
        metavar="LOW-HIGH",
        help="keys that go to validation (default 25-49)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.05,
        help="fail if more than this fraction of images cannot be decoded",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    split = split_files(
        args.labels,
        args.out,
        args.images,
        args.test_range,
        args.validation_range,
        args.max_bad_fraction,
    )
    classes = ingest.class_names(split["value"])
    print(f"wrote {args.out}: {len(split)} rows, {len(classes)} classes")
    print(counts_table(split, classes).to_string())
    report = sidecar(Path(args.out), "excluded.csv")
    if report.exists():
        print(f"left out {len(pd.read_csv(report))} unreadable image(s): see {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
