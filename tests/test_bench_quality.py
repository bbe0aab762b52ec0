"""bench_quality's parts: folds, baselines, the recipes' models, intervals and lines.

The whole benchmark runs in the slow tier (tests/test_bench.py); these check what it prints
and decides from its parts, in seconds."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from data_tools.errors import InputError
from tuner import bench_quality
from tuner.report import baselines, quality


def test_folds_rotate_both_ranges_by_the_test_width_and_keep_test_disjoint():
    folds = quality.fold_ranges("0-63", "64-127", 4)
    assert folds == [
        {"test": "0-63", "validation": "64-127"},
        {"test": "64-127", "validation": "128-191"},
        {"test": "128-191", "validation": "192-255"},
        {"test": "192-255", "validation": "0-63"},  # wraps: every bucket is tested once
    ]
    low_high = [[int(x) for x in fold["test"].split("-")] for fold in folds]
    tests = [set(range(low, high + 1)) for low, high in low_high]
    assert set().union(*tests) == set(range(256)) and sum(map(len, tests)) == 256
    for fold in folds:  # a fold's validation never overlaps its test
        (a, b), (c, d) = (map(int, fold[k].split("-")) for k in ("test", "validation"))
        assert b < c or d < a


def test_too_many_folds_get_one_line_with_the_largest_that_fits():
    with pytest.raises(InputError) as error:
        quality.fold_ranges("0-63", "64-127", 5)
    assert "pass --folds 4" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError, match="pass --folds 9"):
        # fold 10 would test 225-249 and validate on 250-18, a range across the wrap
        quality.fold_ranges("0-24", "25-49", 10)
    with pytest.raises(InputError, match="pass --folds 2"):
        quality.fold_ranges("0-79", "80-159", 3)  # validation 240-63 would straddle
    with pytest.raises(InputError, match="within the hash buckets 0-255"):
        quality.fold_ranges("0-300", "25-49", 1)


def test_baselines_parse_all_and_refuse_unknown_ones_in_one_line():
    assert bench_quality.parse_baselines("all") == ["seed", "keras-example", "hyperband"]
    assert bench_quality.parse_baselines("longer,all") == [*quality.ALL, "longer"]
    assert bench_quality.parse_baselines("hyperband, seed") == ["seed", "hyperband"]
    with pytest.raises(InputError, match="keras is not a baseline; choose from seed,"):
        bench_quality.parse_baselines("keras")


def test_a_baseline_that_cannot_run_is_skipped_with_one_line_and_the_others_run(tmp_path):
    args = argparse.Namespace(recipe_backbone="hub:/models/b0", set=[])
    reason = bench_quality.skipped("keras-example", args)
    assert reason.startswith("keras-example skipped: hub:/models/b0 is a frozen TF-Hub module")
    assert bench_quality.skipped("seed", args) is None
    assert bench_quality.skipped("hyperband", args) is None


def test_the_seed_recipe_trains_at_the_seeds_batch():
    args = bench_quality.build_parser().parse_args(["--data", "x"])
    assert args.recipe_batch == 512 == baselines.SEED["batch_size"]
    assert args.example_epochs == "25,4" and args.folds == 3 and args.baseline == "all"


def test_the_split_is_written_again_for_other_ranges(tmp_path, capsys):
    from tests.conftest import random_rgb, save_image

    for i in range(64):  # keys 0, 4, ..., 252: both classes in every range
        save_image(tmp_path / "data" / f"c{i % 2}" / f"{4 * i:02x}.png", random_rgb(8, 8, i), "PNG")
    args = argparse.Namespace(data=str(tmp_path / "data"), images=None)
    ranges = {"test": "0-24", "validation": "25-49"}
    split_file, _ = bench_quality.split_data(args, tmp_path / "q", ranges)
    first = split_file.read_text()
    other = {"test": "0-127", "validation": "128-191"}
    assert bench_quality.split_data(args, tmp_path / "q", other)[0].read_text() != first
    assert "split: test buckets 0-127, validation buckets 128-191" in capsys.readouterr().out


def test_the_interval_is_the_corrected_resampled_t_and_lines_say_when_time_was_unequal():
    from scipy import stats

    differences = [0.12, 0.05, 0.2]
    student = stats.t.interval(0.95, 2, loc=np.mean(differences), scale=stats.sem(differences))
    assert quality.paired_interval(differences) == pytest.approx(student)
    # Nadeau and Bengio: the folds' training sets overlap, so the variance is scaled by
    # 1/K + n_test/n_train. 64 test and 64 validation buckets of 256 train on 128: 0.5.
    ranges = {"test": "0-63", "validation": "64-127"}
    assert quality.test_train_ratio(ranges) == 0.5
    low, high = quality.paired_interval(differences, test_train=0.5)
    scale = np.std(differences, ddof=1) * math.sqrt(1 / 3 + 0.5)
    assert (low, high) == pytest.approx(
        stats.t.interval(0.95, 2, loc=np.mean(differences), scale=scale)
    )
    assert high - low > student[1] - student[0]  # wider than Student's
    assert all(math.isnan(x) for x in quality.paired_interval([0.1]))
    # Folds that all differ by the same amount have no spread: the interval is that amount,
    # not "n/a", and a regret of zero prints as +0.000.
    assert quality.paired_interval([0.0, 0.0], test_train=0.5) == (0.0, 0.0)
    line = quality.quality_line("longer", {"mean": 0.0, "ci95": (0.0, 0.0), "folds": 2})
    assert line.startswith("regret vs longer: +0.000 (95% CI +0.000..+0.000) over 2 folds")

    folds = [
        {"comparisons": {"keras-example": _row(d, equal=True)}, "split_ranges": ranges}
        for d in differences
    ]
    row = quality.summarise(folds)["keras-example"]
    assert row["ci95"] == pytest.approx([low, high])
    line = quality.quality_line("keras-example", row)
    assert line == (
        f"quality vs keras-example: +0.123 (95% CI {low:+.3f}..{high:+.3f}) over 3 folds "
        "at equal wall clock"
    )
    folds[1]["comparisons"]["keras-example"]["equal_wall_clock"] = False
    row = quality.summarise(folds)["keras-example"]
    line = quality.quality_line("keras-example", row)
    assert "at equal wall clock" not in line and line.endswith(": not equal wall clock)")
    one = quality.summarise(folds[:1])["keras-example"]
    assert "(95% CI n/a: one fold) over 1 fold at" in quality.quality_line("x", one)

    longer = quality.summarise([{"comparisons": {"longer": _row(-0.02)}}] * 2)["longer"]
    assert quality.quality_line("longer", longer).startswith("regret vs longer: +0.020")


def _row(difference: float, equal: bool = False) -> dict:
    return {
        "difference": difference,
        "equal_wall_clock": equal,
        "our_seconds": 100.0,
        "their_seconds": 100.0,
    }


def test_the_recipe_feeds_its_backbone_the_range_it_takes():
    import dataclasses

    from tuner.model import backbones

    t0 = backbones.get("T0")
    as_hub = dataclasses.replace(t0, input_scale=1 / 255)  # a TF-Hub module takes 0..1
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    scaled = baselines.recipe_model(as_hub, 32, None, 3)
    assert scaled.get_layer("input_scale").scale == pytest.approx(1 / 255)
    plain = baselines.recipe_model(t0, 32, None, 3)
    assert "input_scale" not in [layer.name for layer in plain.layers]
    assert scaled.predict(pixels, verbose=0).shape == (2, 3)


def test_the_keras_example_unfreezes_what_its_flat_model_would():
    """The example builds one flat graph and unfreezes ``model.layers[-20:]`` but
    BatchNormalization; the nested model here must unfreeze the same layers."""
    import keras

    from tuner.model import backbones

    model, base = baselines.keras_example_model(backbones.get("T0"), 32, None, 4)
    assert [layer.name for layer in model.layers[-3:]] == [
        "batch_normalization",
        "top_dropout",
        "pred",
    ]
    assert not any(layer.trainable for layer in base.layers)
    assert model.get_layer("top_dropout").rate == 0.2
    unfrozen = baselines.unfreeze_like_the_example(model, base)

    flat_base = backbones.build(backbones.get("T0"), 32, None)
    x = keras.layers.BatchNormalization()(flat_base.output)
    x = keras.layers.Dropout(0.2)(x)
    flat = keras.Model(flat_base.input, keras.layers.Dense(4)(x))
    last = {layer.name for layer in flat.layers[-20:]}
    expected = [
        layer.name
        for layer in flat_base.layers
        if layer.name in last and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert unfrozen == expected and len(expected) >= 10
    trainable = [layer.name for layer in base.layers if layer.trainable]
    assert trainable == expected
    assert all(
        not layer.trainable
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_a_bench_without_a_hand_recipe_needs_a_budget(tmp_path):
    from tests.conftest import random_rgb, save_image

    for i in range(64):
        save_image(tmp_path / "data" / f"c{i % 2}" / f"{4 * i:02x}.png", random_rgb(8, 8, i), "PNG")
    argv = ["--data", str(tmp_path / "data"), "--weights", "none", "--baseline", "hyperband"]
    argv += ["--folds", "1", "--results", str(tmp_path / "r"), "--set", "backbones=[T0]"]
    with pytest.raises(InputError, match="no hand recipe to take the budget from"):
        bench_quality.main(argv)


def test_the_report_names_a_frozen_pick_whose_fraction_was_unused(capsys):
    """A pick that trained no block (stage features, random init) has its fraction marked
    `-`: the report reads it as frozen and names what the head read."""

    def ours(trial: str, fraction, features: str) -> dict:
        test = {"count": 171, "accuracy": 0.6, "balanced_accuracy": 0.6}
        return dict(
            trial_id=trial, backbone="B0", image_size=128, wall_seconds=300.0, test=test,
            finetune_fraction=fraction, features=features,
        )  # fmt: skip

    fold = {
        "fold": 1,
        "methods": {},
        "ours": {"300s": ours("008", "-", "stages"), "600s": ours("020", 0.2, "top")},
        "split_ranges": {"test": "0-63", "validation": "64-127"},
        "comparisons": {},
    }
    quality.print_report({"folds": [fold], "summary": {}})
    out = capsys.readouterr().out
    assert "trial 008: B0 128px, stage features, frozen" in out
    assert "trial 020: B0 128px, top 20% fine-tuned" in out


def test_a_kept_search_is_keyed_by_its_space_files_content_and_the_version(tmp_path):
    from importlib import metadata

    space = tmp_path / "space.yaml"
    space.write_text("backbones: [B0]\n")
    before = bench_quality.space_key(str(space))
    space.write_text("backbones: [B0]\nhead_trials: 4\n")  # edited in place: another space
    after = bench_quality.space_key(str(space))
    assert before["space"] == after["space"] and before["space_sha"] != after["space_sha"]
    assert after["version"] == metadata.version("effnet-tuner")
    default = bench_quality.space_key(None)  # the default space is read from the package
    assert default["space"] is None and len(default["space_sha"]) == 40
