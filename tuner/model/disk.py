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

Processes sharing the folder (``--gpus``, ``--worker``) share the budget: admission and
eviction run under one lock in the folder, and an admitted entry is *reserved* until it is
written: a sparse placeholder ``<entry>.reserved`` (no blocks on disk) that every process
counts, held by a lock of its own, so a crashed process's reservations stop counting. An
entry's age is its last *read* (:func:`mark_read`): checking whether it exists does not make
it younger.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from data_tools import atomic
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


def format_bytes(count: float, up: bool = False) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units); ``up``: rounded up at the shown precision,
    for a figure a user passes back (a budget of what is shown then holds ``count``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            if unit == "B":
                return f"{math.ceil(count) if up else count:.0f} {unit}"
            shown = math.ceil(round(count * 10, 6)) / 10 if up else count
            return f"{shown:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


# The .npy header of a cache entry (numpy's format 1.0 pads it to 128 bytes for our shapes).
NPY_HEADER_BYTES = 128
RESERVED = ".reserved"  # a reservation's placeholder: ``<entry>.reserved``


def entry_bytes(rows: int, values: int, itemsize: int = 4) -> int:
    """Bytes on disk of a cached array of ``rows`` x ``values`` (float32 by default), its
    .npy header included."""
    return rows * values * itemsize + NPY_HEADER_BYTES


def mark_read(path: Path) -> None:
    """Record that a cache entry was read now: what eviction orders by (least recently read
    first). Checks for an entry's existence do not call it."""
    with contextlib.suppress(OSError):
        os.utime(path)


@dataclass
class Budget:
    """The cache folder and the most it may hold."""

    folder: Path
    limit: int
    why: str = ""  # how the limit was set, for the plan
    # This process's reservations: placeholder -> the lock that keeps it counted.
    _held: dict[Path, FileLock] = field(default_factory=dict, repr=False)

    def used(self) -> int:
        """Bytes the cache folder holds now: its entries and files, and the entries reserved
        by live processes that are not written yet (locks aside; a reservation's temporary
        file is counted once, as the reservation)."""
        total = 0
        for root, _, files in os.walk(self.folder):
            names = set(files)
            live = {
                name[: -len(RESERVED)]
                for name in names
                if name.endswith(RESERVED) and self._live(Path(root, name), names)
            }
            for name in names:
                if name.endswith(".lock") or (
                    name.endswith(RESERVED) and name[: -len(RESERVED)] not in live
                ):
                    continue
                if atomic.temp_target(name) in live:
                    continue
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, name)).st_size
        return total

    def room(self) -> int:
        """Bytes the folder may still take without evicting anything."""
        return self.limit - self.used()

    def admit(
        self, nbytes: int, keep: frozenset[Path] = frozenset(), reserve: Path | None = None
    ) -> tuple[bool, list[tuple[Path, int]]]:
        """(whether ``nbytes`` more fit, the entries evicted to make room: (path, bytes)).
        Eviction takes the least recently read entries first, never those in ``keep`` nor
        one another process is building. Under the folder's lock, so processes sharing it
        admit one at a time; ``reserve``: the entry the bytes are for, reserved until
        :meth:`release` (every process counts it meanwhile)."""
        with self._lock():
            room = self.room()
            evicted: list[tuple[Path, int]] = []
            for path in self._entries_by_last_use() if nbytes > room else []:
                if room >= nbytes:
                    break
                if path in keep:
                    continue
                with contextlib.suppress(Timeout, OSError), FileLock(f"{path}.lock", timeout=0):
                    size = path.stat().st_size
                    path.unlink()
                    evicted.append((path, size))
                    room += size
            fits = nbytes <= room
            if fits and reserve is not None:
                self._reserve(reserve, nbytes)
            return fits, evicted

    def claim(self, entries: dict[Path, int]) -> bool:
        """Reserve ``entries`` ({entry: bytes}) when all of them fit without evicting
        anything (what a pass computed ahead of its trials may take)."""
        with self._lock():
            if sum(entries.values()) > self.room():
                return False
            for entry, nbytes in entries.items():
                self._reserve(entry, nbytes)
            return True

    def release(self, entries: list[Path] | None = None) -> None:
        """Drop this process's reservations of ``entries`` (all of them when None): written
        entries count as themselves, unwritten ones no more."""
        for entry in list(self._held) if entries is None else [_placeholder(e) for e in entries]:
            lock = self._held.pop(entry, None)
            if lock is not None:
                Path(entry).unlink(missing_ok=True)
                lock.release()
                Path(lock.lock_file).unlink(missing_ok=True)

    def _reserve(self, entry: Path, nbytes: int) -> None:
        placeholder = _placeholder(entry)
        self.release([entry])
        lock = FileLock(f"{placeholder}.lock", thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return  # another process reserved the same entry (its build): counted already
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        with open(placeholder, "wb") as out:
            out.truncate(nbytes)  # sparse: counted by its size, no blocks written
        self._held[placeholder] = lock

    def _live(self, placeholder: Path, siblings: set[str]) -> bool:
        """Whether a reservation still counts: its entry is not written yet and the process
        that made it holds its lock (one that died frees it: the placeholder is removed)."""
        if placeholder.name[: -len(RESERVED)] in siblings:
            return False  # written: the entry counts as itself
        if placeholder in self._held:
            return True
        try:
            with FileLock(f"{placeholder}.lock", timeout=0):
                placeholder.unlink(missing_ok=True)  # its process is gone
            return False
        except Timeout:
            return True

    def _lock(self) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.folder / "budget.lock"), thread_local=False)

    def _entries_by_last_use(self) -> list[Path]:
        found = []
        for path in self.folder.rglob("*.npy"):
            with contextlib.suppress(OSError):
                found.append((path.stat().st_mtime, path))
        return [path for _, path in sorted(found)]


def _placeholder(entry: Path) -> Path:
    entry = Path(entry)
    return entry if entry.name.endswith(RESERVED) else entry.with_name(entry.name + RESERVED)


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


def plan_entries(sets: list[tuple[str, int, str, int]], splits: list[int]) -> list[Entry]:
    """What a search's frozen stage will cache: each planned feature set's features
    (``(backbone, size, kind, values an image)``, ``kind`` ``top`` or ``stages``: float32,
    one file for each split of ``splits`` rows), as written, headers included. The first is
    required: without it nothing trains."""
    return [
        Entry(
            f"features {backbone} {size}px {kind}",
            sum(entry_bytes(rows, values) for rows in splits),
            position == 0,
        )
        for position, (backbone, size, kind, values) in enumerate(sets)
    ]


def plan_lines(budget: Budget, entries: list[Entry]) -> tuple[list[str], set[str]]:
    """(the plan's lines, what fits): entries in order while they fit. Raises one line when
    the budget cannot hold the required entries; the smallest workable budget it names is
    rounded up, so passing it back holds them."""
    held = budget.used()
    room = budget.limit - held
    required = [e for e in entries if e.required]
    needed = sum(e.bytes for e in required)
    if needed > budget.limit:
        every = sum(e.bytes for e in entries) + held
        whole = (
            f"; {format_bytes(every, up=True)} holds every planned feature set"
            if len(entries) > len(required)
            else ""
        )
        raise InputError(
            f"--cache-budget {format_bytes(budget.limit)} is too small: the first feature set "
            f"({required[0].what.removeprefix('features ')}) needs "
            f"{format_bytes(needed, up=True)} of features; the smallest workable budget is "
            f"{format_bytes(needed + held, up=True)}"
            f"{whole} (or let it default to {DEFAULT_SHARE:.0%} of the free space)"
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
        lines.append(f"  {entry.what:<28} {format_bytes(entry.bytes):>9}  {verdict}")
    lines.append(
        "  activations at the fine-tune cuts: computed in the same pass as the features when "
        "they fit; at a fine-tune, cached when they fit (after evicting the least recently "
        "read entries), else it trains end to end"
    )
    lines.append(
        "  decoded pixels: never for a frozen pass (each file is decoded once and streamed); "
        "cached only for end-to-end training, when they fit, else decoded every epoch"
    )
    return lines, fits


def _instead(what: str) -> str:
    return "does not fit now: computed when its trials come, evicting older entries"


def pixel_bytes(rows: int, size: int) -> int:
    return rows * 3 * size * size
