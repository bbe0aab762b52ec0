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

Then the one-standard-error rule (Breiman et al.'s, for model selection on a noisy estimate):
a validation accuracy is measured on a few hundred images, and the best of many trials is
the best partly by luck (a head trained for up to hundreds of epochs reports its best
epoch's accuracy, one more draw). Given the validation set's size, the trial shipped is the
simplest one that is no slower than the rule's pick (latency ties as on the front; on the
pick's backbone at its size, a simpler head is no slower, whatever two timings said) and
whose validation accuracy is within ``within_se`` binomial standard errors of the pick's,
``sqrt(p (1 - p) / n)``: fewest backbone units trained first, then the narrowest head (0:
linear), then the most accurate. The pick itself ships when nothing is simpler.
``within_se=0`` ships the pick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_tools.errors import InputError, preview
from tuner.report.results import (
    FINISHED,
    NETWORK,
    exact_accuracy,
    no_costlier,
    pareto_front,
    same_network,
)

RULES = ("knee", "max-accuracy", "fastest", "weighted")
TIME_COLUMNS = {"latency": "latency_ms", "training": "train_seconds"}
MNAS_WEIGHT = -0.07
WITHIN_SE = 1.0


@dataclass(frozen=True)
class Choice:
    """The chosen trial, why, and the front it was chosen from (``chosen`` column marks it;
    a simpler trial that ships instead of the rule's pick is shown with it)."""

    trial_id: str
    rule: str
    reason: str
    front: pd.DataFrame
    picked: str  # the rule's own pick: ``trial_id`` unless a simpler trial ships instead
    within_se: float

    @property
    def heading(self) -> str:
        """What ``front`` holds, for a table's title."""
        simpler = "" if self.picked == self.trial_id else f", and trial {self.trial_id} shipped"
        return f"Pareto front{simpler}"


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
    validation_count: int | None = None,
    within_se: float = WITHIN_SE,
) -> Choice:
    """Apply the constraints, build the front, pick a trial by ``rule``, then ship the
    simplest trial within ``within_se`` standard errors of it that is no slower (needs
    ``validation_count``, the validation images the accuracies were measured on)."""
    if rule not in RULES:
        raise InputError(f"unknown rule '{rule}': valid rules are {', '.join(RULES)}")
    if not within_se >= 0:
        raise InputError(
            f"--within-se {within_se:g}: give a number of standard errors >= 0 (0 ships the "
            f"rule's pick)"
        )
    column = TIME_COLUMNS[time]
    pool = _constrain(_exact_pool(trials, time, validation_count), max_latency_ms, min_accuracy)
    spread = _spread(pool, column)
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
    reason += limits
    picked = str(front["trial_id"][index])
    simpler = _simpler(pool, picked, column, spread, validation_count, within_se)
    if simpler is not None:
        position, why = simpler
        reason += why
        shipped = pool["trial_id"][position]
        if shipped not in set(front["trial_id"]):  # shown with the front it was weighed against
            front = pd.concat([front, pool.iloc[[position]]]).sort_values(column, kind="stable")
            front = front.reset_index(drop=True)
        index = int(np.flatnonzero(front["trial_id"] == shipped)[0])
    front = front.assign(chosen=[i == index for i in range(len(front))])
    return Choice(str(front["trial_id"][index]), rule, reason + ".", front, picked, within_se)


def _complexity(table: pd.DataFrame) -> pd.DataFrame:
    """Per trial, what it trained: backbone units (``unfrozen_blocks``, a fine-tune's blocks
    and top) and head width (0: linear). Missing columns count as nothing trained."""
    units = table.get("unfrozen_blocks", pd.Series("", index=table.index))
    width = table.get("head_width", pd.Series(0, index=table.index))
    return pd.DataFrame(
        {
            "units": [len(str(u).split()) if isinstance(u, str) else 0 for u in units],
            "width": pd.to_numeric(width, errors="coerce").fillna(0).astype(int),
        },
        index=table.index,
    )


def _trained(units: int, width: int) -> str:
    head = "a linear head" if width == 0 else f"a {width}-wide head"
    return f"{head} on a frozen backbone" if units == 0 else f"{head}, {units} units fine-tuned"


# A search keeps the checkpoints of what the export could ship with --within-se up to this.
KEEP_WITHIN_SE = 2.0


def shippable(
    trials: pd.DataFrame, validation_count: int | None, within_se: float = KEEP_WITHIN_SE
) -> set[str]:
    """Every finished trial an export could ship now, by any rule on either time, with
    ``--within-se`` up to ``within_se``: the fronts, and for each front trial as the pick,
    the trial the one-standard-error rule ships at each width of its band (the simplest
    within it: as the band widens, only a simpler trial takes over). What a search keeps
    checkpoints of; later trials can change it (a pruned trial is retrained by export)."""
    kept: set[str] = set()
    for time, column in TIME_COLUMNS.items():
        try:
            pool = _exact_pool(trials, time, validation_count)
        except InputError:
            return kept  # nothing finished
        spread = _spread(pool, column)
        front = pareto_front(pool["val_accuracy"], pool[column], spread)
        kept |= set(pool["trial_id"][front])
        if validation_count and within_se > 0:
            for at in np.flatnonzero(front):
                band, _, trained = _band(pool, int(at), column, spread, validation_count, within_se)
                kept |= _takers(pool, band, trained, column)
    return kept


def _takers(pool: pd.DataFrame, band: np.ndarray, trained: pd.DataFrame, column: str) -> set[str]:
    """The trials of ``band`` (positions in ``pool``) that ship at some width of the band:
    walking down in accuracy, each that comes before every more accurate one in the order
    the rule ships by (fewest units, narrowest head, most accurate, fastest, lowest id)."""
    rows = [_ship_key(pool, trained, column, i) for i in band]
    takers, best = set(), None
    for accuracy in sorted({-row[2] for row in rows}, reverse=True):
        entering = min(row for row in rows if -row[2] == accuracy)
        if best is None or entering < best:
            best = entering
            takers.add(entering[4])
    return takers


def _ship_key(pool: pd.DataFrame, trained: pd.DataFrame, column: str, at: int) -> tuple:
    """The order the one-standard-error rule ships by, smallest first: fewest units
    fine-tuned, narrowest head, most accurate, fastest, lowest id."""
    return (
        int(trained["units"].iloc[at]),
        int(trained["width"].iloc[at]),
        -float(pool["val_accuracy"].iloc[at]),
        float(pool[column].iloc[at]),
        str(pool["trial_id"].iloc[at]),
    )


def _exact_pool(trials: pd.DataFrame, time: str, validation_count: int | None) -> pd.DataFrame:
    """:func:`candidates` with their accuracies as counts (:func:`exact_accuracy`)."""
    pool = candidates(trials, time)
    pool["val_accuracy"] = exact_accuracy(pool["val_accuracy"], validation_count)
    return pool


def _spread(pool: pd.DataFrame, column: str) -> pd.Series | None:
    """The measured spread of ``column`` (latency's) where there is one."""
    if column == "latency_ms" and "latency_spread_ms" in pool:
        return pool["latency_spread_ms"]
    return None


def standard_error(accuracy: float, count: int) -> float:
    """The binomial standard error of an accuracy measured on ``count`` images,
    ``sqrt(p (1 - p) / n)``: the noise model of the one-standard-error rule, and of the
    search's decisions (:mod:`tuner.engine.strategy`, :mod:`tuner.engine.widening`)."""
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / max(count, 1))


def _band(
    pool: pd.DataFrame,
    at: int,
    column: str,
    spread: pd.Series | None,
    validation_count: int,
    within_se: float,
) -> tuple[np.ndarray, float, pd.DataFrame]:
    """(positions of the trials of ``pool`` within ``within_se`` standard errors of the
    accuracy of the trial at ``at``, no slower and simpler; the standard error; what each
    trial trained)."""
    pick = pool.iloc[at]
    accuracy = float(pick["val_accuracy"])
    se = standard_error(accuracy, validation_count)
    noise = np.zeros(len(pool)) if spread is None else np.nan_to_num(spread.to_numpy(float))
    close = pool["val_accuracy"] >= accuracy - within_se * se - 1e-12
    no_slower = no_costlier(pool[column].to_numpy(float), noise, at)
    if column == "latency_ms":  # the same network under a simpler head: measured apart, noise
        no_slower |= _same_network(pool, pick)
    trained = _complexity(pool)
    mine = trained.iloc[at]
    simpler = (trained["units"] < mine["units"]) | (
        (trained["units"] == mine["units"]) & (trained["width"] < mine["width"])
    )
    return np.flatnonzero(close & no_slower & simpler), se, trained


def _simpler(
    pool: pd.DataFrame,
    picked: str,
    column: str,
    spread: pd.Series | None,
    validation_count: int | None,
    within_se: float,
) -> tuple[int, str] | None:
    """The simplest trial of ``pool`` within ``within_se`` standard errors of trial
    ``picked``'s accuracy and no slower (its position and why), or None when ``picked`` is
    the simplest. ``spread``: the latencies' measured spread, as for the front."""
    if not validation_count or within_se <= 0:
        return None
    at = int(np.flatnonzero(pool["trial_id"] == picked)[0])
    band, se, trained = _band(pool, at, column, spread, validation_count, within_se)
    mine = trained.iloc[at]
    if band.size == 0:
        return None
    position = int(min(band, key=lambda i: _ship_key(pool, trained, column, i)))
    row, theirs = pool.iloc[position], trained.iloc[position]
    return position, (
        f"; {_label(row, column)}, {_trained(theirs['units'], theirs['width'])}, is within "
        f"{within_se:g} standard error ({se:.4f} on {validation_count} validation images) of "
        f"it, no slower, and simpler (the pick trains {_trained(mine['units'], mine['width'])}"
        f"): it ships instead"
    )


def _same_network(pool: pd.DataFrame, pick: pd.Series) -> pd.Series:
    """Trials on the pick's network (:data:`~tuner.report.results.NETWORK`: backbone, size,
    what the head reads; and variant, for deployables): a simpler head on it costs no more
    time, whatever two latency measurements said."""
    if not {"backbone", "image_size"} <= set(pool.columns) & set(pick.index):
        return pd.Series(False, index=pool.index)
    columns = [*NETWORK, *(["variant"] if "variant" in pool and "variant" in pick else [])]
    return same_network(pool, pick, columns)


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
