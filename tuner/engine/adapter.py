"""Every use of Keras Tuner's internals, behind one door.

Keras Tuner has no public hooks for what the search needs around a trial, so the search
overrides or calls these private parts, and nothing outside this module touches them (the
layout test holds that):

* :class:`TunerHooks`: the private methods of ``kt.Tuner`` the trial runner overrides
  (``_build_and_fit_model``, ``_build_hypermodel``, ``_get_checkpoint_fname``,
  ``_try_run_and_update_trial``) or calls (``_try_build``), each forwarded to a public method
  of ours;
* :class:`SaveTrained`: Keras Tuner's best-epoch checkpoint callback
  (``keras_tuner.src.engine.tuner_utils.SaveBestEpoch``, and its ``_save_model``), writing
  what a trial trained (:func:`tuner.model.checkpoint.save`) instead of the whole model;
* :func:`requeue`: an oracle's retry queue (``_retry_queue``), where a refused trial waits;
* Keras Tuner's ``DEBUG`` switch (``keras_tuner.src.config``), turned off here.

Tested with keras-tuner :data:`TESTED` (pyproject pins the same range). :func:`missing`
lists what an installed Keras Tuner no longer has; a search calls :func:`require` before its
first trial, so a changed Keras Tuner stops it with one line instead of failing every trial.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
from keras_tuner.src import config as kt_config
from keras_tuner.src.engine import tuner_utils

from data_tools.errors import InputError
from tuner.model import checkpoint

TESTED = ">=1.4,<1.5"

# Keras Tuner ships with DEBUG on, which prints every failed trial's traceback mid-search;
# our runner reports each failure as one line and records it in trials.csv instead.
kt_config.DEBUG = False

# Every private attribute relied on, by owner: what missing() checks and the layout test keeps here.
TUNER_PRIVATE = (
    "_build_and_fit_model",
    "_build_hypermodel",
    "_get_checkpoint_fname",
    "_try_run_and_update_trial",
    "_try_build",
)
ORACLE_PRIVATE = ("_retry_queue",)
CALLBACK_PRIVATE = ("_save_model",)


def missing() -> list[str]:
    """What this module relies on that the installed Keras Tuner lacks (empty: all there)."""
    gone = [f"kt.Tuner.{name}" for name in TUNER_PRIVATE if not hasattr(kt.Tuner, name)]
    gone += [
        f"SaveBestEpoch.{name}"
        for name in CALLBACK_PRIVATE
        if not hasattr(tuner_utils.SaveBestEpoch, name)
    ]
    oracle = kt.oracles.RandomSearchOracle(objective="val_accuracy", max_trials=1)
    gone += [f"Oracle().{name}" for name in ORACLE_PRIVATE if not hasattr(oracle, name)]
    if not hasattr(kt_config, "DEBUG"):
        gone.append("keras_tuner.src.config.DEBUG")
    return gone


def require() -> None:
    """Raise one line (:class:`InputError`) when the installed Keras Tuner lacks what the
    search relies on."""
    gone = missing()
    if gone:
        raise InputError(
            f"keras-tuner {kt.__version__} no longer has {', '.join(gone)}, which the search "
            f"relies on (tested with keras-tuner{TESTED}): pip install 'keras-tuner{TESTED}'"
        )


class TunerHooks:
    """Mixin for a ``kt.Tuner`` subclass: Keras Tuner's private hooks, forwarded to public
    methods the subclass defines: ``build_and_fit(trial, *args, **kwargs)``,
    ``build_model(hp)`` and ``checkpoint_file(trial_id)``."""

    def _build_and_fit_model(self, trial, *args, **kwargs):
        return self.build_and_fit(trial, *args, **kwargs)

    def _build_hypermodel(self, hp: kt.HyperParameters) -> keras.Model:
        return self.build_model(hp)

    def _get_checkpoint_fname(self, trial_id: str) -> str:
        return self.checkpoint_file(trial_id)

    def _try_run_and_update_trial(self, trial, *args, **kwargs):
        super()._try_run_and_update_trial(trial, *args, **kwargs)
        if trial.message:  # Keras Tuner stores a whole traceback: keep our one-line reason
            trial.message = trial.message.strip().splitlines()[-1]

    def plain_build(self, hp: kt.HyperParameters) -> keras.Model:
        """The hypermodel's model, built by ``kt.Tuner`` itself: not by a subclass's own
        ``_build_hypermodel`` (Hyperband's loads whole parent models)."""
        return kt.Tuner._build_hypermodel(self, hp)

    def try_build(self, hp: kt.HyperParameters) -> keras.Model:
        """Keras Tuner's build with its retries and size checks."""
        return self._try_build(hp)


class SaveTrained(tuner_utils.SaveBestEpoch):
    """Keras Tuner's best-epoch checkpoint callback, writing :func:`checkpoint.save`'s file
    instead of the whole model."""

    def __init__(self, objective, filepath: str, whole: bool) -> None:
        super().__init__(objective, filepath)
        self.whole = whole

    @classmethod
    def replacing(cls, callback: tuner_utils.SaveBestEpoch, whole: bool) -> SaveTrained:
        made = cls(callback.objective, callback.filepath, whole)
        made.best_value = callback.best_value
        return made

    def _save_model(self) -> None:
        checkpoint.save(self.model, self.filepath, self.whole)


def save_trained(callbacks: Sequence[Any], whole: bool) -> list[Any]:
    """``callbacks`` with Keras Tuner's best-epoch checkpoint replaced by :class:`SaveTrained`
    (``whole``: the trial trains every variable)."""
    return [
        SaveTrained.replacing(c, whole) if type(c) is tuner_utils.SaveBestEpoch else c
        for c in callbacks
    ]


def forget_best_epoch(callbacks: Sequence[Any]) -> None:
    """Before an out-of-memory retry: the best-epoch checkpoint of the abandoned attempt is
    deleted and its callback forgets that attempt's best value, so the retry's own best
    epoch is what gets saved (and what a Hyperband continuation loads)."""
    for callback in callbacks:
        if isinstance(callback, tuner_utils.SaveBestEpoch):
            maximise = callback.objective.direction == "max"
            callback.best_value = float("-inf") if maximise else float("inf")
            Path(callback.filepath).unlink(missing_ok=True)


def requeue(oracle: kt.Oracle, tuner_id: str, trial_id: str) -> None:
    """Put a trial handed to ``tuner_id`` back in the oracle's retry queue (where Keras Tuner
    puts interrupted trials when it reloads): a resumed search runs it first."""
    oracle.ongoing_trials.pop(tuner_id, None)
    oracle._retry_queue.append(trial_id)
