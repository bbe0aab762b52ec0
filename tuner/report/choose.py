"""Which trial to ship: the Pareto front and a trade-off rule, as pure functions on trials.csv.

The front: finished trials that no other finished trial beats on both validation accuracy
(higher is better) and time (lower is better; inference latency by default, training time
on request). Latencies closer than their measured spread are ties: a trial is not on the
front for being faster by noise. Constraints (``max_latency_ms``, ``min_accuracy``) first
remove trials; a rule then picks one trial of the front:

* ``knee`` (default): with accuracy and log-time each scaled to 0..1 over the front, the
  trial farthest above the straight line from the fastest to the most accurate front trial,
  i.e. where more accuracy starts to cost the most time. With one or two front trials
  (no bend to find) it is the most accurate.
* ``max-accuracy``: the most accurate trial (under ``--max-latency-ms`` if given).
* ``fastest``: the fastest trial (above ``--min-accuracy`` if given).
* ``weighted``: the highest MnasNet score ACC * (TIME / T) ** W, with W = -0.07 by default
  and T the target time (default: the median time of the candidates).

Ties go to the more accurate trial, then the faster one, then the lower trial id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_tools.errors import InputError, preview
from tuner.report.results import FINISHED, pareto_front

RULES = ("knee", "max-accuracy", "fastest", "weighted")
TIME_COLUMNS = {"latency": "latency_ms", "training": "train_seconds"}
MNAS_WEIGHT = -0.07


@dataclass(frozen=True)
class Choice:
    """The chosen trial, why, and the front it was chosen from (``chosen`` column marks it)."""

    trial_id: str
    rule: str
    reason: str
    front: pd.DataFrame


def candidates(trials: pd.DataFrame, time: str = "latency") -> pd.DataFrame:
    """Finished trials with an accuracy and a time, sorted by time."""
    column = TIME_COLUMNS[time]
    done = trials[trials["status"].isin(FINISHED)].dropna(subset=["val_accuracy", column])
    if done.empty:
        failed = len(trials) - len(done)
        raise InputError(
            f"no finished trial to choose from ({len(trials)} trial(s), {failed} "
            f"failed or unfinished): run or resume the search first"
        )
    done = done.assign(trial_id=done["trial_id"].astype(str))
    return done.sort_values(
        [column, "val_accuracy", "trial_id"], ascending=[True, False, True]
    ).reset_index(drop=True)


def choose(
    trials: pd.DataFrame,
    rule: str = "knee",
    time: str = "latency",
    max_latency_ms: float | None = None,
    min_accuracy: float | None = None,
    weight: float = MNAS_WEIGHT,
    target: float | None = None,
) -> Choice:
    """Apply the constraints, build the front, pick a trial by ``rule``."""
    if rule not in RULES:
        raise InputError(f"unknown rule '{rule}': valid rules are {', '.join(RULES)}")
    column = TIME_COLUMNS[time]
    pool = _constrain(candidates(trials, time), max_latency_ms, min_accuracy)
    spread = (
        pool["latency_spread_ms"]
        if column == "latency_ms" and "latency_spread_ms" in pool
        else None
    )
    front = pool[pareto_front(pool["val_accuracy"], pool[column], spread)].reset_index(drop=True)
    picker = {
        "knee": _knee,
        "max-accuracy": _most_accurate,
        "fastest": _fastest,
        "weighted": _weighted,
    }[rule]
    index, reason = picker(front, pool, column, weight, target)
    limits = _limits_text(max_latency_ms, min_accuracy)
    if spread is not None and spread.notna().any():
        limits += (
            f" (latencies closer than their measured spread, up to {spread.max():.2f} ms, "
            f"count as ties)"
        )
    front = front.assign(chosen=[i == index for i in range(len(front))])
    return Choice(str(front["trial_id"][index]), rule, reason + limits + ".", front)


def _constrain(
    pool: pd.DataFrame, max_latency_ms: float | None, min_accuracy: float | None
) -> pd.DataFrame:
    if max_latency_ms is not None:
        kept = pool[pool["latency_ms"] <= max_latency_ms]
        if kept.empty:
            nearest = pool.nsmallest(3, "latency_ms")
            raise InputError(
                f"no finished trial has a latency <= {max_latency_ms:g} ms; the "
                f"fastest are {_describe(nearest)}: raise --max-latency-ms"
            )
        pool = kept
    if min_accuracy is not None:
        kept = pool[pool["val_accuracy"] >= min_accuracy]
        if kept.empty:
            nearest = pool.nlargest(3, "val_accuracy")
            raise InputError(
                f"no finished trial reaches val accuracy {min_accuracy:g}"
                f"{' within the latency cap' if max_latency_ms else ''}; the most "
                f"accurate are {_describe(nearest)}: lower --min-accuracy"
            )
        pool = kept
    return pool.reset_index(drop=True)


def _describe(rows: pd.DataFrame) -> str:
    return preview(
        [
            f"{r.trial_id} ({r.backbone}, {r.latency_ms:.2f} ms, val acc {r.val_accuracy:.3f})"
            for r in rows.itertuples()
        ],
        3,
    )


def _limits_text(max_latency_ms: float | None, min_accuracy: float | None) -> str:
    parts = []
    if max_latency_ms is not None:
        parts.append(f"latency <= {max_latency_ms:g} ms")
    if min_accuracy is not None:
        parts.append(f"val accuracy >= {min_accuracy:g}")
    return f" (among trials with {' and '.join(parts)})" if parts else ""


def _best(front: pd.DataFrame, score: np.ndarray, column: str) -> int:
    """Highest score; ties to higher accuracy, then lower time, then lower trial id."""
    order = np.lexsort(
        (
            front["trial_id"].to_numpy(),
            front[column].to_numpy(),
            -front["val_accuracy"].to_numpy(),
            -score,
        )
    )
    return int(order[0])


def _label(row: pd.Series, column: str) -> str:
    unit = "ms" if column == "latency_ms" else "s training"
    return (
        f"trial {row['trial_id']} ({row['backbone']}, val acc {row['val_accuracy']:.4f}, "
        f"{row[column]:.2f} {unit})"
    )


def _most_accurate(front, pool, column, weight, target) -> tuple[int, str]:
    index = _best(front, front["val_accuracy"].to_numpy(), column)
    return index, f"max-accuracy: {_label(front.iloc[index], column)} is the most accurate"


def _fastest(front, pool, column, weight, target) -> tuple[int, str]:
    index = _best(front, -front[column].to_numpy(), column)
    return index, f"fastest: {_label(front.iloc[index], column)} is the fastest"


def _weighted(front, pool, column, weight, target) -> tuple[int, str]:
    target = target or float(pool[column].median())
    score = front["val_accuracy"].to_numpy() * (front[column].to_numpy() / target) ** weight
    index = _best(front, score, column)
    return index, (
        f"weighted: {_label(front.iloc[index], column)} has the highest "
        f"ACC x (TIME / {target:.3g}) ^ {weight:g} = {score[index]:.4f}"
    )


def _knee(front, pool, column, weight, target) -> tuple[int, str]:
    accuracy = front["val_accuracy"].to_numpy(dtype=float)
    log_time = np.log(np.maximum(front[column].to_numpy(dtype=float), 1e-12))
    if len(front) <= 2:
        index = _best(front, accuracy, column)
        return index, (
            f"knee: with {len(front)} trial(s) on the front there is no bend, so "
            f"{_label(front.iloc[index], column)}, the most accurate"
        )
    a = _unit(accuracy)
    t = _unit(log_time)
    fast, accurate = int(np.argmin(log_time)), int(np.argmax(accuracy))
    # Distance above the chord from the fastest (t0, a0) to the most accurate (t1, a1).
    (t0, a0), (t1, a1) = (t[fast], a[fast]), (t[accurate], a[accurate])
    length = math.hypot(t1 - t0, a1 - a0) or 1.0
    distance = ((t1 - t0) * (a - a0) - (a1 - a0) * (t - t0)) / length
    index = _best(front, distance, column)
    return index, (
        f"knee: {_label(front.iloc[index], column)} lies farthest above the line "
        f"from the fastest front trial {front['trial_id'][fast]} to the most "
        f"accurate {front['trial_id'][accurate]}; past it, accuracy costs the most "
        f"time"
    )


def _unit(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)
