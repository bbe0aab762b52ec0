"""The reference hash split: balanced test and validation buckets, everything else train.

    python -m data_tools.split --labels label.csv --out split_label.csv

For each row (the reference rule, as the seed project's split script):

* key = the last two characters of the objectId, after removing everything from its first
  '.', read as a hexadecimal number (upper or lower case), so 0..255. An objectId whose last
  two characters are not hexadecimal (``cat_zz.jpg``, an empty stem) takes instead the last
  byte of the SHA-1 of the whole objectId text (UTF-8).

  That key is uniform only for hash-named files (SHA-1, MD5, UUID names). ``--key auto`` (the
  default) keeps it when the objectIds look like hashes (:func:`choose_key`: nearly every
  stem is 8 or more hex digits and dashes, most with a letter a-f) and otherwise keys
  every row by the last byte of the SHA-1 of its objectId: camera names such as
  ``IMG_0001.jpg`` end in decimal digits, so the reference key would send 18% of them to
  test where the range means 10%. The split says which rule it used; ``--key reference`` or
  ``--key sha1`` choose one.
* key in the test range (default 0-24) -> test; in the validation range (default 25-49)
  -> validation; otherwise train.
* in test and in validation separately, every class keeps only as many rows as the smallest
  class has there: the first ones in file order; the surplus goes to train.

The output keeps the input's rows in input order, with columns ``objectId,value,type``.
Everything here is vectorised (Arrow, pandas, numpy): a million rows go from file to file in
about 3 s as a process, half a plain pandas script's time (``python -m
data_tools.bench_split``). When balancing leaves fewer than :data:`MIN_PER_CLASS` images a
class in validation or test, the CLI warns with the counts and ranges that would give more.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_tools import cli, ingest
from data_tools.atomic import atomic_path, write_text
from data_tools.errors import InputError, preview, run_cli

DEFAULT_TEST_RANGE = (0, 24)
DEFAULT_VALIDATION_RANGE = (25, 49)
_HEX_DIGITS = "0123456789abcdefABCDEF"
# Each byte's value as a hexadecimal digit, -1 for bytes that are not one.
_HEX_OF_BYTE = np.full(256, -1, dtype=np.int64)
for _digit in _HEX_DIGITS:
    _HEX_OF_BYTE[ord(_digit)] = int(_digit, 16)


KEYS = ("auto", "reference", "sha1")
HASH_SHARE = 0.99  # of objectIds that look like hashes, for --key auto to keep the reference


def hex_stems(object_ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per objectId: (its stem, before the first '.', is 8 or more hex digits and dashes, as
    SHA-1, MD5 and UUID names are; that stem has a letter a-f)."""
    stems = pd.Series(object_ids, dtype=str).str.split(".", n=1).str[0]
    hexes = stems.str.fullmatch(r"[0-9a-fA-F-]{8,}").to_numpy(dtype=bool)
    return hexes, stems.str.contains(r"[a-fA-F]").to_numpy(dtype=bool)


def choose_key(object_ids: pd.Series, key: str = "auto") -> tuple[str, str]:
    """(the rule, ``reference`` or ``sha1``; one line saying which and why) for ``key``.

    ``auto``: the objectIds look like hashes when at least :data:`HASH_SHARE` of their stems
    are hex (:func:`hex_stems`) and at least half of those have a letter a-f (a column of
    decimal numbers such as dates is not hashes, though each is hex)."""
    if key not in KEYS:
        raise InputError(f"--key {key}: choose one of {', '.join(KEYS)}")
    hexes, letters = hex_stems(object_ids)
    hashed = int(hexes.sum()) if (letters & hexes).sum() >= 0.5 * hexes.sum() else 0
    share = f"{hashed:,} of {len(hexes):,} objectIds look like hashes"
    if key != "auto":
        return key, f"split key: {key} (--key {key}; {share})"
    if hashed and hashed >= HASH_SHARE * len(hexes):
        return "reference", f"split key: reference, the objectIds' last two hex digits ({share})"
    return "sha1", (
        f"split key: sha1 of each objectId ({share}, so their last two characters are not "
        f"uniform; --key reference keeps the reference rule)"
    )


def split_keys(object_ids: pd.Series, rule: str = "reference") -> np.ndarray:
    """The 0..255 key of each objectId by ``rule`` (``reference`` or ``sha1``; see the module
    docstring).

    Vectorised over the UTF-8 bytes of the whole column (Arrow's string buffers): the first
    '.' of each row by a search over the positions of every '.', then the two bytes before it.
    Two ASCII hex digits there are exactly two hex characters; any other byte (a non-ASCII
    character's included) is not hex, so such rows take the SHA-1 fallback, as the reference.
    """
    import pyarrow as pa

    ids = pd.Series(object_ids).reset_index(drop=True)
    if rule == "sha1":
        return _sha1_keys(ids)
    strings = pa.array(ids, type=pa.large_string(), from_pandas=True)
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
        strings.offset : strings.offset + len(strings) + 1
    ]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, np.uint8)
    )
    starts, ends = offsets[:-1], offsets[1:]
    dots = np.flatnonzero(data == ord("."))
    first = np.searchsorted(dots, starts)
    dot = np.append(dots, np.iinfo(np.int64).max)[first]
    stem_end = np.minimum(dot, ends)
    length = stem_end - starts
    top = max(len(data) - 1, 0)
    padded = data if len(data) else np.zeros(1, np.uint8)
    last = _HEX_OF_BYTE[padded[np.clip(stem_end - 1, 0, top)]]
    before = _HEX_OF_BYTE[padded[np.clip(stem_end - 2, 0, top)]]
    keys = np.where(length >= 2, before * 16 + last, last)
    not_hex = (length == 0) | (last < 0) | ((length >= 2) & (before < 0))
    if not_hex.any():  # the fallback is per row, but only for objectIds that are not hex
        keys[not_hex] = _sha1_keys(ids[not_hex])
    return keys.astype(np.int64)


def _sha1_keys(ids: pd.Series) -> np.ndarray:
    """The last byte of the SHA-1 of each objectId's text (UTF-8)."""
    texts = ids.astype(str)
    return np.array(
        [hashlib.sha1(text.encode("utf-8")).digest()[-1] for text in texts], dtype=np.int64
    )


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
    key: str = "reference",
) -> pd.DataFrame:
    """``objectId,value,type`` for a labels frame, in its row order, keyed by ``key``
    (``reference``, ``sha1`` or ``auto``: :func:`choose_key`; ``attrs["key"]`` and
    ``attrs["key_line"]`` say which rule it used).

    Raises when a class has no row in the test or the validation range: balancing would
    then leave every class with zero images there.
    """
    check_ranges(test_range, validation_range)
    rule, line = choose_key(frame["objectId"], key)
    keys = split_keys(frame["objectId"], rule)
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
    split = pd.DataFrame({"objectId": frame["objectId"].to_numpy(), "value": values, "type": types})
    split.attrs.update(key=rule, key_line=line)
    return split


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


MIN_PER_CLASS = 20  # fewer validation (or test) images a class are too few to select on
MAX_HELD_OUT_KEYS = 128  # a suggested test + validation never takes more than half the keys


def _per_class_in(histogram: np.ndarray, low: int, high: int) -> int:
    """Images a class that balancing keeps in keys ``low..high``: the rarest class's count.
    ``histogram`` is the cumulative key count, one row per class, 257 columns."""
    return int((histogram[:, high + 1] - histogram[:, low]).min())


def suggest_ranges(
    keys: np.ndarray, labels: pd.Series, minimum: int = MIN_PER_CLASS
) -> tuple[tuple[int, int], tuple[int, int], int, int]:
    """The narrowest ``test 0..t-1, validation t..t+v-1`` that leaves every class at least
    ``minimum`` images in each, within :data:`MAX_HELD_OUT_KEYS` keys (the widest there is
    when none does): (test range, validation range, per class in test, in validation)."""
    codes, _ = pd.factorize(pd.Series(labels, dtype=str))
    counts = np.zeros((codes.max() + 1, 256), dtype=np.int64)
    np.add.at(counts, (codes, keys), 1)
    histogram = np.concatenate([np.zeros((len(counts), 1), np.int64), counts.cumsum(1)], 1)
    best = None
    for total in range(2, MAX_HELD_OUT_KEYS + 1):
        for t in (total // 2, total - total // 2):
            test, validation = (0, t - 1), (t, total - 1)
            got = (_per_class_in(histogram, *test), _per_class_in(histogram, *validation))
            if min(got) >= minimum:
                return test, validation, *got
            if best is None or min(got) > min(best[2:]):
                best = (test, validation, *got)
    return best


def small_split_warning(split: pd.DataFrame, key: str = "auto") -> str | None:
    """One line when balancing left fewer than :data:`MIN_PER_CLASS` images a class in
    validation or test (the counts, the accuracy step, a range option and what it gives);
    None otherwise. ``split`` is ``objectId,value,type`` in any row order, keyed by ``key``."""
    classes = pd.unique(split["value"])
    kept = {
        name: int(
            split.loc[split["type"] == name, "value"]
            .value_counts()
            .reindex(classes, fill_value=0)
            .min()
        )
        for name in ("validation", "test")
    }
    if min(kept.values()) >= MIN_PER_CLASS:
        return None
    n = len(classes)
    parts = [
        f"{name} keeps {per} images a class ({per * n} in all; accuracy moves in steps of "
        f"{1 / max(per * n, 1):.1%})"
        for name, per in kept.items()
    ]
    test, validation, per_test, per_validation = suggest_ranges(
        split_keys(split["objectId"], choose_key(split["objectId"], key)[0]), split["value"]
    )
    held_out = (per_test + per_validation) * n
    fix = (
        f"--test-range {test[0]}-{test[1]} --validation-range {validation[0]}-{validation[1]} "
        f"would give {per_validation} validation and {per_test} test images a class "
        f"({per_validation * n} and {per_test * n}), leaving {len(split) - held_out} to train"
    )
    if min(per_test, per_validation) < MIN_PER_CLASS:
        fix += "; the rarest class needs more images for more than that"
    return (
        f"warning: balanced to the rarest class, {'; '.join(parts)}: fewer than "
        f"{MIN_PER_CLASS} images a class is too few to select on. {fix}"
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
    key: str = "auto",
) -> pd.DataFrame:
    """Read, validate, split and write; returns the split frame.

    ``labels`` is a label CSV or a folder with one sub-folder per class. With ``images`` (or
    for a class folder) every image is checked: missing files are an error; files that
    cannot be decoded are left out and listed in ``<out stem>.excluded.csv``, unless more
    than ``max_bad_fraction`` of them are bad; the checked files' size and modification time
    go to ``<out stem>.files.csv``, which a search compares with when it starts. Writes
    ``out`` and ``<out stem>.classes.txt`` (the class order), each atomically, and only once
    every check has passed. ``key``: the split key's rule (:func:`choose_key`); the frame's
    ``attrs`` say which one was used.
    """
    check_ranges(test_range, validation_range)
    frame, paths = _read_input(Path(labels), images)
    excluded = pd.DataFrame(columns=["objectId", "path", "reason"])
    stamps = None
    if paths is not None:
        stamps = ingest.file_stamps(paths.tolist())  # before the check: a change during it shows
        excluded = _unreadable_rows(frame, paths, max_bad_fraction)
        frame = frame[~frame["objectId"].isin(excluded["objectId"])].reset_index(drop=True)
        ingest.check_classes(frame["value"], f"labels {labels} after leaving out bad images")
    split = split_frame(frame, test_range, validation_range, key)
    out = Path(out)
    with atomic_path(out) as tmp:
        write_csv(split, tmp)
    write_text(sidecar(out, "classes.txt"), "\n".join(ingest.class_names(split["value"])) + "\n")
    stamps_file = sidecar(out, "files.csv")
    if stamps is not None:  # what was checked, for a search to compare with when it starts
        kept = stamps[~stamps["path"].isin(excluded["path"])]
        with atomic_path(stamps_file) as tmp:
            kept.to_csv(tmp, index=False)
    else:
        stamps_file.unlink(missing_ok=True)
    report = sidecar(out, "excluded.csv")
    if len(excluded):
        with atomic_path(report) as tmp:
            excluded.to_csv(tmp, index=False)
    else:
        report.unlink(missing_ok=True)  # a report from an earlier run would mislead
    return split


@dataclass(frozen=True)
class SearchTable:
    """What a search reads of its data (:func:`search_table`)."""

    table: pd.DataFrame  # train and validation rows, normalised (ingest.normalise)
    classes: list[str]
    facts: dict[str, Any]  # for the search's config: source, images, classes, counts, ranges
    warning: str | None  # balanced validation or test too small to select on
    key_line: str | None  # which split key a split made now used, and why
    stamps: pd.DataFrame | None = None  # the split's files.csv: path, size, mtime_ns, if any


def search_table(
    data: str | os.PathLike[str],
    images: str | os.PathLike[str] | None,
    split_path: Path,
    test_range: tuple[int, int] = DEFAULT_TEST_RANGE,
    validation_range: tuple[int, int] = DEFAULT_VALIDATION_RANGE,
    key: str = "auto",
) -> SearchTable:
    """The train and validation rows a search reads from ``data``: a split file as it is, or
    a label file or class folder split into ``split_path`` (once: an existing one is reused),
    its images checked. The test rows are counted, never returned: export alone reads them."""
    data = Path(data)
    images = Path(images) if images else None
    key_line = None
    if data.is_dir() or not ingest.is_split_csv(data):
        if images is None and not data.is_dir():
            images = data.parent / "images"
        if not split_path.is_file():
            made = split_files(
                data,
                split_path,
                images=images if not data.is_dir() else None,
                test_range=test_range,
                validation_range=validation_range,
                key=key,
            )
            key_line = made.attrs["key_line"]
        frame = ingest.read_split_csv(split_path)
        rule = choose_key(frame["objectId"], key)[0]
        ranges = [list(test_range), list(validation_range)]
        images = images or data
        source = str(split_path)
    else:
        frame = ingest.read_split_csv(data)
        images = images or data.parent / "images"
        source = str(data)
        ranges = None  # split by the user
        rule = choose_key(frame["objectId"])[0]  # for the warning's suggestion
    warning = small_split_warning(frame, rule)  # counts only: the test rows stay unread
    frame = frame[frame["type"] != "test"].reset_index(drop=True)
    classes = ingest.class_names(frame["value"])
    table = ingest.normalise(frame, ingest.resolve_paths(frame, images), classes)
    counts = table["type"].value_counts().to_dict()
    facts: dict[str, Any] = {
        "data": source,
        "images": str(images),
        "classes": classes,
        "split_counts": {k: int(v) for k, v in counts.items()},
    }
    if ranges:
        facts["split_ranges"] = {"test": ranges[0], "validation": ranges[1]}
        facts["split_key"] = rule
    if warning and ranges is None:
        warning += f" (re-split {source} with python -m data_tools.split and those options)"
    stamps = ingest.read_stamps(sidecar(Path(source), "files.csv"))
    return SearchTable(table, classes, facts, warning, key_line, stamps)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as CSV, text columns only, byte for byte what ``frame.to_csv(path,
    index=False)`` writes (``\n`` line ends), by Arrow's writer when no cell needs quotes
    (8x faster on a million rows), by pandas' otherwise."""
    import pyarrow as pa
    import pyarrow.compute as pa_compute
    import pyarrow.csv as pa_csv

    table = pa.table({name: pa.array(frame[name], type=pa.string()) for name in frame.columns})
    special = r'[,"\r\n]'  # what pandas' minimal quoting quotes; Arrow quotes every string
    if any(
        pa_compute.any(pa_compute.match_substring_regex(c, special)).as_py() for c in table.columns
    ) or any(set(name) & set(',"\r\n') for name in frame.columns):
        frame.to_csv(path, index=False)
        return
    with open(path, "wb") as handle:
        handle.write((",".join(frame.columns) + "\n").encode("utf-8"))
        options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
        pa_csv.write_csv(table, handle, options)


def sidecar(out: Path, suffix: str) -> Path:
    """``split_label.csv`` -> ``split_label.<suffix>`` beside it."""
    return out.with_name(f"{out.stem}.{suffix}")


def _read_input(
    labels: Path, images: str | os.PathLike[str] | None
) -> tuple[pd.DataFrame, pd.Series | None]:
    if labels.is_dir():
        folder = ingest.scan_class_folders(labels)
        return folder[["objectId", "value"]], folder["path"]
    frame = ingest.read_label_csv(labels, fast=True)
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
            "reason": [unreadable_reason(path) for path in paths.iloc[bad]],
        }
    )
    if len(bad) > max_bad_fraction * len(frame):
        raise InputError(
            f"{len(bad)} of {len(frame)} images cannot be decoded or are over --max-pixels "
            f"({preview(excluded['path'].tolist(), 3)}), more than the allowed "
            f"{max_bad_fraction:.0%}: fix or remove them, or raise "
            f"--max-bad-fraction"
        )
    return excluded


def unreadable_reason(path: str) -> str:
    """Why an image was left out: over the pixel limit (by its header), or undecodable."""
    from data_tools import header

    try:
        with open(path, "rb") as handle:
            declared = int(header.declared_pixels(handle.read(64 * 1024)).numpy())
    except Exception:  # noqa: BLE001 - a header that cannot be read: the decoder's reason
        declared = 0
    if declared > header.MAX_PIXELS:
        return (
            f"declares {declared:,} pixels, over --max-pixels {header.MAX_PIXELS:,} "
            f"(refused before decoding)"
        )
    return "TensorFlow cannot decode it (corrupt or not an image)"


def add_max_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-pixels`` (every command that decodes images)."""
    from data_tools.header import DEFAULT_MAX_PIXELS

    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images whose header declares more than N pixels (width x height), "
        "before decoding them: decompression bombs; they count as unreadable images",
    )


def parse_range(text: str) -> tuple[int, int]:
    """``'0-24'`` -> ``(0, 24)`` (argparse type)."""
    try:
        low, high = (int(part) for part in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LOW-HIGH, e.g. 0-24") from None
    return low, high


def add_range_arguments(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--test-range`` and ``--validation-range`` (this CLI's, and ``tuner.search``'s when
    it splits a label file itself; ``note`` ends their help)."""
    for name, default in (("test", DEFAULT_TEST_RANGE), ("validation", DEFAULT_VALIDATION_RANGE)):
        parser.add_argument(
            f"--{name}-range",
            type=parse_range,
            default=default,
            metavar="LOW-HIGH",
            help=f"keys that go to {name} (default {default[0]}-{default[1]}){note}",
        )


def add_key_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--key auto|reference|sha1`` (this CLI's and ``tuner.search``'s)."""
    parser.add_argument(
        "--key",
        choices=KEYS,
        default="auto",
        help="how a row's 0..255 key is made: reference (the objectId's last two hex digits), "
        "sha1 (the last byte of the objectId's SHA-1), or auto: reference when the objectIds "
        f"look like hashes, else sha1{note}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("data_tools.split", __doc__)
    parser.add_argument(
        "--labels",
        required=True,
        help="label CSV (objectId,value) or a folder with one sub-folder per class",
    )
    parser.add_argument("--out", required=True, help="split CSV to write (objectId,value,type)")
    parser.add_argument("--images", help="image folder: check every label has a readable image")
    add_range_arguments(parser)
    add_key_argument(parser)
    add_max_pixels_argument(parser)
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.05,
        help="fail if more than this fraction of images cannot be decoded",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from data_tools import header

    args = build_parser().parse_args(argv)
    header.set_max_pixels(args.max_pixels)
    split = split_files(
        args.labels,
        args.out,
        args.images,
        args.test_range,
        args.validation_range,
        args.max_bad_fraction,
        args.key,
    )
    classes = ingest.class_names(split["value"])
    print(split.attrs["key_line"])
    print(f"wrote {args.out}: {len(split)} rows, {len(classes)} classes")
    print(counts_table(split, classes).to_string())
    warning = small_split_warning(split, split.attrs["key"])
    if warning:
        print(warning, file=sys.stderr)
    report = sidecar(Path(args.out), "excluded.csv")
    if report.exists():
        print(f"left out {len(pd.read_csv(report))} unreadable image(s): see {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
