"""Ingest: read and validate labels, find the images, normalise to one table.

Two layouts are accepted:

* a label CSV of ``objectId,value`` rows (or a split CSV of ``objectId,value,type`` rows)
  beside an image folder; an image is found as ``images/<objectId>``, as
  ``images/<value>/<objectId>``, or by its stem (``<objectId>.jpg``, ``.png``, ...);
* a folder with one sub-folder per class; the objectId is the file name and the value is the
  sub-folder name.

Every check raises :class:`~data_tools.errors.InputError` with one line for the user.
The normalised table has the columns ``objectId, path, value, class_index`` (and ``type``
for a split file); class indices follow :func:`class_names`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data_tools.errors import InputError, preview

LABEL_COLUMNS = ["objectId", "value"]
SPLIT_COLUMNS = ["objectId", "value", "type"]
SPLIT_TYPES = ("train", "validation", "test")
# What TensorFlow's decode_image reads (and so what the pipeline can use).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
_INTEGER = re.compile(r"^[+-]?\d+$")


def read_label_csv(
    path: str | os.PathLike[str], columns: list[str] = LABEL_COLUMNS, fast: bool = False
) -> pd.DataFrame:
    """Read a labels file with exactly ``columns``, every value kept as text.

    Checks: the file exists and is not empty, the header names exactly ``columns``, no
    objectId is blank or repeated, no value is blank, and there are at least two classes.
    ``fast``: parse with Arrow's multi-threaded reader into Arrow-backed strings (4x faster
    on a million rows); a file it cannot parse is read again by pandas' own parser, whose
    errors the messages describe.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file {path} does not exist: pass the path of your label.csv")
    frame = _read_arrow(path) if fast else None
    if frame is None:
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=False)
        except pd.errors.EmptyDataError:
            raise InputError(
                f"labels file {path} is empty: it needs a header line "
                f"'{','.join(columns)}' and one row per image"
            ) from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise InputError(
                f"labels file {path} is not a readable CSV ({exc}): "
                f"write it as '{','.join(columns)}' rows"
            ) from None
    _check_columns(frame, columns, path)
    if frame.empty:
        raise InputError(f"labels file {path} has a header but no rows: add one row per image")
    _check_cells(frame, path)
    if "type" in columns:
        _check_types(frame, path)
    check_classes(frame["value"], str(path))
    return frame[columns].reset_index(drop=True)


def _read_arrow(path: Path) -> pd.DataFrame | None:
    """Every column as Arrow-backed text (empty cells as ``""``), or None where Arrow's
    reader refuses the file."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    try:
        table = pa_csv.read_csv(
            path,
            convert_options=pa_csv.ConvertOptions(
                # Text, never inferred: "007" must stay "007", not become 7.
                column_types={name: pa.string() for name in SPLIT_COLUMNS},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                null_values=[],
            ),
        )
        table = table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))
    except (pa.ArrowException, ValueError):
        return None
    return table.to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get)


def read_split_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a split file (``objectId,value,type``) written by ``python -m data_tools.split``."""
    return read_label_csv(path, SPLIT_COLUMNS)


def is_split_csv(path: str | os.PathLike[str]) -> bool:
    """True when the CSV's header is that of a split file (has a ``type`` column)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().strip().split(",")
    return "type" in header


def _check_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    found = list(frame.columns)
    if sorted(found) == sorted(columns):
        return
    missing = [c for c in columns if c not in found]
    extra = [c for c in found if c not in columns]
    problems = []
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected column(s) {preview(extra)}")
    raise InputError(
        f"labels file {path}: {'; '.join(problems)}; the header must be exactly "
        f"'{','.join(columns)}'"
    )


def _check_cells(frame: pd.DataFrame, path: Path) -> None:
    for column in ("objectId", "value"):
        blank = frame.index[frame[column].str.strip() == ""]
        if len(blank):
            lines = [str(i + 2) for i in blank]  # +1 for the header, +1 for 1-based lines
            raise InputError(
                f"labels file {path}: {len(blank)} row(s) have a blank {column} "
                f"(line {preview(lines)}): fill them in or remove those rows"
            )
    ids = frame["objectId"]
    if ids.nunique() == len(ids):
        return  # (the usual case: 3x faster than duplicated() on a million rows)
    repeated = ids[ids.duplicated(keep=False)]
    if len(repeated):
        names = list(dict.fromkeys(repeated))
        raise InputError(
            f"labels file {path}: {len(names)} objectId(s) appear more than once "
            f"({preview(names)}): each image must have exactly one row"
        )


def _check_types(frame: pd.DataFrame, path: Path) -> None:
    bad = sorted(set(frame["type"]) - set(SPLIT_TYPES))
    if bad:
        raise InputError(
            f"split file {path}: unknown type(s) {preview(bad)} in column 'type'; "
            f"valid types are {', '.join(SPLIT_TYPES)}"
        )


def check_classes(values: pd.Series, where: str) -> None:
    """At least two classes: a classifier of one class learns nothing."""
    classes = values.unique()
    if len(classes) < 2:
        only = f"'{classes[0]}'" if len(classes) else "none"
        raise InputError(
            f"{where}: found only one class ({only}); a classifier needs at least "
            f"two different values in the 'value' column"
        )


def class_names(values: pd.Series | list[str]) -> list[str]:
    """The classes in a stable order, whatever the order of the rows.

    Integer labels sort as numbers (``0, 1, 2, 10``), anything else as text; a class's
    position in this list is its class index.
    """
    unique = list(pd.unique(pd.Series(values, dtype=str)))
    if all(_INTEGER.match(v) for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def scan_class_folders(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Read the one-sub-folder-per-class layout as ``objectId, value, path`` rows.

    The objectId is the file name, so file names must be unique across classes. Files whose
    extension is not an image type are ignored; hidden files and folders too.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"image folder {root} does not exist: pass a folder with one sub-folder per class"
        )
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.rglob("*")):
            if (
                file.is_file()
                and file.suffix.lower() in IMAGE_EXTENSIONS
                and not file.name.startswith(".")
            ):
                rows.append((file.name, class_dir.name, str(file)))
    frame = pd.DataFrame(rows, columns=["objectId", "value", "path"], dtype=str)
    if frame.empty:
        raise InputError(
            f"image folder {root} has no class sub-folders with images "
            f"({', '.join(IMAGE_EXTENSIONS)}): put each class's images in "
            f"{root}/<class name>/"
        )
    repeated = frame[frame["objectId"].duplicated(keep=False)]
    if len(repeated):
        first = repeated["objectId"].iloc[0]
        where = ", ".join(repeated.loc[repeated["objectId"] == first, "value"])
        raise InputError(
            f"image folder {root}: {repeated['objectId'].nunique()} file name(s) "
            f"appear in more than one class (first: {first} in {where}); file names "
            f"are the objectIds in this layout, so rename them to be unique"
        )
    check_classes(frame["value"], f"image folder {root}")
    return frame


def resolve_paths(frame: pd.DataFrame, images: str | os.PathLike[str]) -> pd.Series:
    """The image file of each row, found under ``images`` (see the module docstring).

    Raises when the folder does not exist or when any row's image is missing, saying how
    many and listing the first few.
    """
    images = Path(images)
    if not images.is_dir():
        raise InputError(
            f"images folder {images} does not exist: pass --images with the folder "
            f"that holds your image files"
        )
    by_name, by_stem = _index_folder(images)
    paths = []
    missing = []
    for object_id, value in zip(frame["objectId"], frame["value"], strict=True):
        found = (
            by_name.get(object_id) or by_name.get(f"{value}/{object_id}") or by_stem.get(object_id)
        )
        paths.append(found)
        if found is None:
            missing.append(object_id)
    if missing:
        raise InputError(
            f"{len(missing)} of {len(frame)} label rows have no image file in "
            f"{images} (objectId {preview(missing)}); expected {images}/<objectId> "
            f"or {images}/<objectId>.jpg|.png|...: add the files or remove the rows"
        )
    return pd.Series(paths, index=frame.index, name="path", dtype=str)


def _index_folder(images: Path) -> tuple[dict[str, str], dict[str, str]]:
    """One walk of the folder: relative name -> path, and stem -> path for image files."""
    by_name: dict[str, str] = {}
    by_stem: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(images):
        rel_dir = os.path.relpath(dirpath, images)
        for name in files:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            by_name[rel] = full
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and rel_dir == ".":
                by_stem.setdefault(stem, full)
    return by_name, by_stem


def stamp(path: str | os.PathLike[str]) -> tuple[int, int]:
    """A file's ``(size, mtime_ns)``; ``(-1, -1)`` when it is missing or unreadable."""
    try:
        stat = os.stat(path)
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


def file_stamps(paths: Sequence[str]) -> pd.DataFrame:
    """``path, size, mtime_ns`` of each file (:func:`stamp`): what a resumed search compares
    with the files it started from (:func:`changed_files`)."""
    rows = [(str(path), *stamp(path)) for path in paths]
    return pd.DataFrame(rows, columns=["path", "size", "mtime_ns"])


def changed_files(before: pd.DataFrame, now: pd.DataFrame) -> list[str]:
    """The paths of ``before`` that are missing from ``now``, or whose size or modification
    time differ (two :func:`file_stamps` tables)."""
    merged = before.merge(now, on="path", how="left", suffixes=("", "_now"))
    moved = (merged["size"] != merged["size_now"]) | (merged["mtime_ns"] != merged["mtime_ns_now"])
    return merged.loc[moved, "path"].tolist()


def check_stamps(
    record: Path, paths: Sequence[str], split_stamps: pd.DataFrame | None = None
) -> pd.DataFrame | None:
    """A resumed search must read the files it started from (``record``, its files.csv),
    and a new one the files its split checked (``split_stamps``, the split's ``files.csv``
    when it wrote one): one line naming those changed or missing since (a sync client, a
    second copy job), before any work. Returns the stamps to record when this is the
    search's first run, else None."""
    now = file_stamps(list(paths))
    before = read_stamps(record)
    since = "this search started"
    if before is None:
        if split_stamps is None:
            return now
        before = split_stamps[split_stamps["path"].isin(now["path"])]
        since = "the split checked them"
    changed = changed_files(before, now)
    if changed:
        raise InputError(
            f"{len(changed)} image(s) changed or went missing since {since} "
            f"({preview(changed, 3)}): restore them, or start again with --overwrite or a new "
            f"--name (its split, caches and trials describe the files as they were)"
        )
    return None if since == "this search started" else now


def read_stamps(path: Path) -> pd.DataFrame | None:
    """A ``files.csv`` (path, size, mtime_ns) as a table, or None when there is none."""
    return pd.read_csv(path, dtype={"path": str}) if path.is_file() else None


def normalise(frame: pd.DataFrame, paths: pd.Series, classes: list[str]) -> pd.DataFrame:
    """The table every later stage reads: objectId, path, value, class_index (+ type)."""
    index_of = {name: i for i, name in enumerate(classes)}
    table = frame.copy()
    table["path"] = paths.to_numpy()
    table["class_index"] = table["value"].map(index_of).astype("int32")
    columns = ["objectId", "path", "value", "class_index"]
    return table[columns + (["type"] if "type" in table else [])]
