"""The quality benchmark's design and arithmetic: folds (rotations of the test and validation
bucket ranges), the paired confidence interval over them (Nadeau and Bengio's corrected
resampled t), the summary per baseline and the report's lines (``quality vs <baseline>: ...``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from data_tools.errors import InputError
from data_tools.split import parse_range

BASELINES = ("seed", "keras-example", "hyperband", "longer")
ALL = ("seed", "keras-example", "hyperband")
HAND = ("seed", "keras-example")
LONGER = 4  # the longer search's budget, in budgets
# A search whose wall clock (start-up, split and records included) passes its baseline's
# time by more than this is not "at equal wall clock".
OVER_TIME = 1.1

BUCKETS = 256  # hash buckets 0..255 (data_tools.split)


def range_text(pair: tuple[int, int]) -> str:
    """``(0, 63)`` -> ``"0-63"``, as ``--test-range`` takes it."""
    return f"{pair[0]}-{pair[1]}"


def fold_ranges(test: str, validation: str, folds: int) -> list[dict[str, str]]:
    """The K folds' ``{"test": "a-b", "validation": "c-d"}``: fold i shifts both ranges by
    i times the test range's width, wrapping past the last bucket to the first (K-fold
    cross-validation: with 64-wide ranges, four folds test every bucket once). The test
    ranges are disjoint, and no shifted range may straddle the wrap."""
    low, high = parse_range(test)
    vlow, vhigh = parse_range(validation)
    if not (0 <= low <= high < BUCKETS and 0 <= vlow <= vhigh < BUCKETS):
        raise InputError(
            f"--test-range {test} / --validation-range {validation}: ranges are LOW-HIGH "
            f"within the hash buckets 0-{BUCKETS - 1}"
        )
    width = high - low + 1

    def shifted(i: int) -> dict[str, tuple[int, int]] | None:
        out = {}
        for key, (a, b) in (("test", (low, high)), ("validation", (vlow, vhigh))):
            a, b = (a + i * width) % BUCKETS, (b + i * width) % BUCKETS
            if a > b:
                return None  # the range would straddle the wrap
            out[key] = (a, b)
        return out

    fitting: list[dict[str, tuple[int, int]]] = []
    while (len(fitting) + 1) * width <= BUCKETS and (fold := shifted(len(fitting))) is not None:
        fitting.append(fold)
    largest = len(fitting)
    if not 1 <= folds <= largest:
        raise InputError(
            f"--folds {folds}: test buckets {test} and validation buckets {validation}, "
            f"shifted by {width} buckets a fold (wrapping past {BUCKETS - 1}), fit "
            f"{largest} fold(s) with disjoint test buckets; pass --folds {largest} or "
            f"narrower ranges"
        )
    return [{key: range_text(span) for key, span in fold.items()} for fold in fitting[:folds]]


def paired_interval(
    differences: Sequence[float], level: float = 0.95, test_train: float = 0.0
) -> tuple[float, float]:
    """The interval of the mean of paired differences over K folds (NaN for one pair).

    The folds' training sets overlap (each fold trains on most of the others' data), so
    their differences are correlated and Student's t interval is too narrow. Nadeau and
    Bengio's corrected resampled t (Machine Learning, 2003) scales the sample variance by
    ``1/K + n_test/n_train`` instead of ``1/K``; ``test_train`` is that ratio (0: Student's t)."""
    from scipy import stats

    n = len(differences)
    if n < 2:
        return math.nan, math.nan
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    scale = math.sqrt((1 / n + test_train) * variance)
    if scale == 0:  # every fold the same difference: no spread to widen it
        return mean, mean
    low, high = stats.t.interval(level, n - 1, loc=mean, scale=scale)
    return float(low), float(high)


def test_train_ratio(ranges: dict[str, str]) -> float:
    """n_test / n_train of a fold from its bucket ranges (the hash split puts an equal share
    of the images in each bucket; the rest of the buckets train): 64 test and 64 validation
    buckets of 256 give 64/128 = 0.5."""
    tlow, thigh = parse_range(ranges["test"])
    vlow, vhigh = parse_range(ranges["validation"])
    test, validation = thigh - tlow + 1, vhigh - vlow + 1
    return test / max(BUCKETS - test - validation, 1)


def summarise(folds: list[dict]) -> dict:
    """Per baseline: the per-fold differences, their mean and 95% interval (the corrected
    resampled t of :func:`paired_interval`, with the folds' test/train ratio)."""
    summary = {}
    ratios = [test_train_ratio(fold["split_ranges"]) for fold in folds if "split_ranges" in fold]
    ratio = sum(ratios) / len(ratios) if ratios else 0.0
    for name in BASELINES:
        rows = [fold["comparisons"][name] for fold in folds if name in fold["comparisons"]]
        if not rows:
            continue
        differences = [row["difference"] for row in rows]
        low, high = paired_interval(differences, test_train=ratio)
        summary[name] = {
            "mean": sum(differences) / len(differences),
            "ci95": [low, high],
            "interval": f"corrected resampled t, n_test/n_train {ratio:.2f}",
            "per_fold": differences,
            "folds": len(rows),
            "equal_wall_clock": all(row["equal_wall_clock"] for row in rows),
            "our_seconds": [row["our_seconds"] for row in rows],
            "their_seconds": [row["their_seconds"] for row in rows],
        }
    return summary


def print_report(report: dict) -> None:
    from tuner.report.text import format_seconds

    print(f"{'fold':<6}{'method':<16}{'test acc':>9}{'balanced':>10}{'time':>10}  model")
    for fold in report["folds"]:
        rows = [(n, m, m.get("train_seconds")) for n, m in fold["methods"].items()]
        rows += [(f"ours {s}", m, None) for s, m in fold["ours"].items()]
        for name, method, trained in rows:
            seconds = trained if trained is not None else method["wall_seconds"]
            if trained is not None:
                model = f"{method['backbone']} {method['image_size']}px, {method['epochs']} epochs"
            else:
                tuned = method.get("finetune_fraction")  # "-": unused (it trained no block)
                tuned = tuned if isinstance(tuned, int | float) else 0
                model = f"trial {method['trial_id']}: {method['backbone']} {method['image_size']}px"
                model += ", stage features" if method.get("features") == "stages" else ""
                model += f", top {tuned:.0%} fine-tuned" if tuned else ", frozen"
            print(
                f"{fold['fold']:<6}{name:<16}{method['test']['accuracy']:>9.4f}"
                f"{method['test']['balanced_accuracy']:>10.4f}{format_seconds(seconds):>10}  "
                f"{model}"
            )
        ranges = fold["split_ranges"]
        count = next(iter(fold["methods"].values()), next(iter(fold["ours"].values())))
        print(
            f"{'':<6}test images: {count['test']['count']} (test buckets {ranges['test']}, "
            f"validation buckets {ranges['validation']})"
        )
        budgets = ", ".join(
            f"vs {name} {format_seconds(row['our_budget_s'])}"
            for name, row in fold["comparisons"].items()
            if "our_budget_s" in row
        )
        if budgets:
            print(f"{'':<6}our search's budget: {budgets}")
    for name, row in report["summary"].items():
        per_fold = ", ".join(f"{d:+.3f}" for d in row["per_fold"])
        print(f"ours - {name} per fold: {per_fold}")
    if report["summary"]:
        first = next(iter(report["summary"].values()))
        print(
            f"intervals: Nadeau and Bengio's {first.get('interval', 'Student t')} (the folds' "
            f"training sets overlap: variance x (1/K + n_test/n_train), not 1/K)"
        )
    for name, row in report["summary"].items():
        print(quality_line(name, row))


def quality_line(name: str, row: dict) -> str:
    """``quality vs <baseline>: +X.XXX (95% CI +L..+H) over K folds at equal wall clock``;
    for ``longer``, the regret; "at equal wall clock" only when it was."""
    from tuner.report.text import format_seconds

    low, high = row["ci95"]
    interval = "95% CI n/a: one fold" if math.isnan(low) else f"95% CI {low:+.3f}..{high:+.3f}"
    folds = f"over {row['folds']} fold{'s' if row['folds'] != 1 else ''}"
    if name == "longer":
        low, high = 0.0 - high, 0.0 - low
        interval = interval if math.isnan(low) else f"95% CI {low:+.3f}..{high:+.3f}"
        return (
            f"regret vs longer: {0.0 - row['mean']:+.3f} ({interval}) {folds}: test accuracy a "
            f"search at {LONGER}x the budget gained"
        )
    line = f"quality vs {name}: {row['mean']:+.3f} ({interval}) {folds}"
    if row["equal_wall_clock"]:
        return f"{line} at equal wall clock"
    ours = "/".join(format_seconds(s) for s in row["our_seconds"])
    theirs = "/".join(format_seconds(s) for s in row["their_seconds"])
    return f"{line} (ours took {ours} against {theirs}: not equal wall clock)"
