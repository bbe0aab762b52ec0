"""The transfer algorithm's decisions, as pure functions over plain trial data."""

from __future__ import annotations

import pytest

from tuner.engine import costmodel, strategy
from tuner.engine.costmodel import FINE_TUNE, FROZEN, FeatureSet, Setting, TrialFacts

B0 = FeatureSet("B0", "native", 224)
B1 = FeatureSet("B1", "native", 240)
B3 = FeatureSet("B3", "native", 300)


def setting(**changes) -> Setting:
    values = dict(
        feature_sets=(B0, B1, B3),
        fractions=(0.1, 0.2),
        factors=(0.1, 0.01),
        head_trials=4,
        frozen_share=0.5,
        epochs=9,
        eta=3,
        budget_s=1000.0,
        images=1000,
        # B0's pass over 1,000 images: 0.39 GFLOPs x 1000 x this = 39 s.
        seconds_per_gflop=0.1,
    )
    values.update(changes)
    return Setting(**values)


def head(
    trial_id: str, fs=B0, score=0.5, seconds=3.0, pass_s=0.0, width=0, latency=10.0, spread=None
):
    return TrialFacts(
        trial_id=trial_id,
        status="COMPLETED",
        values={"tuner/stage": FROZEN, "head_width": width, "backbone": fs.backbone},
        feature_set=fs,
        score=score,
        train_seconds=seconds + pass_s,
        pass_seconds=pass_s,
        trial_seconds=seconds + pass_s + 1.0,
        latency_ms=latency,
        latency_spread_ms=spread,
        epochs_run=1,
    )


def fine(trial_id, parent, fraction, factor, epochs, initial=0, score=0.5, bracket=0, size=2):
    return TrialFacts(
        trial_id=trial_id,
        status="COMPLETED",
        values={
            "tuner/stage": FINE_TUNE,
            "tuner/trial_id": parent,
            "tuner/epochs": epochs,
            "tuner/initial_epoch": initial,
            "tuner/bracket": bracket,
            "tuner/bracket_size": size,
            "tuner/bracket_rungs": 2,
            "finetune_fraction": fraction,
            "finetune_lr_factor": factor,
            "head_width": 0,
        },
        feature_set=B0,
        score=score,
        train_seconds=10.0 * (epochs - initial),
        trial_seconds=10.0 * (epochs - initial) + 1.0,
        latency_ms=10.0,
        epochs_run=epochs - initial,
    )


def test_rungs_are_hyperbands_epochs():
    assert strategy.rungs(10, 3) == [2, 4, 10]
    assert strategy.rungs(9, 3) == [1, 3, 9]
    assert strategy.rungs(2, 3) == [2]


def test_the_first_move_is_a_head_on_the_cheapest_feature_set_paying_its_pass():
    move = strategy.next_move(setting(), [], 1000)
    assert move.stage == FROZEN and move.feature_set == B0 and move.head_index == 0
    # The pass (39 s from the calibration) and a head (5 s prior + 2 s records).
    assert move.estimate_s == pytest.approx(39 + 5 + 2)
    assert "frozen stage: head 1/4 on B0 224px" in move.why


def test_heads_fill_a_feature_set_then_the_next_if_it_fits_the_frozen_share():
    trials = [head(str(i), pass_s=40.0 if i == 0 else 0.0) for i in range(4)]
    move = strategy.next_move(setting(), trials, 900)
    assert move.stage == FROZEN and move.feature_set == B1 and move.head_index == 0
    # B1's pass is B0's measured one scaled by FLOPs (0.70 x (240/240)^2 / 0.39).
    assert move.estimate_s == pytest.approx(40 * 0.70 / 0.39 + 3 + 1, rel=1e-6)


def test_a_feature_set_that_would_overrun_the_frozen_share_waits_for_the_fine_tunes():
    trials = [head(str(i), pass_s=40.0 if i == 0 else 0.0) for i in range(4)]
    # Share 0.1 x 1000 s = 100 s: B0 took 4 x 4 s + 40 s; B1 (~72 s pass + heads) does not fit.
    move = strategy.next_move(setting(frozen_share=0.1), trials, 900)
    # Every head ties (same accuracy and latency): the first is the first candidate.
    assert move.stage == FINE_TUNE and move.parent == "0"


def test_fine_tune_candidates_start_from_the_best_front_trial_smallest_fraction_first():
    trials = [
        head("0", score=0.50, pass_s=40.0),
        head("1", score=0.70),
        head("2", score=0.60),
        head("3", score=0.65),
    ]
    move = strategy.next_move(setting(feature_sets=(B0,)), trials, 900)
    assert move.stage == FINE_TUNE and move.parent == "1"
    assert (move.fraction, move.factor, move.initial_epoch) == (0.1, 0.1, 0)
    assert move.epochs == 1 and move.bracket == 0 and move.bracket_size >= 2


def test_a_head_faster_only_by_timing_noise_is_not_a_fine_tune_parent():
    # As in fold 2 of the README's quality run: a 128-wide head at 0.339 validation timed
    # 14.74 ms (spread 3.3 ms) beside the best, a 256-wide one at 0.567 and 17.64 ms.
    one = setting(feature_sets=(B0,), fractions=(0.1,), factors=(0.1,), head_trials=3)

    def heads(spread):
        return [
            head("0", score=0.567, latency=17.64, spread=spread, pass_s=40.0),
            head("1", score=0.339, latency=14.74, spread=None if spread is None else 3.3),
            head("2", score=0.532, latency=18.0, spread=spread),  # the runner-up, off the front
        ]

    started = [fine("10", "0", 0.1, 0.1, epochs=1, size=2)]
    # The best parent's fine-tune is under way; the bracket's second candidate is the
    # runner-up by validation ("2"), not the weak head that timed faster by less than its
    # measured spread.
    move = strategy.next_move(one, heads(0.6) + started, 900)
    assert move.stage == FINE_TUNE and move.parent == "2"
    # Latencies measured without spread: "1" is faster, so on the front and tried first.
    move = strategy.next_move(one, heads(None) + started, 900)
    assert move.stage == FINE_TUNE and move.parent == "1"


def rising_heads() -> list[TrialFacts]:
    """Four heads on B0, 0.60 to 0.63 (the first paying the pass)."""
    return [head(str(i), score=0.6 + i / 100, pass_s=40.0 if i == 0 else 0.0) for i in range(4)]


def test_successive_halving_promotes_the_best_of_a_complete_rung():
    trials, rung = (
        rising_heads(),
        [
            fine("10", "3", 0.1, 0.1, epochs=1, score=0.70, size=3),
            fine("11", "3", 0.1, 0.01, epochs=1, score=0.72, size=3),
            fine("12", "3", 0.2, 0.1, epochs=1, score=0.64, size=3),
        ],
    )
    move = strategy.next_move(setting(feature_sets=(B0,)), trials + rung, 900)
    assert move.stage == FINE_TUNE and move.parent == "11"
    assert (move.initial_epoch, move.epochs) == (1, 3)
    assert "continues trial 11" in move.why


def test_promotion_treats_accuracies_within_a_standard_error_as_ties_and_takes_the_simpler():
    trials, rung = (
        rising_heads(),
        [
            fine("10", "3", 0.2, 0.1, epochs=1, score=0.72, size=3),
            fine("11", "3", 0.1, 0.1, epochs=1, score=0.70, size=3),
            fine("12", "3", 0.1, 0.01, epochs=1, score=0.55, size=3),
        ],
    )
    # 100 validation images: 0.72's standard error is 0.045, so 0.70 ties with it, and the
    # export would ship the top 10% over the top 20% at a tie: that one goes on.
    move = strategy.next_move(setting(feature_sets=(B0,)), trials + rung, 900)
    assert move.parent == "11" and (move.initial_epoch, move.epochs) == (1, 3)
    # 10,000 validation images (standard error 0.0045): 0.02 is a difference; the best goes on.
    many = setting(feature_sets=(B0,), images=100_000)
    assert strategy.next_move(many, trials + rung, 900).parent == "10"


def test_fine_tune_parents_within_a_standard_error_go_narrowest_head_first():
    # A 256-wide head at 0.62 and a linear one at 0.60 (a bit faster: both on the front).
    trials = [
        head("0", score=0.62, width=256, latency=10.0, pass_s=40.0),
        head("1", score=0.60, width=0, latency=9.0),
    ]
    one = setting(feature_sets=(B0,), head_trials=2)
    assert [t.trial_id for t in strategy._front(one, trials)] == ["1", "0"]
    assert strategy.next_move(one, trials, 900).parent == "1"
    # Told apart by a big validation split: the more accurate one first.
    many = setting(feature_sets=(B0,), head_trials=2, images=100_000)
    assert [t.trial_id for t in strategy._front(many, trials)] == ["0", "1"]


def test_promotion_waits_while_its_rung_is_still_running():
    trials = [head(str(i), pass_s=40.0 if i == 0 else 0.0) for i in range(4)]
    running = fine("11", "3", 0.1, 0.01, epochs=1, size=2)
    running = TrialFacts(**{**running.__dict__, "status": "RUNNING", "score": None})
    rung = [fine("10", "3", 0.1, 0.1, epochs=1, size=2), running]
    move = strategy.next_move(setting(feature_sets=(B0,)), trials + rung, 900)
    # Not the promotion: something else useful (more heads) meanwhile.
    assert move.stage == FROZEN


def test_nothing_fits_says_why():
    assert "cannot pay for B0 224px's features" in strategy.next_move(setting(), [], 10)
    trials = [head(str(i), pass_s=40.0 if i == 0 else 0.0) for i in range(4)]
    assert strategy.next_move(setting(), trials, 1) == "nothing more fits in the 1s left"


def test_a_long_budget_with_nothing_left_worth_trying_ends_and_says_so():
    done = setting(feature_sets=(B0,), fractions=(), head_trials=2)
    trials = [head(str(i), pass_s=40.0 if i == 0 else 0.0) for i in range(5)]
    assert strategy.next_move(done, trials, 72_000).stage == FROZEN  # the 6th extra head
    trials.append(head("5"))
    why = strategy.next_move(done, trials, 72_000)
    assert (
        why.startswith("nothing left worth trying")
        and "20h00m00s of the budget is left unspent" in why
    )


def test_fine_tune_epochs_scale_from_a_measured_fraction():
    costs = costmodel.Costs(setting(), [fine("10", "0", 0.1, 0.1, epochs=2)])
    assert costs.epoch_seconds(B0, 0.1) == pytest.approx(10.0)
    assert costs.epoch_seconds(B0, 0.2) == pytest.approx(20.0)


def test_plan_names_what_the_budget_affords():
    lines = strategy.plan_lines(setting(frozen_share=0.05), [], 1000)
    text = "\n".join(lines)
    assert "B0 224px" in text and "yes" in text and "later, if time is left" in text
    assert "successive halving over 1, 3, 9 epochs" in text


STAGES = FeatureSet("B0", "native", 224, features="stages")


def test_stage_feature_sets_come_first_and_a_hub_module_has_none():
    from tuner.engine import oracle
    from tuner.model import space

    s = space.load(None, {"backbones": ["B0", "B1"]})
    assert [fs.label for fs in oracle.feature_sets(s)] == [
        "B0 224px stages",
        "B0 224px",
        "B1 240px stages",
        "B1 240px",
    ]
    hub = space.load(None, {"backbones": ["hub:/somewhere/b0"], "features": ["top", "stages"]})
    assert [fs.features for fs in oracle.feature_sets(hub)] == ["top"]
    only = space.load(None, {"backbones": ["B0"], "features": "top"})
    assert [fs.label for fs in oracle.feature_sets(only)] == ["B0 224px"]


def test_heads_on_stage_features_are_no_fine_tune_parents():
    # The stage head is the front (best and as fast); the top set's best head is the parent.
    trials = [
        head("000", fs=STAGES, score=0.62),
        head("001", fs=STAGES, score=0.58),
        head("002", fs=B0, score=0.53),
        head("003", fs=B0, score=0.50),
    ]
    s = setting(feature_sets=(STAGES, B0), head_trials=2)
    assert [t.trial_id for t in strategy._front(s, trials)] == ["000"]
    parents = {parent.trial_id for parent, _, _ in strategy._candidates(s, trials)}
    assert parents == {"002"}
    move = strategy.next_move(s, trials, 900.0)
    assert move.stage == FINE_TUNE and move.parent == "002"
    # With only stage heads there is nothing to fine-tune.
    stages_only = setting(feature_sets=(STAGES,), head_trials=2)
    assert strategy._candidates(stages_only, trials[:2]) == []


def test_what_may_still_be_continued_keeps_its_checkpoint():
    # Heads 0-3 on B0 (3 the best); a bracket of 3 from head 3 at rung 1 (1 epoch), its rung 2
    # (3 epochs) holding one of the one it takes: rung 1's trials are done with.
    trials = [head(str(i), score=0.6 + i / 100) for i in range(4)]
    rung = [
        fine("10", "3", 0.1, 0.1, epochs=1, score=0.70, size=3),
        fine("11", "3", 0.1, 0.01, epochs=1, score=0.72, size=3),
        fine("12", "3", 0.2, 0.1, epochs=1, score=0.64, size=3),
    ]
    one = setting(feature_sets=(B0,))
    live = strategy.continuable(one, trials + rung)
    # Rung 1 waits for its promotion; head 3 still has (0.2, 0.01) to try, head 2 (the best
    # other head) all four; heads 0 and 1 are parents of nothing.
    assert live == {"10", "11", "12", "3", "2"}
    promoted = fine("13", "11", 0.1, 0.01, epochs=3, initial=1, score=0.75, size=3)
    live = strategy.continuable(one, [*trials, *rung, promoted])
    assert not live & {"10", "11", "12", "13", "0", "1"}
    # A running trial's parent is what a resume needs.
    running = TrialFacts(**{**promoted.__dict__, "status": "RUNNING", "score": None})
    assert "11" in strategy.continuable(one, [*trials, *rung, running])


def test_widening_starts_from_the_best_within_two_standard_errors_then_says_why_it_stops():
    plain = setting(feature_sets=(B0,), fractions=(0.1,), factors=(0.1,), head_trials=2)
    trials = [head("0", pass_s=40.0, score=0.78), head("1", score=0.5)]  # 100 validation images
    trials += [head(str(i), score=0.4) for i in range(2, 6)]  # 3x the heads
    trials += [fine("6", "0", 0.1, 0.1, 3, score=0.7), fine("7", "6", 0.1, 0.1, 9, 3, score=0.8)]
    trials += [fine("8", "1", 0.1, 0.1, 3, score=0.65), fine("9", "8", 0.1, 0.1, 9, 3, score=0.6)]
    move = strategy.next_move(plain, trials, 72_000)
    assert (move.parent, move.initial_epoch, move.epochs, move.bracket) == ("7", 9, 27, -1)
    assert move.why == (
        "widening: trial 7 (top 10% at lr x0.1, val accuracy 0.8000) continued from 9 to 27 epochs"
    )
    # Widening will still read 7; 9 starts 0.2 below the best (2 SE: 0.08), so it never will.
    assert "7" in strategy.continuable(plain, trials)
    assert "9" not in strategy.continuable(plain, trials)
    trials.append(fine("10", "7", 0.1, 0.1, 27, 9, score=0.81, bracket=-1))
    whole = strategy.next_move(plain, trials, 72_000)  # 0.78: within 2 SE of 0.81
    assert (whole.parent, whole.fraction, whole.factor, whole.epochs) == ("0", 1.0, 0.1, 9)
    trials.append(fine("11", "0", 1.0, 0.1, 9, score=0.7, bracket=-1))
    why = strategy.next_move(plain, trials, 72_000)
    assert why == (
        "nothing left that validation could detect: best validation accuracy 0.8100 (trial 10), "
        "its standard error 0.0392 on 100 images; a remaining move could gain at most 0.1900; "
        "the 2 widening move(s) left start more than 2 standard errors below it (from 0.6000 "
        "at best): each would have to gain more than the export's noise band just to tie"
    )


def test_a_best_accuracy_within_one_standard_error_of_100_percent_ends_the_search():
    plain = setting(feature_sets=(B0,), fractions=(), head_trials=2, images=1000)  # 100 val
    trials = [head("0", pass_s=40.0, score=0.995)] + [head(str(i), score=0.9) for i in (1, 2)]
    trials += [head(str(i), score=0.9) for i in (3, 4, 5)]
    why = strategy.next_move(plain, trials, 72_000)
    assert why.startswith("nothing left that validation could detect: best validation ")
    assert "accuracy 0.9950 (trial 0), its standard error 0.0071 on 100 images" in why
    # With a head still to try, the end of the budget is the budget's, not the space's.
    assert strategy.next_move(plain, trials[:-1], 1.0) == "nothing more fits in the 1s left"


def test_widening_pairs_the_best_linear_heads_of_two_backbones_at_the_better_ones_size():
    v2 = FeatureSet("V2B0", "native", 224)
    paired = setting(feature_sets=(B0, v2, B1), fractions=(), head_trials=2)  # 100 val images
    trials = [head("0", pass_s=40.0, score=0.78), head("1", score=0.70, width=64)]
    trials += [head("2", v2, pass_s=50.0, score=0.79), head("3", v2, score=0.60, width=64)]
    trials += [head("4", B1, pass_s=60.0, score=0.81), head("5", B1, score=0.5, width=64)]
    trials += [head(str(i), B1, score=0.5) for i in range(6, 10)]  # B1 has 3x its heads
    move = strategy.next_move(paired, trials, 72_000)
    # All three within 2 SE (0.078) of 0.81: the best pairs with the next, at its 240 px.
    v2_240 = FeatureSet("V2B0", "240", 240)
    assert (move.stage, move.feature_set, move.partner, move.parent) == (
        costmodel.PAIRED,
        B1,
        v2_240,
        "4",
    )
    costs = costmodel.Costs(paired, trials)
    assert move.estimate_s == pytest.approx(
        2 * costs.head_seconds("exact") + costs.pass_seconds(v2_240)
    )
    assert move.why == (
        "widening: a linear head on B1 240px and V2B0 240px at once (their best linear heads: "
        "trial 4, val accuracy 0.8100; trial 2 (V2B0 224px), 0.7900); V2B0's features at "
        "240px are computed first; its latency is both backbones'"
    )

    def made(trial_id, first, partner, score):
        facts = head(trial_id, first, score=score)
        values = {**facts.values, "partner": partner}
        return TrialFacts(**{**facts.__dict__, "values": values})

    done = made("10", B1, "V2B0", 0.80)
    assert done.stage == costmodel.PAIRED and done.partner == v2_240
    after = strategy.next_move(paired, [*trials, done], 72_000)
    assert (after.feature_set, after.partner) == (B1, FeatureSet("B0", "240", 240))
    last = strategy.next_move(paired, [*trials, done, made("11", B1, "B0", 0.8)], 72_000)
    # At the same size the partner's features are cached: two linear heads' time.
    assert (last.feature_set, last.partner) == (v2, FeatureSet("B0", "224", 224))
    assert "computed first" not in last.why
    trials += [done, made("11", B1, "B0", 0.8), made("12", v2, "B0", 0.8)]
    why = strategy.next_move(paired, trials, 72_000)
    assert isinstance(why, str) and why.startswith("nothing left")  # each pair made once
    # A pair is no head of its first feature set (nor a fine-tune parent: no frozen trial).
    assert strategy._heads_on(trials, B1) == 6


def test_widening_pairs_no_member_further_than_two_standard_errors_below_the_best():
    v2 = FeatureSet("V2B0", "native", 224)
    paired = setting(feature_sets=(B0, v2), fractions=(), head_trials=2)
    trials = [head("0", pass_s=40.0, score=0.80), head("1", score=0.70, width=64)]
    trials += [head("2", v2, pass_s=50.0, score=0.55), head("3", v2, score=0.50, width=64)]
    trials += [head(str(i), score=0.5) for i in range(4, 8)]
    why = strategy.next_move(paired, trials, 72_000)
    assert isinstance(why, str) and "pair" not in why
