"""What every command shares: its parser (name, help text, defaults shown, ``--verbose``) and
TensorFlow's C++ log, silenced unless ``--verbose``.

A command is ``python -m <module>`` or ``effnet-tuner <name>`` (:mod:`tuner.cli`); both run the
same ``main``, and its parser names it the way it was called.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
from collections.abc import Sequence

# Set by effnet-tuner: the name each module's command goes by (e.g. "effnet-tuner search").
console_names: dict[str, str] = {}


def prog(module: str) -> str:
    """``python -m tuner.search``, or ``effnet-tuner search`` when run by the console command."""
    return console_names.get(module, f"python -m {module}")


def plain(text: str | None) -> str:
    """A docstring as help text: reStructuredText roles and literals as plain text."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text or "")
    return re.sub(r"``([^`]+)``", r"\1", text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; every option's default in its help (when it has one and
    the help does not give it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = "default" in text or default in (None, False, [], argparse.SUPPRESS)
        if shown or not action.option_strings:
            return text
        if isinstance(default, tuple) and len(default) == 2:  # a LOW-HIGH range
            default = f"{default[0]}-{default[1]}"
        return f"{text} (default: {default})"


def parser(module: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """A command's parser: named for how it was run, its module docstring as the
    description, defaults shown, and ``--verbose``."""
    made = argparse.ArgumentParser(
        prog=prog(module), description=plain(doc), formatter_class=HelpFormatter, **kwargs
    )
    made.add_argument(
        "--verbose",
        action="store_true",
        help="show TensorFlow's own log (hidden by default)",
    )
    return made


def quiet_tensorflow(argv: Sequence[str]) -> None:
    """Unless ``--verbose`` is in ``argv``: TensorFlow's C++ log (oneDNN, CUDA probing, CPU
    features) is hidden, from its import on. Call before TensorFlow is imported."""
    if "--verbose" in argv or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


class _QuietImport(importlib.abc.MetaPathFinder):
    """Imports ``tensorflow`` with the process's stderr (file descriptor 2) sent to
    /dev/null: its C++ side logs there while loading, before any log level applies."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: find the real spec, then wrap its loader
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _stderr_to_devnull():
            self.loader.exec_module(module)

    def __getattr__(self, name: str):  # is_package, get_code, ... of the real loader
        return getattr(self.loader, name)


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
