"""Faults a 20-hour search meets: the process killed outright, the disk filling up, a cache
file corrupted. (SIGTERM, out of memory, NaN loss and an unreachable W&B are tested beside
the features they hit: test_search.py and test_wandb.py.)"""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from tests.conftest import frozen, run_search, search_argv
from tests.test_distribute import ROOT, clean_env
from tuner.model import features

COMMON = ["--algorithm", "random", "--set", "epochs=2", "--set", "max_trials=2", "--budget", "10m"]


def read_trials(out) -> pd.DataFrame:
    return pd.read_csv(out / "trials.csv", dtype={"trial_id": str})


@pytest.mark.slow  # the chaos test below kills ten times, at chosen moments too
def test_kill_9_mid_trial_loses_only_that_trials_progress(tmp_path, demo_dir, pretrained_t0):
    # Frozen heads, 200 epochs each: long enough to be killed inside the second trial.
    slow_heads = [*frozen(pretrained_t0), *COMMON, "--set", "epochs=200"]
    argv = [
        sys.executable,
        "-m",
        "tuner.search",
        *search_argv(tmp_path, demo_dir, "k", *slow_heads),
    ]
    out = tmp_path / "results" / "k"
    process = subprocess.Popen(
        argv, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (out / "trials.csv").exists():
        time.sleep(0.2)
    time.sleep(4)  # inside the second trial
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    first = read_trials(out)
    assert first.trial_id.tolist() == ["0"] and first.status[0] == "completed"
    spent_before = float(pd.read_json(out / "budget.json", typ="series")["spent_s"])
    # Resume: the killed trial runs again from its start; nothing lost, nothing doubled.
    done = subprocess.run(argv, cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = read_trials(out)
    assert sorted(table.trial_id) == ["0", "1"] and (table.status == "completed").all()
    pd.testing.assert_series_equal(table.iloc[0], first.iloc[0], check_names=False)
    kt_trials = sorted((out / "keras_tuner").glob("trial_*"))
    assert len(kt_trials) == 2
    assert float(pd.read_json(out / "budget.json", typ="series")["spent_s"]) > spent_before


def test_full_disk_stops_cleanly_and_the_results_stay_valid(
    tmp_path, demo_dir, pretrained_t0, capsys, monkeypatch
):
    # Frozen heads on cached features: seconds a trial, and the same records to write.
    quick = [*frozen(pretrained_t0), *COMMON]
    out = tmp_path / "results" / "full"
    real_to_csv = pd.DataFrame.to_csv
    writes = []

    def to_csv(self, path=None, *args, **kwargs):
        if str(path).endswith(".tmp") and ".trials.csv." in str(path):
            writes.append(path)
            if len(writes) == 2:  # the second trial's row: half written, then no space
                with open(path, "w") as handle:
                    handle.write("trial_id,status\n0,compl")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_to_csv(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    assert run_search(tmp_path, demo_dir, "full", *quick) == 1
    output = capsys.readouterr().out
    assert "stopped: the disk is full" in output and "resume with the same command" in output
    assert "Traceback" not in output
    first = read_trials(out)  # the file from before the failed write, whole
    assert first.trial_id.tolist() == ["0"] and first.status[0] == "completed"
    assert not list(out.rglob("*.tmp"))
    # Space again: resume records the trial that could not be recorded, once.
    monkeypatch.setattr(pd.DataFrame, "to_csv", real_to_csv)
    assert run_search(tmp_path, demo_dir, "full", *quick) == 0
    table = read_trials(out)
    assert sorted(table.trial_id) == ["0", "1"] and table.trial_id.is_unique


def test_corrupt_feature_cache_is_detected_and_rebuilt(tmp_path):
    calls = []

    def forward(images: np.ndarray) -> np.ndarray:  # run only when something is computed
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :4].astype("float32") + 1

    pixels = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    target = tmp_path / "features" / "train.npy"
    entry = features.Pass(target, 2, (4,), features.DTYPE, forward, batch=4)

    def cached() -> np.ndarray:
        features.run_passes({2: pixels}, 10, [entry])
        return np.array(features.load_entry(target, 10))

    first = cached()
    assert calls == [4, 4, 4] and first.shape == (10, 4)  # the last batch padded
    assert np.array_equal(first, pixels.reshape(10, -1)[:, :4] + 1)
    target.write_bytes(target.read_bytes()[:100])  # truncated by a crash mid-copy
    assert features.load_entry(target, 10) is None
    again = cached()
    assert len(calls) == 6 and np.array_equal(again, first)
    assert np.array_equal(cached(), first)
    assert len(calls) == 6  # whole again: loaded, not computed


@pytest.mark.slow
def test_chaos_ten_kills_lose_nothing_double_nothing_corrupt_nothing(tmp_path, capsys):
    from tuner import bench_chaos

    assert bench_chaos.main(["--kills", "10", "--seed", "0", "--results", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert (
        printed.strip()
        .splitlines()[-1]
        .endswith("kills, 0 lost trials, 0 doubled, 0 corrupt files")
    )
    assert printed.count("SIGKILL at") >= 5  # most processes were killed, not finished


def test_a_kill_point_kills_the_writer_and_sweep_removes_only_dead_writers_files(tmp_path):
    from data_tools import atomic

    script = (
        "import sys; from data_tools.atomic import write_text\n"
        "for i in range(3): write_text(sys.argv[1], str(i), 'trials')\n"
    )
    target = tmp_path / "trials.csv"
    env = {**clean_env(), atomic.KILL_AT: "trials:2"}
    done = subprocess.run([sys.executable, "-c", script, str(target)], env=env, cwd=ROOT)
    assert done.returncode == -signal.SIGKILL
    assert target.read_text() == "0"  # the second write was killed before its rename
    left = [p.name for p in tmp_path.iterdir() if p.name != "trials.csv"]
    assert len(left) == 1 and atomic.temp_target(left[0]) == "trials.csv"
    assert atomic.is_stale(left[0])
    env[atomic.KILL_AT] = "trials.renamed:1"
    done = subprocess.run([sys.executable, "-c", script, str(target)], env=env, cwd=ROOT)
    assert done.returncode == -signal.SIGKILL and target.read_text() == "0"
    with atomic.atomic_path(tmp_path / "live.csv") as live:  # this process's: kept
        live.write_text("x")
        assert atomic.sweep(tmp_path) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["trials.csv", live.name])
    assert (tmp_path / "live.csv").read_text() == "x"
