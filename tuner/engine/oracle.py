"""The ``transfer`` algorithm on Keras Tuner: an Oracle that asks :mod:`tuner.engine.strategy` what
to run next, and a Tuner that continues a trial from its parent's checkpoint.

The oracle gathers plain data (each trial's values, validation accuracy and measured costs,
reported by the trial runner as metrics), calls :func:`strategy.next_move`, and turns the move
into hyperparameter values:

* a frozen-stage head: the backbone and size of its feature set, ``finetune_fraction`` 0, and
  the head's values from a scrambled Halton sequence over the space (the first half of each
  feature set's heads linear), so a few trials already cover every range evenly;
* a fine-tune: its parent's values with the fraction and learning-rate factor of the move,
  plus Keras Tuner's own ``tuner/trial_id``, ``tuner/initial_epoch`` and ``tuner/epochs``
  (the tuner loads the parent's best-epoch checkpoint, as Hyperband does).

Nothing is kept but Keras Tuner's trials, so a resumed search decides exactly as it would
have. Every value the strategy adds is under ``tuner/`` (stage, estimate, why).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from typing import Any

import keras_tuner as kt
import numpy as np

from tuner.engine import costmodel, strategy
from tuner.model import augment, backbones
from tuner.model.space import SearchSpace, as_list

Status = kt.engine.trial.TrialStatus

HEAD_KEYS = ("head_width", "dropout", "learning_rate", "l2", "class_weight", "train_batch_size")
# A linear head fitted by Newton-CG has no learning rate; its fine-tunes scale Adam's default.
FINE_TUNE_BASE_RATE = 1e-3
# Metrics the trial runner reports beside the objective, for the cost model.
COST_METRICS = (
    "train_seconds",
    "pass_seconds",
    "ahead_seconds",
    "trial_seconds",
    "latency_ms",
    "latency_spread_ms",
    "epochs_run",
)


def feature_sets(space: SearchSpace) -> list[costmodel.FeatureSet]:
    """Every (backbone, image size, augmentation) of the space, cheapest passes first."""
    found = []
    augmented = [(augment.NONE, 1)] + [
        (policy, int(views))
        for policy in as_list(space.augment)
        if augment.is_on(policy)
        for views in as_list(space.augment_views)
    ]
    if not any(not augment.is_on(p) for p in as_list(space.augment)):
        augmented = augmented[1:]  # every trial augments
    # Stage features first on equal cost: linear heads on them beat the pooled top's on real
    # data (backbones.TAPPED_STAGES), and the top's pass comes in the same sweep.
    kinds = sorted(as_list(space.features), key=lambda kind: kind != "stages")
    for name in space.backbones:
        entry = backbones.get(str(name))
        for choice in as_list(space.image_size):
            pixels = entry.size if choice == "native" else int(choice)
            for policy, views in augmented:
                for kind in kinds:  # a hub module's reads the top alone (one set)
                    seen = backbones.features_read(entry, kind)
                    found.append(
                        costmodel.FeatureSet(entry.name, str(choice), pixels, policy, views, seen)
                    )
    unique = list(dict.fromkeys(found))
    return sorted(
        unique,
        key=lambda fs: (
            fs.gflops() * fs.passes(),
            fs.pixels,
            fs.backbone,
            fs.features != "stages",
            fs.label,
        ),
    )


class TransferOracle(kt.Oracle):
    """Frozen heads on cached features first, then successive halving of fine-tunes; see
    :mod:`tuner.engine.strategy`. ``setting``, ``remaining`` and ``say`` are set by the search."""

    def __init__(self, objective, space: SearchSpace, **kwargs) -> None:
        super().__init__(objective=objective, **kwargs)
        self.space = space
        self.setting: costmodel.Setting | None = None
        self.remaining: Callable[[], float] = lambda: math.inf
        self.say: Callable[[str], None] = print
        self.reason = ""  # why the search ended, when the strategy has nothing more
        self.finetunable = True  # False with random weights: nothing is frozen

    def facts(self) -> list[costmodel.TrialFacts]:
        return [trial_facts(trial, self.space) for trial in self.trials.values()]

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        facts = [f for f in self.facts() if f.trial_id != trial_id]
        move = strategy.next_move(self.setting, facts, self.remaining())
        if isinstance(move, str):
            running = any(f.status == Status.RUNNING for f in facts)
            self.reason = move
            status = Status.IDLE if running else Status.STOPPED
            return {"status": status}
        values = self._values(move, facts)
        values.update(
            {
                # A paired head is fitted as a frozen one; its partner value marks it.
                "tuner/stage": costmodel.FROZEN if move.stage == costmodel.PAIRED else move.stage,
                "tuner/estimate_s": round(float(move.estimate_s), 3),
                "tuner/why": move.why,
            }
        )
        return {"status": Status.RUNNING, "values": values}

    def plan(self) -> list[str]:
        return strategy.plan_lines(self.setting, self.facts(), self.remaining())

    def _values(self, move: costmodel.Move, facts: list[costmodel.TrialFacts]) -> dict[str, Any]:
        if move.stage == costmodel.FROZEN:
            return self._head_values(move)
        parent = next(f for f in facts if f.trial_id == move.parent)
        values = {k: v for k, v in parent.values.items() if not k.startswith("tuner/")}
        if move.stage == costmodel.PAIRED and move.partner is not None:
            # The better head's values (its size, l2, class weight), and the second backbone.
            values.update(
                {"partner": move.partner.backbone, "partner_features": move.partner.features}
            )
            return values
        if parent.stage == costmodel.FROZEN and parent.solver == "exact":
            values["learning_rate"] = FINE_TUNE_BASE_RATE
        values.update(
            {
                "finetune_fraction": move.fraction,
                "finetune_lr_factor": move.factor,
                "tuner/trial_id": move.parent,
                "tuner/initial_epoch": move.initial_epoch,
                "tuner/epochs": move.epochs,
                "tuner/bracket": move.bracket,
                "tuner/bracket_size": move.bracket_size,
                "tuner/bracket_rungs": move.bracket_rungs,
            }
        )
        return values

    def _head_values(self, move: costmodel.Move) -> dict[str, Any]:
        """The ``move.head_index``-th head of its feature set: a point of a scrambled Halton
        sequence (seeded by the search's seed and the feature set) over the head's values."""
        from scipy.stats import qmc

        fs = move.feature_set
        space = {hp.name: hp for hp in self.hyperparameters.space}
        dims = [k for k in HEAD_KEYS if k in space]
        salt = zlib.crc32(f"{fs.backbone}|{fs.choice}".encode())
        sampler = qmc.Halton(d=max(len(dims), 1), scramble=True, seed=(self.seed or 0) + salt)
        point = sampler.random(move.head_index + 1)[move.head_index]
        values = {name: hp.default for name, hp in space.items()}
        values.update(
            {k: space[k].prob_to_value(float(p)) for k, p in zip(dims, point, strict=False)}
        )
        # The first half of the heads linear (fitted exactly), the rest with a hidden layer
        # where the space has one (trained by Adam): what the strategy budgeted for.
        linear_first = move.head_index < math.ceil(self.space.head_trials / 2)
        width = space.get("head_width")
        if linear_first and _allows_zero(width):
            values["head_width"] = 0
        elif not linear_first and values.get("head_width") == 0:
            hidden = _hidden_widths(width)
            if hidden:
                values["head_width"] = hidden[int(point[0] * len(hidden)) % len(hidden)]
        values["backbone"] = fs.backbone
        if "image_size" in space:
            values["image_size"] = fs.choice
        values["augment"] = fs.augment
        if "features" in space:
            values["features"] = fs.features
        if "augment_views" in space:
            values["augment_views"] = fs.views if fs.views > 1 else space["augment_views"].default
        values["finetune_fraction"] = 0.0
        return values


def _hidden_widths(hp) -> list[int]:
    """The non-zero head widths of a Choice (others: none to pick from)."""
    if isinstance(hp, kt.engine.hyperparameters.Choice):
        return [int(v) for v in hp.values if v]
    return []


def _allows_zero(hp) -> bool:
    if hp is None:
        return False
    if isinstance(hp, kt.engine.hyperparameters.Choice):
        return 0 in hp.values
    if isinstance(hp, kt.engine.hyperparameters.Fixed):
        return hp.value == 0
    return getattr(hp, "min_value", 1) <= 0


def trial_facts(trial, space: SearchSpace) -> costmodel.TrialFacts:
    """A Keras Tuner trial as plain data for :mod:`tuner.engine.strategy`."""
    values = dict(trial.hyperparameters.values)
    entry = backbones.get(str(values.get("backbone", space.backbones[0])))
    choice = str(values.get("image_size", as_list(space.image_size)[0]))
    pixels = entry.size if choice == "native" else int(choice)
    policy = str(values.get("augment", augment.NONE))
    views = int(values.get("augment_views", 1)) if augment.is_on(policy) else 1
    kind = backbones.features_read(entry, values.get("features", "top"))

    def metric(name: str) -> float | None:
        if not trial.metrics.exists(name):
            return None
        value = trial.metrics.get_last_value(name)
        return None if value is None or np.isnan(value) else float(value)

    return costmodel.TrialFacts(
        trial_id=trial.trial_id,
        status=str(trial.status),
        values=values,
        feature_set=costmodel.FeatureSet(entry.name, choice, pixels, policy, views, kind),
        score=trial.score if trial.score is not None and not np.isnan(trial.score) else None,
        train_seconds=metric("train_seconds"),
        pass_seconds=metric("pass_seconds") or 0.0,
        ahead_seconds=metric("ahead_seconds") or 0.0,
        trial_seconds=metric("trial_seconds"),
        latency_ms=metric("latency_ms"),
        latency_spread_ms=metric("latency_spread_ms"),
        epochs_run=int(metric("epochs_run") or 0),
    )


def continued_from(oracle: kt.Oracle) -> set[str]:
    """Trials whose checkpoints a later trial of ``oracle`` may start from: the transfer
    strategy's parents and promotable rungs (:func:`strategy.continuable`), Keras Tuner
    Hyperband's open brackets, and the parents of the running trials (what a resume needs);
    random and Bayesian search continue nothing."""
    running = Status.RUNNING
    live = {
        str(t.hyperparameters.values.get("tuner/trial_id"))
        for t in oracle.trials.values()
        if t.status == running and t.hyperparameters.values.get("tuner/trial_id")
    }
    if isinstance(oracle, TransferOracle) and oracle.setting is not None:
        live |= strategy.continuable(oracle.setting, oracle.facts())
    for bracket in getattr(oracle, "_brackets", []):  # Hyperband's rounds still to fill
        for entries in bracket["rounds"]:
            live |= {str(e[key]) for e in entries for key in ("id", "past_id") if e.get(key)}
    return live


def make_setting(
    space: SearchSpace,
    budget_s: float,
    images: int,
    seconds_per_gflop: float,
    finetunable: bool,
    train_share: float = 0.9,
) -> costmodel.Setting:
    """The strategy's view of the space and the search."""
    fractions = fine_tune_fractions(space)
    any_finetunable = any(backbones.get(str(b)).finetunable for b in space.backbones)
    return costmodel.Setting(
        feature_sets=tuple(feature_sets(space)),
        fractions=fractions if finetunable and any_finetunable else (),
        factors=tuple(float(f) for f in fine_tune_values(space.finetune_lr_factor)),
        head_trials=space.head_trials,
        frozen_share=float(space.frozen_share),
        epochs=space.epochs,
        eta=space.hyperband_factor,
        budget_s=budget_s,
        images=images,
        seconds_per_gflop=seconds_per_gflop,
        train_share=train_share,
    )


def fine_tune_fractions(space: SearchSpace) -> tuple[float, ...]:
    """The space's non-zero fine-tune fractions, ascending (what fine-tunes unfreeze)."""
    return tuple(sorted({f for f in fine_tune_values(space.finetune_fraction) if f > 0}))


def fine_tune_values(spec) -> list[float]:
    """A fine-tune key's values: its choices, or three points of a range."""
    if isinstance(spec, dict):
        low, high = float(spec["min"]), float(spec["max"])
        if spec.get("log"):
            return list(np.geomspace(low, high, 3))
        return list(np.linspace(low, high, 3))
    return [float(v) for v in as_list(spec)]


def calibrate(fs: costmodel.FeatureSet, batch: int = 8) -> float:
    """Seconds per GFLOP of one image on this device: the backbone of ``fs`` with random
    weights (time does not depend on their values) on ``batch`` images, after a warm-up."""
    import keras

    net = backbones.build(backbones.get(fs.backbone), fs.pixels, None)
    pixels = np.random.default_rng(0).uniform(0, 255, (batch, fs.pixels, fs.pixels, 3))
    forward = keras.ops.convert_to_tensor(pixels.astype("float32"))
    net.predict_on_batch(forward)
    started = time.perf_counter()
    net.predict_on_batch(forward)
    per_image = (time.perf_counter() - started) / batch
    del net
    keras.backend.clear_session()
    return per_image / max(fs.gflops(), 1e-9)


class TransferTuner(kt.Tuner):
    """Runs the oracle's trials; a continued trial (``tuner/trial_id``) trains from
    ``tuner/initial_epoch`` to ``tuner/epochs`` (Keras Tuner's Hyperband does the same),
    from its parent's best-epoch checkpoint (loaded by the trial runner:
    :meth:`tuner.engine.trial.TrialRunner.build_model`)."""

    def run_trial(self, trial, *fit_args, **fit_kwargs):
        hp = trial.hyperparameters
        if "tuner/epochs" in hp.values:
            fit_kwargs["epochs"] = hp.values["tuner/epochs"]
            fit_kwargs["initial_epoch"] = hp.values["tuner/initial_epoch"]
        return super().run_trial(trial, *fit_args, **fit_kwargs)
