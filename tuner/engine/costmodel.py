"""What the ``transfer`` strategy (:mod:`tuner.engine.strategy`) decides from: feature sets,
the facts of finished trials, the search's setting, the move it returns, and the cost model
(:class:`Costs`: what a pass, a head and a fine-tune epoch cost, measured by this search, else
estimated from the backbone table's FLOPs and a calibration)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from tuner.model import backbones, trial_plan

FROZEN, FINE_TUNE = "frozen", "fine-tune"
PAIRED = trial_plan.PAIRED  # a frozen linear head with a partner (widening)
DONE = "COMPLETED"

# Before anything is measured on this device: seconds a head trial takes beyond its pass.
PRIOR_HEAD_SECONDS = {"exact": 5.0, "adam": 30.0}
PRIOR_OVERHEAD_SECONDS = 2.0  # latency, saving, the record


@dataclass(frozen=True)
class FeatureSet:
    """A (backbone, image size, augmentation) triple: one backbone pass over the images (and
    over ``views - 1`` augmented views of the train split) serves all its heads. ``choice``
    is the space's image-size value (``"native"`` or a number as text)."""

    backbone: str
    choice: str
    pixels: int
    augment: str = "none"
    views: int = 1
    features: str = "top"  # "stages": the top stages' pooled outputs too (frozen heads only)

    @property
    def label(self) -> str:
        views = f" +{self.augment} x{self.views}" if self.views > 1 else ""
        stages = " stages" if self.features == "stages" else ""
        return f"{self.backbone} {self.pixels}px{stages}{views}"

    @property
    def finetunable(self) -> bool:
        """Whether its heads can be fine-tuned: not on stage features, nor a hub module's."""
        return self.features == "top" and backbones.get(self.backbone).finetunable

    def plain(self) -> FeatureSet:
        """The same backbone, size and features, not augmented (whose pass gives view 0)."""
        return dataclasses.replace(self, augment="none", views=1)

    def passes(self, train_share: float = 0.9) -> float:
        """Backbone passes over train + validation its features cost, from nothing."""
        return 1 + train_share * (self.views - 1)

    def gflops(self) -> float:
        entry = backbones.get(self.backbone)
        return entry.gflops * (self.pixels / entry.size) ** 2


@dataclass(frozen=True)
class TrialFacts:
    """One trial of the search, as the strategy sees it."""

    trial_id: str
    status: str  # Keras Tuner's: RUNNING, COMPLETED, FAILED, INVALID ...
    values: dict
    feature_set: FeatureSet
    score: float | None = None  # validation accuracy
    train_seconds: float | None = None  # building and fitting
    pass_seconds: float = 0.0  # the part of it spent in its own feature set's backbone passes
    trial_seconds: float | None = None  # wall clock, records included
    latency_ms: float | None = None
    latency_spread_ms: float | None = None  # its timed runs' IQR: closer latencies are ties
    epochs_run: int = 0
    ahead_seconds: float = 0.0  # the part spent in passes of other feature sets, ahead of them

    @property
    def stage(self) -> str:
        """``frozen``, ``fine-tune``, or :data:`PAIRED` (a frozen head with a ``partner``)."""
        if self.values.get("partner"):
            return PAIRED
        return str(self.values.get("tuner/stage", ""))

    @property
    def partner(self) -> FeatureSet | None:
        """A paired head's second feature set (at the first's size, not augmented), else
        None."""
        name = str(self.values.get("partner") or "")
        if not name:
            return None
        kind = str(self.values.get("partner_features") or "top")
        fs = self.feature_set
        return FeatureSet(name, str(fs.pixels), fs.pixels, features=kind)

    @property
    def done(self) -> bool:
        return self.status == DONE and self.score is not None

    @property
    def solver(self) -> str:
        return "exact" if int(self.values.get("head_width", 0)) == 0 else "adam"

    @property
    def fine_tune(self) -> tuple[float, float]:
        return (
            float(self.values.get("finetune_fraction", 0)),
            float(self.values.get("finetune_lr_factor", 0)),
        )


@dataclass(frozen=True)
class Setting:
    """What the strategy needs of the search space and the search."""

    feature_sets: tuple[FeatureSet, ...]
    fractions: tuple[float, ...]  # non-zero fine-tune fractions (empty: no fine-tune stage)
    factors: tuple[float, ...]
    head_trials: int
    frozen_share: float
    epochs: int  # the longest fine-tune
    eta: int  # successive halving's factor
    budget_s: float
    images: int  # train + validation: what a pass runs over
    seconds_per_gflop: float  # calibration: pass seconds per GFLOP of one image, x images
    train_share: float = 0.9  # of those images, the train split's (augmented views: train only)
    # A cost table (:class:`tuner.engine.plan.CostTable`): per-image costs of another machine, what
    # a dry run plans from instead of this machine's calibration.
    table: object | None = None

    @property
    def validation_count(self) -> int:
        """Validation images (the share of ``images`` that is not train)."""
        return round(self.images * (1.0 - self.train_share))

    def shares_pass(self, fs: FeatureSet) -> bool:
        """Whether ``fs``'s pass comes free with another set's: the pooled top of a backbone
        and size whose stage features are searched too (stages come first, and their one
        forward writes the top's features as well)."""
        twin = dataclasses.replace(fs, features="stages")
        return fs.features == "top" and fs.views == 1 and twin in self.feature_sets


@dataclass(frozen=True)
class Move:
    """The next trial: what it is, what it should cost, and why."""

    stage: str
    feature_set: FeatureSet
    estimate_s: float
    why: str
    head_index: int = 0  # frozen: the k-th head on its feature set
    parent: str | None = None  # fine-tune: the trial whose checkpoint it continues
    fraction: float = 0.0
    factor: float = 0.0
    initial_epoch: int = 0
    epochs: int = 0
    bracket: int = 0
    bracket_size: int = 0
    bracket_rungs: int = 0
    partner: FeatureSet | None = None  # paired: the second feature set the head reads


@dataclass
class Costs:
    """Measured costs of this search, with the calibrated table as the fallback."""

    setting: Setting
    trials: Sequence[TrialFacts]
    _pass: dict[FeatureSet, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in self.trials:
            if t.stage == FROZEN and t.pass_seconds > 0:
                self._pass.setdefault(t.feature_set, t.pass_seconds)

    def pass_seconds(self, fs: FeatureSet) -> float:
        """The passes a feature set's first trial pays: the images' (unless paid already by
        its un-augmented twin, or by its stage features' sweep: :meth:`Setting.shares_pass`)
        and, augmented, ``views - 1`` passes over the train split."""
        if fs in self._pass:
            return self._pass[fs]
        if fs.views > 1:
            plain = fs.plain()
            base = self._whole_pass(plain)
            extra = base * self.setting.train_share * (fs.views - 1)
            paid = self.measured(plain) or self.setting.shares_pass(plain)
            return extra + (0.0 if paid else base)
        return 0.0 if self.setting.shares_pass(fs) else self._whole_pass(fs)

    def _whole_pass(self, fs: FeatureSet) -> float:
        """One un-augmented pass of ``fs`` over the images, as if nothing shared it."""
        if fs in self._pass:
            return self._pass[fs]
        if self.setting.table is not None:
            return self.setting.table.pass_seconds(self.setting, fs)
        rates = [
            s / (f.gflops() * self.setting.images) for f, s in self._pass.items() if f.views == 1
        ]
        rate = statistics.median(rates) if rates else self.setting.seconds_per_gflop
        return rate * fs.gflops() * self.setting.images

    def forward_ms(self, fs: FeatureSet) -> float:
        """One image's forward pass through ``fs``'s backbone, in milliseconds: the cost
        table's pass, else the calibrated seconds per GFLOP. What the dry run's play takes as
        a trial's latency, which it cannot measure (the strategy's front reads the ratios
        between feature sets)."""
        if self.setting.table is not None:
            return 1000 * self.setting.table.forward_seconds(fs)
        return 1000 * self.setting.seconds_per_gflop * fs.gflops()

    def measured(self, fs: FeatureSet) -> bool:
        return fs in self._pass or any(
            t.stage == FROZEN and t.feature_set == fs and t.done for t in self.trials
        )

    def overhead(self) -> float:
        gaps = [
            t.trial_seconds - t.train_seconds
            for t in self.trials
            if t.done and t.trial_seconds is not None and t.train_seconds is not None
        ]
        return statistics.median(gaps) if gaps else PRIOR_OVERHEAD_SECONDS

    def head_seconds(self, solver: str, views: int = 1) -> float:
        """A head trial beyond its pass, records included. A linear head is fitted to every
        augmented view (``views`` times the rows); Adam sees one view an image an epoch."""
        spent: dict[int, list[float]] = {}
        for t in self.trials:
            if t.stage == FROZEN and t.done and t.solver == solver and t.train_seconds:
                head = t.train_seconds - t.pass_seconds - t.ahead_seconds
                spent.setdefault(t.feature_set.views, []).append(head)
        scale = 1.0 if solver == "adam" else float(views)
        if views in spent:
            base = statistics.median(spent[views])
        elif spent:
            known = min(spent)
            base = statistics.median(spent[known]) * (scale / (1 if solver == "adam" else known))
        else:
            table = self.setting.table
            base = (table.head_seconds(solver) if table else PRIOR_HEAD_SECONDS[solver]) * scale
        return base + self.overhead()

    def epoch_seconds(self, fs: FeatureSet, fraction: float) -> float:
        """One fine-tune epoch of the top ``fraction`` on cached activations: measured, or
        scaled by the fraction from another fraction measured on ``fs``, or estimated."""
        measured: dict[float, list[float]] = {}
        for t in self.trials:
            if (
                t.stage == FINE_TUNE
                and t.done
                and t.feature_set == fs
                and t.epochs_run > 0
                and t.train_seconds
            ):
                per_epoch = (t.train_seconds - t.pass_seconds - t.ahead_seconds) / t.epochs_run
                measured.setdefault(t.fine_tune[0], []).append(per_epoch)
        if fraction in measured:
            return statistics.median(measured[fraction])
        if measured:
            known = min(measured, key=lambda f: abs(f - fraction))
            return statistics.median(measured[known]) * fraction / known
        if self.setting.table is not None:
            return self.setting.table.epoch_seconds(self.setting, fs, fraction)
        # Forward and backward through the top, over the train split (one view of each
        # image): about 3x its share of a forward pass.
        return 3 * fraction * self.pass_seconds(fs.plain()) * self.setting.train_share

    def fine_tune(self, fs: FeatureSet, fraction: float, epochs: int, fresh: bool) -> float:
        """A fine-tune trial of ``epochs`` epochs of the top ``fraction``: a ``fresh`` one (from
        a frozen parent) pays its cut's activation pass, a continued one does not."""
        passed = self.activation_pass(fs, fraction) if fresh else 0.0
        return epochs * self.epoch_seconds(fs, fraction) + passed + self.overhead()

    def activation_pass(self, fs: FeatureSet, fraction: float) -> float:
        """The pass that caches the activations at this fraction's cut (0 once done)."""
        done = any(
            t.stage == FINE_TUNE and t.feature_set == fs and t.fine_tune[0] == fraction
            for t in self.trials
            if t.status in (DONE, "RUNNING")
        )
        return 0.0 if done else (1 - fraction) * self.pass_seconds(fs)
