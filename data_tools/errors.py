"""User-facing failures: one line that names the problem and the fix, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_INPUT_ERROR = 2


class InputError(ValueError):
    """A mistake in what the user gave us (a file, a folder, an option).

    The message is the whole story for the user: what is wrong, where, and how to fix it.
    CLIs print it as one line and exit with code 2; it is never shown as a traceback. The
    Python API (``tuner.search``, ``tuner.load``, ``tuner.Model``) raises it as it is
    (``tuner.InputError``, a ``ValueError``).
    """


class FilesChanged(InputError):
    """Images the search started from changed or went missing while it ran (a sync client,
    a second copy job): what was trained on and what would be read now differ, so the run
    stops with one line naming them, and resumes once they are restored."""


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; turn an :class:`InputError` into one line on stderr and exit code 2.
    TensorFlow's C++ log stays hidden unless ``--verbose`` is given (:mod:`data_tools.cli`)."""
    from data_tools.cli import quiet_tensorflow

    quiet_tensorflow(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except InputError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message was built from
        print(f"error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR


def preview(items: Sequence[object], limit: int = 5) -> str:
    """``'a, b, c'`` or ``'a, b, c, ... (12 in all)'``: a short list for an error line."""
    shown = ", ".join(str(item) for item in list(items)[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"
