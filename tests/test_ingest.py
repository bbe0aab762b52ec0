"""Ingest: both layouts, every image format, and every bad input as one line + exit code 2."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from data_tools import ingest
from data_tools import split as split_mod
from data_tools.errors import run_cli
from tests.conftest import random_rgb, save_image

# objectIds whose keys put two of each class in test (0x00-0x18) and validation (0x19-0x31)
GOOD_IDS = ["a00", "a01", "b02", "b03", "c20", "c21", "d30", "d31", "e80", "e81", "f90", "f91"]
GOOD_VALUES = ["cat", "dog"] * 6


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def good_labels(tmp_path: Path) -> Path:
    rows = "\n".join(f"{i},{v}" for i, v in zip(GOOD_IDS, GOOD_VALUES, strict=True))
    return write_csv(tmp_path / "label.csv", f"objectId,value\n{rows}\n")


def images_for(tmp_path: Path, ids: list[str], fmt: str = "PNG", ext: str = ".png") -> Path:
    folder = tmp_path / "images"
    for i, object_id in enumerate(ids):
        save_image(folder / f"{object_id}{ext}", random_rgb(seed=i), fmt)
    return folder


def run_split(tmp_path: Path, capsys, *extra: str, labels: Path | None = None) -> tuple[int, str]:
    out = tmp_path / "out" / "split_label.csv"
    # The objectIds (a00, e80, ...) are chosen for their buckets under the reference key.
    argv = [
        "--labels",
        str(labels or good_labels(tmp_path)),
        "--out",
        str(out),
        "--key",
        "reference",
    ]
    argv += extra
    code = run_cli(split_mod.main, argv)
    return code, capsys.readouterr().err


BAD_CSVS = {
    "missing column": ("objectId\na00\n", "missing column(s) value"),
    "extra column": ("objectId,value,score\na00,1,3\n", "unexpected column(s) score"),
    "empty file": ("", "is empty"),
    "header only": ("objectId,value\n", "has a header but no rows"),
    "duplicate ids": (
        "objectId,value\na00,1\nb01,0\na00,1\n",
        "1 objectId(s) appear more than once (a00)",
    ),
    "blank label": ("objectId,value\na00,1\nb01,\nc02,0\n", "1 row(s) have a blank value (line 3)"),
    "single class": ("objectId,value\na00,1\nb01,1\n", "found only one class ('1')"),
    "bad split type": None,  # read_split_csv only; covered below
}


@pytest.mark.parametrize("case", [k for k, v in BAD_CSVS.items() if v])
def test_bad_label_file_is_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys, case: str
) -> None:
    text, expected = BAD_CSVS[case]
    labels = write_csv(tmp_path / "label.csv", text)
    code, err = run_split(tmp_path, capsys, labels=labels)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_split_type_is_rejected(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", "objectId,value,type\na,1,train\nb,0,holdout\n")
    with pytest.raises(ingest.InputError, match="unknown type.*holdout.*train, validation, test"):
        ingest.read_split_csv(path)


def test_missing_images_folder(tmp_path: Path, capsys) -> None:
    code, err = run_split(tmp_path, capsys, "--images", str(tmp_path / "nowhere"))
    assert code == 2 and "images folder" in err and "does not exist" in err
    assert err.count("\n") == 1


def test_missing_image_files_say_how_many_and_list_first(tmp_path: Path, capsys) -> None:
    images = images_for(tmp_path, GOOD_IDS[:4])
    code, err = run_split(tmp_path, capsys, "--images", str(images))
    assert code == 2
    assert "8 of 12 label rows have no image file" in err
    assert "(objectId c20, c21, d30, d31, e80, ... (8 in all))" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_corrupt_images_are_excluded_and_reported(tmp_path: Path, capsys) -> None:
    images = images_for(tmp_path, GOOD_IDS)
    (images / "e80.png").write_bytes(b"not a png at all")
    # A PNG cut off after 40 bytes: the header reads, the pixels do not.
    (images / "f91.png").write_bytes((images / "f90.png").read_bytes()[:40])
    code, err = run_split(tmp_path, capsys, "--images", str(images), "--max-bad-fraction", "0.2")
    assert code == 0, err
    out = tmp_path / "out"
    report = pd.read_csv(out / "split_label.excluded.csv")
    assert sorted(report["objectId"]) == ["e80", "f91"]
    written = pd.read_csv(out / "split_label.csv", dtype=str)
    assert len(written) == 10 and not written["objectId"].isin(["e80", "f91"]).any()


def test_too_many_corrupt_images_is_an_error(tmp_path: Path, capsys) -> None:
    images = images_for(tmp_path, GOOD_IDS)
    for name in ("e80", "f91"):
        (images / f"{name}.png").write_bytes(b"junk")
    code, err = run_split(tmp_path, capsys, "--images", str(images))
    assert code == 2
    assert "2 of 12 images cannot be decoded" in err and "--max-bad-fraction" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "ranges,expected",
    [
        (["--test-range", "30-20"], "--test-range 30-20 is invalid"),
        (["--test-range", "0-300"], "--test-range 0-300 is invalid"),
        (["--validation-range", "20-40"], "overlap"),
    ],
)
def test_bad_ranges(tmp_path: Path, capsys, ranges: list[str], expected: str) -> None:
    code, err = run_split(tmp_path, capsys, *ranges)
    assert code == 2 and expected in err


def test_class_folder_layout(tmp_path: Path, capsys) -> None:
    root = tmp_path / "flowers"
    for i, (object_id, value) in enumerate(zip(GOOD_IDS, GOOD_VALUES, strict=True)):
        save_image(root / value / f"{object_id}.jpg", random_rgb(seed=i), "JPEG")
    (root / "cat" / "notes.txt").write_text("ignored: not an image")
    code, err = run_split(tmp_path, capsys, labels=root)
    assert code == 0, err
    written = pd.read_csv(tmp_path / "out" / "split_label.csv", dtype=str)
    assert sorted(written["objectId"]) == sorted(f"{i}.jpg" for i in GOOD_IDS)
    assert dict(zip(written.objectId, written.value, strict=True))["a00.jpg"] == "cat"
    # The split file and the folder resolve back to the same files.
    paths = ingest.resolve_paths(written, root)
    assert paths.iloc[0] == str(root / written.value.iloc[0] / written.objectId.iloc[0])


def test_class_folder_repeated_file_name_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "flowers"
    save_image(root / "cat" / "1.png", random_rgb(), "PNG")
    save_image(root / "dog" / "1.png", random_rgb(), "PNG")
    with pytest.raises(ingest.InputError, match=r"first: 1.png in cat, dog"):
        ingest.scan_class_folders(root)


def test_images_resolve_by_name_by_stem_and_by_class_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    save_image(images / "a00.jpg", random_rgb(), "JPEG")
    save_image(images / "b01.png", random_rgb(), "PNG")
    save_image(images / "dog" / "c02.webp", random_rgb(), "WEBP")
    frame = pd.DataFrame(
        {"objectId": ["a00", "b01.png", "c02.webp"], "value": ["cat", "cat", "dog"]}
    )
    assert ingest.resolve_paths(frame, images).tolist() == [
        str(images / "a00.jpg"),
        str(images / "b01.png"),
        str(images / "dog" / "c02.webp"),
    ]


def test_class_names_are_stable_and_numeric_when_integers() -> None:
    assert ingest.class_names(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert ingest.class_names(["dog", "cat", "dog"]) == ["cat", "dog"]
    assert ingest.class_names(["b", "a"]) == ingest.class_names(["a", "b"])


def test_normalised_table_has_class_indices(tmp_path: Path) -> None:
    frame = pd.DataFrame({"objectId": ["x", "y", "z"], "value": ["10", "2", "10"]})
    table = ingest.normalise(
        frame, pd.Series(["p1", "p2", "p3"]), ingest.class_names(frame["value"])
    )
    assert table.columns.tolist() == ["objectId", "path", "value", "class_index"]
    assert table["class_index"].tolist() == [1, 0, 1]
