"""Progress of the long loops over images (backbone passes, decodes, the split's image check):
a rich bar with images/s and the time left, shown on a terminal once a loop has run for
:data:`SHOW_AFTER_S` seconds, and gone when it ends. Not on a terminal (a log file, CI, a
notebook's captured output) nothing is drawn: the search's own lines, one per trial and
epoch, say where it is.

    with progress.bar("features B0 224px train", total=len(paths)) as advance:
        for batch in batches:
            ...
            advance(len(batch))
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

SHOW_AFTER_S = 2.0
# Set by a search: a few words about its budget ("budget 12m of 20m spent, 8m left") shown
# beside every bar.
status: Callable[[], str] | None = None


@contextlib.contextmanager
def bar(description: str, total: int, unit: str = "images") -> Iterator[Callable[[int], None]]:
    """A callable that counts ``n`` more of ``total`` done; draws the bar as described above."""
    started = time.monotonic()
    state: dict = {"done": 0, "progress": None}  # progress: None (not yet), False (never)

    def advance(count: int) -> None:
        state["done"] += count
        elapsed = time.monotonic() - started
        if state["progress"] is None and elapsed >= SHOW_AFTER_S:
            state["progress"] = _start(description, total) or False
        if state["progress"]:
            progress, task = state["progress"]
            progress.update(
                task,
                completed=state["done"],
                rate=f"{state['done'] / elapsed:,.0f} {unit}/s",
                status=status() if status else "",
            )

    try:
        yield advance
    finally:
        if state["progress"]:
            state["progress"][0].stop()


def _start(description: str, total: int):
    """(a started rich Progress, its task), or None off a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stderr)
    if not console.is_terminal:
        return None
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
    )
    task = progress.add_task(description, total=total, rate="", status="")
    progress.start()
    return progress, task
