"""The hypermodel: ``build(hp)`` is the model, ``fit(hp, model, ...)`` is its training.

This module plans a trial (:class:`~tuner.model.trial_plan.TrialPlan`) and builds its model.
:class:`EffNetHyperModel` composes two parts with one job each: a
:class:`~tuner.model.caching.FeatureStore` (``store``: the feature and activation caches, the
passes that fill them, the disk budget) and a :class:`~tuner.model.training.Trainer`
(``trainer``: every fit path). The splits are :class:`~tuner.model.splits.SplitData`.

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

``fit`` leaves the model at its best epoch (highest validation accuracy, the first on ties),
the epoch whose numbers it returns: what a trial records is what it keeps and ships.

A refit (``export_best --refit``) sets ``stop_after``: ``fit`` then trains the same schedule
(the same phases, learning rates and decay) but stops at that epoch and keeps it, with no
early stopping and no return to a best epoch: its validation rows are part of its training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt

from tuner.model import accelerate, backbones
from tuner.model import augment as augment_mod
from tuner.model import head as head_mod
from tuner.model import space as space_mod
from tuner.model.caching import FeatureStore
from tuner.model.splits import SplitData
from tuner.model.training import Trainer, compile_model
from tuner.model.trial_plan import CPU_PASS_BATCH, STAGES, FitFacts, TrialPlan

__all__ = [
    "CPU_PASS_BATCH",
    "STAGES",
    "EffNetHyperModel",
    "FitFacts",
    "SplitData",
    "TrialPlan",
    "auto_train_batch",
    "model_name",
]

# "auto" training batch: the largest power of two that leaves this many steps an epoch.
MIN_STEPS_PER_EPOCH = 30


class EffNetHyperModel(kt.HyperModel):
    """Keras Tuner hypermodel over the backbone table, head, learning rate and fine-tuning.

    Plans a trial (:meth:`plan`) and builds its model (:meth:`build`); :meth:`fit` hands the
    training to :attr:`trainer`, on the caches of :attr:`store` (where the search sets what
    it plans and the disk budget), and keeps what the fit did in :attr:`last_fit`."""

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
        self.gpu_free_mib = gpu_free_mib  # scales the table's default batch sizes
        self.space = space
        self.data = data
        self.weights = weights  # "imagenet", None (random) or a path
        self.callbacks_factory = callbacks_factory  # () -> list of per-fit callbacks
        self.batch_override: int | None = None  # set by out-of-memory retries
        # A refit's last epoch (absolute, as ``epochs``): stop there and keep it.
        self.stop_after: int | None = None
        self.last_fit = FitFacts()
        self._frozen_backbone: tuple[tuple[str, int, str], keras.Model] | None = None
        # The search sets the store's planned feature sets, cut fractions and disk budget.
        self.store = FeatureStore(data, space.seed, weights, self.pass_batch, feature_cache)
        self.trainer = Trainer(data, space, self.store, jit_compile)

    @property
    def jit_compile(self) -> bool | str:
        return self.trainer.jit_compile

    @classmethod
    def from_data(
        cls,
        data: str | Path,
        images: str | Path | None = None,
        *,
        space: str | Path = "default",
        weights: str = "imagenet",
        directory: str | Path = "results/hypermodel",
        key: str = "auto",
        **settings: Any,
    ) -> EffNetHyperModel:
        """A hypermodel over a label file, for any Keras Tuner tuner::

            model = EffNetHyperModel.from_data("label.csv", images="images/", space="quick")
            tuner = kt.RandomSearch(model, objective="val_accuracy", max_trials=10)
            tuner.search()  # the data is the hypermodel's own: no x, no y

        ``data`` is what ``tuner.search`` takes (a split file, a label file split into
        ``directory`` as the search splits it, or a class folder); ``space`` a shipped space's
        name or a YAML file, ``settings`` its keys (``backbones=["B0"]``); ``weights`` as
        ``--weights``. Decoded pixels are cached under ``directory``. Trials train end to
        end: each builds its backbone and head and trains phase 1, then phase 2 when it
        fine-tunes (the ``transfer`` algorithm's stages are ``tuner.search``'s own)."""
        from data_tools import split

        chosen = space_mod.load(str(space), settings)
        folder = Path(directory)
        found = split.search_table(data, images, folder / "split_label.csv", key=key)
        resolved, _ = backbones.resolve_weights(weights, chosen.backbones)
        cache = folder / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        return cls(chosen, SplitData(found.table, found.classes, cache_dir=str(cache)), resolved)

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
        cached = self.store.caches(pretrained)
        policy = augment_mod.canonical(str(values.get("augment", augment_mod.NONE)))
        views = int(values.get("augment_views", 1)) if augment_mod.is_on(policy) else 1
        # A hub module has no stages to tap; a pretrained head on stage features is frozen.
        seen = backbones.features_read(entry, values.get("features", "top"))
        tunes = entry.finetunable and (seen == "top" or not pretrained)
        partner = str(hp.values.get("partner") or "")
        if partner:  # a paired head: frozen, on both backbones' features
            tunes = False
            partner = backbones.get(partner).name
            paired = backbones.features_read(
                backbones.get(partner), hp.values.get("partner_features") or "top"
            )
        return TrialPlan(
            backbone=entry.name,
            image_size=size,
            batch_size=train_batch,
            head_width=width,
            dropout=float(values["dropout"]),
            learning_rate=float(values["learning_rate"]),
            finetune_fraction=float(values["finetune_fraction"]) if tunes else 0.0,
            finetune_lr_factor=float(values["finetune_lr_factor"]),
            class_weight=str(values["class_weight"]),
            pretrained=pretrained,
            l2=float(values["l2"]),
            augment=policy,
            augment_views=views,
            pass_batch=pass_batch,
            stage=stage,
            solver="exact" if stage == "frozen" and width == 0 and cached else "adam",
            features=seen,
            partner=partner,
            partner_features=paired if partner else "",
        )

    def fit(
        self,
        hp: kt.HyperParameters,
        model: keras.Model,
        *args: Any,
        epochs: int | None = None,
        initial_epoch: int = 0,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        **kwargs: Any,
    ) -> dict[str, float]:
        """Train the trial's model (:meth:`Trainer.fit`); Keras Tuner's positional data
        arguments are unused (the data is the hypermodel's own)."""
        self.last_fit = FitFacts()
        own = list(self.callbacks_factory()) if self.callbacks_factory else []
        return self.trainer.fit(
            self.plan(hp),
            model,
            self.last_fit,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            own_callbacks=own,
            stop_after=self.stop_after,
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
        inputs = keras.Input((plan.image_size, plan.image_size, 3), name="pixels")
        features = self._branch(inputs, plan, "backbone")
        name = model_name(plan.backbone)
        if plan.partner:  # a paired head reads both backbones' features, side by side
            second = self._branch(inputs, plan.partner_plan(), "partner")
            features = keras.layers.Concatenate(name="paired_features")([features, second])
            name = f"{name}_{model_name(plan.partner).removeprefix('effnet_')}"
        head = head_mod.build_head(
            features.shape[-1], plan.head_width, plan.dropout, self.data.num_classes, plan.l2
        )
        model = keras.Model(inputs, head(features), name=name)
        compile_model(model, plan.learning_rate, self.data.num_classes, self.jit_compile)
        return model

    def _branch(self, inputs, plan: TrialPlan, name: str):
        """``inputs -> [rescale] -> backbone`` as the sub-model ``name`` (``backbone``, or a
        paired head's ``partner``, whose rescale layer is ``partner_input_scale``)."""
        entry = backbones.get(plan.backbone)
        x = inputs
        if entry.input_scale != 1.0:
            scale = "input_scale" if name == "backbone" else f"{name}_input_scale"
            x = keras.layers.Rescaling(entry.input_scale, name=scale)(x)
        base = self._backbone(plan, name)
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
        return features

    def _backbone(self, plan: TrialPlan, name: str = "backbone") -> keras.Model:
        """The trial's backbone, the sub-model ``name``. A frozen pretrained backbone never
        changes, so trials on the same backbone and size share one built instance (building
        and loading B0 is ~1.3 s of a 2 s trial on cached features); fine-tunes, random init
        and a paired head's ``partner`` get their own."""
        entry = backbones.get(plan.backbone)
        shared = plan.pretrained and not plan.fine_tunes and name == "backbone"
        key = (plan.backbone, plan.image_size, plan.features)
        if shared and self._frozen_backbone is not None and self._frozen_backbone[0] == key:
            return self._frozen_backbone[1]
        base = backbones.build(entry, plan.image_size, self.weights)
        if plan.features == "stages":
            base = backbones.with_stages(base)
        base.name = name
        # One at a time: a B7 is 64M parameters.
        self._frozen_backbone = (key, base) if shared else self._frozen_backbone
        return base


def auto_train_batch(train_rows: int, pass_batch: int, floor: int) -> int:
    """The largest power of two that still gives ``MIN_STEPS_PER_EPOCH`` optimizer steps an
    epoch over ``train_rows`` images, between ``floor`` and ``pass_batch`` (1,800 images:
    32, 57 steps; 19,658: 512 where memory allows)."""
    wanted = max(1, train_rows // MIN_STEPS_PER_EPOCH)
    power = 1 << (wanted.bit_length() - 1)
    return max(floor, min(power, pass_batch))


def model_name(backbone: str) -> str:
    """``effnet_b0``; a hub handle's path or URL reduced to the characters Keras allows."""
    return "effnet_" + re.sub(r"[^a-z0-9_.-]+", "_", backbone.lower()).strip("_")
