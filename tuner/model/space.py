"""Search-space files: read, check, override, freeze; then declare the hyperparameters.

A search-space file is YAML. Every key is optional (defaults below); an unknown key, or a bad
value, fails with one line that lists what is valid. A tunable value is written as

* a scalar: fixed (``epochs: 10``),
* a list: one of these choices (``head_width: [0, 256, 1024]``),
* a mapping ``{min, max}`` with optional ``step`` or ``log: true``: a range.

Configuration flows one way: file -> ``--set key=value`` overrides -> one frozen
:class:`SearchSpace` -> explicit arguments. ``SearchSpace.as_dict()`` is what is written to
``results/<name>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras_tuner as kt
import yaml

from data_tools.errors import InputError
from tuner.model import augment as augment_mod
from tuner.model import backbones

ALGORITHMS = ("transfer", "hyperband", "bayesian", "random")
CLASS_WEIGHTS = ("none", "balanced")
# What a head sees: "top", the backbone's pooled features; "stages", the pooled outputs of
# its top stages' last blocks as well (tuner/model/backbones.py: with_stages). A head on
# stage features is never fine-tuned (its fine-tune would need the activations below the cut).
FEATURES = ("top", "stages")
# Keys that are hyperparameters (tunable) and the bounds a value must respect.
TUNABLE_BOUNDS: dict[str, tuple[float, float]] = {
    "head_width": (0, 65536),
    "dropout": (0.0, 0.99),
    "learning_rate": (1e-8, 1.0),
    "finetune_fraction": (0.0, 1.0),
    "finetune_lr_factor": (1e-6, 1.0),
    "l2": (0.0, 10.0),
}


@dataclass(frozen=True)
class SearchSpace:
    """A resolved, checked search space. Field comments give the meaning and the default."""

    backbones: tuple[str, ...] = ("B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7")
    image_size: Any = "native"  # "native" (from the backbone table), an int, or a list of ints
    # The backbone pass (features, activations, latency): "native" is the table's batch for
    # an 8 GB card, scaled to the GPU's free memory (64 at most on a CPU), or an int.
    batch_size: Any = "native"
    # Head and fine-tune training: "auto" sizes it for the data (the largest power of two
    # that still gives >= 30 optimizer steps an epoch, at most the pass batch), or ints.
    train_batch_size: Any = "auto"
    head_width: Any = (0, 128, 256, 512, 1024)  # 0 = a linear head on the pooled features
    dropout: Any = field(default_factory=lambda: {"min": 0.0, "max": 0.5, "step": 0.1})
    learning_rate: Any = field(default_factory=lambda: {"min": 1e-5, "max": 1e-2, "log": True})
    # L2 penalty on the head's weights, per example (a linear head on cached features is
    # fitted exactly, by Newton-CG, for each value).
    l2: Any = field(default_factory=lambda: {"min": 1e-5, "max": 1e-1, "log": True})
    finetune_fraction: Any = (0.0, 0.2, 0.5)  # top fraction of blocks unfrozen; 0 = frozen
    finetune_lr_factor: Any = 0.1  # phase-2 learning rate = learning_rate * this
    finetune_epochs: int = 0  # epochs of phase 2 (0: half of epochs) when fine-tuning
    class_weight: Any = ("none", "balanced")
    # "top" (the pooled features), "stages" (the top stages' pooled outputs too: frozen heads
    # only), or both, searched as their own feature sets.
    features: Any = ("top", "stages")
    # Augmentation of the train split (tuner/model/augment.py): "none", or policies such as
    # "flip+zoom:0.1"; a list is searched like any choice. A frozen trial trains on cached
    # features of `augment_views` views of each image (view 0 un-augmented), one drawn per
    # image and epoch.
    augment: Any = "none"
    augment_views: Any = 4
    epochs: int = 10  # per trial; for `transfer`, the longest fine-tune (the top rung)
    algorithm: str = "transfer"
    # transfer: head trials per (backbone, size) in the frozen stage, the epoch cap and
    # early-stopping patience of a head trained by Adam, and the share of the budget the
    # frozen stage may take before fine-tuning (it gives back what it does not use).
    head_trials: int = 12
    head_epochs: int = 200
    patience: int = 10
    frozen_share: float = 0.5
    hyperband_factor: int = 3  # also the successive-halving factor of `transfer`
    hyperband_iterations: int = 0  # 0: Hyperband's brackets again until the budget is spent
    max_trials: int = 500  # the budget usually ends the search first
    max_consecutive_failures: int = 5
    min_batch_size: int = 8  # out-of-memory retries halve the batch down to this
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for YAML and W&B."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


FIELDS = [f.name for f in dataclasses.fields(SearchSpace)]


def load(
    path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None
) -> SearchSpace:
    """Read ``path`` (or the defaults when None), apply overrides, check, freeze."""
    values: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        values = _read_yaml(resolve(path))
    values.update(overrides or {})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise InputError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(FIELDS)}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if "augment" in values:
        values["augment"] = _canonical_policies(values["augment"], where)
    space = SearchSpace(**values)
    check(space, where)
    return space


def _canonical_policies(value: Any, where: str) -> Any:
    """Every augmentation policy with its strengths written out (one spelling per policy)."""
    try:
        policies = [augment_mod.canonical(str(p)) for p in as_list(value)]
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    if not policies:
        raise InputError(f"{where}: augment is empty; write none or a list of policies")
    return tuple(policies) if isinstance(value, tuple | list) else policies[0]


def shipped(name: str = "") -> Path:
    """The folder of the search spaces that ship with the package (``search_spaces/`` in a
    checkout, ``tuner.search_spaces`` once installed), or one file in it."""
    from importlib import resources

    try:
        folder = Path(str(resources.files("tuner.search_spaces")))
    except ModuleNotFoundError:  # a checkout on PYTHONPATH, not installed
        folder = Path(__file__).resolve().parents[2] / "search_spaces"
    return folder / name if name else folder


def names() -> list[str]:
    """The shipped search spaces' names (``default``, ``quick``, ...)."""
    return sorted(p.stem for p in shipped().glob("*.yaml"))


def resolve(space: str | os.PathLike[str]) -> Path:
    """A search-space file from a shipped space's name (``default``, ``quick``) or a path."""
    text = str(space)
    if text in names():
        return shipped(f"{text}.yaml")
    return Path(space)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(
            f"search-space file {path} does not exist: pass one of the shipped spaces "
            f"({', '.join(names())}) or a YAML file (copy one from {shipped()})"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise InputError(
            f"search-space file {path} is not valid YAML{line}: fix the syntax"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"search-space file {path} must be a mapping of key: value lines")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=3", "backbones=[B0,B1]"]`` -> ``{"epochs": 3, "backbones": ["B0", "B1"]}``
    (values are read as YAML)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item}: write --set key=value, e.g. --set epochs=3")
        out[key.strip()] = yaml.safe_load(text)
    return out


def check(space: SearchSpace, where: str) -> None:
    """Every value in range and of the right kind, or one line saying what is valid."""
    _canonical_policies(space.augment, where)
    for views in as_list(space.augment_views):
        if not isinstance(views, int) or isinstance(views, bool) or not 2 <= views <= 32:
            raise InputError(
                f"{where}: augment_views must be a whole number from 2 to 32 (view 0 is the "
                f"image itself) or a list of them, got {space.augment_views!r}"
            )
    if not space.backbones:
        raise InputError(
            f"{where}: backbones is empty; list at least one of {', '.join(backbones.BACKBONES)}"
        )
    for name in space.backbones:
        try:
            backbones.get(str(name))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
    _check_choice(space.algorithm, ALGORITHMS, "algorithm", where)
    for choice in as_list(space.class_weight):
        _check_choice(choice, CLASS_WEIGHTS, "class_weight", where)
    for choice in as_list(space.features):
        _check_choice(choice, FEATURES, "features", where)
    for key, (low, high) in TUNABLE_BOUNDS.items():
        _check_tunable(getattr(space, key), key, low, high, where)
    _check_size("image_size", space.image_size, where)
    _check_size("batch_size", space.batch_size, where)
    _check_size("train_batch_size", space.train_batch_size, where, word="auto")
    if not isinstance(space.frozen_share, int | float) or not 0 < space.frozen_share <= 1:
        raise InputError(
            f"{where}: frozen_share must be a number above 0 and at most 1, got "
            f"{space.frozen_share!r}"
        )
    positive = [
        "epochs",
        "head_trials",
        "head_epochs",
        "patience",
        "hyperband_factor",
        "max_trials",
        "max_consecutive_failures",
        "min_batch_size",
    ]
    for key in positive:
        value = getattr(space, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{where}: {key} must be a whole number >= 1, got {value!r}")
    iterations = space.hyperband_iterations
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise InputError(
            f"{where}: hyperband_iterations must be a whole number >= 0 (0: until the budget "
            f"is spent), got {iterations!r}"
        )
    if space.hyperband_factor < 2:
        raise InputError(f"{where}: hyperband_factor must be >= 2, got {space.hyperband_factor}")
    if not isinstance(space.finetune_epochs, int) or not 0 <= space.finetune_epochs < space.epochs:
        raise InputError(
            f"{where}: finetune_epochs must be 0 (half of epochs) or a whole "
            f"number below epochs ({space.epochs}), got {space.finetune_epochs!r}"
        )


def as_list(value: Any) -> list[Any]:
    """A space value's choices: a list or tuple as a list, one value as a list of it."""
    return list(value) if isinstance(value, tuple | list) else [value]


def _check_choice(value: Any, valid: tuple[str, ...], key: str, where: str) -> None:
    if value not in valid:
        raise InputError(
            f"{where}: {key} '{value}' is not valid; valid values are {', '.join(valid)}"
        )


def _check_size(key: str, value: Any, where: str, word: str = "native") -> None:
    for item in as_list(value):
        if item == word:
            continue
        if not isinstance(item, int) or isinstance(item, bool) or item < 1:
            raise InputError(
                f"{where}: {key} must be '{word}', a whole number >= 1 or a list "
                f"of them, got {value!r}"
            )


def _check_tunable(value: Any, key: str, low: float, high: float, where: str) -> None:
    if isinstance(value, dict):
        extra = sorted(set(value) - {"min", "max", "step", "log"})
        if extra or "min" not in value or "max" not in value:
            raise InputError(
                f"{where}: {key} as a range needs min and max (and optionally "
                f"step or log), got {value!r}"
            )
        numbers = [value["min"], value["max"]]
        if value["min"] > value["max"]:
            raise InputError(
                f"{where}: {key} has min {value['min']} > max {value['max']}; swap them"
            )
        if value.get("log") and value["min"] <= 0:
            raise InputError(f"{where}: {key} with log: true needs min > 0, got {value['min']}")
    else:
        numbers = as_list(value)
    for number in numbers:
        if (
            not isinstance(number, int | float)
            or isinstance(number, bool)
            or not low <= number <= high
            or math.isnan(number)
        ):
            raise InputError(
                f"{where}: {key} value {number!r} is out of range; it must be a "
                f"number from {low} to {high}"
            )


def declare(hp: kt.HyperParameters, space: SearchSpace) -> dict[str, Any]:
    """Declare every hyperparameter of ``space`` on ``hp``; return this trial's values."""
    values = {
        "backbone": _declare(hp, "backbone", list(space.backbones)),
        "head_width": _declare(hp, "head_width", space.head_width),
        "dropout": _declare(hp, "dropout", space.dropout),
        "learning_rate": _declare(hp, "learning_rate", space.learning_rate),
        "finetune_fraction": _declare(hp, "finetune_fraction", space.finetune_fraction),
        "finetune_lr_factor": _declare(hp, "finetune_lr_factor", space.finetune_lr_factor),
        "class_weight": _declare(hp, "class_weight", space.class_weight),
        "l2": _declare(hp, "l2", space.l2),
        "augment": _declare(hp, "augment", space.augment),
        "features": _declare(hp, "features", space.features),
    }
    if any(augment_mod.is_on(p) for p in as_list(space.augment)):
        values["augment_views"] = _declare(hp, "augment_views", space.augment_views)
    if len(as_list(space.train_batch_size)) > 1 or space.train_batch_size != "auto":
        values["train_batch_size"] = _declare(
            hp, "train_batch_size", [str(s) for s in as_list(space.train_batch_size)]
        )
    sizes = [s for s in as_list(space.image_size) if s != "native"]
    if len(as_list(space.image_size)) > 1 or sizes:
        # Choices must share one type: "native" and 64 both become text.
        values["image_size"] = _declare(
            hp, "image_size", [str(s) for s in as_list(space.image_size)]
        )
    return values


def _declare(hp: kt.HyperParameters, name: str, spec: Any) -> Any:
    if isinstance(spec, dict):
        if isinstance(spec["min"], int) and isinstance(spec["max"], int) and not spec.get("log"):
            return hp.Int(name, spec["min"], spec["max"], step=spec.get("step", 1))
        sampling = "log" if spec.get("log") else "linear"
        return hp.Float(
            name, float(spec["min"]), float(spec["max"]), step=spec.get("step"), sampling=sampling
        )
    if isinstance(spec, tuple | list):
        choices = list(dict.fromkeys(spec))
        return hp.Choice(name, choices) if len(choices) > 1 else hp.Fixed(name, choices[0])
    return hp.Fixed(name, spec)
