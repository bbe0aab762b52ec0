"""A trial's checkpoint holds what the trial trained, not the frozen backbone beneath it.

Keras Tuner saves a trial's whole model at its best epoch (``checkpoint.weights.h5``: 25-33
MB a trial for B0, about 250 MB for B7), although a frozen-stage trial trained only its head
(kilobytes) on a backbone whose weights are fixed. Here a checkpoint
(``keras_tuner/trial_<id>/checkpoint.trained.npz``) holds:

* the variables the trial trained: the head's (its standardisation included), and for a
  fine-tune the unfrozen top blocks' trainable ones; with random weights (``--weights none``:
  the whole network trains, BatchNorm statistics included) every variable;
* the SHA-1 of the values of every other variable (:func:`beneath`): the frozen weights the
  saved ones were trained on.

:func:`load` puts a checkpoint into a freshly built model of the same trial (which loads the
backbone's weights as the search did), after checking that the frozen weights are the same
ones; best epoch, resume, Hyperband and fine-tune continuations, export and refit all
assemble the whole model that way. A checkpoint written by Keras Tuner itself (a search from
before this format) is still read.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import keras
import numpy as np

from data_tools.atomic import atomic_path
from data_tools.errors import InputError
from tuner.model import features

FILE = "checkpoint.trained.npz"
LEGACY_FILE = "checkpoint.weights.h5"  # Keras Tuner's own: the whole model
FORMAT = 1


def saved_indices(model: keras.Model, whole: bool) -> list[int]:
    """Positions in ``model.weights`` of what a trial trains: all of them when ``whole``
    (random init), else the head's and every trainable variable (the unfrozen top blocks)."""
    weights = model.weights
    if whole or not _has(model, "head"):
        return list(range(len(weights)))
    chosen = {id(v) for v in model.get_layer("head").weights}
    chosen |= {id(v) for v in model.trainable_weights}
    return [i for i, v in enumerate(weights) if id(v) in chosen]


def beneath(model: keras.Model, indices: list[int]) -> str:
    """SHA-1 of the values of the variables of ``model`` not at ``indices``, in order: the
    frozen weights beneath a checkpoint (B0: 16 MB, about 0.02 s)."""
    kept = set(indices)
    return features.values_fingerprint(
        (str(i), variable) for i, variable in enumerate(model.weights) if i not in kept
    )


# The frozen weights never change during a fit: their fingerprint is taken once per model and
# set of saved variables, not at every best epoch.
_BENEATH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def save(model: keras.Model, path: str | Path, whole: bool) -> int:
    """Write the trained variables of ``model`` and the fingerprint of the rest to ``path``
    (temporary file, then rename); returns its size in bytes."""
    indices = saved_indices(model, whole)
    key = tuple(indices)
    known = _BENEATH.setdefault(model, {})
    if key not in known:
        known[key] = beneath(model, indices)
    weights = model.weights
    meta = {
        "format": FORMAT,
        "count": len(weights),
        "indices": indices,
        "paths": [weights[i].path for i in indices],
        "beneath": known[key],
    }
    arrays = {f"w{i}": keras.ops.convert_to_numpy(weights[i]) for i in indices}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, "checkpoint") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path.stat().st_size


def load(model: keras.Model, path: str | Path) -> None:
    """Assign a checkpoint's variables to ``model`` (built for the same trial). A Keras Tuner
    ``.h5`` checkpoint is loaded whole. Raises one line when the model is not the one the
    checkpoint was written for, or its frozen weights are other weights."""
    path = Path(path)
    if path.suffix == ".h5":
        model.load_weights(path)
        return
    with np.load(path) as data:
        meta = json.loads(bytes(data["meta"]))
        weights = model.weights
        if meta["count"] != len(weights):
            raise InputError(
                f"{path} holds a model of {meta['count']} variables, this one has "
                f"{len(weights)}: it was written for another trial or architecture"
            )
        if beneath(model, meta["indices"]) != meta["beneath"]:
            raise InputError(
                f"{path} was trained on other frozen weights than this model's: the backbone's "
                f"weights changed since the search (another --weights file or folder?); "
                f"use the weights the search used"
            )
        for i in meta["indices"]:
            value = data[f"w{i}"]
            if tuple(value.shape) != tuple(weights[i].shape):
                raise InputError(
                    f"{path}: variable {weights[i].path} is {tuple(weights[i].shape)} here "
                    f"but {tuple(value.shape)} in the checkpoint"
                )
            weights[i].assign(value)
    # A Normalization layer computes from its variables once (``finalize_state``), as
    # Keras' own loaders do after assigning them: without it the old statistics stay.
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Normalization) and layer.input_mean is None:
            layer.finalize_state()


def find(trial_dir: str | Path) -> Path | None:
    """A trial folder's checkpoint: ours, else Keras Tuner's whole-model one, else None."""
    for name in (FILE, LEGACY_FILE):
        candidate = Path(trial_dir) / name
        if candidate.is_file():
            return candidate
    return None


def _has(model: keras.Model, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)
