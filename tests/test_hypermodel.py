"""The two training phases on pretrained weights: what moves and what stays frozen."""

from __future__ import annotations

from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd

from data_tools import ingest, split
from tuner import backbones, hypermodel, space


def demo_data(demo_dir: Path, tmp_path: Path) -> hypermodel.SplitData:
    labels = ingest.read_label_csv(demo_dir / "label.csv")
    frame = split.split_frame(labels)
    frame = frame[frame.type != "test"].reset_index(drop=True)
    classes = ingest.class_names(frame.value)
    table = ingest.normalise(frame, ingest.resolve_paths(frame, demo_dir / "images"), classes)
    return hypermodel.SplitData(table, classes, cache_dir=str(tmp_path / "cache"))


def snapshot(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in model.weights}


def changed(before: dict, after: dict) -> set[str]:
    return {path for path in before if not np.array_equal(before[path], after[path])}


def test_phase1_trains_the_head_phase2_only_top_blocks_without_batchnorm(demo_dir, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    backbones.build(backbones.get("T0"), 32, None).save_weights(weights / "T0.weights.h5")
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
    assert plan.pretrained and plan.fine_tunes and plan.batch_size == 64
    base = model.get_layer("backbone")
    assert base.trainable is False
    initial = snapshot(model)

    # Phase 1 only (1 of 2 epochs: finetune_epochs defaults to half).
    model_maker.fit(hp, model, epochs=1)
    after_phase1 = snapshot(model)
    moved = changed(initial, after_phase1)
    assert moved and all(path.startswith(("hidden", "probabilities")) for path in moved), moved

    # Phase 2: 25% of T0's 8 units = the top 2 (7a and top), BatchNorm frozen.
    model_maker.fit(hp, model, epochs=2, initial_epoch=1)
    assert model_maker.last_fit["unfrozen_blocks"] == ["7a", "top"]
    moved = changed(after_phase1, snapshot(model))
    backbone_moved = {p for p in moved if not p.startswith(("hidden", "probabilities"))}
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
