"""A search as TensorBoard shows it, Keras Tuner's convention: ``results/<name>/tensorboard/``
holds one run per finished trial, ``trial_<id>/``, with

* an HParams session: the trial's hyperparameters (those it used; a value that did nothing,
  ``-`` in trials.csv, is left out) and its final figures as scalars at step 0
  (:data:`METRICS`: validation accuracy and loss, latency, training seconds, model size);
* its epoch curves as scalars, ``epoch_<metric>`` at each epoch (``epoch_val_accuracy``, ...).

    tensorboard --logdir results/<name>/tensorboard

then shows the HParams dashboard's table, parallel coordinates and scatter plots, and the
curves. A run is written when its trial is recorded (by whichever process ran it, a
distributed worker's included), into a temporary folder renamed into place, replacing an
older run of the same trial: a resumed search adds its new trials and doubles none.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HPARAMS = (
    "backbone",
    "image_size",
    "features",
    "head_width",
    "dropout",
    "learning_rate",
    "l2",
    "finetune_fraction",
    "finetune_lr_factor",
    "class_weight",
    "augment",
    "augment_views",
    "stage",
    "solver",
)
METRICS = (
    "val_accuracy",
    "val_loss",
    "latency_ms",
    "train_seconds",
    "model_bytes",
    "params",
)
FOLDER = "tensorboard"


def run_dir(results: Path, trial_id: str) -> Path:
    return Path(results) / FOLDER / f"trial_{trial_id}"


def write_trial(
    results: Path, row: Mapping[str, Any], history: Mapping[str, Sequence[float]]
) -> Path:
    """Write (or replace) the run of the trial in ``row`` (trials.csv's record), with the
    epoch curves of ``history`` (Keras' ``History.history``); returns its folder."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp_api

    target = run_dir(results, str(row["trial_id"]))
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = tf.summary.create_file_writer(str(tmp))
    with writer.as_default():
        hp_api.hparams(hparams(row), trial_id=str(row["trial_id"]))
        for name in METRICS:
            value = _number(row.get(name))
            if value is not None:
                tf.summary.scalar(name, value, step=0)
        for name, values in history.items():
            for epoch, value in enumerate(values):
                number = _number(value)
                if number is not None:
                    tf.summary.scalar(f"epoch_{name}", number, step=epoch)
    writer.close()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def hparams(row: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The hyperparameters a trial used, as HParams values (unused ones left out)."""
    values: dict[str, bool | int | float | str] = {}
    for name in HPARAMS:
        value = row.get(name)
        if value is None or value == "-" or (isinstance(value, float) and math.isnan(value)):
            continue
        values[name] = value.item() if hasattr(value, "item") else value
        if not isinstance(values[name], bool | int | float | str):
            values[name] = str(values[name])
    return values


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number
