"""W&B in offline mode, read back from the run files: runs, configs, summaries, resume,
degraded logging, the dashboard specification."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from data_tools.errors import run_cli
from tests.conftest import frozen, run_search, search_argv
from tests.wandb_files import read_runs
from tuner.engine import session


@pytest.fixture(autouse=True)
def _no_login(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def run(tmp_path: Path, demo_dir: Path, weights: Path, name: str, *extra: str) -> int:
    """Random search over frozen heads on cached T0 features: what W&B logs is the same for
    any trial, and these take seconds."""
    return run_search(
        tmp_path,
        demo_dir,
        name,
        *frozen(weights),
        "--algorithm",
        "random",
        "--set",
        "epochs=2",
        *extra,
    )


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is None and (b is None or (isinstance(b, float) and math.isnan(b)))
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return str(a) == str(b)


def test_offline_runs_equal_trials_csv_and_resume_adds_no_duplicates(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    assert (
        run(tmp_path, demo_dir, pretrained_t0, "w", "--set", "max_trials=2", "--budget", "10m") == 0
    )
    output = capsys.readouterr().out
    out = tmp_path / "results" / "w"
    assert f"wandb sync {out / 'wandb'}/offline-run-*" in output  # offline by default
    trials = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    runs = read_runs(out / "wandb")
    trial_runs = {r.run_id: r for r in runs if r.job_type == "trial"}
    summary_runs = [r for r in runs if r.job_type == "search"]
    assert len(trial_runs) == len(trials) == 2 and len(summary_runs) == 1
    for row in trials.to_dict("records"):
        r = trial_runs[row["wandb_run_id"]]
        assert r.group == "w" and r.name == f"w-{row['trial_id']}"
        assert r.tags == ["T0", "frozen"] and r.exit_code == 0
        for key in (
            "backbone",
            "image_size",
            "batch_size",
            "head_width",
            "dropout",
            "learning_rate",
            "class_weight",
            "params",
        ):
            assert same(r.config[key], row[key]), key
        assert r.config["classes"] == [str(d) for d in range(10)]
        assert r.config["split_counts"] == {"train": 1547, "validation": 140}
        for key in (
            "val_accuracy",
            "val_loss",
            "train_seconds",
            "latency_ms",
            "images_per_s",
            "params",
            "model_bytes",
            "status",
            "epochs",
        ):
            assert same(r.summary[key], row[key]), key
        epochs = [h for h in r.history if "epoch/val_accuracy" in h]
        assert len(epochs) == row["epochs"]
        assert max(h["epoch/val_accuracy"] for h in epochs) == pytest.approx(row["val_accuracy"])
    search_run = summary_runs[0]
    assert search_run.summary["finished_trials"] == 2
    assert search_run.summary["best_val_accuracy"] == pytest.approx(trials.val_accuracy.max())
    assert search_run.summary["trial_count"] == 2
    for key, kind in (
        ("trials", "table-file"),
        ("leaderboard", "html-file"),
        ("pareto", "image-file"),
        ("val_accuracy_vs_latency_table", "table-file"),
    ):
        assert search_run.summary[f"{key}/_type"] == kind
    (table_file,) = (out / "wandb").glob(
        "offline-run-*-search/files/" + search_run.summary["trials/path"]
    )
    table = json.loads(table_file.read_text())
    assert len(table["data"]) == 2 and "pareto" in table["columns"]
    column = table["columns"].index("val_accuracy")
    assert sorted(row[column] for row in table["data"]) == pytest.approx(
        sorted(trials.val_accuracy)
    )
    pareto = table["columns"].index("pareto")  # the flags themselves, not empty cells
    assert {row[pareto] for row in table["data"]} <= {True, False}
    assert any(row[pareto] for row in table["data"])

    # Resume with one more trial allowed is refused (different space); resume as is adds
    # no trial run, and brings the search run up to date under the same id.
    assert (
        run(tmp_path, demo_dir, pretrained_t0, "w", "--set", "max_trials=2", "--budget", "10m") == 0
    )
    runs = read_runs(out / "wandb")
    assert {r.run_id for r in runs if r.job_type == "trial"} == set(trial_runs)
    assert len({r.run_id for r in runs if r.job_type == "search"}) == 1


def test_interrupted_trial_reuses_its_run_id(tmp_path, demo_dir, pretrained_t0, monkeypatch):
    from tuner.engine import trial
    from tuner.model import hypermodel

    real_fit = hypermodel.EffNetHyperModel.fit
    calls = []

    def interrupt_second(self, hp, model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise trial.Interrupted("interrupted")
        return real_fit(self, hp, model, *args, **kwargs)

    monkeypatch.setattr(hypermodel.EffNetHyperModel, "fit", interrupt_second)
    common = ["--set", "max_trials=2", "--budget", "10m"]
    assert run(tmp_path, demo_dir, pretrained_t0, "i", *common) == session.EXIT_INTERRUPTED
    assert run(tmp_path, demo_dir, pretrained_t0, "i", *common) == 0
    runs = read_runs(tmp_path / "results" / "i" / "wandb")
    trial_ids = [r.run_id for r in runs if r.job_type == "trial"]
    assert len(set(trial_ids)) == 2 and len(trial_ids) == 3  # trial 1's run opened twice
    rerun = [r for r in runs if r.job_type == "trial" and r.run_id.endswith("-1")]
    assert [r.exit_code for r in rerun] == [1, 0]


@pytest.mark.slow  # 34 s of the fast tier (a fresh process waits out W&B's timeout); the
# in-process degradation (a full disk under W&B) stays fast
def test_wandb_unreachable_degrades_once_and_the_search_goes_on(tmp_path, demo_dir, pretrained_t0):
    # A fresh process, as a user runs it: wandb's service starts with these settings.
    # A user's shell: none of the WANDB_* variables that earlier in-process runs left behind
    # (wandb's service address among them), then an unreachable server with a key.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env = {
        **clean,
        "WANDB_API_KEY": "x" * 40,
        "WANDB_INIT_TIMEOUT": "5",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "NETRC": os.environ["NETRC"],
        "WANDB_CONFIG_DIR": os.environ["WANDB_CONFIG_DIR"],
    }  # nothing listens there
    argv = search_argv(
        tmp_path,
        demo_dir,
        "u",
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
    result = subprocess.run(
        [sys.executable, "-m", "tuner.search", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout
    assert output.count("W&B logging degraded") == 1, output
    assert "logging offline under" in output
    assert "Traceback" not in output + result.stderr
    trials = pd.read_csv(tmp_path / "results" / "u" / "trials.csv")
    assert (trials.status == "completed").all() and len(trials) == 2
    runs = read_runs(tmp_path / "results" / "u" / "wandb")
    assert len({r.run_id for r in runs}) == 3  # fell back to offline: nothing lost


def test_full_disk_under_wandb_turns_logging_off_and_the_search_goes_on(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    out = tmp_path / "results" / "d"
    out.mkdir(parents=True)
    (out / "wandb").write_text("a file where the wandb folder should be")  # writes fail
    assert (
        run(
            tmp_path,
            demo_dir,
            pretrained_t0,
            "d",
            "--set",
            "max_trials=1",
            "--budget",
            "10m",
            "--wandb-mode",
            "offline",
        )
        == 0
    )
    output = capsys.readouterr().out
    assert output.count("W&B logging degraded") == 1, output
    assert "W&B logging is off for the rest of this search" in output
    assert pd.read_csv(out / "trials.csv").status.tolist() == ["completed"]


def test_model_artifact_hook_logs_to_the_search_run(tmp_path):
    from rich.console import Console

    from tuner.report.wandb_log import WandbLogger

    exported = tmp_path / "best"
    exported.mkdir()
    (exported / "labels.txt").write_text("0\n1\n")
    logger = WandbLogger("offline", None, None, "a", tmp_path, Console())
    logger.log_model(exported, ["best", "knee"], {"rule": "knee", "val_accuracy": 0.9})
    (search_run,) = read_runs(tmp_path / "wandb")
    # (Failed once in a full parallel run, with a job type other than "search"; never alone.)
    seen = f"{search_run}, files: {sorted(p.name for p in (tmp_path / 'wandb').rglob('*'))}"
    assert search_run.job_type == "search", seen
    assert search_run.run_id == logger.run_id("search"), seen
    (artifact,) = search_run.artifacts
    assert artifact.type == "model" and artifact.name == "a-model"
    assert set(artifact.aliases) >= {"best", "knee"}
    assert json.loads(artifact.metadata)["rule"] == "knee"


def test_dashboard_offline_writes_the_report_specification(tmp_path, capsys):
    from tuner import dashboard

    (tmp_path / "s").mkdir()
    assert run_cli(dashboard.main, ["--search", "s", "--results", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "to publish it: wandb login" in printed and "--search s" in printed
    spec = json.loads((tmp_path / "s" / "dashboard.json").read_text())
    assert spec["type"] == "Report" and spec["project"] == "effnet-tuner"
    (grid,) = [block for block in spec["blocks"] if block["type"] == "PanelGrid"]
    (runset,) = grid["runsets"]
    assert runset["filters"] == "Metric(\"Group\") == 's' and Metric(\"JobType\") == 'trial'"
    panels = {panel["type"]: panel for panel in grid["panels"]}
    assert set(panels) == {
        "ParallelCoordinatesPlot",
        "ScatterPlot",
        "BarPlot",
        "RunComparer",
        "LinePlot",
    }
    axes = [column["metric"]["name"] for column in panels["ParallelCoordinatesPlot"]["columns"]]
    assert axes[:2] == ["backbone", "image_size"] and axes[-1] == "val_accuracy"
    assert "learning_rate" in axes and "finetune_fraction" in axes
    scatter = panels["ScatterPlot"]
    assert (scatter["x"]["name"], scatter["y"]["name"]) == ("latency_ms", "val_accuracy")
    assert panels["BarPlot"]["groupby"]["name"] == "backbone"
    curves = [p["y"][0] for p in grid["panels"] if p["type"] == "LinePlot"]
    assert "epoch/val_accuracy" in curves


def test_dashboard_for_an_unknown_search_is_one_line(tmp_path, capsys):
    from tuner import dashboard

    assert run_cli(dashboard.main, ["--search", "nope", "--results", str(tmp_path)]) == 2
    assert "no search named 'nope'" in capsys.readouterr().err
