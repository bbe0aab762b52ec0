"""Search-space files: the shipped ones load; every bad one is one line listing what is valid."""

from __future__ import annotations

from pathlib import Path

import keras_tuner as kt
import pytest

from data_tools.errors import InputError
from tuner.model import space


@pytest.mark.parametrize("name", ["default.yaml", "quick.yaml", "v2.yaml", "v1_v2.yaml"])
def test_shipped_spaces_load_and_open_with_their_command(name: str) -> None:
    path = space.shipped() / name
    loaded = space.load(path)
    header = path.read_text().splitlines()[:6]
    assert any("python -m tuner.search" in line for line in header)
    assert any("Expected" in line for line in path.read_text().splitlines()[:10])
    assert loaded.epochs >= 1
    assert space.load(path.stem) == loaded  # by its name too (--space quick, space="quick")


def test_every_shipped_space_is_tested() -> None:
    assert space.names() == ["default", "quick", "v1_v2", "v2"]


def test_default_space_is_the_gpu_search_the_issue_describes() -> None:
    loaded = space.load(space.shipped() / "default.yaml")
    assert loaded.backbones == tuple(f"B{i}" for i in range(8))
    assert loaded.image_size == "native" and loaded.algorithm == "transfer"
    assert min(loaded.head_width) == 0 and max(loaded.head_width) == 1024
    assert loaded.learning_rate == {"min": 1e-5, "max": 1e-2, "log": True}
    assert max(loaded.finetune_fraction) == 0.5 and min(loaded.finetune_fraction) == 0.0
    assert set(loaded.class_weight) == {"none", "balanced"} and loaded.epochs == 10


def test_v2_spaces_search_v2_alone_and_beside_v1() -> None:
    assert space.load(space.shipped() / "v2.yaml").backbones == (
        "V2B0", "V2B1", "V2B2", "V2B3", "V2S", "V2M", "V2L"
    )  # fmt: skip
    mixed = space.load(space.shipped() / "v1_v2.yaml").backbones
    assert {b[:2] == "V2" for b in mixed} == {True, False}


BAD = {
    "unknown key": ("epochz: 3\n", "unknown key(s) epochz; valid keys are backbones, "),
    "bad backbone": ("backbones: [B0, B9]\n", "unknown backbone 'B9': valid backbones are B0"),
    "min > max": ("learning_rate: {min: 0.1, max: 0.001}\n", "min 0.1 > max 0.001; swap them"),
    "zero epochs": ("epochs: 0\n", "epochs must be a whole number >= 1, got 0"),
    "bad algorithm": (
        "algorithm: grid\n",
        "valid values are transfer, hyperband, bayesian, random",
    ),
    "bad class weight": ("class_weight: [none, auto]\n", "valid values are none, balanced"),
    "bad features": (
        "features: [top, middle]\n",
        "features 'middle' is not valid; valid values are top, stages",
    ),
    "out of range": ("dropout: [0.1, 1.5]\n", "dropout value 1.5 is out of range"),
    "log needs positive": ("learning_rate: {min: 0, max: 0.1, log: true}\n", "needs min > 0"),
    "bad image size": ("image_size: big\n", "image_size must be 'native', a whole number"),
    "range keys": ("dropout: {min: 0.1}\n", "needs min and max"),
    "not yaml": ("epochs: [3\n", "is not valid YAML at line"),
    "not a mapping": ("- B0\n", "must be a mapping"),
    "finetune epochs": ("epochs: 4\nfinetune_epochs: 4\n", "finetune_epochs must be 0"),
    "frozen share": ("frozen_share: 0\n", "frozen_share must be a number above 0 and at most 1"),
    "train batch": ("train_batch_size: big\n", "train_batch_size must be 'auto', a whole"),
    "head trials": ("head_trials: 0\n", "head_trials must be a whole number >= 1, got 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_space_file_is_one_clear_line(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        space.load(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_are_yaml_and_checked() -> None:
    overrides = space.parse_overrides(["epochs=3", "backbones=[B0, B1]", "dropout=0.25"])
    assert overrides == {"epochs": 3, "backbones": ["B0", "B1"], "dropout": 0.25}
    loaded = space.load(space.shipped() / "quick.yaml", overrides)
    assert loaded.epochs == 3 and loaded.backbones == ("B0", "B1")
    with pytest.raises(InputError, match="write --set key=value"):
        space.parse_overrides(["epochs"])
    with pytest.raises(InputError, match="unknown key"):
        space.load(None, {"nope": 1})


def test_declare_gives_values_of_every_kind() -> None:
    loaded = space.load(
        None,
        {
            "backbones": ["B0", "B3"],
            "head_width": [0, 256],
            "image_size": [64, "native"],
            "finetune_fraction": 0.2,
        },
    )
    hp = kt.HyperParameters()
    values = space.declare(hp, loaded)
    assert values["backbone"] == "B0" and values["head_width"] == 0
    assert values["image_size"] == "64"
    assert values["finetune_fraction"] == 0.2
    assert 1e-5 <= values["learning_rate"] <= 1e-2
    assert {"backbone", "head_width", "dropout", "learning_rate"} <= set(hp.values)
