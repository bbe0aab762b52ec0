"""The offline demo data: scikit-learn's digits as reference-format labels and RGB PNGs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data_tools import demo
from data_tools import split as split_mod
from data_tools.errors import run_cli


def test_demo_writes_1797_named_rgb_pngs_and_reference_labels(demo_dir: Path) -> None:
    labels = pd.read_csv(demo_dir / "label.csv", dtype=str)
    assert list(labels.columns) == ["objectId", "value"]
    assert len(labels) == demo.DIGITS_COUNT == 1797
    assert sorted(labels["value"].unique(), key=int) == [str(d) for d in range(10)]
    files = sorted((demo_dir / "images").glob("*.png"))
    assert len(files) == 1797
    for file in files[:50]:
        assert hashlib.sha1(file.read_bytes()).hexdigest() == file.stem
        image = Image.open(file)
        assert image.mode == "RGB" and image.size == (8, 8)
    from sklearn.datasets import load_digits

    digits = load_digits()
    first = np.asarray(Image.open(demo_dir / "images" / f"{labels.objectId[0]}.png"))
    assert np.array_equal(first[..., 0], np.round(digits.images[0] * 255 / 16).astype(np.uint8))
    assert labels.value[0] == str(digits.target[0])


def test_demo_splits_with_every_class_in_every_split(
    demo_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "split_label.csv"
    code = run_cli(
        split_mod.main,
        [
            "--labels",
            str(demo_dir / "label.csv"),
            "--images",
            str(demo_dir / "images"),
            "--out",
            str(out),
        ],
    )
    assert code == 0, capsys.readouterr().err
    split = pd.read_csv(out, dtype=str)
    counts = pd.crosstab(split["type"], split["value"])
    assert (counts.loc["test"] == counts.loc["test"].iloc[0]).all()
    assert (counts.loc["validation"] == counts.loc["validation"].iloc[0]).all()
    assert counts.loc["test"].min() > 5 and counts.loc["validation"].min() > 5
    assert not (tmp_path / "split_label.excluded.csv").exists()


def test_demo_cli_refuses_to_overwrite_a_foreign_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert run_cli(demo.main, ["--out", str(tmp_path / "mine")]) == 2
    assert "is not a demo data folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
