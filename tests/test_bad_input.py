"""The bad-input catalogue: every command line of data_tools and tuner, given a mistake, says
what is wrong and how to fix it in one line on stderr, exits with code 2 and writes nothing.

One case a test. Each runs the CLI's ``main`` in-process through ``run_cli`` (what
``python -m ...`` runs) inside a sandbox folder whose every file is compared before and after.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from data_tools import demo, split
from data_tools.errors import run_cli
from tuner import dashboard, export_best, predict, search


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def labels(box: Path, rows: str, header: str = "objectId,value") -> str:
    return write(box / "label.csv", f"{header}\n{rows}")


def split_args(box: Path, labels_file: str, *extra: str) -> list[str]:
    return ["--labels", labels_file, "--out", str(box / "out" / "split.csv"), *extra]


def search_args(box: Path, *extra: str) -> list[str]:
    return ["--results", str(box / "results"), "--cache", str(box / "cache"), *extra]


def searched(box: Path) -> str:
    """A results folder with one failed trial: nothing to export."""
    write(box / "results" / "s" / "config.yaml", "name: s\n")
    write(box / "results" / "s" / "trials.csv", "trial_id,status,reason\n0,failed,NaN\n")
    return str(box / "results" / "s")


# (id, CLI main, argv from the sandbox, what the line must say)
CASES: list[tuple[str, Callable, Callable[[Path], list[str]], str]] = [
    (
        "split-missing-labels",
        split.main,
        lambda b: split_args(b, str(b / "nowhere.csv")),
        "labels file {box}/nowhere.csv does not exist: pass the path of your label.csv",
    ),
    (
        "split-empty-labels",
        split.main,
        lambda b: split_args(b, write(b / "label.csv", "")),
        "is empty: it needs a header line 'objectId,value'",
    ),
    (
        "split-wrong-header",
        split.main,
        lambda b: split_args(b, labels(b, "a,1\n", header="id,label")),
        "the header must be exactly 'objectId,value'",
    ),
    (
        "split-header-only",
        split.main,
        lambda b: split_args(b, labels(b, "")),
        "has a header but no rows: add one row per image",
    ),
    (
        "split-blank-value",
        split.main,
        lambda b: split_args(b, labels(b, "a1,1\nb2,\n")),
        "1 row(s) have a blank value (line 3): fill them in or remove those rows",
    ),
    (
        "split-duplicate-ids",
        split.main,
        lambda b: split_args(b, labels(b, "a1,1\na1,2\nb2,1\n")),
        "1 objectId(s) appear more than once (a1): each image must have exactly one row",
    ),
    (
        "split-one-class",
        split.main,
        lambda b: split_args(b, labels(b, "a1,1\nb2,1\n")),
        "found only one class ('1'); a classifier needs at least two different values",
    ),
    (
        "split-overlapping-ranges",
        split.main,
        lambda b: split_args(
            b, labels(b, "a1,1\nb2,2\n"), "--test-range", "0-30", "--validation-range", "20-49"
        ),
        "--test-range 0-30 and --validation-range 20-49 overlap: make them disjoint",
    ),
    (
        "split-missing-images-folder",
        split.main,
        lambda b: split_args(b, labels(b, "a1,1\nb2,2\n"), "--images", str(b / "nowhere")),
        "images folder {box}/nowhere does not exist: pass --images with the folder",
    ),
    (
        "split-images-without-files",
        split.main,
        lambda b: split_args(
            b, labels(b, "a1,1\nb2,2\n"), "--images", str((b / "imgs").mkdir() or b / "imgs")
        ),
        "2 of 2 label rows have no image file in {box}/imgs (objectId a1, b2)",
    ),
    (
        "demo-out-is-other-data",
        demo.main,
        lambda b: ["--out", str(Path(write(b / "mine" / "notes.txt", "mine")).parent)],
        "{box}/mine exists and is not a demo data folder: pick a new --out",
    ),
    (
        "search-bad-budget",
        search.main,
        lambda b: search_args(b, "--budget", "soon"),
        "--budget 'soon' is not a duration: write e.g. 20h, 90m, 45s or 1h30m",
    ),
    (
        "search-bad-cache-budget",
        search.main,
        lambda b: search_args(b, "--cache-budget", "plenty"),
        "--cache-budget 'plenty' is not a size: write it like 40GB, 500MB or 1.5TB",
    ),
    (
        "search-costs-without-dry-run",
        search.main,
        lambda b: search_args(b, "--costs", write(b / "c.yaml", "backbones: {}")),
        "--costs is what --dry-run plans from: add --dry-run, or drop --costs",
    ),
    (
        "search-zero-budget",
        search.main,
        lambda b: search_args(b, "--budget", "0m"),
        "--budget '0m' must be longer than zero",
    ),
    (
        "search-missing-data",
        search.main,
        lambda b: search_args(b, "--data", str(b / "nowhere.csv")),
        "--data {box}/nowhere.csv does not exist: pass a split_label.csv, a label.csv",
    ),
    (
        # The label file is checked before any weights are looked for (B7's are not cached).
        "search-bad-header-before-weights",
        search.main,
        lambda b: search_args(
            b, "--data", labels(b, "a,1\n", header="id,label"), "--set", "backbones=[B7]"
        ),
        "the header must be exactly 'objectId,value'",
    ),
    (
        "search-bad-labels",
        search.main,
        lambda b: search_args(b, "--weights", "none", "--data", labels(b, "a1,1\na1,2\n")),
        "1 objectId(s) appear more than once (a1)",
    ),
    (
        "search-empty-class-folder",
        search.main,
        lambda b: search_args(
            b, "--weights", "none", "--data", str((b / "classes").mkdir() or b / "classes")
        ),
        "image folder {box}/classes has no class sub-folders with images",
    ),
    (
        "search-missing-space",
        search.main,
        lambda b: search_args(b, "--space", str(b / "nowhere.yaml")),
        "search-space file {box}/nowhere.yaml does not exist: pass one of the shipped spaces "
        "(default, quick, v1_v2, v2)",
    ),
    (
        "search-space-not-yaml",
        search.main,
        lambda b: search_args(b, "--space", write(b / "s.yaml", "epochs: [1,\n")),
        "is not valid YAML",
    ),
    (
        "search-space-unknown-key",
        search.main,
        lambda b: search_args(b, "--space", write(b / "s.yaml", "epoch: 3\n")),
        "unknown key(s) epoch; valid keys are",
    ),
    (
        "search-set-without-value",
        search.main,
        lambda b: search_args(b, "--set", "epochs"),
        "--set epochs: write --set key=value, e.g. --set epochs=3",
    ),
    (
        "search-unknown-backbone",
        search.main,
        lambda b: search_args(b, "--set", "backbones=[B9]"),
        "unknown backbone 'B9'",
    ),
    (
        "search-no-backbones",
        search.main,
        lambda b: search_args(b, "--set", "backbones=[]"),
        "backbones is empty; list at least one of",
    ),
    (
        "search-bad-epochs",
        search.main,
        lambda b: search_args(b, "--set", "epochs=0"),
        "epochs must be a whole number >= 1",
    ),
    (
        "search-weights-not-a-folder",
        search.main,
        lambda b: search_args(b, "--weights", str(b / "nowhere")),
        "--weights {box}/nowhere: not imagenet, none, or a folder",
    ),
    (
        "search-chief-and-worker",
        search.main,
        lambda b: search_args(b, "--chief", "h:1", "--worker", "h:1"),
        "--chief and --worker were both given: a process is one or the other",
    ),
    (
        "search-bad-chief-address",
        search.main,
        lambda b: search_args(b, "--chief", "8000"),
        "--chief '8000' is not HOST:PORT: write e.g. --chief 10.0.0.5:8000",
    ),
    (
        "search-worker-overwrite",
        search.main,
        lambda b: search_args(b, "--worker", "h:1", "--overwrite"),
        "--overwrite on a --worker would delete the folder its chief is using",
    ),
    (
        "search-bad-gpus",
        search.main,
        lambda b: search_args(b, "--gpus", "0,0"),
        "--gpus '0,0': list distinct GPU numbers, e.g. --gpus 0,1,2,3",
    ),
    (
        "search-gpus-with-chief",
        search.main,
        lambda b: search_args(b, "--gpus", "0,1", "--chief", "h:1"),
        "--gpus starts its own chief and workers: drop --chief/--worker",
    ),
    (
        "export-no-results",
        export_best.main,
        lambda b: ["--results", str(b / "nowhere")],
        "is not a search's results folder (no trials.csv or config.yaml)",
    ),
    (
        "export-nothing-finished",
        export_best.main,
        lambda b: ["--results", searched(b)],
        "no finished trial to choose from (1 trial(s), 1 failed or unfinished)",
    ),
    (
        "predict-not-an-export",
        predict.main,
        lambda b: ["--model", str(b), str(b)],
        "is not an exported model (no saved_model/ or labels.txt): run python -m "
        "tuner.export_best first",
    ),
    (
        "dashboard-unknown-search",
        dashboard.main,
        lambda b: ["--search", "nope", "--results", str(b / "results"), "--mode", "offline"],
        "no search named 'nope' in {box}/results/: run python -m tuner.search --name nope",
    ),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize(
    ("main", "make_argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, main, make_argv, expected):
    box = tmp_path / "box"
    box.mkdir()
    argv = make_argv(box)
    before = snapshot(box)
    env_before = dict(os.environ)
    code = run_cli(main, argv)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected.format(box=box) in err, err
    assert snapshot(box) == before  # nothing written, nothing half-written
    os.environ.clear()
    os.environ.update(env_before)  # --chief/--worker set KERASTUNER_* for Keras Tuner
