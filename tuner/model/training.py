"""How a trial trains: every fit path of the hypermodel, and the epoch it keeps.

:class:`Trainer` is the part of :class:`~tuner.model.hypermodel.EffNetHyperModel` that trains
(the hypermodel plans and builds; see its module for the stages and phases). ``fit`` sends a
trial down one of four paths, each in its own section below:

* the exact linear head: a frozen-stage linear head fitted by Newton-CG on cached features;
* phase 1: the head on the frozen backbone, by Adam, on cached features (and augmented views
  of them) when possible, else end to end;
* phase 2: the unfrozen top blocks and the head, on cached activations at the cut when they
  fit, else end to end;
* end to end: pixels through the whole model (random weights, no cache, or what does not fit).

:class:`BestEpoch` keeps the weights of the epoch a trial reports (the highest validation
accuracy, :data:`BEST_EPOCH_METRIC`; the first on ties); :func:`compile_model` is the one
optimizer and loss every path uses; :func:`phase1_end` and :func:`finetune_epochs` say how an
end-to-end trial's epochs divide between its phases.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from data_tools import pipeline
from tuner.model import backbones, features
from tuner.model import head as head_mod
from tuner.model.caching import IN_MEMORY_BYTES, FeatureStore
from tuner.model.space import SearchSpace
from tuner.model.splits import SplitData
from tuner.model.trial_plan import FitFacts, TrialPlan

# Training on cached arrays takes many tiny steps; one call per step spends more time in
# dispatch than in arithmetic (2.5 ms a step for a Dense head on B0 features): run 16 per
# call (the same updates, callbacks see every 16th batch).
CACHED_STEPS_PER_EXECUTION = 16


# The metric that picks a trial's best epoch, higher is better: BestEpoch, best_epoch and the
# best-epoch checkpoint (Keras Tuner's, on the search objective, which is this metric) agree
# on it. The lowest validation loss was measured instead and scored lower on test (README).
BEST_EPOCH_METRIC = "val_accuracy"


class Trainer:
    """Every fit path of a trial over a search's ``data`` and ``space``, on the feature and
    activation caches of ``store``."""

    def __init__(
        self,
        data: SplitData,
        space: SearchSpace,
        store: FeatureStore,
        jit_compile: bool | str = "auto",
    ) -> None:
        self.data = data
        self.space = space
        self.store = store
        self.jit_compile = jit_compile  # XLA; "auto" lets Keras decide

    def fit(
        self,
        plan: TrialPlan,
        model: keras.Model,
        facts: FitFacts,
        epochs: int | None = None,
        initial_epoch: int = 0,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        own_callbacks: Sequence[keras.callbacks.Callback] = (),
        stop_after: int | None = None,
    ) -> dict[str, float]:
        """Train ``model`` as ``plan`` says; leave it at its best epoch (unless ``stop_after``,
        a refit's last epoch: then train the same schedule up to that epoch and keep it) and
        return that epoch's metrics; ``facts`` receives what the fit did. ``callbacks`` are
        Keras Tuner's (they see the whole model), ``own_callbacks`` the search's."""
        # Under --strategy mirrored the model was built in the strategy's scope: the head
        # trainers and optimizers made here must be too.
        with model.distribute_strategy.scope():
            epochs = epochs or self.space.epochs
            run = _Run(
                model=model,
                plan=plan,
                class_weight=self.data.class_weights() if plan.class_weight == "balanced" else None,
                given=list(callbacks),
                ours=[*own_callbacks, keras.callbacks.TerminateOnNaN()],
                facts=facts,
                stop_after=stop_after,
            )
            self._paths(run, epochs, initial_epoch)
            facts.update(
                history=run.history,
                epochs_run=len(run.history.get("loss", [])),
                plan=plan,
            )
            metrics = best_metrics(run.history)
            if stop_after is None:
                run.best.restore()
            return metrics

    def _paths(self, run: _Run, epochs: int, initial_epoch: int) -> None:
        """The path (or, end to end, the phases) the plan takes."""
        plan, model = run.plan, run.model
        # What a best epoch restores: what can change in this fit (phase 2 adds the top).
        run.best.track(model.weights if not plan.pretrained else model.get_layer("head").weights)
        if plan.stage == "frozen" and plan.solver == "exact":
            self._fit_linear_head(run)
        elif plan.stage == "frozen":
            self._phase1(run, self.space.head_epochs, 0, converge=True)
        elif plan.stage == "fine-tune":
            self._phase2(run, epochs, initial_epoch)
        else:
            phase1 = phase1_end(self.space, plan, epochs, initial_epoch)
            if initial_epoch < run.last(phase1):
                self._phase1(run, phase1, initial_epoch)
            fine_tunes = plan.fine_tunes and run.last(epochs) > phase1
            if fine_tunes and not model.stop_training:
                self._phase2(run, epochs, max(initial_epoch, phase1))

    # -- the exact linear head -----------------------------------------------------------------

    def _fit_linear_head(self, run: _Run) -> None:
        """A linear head fitted exactly on the cached features (:func:`head.fit_linear`),
        scored like an epoch and reported to the callbacks as one."""
        plan = run.plan
        arrays = self.store.features(run.model, plan, run.facts)
        train, labels = stacked(arrays["train"], self.data.labels("train"))
        head = run.model.get_layer("head")
        head_mod.standardize(head, train)
        # Callbacks read the model's optimizer (W&B's logs its learning rate): the head gets
        # one at rate 0, which is what it is, no gradient step being taken.
        compile_model(head, 0.0, self.data.num_classes, jit_compile=False)
        callbacks = keras.callbacks.CallbackList(run.on_cache(), model=head, epochs=1, verbose=0)
        callbacks.on_train_begin()
        callbacks.on_epoch_begin(0)
        started = time.monotonic()
        run.facts["solver_iterations"] = head_mod.fit_linear(
            head, train, labels, plan.l2, run.class_weight
        )
        run.facts["solver_seconds"] = time.monotonic() - started
        logs = {}
        for x, y, prefix in (
            (train, labels, ""),
            (arrays["validation"], self.data.labels("validation"), "val_"),
        ):
            scores = head_mod.linear_scores(head, x, y, plan.l2)
            logs.update({prefix + key: value for key, value in scores.items()})
        callbacks.on_epoch_end(0, logs)
        callbacks.on_train_end(logs)
        run.history = {key: [value] for key, value in logs.items()}

    # -- phase 1: the head on the frozen backbone (cached features, else end to end) -----------

    def _phase1(self, run: _Run, until: int, start: int, converge: bool = False) -> None:
        """The head on the frozen backbone: on cached features when possible, else end to
        end. ``converge``: Adam with cosine decay over ``until`` epochs and early stopping on
        validation loss (a frozen-stage head), else a constant learning rate."""
        plan, model = run.plan, run.model
        steps = math.ceil(len(self.data.train) / plan.batch_size) * (until - start)
        decay = steps if converge else None
        stopping = (
            [keras.callbacks.EarlyStopping("val_loss", patience=self.space.patience)]
            if converge and run.stop_after is None
            else []
        )
        until = run.last(until)  # the schedule above is the searched one; a refit ends early
        if self.store.uses_cache(plan):
            arrays = self.store.features(model, plan, run.facts)
            head = model.get_layer("head")
            head_mod.standardize(head, stacked(arrays["train"], self.data.labels("train"))[0])
            compile_model(
                head,
                plan.learning_rate,
                self.data.num_classes,
                self.jit_compile,
                CACHED_STEPS_PER_EXECUTION,
                decay_steps=decay,
            )
            run.extend(
                self._fit_on_cache(head, run, arrays, until, start, run.on_cache() + stopping)
            )
        else:
            compile_model(
                model,
                plan.learning_rate,
                self.data.num_classes,
                self.jit_compile,
                decay_steps=decay,
            )
            run.extend(self._end_to_end(run, until, start, run.end_to_end() + stopping))

    def _fit_on_cache(
        self,
        trainer: keras.Model,
        run: _Run,
        arrays: dict[str, np.ndarray],
        epochs: int,
        initial_epoch: int,
        callbacks,
    ) -> keras.callbacks.History:
        """Fit ``trainer`` (head, or trainable top + head) on cached arrays; Keras Tuner's
        callbacks see the full model. Arrays that fit in memory (pooled features always
        do) are trained on in memory; larger ones (activations of big images) stream from
        their memory map batch by batch."""
        batch = run.plan.batch_size
        labels = {split: self.data.labels(split) for split in arrays}
        views = isinstance(arrays["train"], list)  # augmented: one view a row, drawn each epoch
        size = sum(a.size for a in _all(arrays))
        if views:
            train = arrays["train"]
            if size * 4 <= IN_MEMORY_BYTES:
                train = tf.constant(np.stack([np.asarray(v, dtype=np.float32) for v in train]))
            train = pipeline.array_dataset(
                train, labels["train"], batch, shuffle=True, seed=self.space.seed, views=True
            )
            val = pipeline.array_dataset(arrays["validation"], labels["validation"], batch)
        elif size * 4 <= IN_MEMORY_BYTES:
            # tf.data over in-memory tensors: 1.6x faster than fit(x=numpy) for a small head.
            def dataset(split: str) -> tf.data.Dataset:
                x = np.asarray(arrays[split], dtype=np.float32)
                return tf.data.Dataset.from_tensor_slices((x, labels[split]))

            train = dataset("train").shuffle(
                len(labels["train"]), seed=self.space.seed, reshuffle_each_iteration=True
            )
            train = train.batch(batch).prefetch(tf.data.AUTOTUNE)
            val = dataset("validation").batch(batch).prefetch(tf.data.AUTOTUNE)
        else:
            train = pipeline.array_dataset(
                arrays["train"], labels["train"], batch, shuffle=True, seed=self.space.seed
            )
            val = pipeline.array_dataset(arrays["validation"], labels["validation"], batch)
        build_state(trainer, train)
        result = trainer.fit(
            train,
            shuffle=False,  # the dataset shuffles itself
            validation_data=val,
            epochs=epochs,
            initial_epoch=initial_epoch,
            class_weight=run.class_weight,
            callbacks=callbacks,
            verbose=0,
        )
        run.model.stop_training = trainer.stop_training
        return result

    # -- phase 2: the unfrozen top (cached activations at the cut, else end to end) ------------

    def _phase2(self, run: _Run, until: int, start: int) -> None:
        """Unfreeze the top blocks (whole blocks, BatchNorm frozen) and train them with the
        head at ``learning_rate * finetune_lr_factor``, on cached activations at the cut
        when possible, else end to end."""
        plan, model = run.plan, run.model
        until = run.last(until)
        base = model.get_layer("backbone")
        count = backbones.blocks_for_fraction(base, plan.finetune_fraction)
        run.facts["unfrozen_blocks"] = backbones.unfreeze_top(base, count)
        run.best.track(base.trainable_weights)
        rate = plan.learning_rate * plan.finetune_lr_factor
        cached = self.store.uses_cache(plan) and count < len(backbones.blocks(base))
        if cached:  # the activations at the cut must fit on disk
            cached = self.store.activations_fit(model, plan, count, run.facts)
        if cached:
            run.extend(self._fit_top_on_activations(run, count, until, start, rate))
        else:
            compile_model(model, rate, self.data.num_classes, self.jit_compile)
            run.extend(self._end_to_end(run, until, start, run.end_to_end()))

    def _fit_top_on_activations(
        self, run: _Run, top_blocks: int, epochs: int, initial_epoch: int, rate: float
    ) -> keras.callbacks.History:
        """Phase 2 on activations cached at the cut (the output of the last frozen block):
        only the unfrozen top blocks and the head run, forward and backward."""
        model = run.model
        bottom, top, cut = features.split_backbone(model, top_blocks)
        make_net = functools.cache(lambda: features.extractor(model, bottom))
        key = features.weights_fingerprint(bottom)
        arrays = self.store.arrays(run.plan, make_net, key, cut, run.facts)
        inputs = keras.Input(top.input_shape[1:], name="activations")
        # Inference mode as in `build` (its stochastic depth is off: `inference_mode`).
        outputs = model.get_layer("head")(top(inputs, training=False))
        trainer = keras.Model(inputs, outputs, name="top_and_head")
        compile_model(
            trainer, rate, self.data.num_classes, self.jit_compile, CACHED_STEPS_PER_EXECUTION
        )
        run.facts["activation_cut"] = cut
        return self._fit_on_cache(trainer, run, arrays, epochs, initial_epoch, run.on_cache())

    # -- end to end: pixels through the whole model --------------------------------------------

    def _end_to_end(self, run: _Run, until: int, start: int, callbacks) -> keras.callbacks.History:
        plan = run.plan
        train, val = self.data.datasets(
            plan.image_size,
            plan.batch_size,
            self.space.seed,
            plan.augment,
            cache=self.store.pixels_cacheable(plan.image_size, run.facts),
        )
        run.facts.augmented(plan, "end to end")
        build_state(run.model, train)
        return run.model.fit(
            train,
            epochs=until,
            initial_epoch=start,
            validation_data=val,
            class_weight=run.class_weight,
            callbacks=callbacks,
            verbose=0,
            shuffle=False,  # the dataset shuffles itself (Keras warns it ignores the flag)
        )


def stacked(
    train: np.ndarray | list[np.ndarray], labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Train features and labels with every augmented view as rows of their own (what a
    linear head is fitted to: the mean loss over views is the loss the views sample)."""
    if not isinstance(train, list):
        return train, labels
    return np.concatenate([np.asarray(v) for v in train]), np.tile(labels, len(train))


def _all(arrays: dict[str, np.ndarray | list[np.ndarray]]) -> list[np.ndarray]:
    return [a for value in arrays.values() for a in (value if isinstance(value, list) else [value])]


@dataclass
class _Run:
    """One ``fit`` of a trial: its model and plan, the callbacks, the history so far."""

    model: keras.Model
    plan: TrialPlan
    class_weight: dict[int, float] | None
    given: list  # Keras Tuner's callbacks: they must see the whole model
    ours: list
    facts: FitFacts = field(default_factory=FitFacts)
    stop_after: int | None = None  # a refit's last epoch
    history: dict[str, list[float]] = field(default_factory=dict)
    best: BestEpoch = field(default_factory=lambda: BestEpoch())

    def last(self, until: int) -> int:
        """The epoch a phase planned to end at ``until`` ends at: ``until``, or a refit's
        ``stop_after`` when that comes first."""
        return until if self.stop_after is None else min(until, self.stop_after)

    def end_to_end(self) -> list:
        return [*self.given, self.best, *self.ours]

    def on_cache(self) -> list:
        """On the cached paths a part of the model trains; Keras Tuner's callbacks see it
        whole."""
        return [*(features.ForModel(cb, self.model) for cb in self.given), self.best, *self.ours]

    def extend(self, result: keras.callbacks.History) -> None:
        for key, values in result.history.items():
            self.history.setdefault(key, []).extend(float(v) for v in values)


class BestEpoch(keras.callbacks.Callback):
    """Keeps the values of the tracked variables at the epoch with the best validation
    accuracy (the first, on ties: as :func:`best_epoch`); :meth:`restore` puts them back.

    One instance serves every ``fit`` of a trial, whatever part of the model each trains:
    variables tracked later (the top blocks unfrozen for phase 2) are recorded at their
    value when tracked, which is their value at any earlier best epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.best = -math.inf
        self.variables: dict[int, Any] = {}
        self.saved: dict[int, np.ndarray] | None = None

    def track(self, variables: Sequence[Any]) -> None:
        for variable in variables:
            if id(variable) not in self.variables:
                self.variables[id(variable)] = variable
                if self.saved is not None:
                    self.saved[id(variable)] = keras.ops.convert_to_numpy(variable).copy()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(BEST_EPOCH_METRIC)
        if value is None or math.isnan(value) or value <= self.best:
            return
        self.best = float(value)
        self.saved = {
            key: keras.ops.convert_to_numpy(variable).copy()
            for key, variable in self.variables.items()
        }

    def restore(self) -> None:
        for key, value in (self.saved or {}).items():
            self.variables[key].assign(value)


def phase1_end(space: SearchSpace, plan: TrialPlan, epochs: int, initial_epoch: int = 0) -> int:
    """The epoch at which an end-to-end trial's phase 2 starts (``epochs`` when there is
    none). A trial continued from epoch ``initial_epoch`` whose parent had already fine-tuned
    stays in phase 2: training its head again would undo what fine-tuning built on it."""
    if not plan.fine_tunes:
        return epochs
    parent_end = initial_epoch - finetune_epochs(space, initial_epoch)
    if initial_epoch > 0 and parent_end < initial_epoch:
        return parent_end
    return epochs - finetune_epochs(space, epochs)


def finetune_epochs(space: SearchSpace, epochs: int) -> int:
    """Phase-2 epochs out of ``epochs``: the space's setting, else half (at least 1)."""
    wanted = space.finetune_epochs or math.ceil(epochs / 2)
    return min(wanted, max(epochs - 1, 0))


def compile_model(
    model: keras.Model,
    learning_rate: float,
    num_classes: int,
    jit_compile: bool | str = "auto",
    steps_per_execution: int = 1,
    decay_steps: int | None = None,
) -> None:
    """Adam (its learning rate decayed to 0 along a cosine over ``decay_steps`` steps when
    given), and the loss that matches the head (keywords: compile's third positional
    argument is loss_weights in Keras 3)."""
    loss = "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
    rate = (
        keras.optimizers.schedules.CosineDecay(learning_rate, max(1, decay_steps))
        if decay_steps
        else learning_rate
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=rate),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


def build_state(model: keras.Model, train: tf.data.Dataset) -> None:
    """Create the optimizer's and the compiled metrics' variables before ``fit``. Without a
    distribution strategy Keras defers that to the first traced train step, and variables
    made while tracing make TensorFlow trace the step twice: a T0 trial on the whole network
    spent ~13 s of its ~30 s on the second trace. Keras' own symbolic build (what ``fit``
    runs under a strategy) does it on the dataset's element spec."""
    if hasattr(model, "_symbolic_build"):
        model._symbolic_build(data_batch=train.element_spec)
    elif model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def best_metrics(history: dict[str, list[float]]) -> dict[str, float]:
    """The best epoch (:func:`best_epoch`): its val accuracy and loss, train accuracy and
    loss. Raises when the loss became NaN (the trial failed)."""
    losses = history.get("loss", [])
    if not losses or any(math.isnan(v) for v in losses + history.get("val_loss", [])):
        at = next((i + 1 for i, v in enumerate(losses) if math.isnan(v)), len(losses))
        raise kt.errors.FailedTrialError(f"loss became NaN at epoch {at}")
    best = best_epoch(history)
    return {key: values[best] for key, values in history.items()}


def best_epoch(history: dict[str, list[float]]) -> int:
    """Index of the epoch with the best val accuracy (the first, on ties)."""
    return int(np.argmax(history[BEST_EPOCH_METRIC]))
