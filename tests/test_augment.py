"""Augmentation as a hyperparameter: policies, the augmented feature cache, no augmentation in
what is exported."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from data_tools import ingest, pipeline, split
from data_tools.errors import InputError, run_cli
from tests.conftest import run_search
from tuner import export_best
from tuner.engine import costmodel, oracle
from tuner.model import hypermodel, space
from tuner.report import evaluate, export, rebuild


def test_policies_are_written_out_and_bad_ones_say_what_is_valid():
    loaded = space.load(None, {"augment": ["none", "flip+zoom", "rotate:0.1+contrast"]})
    assert loaded.augment == ("none", "flip+zoom:0.1", "rotate:0.1+contrast:0.2")
    bad = {
        "spin": "unknown transform 'spin'; valid transforms are flip, vflip, rotate, zoom",
        "flip:0.3": "flip takes no strength; write 'flip'",
        "zoom:2": "zoom strength '2' must be a number above 0 and at most 1",
        "zoom+zoom:0.2": "a transform appears twice",
    }
    for policy, message in bad.items():
        with pytest.raises(InputError, match=message):
            space.load(None, {"augment": ["none", policy]})
    with pytest.raises(InputError, match="augment_views must be a whole number from 2 to 32"):
        space.load(None, {"augment": "flip", "augment_views": 1})


@pytest.mark.parametrize("in_memory", [True, False])
def test_each_row_comes_from_one_view_drawn_afresh_every_epoch(in_memory):
    rows, views = 64, 3
    # View v of row i holds 1000 * v + i: what came back says which view and row it is.
    arrays = [np.full((rows, 2), 1000 * v, np.float16) + np.arange(rows)[:, None] for v in range(3)]
    values = tf.constant(np.stack(arrays).astype("float32")) if in_memory else arrays
    labels = np.arange(rows) % 7
    data = pipeline.array_dataset(values, labels, 16, shuffle=True, seed=0, views=True)
    drawn = []
    for _ in range(2):
        x = np.concatenate([b.numpy() for b, _ in data])[:, 0].astype(int)
        row, view = x % 1000, x // 1000
        assert sorted(row) == list(range(rows))  # every row once an epoch
        assert set(view) == set(range(views))
        drawn.append(dict(zip(row, view, strict=True)))
    assert drawn[0] != drawn[1]  # drawn again each epoch
    # Labels travel with their rows.
    for x, y in data:
        np.testing.assert_array_equal(x.numpy()[:, 0] % 1000 % 7, y.numpy())


def test_augmented_feature_sets_come_after_their_plain_twin_and_cost_their_extra_passes():
    s = space.load(
        None,
        {
            "backbones": ["B0", "B1"],
            "augment": ["none", "flip"],
            "augment_views": [2, 4],
            "features": "top",
        },
    )
    labels = [fs.label for fs in oracle.feature_sets(s)]
    assert labels == [
        "B0 224px",
        "B1 240px",
        "B0 224px +flip x2",
        "B1 240px +flip x2",
        "B0 224px +flip x4",
        "B1 240px +flip x4",
    ]
    setting = oracle.make_setting(s, 3600, 1000, 1e-3, finetunable=True, train_share=0.8)
    plain = costmodel.FeatureSet("B0", "native", 224)
    four = costmodel.FeatureSet("B0", "native", 224, "flip", 4)
    measured = costmodel.TrialFacts(
        "0", costmodel.DONE, {"tuner/stage": "frozen", "head_width": 0}, plain, 0.9, 12.0, 10.0, 13
    )
    before = costmodel.Costs(setting, [])
    after = costmodel.Costs(setting, [measured])
    # From nothing: its own pass over every image, and 3 more over the train split.
    assert before.pass_seconds(four) == pytest.approx(before.pass_seconds(plain) * (1 + 3 * 0.8))
    # Once the plain features exist, only the 3 augmented passes are left.
    assert after.pass_seconds(four) == pytest.approx(10.0 * 3 * 0.8)
    # A linear head is fitted to all 4 views: 4 times the rows.
    assert after.head_seconds("exact", 4) - after.overhead() == pytest.approx(2.0 * 4)


def test_end_to_end_augmentation_changes_train_batches_every_epoch_never_validation(demo_dir):
    frame = split.split_frame(ingest.read_label_csv(demo_dir / "label.csv"))
    frame = frame[frame.type != "test"].head(200).reset_index(drop=True)
    classes = ingest.class_names(frame.value)
    table = ingest.normalise(frame, ingest.resolve_paths(frame, demo_dir / "images"), classes)
    data = hypermodel.SplitData(table, classes, cache_dir=None)

    def batches(policy: str, split_index: int) -> list[np.ndarray]:
        pair = data.datasets(32, 1000, seed=0, augment=policy)[split_index]
        return [np.concatenate([x.numpy() for x, _ in pair]) for _ in range(2)]

    plain, augmented = batches("none", 0), batches("zoom:0.3+contrast:0.5", 0)
    assert np.array_equal(np.sort(plain[0].ravel()), np.sort(plain[1].ravel()))
    assert not np.array_equal(np.sort(plain[0].ravel()), np.sort(augmented[0].ravel()))
    assert not np.array_equal(augmented[0], augmented[1])  # transformed afresh each epoch
    val_plain, val_augmented = batches("none", 1), batches("zoom:0.3+contrast:0.5", 1)
    np.testing.assert_array_equal(val_plain[0], val_augmented[0])


def _layers(model) -> list:
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_layers(layer))
    return found


def test_an_augmented_search_caches_its_views_once_and_exports_no_augmentation(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    policy = "zoom:0.2+contrast:0.3"
    code = run_search(
        tmp_path,
        demo_dir,
        "aug",
        *("--weights", str(pretrained_t0), "--algorithm", "transfer"),
        *("--set", f"augment={policy}", "--set", "augment_views=3"),
        *("--set", "head_trials=2", "--set", "head_width=[0, 16]", "--set", "head_epochs=10"),
        *("--set", "finetune_fraction=[0.0, 0.2]", "--set", "finetune_lr_factor=0.1"),
        *("--set", "epochs=2", "--set", "max_trials=3", "--budget", "10m"),
        *("--set", "features=top"),  # a head on stage features is never fine-tuned
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"frozen stage: head 1/2 on T0 32px +{policy} x3" in out
    folder = tmp_path / "results" / "aug"
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    assert list(table.stage) == ["frozen", "frozen", "fine-tune"]
    assert (table.augment == policy).all() and (table.augment_views == 3).all()
    assert list(table.augment_path[:2]) == ["cached views (3)"] * 2
    assert table.augment_path[2].startswith("cached views at block")
    assert "augmented: cached views (3)" in out
    # Every view of the train split was computed once: 3 pooled (view 0 is the plain pass) and
    # 3 at the fine-tune's cut; validation is never augmented: one file each.
    files = sorted(p.name for p in (folder / "cache" / "features").glob("*.npy"))
    assert sum(f.startswith("train-") for f in files) == 6
    assert sum(f.startswith("validation-") for f in files) == 2
    pooled = [
        np.load(p)
        for p in (folder / "cache" / "features").glob("train-*.npy")
        if np.load(p, mmap_mode="r").ndim == 2
    ]
    assert len(pooled) == 3
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.array_equal(pooled[a], pooled[b])

    assert run_cli(export_best.main, ["--results", str(folder), "--tflite"]) == 0
    best = folder / "best"
    record = json.loads((best / "metrics.json").read_text())
    assert record["hyperparameters"]["augment"] == policy
    shipped = keras.models.load_model(best / "model.keras")
    assert not [
        layer.name
        for layer in _layers(shipped)
        if type(layer).__name__.startswith("Random") or layer.name == "augment"
    ]
    # The shipped model computes what was validated: the chosen trial's val accuracy, exactly.
    config, trials = rebuild.load_search(folder)
    row = trials[trials.trial_id.astype(str) == record["trial_id"]].iloc[0]
    val, _ = evaluate.split_table(config, ("validation",))
    batches = list(pipeline.make_dataset(val, 32, 64).as_numpy_iterator())
    pixels = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    probs = evaluate.probabilities(shipped, pixels)
    assert float((probs.argmax(1) == labels).mean()) == pytest.approx(row.val_accuracy)
    served = tf.saved_model.load(str(best / "saved_model")).signatures["serving_default"]
    np.testing.assert_allclose(
        served(tf.constant(pixels))["probabilities"].numpy(), probs, atol=1e-5
    )
    assert record["tflite"]["max_abs_difference"] < export.FLOAT_TOLERANCE
    card = (best / "model_card.md").read_text()
    assert f"Augmentation `{policy}` transformed the training images only" in card
    assert "contains no augmentation layer" in card
