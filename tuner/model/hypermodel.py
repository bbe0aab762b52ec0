"""The hypermodel: ``build(hp)`` is the model, ``fit(hp, model, ...)`` is its training.

The model is ``pixels (float, 0..255) -> [rescale] -> backbone -> head``, with the backbone
and the head (:mod:`tuner.model.head`) as two named sub-models (``backbone``, ``head``) so the head
can be trained on cached backbone features without changing either.

Trials of the ``transfer`` algorithm (:mod:`tuner.engine.oracle`) have a stage:

* ``frozen``: the head alone, on the cached features, to convergence: a linear head is
  fitted exactly (:func:`head.fit_linear`); a wider one by Adam (cosine decay, at most
  ``head_epochs``, early stopping on validation loss after ``patience`` epochs);
* ``fine-tune``: phase 2 below only, from the checkpoint of a frozen trial (its trained head)
  or of a shorter fine-tune (successive halving), from ``initial_epoch`` to ``epochs``.

Trials of the other algorithms train both phases in one trial, with pretrained weights:

1. phase 1: the backbone is frozen and the head trains at ``learning_rate``;
2. phase 2 (when ``finetune_fraction > 0``): the top blocks of the backbone are unfrozen
   (whole blocks; BatchNorm stays frozen and in inference mode) and everything trainable
   continues at ``learning_rate * finetune_lr_factor`` for ``finetune_epochs`` epochs.

A pretrained backbone always runs in inference mode (moving BatchNorm statistics, no
stochastic depth), in both phases and on every path, so cached features and activations are
exactly what end-to-end training would see. A trial continued from a checkpoint (Hyperband)
goes on in the phase its parent ended in.

With random weights (``--weights none``) frozen features carry no information, so every
trial trains the whole network, BatchNorm and stochastic depth included, in one phase.

Augmentation (``augment``: :mod:`tuner.model.augment`) transforms train images only, outside the
model: a cached trial trains on cached features (or activations at a fine-tune's cut) of
``augment_views`` views of each train image, one drawn per image and epoch (a linear head is
fitted to all of them); an end-to-end trial transforms its train batches afresh every epoch.
Validation is never augmented, and the model a trial keeps has no augmentation inside.

``fit`` leaves the model at its best epoch (lowest validation loss, the first on ties: the
quantity early stopping watches), the epoch whose numbers it returns: what a trial records
is what it keeps and ships. Not the highest validation accuracy: on a few hundred
validation images, the best of a head's 20-130 epochs by accuracy is mostly the luckiest
one, and such a maximum then outranked the linear heads' single, honest score (measured on
real data: Adam heads picked at 0.567 and 0.600 validation accuracy scored 0.532 and 0.506
on test).

A refit (``export_best --refit``) sets ``stop_after``: ``fit`` then trains the same schedule
(the same phases, learning rates and decay) but stops at that epoch and keeps it, with no
early stopping and no return to a best epoch: its validation rows are part of its training.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from data_tools import pipeline
from tuner.model import accelerate, backbones, disk, features
from tuner.model import augment as augment_mod
from tuner.model import head as head_mod
from tuner.model import space as space_mod

# Cached features or activations up to this size (as float32) are trained on in memory
# (under the 2 GB limit of a tensor in a tf.data graph).
IN_MEMORY_BYTES = 1024**3
# "auto" training batch: the largest power of two that leaves this many steps an epoch.
MIN_STEPS_PER_EPOCH = 30
# Without a GPU the backbone pass gains nothing from bigger batches (32-256 within noise, B0
# on 2 cores) and each one costs memory.
CPU_PASS_BATCH = 64
STAGES = ("frozen", "fine-tune")  # of transfer trials; other algorithms' trials have none
# Training on cached arrays takes many tiny steps; one call per step spends more time in
# dispatch than in arithmetic (2.5 ms a step for a Dense head on B0 features): run 16 per
# call (the same updates, callbacks see every 16th batch).
CACHED_STEPS_PER_EXECUTION = 16
# Augmented views of the activations at a fine-tune's cut are cached up to this size on disk
# (float32, every view of the train split); beyond it the fine-tune augments end to end.
VIEW_CACHE_MAX_BYTES = 8 * 1024**3


# The metric that picks a trial's best epoch, lower is better (BestEpoch, best_epoch and the
# best-epoch checkpoint, checkpoint.EPOCH_OBJECTIVE, agree on it).
BEST_EPOCH_METRIC = "val_loss"


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial's values and the backbone table decide, as plain data."""

    backbone: str
    image_size: int
    batch_size: int  # training (head, fine-tune, end to end)
    head_width: int
    dropout: float
    learning_rate: float
    finetune_fraction: float
    finetune_lr_factor: float
    class_weight: str
    pretrained: bool
    l2: float = 0.0
    augment: str = (
        augment_mod.NONE
    )  # the train split's augmentation policy (tuner/model/augment.py)
    augment_views: int = 1  # views of each train image in a cached trial (1: not augmented)
    pass_batch: int = CPU_PASS_BATCH  # the backbone's forward passes (features, activations)
    stage: str = ""  # "frozen" / "fine-tune" for transfer trials
    solver: str = "adam"  # "exact": a linear head fitted exactly on cached features

    @property
    def fine_tunes(self) -> bool:
        return self.pretrained and self.finetune_fraction > 0

    @property
    def mode(self) -> str:
        """``fine-tuned``, ``frozen`` (pretrained backbone) or ``whole-network`` (random init)."""
        if not self.pretrained:
            return "whole-network"
        return "fine-tuned" if self.fine_tunes else "frozen"

    def unused(self) -> tuple[str, ...]:
        """The hyperparameters that did nothing in this trial, which trials.csv, W&B and
        the model card mark :data:`UNUSED`: an exact linear head takes no learning rate,
        dropout or epochs; a trial that does not fine-tune has no phase-2 rate factor (and a
        random-init one no fraction: it trains everything); views need augmentation."""
        names = []
        if self.solver == "exact":
            names += ["dropout", "learning_rate", "epochs"]
        if not self.pretrained:
            names.append("finetune_fraction")
        if not self.fine_tunes:
            names.append("finetune_lr_factor")
        if not augment_mod.is_on(self.augment):
            names.append("augment_views")
        return tuple(names)


class SplitData:
    """Train and validation rows of the normalised table, served as tf.data per size.

    The test split is never given to this class: it is read by export alone.
    """

    def __init__(self, table: pd.DataFrame, classes: Sequence[str], cache_dir: str | None):
        if "type" in table and table["type"].eq("test").any():
            raise ValueError("the search must not see the test split")
        self.train = table[table["type"] == "train"].reset_index(drop=True)
        self.validation = table[table["type"] == "validation"].reset_index(drop=True)
        self.classes = list(classes)
        self.cache_dir = cache_dir

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def datasets(
        self,
        size: int,
        batch_size: int,
        seed: int,
        augment: str = augment_mod.NONE,
        cache: bool = True,
    ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        """(train, validation) as float32 pixels in 0..255 and int32 labels; ``augment``
        transforms the train batches afresh every epoch (validation never). ``cache``: read
        (or build) the decoded-pixel cache; without it every epoch decodes the files."""
        cache_dir = self.cache_dir if cache else None

        def as_float(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return tf.cast(images, tf.float32), labels

        train = pipeline.make_dataset(
            self.train,
            size,
            batch_size,
            shuffle=True,
            seed=seed,
            cache_dir=cache_dir,
            split="train",
        )
        val = pipeline.make_dataset(
            self.validation, size, batch_size, cache_dir=cache_dir, split="validation"
        )
        train = train.map(as_float)
        layer = augment_mod.layer(augment, augment_mod.view_seed(augment, seed, 0))
        if layer is not None:
            train = train.map(
                lambda images, labels: (layer(images, training=True), labels),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return train, val.map(as_float)

    def rows(self, split: str) -> pd.DataFrame:
        return self.train if split == "train" else self.validation

    def paths(self, split: str) -> list[str]:
        return self.rows(split)["path"].tolist()

    def pixel_file(self, split: str, size: int) -> Path:
        """Where a split's decoded pixels at ``size`` are cached; its name fingerprints the
        image files (what every feature entry computed from them is keyed by)."""
        return pipeline.cache_file(self.cache_dir, split, size, self.paths(split))

    def cached_pixels(self, split: str, size: int) -> np.ndarray | None:
        """A split's decoded pixels at ``size`` when they are cached, else None."""
        target = self.pixel_file(split, size)
        expected = (len(self.rows(split)), size, size, 3)
        return pipeline.load_checked(target, expected, np.uint8)

    def pixels(self, split: str, size: int) -> tuple[np.ndarray, str]:
        """(uint8 pixels of a split at ``size`` from the decoded cache, decoded into it when
        missing; the cache file's name)."""
        paths = self.paths(split)
        name = self.pixel_file(split, size).name
        return pipeline.decoded_array(paths, size, self.cache_dir, split), name

    def labels(self, split: str) -> np.ndarray:
        return self.rows(split)["class_index"].to_numpy(dtype=np.int32)

    def class_weights(self) -> dict[int, float]:
        """scikit-learn's ``balanced`` weights over the train split."""
        y = self.train["class_index"].to_numpy()
        present = np.unique(y)
        weights = compute_class_weight("balanced", classes=present, y=y)
        return {int(c): float(w) for c, w in zip(present, weights, strict=True)}


class EffNetHyperModel(kt.HyperModel):
    """Keras Tuner hypermodel over the backbone table, head, learning rate and fine-tuning."""

    def __init__(
        self,
        space: space_mod.SearchSpace,
        data: SplitData,
        weights: str | None,
        callbacks_factory=None,
        feature_cache: bool = True,
        jit_compile: bool | str = "auto",
        gpu_free_mib: float | None = None,
    ) -> None:
        super().__init__(name="effnet")
        self.jit_compile = jit_compile  # XLA; "auto" lets Keras decide
        self.gpu_free_mib = gpu_free_mib  # scales the table's default batch sizes
        self.space = space
        self.data = data
        self.weights = weights  # "imagenet", None (random) or a path
        self.callbacks_factory = callbacks_factory  # () -> list of per-fit callbacks
        self.feature_cache = feature_cache  # train frozen heads on cached backbone features
        self.batch_override: int | None = None  # set by out-of-memory retries
        # A refit's last epoch (absolute, as ``epochs``): stop there and keep it.
        self.stop_after: int | None = None
        self.last_fit: dict[str, Any] = {}
        self._frozen_backbone: tuple[tuple[str, int], keras.Model] | None = None
        # Set by the search: the (backbone, size) pairs whose features the frozen stage will
        # want, computed in the first pass over the files from one decode of each, with the
        # activations at the cuts of the fine-tune fractions the search plans.
        self.planned: list[tuple[str, int]] = []
        self.cut_fractions: tuple[float, ...] = ()  # whose cuts' activations come with them
        self.disk: disk.Budget | None = None  # the cache folder's budget (None: no limit)
        self._frozen_fingerprint: tuple[keras.Model, str] | None = None

    def plan(self, hp: kt.HyperParameters) -> TrialPlan:
        values = space_mod.declare(hp, self.space)
        entry = backbones.get(values["backbone"])
        size = values.get("image_size", "native")
        size = entry.size if size == "native" else int(size)
        pass_batch = self.pass_batch(entry)
        train_batch = values.get("train_batch_size", "auto")
        train_batch = (
            auto_train_batch(len(self.data.train), pass_batch, self.space.min_batch_size)
            if train_batch == "auto"
            else int(train_batch)
        )
        if self.batch_override:  # out of memory: both passes and training halve
            pass_batch = min(pass_batch, self.batch_override)
            train_batch = min(train_batch, self.batch_override)
        stage = str(hp.values.get("tuner/stage", ""))
        pretrained = self.weights is not None or entry.constructor == "hub"
        width = int(values["head_width"])
        cached = self.feature_cache and pretrained and self.data.cache_dir is not None
        policy = augment_mod.canonical(str(values.get("augment", augment_mod.NONE)))
        views = int(values.get("augment_views", 1)) if augment_mod.is_on(policy) else 1
        return TrialPlan(
            backbone=entry.name,
            image_size=size,
            batch_size=train_batch,
            head_width=width,
            dropout=float(values["dropout"]),
            learning_rate=float(values["learning_rate"]),
            finetune_fraction=float(values["finetune_fraction"]) if entry.finetunable else 0.0,
            finetune_lr_factor=float(values["finetune_lr_factor"]),
            class_weight=str(values["class_weight"]),
            pretrained=pretrained,
            l2=float(values["l2"]),
            augment=policy,
            augment_views=views,
            pass_batch=pass_batch,
            stage=stage,
            solver="exact" if stage == "frozen" and width == 0 and cached else "adam",
        )

    def pass_batch(self, entry: backbones.Backbone) -> int:
        """The batch of the backbone's forward passes: the table's for an 8 GB card scaled
        to the free GPU memory (at most ``CPU_PASS_BATCH`` without a GPU), or the space's."""
        if self.space.batch_size != "native":
            return int(self.space.batch_size)
        if self.gpu_free_mib:
            return accelerate.scaled_batch(entry.batch, self.gpu_free_mib)
        return min(entry.batch, CPU_PASS_BATCH)

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        plan = self.plan(hp)
        entry = backbones.get(plan.backbone)
        inputs = keras.Input((plan.image_size, plan.image_size, 3), name="pixels")
        x = inputs
        if entry.input_scale != 1.0:
            x = keras.layers.Rescaling(entry.input_scale, name="input_scale")(x)
        base = self._backbone(plan)
        if plan.pretrained:
            base.trainable = False
            # Keras 3 lets an outer training=True override this training=False, so the
            # backbone's own stochastic depth is switched off (non-trainable BatchNorm
            # already uses its moving statistics).
            backbones.inference_mode(base)
            features = base(x, training=False)
        else:
            # From random init the moving statistics must catch up with the batch statistics;
            # at Keras' momentum 0.99 that takes ~300 steps (validation accuracy stays at
            # chance for ~6 epochs of the 1.5k-image demo), at 0.9 about 30.
            for layer in base.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = 0.9
            features = base(x)
        head = head_mod.build_head(
            features.shape[-1], plan.head_width, plan.dropout, self.data.num_classes, plan.l2
        )
        model = keras.Model(inputs, head(features), name=model_name(plan.backbone))
        compile_model(model, plan.learning_rate, self.data.num_classes, self.jit_compile)
        return model

    def _backbone(self, plan: TrialPlan) -> keras.Model:
        """The trial's backbone. A frozen pretrained backbone never changes, so trials on the
        same backbone and size share one built instance (building and loading B0 is ~1.3 s of
        a 2 s trial on cached features); fine-tunes and random init get their own."""
        entry = backbones.get(plan.backbone)
        shared = plan.pretrained and not plan.fine_tunes
        key = (plan.backbone, plan.image_size)
        if shared and self._frozen_backbone is not None and self._frozen_backbone[0] == key:
            return self._frozen_backbone[1]
        base = backbones.build(entry, plan.image_size, self.weights)
        base.name = "backbone"
        # One at a time: a B7 is 64M parameters.
        self._frozen_backbone = (key, base) if shared else self._frozen_backbone
        return base

    def fit(
        self,
        hp: kt.HyperParameters,
        model: keras.Model,
        *args,
        epochs: int | None = None,
        initial_epoch: int = 0,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        **kwargs,
    ) -> dict[str, float]:
        # Under --strategy mirrored the model was built in the strategy's scope: the head
        # trainers and optimizers made here must be too.
        with model.distribute_strategy.scope():
            return self._fit(hp, model, epochs, initial_epoch, callbacks)

    def _fit(
        self,
        hp: kt.HyperParameters,
        model: keras.Model,
        epochs: int | None,
        initial_epoch: int,
        callbacks: Sequence[keras.callbacks.Callback],
    ) -> dict[str, float]:
        plan = self.plan(hp)
        # Facts of this fit only (the runner reads them).
        self.last_fit = {"pass_seconds": 0.0, "ahead_seconds": 0.0}
        epochs = epochs or self.space.epochs
        own = list(self.callbacks_factory()) if self.callbacks_factory else []
        run = _Run(
            model=model,
            plan=plan,
            class_weight=self.data.class_weights() if plan.class_weight == "balanced" else None,
            given=list(callbacks),  # Keras Tuner's: best-epoch checkpoint, progress
            ours=[*own, keras.callbacks.TerminateOnNaN()],
        )
        # What a best epoch restores: what can change in this fit (phase 2 adds the top).
        run.best.track(model.weights if not plan.pretrained else model.get_layer("head").weights)
        if plan.stage == "frozen" and plan.solver == "exact":
            self._fit_linear_head(run)
        elif plan.stage == "frozen":
            self._phase1(run, self.space.head_epochs, 0, converge=True)
        elif plan.stage == "fine-tune":
            self._phase2(run, epochs, initial_epoch)
        else:
            phase1_end = self.phase1_end(plan, epochs, initial_epoch)
            if initial_epoch < self._last(phase1_end):
                self._phase1(run, phase1_end, initial_epoch)
            fine_tunes = plan.fine_tunes and self._last(epochs) > phase1_end
            if fine_tunes and not model.stop_training:
                self._phase2(run, epochs, max(initial_epoch, phase1_end))
        self.last_fit.update(
            history=run.history,
            epochs_run=len(run.history.get("loss", [])),
            plan=plan,
        )
        metrics = best_metrics(run.history)
        if self.stop_after is None:
            run.best.restore()
        return metrics

    def _last(self, until: int) -> int:
        """The epoch a phase planned to end at ``until`` ends at: ``until``, or a refit's
        ``stop_after`` when that comes first."""
        return until if self.stop_after is None else min(until, self.stop_after)

    def _phase1(self, run: _Run, until: int, start: int, converge: bool = False) -> None:
        """The head on the frozen backbone: on cached features when possible, else end to
        end. ``converge``: Adam with cosine decay over ``until`` epochs and early stopping on
        validation loss (a frozen-stage head), else a constant learning rate."""
        plan, model = run.plan, run.model
        steps = math.ceil(len(self.data.train) / plan.batch_size) * (until - start)
        decay = steps if converge else None
        stopping = (
            [keras.callbacks.EarlyStopping("val_loss", patience=self.space.patience)]
            if converge and self.stop_after is None
            else []
        )
        until = self._last(until)  # the schedule above is the searched one; a refit ends early
        if self.uses_feature_cache(plan):
            arrays = self._features(run)
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

    def _phase2(self, run: _Run, until: int, start: int) -> None:
        """Unfreeze the top blocks (whole blocks, BatchNorm frozen) and train them with the
        head at ``learning_rate * finetune_lr_factor``, on cached activations at the cut
        when possible, else end to end."""
        plan, model = run.plan, run.model
        until = self._last(until)
        base = model.get_layer("backbone")
        count = backbones.blocks_for_fraction(base, plan.finetune_fraction)
        self.last_fit["unfrozen_blocks"] = backbones.unfreeze_top(base, count)
        run.best.track(base.trainable_weights)
        rate = plan.learning_rate * plan.finetune_lr_factor
        cached = self.uses_feature_cache(plan) and count < len(backbones.blocks(base))
        if cached:  # the activations at the cut must fit on disk
            cached = self._activations_fit(model, plan, count)
        if cached:
            run.extend(self._fit_top_on_activations(run, count, until, start, rate))
        else:
            compile_model(model, rate, self.data.num_classes, self.jit_compile)
            run.extend(self._end_to_end(run, until, start, run.end_to_end()))

    def _activations_fit(self, model: keras.Model, plan: TrialPlan, count: int) -> bool:
        """Whether the activations at the cut below the top ``count`` blocks (every view of
        the train split, and validation) are cached or fit: augmented views within
        ``VIEW_CACHE_MAX_BYTES``, and what is missing within the cache budget."""
        bottom, top, cut = features.split_backbone(model, count)
        per_image = math.prod(int(d) for d in top.input_shape[1:]) * features.DTYPE().itemsize
        views_bytes = len(self.data.train) * plan.augment_views * per_image
        if plan.augment_views > 1 and views_bytes > VIEW_CACHE_MAX_BYTES:
            return False
        key = features.weights_fingerprint(bottom)
        needed = 0
        for split, views in (("train", plan.augment_views), ("validation", 1)):
            rows = len(self.data.rows(split))
            for view in range(views):
                target = self._target(
                    plan.backbone, plan.image_size, key, split, cut, view, plan.augment
                )
                if features.load_entry(target, rows) is None:
                    needed += rows * per_image
        if self._room(needed, f"activations at {cut}", self._pixels_of(plan.image_size)):
            return True
        self._note("so the fine-tune trains end to end")
        return False

    def _pixels_cacheable(self, size: int) -> bool:
        """Whether an end-to-end fit reads (or builds) the decoded-pixel cache at ``size``:
        yes unless the budget cannot hold it, then every epoch decodes the files."""
        splits = ("train", "validation")
        missing = [s for s in splits if self.data.cached_pixels(s, size) is None]
        rows = sum(len(self.data.rows(s)) for s in missing)
        if self._room(disk.pixel_bytes(rows, size), f"pixels at {size}px"):
            return True
        self._note("so they are decoded from the files every epoch")
        return False

    def _end_to_end(self, run: _Run, until: int, start: int, callbacks) -> keras.callbacks.History:
        plan = run.plan
        train, val = self.data.datasets(
            plan.image_size,
            plan.batch_size,
            self.space.seed,
            plan.augment,
            cache=self._pixels_cacheable(plan.image_size),
        )
        self._augment_path(plan, "end to end")
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

    def _fit_linear_head(self, run: _Run) -> None:
        """A linear head fitted exactly on the cached features (:func:`head.fit_linear`),
        scored like an epoch and reported to the callbacks as one."""
        plan = run.plan
        arrays = self._features(run)
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
        self.last_fit["solver_iterations"] = head_mod.fit_linear(
            head, train, labels, plan.l2, run.class_weight
        )
        self.last_fit["solver_seconds"] = time.monotonic() - started
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

    def phase1_end(self, plan: TrialPlan, epochs: int, initial_epoch: int = 0) -> int:
        """The epoch at which phase 2 starts (``epochs`` when there is none). A trial
        continued from epoch ``initial_epoch`` whose parent had already fine-tuned stays in
        phase 2: training its head again would undo what fine-tuning built on it."""
        if not plan.fine_tunes:
            return epochs
        parent_end = initial_epoch - self.finetune_epochs(initial_epoch)
        if initial_epoch > 0 and parent_end < initial_epoch:
            return parent_end
        return epochs - self.finetune_epochs(epochs)

    def uses_feature_cache(self, plan: TrialPlan) -> bool:
        """Phase 1 trains the head on cached features when the backbone is frozen and fixed
        (pretrained weights), caching is on and there is a cache folder."""
        return self.feature_cache and plan.pretrained and self.data.cache_dir is not None

    def _cached(
        self,
        make_net,
        weights_key: str,
        plan: TrialPlan,
        split: str,
        cut: str = "pooled",
        view: int = 0,
    ) -> np.ndarray:
        """A split's cached backbone outputs (features, or activations at ``cut``) of the
        part of the backbone whose weights' fingerprint is ``weights_key``; ``view`` > 0:
        of that augmented view of the images (:mod:`tuner.model.augment`).

        When it must be computed, the pass reads the split's cached pixels at this size if
        there are any, else decodes the image files; a plain pass over the files also
        computes the passes planned ahead (:meth:`_ahead`), from one decode of each file."""
        size, rows = plan.image_size, len(self.data.rows(split))
        target = self._target(plan.backbone, size, weights_key, split, cut, view, plan.augment)
        found = features.load_entry(target, rows)
        self.last_fit.setdefault("cache", []).append("loaded" if found is not None else "computed")
        if found is not None:
            return found
        augment = (
            augment_mod.layer(
                plan.augment, augment_mod.view_seed(plan.augment, self.space.seed, view)
            )
            if view
            else None
        )
        what = f"{split} {cut} outputs of {plan.backbone} {size}px"
        nbytes = rows * features.DTYPE().itemsize * _entry_size(make_net())
        if not self._room(nbytes, what, self._pixels_of(size)):
            raise kt.errors.FailedTrialError(
                f"the cache budget ({disk.format_bytes(self.disk.limit)}) cannot hold the {what}"
                f" even after evicting older entries: raise --cache-budget"
            )
        started = time.monotonic()
        pixels = self.data.cached_pixels(split, size)
        passes = []
        if pixels is None and cut == "pooled" and not view:
            passes = self._ahead(split, (plan.backbone, size), target)
        if not any(p.target == target for p in passes):
            passes.insert(
                0, features.feature_pass(make_net(), target, size, plan.pass_batch, augment)
            )
        source = self.data.paths(split) if pixels is None else {size: pixels}
        spent = features.run_passes(source, rows, passes)
        # What the oracle budgets by: this feature set's pass (its forward and the decoding),
        # apart from the passes computed ahead for other feature sets in the same sweep.
        own = spent.get(target, 0.0) + spent["decode"]
        self.last_fit["pass_seconds"] += own
        self.last_fit["ahead_seconds"] += max(time.monotonic() - started - own, 0.0)
        return features.load_entry(target, rows)

    def _target(
        self,
        backbone: str,
        size: int,
        weights_key: str,
        split: str,
        cut: str = "pooled",
        view: int = 0,
        policy: str = augment_mod.NONE,
    ) -> Path:
        view_key = features.view_name(policy, self.space.seed, view) if view else ""
        source = self.data.pixel_file(split, size).name
        return features.cache_file(
            self.data.cache_dir, backbone, size, weights_key, split, source, cut, view_key
        )

    def _ahead(self, split: str, current: tuple[str, int], target: Path) -> list[features.Pass]:
        """The passes a plain pass over a split's files computes in the same sweep (one
        decode of each file): for each planned (backbone, size) (:attr:`planned`; ``current``
        is the one asked for, whose pooled features go to ``target``) its pooled features and
        the activations at the cuts of :attr:`cut_fractions`, those not cached yet and
        fitting in the budget's free room (nothing is evicted for them)."""
        rows = len(self.data.rows(split))
        passes, room = [], self.disk.room() if self.disk else math.inf
        # The one asked for first: its features must be computed (their room is reserved).
        for backbone, size in sorted(self.planned, key=lambda pair: pair != current):
            entry = backbones.get(backbone)
            base = backbones.build(entry, size, self.weights)
            backbones.inference_mode(base)
            pooled = self._target(backbone, size, features.weights_fingerprint(base), split)
            if (backbone, size) == current and pooled != target:
                continue  # other weights than the trial's (cannot happen): its own pass
            cuts = self._cuts(base, entry) if entry.finetunable else {}
            wanted = {
                self._target(backbone, size, key, split, name): name for name, key in cuts.items()
            }
            wanted = {t: n for t, n in wanted.items() if features.load_entry(t, rows) is None}
            if features.load_entry(pooled, rows) is not None and not wanted:
                continue
            made = self._pass_ahead(base, entry, size, pooled, wanted)
            if rows * made.bytes > room and (backbone, size) == current:
                made = self._pass_ahead(base, entry, size, pooled, {})  # without the cuts
            if rows * made.bytes <= room or (backbone, size) == current:
                passes.append(made)
                room -= rows * made.bytes
            else:
                self._note(f"{backbone} {size}px not computed ahead for {split} (cache budget)")
        return passes

    def _pass_ahead(
        self, base: keras.Model, entry, size: int, pooled: Path, cuts: dict[Path, str]
    ) -> features.Pass:
        """The pass of a backbone built on its own: pooled features, and the activations at
        ``cuts`` ({target: cut layer name}) from the same forward."""
        net = features.backbone_extractor(base, size, entry.input_scale, list(cuts.values()))
        return features.feature_pass(net, pooled, size, self.pass_batch(entry), None, list(cuts))

    def _cuts(self, base: keras.Model, entry: backbones.Backbone) -> dict[str, str]:
        """{cut layer name: fingerprint of the weights below it} for each fine-tune fraction
        the search plans (:attr:`cut_fractions`) that leaves a frozen bottom."""
        units = len(backbones.blocks(base))
        out = {}
        for fraction in self.cut_fractions:
            count = backbones.blocks_for_fraction(base, fraction)
            if 0 < count < units:
                layer = features.cut_layer(base, count)
                bottom = keras.Model(base.input, layer.output)
                out[layer.name] = features.weights_fingerprint(bottom)
        return out

    def _pixels_of(self, size: int) -> frozenset[Path]:
        return frozenset(self.data.pixel_file(s, size) for s in ("train", "validation"))

    def _room(self, nbytes: int, what: str, keep: frozenset[Path] = frozenset()) -> bool:
        """Whether the cache budget holds ``nbytes`` more (evicting the least recently read
        entries when it must; each eviction noted on the trial line)."""
        if self.disk is None:
            return True
        fits, evicted = self.disk.admit(nbytes, keep)
        for path, size in evicted:
            self._note(f"evicted {path.parent.name}/{path.name} ({disk.format_bytes(size)})")
        if not fits:
            self._note(f"{what} ({disk.format_bytes(nbytes)}) over the cache budget")
        return fits

    def _note(self, text: str) -> None:
        """A line of what the cache budget changed in this fit (the trial line says it)."""
        self.last_fit.setdefault("cache_notes", []).append(text)

    def _features(self, run: _Run) -> dict[str, np.ndarray]:
        """The train and validation splits' cached pooled features (one backbone pass per
        split for the whole search)."""
        model = run.model
        make_net = functools.cache(lambda: features.extractor(model))  # built once, if needed
        key = self._fingerprint(model.get_layer("backbone"))
        return {
            "train": self._train_views(run.plan, make_net, key),
            "validation": self._cached(make_net, key, run.plan, "validation"),
        }

    def _train_views(
        self, plan: TrialPlan, make_net, key: str, cut: str = "pooled"
    ) -> np.ndarray | list[np.ndarray]:
        """The train split's cached outputs: one array, or with augmentation a list of the
        plan's views (view 0 is the images themselves, shared with un-augmented trials; the
        others are cached per policy, seed and index, so 8 views reuse 4)."""
        views = [
            self._cached(make_net, key, plan, "train", cut, view)
            for view in range(plan.augment_views)
        ]
        if plan.augment_views > 1:
            where = "cached views" if cut == "pooled" else f"cached views at {cut}"
            self._augment_path(plan, f"{where} ({plan.augment_views})")
        return views if len(views) > 1 else views[0]

    def _augment_path(self, plan: TrialPlan, path: str) -> None:
        """Records how this fit augments (a trial line and trials.csv say it)."""
        if augment_mod.is_on(plan.augment):
            paths = self.last_fit.setdefault("augment_path", [])
            if path not in paths:
                paths.append(path)

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

    def _fit_top_on_activations(
        self, run: _Run, top_blocks: int, epochs: int, initial_epoch: int, rate: float
    ) -> keras.callbacks.History:
        """Phase 2 on activations cached at the cut (the output of the last frozen block):
        only the unfrozen top blocks and the head run, forward and backward."""
        model = run.model
        bottom, top, cut = features.split_backbone(model, top_blocks)
        make_net = functools.cache(lambda: features.extractor(model, bottom))
        key = features.weights_fingerprint(bottom)
        arrays = {
            "train": self._train_views(run.plan, make_net, key, cut),
            "validation": self._cached(make_net, key, run.plan, "validation", cut),
        }
        inputs = keras.Input(top.input_shape[1:], name="activations")
        # Inference mode as in `build` (its stochastic depth is off: `inference_mode`).
        outputs = model.get_layer("head")(top(inputs, training=False))
        trainer = keras.Model(inputs, outputs, name="top_and_head")
        compile_model(
            trainer, rate, self.data.num_classes, self.jit_compile, CACHED_STEPS_PER_EXECUTION
        )
        self.last_fit["activation_cut"] = cut
        return self._fit_on_cache(trainer, run, arrays, epochs, initial_epoch, run.on_cache())

    def _fingerprint(self, base: keras.Model) -> str:
        """:func:`features.weights_fingerprint` of ``base``, computed once for the shared
        frozen backbone (its weights never change)."""
        shared = self._frozen_backbone is not None and self._frozen_backbone[1] is base
        if shared and self._frozen_fingerprint and self._frozen_fingerprint[0] is base:
            return self._frozen_fingerprint[1]
        key = features.weights_fingerprint(base)
        if shared:
            self._frozen_fingerprint = (base, key)
        return key

    def finetune_epochs(self, epochs: int) -> int:
        """Phase-2 epochs out of ``epochs``: the space's setting, else half (at least 1)."""
        wanted = self.space.finetune_epochs or math.ceil(epochs / 2)
        return min(wanted, max(epochs - 1, 0))


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


def auto_train_batch(train_rows: int, pass_batch: int, floor: int) -> int:
    """The largest power of two that still gives ``MIN_STEPS_PER_EPOCH`` optimizer steps an
    epoch over ``train_rows`` images, between ``floor`` and ``pass_batch`` (1,800 images:
    32, 57 steps; 19,658: 512 where memory allows)."""
    wanted = max(1, train_rows // MIN_STEPS_PER_EPOCH)
    power = 1 << (wanted.bit_length() - 1)
    return max(floor, min(power, pass_batch))


@dataclass
class _Run:
    """One ``fit`` of a trial: its model and plan, the callbacks, the history so far."""

    model: keras.Model
    plan: TrialPlan
    class_weight: dict[int, float] | None
    given: list  # Keras Tuner's callbacks: they must see the whole model
    ours: list
    history: dict[str, list[float]] = field(default_factory=dict)
    best: BestEpoch = field(default_factory=lambda: BestEpoch())

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
    """Keeps the values of the tracked variables at the epoch with the lowest validation
    loss (the first, on ties: as :func:`best_epoch`); :meth:`restore` puts them back.

    One instance serves every ``fit`` of a trial, whatever part of the model each trains:
    variables tracked later (the top blocks unfrozen for phase 2) are recorded at their
    value when tracked, which is their value at any earlier best epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.best = math.inf
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
        if value is None or math.isnan(value) or value >= self.best:
            return
        self.best = float(value)
        self.saved = {
            key: keras.ops.convert_to_numpy(variable).copy()
            for key, variable in self.variables.items()
        }

    def restore(self) -> None:
        for key, value in (self.saved or {}).items():
            self.variables[key].assign(value)


def model_name(backbone: str) -> str:
    """``effnet_b0``; a hub handle's path or URL reduced to the characters Keras allows."""
    return "effnet_" + re.sub(r"[^a-z0-9_.-]+", "_", backbone.lower()).strip("_")


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
    """Index of the epoch with the lowest val loss (the first, on ties; NaN never wins)."""
    losses = np.asarray(history[BEST_EPOCH_METRIC], dtype=float)
    return int(np.argmin(np.where(np.isnan(losses), np.inf, losses)))


def _entry_size(net: keras.Model) -> int:
    """Values of one image's entry of ``net``'s (first) output."""
    shape = net.output_shape[0] if isinstance(net.output_shape, list) else net.output_shape
    return math.prod(int(d) for d in shape[1:])
