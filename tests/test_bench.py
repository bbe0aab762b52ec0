"""The benchmarks run and print their tables (the numbers are measured by hand, not here).

Slow tier (``python -m pytest -m slow``): each runs whole searches and trainings, and they
are measuring tools, run by hand; what they measure is tested in the default tier.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tuner import bench, bench_quality
from tuner.report import quality

pytestmark = pytest.mark.slow


def test_bench_prints_one_line_per_measure(capsys):
    argv = ["--backbone", "T0", "--images", "60", "--size", "32", "--epochs", "1"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["measure", "reference", "s", "ours", "s", "ratio", "target"]
    last = lines[-5:]
    assert [line.split(":")[0] for line in last] == [
        "frozen trial",
        "second frozen trial",
        "fine-tune top 20%",
        "augmented frozen trial",
        "decoding",
    ]
    assert all(line.endswith("x") and float(line.split(": ")[1][:-1]) > 0 for line in last)


def test_bench_quality_compares_every_baseline_with_the_search_on_each_fold(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    argv = ["--data", str(demo_dir / "label.csv"), "--weights", str(pretrained_t0)]
    argv += ["--results", str(tmp_path), "--name", "digits", "--set", "backbones=[T0]"]
    argv += ["--set", "head_trials=2", "--set", "finetune_fraction=0.0", "--folds", "2"]
    argv += ["--recipe-backbone", "T0", "--image-size", "32", "--recipe-epochs", "2"]
    argv += ["--example-epochs", "1,1", "--budget", "30s"]
    assert bench_quality.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[-3:]] == [
        "quality vs seed",
        "quality vs keras-example",
        "quality vs hyperband",
    ]
    report = json.loads((tmp_path / "digits-quality" / "bench_quality.json").read_text())
    first, second = report["folds"]
    assert first["split_ranges"] == {"test": "0-24", "validation": "25-49"}
    assert second["split_ranges"] == {"test": "25-49", "validation": "50-74"}
    for fold in report["folds"]:  # one test split a fold, for every method
        counts = {m["test"]["count"] for m in [*fold["methods"].values(), *fold["ours"].values()]}
        assert len(counts) == 1
        ours = fold["ours"]["30s"]["test"]["accuracy"]
        for name, row in fold["comparisons"].items():
            assert row["difference"] == ours - fold["methods"][name]["test"]["accuracy"]
    # An explicit --budget is not the recipes' time: the lines say so.
    assert report["summary"]["seed"]["folds"] == 2
    assert lines[-3] == quality.quality_line("seed", report["summary"]["seed"])
    assert "not equal wall clock" in lines[-3]
    # A second run reuses every method's run (same split, weights and settings).
    shutil.rmtree(tmp_path / "digits-quality" / "fold1" / "hyperband")
    assert bench_quality.main(argv) == 0
    assert capsys.readouterr().out.count("reusing its run") == 8


def test_bench_scale_measures_each_n_and_ends_with_its_scale_line(tmp_path, capsys):
    from tuner import bench_scale

    argv = ["--counts", "40,80", "--sizes", "32,48", "--heads", "1", "--fine-tunes", "1"]
    argv += ["--images-dir", str(tmp_path / "photos"), "--cache-budget", "50MB"]
    assert bench_scale.main([*argv, "--out", str(tmp_path / "scale.csv")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("scale: time x") and "for 2x the images (linear = 2)" in last
    assert last.endswith("within budget 0.05 GB, 1.00 decodes an image")
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 80
