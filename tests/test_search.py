"""End to end through the production path: the tiny T0 backbone on the demo digits.

Each search here trains real models (T0: 173k parameters, 32 px, random init) for a few
epochs; trial-level faults (NaN, out of memory, crashes) are injected around the real fit.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import keras_tuner as kt
import pandas as pd
import pytest
import tensorflow as tf
import yaml

from data_tools.errors import run_cli
from tests.conftest import frozen, rebuilt_val_accuracy, run_search
from tuner import search
from tuner.engine import session
from tuner.model import hypermodel, space, training

run = run_search
# One quick trial: random search, one epoch.
ONE_TRIAL = [
    "--algorithm",
    "random",
    "--set",
    "epochs=1",
    "--set",
    "max_trials=1",
    "--budget",
    "10m",
]


def trials(tmp_path: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "results" / name / "trials.csv", dtype={"trial_id": str})


def spent(tmp_path: Path, name: str) -> float:
    return yaml.safe_load((tmp_path / "results" / name / "budget.json").read_text())["spent_s"]


def epoch_seconds(output: str) -> list[float]:
    return [
        float(s)
        for s in re.findall(r"^  epoch \d+/\d+ .* ([\d.]+)s  budget left", output, re.MULTILINE)
    ]


def test_budget_stops_the_running_trial_at_an_epoch_boundary(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    # Frozen heads, 1,000 epochs of a fraction of a second: the 10 s deadline falls inside.
    code = run(
        tmp_path,
        demo_dir,
        "b20",
        *("--budget", "10s", "--set", "epochs=1000", "--algorithm", "random"),
        *frozen(pretrained_t0),
    )
    output = capsys.readouterr().out
    assert code == 0
    table = trials(tmp_path, "b20")
    assert len(table) == 1
    assert table.status[0] == "stopped-budget" and 1 <= table.epochs[0] < 1000
    # Overshoot: at most one epoch, plus measuring latency and saving the model.
    longest_epoch = max(epoch_seconds(output))
    assert spent(tmp_path, "b20") <= 10 + longest_epoch + 8, output
    assert "budget reached" in output
    leaderboard = (tmp_path / "results" / "b20" / "leaderboard.md").read_text()
    assert "| 0 | T0 (budget) | 32 |" in leaderboard or "T0 (budget)" in leaderboard
    assert (tmp_path / "results" / "b20" / "pareto.png").stat().st_size > 1000


def test_interrupted_trial_is_rerun_on_resume(tmp_path, demo_dir, pretrained_t0, capsys):
    # Frozen heads on cached features, 100 epochs (no early stopping outside `transfer`):
    # a trial lasts long enough to be interrupted inside, and costs a fraction of a
    # whole-network trial.
    common = [
        *frozen(pretrained_t0),
        "--algorithm",
        "random",
        "--set",
        "epochs=100",
        "--set",
        "max_trials=2",
        "--budget",
        "10m",
    ]
    csv = tmp_path / "results" / "i" / "trials.csv"

    def interrupt_during_second_trial() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not csv.exists():
            time.sleep(0.2)
        time.sleep(3)  # well inside trial 2's first epoch
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; Ctrl-C shares the handler

    thread = threading.Thread(target=interrupt_during_second_trial, daemon=True)
    thread.start()
    assert run(tmp_path, demo_dir, "i", *common) == session.EXIT_INTERRUPTED
    thread.join()
    output = capsys.readouterr().out
    assert "interrupted" in output
    assert trials(tmp_path, "i").trial_id.tolist() == ["0"]
    assert run(tmp_path, demo_dir, "i", *common) == 0
    table = trials(tmp_path, "i")
    assert table.trial_id.tolist() == ["0", "1"] and (table.status == "completed").all()


def test_failed_trials_are_recorded_and_the_search_goes_on(
    tmp_path, demo_dir, pretrained_t0, capsys, monkeypatch
):
    real_fit = hypermodel.EffNetHyperModel.fit
    calls = []

    def nan_first(self, hp, model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return training.best_metrics(
                {
                    "loss": [float("nan")],
                    "val_accuracy": [0.1],
                    "val_loss": [float("nan")],
                    "accuracy": [0.1],
                }
            )
        return real_fit(self, hp, model, *args, **kwargs)

    monkeypatch.setattr(hypermodel.EffNetHyperModel, "fit", nan_first)
    code = run(
        tmp_path,
        demo_dir,
        "f",
        *frozen(pretrained_t0),
        "--algorithm",
        "random",
        "--set",
        "epochs=1",
        "--set",
        "max_trials=2",
        "--budget",
        "10m",
    )
    output = capsys.readouterr().out
    assert code == 0
    table = trials(tmp_path, "f")
    assert table.status.tolist() == ["failed", "completed"]
    assert table.reason[0] == "FailedTrialError: loss became NaN at epoch 1"
    assert "Traceback" not in output
    assert (
        "- 0 T0: FailedTrialError: loss became NaN at epoch 1"
        in (tmp_path / "results" / "f" / "leaderboard.md").read_text()
    )


def test_consecutive_failures_end_with_a_clear_message(tmp_path, demo_dir, capsys, monkeypatch):
    def broken(self, hp, model, *args, **kwargs):
        raise ValueError("cannot decode image x.jpg")

    monkeypatch.setattr(hypermodel.EffNetHyperModel, "fit", broken)
    code = run(
        tmp_path,
        demo_dir,
        "c",
        "--algorithm",
        "random",
        "--set",
        "max_consecutive_failures=2",
        "--budget",
        "10m",
    )
    output = capsys.readouterr().out
    assert code == 1
    assert "stopped: 2 trials failed in a row" in output
    assert "raise max_consecutive_failures" in output and "Traceback" not in output
    table = trials(tmp_path, "c")
    assert (table.reason == "ValueError: cannot decode image x.jpg").all() and len(table) == 2


@pytest.mark.slow  # 35 s of the fast tier (two searches)
def test_out_of_memory_halves_the_batch_then_fails_at_the_floor(
    tmp_path, demo_dir, pretrained_t0, capsys, monkeypatch
):
    from keras_tuner.src.engine.tuner_utils import SaveBestEpoch

    real_fit = hypermodel.EffNetHyperModel.fit
    tried = []

    def small_memory(self, hp, model, *args, **kwargs):
        batch = self.plan(hp).batch_size
        tried.append(batch)
        if batch > 8:
            # The abandoned attempt got to a (perfect) best epoch before running out.
            (saver,) = [c for c in kwargs["callbacks"] if isinstance(c, SaveBestEpoch)]
            saver.set_model(model)
            saver.on_epoch_end(0, {"val_accuracy": 1.0})
            raise tf.errors.ResourceExhaustedError(None, None, f"OOM at batch {batch}")
        return real_fit(self, hp, model, *args, **kwargs)

    monkeypatch.setattr(hypermodel.EffNetHyperModel, "fit", small_memory)
    common = [*ONE_TRIAL, *frozen(pretrained_t0), "--set", "batch_size=32"]
    assert run(tmp_path, demo_dir, "oom", *common) == 0
    assert tried == [32, 16, 8]
    table = trials(tmp_path, "oom")
    assert table.status[0] == "completed" and table.batch_size[0] == 8
    assert "out of memory at batch 32: retrying at 16" in capsys.readouterr().out
    # The best-epoch checkpoint (what a Hyperband continuation and export load) is the
    # retry's best epoch, the one its row describes, not the abandoned attempt's.
    accuracy, source = rebuilt_val_accuracy(tmp_path / "results" / "oom", "0")
    assert source.startswith("rebuilt it with its best-epoch weights")
    assert accuracy == pytest.approx(table.val_accuracy[0], abs=1e-6) and accuracy < 1.0
    assert run(tmp_path, demo_dir, "floor", *common, "--set", "min_batch_size=16") == 0
    table = trials(tmp_path, "floor")
    assert table.reason[0] == ("FailedTrialError: out of memory at batch size 16 (the floor is 16)")


def test_hyperband_runs_its_brackets_until_the_budget_unless_told_how_many_times(tmp_path):
    """``hyperband_iterations: 0`` (the default) asks Keras Tuner for as many iterations as
    the budget holds (the budget gate ends the search); a number is taken as it is."""
    import keras

    def build(hp):
        return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    for asked, given in ((0, session.UNTIL_BUDGET), (3, 3)):
        searched = space.load(None, {"algorithm": "hyperband", "hyperband_iterations": asked})
        tuner = session.make_tuner(kt.Hyperband, build, searched, tmp_path / str(asked))
        assert tuner.oracle.hyperband_iterations == given


@pytest.mark.slow  # 73 s of the fast tier (ten trials); the iterations' setting is tested fast
def test_hyperband_continues_trials_from_checkpoints_and_runs_its_brackets_again(
    tmp_path, demo_dir, pretrained_t0, capsys, monkeypatch
):
    # Frozen heads on cached features: the continuation is Keras Tuner's, whatever trains.
    common = [
        *("--weights", str(pretrained_t0), "--set", "finetune_fraction=0.0"),
        *("--set", "head_width=16", "--algorithm", "hyperband", "--set", "epochs=2"),
        *("--set", "hyperband_factor=2", "--wandb-mode", "disabled", "--budget", "10m"),
    ]
    # By default (0) its brackets run again until the budget ends the search; with at most
    # two iterations here, it ends after the second: twice the 5 trials of its brackets
    # (max_epochs 2, factor 2: 2 trials at 1 epoch, 1 promoted to 2; 2 at 2 epochs).
    monkeypatch.setattr(session, "UNTIL_BUDGET", 2)
    assert run(tmp_path, demo_dir, "hb", *common) == 0
    assert "search finished" in capsys.readouterr().out
    assert len(trials(tmp_path, "hb")) == 10
    table = trials(tmp_path, "hb")
    assert (table.status == "completed").all()
    # --wandb-mode disabled: no W&B files, no run ids.
    assert not (tmp_path / "results" / "hb" / "wandb").exists()
    assert table.wandb_run_id.isna().all()
    continued = table[table.resumed_from.notna()]
    assert len(continued) >= 1 and (continued.epochs == 1).all()
    assert set(table.hyperband_epochs) == {1, 2}


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--budget", "soon"], "--budget 'soon' is not a duration"),
        (
            ["--data", "/nowhere/label.csv"],
            "--data /nowhere/label.csv does not exist: pass a split_label.csv",
        ),
        (["--set", "backbones=[B9]"], "unknown backbone 'B9'"),
        (["--set", "epochs=0"], "epochs must be a whole number >= 1"),
        (["--weights", "/nowhere"], "--weights /nowhere: not imagenet, none, or a folder"),
    ],
)
def test_bad_command_lines_are_one_line_exit_2(tmp_path, demo_dir, capsys, argv, expected):
    argv = ["--results", str(tmp_path / "results"), "--cache", str(demo_dir.parent), *argv]
    assert run_cli(search.main, argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_offline_imagenet_for_user_data_names_the_file(tmp_path, demo_dir, capsys, monkeypatch):
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(
        keras.utils, "get_file", lambda *a, **k: (_ for _ in ()).throw(Exception("offline"))
    )
    argv = [
        "--results",
        str(tmp_path / "results"),
        "--data",
        str(demo_dir / "label.csv"),
        "--set",
        "backbones=[B0]",
    ]
    assert run_cli(search.main, argv) == 2
    err = capsys.readouterr().err
    assert "put efficientnetb0_notop.h5 in" in err and "--weights none" in err
    assert not (tmp_path / "results").exists()


def test_resume_with_a_different_space_is_refused(tmp_path, demo_dir, capsys, pretrained_t0):
    # One frozen head (seconds): the folder holds the search's settings and one trial,
    # which is all a resume is checked against.
    common = [*frozen(pretrained_t0), *ONE_TRIAL]
    config = tmp_path / "results" / "d" / "config.yaml"
    assert run(tmp_path, demo_dir, "d", *common) == 0
    assert yaml.safe_load(config.read_text())["space"]["dropout"] != 0.3
    assert run(tmp_path, demo_dir, "d", *common, "--set", "dropout=0.3") == 2
    assert "holds a search with a different space" in capsys.readouterr().err
    assert run(tmp_path, demo_dir, "d", *common, "--set", "dropout=0.3", "--overwrite") == 0
    assert yaml.safe_load(config.read_text())["space"]["dropout"] == 0.3


def test_user_label_csv_is_split_and_saved_and_test_never_read(tmp_path, demo_dir, pretrained_t0):
    argv = [
        "--results",
        str(tmp_path / "results"),
        "--data",
        str(demo_dir / "label.csv"),
        "--name",
        "u",
        "--set",
        "backbones=[T0]",
        *frozen(pretrained_t0),
        *ONE_TRIAL,
    ]
    assert run_cli(search.main, argv) == 0
    out = tmp_path / "results" / "u"
    split = pd.read_csv(out / "split_label.csv", dtype=str)
    config = yaml.safe_load((out / "config.yaml").read_text())
    counts = split["type"].value_counts()
    assert config["split_counts"] == {
        "train": int(counts["train"]),
        "validation": int(counts["validation"]),
    }
    assert config["classes"] == [str(d) for d in range(10)]
    assert config["space"]["backbones"] == ["T0"]


def test_seed_0_gives_keras_tuner_the_same_seed_every_run(tmp_path) -> None:
    """Keras Tuner reads a falsy seed as none and draws a random one: the space's default
    ``seed: 0`` must still reach the oracle as a fixed seed."""
    import keras_tuner as kt

    from tuner.model import space as space_mod

    def seed_of(seed: int, folder: str) -> int:
        chosen = space_mod.load(None, {"seed": seed, "algorithm": "random"})
        tuner = session.make_tuner(kt.RandomSearch, lambda hp: None, chosen, tmp_path / folder)
        return tuner.oracle.seed

    assert seed_of(0, "a") == seed_of(0, "b")  # before: Keras Tuner's random 1..10000
    assert seed_of(0, "c") > 10_000  # outside that range: no run drew it by chance
    assert seed_of(5, "d") == 5
