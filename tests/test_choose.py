"""The trade-off rules as pure functions on hand-made trial tables."""

from __future__ import annotations

import pandas as pd
import pytest

from data_tools.errors import InputError
from tuner.report.choose import choose


def table(*rows: tuple[str, float, float], status: str = "completed") -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "trial_id": t,
                "status": status,
                "backbone": f"B{i}",
                "val_accuracy": acc,
                "latency_ms": ms,
                "train_seconds": 100 * ms,
            }
            for i, (t, acc, ms) in enumerate(rows)
        ]
    )


# A typical front: accuracy climbs fast, then slowly, with latency. 03 is dominated by 02.
TRIALS = table(
    ("00", 0.80, 2.0), ("01", 0.90, 3.0), ("02", 0.92, 6.0), ("03", 0.91, 7.0), ("04", 0.93, 20.0)
)


def test_front_excludes_dominated_trials_and_marks_the_choice() -> None:
    choice = choose(TRIALS)
    assert choice.front["trial_id"].tolist() == ["00", "01", "02", "04"]
    assert choice.front["chosen"].sum() == 1
    assert choice.front.loc[choice.front.chosen, "trial_id"].item() == choice.trial_id


def test_knee_is_where_accuracy_starts_to_cost_the_most_time() -> None:
    choice = choose(TRIALS, "knee")
    assert choice.trial_id == "01"
    assert (
        "farthest above the line from the fastest front trial 00 to the most accurate 04"
        in choice.reason
    )


def test_max_accuracy_with_and_without_a_latency_cap() -> None:
    assert choose(TRIALS, "max-accuracy").trial_id == "04"
    capped = choose(TRIALS, "max-accuracy", max_latency_ms=10)
    assert capped.trial_id == "02" and "latency <= 10 ms" in capped.reason


def test_fastest_above_an_accuracy_floor() -> None:
    assert choose(TRIALS, "fastest").trial_id == "00"
    assert choose(TRIALS, "fastest", min_accuracy=0.915).trial_id == "02"


def test_weighted_mnasnet_score() -> None:
    # ACC * (LAT / 6) ** -0.07: 00 -> 0.8639, 01 -> 0.9447, 02 -> 0.92, 04 -> 0.8550
    choice = choose(TRIALS, "weighted", target=6.0)
    assert choice.trial_id == "01" and "= 0.9447" in choice.reason
    # A harsh latency penalty favours the fastest.
    assert choose(TRIALS, "weighted", target=6.0, weight=-1.0).trial_id == "00"


def test_training_time_instead_of_latency() -> None:
    trials = TRIALS.assign(train_seconds=[50, 400, 60, 70, 80])
    choice = choose(trials, "max-accuracy", time="training")
    assert choice.trial_id == "04"
    assert choice.front["trial_id"].tolist() == ["00", "02", "04"]  # 01 and 03 now dominated


def test_ties_go_to_the_faster_then_the_lower_id() -> None:
    tied = table(("05", 0.9, 3.0), ("02", 0.9, 3.0), ("07", 0.9, 5.0))
    choice = choose(tied, "max-accuracy")
    assert choice.front["trial_id"].tolist() == ["02", "05"]  # both undominated
    assert choice.trial_id == "02"


def test_one_trial() -> None:
    choice = choose(table(("00", 0.7, 4.0)))
    assert choice.trial_id == "00" and "no bend" in choice.reason


def test_all_failed_is_one_line() -> None:
    trials = table(("00", float("nan"), float("nan")), status="failed")
    with pytest.raises(InputError, match=r"no finished trial to choose from \(1 trial\(s\), 1 "):
        choose(trials)


def test_a_constraint_nobody_meets_names_the_nearest_trials() -> None:
    with pytest.raises(InputError) as info:
        choose(TRIALS, "max-accuracy", max_latency_ms=1.0)
    assert str(info.value) == (
        "no finished trial has a latency <= 1 ms; the fastest are 00 (B0, 2.00 ms, val acc "
        "0.800), 01 (B1, 3.00 ms, val acc 0.900), 02 (B2, 6.00 ms, val acc 0.920): raise "
        "--max-latency-ms"
    )
    with pytest.raises(
        InputError, match="no finished trial reaches val accuracy 0.99; the most accurate are 04 "
    ):
        choose(TRIALS, "fastest", min_accuracy=0.99)


def test_unknown_rule() -> None:
    with pytest.raises(InputError, match="valid rules are knee, max-accuracy, fastest, weighted"):
        choose(TRIALS, "best")


def test_latency_noise_is_a_tie_not_a_faster_trial() -> None:
    """Issue 14's measurement: three B0 224 px trials timed 32.1, 38.5 and 40.3 ms/image. Read
    as exact, the 32.1 ms one stays on the front as "faster" than the most accurate; with the
    spread the timings showed (IQR 9 ms), all three are one speed and the most accurate wins."""
    noisy = table(("00", 0.60, 32.1), ("01", 0.62, 38.5), ("02", 0.64, 40.3))
    assert choose(noisy).front["trial_id"].tolist() == ["00", "01", "02"]  # no spread known
    measured = noisy.assign(latency_spread_ms=9.0)
    choice = choose(measured, "fastest")
    assert choice.front["trial_id"].tolist() == ["02"] and choice.trial_id == "02"
    assert "latencies closer than their measured spread, up to 9.00 ms, count as ties" in (
        choice.reason
    )
    # A real difference, beyond the spread, still counts.
    apart = table(("00", 0.60, 10.0), ("01", 0.64, 40.3)).assign(latency_spread_ms=2.0)
    assert choose(apart).front["trial_id"].tolist() == ["00", "01"]
