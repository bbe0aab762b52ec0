"""Chaos: a search killed with SIGKILL at seeded random moments, resumed after each kill.

    python -m tuner.bench_chaos [--kills 10] [--seed 0] [--trials 6]

The demo digits, the tiny test backbone T0 from random weights (the whole network trains, a
few seconds a trial), the random algorithm: a search short enough that the kills land in
every phase of it (start-up, the split, the decoded-pixel cache, a trial's epochs, its
checkpoint write, trials.csv's update, the summary). Each kill comes a seeded random number
of seconds after its process started; the same command then resumes. After the last kill the
search runs to its end, and ``export_best`` exports from it. Then:

* trials.csv parses after every kill, and no trial id appears twice (doubled);
* no completed trial seen before a kill is missing after it (lost);
* every completed trial whose checkpoint was kept rebuilds and scores the validation
  accuracy its row records, to 1e-6; the budget spent is within the budget; the export
  succeeds (corrupt counts what fails of these).

It ends with one line: ``chaos: K kills, L lost trials, D doubled, C corrupt files``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_tools import cli
from data_tools.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("tuner.bench_chaos", __doc__)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs, each then resumed")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--trials", type=int, default=6, help="the search's max_trials")
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(4.0, 30.0),
        metavar=("LOW", "HIGH"),
        help="seconds after a process starts within which its kill falls",
    )
    parser.add_argument("--results", help="keep the results here (default: a temporary folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.results or tmp)
        counts = run(root, args.kills, args.seed, args.trials, tuple(args.window))
    print(
        f"chaos: {counts['kills']} kills, {counts['lost']} lost trials, "
        f"{counts['doubled']} doubled, {counts['corrupt']} corrupt files"
    )
    return 0 if counts["lost"] == counts["doubled"] == counts["corrupt"] == 0 else 1


def run(root: Path, kills: int, seed: int, trials: int, window: tuple[float, float]) -> dict:
    """The kills, the resumes, the last run, the export and the checks; the counts."""
    rng = random.Random(seed)
    out = root / "results" / "chaos"
    search = [
        sys.executable,
        "-m",
        "tuner.search",
        *("--results", str(root / "results"), "--cache", str(root / "cache"), "--name", "chaos"),
        *("--weights", "none", "--algorithm", "random", "--budget", "20m"),
        *("--set", "backbones=[T0]", "--set", "epochs=3", "--set", f"max_trials={trials}"),
        *("--wandb-mode", "disabled", "--tensorboard", "on"),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    counts = {"kills": 0, "lost": 0, "doubled": 0, "corrupt": 0}
    seen: set[str] = set()
    for number in range(kills):
        after = rng.uniform(*window)
        process = subprocess.Popen(
            search, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            process.wait(after)
            print(f"kill {number + 1}: the search ended before {after:.1f} s", flush=True)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            counts["kills"] += 1
            print(f"kill {number + 1}: SIGKILL at {after:.1f} s", flush=True)
        seen = _check_rows(out, seen, counts)
    done = subprocess.run(search, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"the last run failed (exit {done.returncode}): {done.stderr[-500:]}")
        counts["corrupt"] += 1
    _check_rows(out, seen, counts)
    counts["corrupt"] += _check_models(out)
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuner.export_best",
            "--results",
            str(out),
            "--wandb-mode",
            "disabled",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if exported.returncode != 0:
        print(f"the export failed (exit {exported.returncode}): {exported.stderr[-500:]}")
        counts["corrupt"] += 1
    return counts


def _check_rows(out: Path, seen: set[str], counts: dict) -> set[str]:
    """trials.csv parses, no id twice, no completed trial lost; the completed ids now."""
    path = out / "trials.csv"
    if not path.is_file():
        return seen
    try:
        table = pd.read_csv(path, dtype={"trial_id": str})
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        print(f"trials.csv does not parse: {exc}")
        counts["corrupt"] += 1
        return seen
    counts["doubled"] += int(table["trial_id"].duplicated().sum())
    completed = set(table.loc[table["status"] == "completed", "trial_id"])
    counts["lost"] += len(seen - completed)
    return seen | completed


def _check_models(out: Path) -> int:
    """Completed trials with a kept checkpoint that do not rebuild to their recorded
    validation accuracy (to 1e-6), plus a budget overspent: the corrupt ones."""
    from tuner.report import rebuild

    config, table = rebuild.load_search(out)
    bad = 0
    for _, row in table[table["status"] == "completed"].iterrows():
        try:
            model, source = rebuild.trial_model(out, row, config)
            if not source.startswith("rebuilt it with its best-epoch weights"):
                continue  # pruned: export would retrain it, so nothing to compare
            maker, _ = rebuild.trial_hypermodel(out, row, config)
            pixels, _ = maker.data.pixels("validation", int(row["image_size"]))
            probs = model.predict(np.asarray(pixels, dtype="float32"), verbose=0)
            accuracy = float((probs.argmax(axis=1) == maker.data.labels("validation")).mean())
        except Exception as exc:  # noqa: BLE001 - a checkpoint that cannot load is corrupt
            print(f"trial {row['trial_id']}: {type(exc).__name__}: {exc}")
            bad += 1
            continue
        if abs(accuracy - float(row["val_accuracy"])) > 1e-6:
            print(
                f"trial {row['trial_id']}: rebuilt {accuracy:.6f}, recorded {row['val_accuracy']}"
            )
            bad += 1
    spent = float(pd.read_json(out / "budget.json", typ="series")["spent_s"])
    if spent > float(config["budget_s"]) + 60:  # a trial stops at the next epoch's end
        print(f"budget overspent: {spent:.0f} s of {config['budget_s']:.0f} s")
        bad += 1
    return bad


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
