"""The two training phases on pretrained weights: what moves and what stays frozen."""

from __future__ import annotations

from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd

from data_tools import ingest, split
from tuner.model import backbones, hypermodel, space


def demo_data(demo_dir: Path, tmp_path: Path) -> hypermodel.SplitData:
    labels = ingest.read_label_csv(demo_dir / "label.csv")
    frame = split.split_frame(labels)
    frame = frame[frame.type != "test"].reset_index(drop=True)
    classes = ingest.class_names(frame.value)
    table = ingest.normalise(frame, ingest.resolve_paths(frame, demo_dir / "images"), classes)
    return hypermodel.SplitData(table, classes, cache_dir=str(tmp_path / "cache"))


# The head's layers; "standardize" takes the train features' mean and variance in phase 1.
HEAD_LAYERS = ("standardize", "hidden", "probabilities")


def snapshot(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in model.weights}


def changed(before: dict, after: dict) -> set[str]:
    return {path for path in before if not np.array_equal(before[path], after[path])}


def test_phase1_trains_the_head_phase2_only_top_blocks_without_batchnorm(
    demo_dir, tmp_path, pretrained_t0
):
    weights = pretrained_t0
    search_space = space.load(
        None,
        {
            "backbones": ["T0"],
            "finetune_fraction": 0.25,
            "head_width": 16,
            "dropout": 0.0,
            "epochs": 2,
            "learning_rate": 0.01,
            "class_weight": "balanced",
        },
    )
    model_maker = hypermodel.EffNetHyperModel(
        search_space, demo_data(demo_dir, tmp_path), str(weights)
    )
    hp = kt.HyperParameters()
    model = model_maker.build(hp)
    plan = model_maker.plan(hp)
    # Training batch sized for the data (1,5xx train images: >= 30 steps), the pass at the table's.
    assert plan.pretrained and plan.fine_tunes and plan.batch_size == 32 and plan.pass_batch == 64
    base = model.get_layer("backbone")
    assert base.trainable is False
    initial = snapshot(model)

    # Phase 1 only (1 of 2 epochs: finetune_epochs defaults to half).
    model_maker.fit(hp, model, epochs=1)
    after_phase1 = snapshot(model)
    moved = changed(initial, after_phase1)
    assert moved and all(path.startswith(HEAD_LAYERS) for path in moved), moved

    # Phase 2: 25% of T0's 9 units = the top 2 (7a and top), BatchNorm frozen.
    model_maker.fit(hp, model, epochs=2, initial_epoch=1)
    assert model_maker.last_fit["unfrozen_blocks"] == ["7a", "top"]
    moved = changed(after_phase1, snapshot(model))
    backbone_moved = {p for p in moved if not p.startswith(HEAD_LAYERS)}
    assert backbone_moved, "phase 2 must train the unfrozen blocks"
    assert all(backbones.block_of(p.split("/")[0]) in {"7a", "top"} for p in backbone_moved)
    assert not any("_bn" in p for p in backbone_moved)  # BatchNorm: neither weights nor stats


def test_class_weights_are_sklearns_balanced_weights(demo_dir, tmp_path):
    data = demo_data(demo_dir, tmp_path)
    weights = data.class_weights()
    counts = data.train["class_index"].value_counts()
    for index, weight in weights.items():
        assert weight == pd.Series(len(data.train) / (10 * counts[index])).item()


def test_search_never_gets_the_test_split(tmp_path):
    table = pd.DataFrame(
        {
            "objectId": ["a", "b"],
            "path": ["x", "y"],
            "value": ["0", "1"],
            "class_index": [0, 1],
            "type": ["train", "test"],
        }
    )
    try:
        hypermodel.SplitData(table, ["0", "1"], None)
    except ValueError as exc:
        assert "must not see the test split" in str(exc)
    else:
        raise AssertionError("the test split reached the search")


def frozen_maker(demo_dir, tmp_path, weights, feature_cache=True):
    search_space = space.load(
        None,
        {
            "backbones": ["T0"],
            "finetune_fraction": 0.0,
            "head_width": 32,
            "dropout": 0.0,
            "epochs": 3,
            "learning_rate": 0.01,
            "class_weight": "none",
        },
    )
    return hypermodel.EffNetHyperModel(
        search_space, demo_data(demo_dir, tmp_path), str(weights), feature_cache=feature_cache
    )


def test_frozen_head_trains_on_cached_features_and_matches_end_to_end(
    demo_dir, tmp_path, pretrained_t0
):
    maker = frozen_maker(demo_dir, tmp_path, pretrained_t0)
    hp = kt.HyperParameters()
    model = maker.build(hp)
    frozen_before = {v.path: v.numpy().copy() for v in model.get_layer("backbone").weights}
    result = maker.fit(hp, model, epochs=3)
    assert maker.last_fit["cache"] == ["computed", "computed"]
    assert result["val_accuracy"] > 0.3
    files = sorted((tmp_path / "cache" / "features").glob("*.npy"))
    assert [f.name.split("-")[0] for f in files] == ["train", "validation"]
    cached = np.load(files[1])
    assert cached.dtype == np.float32 and cached.shape[0] == 140
    # The backbone did not move; the head, put back on it, predicts what it learned.
    assert all(
        np.array_equal(v.numpy(), frozen_before[v.path])
        for v in model.get_layer("backbone").weights
    )
    pixels, _ = maker.data.pixels("validation", 32)
    end_to_end = model.predict(np.asarray(pixels, dtype="float32"), verbose=0)
    on_features = model.get_layer("head").predict(cached.astype("float32"), verbose=0)
    # float32 features: the shipped model computes what the head was scored on.
    np.testing.assert_allclose(end_to_end, on_features, atol=1e-5)
    # A second trial on the same backbone and size computes nothing and builds no backbone.
    second = maker.build(kt.HyperParameters())
    assert second.get_layer("backbone") is model.get_layer("backbone")
    maker.fit(kt.HyperParameters(), second, epochs=1)
    assert maker.last_fit["cache"] == ["loaded", "loaded"]


def test_feature_cache_off_trains_end_to_end(demo_dir, tmp_path, pretrained_t0):
    maker = frozen_maker(demo_dir, tmp_path, pretrained_t0, feature_cache=False)
    hp = kt.HyperParameters()
    maker.fit(hp, maker.build(hp), epochs=1)
    assert "cache" not in maker.last_fit
    assert not (tmp_path / "cache" / "features").exists()


def test_finetune_trains_the_top_on_cached_activations_and_matches_end_to_end(
    demo_dir, tmp_path, pretrained_t0
):
    from tuner.model import features

    maker = frozen_maker(demo_dir, tmp_path, pretrained_t0)
    frozen = maker.build(kt.HyperParameters()).get_layer("backbone")  # shared by frozen trials
    maker.space = space.load(
        None,
        {
            "backbones": ["T0"],
            "finetune_fraction": 0.25,
            "head_width": 16,
            "dropout": 0.0,
            "epochs": 2,
            "learning_rate": 0.01,
            "class_weight": "none",
        },
    )
    hp = kt.HyperParameters()
    model = maker.build(hp)
    maker.fit(hp, model, epochs=2)
    # Phase 1 cached the pooled features, phase 2 the activations after block 6b.
    assert maker.last_fit["cache"] == ["computed"] * 4
    assert maker.last_fit["activation_cut"] == "block6b_add"
    assert maker.last_fit["unfrozen_blocks"] == ["7a", "top"]
    # The fine-tune unfroze its own backbone, not the one frozen trials share.
    assert model.get_layer("backbone") is not frozen and not frozen.trainable_weights
    bottom, top, cut = features.split_backbone(model, 2)
    folder = tmp_path / "cache" / "features"
    (cached,) = [
        f for f in folder.glob("validation-T0-*.npy") if np.load(f, mmap_mode="r").ndim == 4
    ]  # activations, not pooled features
    activations = np.load(cached).astype("float32")
    pixels, _ = maker.data.pixels("validation", 32)
    end_to_end = model.predict(np.asarray(pixels, dtype="float32"), verbose=0)
    head = model.get_layer("head")
    on_cache = head.predict(top.predict(activations, verbose=0), verbose=0)
    np.testing.assert_allclose(end_to_end, on_cache, atol=1e-5)  # float32 activations


def test_exact_linear_head_reports_to_wandbs_keras_callback(demo_dir, tmp_path, pretrained_t0):
    """A frozen-stage linear head takes no gradient step, yet W&B's own Keras callback (which
    reads the optimizer's learning rate every epoch) gets its epoch, as for any trial."""
    import wandb
    from wandb.integration.keras import WandbMetricsLogger

    maker = frozen_maker(demo_dir, tmp_path, pretrained_t0)
    hp = kt.HyperParameters()
    hp.Fixed("head_width", 0)
    hp.Fixed("tuner/stage", "frozen")
    model = maker.build(hp)
    assert maker.plan(hp).solver == "exact"
    seen = []

    class Seen(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, float(self.model.optimizer.learning_rate), dict(logs)))

    # The search's own callbacks (W&B's among them) come from the factory and see the part of
    # the model that trains: here the head.
    maker.callbacks_factory = lambda: [WandbMetricsLogger("epoch"), Seen()]
    run = wandb.init(mode="disabled")
    try:
        result = maker.fit(hp, model, epochs=3)
    finally:
        run.finish()
    assert [(epoch, rate) for epoch, rate, _ in seen] == [(0, 0.0)]
    assert seen[0][2]["val_accuracy"] == result["val_accuracy"] > 0.5


def test_a_head_on_stage_features_stays_frozen_and_caches_apart_from_the_top(
    demo_dir, tmp_path, pretrained_t0
):
    search_space = space.load(
        None,
        {
            "backbones": ["T0"],
            "finetune_fraction": 0.2,
            "head_width": 0,
            "class_weight": "none",
            "features": ["top", "stages"],
        },
    )
    maker = hypermodel.EffNetHyperModel(
        search_space, demo_data(demo_dir, tmp_path), str(pretrained_t0)
    )
    staged_hp = kt.HyperParameters()
    staged_hp.values.update({"features": "stages", "tuner/stage": "frozen"})
    plan = maker.plan(staged_hp)
    # Drawn with a fraction of 0.2, it trains no block: its fine-tune would need the
    # activations below the cut. trials.csv, W&B and the card mark the fraction unused.
    assert plan.finetune_fraction == 0.0 and not plan.fine_tunes
    assert "finetune_fraction" in plan.unused() and plan.solver == "exact"
    # The search plans both kinds: one sweep (one forward) writes stage features and the top.
    maker.store.planned = [("T0", 32, "stages"), ("T0", 32, "top")]
    staged = maker.build(staged_hp)
    base = backbones.build(backbones.get("T0"), 32, str(pretrained_t0))
    taps = backbones.stage_taps(base)
    width = sum(int(base.get_layer(n).output.shape[-1]) for n in taps) + base.output.shape[-1]
    assert staged.get_layer("backbone").output.shape[-1] == width
    result = maker.fit(staged_hp, staged, epochs=1)
    assert maker.last_fit["cache"] == ["computed", "computed"]
    # A head on the pooled top alone gets entries of its own (the same weights' fingerprint).
    top_hp = kt.HyperParameters()
    top_hp.values.update({"features": "top", "tuner/stage": "frozen"})
    top = maker.build(top_hp)
    assert top.get_layer("backbone").output.shape[-1] == base.output.shape[-1]
    maker.fit(top_hp, top, epochs=1)
    assert maker.last_fit["cache"] == ["loaded", "loaded"]  # the stages' sweep wrote them
    files = sorted((tmp_path / "cache" / "features").glob("*.npy"))
    arrays = {np.load(f, mmap_mode="r").shape[1]: np.load(f) for f in files if "train" in f.name}
    widths = sorted(np.load(f, mmap_mode="r").shape[1] for f in files)
    assert widths == sorted([width, width, base.output.shape[-1], base.output.shape[-1]])
    top_width = int(base.output.shape[-1])
    np.testing.assert_array_equal(arrays[width][:, -top_width:], arrays[top_width])
    # The model it keeps computes what it was scored on, from pixels.
    pixels, _ = maker.data.pixels("validation", 32)
    predicted = staged.predict(np.asarray(pixels, dtype="float32"), verbose=0).argmax(-1)
    accuracy = float(np.mean(predicted == maker.data.labels("validation")))
    assert abs(accuracy - result["val_accuracy"]) < 1e-9 and accuracy > 0.5


def test_a_paired_head_reads_stage_features_and_a_hub_modules_from_one_input(
    demo_dir, tmp_path, pretrained_t0
):
    """A paired head on T0's stage features and a TF-Hub module's (fed 0..1 by its own
    rescale): its features are the two entries side by side, each cached as its own
    feature set's, and the model computes from pixels what the head was scored on."""
    from tests.test_backbones import make_hub_module

    make_hub_module(tmp_path / "hub")
    hub = f"hub:{tmp_path / 'hub'}"
    search_space = space.load(
        None,
        {"backbones": ["T0", hub], "image_size": 32, "head_width": 0, "class_weight": "none"},
    )
    maker = hypermodel.EffNetHyperModel(
        search_space, demo_data(demo_dir, tmp_path), str(pretrained_t0)
    )
    hp = kt.HyperParameters()
    hp.values.update(
        {
            "backbone": "T0",
            "features": "stages",
            "tuner/stage": "frozen",
            "partner": hub,
            "partner_features": "stages",  # a hub module has none: it reads its top
        }
    )
    plan = maker.plan(hp)
    assert (plan.partner, plan.partner_features, plan.solver) == (hub, "top", "exact")
    assert plan.finetune_fraction == 0.0 and "partner" not in plan.unused()
    model = maker.build(hp)
    assert {"backbone", "partner", "partner_input_scale", "paired_features"} <= {
        layer.name for layer in model.layers
    }
    staged = int(model.get_layer("backbone").output.shape[-1])
    assert model.get_layer("head").input_shape[-1] == staged + 4
    result = maker.fit(hp, model, epochs=1)
    assert maker.last_fit["cache"] == ["computed"] * 4  # each backbone's train, validation
    # Each backbone's entries are its own feature set's: a single head on either loads them.
    alone = kt.HyperParameters()
    alone.values.update({"backbone": hub, "tuner/stage": "frozen"})
    maker.fit(alone, maker.build(alone), epochs=1)
    assert maker.last_fit["cache"] == ["loaded", "loaded"]
    pixels, _ = maker.data.pixels("validation", 32)
    predicted = model.predict(np.asarray(pixels, dtype="float32"), verbose=0).argmax(-1)
    accuracy = float(np.mean(predicted == maker.data.labels("validation")))
    assert abs(accuracy - result["val_accuracy"]) < 1e-9
