"""Several processes on one search: Keras Tuner's chief and workers on loopback, the budget
gate, roles from flags and variables, and trials.csv under concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import keras_tuner as kt
import numpy as np
import pandas as pd
import pytest

from data_tools.errors import InputError
from tests.conftest import frozen, search_argv
from tuner.engine import budget, distribute
from tuner.report.results import Results

ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """This environment without W&B's and Keras Tuner's variables (a parent's W&B service
    must not leak into the children)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "KERASTUNER_"))}
    return {**env, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def test_chief_and_two_workers_share_one_search(tmp_path, demo_dir, pretrained_t0):
    argv = search_argv(tmp_path, demo_dir, "dist", "--algorithm", "random", "--budget", "10m")
    argv += [*frozen(pretrained_t0), "--set", "epochs=1", "--set", "max_trials=4"]
    argv += ["--gpus", "0,1"]
    done = subprocess.run(
        [sys.executable, "-m", "tuner.search", *argv],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "results" / "dist"
    table = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    # Every trial the oracle handed out has exactly one row; both workers ran some.
    oracle_trials = sorted(
        p.name.removeprefix("trial_") for p in (out / "keras_tuner").glob("trial_*")
    )
    assert sorted(table.trial_id) == oracle_trials and len(oracle_trials) == 4
    assert table.trial_id.is_unique and (table.status == "completed").all()
    assert set(table.worker) == {"gpu0", "gpu1"}, done.stdout[-3000:]
    # The features were built once per split and kind (the draws read the pooled top or
    # stage features: one sweep writes both), from the files: a frozen pass caches no
    # pixels. No temporary file or reservation is left.
    cached = sorted(
        (p.name.split("-")[0], np.load(p, mmap_mode="r").shape[1])
        for p in (out / "cache" / "features").glob("*.npy")
    )
    assert cached == [("train", 320), ("train", 504), ("validation", 320), ("validation", 504)]
    assert not list(out.rglob("*.reserved"))
    assert not list(out.glob("cache/decoded/*.npy"))
    assert not list(out.rglob("*.tmp"))
    # Output is prefixed by process; the chief wrote the summary after both workers ended.
    assert "[chief] chief: serving trials on 127.0.0.1:" in done.stdout
    assert "[gpu0] worker gpu0:" in done.stdout and "[gpu1] worker gpu1:" in done.stdout
    assert "4 finished trial(s)" in done.stdout
    assert (out / "leaderboard.md").read_text().count("| T0 |") == 4


def _upsert_many(folder: str, worker: int, count: int) -> None:
    results = Results(folder)
    for i in range(count):
        results.upsert({"trial_id": f"{worker}-{i}", "status": "completed", "worker": worker})


def test_concurrent_writers_lose_and_double_no_row(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_upsert_many, args=(str(tmp_path), w, 15)) for w in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(120)
        assert process.exitcode == 0
    table = Results(tmp_path).rows()
    assert len(table) == 60 and table.trial_id.is_unique
    assert sorted(table.worker.astype(int).value_counts().tolist()) == [15, 15, 15, 15]


def _oracle() -> kt.oracles.RandomSearchOracle:
    hp = kt.HyperParameters()
    hp.Choice("width", [8, 16, 32])
    oracle = kt.oracles.RandomSearchOracle(
        objective=kt.Objective("val_accuracy", "max"), max_trials=10, hyperparameters=hp, seed=1
    )
    return oracle


def test_budget_gate_stops_workers_and_keeps_the_refused_trial_for_resume(tmp_path):
    oracle = _oracle()
    oracle._set_project_dir(str(tmp_path), "p")
    lines: list[str] = []
    refuse_from = 2
    closed = distribute.budget_gate(
        oracle,
        lambda trial: "budget left 0s" if int(trial.trial_id) >= refuse_from else None,
        lines.append,
    )
    first = oracle.create_trial("gpu0")
    second = oracle.create_trial("gpu1")
    assert first.status == second.status == "RUNNING"
    refused = oracle.create_trial("gpu2")
    assert refused.status == "STOPPED" and closed == ["budget left 0s"]
    # The refused trial waits in the retry queue; the worker that asked is let go.
    assert oracle._retry_queue == ["02"] and "gpu2" not in oracle.tuner_ids
    assert "gpu2" not in oracle.ongoing_trials
    # Every later request is refused too, whatever the trial would be.
    assert oracle.create_trial("gpu0").status == "STOPPED"
    assert lines == [
        "trial 00 -> gpu0",
        "trial 01 -> gpu1",
        "budget reached: budget left 0s; no more trials",
    ]


def test_roles_from_flags_and_from_keras_tuner_variables():
    env: dict[str, str] = {}
    chief = distribute.resolve_role("10.0.0.5:8000", None, None, env)
    assert chief == distribute.Role("chief", "chief", "10.0.0.5", 8000)
    assert env == {
        "KERASTUNER_TUNER_ID": "chief",
        "KERASTUNER_ORACLE_IP": "10.0.0.5",
        "KERASTUNER_ORACLE_PORT": "8000",
    }
    env = {}
    worker = distribute.resolve_role(None, "localhost:9", "w7", env)
    assert (
        worker.kind == "worker" and worker.tuner_id == "w7" and env["KERASTUNER_TUNER_ID"] == "w7"
    )
    env = {
        "KERASTUNER_TUNER_ID": "tuner3",
        "KERASTUNER_ORACLE_IP": "h",
        "KERASTUNER_ORACLE_PORT": "1",
    }
    assert distribute.resolve_role(None, None, None, env) == distribute.Role(
        "worker", "tuner3", "h", 1
    )
    env = {"CUDA_VISIBLE_DEVICES": "2"}
    assert distribute.resolve_role(None, "h:1", None, env).tuner_id.endswith("-gpu2")
    assert distribute.resolve_role(None, None, None, {}) == distribute.Role("single")


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("h:1", "h:2", None), {}, "--chief and --worker were both given"),
        (("nohost", None, None), {}, "--chief 'nohost' is not HOST:PORT"),
        ((None, "h:99999", None), {}, "--worker 'h:99999' is not HOST:PORT"),
        ((None, "h:1", "my-chief"), {}, "must not contain 'chief'"),
        (
            (None, None, None),
            {"KERASTUNER_ORACLE_IP": "h"},
            "KERASTUNER_TUNER_ID and KERASTUNER_ORACLE_PORT is not",
        ),
    ],
)
def test_bad_roles_are_one_line(args, env, expected):
    with pytest.raises(InputError, match=expected.replace("(", r"\(")):
        distribute.resolve_role(*args, env)


def test_launcher_strips_its_own_flags():
    argv = ["--budget", "1h", "--gpus", "0,1", "--overwrite", "--name", "x", "--gpus=2"]
    assert distribute.launcher_argv(argv) == ["--budget", "1h", "--name", "x"]


def test_workers_follow_the_deadline_the_chief_writes(tmp_path):
    path = tmp_path / "budget.json"
    worker = budget.Ledger.follow(path, 100)
    assert worker.remaining() == 100  # no chief yet: it decides when trials start
    chief = budget.Ledger.open(path, 100)
    chief.save()
    assert 98 < worker.remaining() <= 100.001
    worker.save()  # a worker writes nothing
    chief.spent_before_s = 90
    chief.save()
    assert 8 < worker.remaining() <= 10.001
    time.sleep(0.2)
    assert worker.remaining() < 10


@pytest.mark.slow  # 37 s of the fast tier for a multi-GPU path that a CPU runs on one device
def test_mirrored_strategy_runs_frozen_and_fine_tuned_trials(tmp_path, demo_dir, pretrained_t0):
    from tests.conftest import run_search

    code = run_search(
        tmp_path,
        demo_dir,
        "mirrored",
        "--strategy",
        "mirrored",
        "--weights",
        str(pretrained_t0),
        "--algorithm",
        "random",
        "--set",
        "epochs=2",
        "--set",
        "max_trials=2",
        "--set",
        "finetune_fraction=0.25",
        "--set",
        "finetune_epochs=1",
        "--budget",
        "10m",
    )
    assert code == 0
    out = tmp_path / "results" / "mirrored"
    table = pd.read_csv(out / "trials.csv")
    assert (table.status == "completed").all() and len(table) == 2
    assert (table.unfrozen_blocks == "7a top").all() and (table.val_accuracy > 0.3).all()
    assert "strategy: mirrored" in (out / "config.yaml").read_text()


def test_a_chief_bound_beyond_loopback_warns_that_its_port_is_unauthenticated():
    from tuner.engine import distribute

    for private in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert distribute.exposure_warning(private) is None
    for exposed in ("0.0.0.0", "10.0.0.5", "chief-host", "::"):
        line = distribute.exposure_warning(exposed)
        assert "no authentication and no encryption" in line and "SSH tunnel" in line


def test_a_worker_sweeps_ahead_as_its_chief_plans(tmp_path, demo_dir, pretrained_t0, monkeypatch):
    # Workers once planned nothing ahead: every size decoded again, no stage features or
    # activations computed in the first sweep. Now they plan as the chief does.
    import io

    import keras_tuner as kt
    from rich.console import Console

    from tests.test_hypermodel import demo_data
    from tuner.engine import oracle, plan, session
    from tuner.model import disk, hypermodel, space

    # Both plan from a timed batch of the cheapest backbone: one speed here, for one plan.
    monkeypatch.setattr(oracle, "calibrate", lambda fs: 0.5)
    values = {"backbones": ["T0"], "image_size": [32, 48], "finetune_fraction": [0.0, 0.5]}
    searched = space.load(None, {**values, "algorithm": "transfer"})
    data = demo_data(demo_dir, tmp_path)
    ledger = budget.Ledger.open(tmp_path / "budget.json", 3600)
    console = Console(file=io.StringIO())
    chief_oracle = oracle.TransferOracle(kt.Objective("val_accuracy", "max"), searched)
    chief = session.sweep_sets("chief", chief_oracle, searched, data, ledger, 3600, console)
    worker = session.sweep_sets("worker", None, searched, data, ledger, 3600, console)
    assert worker == chief
    assert set(chief) == {(b, s, k) for b in ["T0"] for s in (32, 48) for k in ("top", "stages")}
    model = hypermodel.EffNetHyperModel(searched, data, str(pretrained_t0))
    plan.plan_cache(model, disk.Budget(tmp_path / "cache", 10**9), worker, searched, data)
    assert model.store.planned == worker and model.store.cut_fractions == (0.5,)
