"""A trial's plan (:class:`TrialPlan`: what its values and the backbone table decide) and the
facts its fit leaves (:class:`FitFacts`: what the trial's record says about how it trained)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tuner.model import augment as augment_mod

# Without a GPU the backbone pass gains nothing from bigger batches (32-256 within noise, B0
# on 2 cores) and each one costs memory.
CPU_PASS_BATCH = 64
STAGES = ("frozen", "fine-tune")  # of transfer trials; other algorithms' trials have none
# A frozen linear head on two backbones' features at once (widening): fitted as a frozen
# trial (its ``tuner/stage`` is frozen), recorded and shown as this stage.
PAIRED = "paired"


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial's values and the backbone table decide, as plain data."""

    backbone: str
    image_size: int
    batch_size: int  # training (head, fine-tune, end to end)
    head_width: int
    dropout: float
    learning_rate: float
    finetune_fraction: float
    finetune_lr_factor: float
    class_weight: str
    pretrained: bool
    l2: float = 0.0
    augment: str = (
        augment_mod.NONE
    )  # the train split's augmentation policy (tuner/model/augment.py)
    augment_views: int = 1  # views of each train image in a cached trial (1: not augmented)
    pass_batch: int = CPU_PASS_BATCH  # the backbone's forward passes (features, activations)
    stage: str = ""  # "frozen" / "fine-tune" for transfer trials
    solver: str = "adam"  # "exact": a linear head fitted exactly on cached features
    features: str = "top"  # what the head sees: "top" or "stages" (backbones.with_stages)
    # A paired head (widening): a second backbone, run at this plan's image size, whose
    # features ("top" or "stages") the head reads after the first's; "" for none.
    partner: str = ""
    partner_features: str = ""

    def partner_plan(self) -> TrialPlan:
        """The plan of the partner's branch, as its own frozen trial (its features' cache
        entries are that trial's)."""
        return replace(
            self,
            backbone=self.partner,
            features=self.partner_features,
            partner="",
            partner_features="",
        )

    @property
    def shown_stage(self) -> str:
        """The stage trials.csv and the trial line give: :data:`PAIRED` for a paired head,
        else ``stage``."""
        return PAIRED if self.partner else self.stage

    @property
    def fine_tunes(self) -> bool:
        return self.pretrained and self.finetune_fraction > 0

    @property
    def mode(self) -> str:
        """``fine-tuned``, ``frozen`` (pretrained backbone) or ``whole-network`` (random init)."""
        if not self.pretrained:
            return "whole-network"
        return "fine-tuned" if self.fine_tunes else "frozen"

    def unused(self) -> tuple[str, ...]:
        """The hyperparameters that did nothing in this trial, which trials.csv, W&B and
        the model card mark :data:`UNUSED`: an exact linear head takes no learning rate,
        dropout or epochs; a trial that does not fine-tune has no phase-2 rate factor (and a
        random-init one no fraction: it trains everything); views need augmentation; a
        head that is not paired has no partner."""
        names = []
        if self.solver == "exact":
            names += ["dropout", "learning_rate", "epochs"]
        if not self.pretrained or self.features == "stages":
            names.append("finetune_fraction")  # a head on stage features stays frozen
        if not self.fine_tunes:
            names.append("finetune_lr_factor")
        if not augment_mod.is_on(self.augment):
            names.append("augment_views")
        if not self.partner:
            names += ["partner", "partner_features"]
        return tuple(names)


class FitFacts(dict[str, Any]):
    """What one ``fit`` did, read by the trial's record (trials.csv, the trial line):

    ``pass_seconds`` / ``ahead_seconds`` (backbone passes for this trial's feature set, and
    for others in the same sweep), ``cache`` ("loaded"/"computed" per entry read),
    ``cache_notes`` (what the cache budget changed), ``augment_path``, ``unfrozen_blocks``,
    ``activation_cut``, ``solver_iterations`` / ``solver_seconds`` (an exact linear head),
    and at the end ``history``, ``epochs_run`` and ``plan``."""

    def __init__(self) -> None:
        super().__init__(pass_seconds=0.0, ahead_seconds=0.0)

    def note(self, text: str) -> None:
        """A line of what the cache budget changed in this fit (the trial line says it)."""
        self.setdefault("cache_notes", []).append(text)

    def augmented(self, plan: TrialPlan, path: str) -> None:
        """Records how this fit augments (a trial line and trials.csv say it)."""
        if augment_mod.is_on(plan.augment):
            paths = self.setdefault("augment_path", [])
            if path not in paths:
                paths.append(path)
