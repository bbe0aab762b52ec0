"""EfficientNetV2 rows of the backbone table: facts, whole-block unfreezing, official weights
files, and the production path on the tiny V2T0 built by Keras' own EfficientNetV2 code: a
fine-tune end to end, a search on cached features and activations, its export and refit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from rich.console import Console

from data_tools.errors import run_cli
from tests.conftest import run_search
from tuner import export_best
from tuner.model import backbones, features
from tuner.report import evaluate, rebuild

V2_ROWS = ["V2B0", "V2B1", "V2B2", "V2B3", "V2S", "V2M", "V2L"]


def test_v2_rows_hold_sizes_batches_files_and_constructors() -> None:
    rows = [backbones.get(name) for name in V2_ROWS]
    assert [r.size for r in rows] == [224, 240, 260, 300, 384, 480, 480]
    assert [r.batch for r in rows] == [512, 256, 256, 128, 64, 32, 16]
    assert [r.weights_file for r in rows] == [
        f"efficientnetv2-{v}_notop.h5" for v in ("b0", "b1", "b2", "b3", "s", "m", "l")
    ]
    assert all(r.input_scale == 1.0 and r.finetunable for r in rows)  # 0..255, own preprocessing
    assert all(callable(getattr(keras.applications, r.constructor)) for r in rows)
    assert {r.weights_url for r in rows} == {backbones.V2_WEIGHTS_URL}
    assert backbones.get("B0").weights_url == backbones.V1_WEIGHTS_URL
    # TF-Hub's V2 feature vectors get their variant's size; V1 handles keep theirs.
    hub = "https://tfhub.dev/google/imagenet/efficientnet_v2_imagenet21k_{}/feature_vector/2"
    assert backbones.get("hub:" + hub.format("s")).size == 384
    assert backbones.get("hub:" + hub.format("b3")).size == 300
    assert backbones.get("hub:" + hub.format("l")).batch == 16
    assert (
        backbones.get("hub:https://tfhub.dev/tensorflow/efficientnet/b4/feature-vector/1").size
        == 380
    )


def trainable_blocks(model: keras.Model) -> set[str]:
    return {backbones.block_of(lyr.name) for lyr in model.layers if lyr.trainable and lyr.weights}


def test_v2_unfreezes_whole_blocks_with_batchnorm_frozen() -> None:
    tiny = backbones.build(backbones.get("V2T0"), 32, None)
    units = ["1a", "2a", "3a", "4a", "5a", "5b", "6a", "6b", "6c", "top"]
    assert backbones.blocks(tiny) == units
    assert backbones.unfreeze_top(tiny, 3) == ["6b", "6c", "top"]
    assert trainable_blocks(tiny) == {"6b", "6c", "top"}
    assert not any(
        lyr.trainable for lyr in tiny.layers if isinstance(lyr, keras.layers.BatchNormalization)
    )
    # Fused (1a-3a) and depthwise (4a-6c) blocks both split whole: the top run on the cut
    # activations computes what the backbone computes.
    wrapped = SimpleNamespace(get_layer={"backbone": tiny}.__getitem__)  # a trial's model
    for count in (2, 7):
        bottom, top, cut = features.split_backbone(wrapped, count)
        assert backbones.block_of(cut) == units[len(units) - count - 1]
        pixels = np.random.default_rng(count).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
        np.testing.assert_allclose(top(bottom(pixels)), tiny(pixels), rtol=1e-5, atol=1e-5)
    # V2-B0: 21 blocks and the top; a fifth of them is 4 whole blocks.
    b0 = backbones.build(backbones.get("V2B0"), 32, None)
    assert len(backbones.blocks(b0)) == 22 and backbones.blocks_for_fraction(b0, 0.2) == 4
    backbones.unfreeze_top(b0, 4)
    assert trainable_blocks(b0) == {"6f", "6g", "6h", "top"}
    assert backbones.inference_mode(b0) > 0  # its stochastic depth can be switched off


def test_v2_offline_weights_name_the_file_and_the_v2_address(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    asked = []

    def no_network(name, url, **kwargs):
        asked.append(url)
        raise Exception("URL fetch failure")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(backbones.WeightsUnavailable) as info:
        backbones.ensure_weights(backbones.get("V2S"))
    assert asked == [backbones.V2_WEIGHTS_URL + "efficientnetv2-s_notop.h5"]
    assert f"put efficientnetv2-s_notop.h5 in {tmp_path / 'models'}/" in str(info.value)


def test_v2_official_notop_file_in_a_folder_computes_what_imagenet_computes(
    tmp_path: Path, monkeypatch
) -> None:
    from keras.src.backend import config as keras_config
    from keras.src.legacy.saving import legacy_h5_format
    from keras.src.utils import file_utils

    entry = backbones.get("V2B0")
    source = backbones.build(entry, 32, None)
    for folder in (tmp_path / "keras" / "models", tmp_path / "folder"):
        folder.mkdir(parents=True)
        with h5py.File(folder / entry.weights_file, "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras"))  # KERAS_HOME
    monkeypatch.setattr(file_utils, "validate_file", lambda *args, **kwargs: True)
    imagenet = backbones.build(entry, 32, "imagenet")
    from_folder = backbones.build(entry, 32, str(tmp_path / "folder"))
    # V2-B0 normalises by ImageNet's mean and std given in code, not read from the file:
    # nothing to correct, unlike V1's files, so the same weights compute the same features.
    assert not backbones.fix_official_normalization(from_folder)
    for model in (imagenet, from_folder):
        for ours, theirs in zip(model.weights, source.weights, strict=True):
            np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    norm = next(lyr for lyr in from_folder.layers if isinstance(lyr, keras.layers.Normalization))
    np.testing.assert_allclose(np.ravel(norm.variance), np.square(backbones.IMAGENET_STD_RGB))


@pytest.fixture(scope="module")
def v2_weights(tmp_path_factory) -> Path:
    """A weights folder with V2T0's random weights: the search treats them as pretrained
    (frozen heads on cached features, fine-tunes on cached activations)."""
    folder = tmp_path_factory.mktemp("v2weights")
    backbones.build(backbones.get("V2T0"), 32, None).save_weights(folder / "V2T0.weights.h5")
    return folder


def test_v2_fine_tunes_whole_blocks_end_to_end(tmp_path, demo_dir, v2_weights) -> None:
    import keras_tuner as kt

    from tests.test_hypermodel import demo_data
    from tuner.model import hypermodel, space

    values = {"backbones": ["V2T0"], "finetune_fraction": 0.3, "head_width": 16, "epochs": 2}
    maker = hypermodel.EffNetHyperModel(
        space.load(None, values),
        demo_data(demo_dir, tmp_path),
        str(v2_weights),
        feature_cache=False,
    )
    hp = kt.HyperParameters()
    model = maker.build(hp)
    before = {v.path: v.numpy().copy() for v in model.get_layer("backbone").weights}
    # Phase 1: the head; phase 2: the top 30% of blocks. Kept at its last epoch (as a refit
    # keeps it), so what phase 2 trained is in the model whichever epoch validated best.
    maker.stop_after = 2
    maker.fit(hp, model, epochs=2)
    assert len(maker.last_fit["history"]["loss"]) == 2
    assert maker.last_fit["unfrozen_blocks"] == ["6b", "6c", "top"]
    assert "cache" not in maker.last_fit and not (tmp_path / "cache" / "features").exists()
    moved = {
        backbones.block_of(v.path.split("/")[-2])
        for v in model.get_layer("backbone").weights
        if not np.array_equal(v.numpy(), before[v.path])
    }
    assert moved == {"6b", "6c", "top"}  # BatchNorm's moving statistics stay frozen too


def test_v2_searches_on_cached_features_and_activations_and_exports(
    tmp_path, demo_dir, v2_weights, capsys, monkeypatch
):
    common = ["--weights", str(v2_weights), "--set", "backbones=[V2T0]", "--set", "epochs=2"]
    cached = [
        *common,
        *("--algorithm", "transfer", "--set", "head_trials=1", "--set", "head_width=[0, 16]"),
        *("--set", "finetune_fraction=[0.0, 0.3]", "--set", "max_trials=2", "--budget", "5m"),
        *("--set", "features=top"),  # a head on stage features is never fine-tuned
    ]
    assert run_search(tmp_path, demo_dir, "v2", *cached) == 0
    folder = tmp_path / "results" / "v2"
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    assert list(table.stage) == ["frozen", "fine-tune"], table.reason
    assert table.solver[0] == "exact"  # the first head of a feature set is linear
    assert (table.status == "completed").all() and (table.backbone == "V2T0").all()
    assert table.unfrozen_blocks.iloc[-1] == "6b 6c top"  # 30% of 10 units
    # Pooled features and the activations at the cut (block 6a's output), per split.
    names = sorted(p.name.split("-")[0] for p in (folder / "cache" / "features").glob("*.npy"))
    assert names == ["train", "train", "validation", "validation"]
    capsys.readouterr()

    argv = ["--results", str(folder), "--rule", "max-accuracy"]
    assert run_cli(export_best.main, argv) == 0
    best = folder / "best"
    record = json.loads((best / "metrics.json").read_text())
    assert record["backbone"] == "V2T0" and record["test"]["count"] == 110
    # A fine-tune refits its lineage: the linear head it started from, fitted exactly again,
    # then its own epochs up to its best.
    config, trials = rebuild.load_search(folder)
    fine = trials.iloc[-1]
    _, facts = rebuild.refit(folder, fine, trials, config, Console(quiet=True))
    assert fine.resumed_from == trials.trial_id[0]
    assert facts["trials"][0] == {
        "trial_id": trials.trial_id[0],
        "stage": "frozen",
        "solver": "exact",
        "epochs": 1,
    }
    assert facts["trials"][1] == {
        "trial_id": fine.trial_id,
        "stage": "fine-tune",
        "solver": "adam",
        "epochs": fine.best_epoch,
    }
    model = keras.models.load_model(best / "model.keras")
    assert any(lyr.name.startswith("block6c_") for lyr in model.get_layer("backbone").layers)
    pixels, _, _ = evaluate.test_pixels(config, 32)
    serve = tf.saved_model.load(str(best / "saved_model")).signatures["serving_default"]
    np.testing.assert_allclose(
        serve(tf.constant(pixels))["probabilities"].numpy(),
        evaluate.probabilities(model, pixels),
        atol=1e-5,
    )

    # Without their checkpoints, the fine-tune's model is retrained from its lineage: the
    # parent's head, then its own epochs from where the search started them. With only the
    # parent's checkpoint kept, that is loaded and only the fine-tune trains.
    from tuner.model import hypermodel

    fits = []
    real_fit = hypermodel.EffNetHyperModel.fit

    def spied(self, hp, model, *args, **kwargs):
        fits.append((hp.values.get("tuner/stage"), kwargs.get("initial_epoch", 0)))
        return real_fit(self, hp, model, *args, **kwargs)

    monkeypatch.setattr(hypermodel.EffNetHyperModel, "fit", spied)
    saved = {
        t: folder / "keras_tuner" / f"trial_{t}" / "checkpoint.trained.npz" for t in trials.trial_id
    }
    kept = saved[trials.trial_id[0]].read_bytes()
    for path in saved.values():
        path.unlink()
    _, how = rebuild.trial_model(folder, fine, config)
    assert how.startswith("retrained") and fits == [("frozen", 0), ("fine-tune", 0)]
    fits.clear()
    saved[trials.trial_id[0]].write_bytes(kept)
    rebuild.trial_model(folder, fine, config)
    assert fits == [("fine-tune", 0)]
