"""What is shipped is what was measured: the best epoch's weights are kept, a frozen backbone
is really frozen (no stochastic depth during fit), caches are keyed by the weights that made
them, a continued fine-tune stays fine-tuning, and official notop files from a folder
compute what ``--weights imagenet`` computes."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import keras_tuner as kt
import numpy as np
import pytest

from tests.test_hypermodel import demo_data
from tuner.engine import adapter
from tuner.model import backbones, features, hypermodel, space, training


def maker_for(demo_dir: Path, tmp_path: Path, weights, **values) -> hypermodel.EffNetHyperModel:
    fixed = {
        "backbones": ["T0"],
        "finetune_fraction": 0.0,
        "head_width": 0,
        "dropout": 0.0,
        "epochs": 4,
        "learning_rate": 0.01,
        "class_weight": "none",
        **values,
    }
    return hypermodel.EffNetHyperModel(
        space.load(None, fixed),
        demo_data(demo_dir, tmp_path),
        None if weights is None else str(weights),
    )


class RuinLastEpoch(keras.callbacks.Callback):
    """Negates the head's output layer before the last epoch: that epoch is then the worst,
    so the best epoch is an earlier one."""

    def __init__(self, model: keras.Model, last: int) -> None:
        super().__init__()
        self.full_model, self.last = model, last

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if epoch == self.last - 1:
            layer = self.full_model.get_layer("head").get_layer("probabilities")
            for variable in layer.weights:
                variable.assign(-10 * variable)


def validation_accuracy(maker: hypermodel.EffNetHyperModel, model: keras.Model) -> float:
    pixels, _ = maker.data.pixels("validation", 32)
    predicted = model.predict(np.asarray(pixels, dtype="float32"), verbose=0).argmax(axis=1)
    return float((predicted == maker.data.labels("validation")).mean())


@pytest.mark.parametrize(
    "values",
    [
        {},  # frozen: the head on cached features
        {"finetune_fraction": 0.25},  # phase 1 on features, phase 2 on cached activations
        {"feature_cache": False},  # frozen, end to end
    ],
    ids=["frozen-cached", "fine-tune-cached", "frozen-end-to-end"],
)
def test_fit_leaves_the_model_at_the_best_epoch_it_reports(
    demo_dir, tmp_path, pretrained_t0, values
):
    cache = values.pop("feature_cache", True)
    maker = maker_for(demo_dir, tmp_path, pretrained_t0, **values)
    maker.store.enabled = cache
    hp = kt.HyperParameters()
    model = maker.build(hp)
    maker.callbacks_factory = lambda: [RuinLastEpoch(model, 4)]
    result = maker.fit(hp, model, epochs=4)
    history = maker.last_fit["history"]["val_accuracy"]
    assert len(history) == 4 and history[-1] < max(history)  # the last epoch is not the best
    assert result["val_accuracy"] == max(history)
    # The model in memory (what the trial saves and export ships) scores the reported number.
    assert validation_accuracy(maker, model) == pytest.approx(result["val_accuracy"], abs=1e-6)


def test_a_frozen_backbone_runs_without_stochastic_depth_during_fit(
    demo_dir, tmp_path, pretrained_t0
):
    pixels = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    # Random init trains the whole network: T0's stochastic depth is on, like B0's.
    whole = maker_for(demo_dir, tmp_path / "a", None).build(kt.HyperParameters())
    assert not np.allclose(whole(pixels, training=True), whole(pixels, training=False))
    for fraction in (0.0, 0.25):
        maker = maker_for(demo_dir, tmp_path / str(fraction), pretrained_t0)
        maker.space = space.load(None, {**maker.space.as_dict(), "finetune_fraction": fraction})
        model = maker.build(kt.HyperParameters())
        base = model.get_layer("backbone")
        if fraction:
            backbones.unfreeze_top(base, 2)
        # Training mode, as fit calls it, computes exactly the inference-mode features.
        np.testing.assert_array_equal(
            base(pixels, training=True).numpy(), base(pixels, training=False).numpy()
        )
        np.testing.assert_array_equal(
            model(pixels, training=True).numpy(), model(pixels, training=False).numpy()
        )


def test_feature_cache_is_keyed_by_the_weights_that_computed_it(demo_dir, tmp_path, pretrained_t0):
    maker = maker_for(demo_dir, tmp_path, pretrained_t0, finetune_fraction=0.25)
    hp = kt.HyperParameters()
    model = maker.build(hp)
    base = model.get_layer("backbone")
    before = features.weights_fingerprint(base)
    bottom_before = features.weights_fingerprint(features.split_backbone(model, 2)[0])
    # A continued fine-tune: phase 2 only, so whichever epoch is kept has moved the top blocks
    # (a fresh trial whose best epoch came before phase 2 keeps them where they were).
    maker.fit(hp, model, epochs=4, initial_epoch=2)
    assert features.weights_fingerprint(base) != before
    # The frozen bottom did not move: its cached activations stay valid.
    assert features.weights_fingerprint(features.split_backbone(model, 2)[0]) == bottom_before
    folder = tmp_path / "cache"
    pooled = [features.cache_file(folder, "T0", 32, key, "train", "x") for key in (before, "b")]
    assert pooled[0] != pooled[1]


def test_a_continued_fine_tune_stays_in_phase_2(demo_dir, tmp_path, pretrained_t0):
    maker = maker_for(demo_dir, tmp_path, pretrained_t0, finetune_fraction=0.25, epochs=6)
    hp = kt.HyperParameters()
    plan = maker.plan(hp)
    # A parent of 2 epochs ran 1 frozen and 1 fine-tuning: its continuation fine-tunes on.
    assert training.phase1_end(maker.space, plan, 6, initial_epoch=2) == 1
    # A new trial: half frozen, half fine-tuning; the same when its parent never fine-tuned.
    assert training.phase1_end(maker.space, plan, 6) == 3
    assert training.phase1_end(maker.space, plan, 6, initial_epoch=1) == 3
    model = maker.build(hp)
    head_before = [v.numpy().copy() for v in model.get_layer("head").weights]
    maker.fit(hp, model, epochs=6, initial_epoch=2)
    # No head-only epoch on pooled features: only the activations at the cut were used.
    assert len(maker.last_fit["cache"]) == 2 and "activation_cut" in maker.last_fit
    assert maker.last_fit["epochs_run"] == 4 and maker.last_fit["unfrozen_blocks"]
    assert any(
        not np.array_equal(a, b.numpy())
        for a, b in zip(head_before, model.get_layer("head").weights, strict=True)
    )


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)


def write_official_notop(model: keras.Model, path: Path) -> None:
    """``model``'s weights in the layout of Keras' official notop files (legacy HDF5, the
    ImageNet std stored as the Normalization variance)."""
    from keras.src.legacy.saving import legacy_h5_format

    norm = next(lyr for lyr in model.layers if isinstance(lyr, keras.layers.Normalization))
    norm.set_weights([IMAGENET_MEAN, np.array(backbones.IMAGENET_STD_RGB, np.float32), np.array(0)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)


def test_official_notop_file_in_a_folder_computes_what_imagenet_computes(tmp_path, monkeypatch):
    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    entry = backbones.get("B0")
    source = backbones.build(entry, 48, None)
    write_official_notop(source, tmp_path / "keras" / "models" / "efficientnetb0_notop.h5")
    write_official_notop(source, tmp_path / "folder" / "efficientnetb0_notop.h5")
    # Keras checks the official file's hash; this file is ours.
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras"))  # KERAS_HOME
    monkeypatch.setattr(file_utils, "validate_file", lambda *args, **kwargs: True)
    imagenet = backbones.build(entry, 48, "imagenet")
    from_folder = backbones.build(entry, 48, str(tmp_path / "folder"))
    # A Keras 3 weights file saved from the ImageNet model is in the same layout.
    (tmp_path / "saved").mkdir()
    imagenet.save_weights(tmp_path / "saved" / "B0.weights.h5")
    from_saved = backbones.build(entry, 48, str(tmp_path / "saved"))
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 48, 48, 3)).astype("float32")
    expected = imagenet.predict(pixels, verbose=0)
    # Float32 rounding only (random weights give features in the hundreds); inputs at the
    # wrong scale (0.48x, the bug) move them by tens of percent.
    tolerance = 1e-4 * np.abs(expected).max()
    for model in (from_folder, from_saved):
        np.testing.assert_allclose(model.predict(pixels, verbose=0), expected, atol=tolerance)
    # Weights saved from the fixed model load as they are (their variance is std squared).
    from_folder.save_weights(tmp_path / "saved" / "B0.weights.h5")
    again = backbones.build(entry, 48, str(tmp_path / "saved"))
    np.testing.assert_allclose(again.predict(pixels, verbose=0), expected, atol=tolerance)


def test_the_kept_epoch_is_the_same_in_the_record_the_weights_and_the_checkpoint():
    """The epoch a trial reports (best validation accuracy, the first on ties) is the one
    whose weights the hypermodel restores and the one Keras Tuner's checkpoint writes."""

    history = {
        "val_accuracy": [0.40, 0.61, 0.61, 0.52],  # a tie: the first is kept
        "val_loss": [1.90, 1.60, 1.20, 1.10],  # the loss keeps falling
        "accuracy": [0.5, 0.6, 0.7, 0.8],
        "loss": [1.5, 1.2, 1.0, 0.9],
    }
    assert training.best_epoch(history) == 1
    assert training.best_metrics(history) == {
        "val_accuracy": 0.61,
        "val_loss": 1.60,
        "accuracy": 0.6,
        "loss": 1.2,
    }
    keeper = training.BestEpoch()
    variable = keras.Variable(0.0)
    keeper.track([variable])
    pairs = list(zip(history["val_accuracy"], history["val_loss"], strict=True))
    for epoch, (accuracy, loss) in enumerate(pairs):
        variable.assign(float(epoch))
        keeper.on_epoch_end(epoch, {"val_accuracy": accuracy, "val_loss": loss})
    keeper.restore()
    assert float(variable.numpy()) == 1.0
    objective = kt.Objective(training.BEST_EPOCH_METRIC, "max")  # the search's objective
    saver = adapter.SaveTrained.replacing(
        adapter.tuner_utils.SaveBestEpoch(objective, "unused"), whole=False
    )
    saved = []
    saver._save_model = lambda: saved.append(len(saved))
    for accuracy, loss in pairs:
        saver.on_epoch_end(0, {"val_accuracy": accuracy, "val_loss": loss})
    assert saver.best_value == 0.61 and len(saved) == 2  # at epochs 0 and 1: ties keep the first
