"""A trial's checkpoint holds what it trained and the fingerprint of the frozen rest."""

from __future__ import annotations

import json

import keras_tuner as kt
import numpy as np
import pytest

from data_tools.errors import InputError
from tests.test_hypermodel import demo_data
from tuner.model import backbones, checkpoint, hypermodel, space


def test_a_fine_tune_checkpoint_holds_its_top_blocks_and_head_and_rebuilds_the_model(
    demo_dir, tmp_path, pretrained_t0
):
    values = {"backbones": ["T0"], "finetune_fraction": 0.25, "head_width": 16}
    maker = hypermodel.EffNetHyperModel(
        space.load(None, values), demo_data(demo_dir, tmp_path), str(pretrained_t0)
    )
    hp = kt.HyperParameters()
    trained = maker.build(hp)
    base = trained.get_layer("backbone")
    unfrozen = backbones.unfreeze_top(base, 2)
    # What phase 2 would change: the head (its standardisation too) and the top blocks.
    rng = np.random.default_rng(0)
    moved = [*trained.get_layer("head").weights, *base.trainable_weights]
    for variable in moved:
        variable.assign(variable.numpy() + rng.normal(0, 0.1, variable.shape).astype("float32"))
    trained.get_layer("head").get_layer("standardize").finalize_state()  # as standardize() does
    path = tmp_path / checkpoint.FILE
    size = checkpoint.save(trained, path, whole=False)

    meta = json.loads(bytes(np.load(path)["meta"]))
    assert sorted(meta["paths"]) == sorted(v.path for v in moved)
    assert unfrozen == ["7a", "top"]
    assert {p.split("/")[0].split("_")[0] for p in meta["paths"]} == {
        "standardize",
        "hidden",
        "probabilities",
        "block7a",
        "top",
    }
    assert size < sum(v.numpy().nbytes for v in trained.weights) / 2

    rebuilt = maker.build(hp)
    checkpoint.load(rebuilt, path)
    for a, b in zip(trained.weights, rebuilt.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    pixels = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        rebuilt.predict(pixels, verbose=0), trained.predict(pixels, verbose=0)
    )

    # Other frozen weights beneath (random ones here): one line, not a silently wrong model.
    other = hypermodel.EffNetHyperModel(space.load(None, values), maker.data, None).build(hp)
    with pytest.raises(InputError, match="trained on other frozen weights"):
        checkpoint.load(other, path)
