"""The data path at scale: one decode of each file for every size, caches under a disk budget
(eviction, end-to-end fallbacks), and the budget's bad input."""

from __future__ import annotations

from pathlib import Path

import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf

from data_tools import pipeline
from data_tools.errors import InputError
from tests.conftest import frozen, random_rgb, run_search, save_image
from tests.test_hypermodel import demo_data
from tuner.model import disk, hypermodel, space


def test_one_decode_of_each_file_gives_every_size_exactly(tmp_path: Path) -> None:
    paths = [
        str(save_image(tmp_path / f"{i}.jpg", random_rgb(60 + i, 90 - i, i), "JPEG"))
        for i in range(7)
    ]
    before = pipeline.decodes()
    batches = list(pipeline.stream_sizes(paths, [16, 40, 72], batch=3))
    assert pipeline.decodes() - before == 7  # once a file, not once a file and size
    assert [len(b[16]) for b in batches] == [3, 3, 1]
    for size in (16, 40, 72):
        streamed = np.concatenate([b[size] for b in batches])
        one_by_one = [pipeline.decode_image(tf.constant(p), size).numpy() for p in paths]
        assert np.array_equal(streamed, np.stack(one_by_one))  # the same pixels as before


def test_sizes_parse_and_bad_sizes_say_how_to_write_them() -> None:
    assert disk.parse_size("40GB") == 40 * 10**9
    assert disk.parse_size("1.5T") == 1.5 * 10**12
    assert disk.parse_size("500mb") == 500 * 10**6
    assert disk.parse_size("2048") == 2048
    with pytest.raises(InputError, match="write it like 40GB"):
        disk.parse_size("lots")


def test_under_a_tight_budget_a_fine_tune_evicts_then_falls_back_to_end_to_end(
    demo_dir, tmp_path, pretrained_t0
):
    values = {"backbones": ["T0"], "finetune_fraction": 0.25, "head_width": 0, "epochs": 2}
    maker = hypermodel.EffNetHyperModel(
        space.load(None, values), demo_data(demo_dir, tmp_path), str(pretrained_t0)
    )
    cache = Path(maker.data.cache_dir)
    maker.disk = disk.Budget(cache, int(2.3e6))
    maker.planned = [("T0", 32)]
    hp = kt.HyperParameters()
    hp.values["tuner/stage"] = "frozen"
    maker.fit(hp, maker.build(hp))
    pooled = sorted((cache / "features").glob("*.npy"))
    assert len(pooled) == 2 and maker.disk.used() <= maker.disk.limit  # train, validation
    assert not maker.last_fit.get("cache_notes")

    # The activations at the cut do not fit beside the pooled features: the least recently
    # read entries make room, and the trial line says which.
    hp.values["tuner/stage"] = "fine-tune"
    maker.fit(hp, maker.build(hp), epochs=1)
    notes = maker.last_fit["cache_notes"]
    assert any(n.startswith("evicted features/train-T0-32px") for n in notes), notes
    assert maker.last_fit["activation_cut"] and maker.disk.used() <= maker.disk.limit
    assert not (cache / "decoded").exists()

    # A deeper cut cannot fit at all: the fine-tune trains end to end, decoding the files
    # every epoch (no pixel cache either), and says both.
    maker.disk.limit = maker.disk.used() + 10_000
    hp.values["finetune_fraction"] = 0.5
    model = maker.build(hp)
    maker.fit(hp, model, epochs=1)
    notes = maker.last_fit["cache_notes"]
    assert "so the fine-tune trains end to end" in notes
    assert "so they are decoded from the files every epoch" in notes
    assert "activation_cut" not in maker.last_fit and maker.last_fit["epochs_run"] == 1
    assert not (cache / "decoded").exists() and maker.disk.used() <= maker.disk.limit


def test_a_budget_too_small_or_an_unwritable_cache_dir_is_one_line_before_any_trial(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    common = ["--algorithm", "random", *frozen(pretrained_t0), "--budget", "5m"]
    assert run_search(tmp_path, demo_dir, "small", *common, "--cache-budget", "100KB") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--cache-budget 100.0 KB is too small" in err, err
    assert "the smallest workable budget is 2.2 MB" in err
    assert not (tmp_path / "results" / "small" / "trials.csv").exists()

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert run_search(tmp_path, demo_dir, "nodir", *common, "--cache-dir", str(blocked)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --cache-dir {blocked} cannot be written") and "\n" not in err
