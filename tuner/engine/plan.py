"""What a budget buys, before spending it: ``python -m tuner.search ... --dry-run``.

The ``transfer`` strategy (:mod:`tuner.engine.strategy`) decides each next trial from what the
search measured. A dry run plays it forward without training: each trial "finishes" in the time the
strategy estimated for it, and the next decision sees it as measured. The costs come from this
machine (one timed batch of the cheapest backbone, as a search's own plan) or from a cost table
of another machine (``--costs FILE``):

    # seconds an image on the machine the search will run on
    decode: 0.0004        # read, decode and resize to every size a search uses (all cores)
    heads: {exact: 3.0, adam: 20.0}     # seconds a head trial (optional)
    backbones:            # at the backbone's native size (other sizes scale by pixels)
      B0: {pass: 3.1e-5, fine_tune: 1.4e-4}   # a frozen pass; an epoch of the whole network
      B3: {pass: 1.1e-4, fine_tune: 9.7e-4}

A fine-tune of the top fraction ``f`` of the blocks costs ``f`` times a whole-network epoch (it
runs on activations cached at its cut). Validation accuracy cannot be known before training,
so the play assumes that a bigger backbone scores higher and a longer fine-tune a little
higher again: the front then holds every feature set, which is what a budget must be planned
for. The dry run prints the stages (feature sets, passes, heads; fine-tune brackets, their
rungs and trials), the disk the caches need, and when the search is expected to end and why.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_tools.errors import InputError
from tuner.engine import costmodel, strategy, widening
from tuner.model import backbones
from tuner.report.text import format_seconds

MOST_TRIALS = 20_000  # a play longer than this is cut short (it says so)


@dataclass(frozen=True)
class CostTable:
    """Seconds an image for each backbone's frozen pass and whole-network fine-tune epoch at
    its native size, for decoding, and seconds a head trial."""

    passes: dict[str, float]
    fine_tunes: dict[str, float]
    decode: float = 0.0
    heads: dict[str, float] = field(default_factory=lambda: dict(costmodel.PRIOR_HEAD_SECONDS))
    source: str = ""

    def _scale(self, fs: costmodel.FeatureSet) -> float:
        return (fs.pixels / backbones.get(fs.backbone).size) ** 2

    def _per_image(self, costs: dict[str, float], fs: costmodel.FeatureSet, what: str) -> float:
        if fs.backbone not in costs:
            raise InputError(
                f"{self.source}: no {what} cost for {fs.backbone}: add it under backbones "
                f"(seconds an image), or drop {fs.backbone} from the space"
            )
        return costs[fs.backbone] * self._scale(fs)

    def forward_seconds(self, fs: costmodel.FeatureSet) -> float:
        """One image's forward pass through ``fs``'s backbone at its size."""
        return self._per_image(self.passes, fs, "pass")

    def pass_seconds(self, setting: costmodel.Setting, fs: costmodel.FeatureSet) -> float:
        """A feature set's passes, as if nothing shared them (the cost model charges a top
        whose stage features' sweep writes it nothing); the cheapest set also pays the one
        decode of every file (it shares it with the others)."""
        passes = fs.passes(setting.train_share) * setting.images
        seconds = self._per_image(self.passes, fs, "pass") * passes
        first = fs.plain() == setting.feature_sets[0].plain()
        return seconds + (self.decode * setting.images if first else 0.0)

    def epoch_seconds(self, setting: costmodel.Setting, fs: costmodel.FeatureSet, fraction: float):
        train = setting.images * setting.train_share
        return fraction * self._per_image(self.fine_tunes, fs, "fine_tune") * train

    def head_seconds(self, solver: str) -> float:
        return float(self.heads.get(solver, costmodel.PRIOR_HEAD_SECONDS[solver]))


def load_costs(path: str | Path) -> CostTable:
    """A cost table from its YAML file; one line naming the problem when it is not one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"--costs {path} cannot be read as YAML ({error})") from None
    rows = (data or {}).get("backbones") if isinstance(data, dict) else None
    if not isinstance(rows, dict) or not rows:
        raise InputError(
            f"--costs {path} has no 'backbones:' table: give seconds an image per backbone, "
            f"e.g. B0: {{pass: 3.1e-5, fine_tune: 1.4e-4}}"
        )
    try:
        return CostTable(
            passes={str(k): float(v["pass"]) for k, v in rows.items()},
            fine_tunes={str(k): float(v.get("fine_tune", math.inf)) for k, v in rows.items()},
            decode=float(data.get("decode", 0.0)),
            heads={k: float(v) for k, v in (data.get("heads") or {}).items()}
            or dict(costmodel.PRIOR_HEAD_SECONDS),
            source=f"--costs {path}",
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InputError(
            f"--costs {path}: every backbone needs a number for 'pass' (and 'fine_tune'): {error}"
        ) from None


def play(setting: costmodel.Setting) -> tuple[list[costmodel.Move], str]:
    """The strategy's trials for the whole budget, each finishing in its estimate; and why
    the search would end."""
    ranks = {fs.plain(): i for i, fs in enumerate(setting.feature_sets)}
    trials: list[costmodel.TrialFacts] = []
    moves: list[costmodel.Move] = []
    clock = 0.0
    while len(moves) < MOST_TRIALS:
        costs = costmodel.Costs(setting, trials)
        move = strategy.next_move(setting, trials, setting.budget_s - clock)
        if isinstance(move, str):
            return moves, move
        clock += move.estimate_s
        moves.append(move)
        trials.append(_finished(setting, costs, move, str(len(trials)), ranks, trials))
    return moves, f"the play stopped after {MOST_TRIALS:,} trials"


def _finished(setting, costs, move, trial_id, ranks, trials) -> costmodel.TrialFacts:
    """A trial of ``move`` as if it ran: its estimate as its time, an assumed score."""
    fs = move.feature_set
    overhead = costs.overhead()
    train = max(move.estimate_s - overhead, 0.0)
    base = 0.7 + 0.15 * ranks.get(fs.plain(), 0) / max(len(ranks) - 1, 1)  # 0.70..0.85
    latency = costs.forward_ms(fs)
    if move.stage == costmodel.PAIRED and move.partner is not None:
        parent = next(t for t in trials if t.trial_id == move.parent)
        values = {
            **parent.values,
            "partner": move.partner.backbone,
            "partner_features": move.partner.features,
        }
        # No gain assumed: the play cannot know what the second backbone's features add.
        score, passed, epochs = parent.score or base, 0.0, 1
        latency += costs.forward_ms(move.partner)
    elif move.stage == costmodel.FROZEN:
        first = not costs.measured(fs) and move.head_index == 0
        solver = "exact" if move.head_index < math.ceil(setting.head_trials / 2) else "adam"
        values = {"tuner/stage": costmodel.FROZEN, "head_width": 0 if solver == "exact" else 128}
        score = base + 0.002 * ((move.head_index * 0.618) % 1)  # heads differ a little
        passed, epochs = (costs.pass_seconds(fs) if first else 0.0), 1
    else:
        parent = next(t for t in trials if t.trial_id == move.parent)
        values = {
            "tuner/stage": costmodel.FINE_TUNE,
            "tuner/trial_id": move.parent,
            "tuner/epochs": move.epochs,
            "tuner/initial_epoch": move.initial_epoch,
            "tuner/bracket": move.bracket,
            "tuner/bracket_size": move.bracket_size,
            "tuner/bracket_rungs": move.bracket_rungs,
            "finetune_fraction": move.fraction,
            "finetune_lr_factor": move.factor,
        }
        score = (parent.score or base) + 0.01 * move.fraction * move.epochs / setting.epochs
        passed = costs.activation_pass(fs, move.fraction) if not move.initial_epoch else 0.0
        epochs = move.epochs - move.initial_epoch
    return costmodel.TrialFacts(
        trial_id=trial_id,
        status=costmodel.DONE,
        values=values,
        feature_set=fs,
        score=score,
        train_seconds=train,
        pass_seconds=passed,
        trial_seconds=move.estimate_s,
        latency_ms=latency,
        epochs_run=epochs,
    )


def summary(setting: costmodel.Setting, moves: list[costmodel.Move], why: str) -> list[str]:
    """The play as lines: per stage what runs and what it costs, then the expected end."""
    heads = Counter(m.feature_set.label for m in moves if m.stage == costmodel.FROZEN)
    head_time = Counter()
    for m in moves:
        if m.stage == costmodel.FROZEN:
            head_time[m.feature_set.label] += m.estimate_s
    tunes = [m for m in moves if m.stage == costmodel.FINE_TUNE and m.bracket != widening.WIDENING]
    widened = [m for m in moves if m.bracket == widening.WIDENING]
    total = sum(m.estimate_s for m in moves)
    lines = [f"dry run: {len(moves)} trials in ~{format_seconds(total)} of the budget"]
    frozen = sum(head_time.values())
    lines.append(
        f"  frozen stage and extra heads: {sum(heads.values())} trials, ~{format_seconds(frozen)}"
    )
    for label, count in heads.items():
        lines.append(f"    {label:<16} {count:>4} heads  ~{format_seconds(head_time[label])}")
    if tunes:
        brackets = len({m.bracket for m in tunes})
        by_set = Counter(m.feature_set.label for m in tunes)
        fractions: dict[str, set[float]] = {}
        for m in tunes:
            fractions.setdefault(m.feature_set.label, set()).add(m.fraction)
        epochs = Counter(m.epochs for m in tunes)
        lines.append(
            f"  fine-tune stage: {len(tunes)} trials in {brackets} bracket(s), "
            f"~{format_seconds(sum(m.estimate_s for m in tunes))}; trials by rung (epochs): "
            + ", ".join(f"{e}: {n}" for e, n in sorted(epochs.items()))
        )
        for label, count in by_set.items():
            tops = ", ".join(f"{f:.0%}" for f in sorted(fractions[label]))
            lines.append(f"    {label:<16} {count:>4} fine-tunes (top {tops})")
    else:
        lines.append("  fine-tune stage: none")
    if widened:
        lines.append(
            f"  widening: {len(widened)} trials, "
            f"~{format_seconds(sum(m.estimate_s for m in widened))}"
        )
        lines += [
            f"    {m.feature_set.label:<16} {m.why.removeprefix('widening: ')}" for m in widened
        ]
    lines.append(
        f"  expected end: after ~{format_seconds(total)} of {format_seconds(setting.budget_s)}: "
        f"{why}"
    )
    return lines


def with_table(setting: costmodel.Setting, table: CostTable | None) -> costmodel.Setting:
    return setting if table is None else dataclasses.replace(setting, table=table)


def setting_for(
    space, train_rows: int, validation_rows: int, budget_s: float, table: CostTable | None = None
) -> costmodel.Setting:
    """The strategy's view of a search: this machine's speed from one timed batch of the
    cheapest backbone, or ``table``'s costs."""
    from tuner.engine import oracle

    sets = oracle.feature_sets(space)
    rows = train_rows + validation_rows
    setting = oracle.make_setting(
        space,
        budget_s,
        rows,
        oracle.calibrate(sets[0]) if table is None else 0.0,
        finetunable=True,
        train_share=train_rows / max(rows, 1),
    )
    return with_table(setting, table)


def dry_run(
    space, train_rows: int, validation_rows: int, remaining_s: float, table, cache_budget, console
) -> int:
    """Print the plan for ``remaining_s`` of budget (the strategy's, played forward; the
    caches'); train nothing. Returns the exit code."""
    if space.algorithm != "transfer":
        raise InputError(
            f"--dry-run plays the transfer algorithm's plan; this search uses "
            f"{space.algorithm}: drop --algorithm {space.algorithm} (or --dry-run)"
        )
    setting = setting_for(space, train_rows, validation_rows, remaining_s, table)
    where = table.source if table else "this machine (one timed batch of the cheapest backbone)"
    console.print(f"costs from {where}", highlight=False)
    for line in strategy.plan_lines(setting, [], remaining_s):
        console.print(line, highlight=False)
    moves, why = play(setting)
    for line in summary(setting, moves, why):
        console.print(line, highlight=False)
    sets = planned_sets(setting)
    lines, _ = cache_lines(cache_budget, sets, [train_rows, validation_rows], space)
    for line in lines:
        console.print(line, highlight=False)
    return 0


def planned_sets(setting: costmodel.Setting, facts=()) -> list[tuple[str, int, str]]:
    """The (backbone, size, features) the transfer strategy's frozen stage plans to run in
    ``setting`` after the trials ``facts``: what a first sweep over the files computes ahead
    and what the cache plan sizes."""
    planned = strategy.planned_sets(setting, list(facts))
    return list(dict.fromkeys((fs.backbone, fs.pixels, fs.features) for fs in planned))


def first_set(space) -> list[tuple[str, int, str]]:
    """The space's first backbone at its first image size, with each kind of features it
    may read (stage features first, the wider): what a search of another algorithm than
    ``transfer`` plans its cache for."""
    from tuner.model.space import as_list

    choice = as_list(space.image_size)[0]
    entry = backbones.get(str(space.backbones[0]))
    size = entry.size if choice == "native" else int(choice)
    kinds = sorted(as_list(space.features), key=lambda kind: kind != "stages")
    seen = dict.fromkeys(backbones.features_read(entry, kind) for kind in kinds)
    return [(entry.name, size, kind) for kind in seen]


def cache_lines(cache_budget, sets: list[tuple[str, int, str]], splits: list[int], space=None):
    """(the cache plan's lines, the ``(backbone, size, kind)`` whose features fit) for the
    planned feature sets, sized as written (:meth:`tuner.model.backbones.Backbone.width`),
    and what the trials' checkpoints will take (:func:`checkpoint_line`)."""
    from tuner.model import disk

    entries = disk.plan_entries(
        [(b, size, kind, backbones.get(b).width(kind)) for b, size, kind in sets], splits
    )
    lines, fits = disk.plan_lines(cache_budget, entries)
    if space is not None:
        lines.append(checkpoint_line(space, sets))
    return lines, [s for s, e in zip(sets, entries, strict=True) if e.what in fits]


def checkpoint_line(space, sets: list[tuple[str, int, str]]) -> str:
    """What the trials' checkpoints (``keras_tuner/trial_*/``, beside the caches) will take:
    a frozen head's weights (the widest head on the widest planned features, float32), a
    fine-tune's unfrozen blocks (at most the backbone's weights), and which are kept."""
    from tuner.engine import oracle
    from tuner.model import disk
    from tuner.model.space import as_list

    widths = [int(w) for w in as_list(space.head_width) if isinstance(w, int | float)] or [1024]
    widest = max(sets, key=lambda s: backbones.get(s[0]).width(s[2]))
    values = backbones.get(widest[0]).width(widest[2])
    head = values * max(max(widths), 1) * 4
    line = (
        f"  checkpoints: what each trial trained, in keras_tuner/ (a frozen head's up to "
        f"{disk.format_bytes(head, up=True)}: a {max(widths)}-wide head on "
        f"{widest[0]} {widest[1]}px {widest[2]}"
    )
    fractions = oracle.fine_tune_fractions(space)
    tunable = [b for b, _, kind in sets if kind == "top" and backbones.get(b).finetunable]
    if fractions and tunable:
        largest = max(tunable, key=lambda b: backbones.get(b).params)
        whole = disk.format_bytes(4 * backbones.get(largest).params, up=True)
        line += (
            f"; a fine-tune's, its unfrozen blocks: under {whole} for {largest} at the top "
            f"{max(fractions):.0%}"
        )
    return (
        line + "); kept for the fronts, what the export's one-standard-error rule could "
        "ship (within 2 standard errors) and the trials a later one continues; the others "
        "are deleted as the search moves on"
    )


def plan_cache(model, cache_budget, sets, space, data, console=None) -> None:
    """Print what the caches will hold and whether it fits (one line and exit 2 when not even
    the first feature set's features fit); tell the hypermodel which passes the first sweep
    over the files computes ahead (the features that fit, and the activations at the cuts of
    the space's fine-tune fractions). ``console`` None: decide, print nothing (a worker)."""
    from tuner.engine import oracle

    splits = [len(data.train), len(data.validation)]
    lines, fits = cache_lines(cache_budget, sets, splits, space)
    for line in lines if console is not None else []:
        console.print(line, highlight=False)
    model.store.planned = fits
    model.store.cut_fractions = oracle.fine_tune_fractions(space)
