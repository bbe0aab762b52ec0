"""The hypermodel: ``build(hp)`` is the model, ``fit(hp, model, ...)`` is its training.

The model is ``pixels (float, 0..255) -> [rescale] -> backbone -> head``, with the backbone
and the head as two named sub-models (``backbone``, ``head``) so the head can later be
trained on cached backbone features without changing either.

Training, with pretrained weights:

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

``fit`` leaves the model at its best epoch (highest validation accuracy, the first on ties),
the epoch whose numbers it returns: what a trial records is what it keeps and ships.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from data_tools import pipeline
from tuner import accelerate, backbones, features
from tuner import space as space_mod

# Cached features or activations up to this size (as float32) are trained on in memory
# (under the 2 GB limit of a tensor in a tf.data graph).
IN_MEMORY_BYTES = 1024**3
# Training on cached arrays takes many tiny steps; one call per step spends more time in
# dispatch than in arithmetic (2.5 ms a step for a Dense head on B0 features): run 16 per
# call (the same updates, callbacks see every 16th batch).
CACHED_STEPS_PER_EXECUTION = 16


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial's values and the backbone table decide, as plain data."""

    backbone: str
    image_size: int
    batch_size: int
    head_width: int
    dropout: float
    learning_rate: float
    finetune_fraction: float
    finetune_lr_factor: float
    class_weight: str
    pretrained: bool

    @property
    def fine_tunes(self) -> bool:
        return self.pretrained and self.finetune_fraction > 0

    @property
    def mode(self) -> str:
        """``fine-tuned``, ``frozen`` (pretrained backbone) or ``whole-network`` (random init)."""
        if not self.pretrained:
            return "whole-network"
        return "fine-tuned" if self.fine_tunes else "frozen"


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
        self, size: int, batch_size: int, seed: int
    ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        """(train, validation) as float32 pixels in 0..255 and int32 labels."""

        def as_float(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return tf.cast(images, tf.float32), labels

        train = pipeline.make_dataset(
            self.train,
            size,
            batch_size,
            shuffle=True,
            seed=seed,
            cache_dir=self.cache_dir,
            split="train",
        )
        val = pipeline.make_dataset(
            self.validation, size, batch_size, cache_dir=self.cache_dir, split="validation"
        )
        return train.map(as_float), val.map(as_float)

    def rows(self, split: str) -> pd.DataFrame:
        return self.train if split == "train" else self.validation

    def pixels(self, split: str, size: int) -> tuple[np.ndarray, str]:
        """(uint8 pixels of a split at ``size`` from the decoded cache, the cache file's name,
        which fingerprints the image files)."""
        paths = self.rows(split)["path"].tolist()
        name = pipeline.cache_file(self.cache_dir, split, size, paths).name
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
        self.last_fit: dict[str, Any] = {}
        self._frozen_backbone: tuple[tuple[str, int], keras.Model] | None = None
        self._frozen_fingerprint: tuple[keras.Model, str] | None = None

    def plan(self, hp: kt.HyperParameters) -> TrialPlan:
        values = space_mod.declare(hp, self.space)
        entry = backbones.get(values["backbone"])
        size = values.get("image_size", "native")
        size = entry.size if size == "native" else int(size)
        batch = (
            accelerate.scaled_batch(entry.batch, self.gpu_free_mib)
            if self.space.batch_size == "native"
            else int(self.space.batch_size)
        )
        return TrialPlan(
            backbone=entry.name,
            image_size=size,
            batch_size=self.batch_override or batch,
            head_width=int(values["head_width"]),
            dropout=float(values["dropout"]),
            learning_rate=float(values["learning_rate"]),
            finetune_fraction=float(values["finetune_fraction"]) if entry.finetunable else 0.0,
            finetune_lr_factor=float(values["finetune_lr_factor"]),
            class_weight=str(values["class_weight"]),
            pretrained=self.weights is not None,
        )

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
        head = build_head(features.shape[-1], plan.head_width, plan.dropout, self.data.num_classes)
        model = keras.Model(inputs, head(features), name=f"effnet_{plan.backbone.lower()}")
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
        self.last_fit = {}  # facts of this fit only (the runner reads them after)
        epochs = epochs or self.space.epochs
        weights = self.data.class_weights() if plan.class_weight == "balanced" else None
        own = list(self.callbacks_factory()) if self.callbacks_factory else []
        given = list(callbacks)  # Keras Tuner's: progress to the oracle, best-epoch checkpoint
        best = BestEpoch()
        ours = [best, *own, keras.callbacks.TerminateOnNaN()]
        callbacks = [*given, *ours]
        # On the cached paths a part of the model trains; Keras Tuner's callbacks see it whole.
        on_cache = [*(features.ForModel(cb, model) for cb in given), *ours]
        phase1_end = self.phase1_end(plan, epochs, initial_epoch)
        history: dict[str, list[float]] = {}
        # Pixel datasets only for the end-to-end paths (the cached paths never touch pixels).
        datasets = functools.cache(
            lambda: self.data.datasets(plan.image_size, plan.batch_size, self.space.seed)
        )

        def end_to_end(until: int, start: int) -> keras.callbacks.History:
            train, val = datasets()
            return model.fit(
                train,
                epochs=until,
                initial_epoch=start,
                validation_data=val,
                class_weight=weights,
                callbacks=callbacks,
                verbose=0,
                shuffle=False,  # the dataset shuffles itself (Keras warns it ignores the flag)
            )

        # What a best epoch restores: what can change in this fit (phase 2 adds the top).
        best.track(model.weights if not plan.pretrained else model.get_layer("head").weights)
        if initial_epoch < phase1_end and self.uses_feature_cache(plan):
            _extend(
                history,
                self._fit_head_on_features(
                    model, plan, phase1_end, initial_epoch, weights, on_cache
                ),
            )
        elif initial_epoch < phase1_end:
            _extend(history, end_to_end(phase1_end, initial_epoch))
        if plan.fine_tunes and epochs > phase1_end and not model.stop_training:
            base = model.get_layer("backbone")
            count = backbones.blocks_for_fraction(base, plan.finetune_fraction)
            self.last_fit["unfrozen_blocks"] = backbones.unfreeze_top(base, count)
            best.track(base.trainable_weights)
            start = max(initial_epoch, phase1_end)
            if self.uses_feature_cache(plan) and count < len(backbones.blocks(base)):
                _extend(
                    history,
                    self._fit_top_on_activations(
                        model, plan, count, epochs, start, weights, on_cache
                    ),
                )
            else:
                compile_model(
                    model,
                    plan.learning_rate * plan.finetune_lr_factor,
                    self.data.num_classes,
                    self.jit_compile,
                )
                _extend(history, end_to_end(epochs, start))
        self.last_fit.update(
            history=history,
            epochs_run=len(history.get("loss", [])),
            plan=plan,
        )
        metrics = best_metrics(history)
        best.restore()
        return metrics

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
        self, make_net, weights_key: str, plan: TrialPlan, split: str, cut: str = "pooled"
    ) -> np.ndarray:
        """A split's cached backbone outputs (features, or activations at ``cut``) of the
        part of the backbone whose weights' fingerprint is ``weights_key``."""
        pixels, source = self.data.pixels(split, plan.image_size)
        target = features.cache_file(
            self.data.cache_dir, plan.backbone, plan.image_size, weights_key, split, source, cut
        )
        self.last_fit.setdefault("cache", []).append("loaded" if target.exists() else "computed")
        return features.cached_features(make_net, pixels, target)

    def _fit_on_cache(
        self,
        trainer: keras.Model,
        model: keras.Model,
        plan: TrialPlan,
        arrays: dict[str, np.ndarray],
        epochs: int,
        initial_epoch: int,
        class_weight,
        callbacks,
    ) -> keras.callbacks.History:
        """Fit ``trainer`` (head, or trainable top + head) on cached arrays; Keras Tuner's
        callbacks see the full ``model``. Arrays that fit in memory (pooled features always
        do) are trained on in memory; larger ones (activations of big images) stream from
        their memory map batch by batch."""
        labels = {split: self.data.labels(split) for split in arrays}
        if sum(a.size for a in arrays.values()) * 4 <= IN_MEMORY_BYTES:
            # tf.data over in-memory tensors: 1.6x faster than fit(x=numpy) for a small head.
            def dataset(split: str) -> tf.data.Dataset:
                x = np.asarray(arrays[split], dtype=np.float32)
                return tf.data.Dataset.from_tensor_slices((x, labels[split]))

            train = dataset("train").shuffle(
                len(labels["train"]), seed=self.space.seed, reshuffle_each_iteration=True
            )
            train = train.batch(plan.batch_size).prefetch(tf.data.AUTOTUNE)
            val = dataset("validation").batch(plan.batch_size).prefetch(tf.data.AUTOTUNE)
        else:
            train = pipeline.array_dataset(
                arrays["train"],
                labels["train"],
                plan.batch_size,
                shuffle=True,
                seed=self.space.seed,
            )
            val = pipeline.array_dataset(
                arrays["validation"], labels["validation"], plan.batch_size
            )
        result = trainer.fit(
            train,
            shuffle=False,  # the dataset shuffles itself
            validation_data=val,
            epochs=epochs,
            initial_epoch=initial_epoch,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=0,
        )
        model.stop_training = trainer.stop_training
        return result

    def _fit_head_on_features(
        self,
        model: keras.Model,
        plan: TrialPlan,
        epochs: int,
        initial_epoch: int,
        class_weight,
        callbacks,
    ) -> keras.callbacks.History:
        """Phase 1 on cached backbone features: one backbone pass per split for the whole
        search, then only the head trains (it is the same layer object as in ``model``)."""
        make_net = functools.cache(lambda: features.extractor(model))  # built once, if needed
        key = self._fingerprint(model.get_layer("backbone"))
        arrays = {
            split: self._cached(make_net, key, plan, split) for split in ("train", "validation")
        }
        head = model.get_layer("head")
        compile_model(
            head,
            plan.learning_rate,
            self.data.num_classes,
            self.jit_compile,
            CACHED_STEPS_PER_EXECUTION,
        )
        return self._fit_on_cache(
            head, model, plan, arrays, epochs, initial_epoch, class_weight, callbacks
        )

    def _fit_top_on_activations(
        self,
        model: keras.Model,
        plan: TrialPlan,
        top_blocks: int,
        epochs: int,
        initial_epoch: int,
        class_weight,
        callbacks,
    ) -> keras.callbacks.History:
        """Phase 2 on activations cached at the cut (the output of the last frozen block):
        only the unfrozen top blocks and the head run, forward and backward."""
        bottom, top, cut = features.split_backbone(model, top_blocks)
        make_net = functools.cache(lambda: features.extractor(model, bottom))
        key = features.weights_fingerprint(bottom)
        arrays = {
            split: self._cached(make_net, key, plan, split, cut)
            for split in ("train", "validation")
        }
        inputs = keras.Input(top.input_shape[1:], name="activations")
        # Inference mode as in `build` (its stochastic depth is off: `inference_mode`).
        outputs = model.get_layer("head")(top(inputs, training=False))
        trainer = keras.Model(inputs, outputs, name="top_and_head")
        compile_model(
            trainer,
            plan.learning_rate * plan.finetune_lr_factor,
            self.data.num_classes,
            self.jit_compile,
            CACHED_STEPS_PER_EXECUTION,
        )
        self.last_fit["activation_cut"] = cut
        return self._fit_on_cache(
            trainer, model, plan, arrays, epochs, initial_epoch, class_weight, callbacks
        )

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
        value = (logs or {}).get("val_accuracy")
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


def build_head(features: int, width: int, dropout: float, num_classes: int) -> keras.Model:
    """Pooled features -> [Dense(width, relu) -> Dropout] -> Dense(1, sigmoid) or
    Dense(C, softmax). ``width == 0`` is a linear head (dropout still applies)."""
    inputs = keras.Input((features,), name="features")
    x = inputs
    if width > 0:
        x = keras.layers.Dense(width, activation="relu", name="hidden")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    if num_classes == 2:
        # float32 outputs even under mixed precision: probabilities near 0 and 1 need it.
        outputs = keras.layers.Dense(1, activation="sigmoid", name="probability", dtype="float32")(
            x
        )
    else:
        outputs = keras.layers.Dense(
            num_classes, activation="softmax", name="probabilities", dtype="float32"
        )(x)
    return keras.Model(inputs, outputs, name="head")


def compile_model(
    model: keras.Model,
    learning_rate: float,
    num_classes: int,
    jit_compile: bool | str = "auto",
    steps_per_execution: int = 1,
) -> None:
    """Adam, and the loss that matches the head (keywords: compile's third positional
    argument is loss_weights in Keras 3)."""
    loss = "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


def _extend(history: dict[str, list[float]], result: keras.callbacks.History) -> None:
    for key, values in result.history.items():
        history.setdefault(key, []).extend(float(v) for v in values)


def best_metrics(history: dict[str, list[float]]) -> dict[str, float]:
    """The epoch with the best val accuracy: its val accuracy and loss, train accuracy and
    loss. Raises when the loss became NaN (the trial failed)."""
    losses = history.get("loss", [])
    if not losses or any(math.isnan(v) for v in losses + history.get("val_loss", [])):
        at = next((i + 1 for i, v in enumerate(losses) if math.isnan(v)), len(losses))
        raise kt.errors.FailedTrialError(f"loss became NaN at epoch {at}")
    best = best_epoch(history)
    return {key: values[best] for key, values in history.items()}


def best_epoch(history: dict[str, list[float]]) -> int:
    """Index of the epoch with the best val accuracy (the first, on ties)."""
    return int(np.argmax(history["val_accuracy"]))
