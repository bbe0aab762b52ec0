"""Widening: what the ``transfer`` algorithm does once its space is exhausted and budget is
left (:mod:`tuner.engine.strategy`, step 4), and when it stops for good.

The moves, in order of the gain they can bring per second:

1. **paired heads**: a linear head fitted exactly on the features of two backbones at once,
   those of the best linear heads of two backbones, both run at the better one's image size
   (so the model has one input; the second's features at that size cost its pass when that
   is not its own size, else they are cached and the head costs seconds): one model whose
   latency is the sum of its backbones', a new point on the accuracy/latency front, and a
   deployable one;
2. a fine-tune that reached the top rung continued from ``epochs`` to ``LONGER`` x
   ``epochs``, or a fine-tune parent with its whole network unfrozen at the smallest
   learning-rate factor (a linear probe, then a full fine-tune: Kumar et al., ICLR 2022),
   the best validated first.

Only trials within ``WIDEN_WITHIN`` binomial standard errors of the best validation accuracy
are widened (a pair: both its members); when the best is within one standard error of 100%,
or every move left starts further below it, nothing left could be told from noise on the
validation split, and the search ends saying so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tuner.engine.costmodel import (
    FINE_TUNE,
    FROZEN,
    PAIRED,
    Costs,
    FeatureSet,
    Move,
    Setting,
    TrialFacts,
)
from tuner.model import backbones
from tuner.report.choose import standard_error

LONGER = 3  # the best fine-tunes continued to this many times `epochs`
WIDEN_WITHIN = 2.0  # widening starts only from trials within this many standard errors of the best
WIDENING = -1  # the `tuner/bracket` of a widening trial: in no successive-halving bracket


def best_trial(trials: Sequence[TrialFacts]) -> TrialFacts | None:
    done = [t for t in trials if t.done and t.score is not None]
    return max(done, key=lambda t: (t.score or 0.0, -int(t.trial_id)), default=None)


def figures(setting: Setting, trials: Sequence[TrialFacts]) -> str:
    best = best_trial(trials)
    if best is None:
        return "no finished trial"
    count = setting.validation_count
    se = standard_error(best.score or 0.0, count)
    return (
        f"best validation accuracy {best.score:.4f} (trial {best.trial_id}), its standard "
        f"error {se:.4f} on {count} images; a remaining move could gain at most "
        f"{1.0 - (best.score or 0.0):.4f}"
    )


def lowest_start(setting: Setting, trials: Sequence[TrialFacts]) -> float:
    """The lowest validation accuracy a widening move may start from: ``WIDEN_WITHIN``
    standard errors below the best (a move from further down would have to gain more than
    the export's noise band just to tie)."""
    best = best_trial(trials)
    if best is None:
        return math.inf
    score = best.score or 0.0
    return score - WIDEN_WITHIN * standard_error(score, setting.validation_count)


def undetectable(
    setting: Setting, trials: Sequence[TrialFacts], parents: Sequence[TrialFacts]
) -> str:
    """Why to stop once the space is exhausted, when no remaining move could be told from
    noise: the best validation accuracy is within one standard error of 100%, or every
    widening move left starts more than ``WIDEN_WITHIN`` standard errors below the best.
    Else ''."""
    best = best_trial(trials)
    if best is None or not setting.validation_count:
        return ""
    score = best.score or 0.0
    se = standard_error(score, setting.validation_count)
    if 1.0 - score <= max(se, 0.5 / setting.validation_count):
        return (
            f"nothing left that validation could detect: {figures(setting, trials)}, within "
            "one standard error of 100%"
        )
    if open_pairs(setting, trials):
        return ""
    moves = open_moves(setting, trials, parents)
    if moves and all(start < lowest_start(setting, trials) for start, _ in moves):
        return (
            f"nothing left that validation could detect: {figures(setting, trials)}; the "
            f"{len(moves)} widening move(s) left start more than {WIDEN_WITHIN:g} standard "
            f"errors below it (from {max(start for start, _ in moves):.4f} at best): each "
            "would have to gain more than the export's noise band just to tie"
        )
    return ""


def is_widening(t: TrialFacts) -> bool:
    """Whether ``t`` is a widening trial (in no successive-halving bracket)."""
    return t.stage == FINE_TUNE and int(t.values.get("tuner/bracket", 0)) == WIDENING


def made(trials: Sequence[TrialFacts]) -> set[tuple[str, float]]:
    """(parent, fraction) of the widening trials so far."""
    return {(str(t.values.get("tuner/trial_id")), t.fine_tune[0]) for t in trials if is_widening(t)}


def open_moves(
    setting: Setting, trials: Sequence[TrialFacts], parents: Sequence[TrialFacts]
) -> list[tuple[float, tuple[str, TrialFacts]]]:
    """Every widening move not yet made, as (the validation accuracy it starts from, (kind,
    the trial it starts from)): each top-rung fine-tune continued ``longer``, and each
    fine-tune parent's ``whole`` network (when the space stops short of it)."""
    if not setting.fractions:
        return []
    widened = made(trials)
    moves = [
        (t.score or 0.0, ("longer", t))
        for t in trials
        if t.stage == FINE_TUNE
        and t.done
        and int(t.values.get("tuner/epochs", 0)) == setting.epochs
        and not is_widening(t)
        and (t.trial_id, t.fine_tune[0]) not in widened
    ]
    if max(setting.fractions) < 1.0:
        moves += [
            (p.score or 0.0, ("whole", p))
            for p in parents
            if p.feature_set.finetunable and (p.trial_id, 1.0) not in widened
        ]
    return sorted(moves, key=lambda m: (-m[0], m[1][0], m[1][1].trial_id))


def to_widen(
    setting: Setting, trials: Sequence[TrialFacts], parents: Sequence[TrialFacts]
) -> set[str]:
    """The fine-tunes widening may still continue (their checkpoints stay): those within
    ``WIDEN_WITHIN`` standard errors of the best, which only ever rises."""
    floor = lowest_start(setting, trials)
    return {
        t.trial_id
        for start, (kind, t) in open_moves(setting, trials, parents)
        if kind == "longer" and start >= floor
    }


def widen(
    setting: Setting,
    trials: Sequence[TrialFacts],
    parents: Sequence[TrialFacts],
    costs: Costs,
    remaining_s: float,
) -> Move | None:
    """Once the space is exhausted: the first open pair (:func:`open_pairs`), else the
    widening move that starts from the best validated trial (ties: a continuation first),
    among those within ``WIDEN_WITHIN`` standard errors of the best: a top-rung fine-tune
    continued from ``epochs`` to ``LONGER`` x ``epochs``, or a parent's whole network
    unfrozen at the smallest learning-rate factor for ``epochs``. None when that move does
    not fit."""
    pairs = open_pairs(setting, trials)
    if pairs:
        return pair_move(setting, costs, *pairs[0], remaining_s)
    found = open_moves(setting, trials, parents)
    if not found or found[0][0] < lowest_start(setting, trials):
        return None
    kind, start = found[0][1]
    if kind == "longer":
        return longer_move(setting, costs, start, remaining_s)
    return whole_move(setting, costs, start, remaining_s)


def longer_move(setting: Setting, costs: Costs, t: TrialFacts, remaining_s: float) -> Move | None:
    fraction, factor = t.fine_tune
    longer = setting.epochs * LONGER
    estimate = costs.fine_tune(t.feature_set, fraction, longer - setting.epochs, fresh=False)
    if estimate > remaining_s:
        return None
    return Move(
        FINE_TUNE,
        t.feature_set,
        estimate,
        f"widening: trial {t.trial_id} (top {fraction:.0%} at lr x{factor:g}, val accuracy "
        f"{t.score:.4f}) continued from {setting.epochs} to {longer} epochs",
        parent=t.trial_id,
        fraction=fraction,
        factor=factor,
        initial_epoch=setting.epochs,
        epochs=longer,
        bracket=WIDENING,
        bracket_size=1,
        bracket_rungs=1,
    )


def whole_move(
    setting: Setting, costs: Costs, parent: TrialFacts, remaining_s: float
) -> Move | None:
    factor = min(setting.factors)
    estimate = costs.fine_tune(parent.feature_set, 1.0, setting.epochs, fresh=True)
    if estimate > remaining_s:
        return None
    return Move(
        FINE_TUNE,
        parent.feature_set,
        estimate,
        f"widening: the whole network of trial {parent.trial_id} (val accuracy "
        f"{parent.score:.4f}) fine-tuned at lr x{factor:g} for {setting.epochs} epochs",
        parent=parent.trial_id,
        fraction=1.0,
        factor=factor,
        epochs=setting.epochs,
        bracket=WIDENING,
        bracket_size=1,
        bracket_rungs=1,
    )


# -- paired heads ------------------------------------------------------------------------------


def best_linear(trials: Sequence[TrialFacts]) -> dict[tuple[str, int], TrialFacts]:
    """Per (backbone, image size), its best finished linear head fitted exactly on features
    that are not augmented (on the top's or the stage features, whichever scored higher):
    the feature sets a pair is made of."""
    best: dict[tuple[str, int], TrialFacts] = {}
    for t in trials:
        fs = t.feature_set
        if t.stage != FROZEN or not t.done or t.solver != "exact" or fs.views != 1:
            continue
        key = (fs.backbone, fs.pixels)
        if key not in best or (t.score or 0.0, -int(t.trial_id)) > (
            best[key].score or 0.0,
            -int(best[key].trial_id),
        ):
            best[key] = t
    return best


def _paired(trials: Sequence[TrialFacts]) -> set[frozenset]:
    """The (backbone, image size) pairs a paired trial was made of (run or failed)."""
    return {
        frozenset({_key(t.feature_set), _key(t.partner)})
        for t in trials
        if t.stage == PAIRED and t.partner is not None
    }


def _key(fs: FeatureSet) -> tuple[str, int]:
    return (fs.backbone, fs.pixels)


def partner_set(first: FeatureSet, second: FeatureSet) -> FeatureSet:
    """``second``'s backbone and features at ``first``'s size: a paired model has one input,
    so its second backbone runs at the first's size (its features there are what the head
    reads, cached as any feature set's)."""
    return FeatureSet(second.backbone, str(first.pixels), first.pixels, features=second.features)


def open_pairs(
    setting: Setting, trials: Sequence[TrialFacts]
) -> list[tuple[TrialFacts, TrialFacts]]:
    """Pairs not made yet, as (the better member's head, the other's), best first (by the
    better member, then the other): the best linear heads (:func:`best_linear`) of two
    backbones, both within ``WIDEN_WITHIN`` standard errors of the best validation
    accuracy. The pair's model runs both at the better member's size."""
    floor = lowest_start(setting, trials)
    heads = [t for t in best_linear(trials).values() if (t.score or 0.0) >= floor]
    heads.sort(key=lambda t: (-(t.score or 0.0), int(t.trial_id)))
    made = _paired(trials)
    return [
        (a, b)
        for i, a in enumerate(heads)
        for b in heads[i + 1 :]
        if a.feature_set.backbone != b.feature_set.backbone
        and _runs_at(b.feature_set, a.feature_set.pixels)
        and frozenset({_key(a.feature_set), _key(partner_set(a.feature_set, b.feature_set))})
        not in made
    ]


def _runs_at(fs: FeatureSet, pixels: int) -> bool:
    """Whether ``fs``'s backbone can run at ``pixels``: any of the table's can; a hub
    module, only at its own size."""
    return fs.pixels == pixels or backbones.get(fs.backbone).constructor != "hub"


def pair_move(
    setting: Setting, costs: Costs, first: TrialFacts, second: TrialFacts, remaining_s: float
) -> Move | None:
    """A linear head on ``first``'s and ``second``'s features at once, with ``first``'s
    values (its size, l2 and class weight): about two linear heads, and the second
    backbone's pass at the first's size when that is not its own. None when it does not
    fit."""
    a = first.feature_set
    b = partner_set(a, second.feature_set)
    cached = second.feature_set.pixels == a.pixels
    estimate = 2 * costs.head_seconds("exact") + (0.0 if cached else costs.pass_seconds(b))
    if estimate > remaining_s:
        return None
    at = "" if cached else f"; {b.backbone}'s features at {a.pixels}px are computed first"
    return Move(
        PAIRED,
        a,
        estimate,
        f"widening: a linear head on {a.label} and {b.label} at once (their best linear heads: "
        f"trial {first.trial_id}, val accuracy {first.score:.4f}; trial {second.trial_id} "
        f"({second.feature_set.label}), {second.score:.4f}){at}; its latency is both "
        "backbones'",
        parent=first.trial_id,
        bracket=WIDENING,
        bracket_size=1,
        bracket_rungs=1,
        partner=b,
    )
