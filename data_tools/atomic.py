"""Write-then-rename, so a crash, a full disk or Ctrl-C never leaves a half-written file.

A temporary file is named ``.<target>.<host>.<pid>.<random>.tmp`` beside its target, so
what a killed process left behind can be told from what a live one is writing:
:func:`sweep` removes the former. Every write names its moment (``point``: checkpoint,
cache, trials, export, ...), where a chaos run (``python -m tuner.bench_chaos``) can kill
the process on purpose: see :func:`kill_point`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

# "<point>" or "<point>:<n>": SIGKILL this process the n-th time (default 1) it reaches that
# moment. Set by the chaos benchmark only.
KILL_AT = "EFFNET_TUNER_KILL_AT"
_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
_reached: dict[str, int] = {}


def _host() -> str:
    return socket.gethostname().replace(".", "-") or "host"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], point: str = "write") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    The temporary file or folder is in the same directory so the final ``os.replace`` is
    atomic. On any exception it is removed and ``target`` is left as it was. ``point``
    names the moment for :func:`kill_point`: ``<point>`` just before the rename (the
    temporary file whole), ``<point>.renamed`` just after it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{_host()}.{os.getpid()}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates a file or a folder there
    try:
        yield tmp
        kill_point(point)
        if target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
        kill_point(f"{point}.renamed")
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike[str], text: str, point: str = "write") -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target, point) as tmp:
        tmp.write_text(text)


def kill_point(point: str) -> None:
    """SIGKILL this process when ``$EFFNET_TUNER_KILL_AT`` names ``point`` and this is the
    n-th time it is reached (``point:n``; n defaults to 1). Nothing happens otherwise."""
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def temp_target(name: str) -> str | None:
    """The target's name when ``name`` is a temporary file of :func:`atomic_path`, else None."""
    found = _TEMP.match(name)
    return found.group("target") if found else None


def is_stale(name: str) -> bool:
    """Whether ``name`` is a temporary file whose writer, a process on this machine, is gone
    (killed before its rename). A live writer's, or another machine's, is not."""
    found = _TEMP.match(name)
    if not found or found.group("host") != _host():
        return False
    try:
        os.kill(int(found.group("pid")), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def sweep(folder: str | os.PathLike[str]) -> int:
    """Remove the temporary files and folders that killed processes left under ``folder``
    (:func:`is_stale`); returns how many. Safe beside live writers."""
    removed = 0
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            if is_stale(name):
                path = Path(root, name)
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    removed += 1
        dirs[:] = [d for d in dirs if not is_stale(d)]
    return removed
