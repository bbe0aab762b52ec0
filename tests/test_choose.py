"""The trade-off rules as pure functions on hand-made trial tables."""

from __future__ import annotations

import pandas as pd
import pytest

from data_tools.errors import InputError
from tuner.report import quantize
from tuner.report.choose import choose
from tuner.report.results import exact_accuracy


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


def trained(*rows: tuple[str, str, float, float, int, str]) -> pd.DataFrame:
    """Trials as (id, backbone, val accuracy, latency, head width, unfrozen blocks)."""
    return pd.DataFrame(
        [
            {
                "trial_id": t,
                "status": "completed",
                "backbone": backbone,
                "image_size": 224,
                "val_accuracy": acc,
                "latency_ms": ms,
                "latency_spread_ms": 1.0,
                "train_seconds": 10.0,
                "head_width": width,
                "unfrozen_blocks": units or float("nan"),
            }
            for t, backbone, acc, ms, width, units in rows
        ]
    )


def test_the_simplest_trial_within_one_standard_error_ships_instead_of_the_pick() -> None:
    """Stop 29's fold 3: a 64-wide head led a linear one by 7 of 243 validation images and
    scored 0.03 lower on test. One standard error at 0.617 on 243 images is 0.031: the linear
    head ships, though its latency was measured slower (one network, two noisy timings)."""
    trials = trained(
        ("000", "B0", 143 / 243, 22.3, 0, ""),
        ("001", "B0", 150 / 243, 17.5, 64, ""),
        ("002", "B0", 146 / 243, 20.5, 512, ""),
    )
    plain = choose(trials)  # no validation size: the pick
    assert plain.trial_id == plain.picked == "001" and plain.heading == "Pareto front"
    assert choose(trials, validation_count=243, within_se=0).trial_id == "001"
    choice = choose(trials, validation_count=243)
    assert (choice.trial_id, choice.picked, choice.within_se) == ("000", "001", 1.0)
    assert choice.front["trial_id"].tolist() == ["001", "000"]  # shown beside the front
    assert choice.heading == "Pareto front, and trial 000 shipped"
    assert choice.front.loc[choice.front.chosen, "trial_id"].item() == "000"
    assert (
        "trial 000 (B0, val acc 0.5885, 22.30 ms), a linear head on a frozen backbone, is "
        "within 1 standard error (0.0312 on 243 validation images) of it, no slower, and "
        "simpler (the pick trains a 64-wide head on a frozen backbone): it ships instead."
    ) in choice.reason
    # Beyond one standard error the pick stands; two let the 512-wide head's rival in too.
    assert choose(trials, validation_count=2430).trial_id == "001"
    assert choose(trials, validation_count=243, within_se=0.5).trial_id == "001"


def test_simpler_means_fewer_units_fine_tuned_then_a_narrower_head_and_never_slower() -> None:
    trials = trained(
        ("00", "B0", 0.800, 10.0, 256, "7a top"),
        ("01", "B0", 0.790, 10.0, 512, ""),
        ("02", "B0", 0.785, 10.0, 128, ""),
        ("03", "B0", 0.780, 10.0, 0, "6d 7a top"),
        ("04", "B0", 0.700, 10.0, 0, ""),  # simplest, but far below
        ("05", "B3", 0.795, 30.0, 0, ""),  # simpler and close, but slower
    )
    choice = choose(trials, "max-accuracy", validation_count=400)  # SE at 0.8: 0.02
    assert choice.trial_id == "02"
    assert "the pick trains a 256-wide head, 2 units fine-tuned" in choice.reason
    # A faster backbone within the band counts, measured apart from the pick's.
    faster = trials.assign(latency_ms=[10.0, 10.0, 10.0, 10.0, 10.0, 4.0])
    assert choose(faster, "max-accuracy", validation_count=400).trial_id == "05"
    # On training time only the measurements count: 01 and 02 trained longer than the pick,
    # 03 fine-tuned more units, 05 trained longer.
    by_time = trials.assign(train_seconds=[50.0, 60.0, 70.0, 40.0, 1.0, 90.0])
    assert choose(by_time, "max-accuracy", "training", validation_count=400).trial_id == "00"


def test_a_head_on_stage_features_is_not_the_picks_network() -> None:
    # Stop 29's fold 3 again, but the linear head reads stage features: another network than
    # the pick's 64-wide head on the pooled top, so its slower timing is not noise to ignore.
    trials = trained(
        ("000", "B0", 143 / 243, 22.3, 0, ""),
        ("001", "B0", 150 / 243, 17.5, 64, ""),
    ).assign(features=["stages", "top"])
    assert choose(trials, validation_count=243).trial_id == "001"
    same = trials.assign(features=["top", "top"])
    assert choose(same, validation_count=243).trial_id == "000"
    legacy = trials.drop(columns="features")  # a trials.csv from before the column: all top
    assert choose(legacy, validation_count=243).trial_id == "000"


def test_a_litert_variant_with_the_keras_models_correct_count_and_faster_ships() -> None:
    """The issue's 4-minute digits search: trial 000's Keras model recorded Keras' float32
    0.9638554453849792, its LiteRT ``dynamic`` variant 160/166 exactly. The same images:
    a tie, so the slower Keras row is off the front and the variant ships."""
    trials = trained(("000", "B0", 0.9638554453849792, 14.63, 0, "")).assign(model_bytes=1e7)
    deployables = pd.DataFrame(
        [
            {
                "trial_id": "000",
                "variant": "dynamic",
                "status": "completed",
                "val_accuracy": 160 / 166,
                "latency_ms": 0.26,
                "latency_spread_ms": 0.01,
                "file_bytes": 2.5e6,
            }
        ]
    )
    pool = quantize.candidates(trials, deployables)
    choice = choose(pool, validation_count=166)
    assert choice.front["trial_id"].tolist() == ["000:dynamic"]
    assert choice.trial_id == "000:dynamic"
    # Unrounded, the float32 figure "beat" the count by 2e-8 and the Keras row stayed on.
    assert len(choose(pool, within_se=0).front) == 1  # no count: rounded to 6 decimals
    assert exact_accuracy(0.9638554453849792, 166) == exact_accuracy(160 / 166, 166) == 160 / 166
