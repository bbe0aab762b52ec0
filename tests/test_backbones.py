"""The backbone table: unfreezing whole blocks, offline weights, TF-Hub modules."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from data_tools.errors import InputError
from tuner.model import backbones


def test_table_holds_native_sizes_and_batches() -> None:
    sizes = [backbones.get(f"B{i}").size for i in range(8)]
    batches = [backbones.get(f"B{i}").batch for i in range(8)]
    assert sizes == [224, 240, 260, 300, 380, 456, 528, 600]
    assert batches == [512, 256, 256, 128, 128, 64, 32, 32]
    assert backbones.get("B3").weights_file == "efficientnetb3_notop.h5"
    assert (
        backbones.get("hub:https://tfhub.dev/tensorflow/efficientnet/b4/feature-vector/1").size
        == 380
    )
    with pytest.raises(InputError, match="unknown backbone 'B9'"):
        backbones.get("B9")


@pytest.fixture(scope="module")
def tiny() -> keras.Model:
    return backbones.build(backbones.get("T0"), 32, None)


def test_blocks_are_listed_bottom_to_top(tiny: keras.Model) -> None:
    assert backbones.blocks(tiny) == ["1a", "2a", "3a", "4a", "5a", "6a", "6b", "7a", "top"]
    assert backbones.block_of("block6a_expand_conv") == "6a"
    assert backbones.block_of("top_bn") == "top"
    assert backbones.block_of("stem_conv") is None


def trainable_blocks(model: keras.Model) -> set[str]:
    return {
        backbones.block_of(layer.name)
        for layer in model.layers
        if layer.trainable and layer.weights
    }


@pytest.mark.parametrize("count,expected", [(0, set()), (1, {"top"}), (3, {"6b", "7a", "top"})])
def test_unfreeze_top_whole_blocks_and_batchnorm_stays_frozen(
    tiny: keras.Model, count: int, expected: set[str]
) -> None:
    assert backbones.unfreeze_top(tiny, count) == [
        b for b in backbones.blocks(tiny) if b in expected
    ]
    assert trainable_blocks(tiny) == expected
    assert not any(
        layer.trainable
        for layer in tiny.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    trainable_vars = {v.path for v in tiny.trainable_weights}
    assert all(backbones.block_of(p.split("/")[-2]) in expected for p in trainable_vars)


def test_unfreeze_fraction_of_b0_blocks() -> None:
    b0 = backbones.build(backbones.get("B0"), 32, None)
    units = backbones.blocks(b0)
    assert len(units) == 17 and units[0] == "1a" and units[-2:] == ["7a", "top"]
    assert backbones.blocks_for_fraction(b0, 0.2) == 3
    assert backbones.blocks_for_fraction(b0, 0.0) == 0
    assert backbones.blocks_for_fraction(b0, 0.01) == 1
    backbones.unfreeze_top(b0, 3)
    assert trainable_blocks(b0) == {"6d", "7a", "top"}


def test_offline_weights_fail_with_one_line_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure: no route to host")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(backbones.WeightsUnavailable) as info:
        backbones.ensure_weights(backbones.get("B2"))
    assert str(info.value) == (
        f"ImageNet weights for B2 are not in Keras' cache and cannot be downloaded: put "
        f"efficientnetb2_notop.h5 in {tmp_path / 'models'}/ or run with --weights none"
    )
    # A file placed in the cache is used without any download.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "efficientnetb2_notop.h5").write_bytes(b"weights")
    backbones.ensure_weights(backbones.get("B2"))


def test_weights_folder_loads_each_backbones_file(tmp_path: Path) -> None:
    source = backbones.build(backbones.get("T0"), 32, None)
    source.save_weights(tmp_path / "T0.weights.h5")
    loaded = backbones.build(backbones.get("T0"), 32, str(tmp_path))
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def make_hub_module(path: Path) -> None:
    """A tiny TF-Hub-style feature vector: images in 0..1 -> 4 features (mean colour x2)."""

    class Features(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            mean = tf.reduce_mean(images, axis=[1, 2])
            return tf.concat([mean, tf.reduce_max(mean, axis=1, keepdims=True)], axis=1)

    tf.saved_model.save(Features(), str(path))


def test_hub_module_is_wrapped_frozen_and_fed_0_to_1(tmp_path: Path) -> None:
    make_hub_module(tmp_path / "hub")
    entry = backbones.get(f"hub:{tmp_path / 'hub'}")
    assert entry.input_scale == pytest.approx(1 / 255) and not entry.finetunable
    model = backbones.build(entry, 16, None)
    assert model.trainable_weights == []
    pixels = np.full((2, 16, 16, 3), 0.5, dtype="float32")
    np.testing.assert_allclose(model.predict(pixels, verbose=0), np.full((2, 4), 0.5), rtol=1e-6)


def test_missing_hub_module_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot load TF-Hub module .*nowhere"):
        backbones.build(backbones.get(f"hub:{tmp_path / 'nowhere'}"), 16, None)


def test_stage_features_are_the_top_stages_pooled_then_the_pooled_top(tiny: keras.Model) -> None:
    # T0's stages 4-7 end in blocks 4a, 5a, 6b and 7a (its stage 6 has two blocks).
    taps = backbones.stage_taps(tiny)
    assert [backbones.block_of(name) for name in taps] == ["4a", "5a", "6b", "7a"]
    staged = backbones.with_stages(tiny)
    widths = [int(tiny.get_layer(name).output.shape[-1]) for name in taps]
    top = int(tiny.output.shape[-1])
    assert staged.output.shape[-1] == sum(widths) + top
    # The same layers, so the same weights and blocks: one fingerprint, one fine-tune story.
    assert [v.path for v in staged.weights] == [v.path for v in tiny.weights]
    assert backbones.blocks(staged) == backbones.blocks(tiny)
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    joined = staged.predict(pixels, verbose=0)
    np.testing.assert_allclose(joined[:, -top:], tiny.predict(pixels, verbose=0), atol=1e-6)
    # Each tap is its block's output averaged over the image.
    fourth = keras.Model(tiny.input, tiny.get_layer(taps[0]).output).predict(pixels, verbose=0)
    np.testing.assert_allclose(joined[:, : widths[0]], fourth.mean(axis=(1, 2)), atol=1e-5)


@pytest.mark.parametrize("name", ["T0", "V2T0", "B0"])
def test_the_table_knows_how_wide_each_kind_of_features_is(name: str) -> None:
    # The disk plan sizes feature caches and checkpoints from the table, without building.
    entry = backbones.get(name)
    net = backbones.build(entry, 32 if entry.constructor in backbones.TINY else 64, None)
    assert entry.width("top") == net.output_shape[-1]
    assert entry.width("stages") == backbones.with_stages(net).output_shape[-1]
    assert entry.width("stages") > entry.width("top")
    assert entry.params == net.count_params()  # what a whole fine-tune's checkpoint holds
    hub = backbones.get("hub:https://tfhub.dev/tensorflow/efficientnet/b0/feature-vector/1")
    assert hub.width("stages") == hub.width("top") == 1280  # a hub module has no stages
