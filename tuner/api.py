"""The Python API: the commands' work from a notebook or a script.

    import tuner

    found = tuner.search("label.csv", images="images/", budget="20m", backbones=["B0", "B1"])
    found.trials                         # trials.csv as a DataFrame
    found.front                          # the accuracy/latency Pareto front
    model = found.export(rule="knee")    # results/<name>/best/, as python -m tuner.export_best
    model.predict(["photo.jpg"])         # label, probability and one column per class

Each call does what its command does, in the calling process, and prints the same lines;
the commands are thin wrappers over the same functions. Bad input raises
:class:`tuner.InputError` (a ``ValueError``) with the one-line message the command prints;
nothing here exits the interpreter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_tools.errors import InputError

PathLike = str | os.PathLike[str]

# What run_search's exit codes mean for a Search (0: it ended by its budget or its plan).
STATUS = {0: "finished", 1: "stopped", 130: "interrupted"}


def search(
    data: PathLike | None = None,
    images: PathLike | None = None,
    *,
    budget: str = "5m",
    space: PathLike | None = None,
    name: str | None = None,
    results: PathLike = "results",
    algorithm: str | None = None,
    weights: str = "imagenet",
    overwrite: bool = False,
    **settings: Any,
) -> Search:
    """Run, or resume, a search in this process; ``python -m tuner.search``'s work.

    Args:
        data: a split file (``objectId,value,type``), a ``label.csv`` (split first and saved
            with the results) or a folder with one sub-folder per class. None: the built-in
            demo digits.
        images: the image folder (default: ``images/`` beside ``data``).
        budget: the whole search's wall clock, across resumes: ``"20h"``, ``"90m"``,
            ``"1h30m"``.
        space: a shipped search space's name (``"default"``, ``"quick"``, ...) or a YAML
            file. None: ``default``, or ``quick`` for the demo, as the command.
        name: the results folder's name under ``results`` (default: from the data). The
            same name resumes: finished trials are kept and the budget counts what they took.
        results: the root of the results folders.
        algorithm: ``transfer`` (the space's default), ``hyperband``, ``bayesian`` or
            ``random``.
        weights: ``imagenet`` (Keras' cache), ``none``, or a folder of notop ``.h5`` files.
        overwrite: start the search ``name`` again.
        **settings: search-space keys, as ``--set`` on the command line:
            ``backbones=["B0", "B1"]``, ``epochs=5``, ``features="top"``, and the command's
            other options by their long names (``cache_dir="/fast/cache"``,
            ``cache_budget="40GB"``, ``test_range=(0, 24)``, ``wandb_mode="offline"``, ...).

    Returns:
        The :class:`Search` over its results folder, whatever stopped it (``status`` says:
        finished, interrupted by Ctrl-C, or stopped by a full disk or repeated failures).
    """
    from tuner import search as command
    from tuner.engine.session import run_search

    args = command.build_parser().parse_args([])
    options = {
        "data": None if data is None else str(data),
        "images": None if images is None else str(images),
        "budget": budget,
        "space": None if space is None else str(space),
        "name": name,
        "results": str(results),
        "algorithm": algorithm,
        "weights": weights,
        "overwrite": overwrite,
    }
    for key in [k for k in settings if k in vars(args) and k not in ("set", "gpus")]:
        value = settings.pop(key)
        options[key] = tuple(value) if key.endswith("_range") else value
    for switch in ("feature_cache", "tensorboard"):  # on/off options also take a bool
        if isinstance(options.get(switch), bool):
            options[switch] = "on" if options[switch] else "off"
    vars(args).update(options)
    request = command.resolve_request(args, overrides=settings)
    code = run_search(request)
    found = Search(Path(request.results) / request.name)
    found.status = STATUS.get(code, f"exit {code}")
    return found


def load(path: PathLike) -> Search:
    """The :class:`Search` of an existing results folder (``results/<name>``)."""
    folder = Path(path)
    if not (folder / "config.yaml").is_file():
        raise InputError(
            f"{folder} is not a search's results folder (no config.yaml): pass "
            f"results/NAME, a folder tuner.search or python -m tuner.search wrote"
        )
    return Search(folder)


class Search:
    """One search's results folder: its trials, its front, and export from it."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.status = "finished"  # set by tuner.search for the run it made

    def __repr__(self) -> str:
        done = self.trials["status"].isin(_finished()).sum()
        return f"Search({str(self.path)!r}: {done} finished trial(s))"

    @property
    def config(self) -> dict[str, Any]:
        """The resolved configuration (``config.yaml``)."""
        import yaml

        return yaml.safe_load((self.path / "config.yaml").read_text()) or {}

    @property
    def trials(self) -> pd.DataFrame:
        """``trials.csv``: one row a trial, every hyperparameter and measurement
        (``results/README.md`` describes the columns)."""
        from tuner.report.results import Results

        return Results(self.path).rows()

    @property
    def front(self) -> pd.DataFrame:
        """The finished trials on the accuracy/latency Pareto front, fastest first."""
        from tuner.report.results import pareto_flags

        table = self.trials
        front = table[pareto_flags(table)] if len(table) else table
        return front.sort_values("latency_ms").reset_index(drop=True)

    def export(self, rule: str | None = None, **options: Any) -> Model:
        """Choose by ``rule``, evaluate once on test, write ``best/``; ``python -m
        tuner.export_best``'s work. ``options`` are its options by their long names
        (``max_latency_ms=5``, ``min_accuracy=0.9``, ``within_se=0``, ``tflite=True``,
        ``quantize=True``, ``refit=True``, ``out="folder"``, ...). ``rule`` as the
        command's: ``knee`` by default, ``fastest`` with only ``min_accuracy``,
        ``max-accuracy`` with only ``max_latency_ms``."""
        from tuner import export_best
        from tuner.report import export as export_mod

        parser = export_best.build_parser()
        args = parser.parse_args(["--results", str(self.path)])
        unknown = sorted(set(options) - set(vars(args)))
        if unknown:
            raise InputError(
                f"Search.export: unknown option(s) {', '.join(unknown)}; valid options are "
                f"{', '.join(sorted(k for k in vars(args) if k != 'results'))}"
            )
        rules = next(a.choices for a in parser._actions if a.dest == "rule")
        if rule is not None and rule not in rules:
            raise InputError(f"Search.export: rule {rule!r} is not one of {', '.join(rules)}")
        vars(args).update(options)
        args.rule = rule or export_best.default_rule(args.min_accuracy, args.max_latency_ms)
        return Model(export_mod.export(args))


def _finished() -> tuple[str, ...]:
    from tuner.report.results import FINISHED

    return tuple(FINISHED)


class Model:
    """An exported model folder (``results/<name>/best``): its figures and predictions."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        labels = self.path / "labels.txt"
        if not (self.path / "saved_model").is_dir() or not labels.is_file():
            raise InputError(
                f"{self.path} is not an exported model (no saved_model/ or labels.txt): "
                f"export one first (Search.export or python -m tuner.export_best)"
            )
        self.classes: list[str] = labels.read_text().split("\n")[:-1]
        self._serve = None

    def __repr__(self) -> str:
        test = self.metrics.get("test", {}).get("accuracy")
        shown = f", test accuracy {test:.4f}" if isinstance(test, float) else ""
        return f"Model({str(self.path)!r}: {len(self.classes)} classes{shown})"

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: the trial, its test figures, latency, size and how it was made."""
        file = self.path / "metrics.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def predict(self, images: Any) -> pd.DataFrame:
        """Class probabilities, one row an image: ``label``, ``probability`` and one column
        per class (and ``path`` first for files). ``images``: an image file or a folder (its
        images, recursively), a list of them, a PIL image or a list of them, or a ``uint8``
        array ``[N, H, W, 3]`` (or one ``[H, W, 3]``). An unreadable file gets an empty
        label and NaN probabilities."""
        from tuner import predict as command

        if self._serve is None:
            self._serve, _ = command.load(self.path)
        arrays = _as_arrays(images)
        if arrays is not None:
            return command.predict_arrays(self._serve, self.classes, arrays)
        items = [images] if isinstance(images, str | os.PathLike) else list(images)
        files, _ = command.image_files([str(item) for item in items])
        return command.predict(self._serve, self.classes, files)


def _as_arrays(images: Any) -> list[np.ndarray] | None:
    """``images`` as uint8 ``[H, W, 3]`` arrays when they are pixels (an array, PIL
    images), None when they are paths."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise InputError(
                f"Model.predict: an array must be uint8 [N, H, W, 3] RGB; got "
                f"{images.dtype} {list(images.shape)} (convert with .astype('uint8'))"
            )
        return list(images)
    if isinstance(images, str | os.PathLike):
        return None
    items = list(images) if isinstance(images, Iterable) else [images]
    if items and all(_is_pil(item) for item in items):
        return [np.asarray(item.convert("RGB"), dtype=np.uint8) for item in items]
    return None


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(item, Image.Image)
