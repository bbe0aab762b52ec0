"""Chaos: a search killed with SIGKILL at chosen and at seeded random moments, resumed
after each kill, then exported under a kill too.

    python -m tuner.bench_chaos [--kills 10] [--seed 0] [--trials 6]

The demo digits, the tiny test backbone T0 from random weights (the whole network trains, a
few seconds a trial), the random algorithm: a search short enough that the kills land in
every phase of it. Six kills are aimed, by ``$EFFNET_TUNER_KILL_AT`` (the process kills
itself there: :func:`data_tools.atomic.kill_point`): inside the decoded-pixel cache's write;
a checkpoint's write and trials.csv's update, each just before its rename and just after it
(the 1st or 2nd time, seeded); and inside the export's write. The others come a seeded
random number of seconds after their process started (start-up, the split, a trial's
epochs, the summary). The same command resumes after each; before the export's kill the
search runs to its end, and after it ``export_best`` runs again. Then:

* trials.csv parses after every kill, and no trial id appears twice (doubled);
* no completed trial seen before a kill is missing after it (lost);
* every completed trial whose checkpoint was kept rebuilds and scores the validation
  accuracy its row records, to 1e-6; the budget spent is within the budget plus 60 s (a
  trial stops at its next epoch's end); the export succeeds; no temporary file of a killed
  writer is left (corrupt counts what fails of these).

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

from data_tools import atomic, cli
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


# The moments a kill is aimed at, inside the writes that matter (data_tools.atomic names
# them): the decoded-pixel cache's rename (first, while no cache exists), a checkpoint's
# and trials.csv's, each just before the rename (the temporary file whole, the target not
# yet replaced) or just after it (the file in place, what follows it not yet done).
SEARCH_POINTS = ("checkpoint", "trials", "checkpoint.renamed", "trials.renamed")
FIRST_POINT = "cache"
EXPORT_POINT = "export"
POINT_TIMEOUT_S = 300.0  # a process that never reaches its point is killed here anyway


def schedule(kills: int, seed: int, window: tuple[float, float]) -> list[tuple[str, float]]:
    """The kills in order: ``(point, occurrence)`` for an aimed one, ``("", seconds)`` for
    one at a random moment; the cache first, the export last, the rest seeded-shuffled."""
    rng = random.Random(seed)
    aimed = [(point, float(rng.randint(1, 2))) for point in SEARCH_POINTS]
    middle = aimed + [("", rng.uniform(*window)) for _ in range(max(kills - 6, 0))]
    rng.shuffle(middle)
    plan = [(FIRST_POINT, 1.0), *middle, (EXPORT_POINT, 1.0)]
    return plan[: max(kills, 0)] if kills < len(plan) else plan


def run(root: Path, kills: int, seed: int, trials: int, window: tuple[float, float]) -> dict:
    """The kills, the resumes, the last run, the export and the checks; the counts."""
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
    export = [sys.executable, "-m", "tuner.export_best", "--results", str(out)]
    export += ["--wandb-mode", "disabled"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    counts = {"kills": 0, "lost": 0, "doubled": 0, "corrupt": 0}
    seen: set[str] = set()
    finished = False
    for number, (point, when) in enumerate(schedule(kills, seed, window), start=1):
        if point == EXPORT_POINT:  # the search to its end first
            seen, finished = _last_run(search, env, out, seen, counts), True
        aimed = {atomic.KILL_AT: f"{point}:{int(when)}"} if point else {}
        process = subprocess.Popen(
            export if point == EXPORT_POINT else search,
            env={**env, **aimed},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        where = f"at {point} #{int(when)}" if point else f"at {when:.1f} s"
        try:
            code = process.wait(POINT_TIMEOUT_S if point else when)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            code = process.wait()
            where = where if not point else f"at {POINT_TIMEOUT_S:.0f} s ({point} not reached)"
        if code == -signal.SIGKILL:
            counts["kills"] += 1
            print(f"kill {number}: SIGKILL {where}", flush=True)
        else:
            print(f"kill {number}: it ended first (exit {code}), {where} not reached", flush=True)
        seen = _check_rows(out, seen, counts)
    if not finished:
        _last_run(search, env, out, seen, counts)
    exported = subprocess.run(export, env=env, capture_output=True, text=True)
    if exported.returncode != 0:
        print(f"the export failed (exit {exported.returncode}): {exported.stderr[-500:]}")
        counts["corrupt"] += 1
    counts["corrupt"] += _check_models(out) + _leftovers(root)
    return counts


def _last_run(search: list[str], env: dict, out: Path, seen: set[str], counts: dict) -> set[str]:
    """The search resumed and run to its end; its rows checked."""
    done = subprocess.run(search, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"the last run failed (exit {done.returncode}): {done.stderr[-500:]}")
        counts["corrupt"] += 1
    return _check_rows(out, seen, counts)


def _leftovers(root: Path) -> int:
    """Temporary files of killed writers still on disk after the last run and export swept
    them (data_tools.atomic.sweep): half-written files left behind."""
    left = [
        Path(folder, name)
        for folder, dirs, files in os.walk(root)
        for name in [*files, *dirs]
        if atomic.is_stale(name)
    ]
    for path in left:
        print(f"left behind: {path}")
    return len(left)


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
