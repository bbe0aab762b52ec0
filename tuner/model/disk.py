"""The cache folder under a disk budget: planned at start, kept while the search runs.

A search caches backbone features (kilobytes an image), the activations at a fine-tune's cut
(tens of kilobytes) and, for end-to-end training only, decoded pixels (``3 * size**2`` bytes
an image: 150 KB at 224 px, 1 MB at 600 px; for the reference workload, 22,640 images at
B0-B7's eight sizes, about 85 GB). So:

* ``--cache-budget SIZE`` caps the cache folder (``--cache-dir``, default
  ``results/<name>/cache``); the default is :data:`DEFAULT_SHARE` of the free space on its
  disk at start, plus what the folder already holds (a resumed search keeps its caches);
* :func:`plan_lines` prints what the frozen stage will write and whether it fits, before any
  work; a budget that cannot hold even the first feature set's features is one line, exit 2;
* while the search runs, an entry that would not fit is planned around (a fine-tune trains
  end to end instead of on cached activations, pixels are decoded every epoch instead of
  cached; passes computed ahead are left for later), after evicting the least recently read
  entries (:meth:`Budget.admit`); the trial line and trials.csv's ``cache_notes`` say so.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from data_tools.errors import InputError

DEFAULT_SHARE = 0.5  # of the free space on the cache's disk at start
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``40GB``, ``500M``, ``1.5T``, ``2048`` (bytes) -> bytes (decimal units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise InputError(
            f"--cache-budget {text!r} is not a size: write it like 40GB, 500MB or 1.5TB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


@dataclass
class Budget:
    """The cache folder and the most it may hold."""

    folder: Path
    limit: int
    why: str = ""  # how the limit was set, for the plan

    def used(self) -> int:
        """Bytes the cache folder holds now (lock files aside)."""
        total = 0
        for root, _, files in os.walk(self.folder):
            for name in files:
                if not name.endswith(".lock"):
                    with contextlib.suppress(OSError):
                        total += os.stat(os.path.join(root, name)).st_size
        return total

    def room(self) -> int:
        """Bytes the folder may still take without evicting anything."""
        return self.limit - self.used()

    def admit(self, nbytes: int, keep: frozenset[Path] = frozenset()):
        """(whether ``nbytes`` more fit, the entries evicted to make room: (path, bytes)).
        Eviction takes the least recently read entries first (a hit touches its file), never
        those in ``keep`` nor one another process is building."""
        room = self.room()
        evicted: list[tuple[Path, int]] = []
        if nbytes <= room:
            return True, evicted
        for path in self._entries_by_last_use():
            if room >= nbytes:
                break
            if path in keep:
                continue
            with contextlib.suppress(Timeout, OSError), FileLock(f"{path}.lock", timeout=0):
                size = path.stat().st_size
                path.unlink()
                evicted.append((path, size))
                room += size
        return nbytes <= room, evicted

    def _entries_by_last_use(self) -> list[Path]:
        found = []
        for path in self.folder.rglob("*.npy"):
            with contextlib.suppress(OSError):
                found.append((path.stat().st_mtime, path))
        return [path for _, path in sorted(found)]


def open_budget(folder: str | os.PathLike[str], budget: str | None) -> Budget:
    """The budget of the cache ``folder``: ``budget`` (``40GB``), else
    :data:`DEFAULT_SHARE` of the free space on its disk plus what it holds. One line when the
    folder cannot be made or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(
            f"--cache-dir {folder} cannot be written ({error.strerror or error}): pick a "
            f"folder you can write, e.g. on a disk with room for the caches"
        ) from None
    made = Budget(folder, 0)
    if budget is not None:
        made.limit = parse_size(budget)
        made.why = "--cache-budget"
        return made
    free = shutil.disk_usage(folder).free
    held = made.used()
    made.limit = int(DEFAULT_SHARE * free) + held
    made.why = f"{DEFAULT_SHARE:.0%} of the {format_bytes(free)} free on its disk at start" + (
        f" + the {format_bytes(held)} it holds" if held else ""
    )
    return made


@dataclass(frozen=True)
class Entry:
    """One thing the plan expects to cache: what, how many bytes, and whether it must be."""

    what: str
    bytes: int
    required: bool


def plan_entries(sets: list[tuple[str, int, int]], rows: int) -> list[Entry]:
    """What a search's frozen stage will cache: each planned feature set's pooled features
    (``(backbone, size, features)``: float32, train + validation). The first is required:
    without it nothing trains."""
    return [
        Entry(f"features {backbone} {size}px", rows * dims * 4, position == 0)
        for position, (backbone, size, dims) in enumerate(sets)
    ]


def plan_lines(budget: Budget, entries: list[Entry]) -> tuple[list[str], set[str]]:
    """(the plan's lines, what fits): entries in order while they fit. Raises one line when
    the budget cannot hold the required entries."""
    held = budget.used()
    room = budget.limit - held
    required = sum(e.bytes for e in entries if e.required)
    if required > budget.limit:
        smallest = format_bytes(required + held if held else required)
        raise InputError(
            f"--cache-budget {format_bytes(budget.limit)} is too small: the first feature set "
            f"needs {format_bytes(required)} of features; the smallest workable budget is "
            f"{smallest} (or let it default to {DEFAULT_SHARE:.0%} of the free space)"
        )
    lines = [
        f"cache plan ({budget.folder}, budget {format_bytes(budget.limit)}"
        f"{': ' + budget.why if budget.why else ''}; {format_bytes(held)} held):"
    ]
    fits: set[str] = set()
    for entry in entries:
        ok = entry.bytes <= room
        if ok:
            room -= entry.bytes
            fits.add(entry.what)
        verdict = "fits" if ok else _instead(entry.what)
        lines.append(f"  {entry.what:<24} {format_bytes(entry.bytes):>9}  {verdict}")
    lines.append(
        "  activations at the fine-tune cuts: computed in the same pass as the features when "
        "they fit; at a fine-tune, cached when they fit (after evicting the least recently "
        "read entries), else it trains end to end"
    )
    lines.append(
        "  decoded pixels: never for a frozen pass (each file is decoded once and streamed); "
        "cached only for end-to-end training, when they fit, else decoded every epoch"
    )
    lines.append(
        "  checkpoints: what each trial trained (a frozen head: kilobytes), in keras_tuner/"
    )
    return lines, fits


def _instead(what: str) -> str:
    return "does not fit now: computed when its trials come, evicting older entries"


def pixel_bytes(rows: int, size: int) -> int:
    return rows * 3 * size * size
