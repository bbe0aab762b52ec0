"""Wall-clock budget arithmetic: parse ``20h`` / ``1h30m``, estimate trials, keep the ledger.

The budget is the whole search's wall clock, counted across resumes: each invocation adds
the time it ran to ``results/<name>/budget.json``. A trial is not started when the estimate
from earlier finished trials of the same backbone and image size says it cannot finish; a
running trial stops at the first epoch boundary past the deadline.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from data_tools.atomic import write_text
from data_tools.errors import InputError

_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_budget(text: str) -> float:
    """``'20h'`` -> 72000.0 seconds; also ``90m``, ``45s``, ``1h30m``, ``1.5h``."""
    cleaned = text.strip().lower().replace(" ", "")
    parts = _PART.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise InputError(f"--budget '{text}' is not a duration: write e.g. 20h, 90m, 45s or 1h30m")
    seconds = sum(float(number) * _UNIT[unit] for number, unit in parts)
    if seconds <= 0:
        raise InputError(f"--budget '{text}' must be longer than zero")
    return seconds


def estimate_seconds(
    history: Iterable[tuple[float, int]], epochs: int, margin: float = 1.1
) -> float | None:
    """Seconds a trial of ``epochs`` epochs should take, from earlier trials' (seconds, epochs)
    of the same backbone and size; None when there are none to go by."""
    per_epoch = [seconds / count for seconds, count in history if count > 0]
    if not per_epoch:
        return None
    return statistics.median(per_epoch) * epochs * margin


def can_start(estimate: float | None, remaining: float) -> bool:
    """A trial starts when time is left and the estimate (if any) fits in it."""
    return remaining > 0 and (estimate is None or estimate <= remaining)


@dataclass
class Ledger:
    """Time spent by earlier invocations of this search, and the clock of this one.

    The single process or the chief of a distributed search owns the ledger: it counts the
    time and writes ``budget.json``, including the wall-clock deadline. Workers
    (:meth:`follow`) only read that deadline, so several workers never add their hours up.
    """

    path: Path
    budget_s: float
    spent_before_s: float = 0.0
    started: float = 0.0

    @classmethod
    def open(cls, path: str | os.PathLike[str], budget_s: float) -> Ledger:
        path = Path(path)
        spent = 0.0
        if path.is_file():
            spent = float(json.loads(path.read_text()).get("spent_s", 0.0))
        return cls(path, budget_s, spent, time.monotonic())

    @staticmethod
    def follow(path: str | os.PathLike[str], budget_s: float) -> Ledger:
        """A worker's view of the chief's ledger (see :class:`DeadlineFollower`)."""
        return DeadlineFollower(Path(path), budget_s)

    def spent(self) -> float:
        return self.spent_before_s + (time.monotonic() - self.started)

    def remaining(self) -> float:
        return self.budget_s - self.spent()

    def save(self) -> None:
        """Write the time spent so far and the deadline (atomically), so a resume counts
        the time and workers know when to stop."""
        state = {
            "spent_s": round(self.spent(), 3),
            "budget_s": self.budget_s,
            "deadline_unix": time.time() + self.remaining(),
        }
        write_text(self.path, json.dumps(state) + "\n")


class DeadlineFollower(Ledger):
    """A worker's ledger: the deadline the chief wrote to ``path``, read when asked (so a
    worker started before its chief sees the chief's deadline once trials arrive); it
    writes nothing."""

    def spent(self) -> float:
        return self.budget_s - self.remaining()

    def remaining(self) -> float:
        try:
            deadline = float(json.loads(self.path.read_text())["deadline_unix"])
        except (OSError, ValueError, KeyError):
            return self.budget_s  # no chief yet: it decides when trials start
        return deadline - time.time()

    def save(self) -> None:
        pass
