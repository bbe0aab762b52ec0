"""How the ``transfer`` algorithm spends a budget: pure decisions over plain data.

Costs are lopsided. A frozen trial on cached features costs seconds once the backbone's pass
over the images is paid (once per backbone and image size for the whole search); a fine-tune
pays every epoch for its unfrozen top; a pass over a bigger backbone costs more than all the
heads on a smaller one. So the budget goes, in this order:

1. **frozen stage**: feature sets (backbone, image size) cheapest first; for each, its pass,
   then ``head_trials`` heads (a linear head fitted exactly, wider heads trained to
   convergence). A more expensive feature set is started only while its pass and heads fit in
   the frozen stage's share of the budget (``frozen_share``);
2. **fine-tune stage**: the frozen trials on the accuracy/latency front, best first, each
   with every (fraction, learning-rate factor) of the space, ordered so candidates that share
   a cut (and so one activation pass) come together; successive halving over fine-tune
   epochs (rungs ``epochs / factor ** k``), as many candidates as the budget left affords;
3. **what is left**: the next feature set when its pass and heads fit, another bracket of
   fine-tunes, then more heads on the best feature set;
4. **widening** (:mod:`tuner.engine.widening`), once the space is exhausted and budget is
   left: linear heads on two backbones' features at once (paired heads, seconds each), then
   the best fine-tunes continued to 3x their epochs and the best parents' whole network
   fine-tuned, from those within two standard errors of the best validation accuracy; it
   ends, saying so with the figures, when no remaining move could be told from noise.

"Best" is at the export's resolution throughout (:func:`export_order`): validation
accuracies within one binomial standard error of the best are ties, as for the export's
one-standard-error rule, and the simpler trial (the one the export would ship) comes first:
fine-tune parents the narrowest head, then the fastest; promotions the fewest units trained;
the extra heads go to the first parent's feature set.

Every estimate comes from measured costs of earlier trials of this search (pass seconds per
feature set, seconds per head by solver, seconds per fine-tune epoch per cut), else from the
backbone table's FLOPs scaled by a calibration measured at start (:class:`Costs`, with the
facts it reads, is in :mod:`tuner.engine.costmodel`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tuner.engine import widening
from tuner.engine.costmodel import FINE_TUNE, FROZEN, Costs, FeatureSet, Move, Setting, TrialFacts
from tuner.report.choose import WITHIN_SE, standard_error
from tuner.report.results import pareto_front
from tuner.report.text import format_seconds

EXTRA_HEADS = 3  # leftover time: up to this many times head_trials on the best feature set


def rungs(epochs: int, eta: int) -> list[int]:
    """Successive halving's cumulative fine-tune epochs, e.g. 10 epochs, eta 3: [2, 4, 10]."""
    count = int(math.log(max(epochs, 1)) / math.log(eta) + 1e-9) + 1
    out = [math.ceil(epochs / eta ** (count - 1 - k)) for k in range(count)]
    return sorted(set(out))


def next_move(setting: Setting, trials: Sequence[TrialFacts], remaining_s: float) -> Move | str:
    """The next trial, or why there is none (a line for the user)."""
    costs = Costs(setting, trials)
    move = _frozen_stage(setting, trials, costs, remaining_s)
    if isinstance(move, Move):
        return move
    for step in (_fine_tune_stage, _leftover):
        found = step(setting, trials, costs, remaining_s)
        if isinstance(found, Move):
            return found
    parents = _parents(setting, trials)
    # The space is exhausted when no in-space move is left at any budget; only then may the
    # statistical reason end the search (a move that does not fit in the time left is the
    # budget's end, not the space's).
    in_space = [step(setting, trials, costs, math.inf) for step in (_fine_tune_stage, _leftover)]
    exhausted = bool(trials) and not any(isinstance(move, Move) for move in in_space)
    if exhausted:
        stop = widening.undetectable(setting, trials, parents)
        if stop:
            return stop
    found = widening.widen(setting, trials, parents, costs, remaining_s)
    if isinstance(found, Move):
        return found
    if not trials:
        first = setting.feature_sets[0]
        return (
            f"the budget cannot pay for {first.label}'s features and a head "
            f"(about {format_seconds(_feature_set_cost(setting, costs, first))})"
        )
    if exhausted and not isinstance(
        widening.widen(setting, trials, parents, costs, math.inf), Move
    ):
        return (
            "nothing left worth trying: every feature set has its heads, the front's trials "
            "have their fine-tunes at every fraction and factor of the space, the best "
            f"feature set has {EXTRA_HEADS}x its heads, and the widening steps ran "
            f"({widening.figures(setting, trials)}); {format_seconds(max(remaining_s, 0))} of the "
            "budget is left unspent"
        )
    return f"nothing more fits in the {format_seconds(max(remaining_s, 0))} left"


def frozen_budget(setting: Setting) -> float:
    """The frozen stage's share; all of it when there is nothing to fine-tune."""
    return setting.budget_s * (setting.frozen_share if setting.fractions else 1.0)


def _feature_set_cost(setting: Setting, costs: Costs, fs: FeatureSet) -> float:
    heads = math.ceil(setting.head_trials / 2)
    return (
        costs.pass_seconds(fs)
        + heads * costs.head_seconds("exact", fs.views)
        + (setting.head_trials - heads) * costs.head_seconds("adam", fs.views)
    )


def _heads_on(trials: Sequence[TrialFacts], fs: FeatureSet) -> int:
    return sum(1 for t in trials if t.stage == FROZEN and t.feature_set == fs)


def _head_move(
    setting: Setting, costs: Costs, fs: FeatureSet, index: int, why: str
) -> tuple[Move, float]:
    solver = "exact" if index < math.ceil(setting.head_trials / 2) else "adam"
    first = not costs.measured(fs) and index == 0
    estimate = costs.head_seconds(solver, fs.views) + (costs.pass_seconds(fs) if first else 0.0)
    return Move(FROZEN, fs, estimate, why, head_index=index), estimate


def _frozen_stage(
    setting: Setting, trials: Sequence[TrialFacts], costs: Costs, remaining_s: float
) -> Move | None:
    spent = sum(t.trial_seconds or 0.0 for t in trials if t.stage == FROZEN and t.trial_seconds)
    share = frozen_budget(setting)
    linear = math.ceil(setting.head_trials / 2)
    for position, fs in enumerate(setting.feature_sets):
        done = _heads_on(trials, fs)
        if done >= setting.head_trials:
            continue
        if done == 0 and position > 0 and spent + _feature_set_cost(setting, costs, fs) > share:
            return None  # a more expensive feature set does not fit the stage's share
        why = f"frozen stage: head {done + 1}/{setting.head_trials} on {fs.label}"
        move, estimate = _head_move(setting, costs, fs, done, why)
        if done >= linear and spent + estimate > share:
            return None  # the linear heads always run; the slower ones within the share
        return move if estimate <= remaining_s else None
    return None


def export_order(
    setting: Setting, trials: Sequence[TrialFacts], simpler: Callable[[TrialFacts], tuple]
) -> list[TrialFacts]:
    """``trials`` best first at the export's resolution: those within ``WITHIN_SE`` binomial
    standard errors (on the validation count) of the most accurate are ties, as for the
    one-standard-error rule (:mod:`tuner.report.choose`), and come first, the simplest by
    ``simpler`` first (what the export would ship of them), then the more accurate; the
    rest follow by accuracy. No search decision ranks on a difference the export treats as
    noise."""
    if not trials:
        return []
    top = max(t.score or 0.0 for t in trials)
    floor = top - WITHIN_SE * standard_error(top, setting.validation_count)

    def key(t: TrialFacts) -> tuple:
        score = t.score or 0.0
        if score >= floor - 1e-12:
            return (0, *simpler(t), -score, t.trial_id)
        return (1, -score, t.trial_id)

    return sorted(trials, key=key)


def _head_first(t: TrialFacts) -> tuple:
    """A frozen trial's simplicity as the export orders it: the narrowest head, then the
    fastest."""
    return (int(t.values.get("head_width", 0)), t.latency_ms or 0.0)


def _front(setting: Setting, trials: Sequence[TrialFacts]) -> list[TrialFacts]:
    """Finished frozen trials that no other beats on validation accuracy and latency, in
    :func:`export_order` (ties in accuracy: the narrower head, then the faster). Latencies
    closer than their measured spread are ties, as in the export's choice
    (:func:`tuner.report.results.pareto_front`): a weaker head "faster" by timing noise is
    no front trial, and so no fine-tune parent ahead of the runner-up."""
    done = [t for t in trials if t.stage == FROZEN and t.done]
    on_front = pareto_front(
        [t.score or 0.0 for t in done],
        [t.latency_ms or 0.0 for t in done],
        [t.latency_spread_ms or 0.0 for t in done],
    )
    front = [t for t, kept in zip(done, on_front, strict=True) if kept]
    return export_order(setting, front, _head_first)


def _parents(setting: Setting, trials: Sequence[TrialFacts]) -> list[TrialFacts]:
    """Fine-tune parents in order: the front, then the best other head of each feature set
    (each in :func:`export_order`)."""
    front = _front(setting, trials)
    chosen = {t.trial_id for t in front}
    others: dict[FeatureSet, TrialFacts] = {}
    done = [t for t in trials if t.stage == FROZEN and t.done and t.trial_id not in chosen]
    for t in export_order(setting, done, _head_first):
        others.setdefault(t.feature_set, t)
    return front + export_order(setting, list(others.values()), _head_first)


def _candidates(
    setting: Setting, trials: Sequence[TrialFacts]
) -> list[tuple[TrialFacts, float, float]]:
    """(frozen parent, fraction, factor) not yet fine-tuned: front parents best first, then
    each feature set's best head off the front (a runner-up: with a long budget, another
    fine-tune is worth more than more heads on the same features); the smaller fractions
    (cheaper, one cut shared by both factors) first. Heads on stage features are not
    parents: they stay frozen."""
    tried = {
        (t.values.get("tuner/trial_id"), *t.fine_tune)
        for t in trials
        if t.stage == FINE_TUNE and int(t.values.get("tuner/initial_epoch", 0)) == 0
    }
    return [
        (parent, fraction, factor)
        for parent in _parents(setting, trials)
        if parent.feature_set.finetunable  # not a head on stage features, nor a hub's
        for fraction in sorted(setting.fractions)
        for factor in setting.factors
        if (parent.trial_id, fraction, factor) not in tried
    ]


def _bracket_cost(
    setting: Setting,
    costs: Costs,
    chosen: Sequence[tuple[TrialFacts, float, float]],
    steps: Sequence[int],
) -> float:
    count, total, previous = len(chosen), 0.0, 0
    worst = max(costs.epoch_seconds(p.feature_set, f) for p, f, _ in chosen)
    for rung, epochs in enumerate(steps):
        survivors = count if rung == 0 else max(1, count // setting.eta**rung)
        total += survivors * ((epochs - previous) * worst + costs.overhead())
        previous = epochs
    cuts = {(p.feature_set, f) for p, f, _ in chosen}
    return total + sum(costs.activation_pass(fs, f) for fs, f in cuts)


def _fine_tune_stage(
    setting: Setting, trials: Sequence[TrialFacts], costs: Costs, remaining_s: float
) -> Move | None:
    if not setting.fractions:
        return None
    fine = [t for t in trials if t.stage == FINE_TUNE and not widening.is_widening(t)]
    bracket = 0
    if fine:
        bracket = max(int(t.values.get("tuner/bracket", 0)) for t in fine)
        move = _bracket_move(setting, costs, fine, bracket, remaining_s)
        if move is not False:
            return move  # a Move, or None: this bracket's next trial waits or does not fit
        bracket += 1
    candidates = _candidates(setting, trials)
    if not candidates:
        return None
    # The longest schedule that fits one candidate, then as many candidates as fit it.
    full = rungs(setting.epochs, setting.eta)
    for count in range(len(full), 0, -1):
        steps = full[:count]
        size = 0
        while size < len(candidates) and (
            _bracket_cost(setting, costs, candidates[: size + 1], steps) <= remaining_s
        ):
            size += 1
        if size:
            parent, fraction, factor = candidates[0]
            return _start(
                setting, costs, parent, fraction, factor, bracket, size, count, 0, remaining_s
            )
    return None


def _bracket_move(
    setting: Setting,
    costs: Costs,
    fine: Sequence[TrialFacts],
    bracket: int,
    remaining_s: float,
) -> Move | None | bool:
    """The next trial of an open bracket; None when it must wait or does not fit; False when
    the bracket is complete."""
    size, steps, by_rung = _bracket(setting, fine, bracket)
    count = len(steps)
    candidates = _candidates(setting, costs.trials)
    if len(by_rung[0]) < size and candidates:
        parent, fraction, factor = candidates[0]
        return _start(
            setting,
            costs,
            parent,
            fraction,
            factor,
            bracket,
            size,
            count,
            len(by_rung[0]),
            remaining_s,
        )
    size = len(by_rung[0])  # fewer candidates than planned: halve what there is
    for rung in range(1, len(steps)):
        if len(by_rung[rung]) >= max(1, size // setting.eta**rung):
            continue
        below = by_rung[rung - 1]
        if any(t.status == "RUNNING" for t in below):
            return None  # promotion needs the whole rung below
        promoted = {str(t.values.get("tuner/trial_id")) for t in by_rung[rung]}
        ranked = export_order(
            setting, [t for t in below if t.done and t.trial_id not in promoted], _fewest_units
        )
        if not ranked:
            continue
        best = ranked[0]
        fraction, factor = best.fine_tune
        epochs = steps[rung] - steps[rung - 1]
        estimate = costs.fine_tune(best.feature_set, fraction, epochs, fresh=False)
        if estimate > remaining_s:
            return None
        return Move(
            FINE_TUNE,
            best.feature_set,
            estimate,
            f"fine-tune stage: bracket {bracket + 1}, rung {rung + 1}/{len(steps)} "
            f"(epochs {steps[rung - 1]} -> {steps[rung]}): continues trial {best.trial_id} "
            f"(val accuracy {best.score:.4f})",
            parent=best.trial_id,
            fraction=fraction,
            factor=factor,
            initial_epoch=steps[rung - 1],
            epochs=steps[rung],
            bracket=bracket,
            bracket_size=size,
            bracket_rungs=count,
        )
    return False


def _fewest_units(t: TrialFacts) -> tuple:
    """A fine-tune's simplicity as the export orders it: the fewest units trained (the
    smallest fraction), then the narrowest head."""
    return (t.fine_tune[0], int(t.values.get("head_width", 0)))


def _bracket(
    setting: Setting, fine: Sequence[TrialFacts], bracket: int
) -> tuple[int, list[int], list[list[TrialFacts]]]:
    """A bracket's planned size, its rungs (cumulative epochs) and its trials by rung."""
    members = [t for t in fine if int(t.values.get("tuner/bracket", 0)) == bracket]
    size = int(members[0].values.get("tuner/bracket_size", 1))
    steps = rungs(setting.epochs, setting.eta)[
        : int(members[0].values.get("tuner/bracket_rungs", 1))
    ]
    by_rung = [[t for t in members if int(t.values.get("tuner/epochs", 0)) == e] for e in steps]
    return size, steps, by_rung


def _start(
    setting: Setting,
    costs: Costs,
    parent: TrialFacts,
    fraction: float,
    factor: float,
    bracket: int,
    size: int,
    count: int,
    started: int,
    remaining_s: float,
) -> Move | None:
    """A rung-1 trial: ``parent`` (a frozen trial) fine-tuned for the first rung's epochs of
    a bracket of ``size`` candidates and ``count`` rungs."""
    steps = rungs(setting.epochs, setting.eta)[:count]
    estimate = costs.fine_tune(parent.feature_set, fraction, steps[0], fresh=True)
    if estimate > remaining_s:
        return None
    return Move(
        FINE_TUNE,
        parent.feature_set,
        estimate,
        f"fine-tune stage: bracket {bracket + 1}, candidate {started + 1}/{size}, rung "
        f"1/{len(steps)} ({steps[0]} epoch(s)): top {fraction:.0%} at lr x{factor:g} from "
        f"trial {parent.trial_id}",
        parent=parent.trial_id,
        fraction=fraction,
        factor=factor,
        epochs=steps[0],
        bracket=bracket,
        bracket_size=size,
        bracket_rungs=count,
    )


def _leftover(
    setting: Setting, trials: Sequence[TrialFacts], costs: Costs, remaining_s: float
) -> Move | None:
    """Time the stages did not use: the next feature set when its pass and heads fit, then
    more heads on the best feature set."""
    for fs in setting.feature_sets:
        if _heads_on(trials, fs) == 0 and _feature_set_cost(setting, costs, fs) <= remaining_s:
            move, _ = _head_move(setting, costs, fs, 0, f"time left: frozen stage on {fs.label}")
            return move
    front = _front(setting, trials)
    if not front:
        return None
    fs = front[0].feature_set
    done = _heads_on(trials, fs)
    if done >= EXTRA_HEADS * setting.head_trials:
        return None
    move, estimate = _head_move(
        setting, costs, fs, done, f"time left: head {done + 1} on {fs.label}"
    )
    return move if estimate <= remaining_s else None


def continuable(setting: Setting, trials: Sequence[TrialFacts]) -> set[str]:
    """Trials a later move may still continue from their checkpoints: frozen parents with
    fine-tunes left to try, every trial of a rung whose next rung is not full yet (the
    bracket's planned size: promotion may still take it), and the parents of running trials.
    The checkpoints of the others are only needed for an export (:mod:`tuner.engine.trial`)."""
    live = {t.values.get("tuner/trial_id") for t in trials if t.status == "RUNNING"}
    live |= {parent.trial_id for parent, _, _ in _candidates(setting, trials)}
    live |= widening.to_widen(setting, trials, _parents(setting, trials))
    fine = [t for t in trials if t.stage == FINE_TUNE]
    for bracket in {int(t.values.get("tuner/bracket", 0)) for t in fine} - {widening.WIDENING}:
        size, steps, by_rung = _bracket(setting, fine, bracket)
        for rung in range(len(steps) - 1):
            if len(by_rung[rung + 1]) < max(1, size // setting.eta ** (rung + 1)):
                live |= {t.trial_id for t in by_rung[rung]}
    return {str(t) for t in live if t}


def frozen_plan(setting: Setting, costs: Costs) -> list[tuple[FeatureSet, float, bool]]:
    """(feature set, its pass and heads' cost, whether the frozen stage's share affords it),
    cheapest first: the first always, the next while the running total fits."""
    share, spent, out = frozen_budget(setting), 0.0, []
    for position, fs in enumerate(setting.feature_sets):
        cost = _feature_set_cost(setting, costs, fs)
        fits = position == 0 or spent + cost <= share
        spent += cost if fits else 0.0
        out.append((fs, cost, fits))
    return out


def planned_sets(setting: Setting, trials: Sequence[TrialFacts]) -> list[FeatureSet]:
    """The feature sets the frozen stage plans to run (what a first pass computes ahead)."""
    return [fs for fs, _, fits in frozen_plan(setting, Costs(setting, trials)) if fits]


def plan_lines(setting: Setting, trials: Sequence[TrialFacts], remaining_s: float) -> list[str]:
    """The plan at this budget, for the user: which feature sets the frozen stage can
    afford and why, and what the fine-tune stage will do."""
    costs = Costs(setting, trials)
    share = frozen_budget(setting)
    lines = [
        f"plan for {format_seconds(remaining_s)} left of {format_seconds(setting.budget_s)} "
        f"({setting.images:,} train + validation images per backbone pass):",
        f"  frozen stage (up to {format_seconds(share)}): per backbone and size, cheapest "
        f"first, its pass then {setting.head_trials} heads "
        f"({math.ceil(setting.head_trials / 2)} linear, fitted exactly; the rest trained "
        f"to convergence)",
    ]
    spent = 0.0
    for fs, cost, fits in frozen_plan(setting, costs):
        source = "measured" if costs.measured(fs) else "estimated"
        verdict = "yes" if fits else "later, if time is left"
        lines.append(
            f"    {fs.label:<16} pass ~{format_seconds(costs.pass_seconds(fs))} ({source}) "
            f"+ heads ~{format_seconds(cost - costs.pass_seconds(fs))}: {verdict}"
        )
        if fits:
            spent += cost
    if setting.fractions:
        steps = rungs(setting.epochs, setting.eta)
        lines.append(
            f"  fine-tune stage (the rest, ~{format_seconds(max(remaining_s - spent, 0))}): "
            f"the frozen trials on the accuracy/latency front, top "
            f"{', '.join(f'{f:.0%}' for f in sorted(setting.fractions))} of blocks at lr x"
            f"{', x'.join(f'{f:g}' for f in setting.factors)}; successive halving over "
            f"{', '.join(map(str, steps))} epochs, as many candidates as the time affords"
        )
    else:
        lines.append("  no fine-tune stage (no finetune_fraction above 0, or frozen backbones)")
    return lines
