"""The data path at scale: one decode of each file for every size, caches under a disk budget
(eviction, end-to-end fallbacks), and the budget's bad input."""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from pathlib import Path

import keras_tuner as kt
import numpy as np
import pandas as pd
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
    maker.store.disk = disk.Budget(cache, int(2.3e6))
    maker.store.planned = [("T0", 32, "top")]
    hp = kt.HyperParameters()
    hp.values["tuner/stage"] = "frozen"
    maker.fit(hp, maker.build(hp))
    pooled = sorted((cache / "features").glob("*.npy"))
    budget = maker.store.disk
    assert len(pooled) == 2 and budget.used() <= budget.limit  # train, validation
    assert not maker.last_fit.get("cache_notes")

    # The activations at the cut do not fit beside the pooled features: the least recently
    # read entries make room, and the trial line says which.
    hp.values["tuner/stage"] = "fine-tune"
    maker.fit(hp, maker.build(hp), epochs=1)
    notes = maker.last_fit["cache_notes"]
    assert any(n.startswith("evicted features/train-T0-32px") for n in notes), notes
    assert maker.last_fit["activation_cut"] and maker.store.disk.used() <= maker.store.disk.limit
    assert not (cache / "decoded").exists()

    # A deeper cut cannot fit at all: the fine-tune trains end to end, decoding the files
    # every epoch (no pixel cache either), and says both.
    maker.store.disk.limit = maker.store.disk.used() + 10_000
    hp.values["finetune_fraction"] = 0.5
    model = maker.build(hp)
    maker.fit(hp, model, epochs=1)
    notes = maker.last_fit["cache_notes"]
    assert "so the fine-tune trains end to end" in notes
    assert "so they are decoded from the files every epoch" in notes
    assert "activation_cut" not in maker.last_fit and maker.last_fit["epochs_run"] == 1
    assert not (cache / "decoded").exists() and maker.store.disk.used() <= maker.store.disk.limit


def test_a_budget_too_small_or_an_unwritable_cache_dir_is_one_line_before_any_trial(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    common = ["--algorithm", "random", *frozen(pretrained_t0), "--budget", "5m"]
    assert run_search(tmp_path, demo_dir, "small", *common, "--cache-budget", "100KB") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--cache-budget 100.0 KB is too small" in err, err
    # Stage features (504 values an image on T0) come first: their features, not the top's.
    assert "the first feature set (T0 32px stages) needs 3.5 MB" in err, err
    assert "the smallest workable budget is 3.5 MB; 5.6 MB holds every planned" in err
    assert not (tmp_path / "results" / "small" / "trials.csv").exists()

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert run_search(tmp_path, demo_dir, "nodir", *common, "--cache-dir", str(blocked)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --cache-dir {blocked} cannot be written") and "\n" not in err


@pytest.mark.slow  # 47 s of the fast tier (two searches); the refusal naming it is tested above
def test_the_smallest_workable_budget_it_prints_runs_a_search_with_no_trial_failed(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    # The default space reads stage features first, then the pooled top: the plan sizes
    # each as written, and a search given the smallest budget the refusal names runs.
    common = ["--algorithm", "transfer", "--budget", "3m", *frozen(pretrained_t0)]
    common += ["--set", "head_trials=2"]
    common += ["--set", "max_trials=3"]  # two heads on stage features, one on the top
    assert run_search(tmp_path, demo_dir, "tiny", *common, "--cache-budget", "1KB") == 2
    smallest = re.search(r"smallest workable budget is ([\d.]+ MB)", capsys.readouterr().err)
    budget = smallest.group(1).replace(" ", "")
    assert run_search(tmp_path, demo_dir, "tight", *common, "--cache-budget", budget) == 0
    out = capsys.readouterr().out
    assert re.search(r"features T0 32px stages +3\.4 MB +fits", out), out
    assert re.search(r"features T0 32px top +2\.2 MB +does not fit now", out), out
    table = pd.read_csv(tmp_path / "results" / "tight" / "trials.csv")
    assert (table["status"] == "completed").all() and len(table) == 3, table[["status", "reason"]]
    assert set(table["features"]) == {"stages", "top"}
    assert "evicted" in " ".join(table["cache_notes"].dropna())  # the top's made room

    # The plan's figures are the bytes written: the top's files, and the stage features'
    # validation file beside the train file the top's first head evicted.
    written: dict[int, int] = {}
    for path in (tmp_path / "results" / "tight" / "cache" / "features").glob("*.npy"):
        width = np.load(path, mmap_mode="r").shape[1]
        written[width] = written.get(width, 0) + path.stat().st_size
    evicted = re.search(r"evicted features/train-\S+ \(([\d.]+) MB\)", out).group(1)
    assert disk.format_bytes(written[320]) == "2.2 MB"
    assert f"{written[504] / 1e6 + float(evicted):.1f}" == "3.4"


def _admit_and_hold(folder: str, entry: str, pipe) -> None:
    budget = disk.Budget(Path(folder), 100_000)
    pipe.send(budget.admit(60_000, reserve=Path(entry))[0])
    pipe.recv()  # hold the reservation until told, or until killed


def test_processes_sharing_a_cache_admit_under_one_budget(tmp_path: Path) -> None:
    # An admitted entry is reserved until it is written: another process sees its bytes
    # (check-then-act raced before: both admitted and the folder outgrew its budget).
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    child = context.Process(
        target=_admit_and_hold, args=(str(tmp_path), str(tmp_path / "a.npy"), theirs)
    )
    child.start()
    try:
        assert mine.recv() is True
        budget = disk.Budget(tmp_path, 100_000)
        assert budget.used() == 60_000  # the child's reservation, no blocks written
        assert budget.admit(60_000, reserve=tmp_path / "b.npy") == (False, [])
        # Written, the entry counts as itself, its temporary file not twice meanwhile.
        np.save(tmp_path / "c.npy", np.zeros(1000, np.uint8))
        assert budget.used() == 60_000 + (tmp_path / "c.npy").stat().st_size
    finally:
        child.kill()  # a crash: its reservation no longer counts
        child.join()
    assert budget.used() == (tmp_path / "c.npy").stat().st_size
    assert budget.admit(60_000, reserve=tmp_path / "b.npy") == (True, [])
    assert budget.used() == 60_000 + (tmp_path / "c.npy").stat().st_size
    budget.release()
    assert not list(tmp_path.glob("*.reserved"))


def test_a_probe_does_not_make_an_entry_younger(tmp_path: Path) -> None:
    from tuner.model import features

    folder = tmp_path / "features"
    folder.mkdir()
    old, new = folder / "old.npy", folder / "new.npy"
    for age, path in ((200, old), (100, new)):
        np.save(path, np.zeros((4, 8), np.float32))
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
    assert features.load_entry(old, 4) is not None  # looked at (a plan, a pass ahead)
    budget = disk.Budget(tmp_path, disk.Budget(tmp_path, 0).used() - 1)
    fits, evicted = budget.admit(0)
    assert fits and [path for path, _ in evicted] == [old]  # the least recently read
    disk.mark_read(new)  # read: younger than anything written before
    assert new.stat().st_mtime > time.time() - 5


def test_an_entry_another_process_evicts_before_it_is_read_is_computed_again(
    demo_dir, tmp_path, pretrained_t0, monkeypatch
):
    from tuner.model import features

    values = {"backbones": ["T0"], "finetune_fraction": 0.0, "head_width": 0, "features": "top"}
    maker = hypermodel.EffNetHyperModel(
        space.load(None, values), demo_data(demo_dir, tmp_path), str(pretrained_t0)
    )
    maker.store.disk = disk.Budget(Path(maker.data.cache_dir), 10**9)
    real, runs = features.run_passes, []

    def evicted_once(source, rows, passes, label="backbone pass"):
        spent = real(source, rows, passes, label)
        runs.append(passes[0].target)
        if len(runs) == 1:
            passes[0].target.unlink()  # another worker's eviction, between write and read
        return spent

    monkeypatch.setattr(features, "run_passes", evicted_once)
    hp = kt.HyperParameters()
    hp.values["tuner/stage"] = "frozen"
    result = maker.fit(hp, maker.build(hp))
    assert runs[0] == runs[1] and result["val_accuracy"] > 0.5

    def always_evicted(source, rows, passes, label="backbone pass"):
        spent = real(source, rows, passes, label)
        passes[0].target.unlink()
        return spent

    monkeypatch.setattr(features, "run_passes", always_evicted)
    for entry in Path(maker.data.cache_dir).glob("features/*.npy"):
        entry.unlink()
    with pytest.raises(kt.errors.FailedTrialError, match="evicted by another process"):
        maker.fit(hp, maker.build(hp))
