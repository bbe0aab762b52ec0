"""One trial, run by Keras Tuner: the budget gate, out-of-memory retries, timing, the record.

:func:`tuner_class` adds :class:`TrialRunner` to one of Keras Tuner's tuners (Hyperband,
BayesianOptimization, RandomSearch). The oracle still decides which hyperparameters come
next; the runner does the effects around each trial:

* before a trial: does the estimate fit in the budget left? If not, the search stops (the
  trial stays queued in the oracle and runs first when the search is resumed);
* while it trains: per-epoch progress, the budget checked at every epoch end, Ctrl-C/SIGTERM
  honoured at the next batch;
* out of memory: the batch is halved and the trial retried, down to ``min_batch_size``;
* after: inference latency and throughput, parameters, saved model bytes, one row in
  ``trials.csv`` (a failed trial gets a row too, with its reason).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import keras_tuner as kt
import tensorflow as tf
from rich.console import Console

from tuner.engine import adapter
from tuner.engine import budget as budget_mod
from tuner.model import checkpoint
from tuner.model.hypermodel import TrialPlan
from tuner.model.measure import device_name, measure_latency, model_file_bytes
from tuner.model.training import best_epoch
from tuner.report import tensorboard_log
from tuner.report.results import UNUSED, Results, exact_accuracy
from tuner.report.text import format_seconds
from tuner.report.wandb_log import WandbLogger


class BudgetExhausted(kt.errors.FatalError):
    """The budget cannot fit another trial: end the search normally."""


class Interrupted(kt.errors.FatalError):
    """Ctrl-C or SIGTERM: stop the running trial now; it is re-run on resume."""


class DiskFull(kt.errors.FatalError):
    """No space left for the results: stop; the files written so far stay valid (every
    write is write-then-rename) and the trial that could not be recorded runs on resume."""


class DataChanged(kt.errors.FatalError):
    """Images the search started from changed or went missing under it: stop with one line
    naming them (:class:`data_tools.errors.FilesChanged`); the trial that met them is
    discarded, not recorded as failed, and runs again on resume once they are restored."""


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass
class SearchContext:
    """What the runner needs beyond Keras Tuner: budget, results, progress, stop flags."""

    ledger: budget_mod.Ledger
    results: Results
    console: Console
    weights_label: str
    interrupt_requested: bool = False
    stopped_by_budget: bool = False
    trials_run: int = 0
    facts: dict[str, Any] = field(default_factory=dict)
    wandb: WandbLogger | None = None
    last_row: dict[str, Any] = field(default_factory=dict)
    role: str = "single"  # or "chief" / "worker" of a distributed search
    tensorboard: bool = True  # a run per finished trial under results/<name>/tensorboard

    def callbacks(self) -> list[keras.callbacks.Callback]:
        """Fresh per-fit callbacks (Keras Tuner deep-copies the ones passed to search)."""
        logged = self.wandb.keras_callbacks() if self.wandb else []
        return [BudgetGuard(self), EpochProgress(self), *logged]

    def record(self, row: dict[str, Any]) -> None:
        """A trial's row into trials.csv (and kept for its W&B summary)."""
        self.last_row = row
        self.results.upsert(row)


class BudgetGuard(keras.callbacks.Callback):
    """Stops training at the first epoch end past the deadline; raises on Ctrl-C/SIGTERM."""

    def __init__(self, context: SearchContext) -> None:
        super().__init__()
        self.context = context

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.context.interrupt_requested:
            raise Interrupted("interrupted")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.context.ledger.save()
        if self.context.ledger.remaining() <= 0:
            self.context.stopped_by_budget = True
            self.model.stop_training = True


class EpochProgress(keras.callbacks.Callback):
    """One line per epoch: losses, accuracies, seconds, budget left."""

    def __init__(self, context: SearchContext) -> None:
        super().__init__()
        self.context = context
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        total = self.params.get("epochs", "?")
        self.context.console.print(
            f"  epoch {epoch + 1}/{total}  loss {logs.get('loss', float('nan')):.4f}  "
            f"acc {logs.get('accuracy', float('nan')):.4f}  "
            f"val_loss {logs.get('val_loss', float('nan')):.4f}  "
            f"[bold]val_acc {logs.get('val_accuracy', float('nan')):.4f}[/bold]  "
            f"{time.monotonic() - self.started:.1f}s  "
            f"budget left {format_seconds(self.context.ledger.remaining())}",
            highlight=False,
        )


class TrialRunner(adapter.TunerHooks):
    """Mixin for a Keras Tuner tuner; see the module docstring."""

    context: SearchContext

    def run_trial(self, trial: kt.engine.trial.Trial, *args, **kwargs):
        ctx = self.context
        if ctx.interrupt_requested:
            raise Interrupted("interrupted")
        plan = self.hypermodel.plan(trial.hyperparameters)
        epochs = trial_epochs(trial.hyperparameters, self.hypermodel.space)
        estimate = trial_estimate(trial.hyperparameters, plan, epochs, ctx)
        # A worker's trials were admitted by the chief, which holds the budget.
        refusal = (
            None if ctx.role == "worker" else start_refusal(plan, epochs, estimate, ctx.ledger)
        )
        if refusal:
            raise BudgetExhausted(refusal)
        ctx.stopped_by_budget = False
        ctx.trials_run += 1
        self._announce(trial, plan, epochs, estimate)
        self._trial_started = time.monotonic()
        self._wandb_run_id = ""
        if ctx.wandb:
            self._wandb_run_id = ctx.wandb.start_trial(
                trial.trial_id, self._wandb_config(trial, plan, epochs), _tags(plan)
            )
        started = time.monotonic()
        try:
            result = super().run_trial(trial, *args, **kwargs)
        except kt.errors.FatalError:
            if ctx.wandb:  # interrupted: the run is reopened when the trial runs again
                ctx.wandb.finish_trial({"status": "interrupted"}, failed=True)
            raise
        except Exception as exc:  # noqa: BLE001 - any trial failure is recorded, search goes on
            if disk_full(exc):
                raise DiskFull(f"{failure_reason(exc)}: {getattr(exc, 'filename', '')}") from None
            changed = files_changed(exc)
            if changed:
                if ctx.wandb:
                    ctx.wandb.finish_trial({"status": "interrupted"}, failed=True)
                raise DataChanged(changed) from None
            reason = failure_reason(exc)
            ctx.console.print(f"  [red]trial {trial.trial_id} failed:[/red] {reason}")
            row = self._row(
                trial,
                self.hypermodel.plan(trial.hyperparameters),
                status="failed",
                reason=reason,
                train_seconds=time.monotonic() - started,
            )
            ctx.record(row)
            if ctx.wandb:
                ctx.wandb.finish_trial(row, failed=True)
            raise kt.errors.FailedTrialError(reason) from None
        if ctx.wandb:
            ctx.wandb.finish_trial(ctx.last_row, failed=False)
        return result

    def _wandb_config(self, trial, plan: TrialPlan, epochs: int) -> dict[str, Any]:
        """Every hyperparameter plus the derived facts W&B users filter and group by."""
        facts = self.context.facts
        return {
            **asdict(plan),
            **trial.hyperparameters.values,
            "trial_id": trial.trial_id,
            "epochs": epochs,
            "weights": self.context.weights_label,
            "classes": facts.get("classes"),
            "split_counts": facts.get("split_counts"),
            "space_file": facts.get("space_file"),
            "search": facts.get("name"),
        } | {name: UNUSED for name in plan.unused()}

    def checkpoint_file(self, trial_id: str) -> str:
        return os.path.join(self.get_trial_dir(trial_id), checkpoint.FILE)

    def build_model(self, hp: kt.HyperParameters) -> keras.Model:
        """The trial's model; a continued trial (``tuner/trial_id``: a Hyperband or transfer
        continuation) starts from its parent's best-epoch checkpoint, assembled onto the
        freshly built model (:mod:`tuner.model.checkpoint`)."""
        model = self.plain_build(hp)  # not Hyperband's: it loads whole parent models
        parent = hp.values.get("tuner/trial_id")
        if parent:
            with kt.engine.tuner.maybe_distribute(self.distribution_strategy):
                checkpoint.load(model, self.checkpoint_of(parent))
        return model

    def checkpoint_of(self, trial_id: str) -> str:
        """A trial's checkpoint to read: ours, else Keras Tuner's whole-model ``.h5`` of a
        search from before this format (:func:`checkpoint.find`)."""
        found = checkpoint.find(self.get_trial_dir(trial_id))
        return str(found) if found is not None else self.checkpoint_file(trial_id)

    def load_model(self, trial: kt.engine.trial.Trial) -> keras.Model:
        model = self.try_build(trial.hyperparameters)
        with kt.engine.tuner.maybe_distribute(self.distribution_strategy):
            checkpoint.load(model, self.checkpoint_of(trial.trial_id))
        return model

    def build_and_fit(self, trial: kt.engine.trial.Trial, *args, **kwargs):
        hp = trial.hyperparameters
        self.hypermodel.batch_override = None
        # Keras Tuner's best-epoch checkpoint writes what the trial trains, not the backbone.
        whole = not self.hypermodel.plan(hp).pretrained
        kwargs["callbacks"] = adapter.save_trained(kwargs.get("callbacks", []), whole)
        while True:
            keras.backend.clear_session()  # free the previous trial's graphs and memory
            model = self.try_build(hp)
            started = time.monotonic()
            try:
                results = self.hypermodel.fit(hp, model, *args, **kwargs)
                break
            except tf.errors.ResourceExhaustedError:
                plan = self.hypermodel.plan(hp)
                half = plan.batch_size // 2
                if half < self.hypermodel.space.min_batch_size:
                    raise kt.errors.FailedTrialError(
                        f"out of memory at batch size {plan.batch_size} (the floor is "
                        f"{self.hypermodel.space.min_batch_size})"
                    ) from None
                self.context.console.print(
                    f"  out of memory at batch {plan.batch_size}: retrying at {half}"
                )
                self.hypermodel.batch_override = half
                adapter.forget_best_epoch(kwargs.get("callbacks", []))
        train_seconds = time.monotonic() - started
        row = self._record_completed(trial, model, train_seconds)
        # What the transfer oracle budgets by (other oracles ignore them).
        fit = self.hypermodel.last_fit
        return {
            **results,
            "val_accuracy": row["val_accuracy"],  # the objective, as a count: ties are ties
            "train_seconds": train_seconds,
            "pass_seconds": fit.get("pass_seconds", 0.0),
            "ahead_seconds": fit.get("ahead_seconds", 0.0),
            "trial_seconds": time.monotonic() - getattr(self, "_trial_started", started),
            "latency_ms": row["latency_ms"],
            "latency_spread_ms": row["latency_spread_ms"],
            "epochs_run": fit["epochs_run"],
        }

    def _record_completed(self, trial, model: keras.Model, train_seconds: float) -> dict:
        fit = self.hypermodel.last_fit
        plan: TrialPlan = fit["plan"]
        # One figure per architecture: trials that differ only in training share it. The
        # trial keeps its checkpoint (what it trained), not a whole model: the model's file
        # is written once per architecture, to be measured.
        results = self.context.results
        known = results.architecture_facts(
            plan.backbone,
            plan.image_size,
            plan.head_width,
            plan.features,
            plan.partner,
            plan.partner_features,
        )
        if known is None:
            latency_ms, images_per_s, spread_ms = measure_latency(model, plan.image_size)
            model_bytes = model_file_bytes(model, results.trial_dir(trial.trial_id))
        else:
            latency_ms, images_per_s = known["latency_ms"], known["images_per_s"]
            spread_ms, model_bytes = known["latency_spread_ms"], known["model_bytes"]
        metrics = _best_epoch(fit["history"], len(self.hypermodel.data.validation))
        status = "stopped-budget" if self.context.stopped_by_budget else "completed"
        row = self._row(
            trial,
            plan,
            status=status,
            train_seconds=train_seconds,
            **metrics,
            epochs=fit["epochs_run"],
            latency_ms=latency_ms,
            latency_spread_ms=spread_ms,
            images_per_s=images_per_s,
            params=model.count_params(),
            model_bytes=model_bytes,
            unfrozen_blocks=" ".join(fit.get("unfrozen_blocks", [])),
            augment_path=", ".join(fit.get("augment_path", [])),
            cache_notes="; ".join(fit.get("cache_notes", [])),
        )
        self.context.record(row)
        if self.context.tensorboard:
            tensorboard_log.write_trial(results.dir, row, fit["history"])
        augmented = f", augmented: {row['augment_path']}" if row["augment_path"] else ""
        augmented += f"; cache: {row['cache_notes']}" if row["cache_notes"] else ""
        self.context.console.print(
            f"  done: val_acc {metrics['val_accuracy']:.4f} in "
            f"{format_seconds(train_seconds)}, {latency_ms:.2f} ms/image, "
            f"{status}{augmented}",
            highlight=False,
        )
        return row

    def _row(self, trial, plan: TrialPlan, **values: Any) -> dict[str, Any]:
        hp = trial.hyperparameters.values
        row = {
            "trial_id": trial.trial_id,
            **asdict(plan),
            "weights": self.context.weights_label,
            "device": device_name(),
            "stage": plan.shown_stage,
            "hyperband_epochs": hp.get("tuner/epochs", ""),
            "resumed_from": hp.get("tuner/trial_id", ""),
            "wandb_run_id": getattr(self, "_wandb_run_id", ""),
            "worker": self.tuner_id,
            **values,
        }
        row.pop("pretrained", None)
        # trials.csv's epochs is what ran (the cost model reads it); the card marks it.
        row.update({k: UNUSED for k in plan.unused() if k in row and k != "epochs"})
        return row

    def _announce(self, trial, plan: TrialPlan, epochs: int, estimate: float | None) -> None:
        tune = (
            f"fine-tune top {plan.finetune_fraction:.0%} at lr x{plan.finetune_lr_factor:g}"
            if plan.fine_tunes
            else plan.mode.replace("-", " ")
        )
        guess = f", about {format_seconds(estimate)}" if estimate else ""
        stage = f"{plan.shown_stage}: " if plan.shown_stage else ""
        self.context.console.rule(
            f"trial {self.context.trials_run} (id {trial.trial_id}): {stage}{plan.backbone}"
            f"{' + ' + plan.partner if plan.partner else ''} {plan.image_size}px batch "
            f"{plan.batch_size}"
        )
        why = trial.hyperparameters.values.get("tuner/why")
        if why:
            self.context.console.print(f"  {why}", highlight=False)
        if plan.solver == "exact":
            head = f"linear head fitted by Newton-CG, l2 {plan.l2:.1e}"
            length = "to convergence"
        else:
            head = (
                f"head {plan.head_width or 'linear'}, dropout {plan.dropout:g}, lr "
                f"{plan.learning_rate:.2e}, l2 {plan.l2:.1e}"
            )
            length = (
                f"up to {epochs} epochs (early stopping)"
                if plan.stage == "frozen"
                else f"{epochs} epochs"
            )
        if plan.augment != "none":
            cached = plan.augment_views > 1 and self.hypermodel.store.uses_cache(plan)
            views = f", {plan.augment_views} views" if cached else ""
            tune += f", augment {plan.augment}{views}"
        self.context.console.print(
            f"  {head}, {tune}, class weight {plan.class_weight}; {length}{guess}; budget "
            f"left {format_seconds(self.context.ledger.remaining())}",
            highlight=False,
        )


def trial_epochs(hp: kt.HyperParameters, space) -> int:
    """Epochs this trial trains (at most): ``tuner/epochs - tuner/initial_epoch`` for a
    continued trial, ``head_epochs`` for a frozen-stage head, else the space's ``epochs``."""
    values = hp.values
    if values.get("tuner/stage") == "frozen":
        return space.head_epochs
    total = int(values.get("tuner/epochs", space.epochs))
    return total - int(values.get("tuner/initial_epoch", 0))


def start_refusal(
    plan: TrialPlan, epochs: int, estimate: float | None, ledger: budget_mod.Ledger
) -> str | None:
    """Why the trial cannot start within the budget (None when it can): no time left, or
    the ``estimate`` from earlier trials of its backbone and size says it would not finish."""
    remaining = ledger.remaining()
    if budget_mod.can_start(estimate, remaining):
        return None
    needs = f"needs about {format_seconds(estimate)}" if estimate else "cannot start"
    return (
        f"budget left {format_seconds(remaining)}; the next trial "
        f"({plan.backbone} at {plan.image_size}px, {epochs} epochs) {needs}"
    )


def chief_refusal(hypermodel, hp: kt.HyperParameters, ctx: SearchContext) -> str | None:
    """:func:`start_refusal` for a trial the chief's oracle is about to hand out."""
    plan = hypermodel.plan(hp)
    epochs = trial_epochs(hp, hypermodel.space)
    return start_refusal(plan, epochs, trial_estimate(hp, plan, epochs, ctx), ctx.ledger)


def trial_estimate(
    hp: kt.HyperParameters, plan: TrialPlan, epochs: int, ctx: SearchContext
) -> float | None:
    """Seconds the trial should take: the transfer oracle's estimate, else from finished
    trials of the same backbone, size and mode (frozen heads and fine-tunes cost per epoch
    what the other never does)."""
    if "tuner/estimate_s" in hp.values:
        return float(hp.values["tuner/estimate_s"])
    fraction = plan.finetune_fraction if plan.pretrained else UNUSED  # all of it trains
    history = ctx.results.history(plan.backbone, plan.image_size, fraction)
    return budget_mod.estimate_seconds(history, epochs)


def _tags(plan: TrialPlan) -> list[str]:
    return [plan.backbone, plan.mode]


def tuner_class(algorithm: str) -> type:
    """The Keras Tuner class for ``algorithm`` with :class:`TrialRunner` mixed in."""
    from tuner.engine.oracle import TransferTuner

    base = {
        "transfer": TransferTuner,
        "hyperband": kt.Hyperband,
        "bayesian": kt.BayesianOptimization,
        "random": kt.RandomSearch,
    }[algorithm]
    return type(f"Budgeted{base.__name__}", (TrialRunner, base), {})


def _best_epoch(history: dict[str, list[float]], validation_count: int) -> dict[str, float]:
    """The best epoch's numbers; its validation accuracy as the fraction of the validation
    images it got right (:func:`~tuner.report.results.exact_accuracy`)."""
    best = best_epoch(history)
    return {
        "val_accuracy": exact_accuracy(history["val_accuracy"][best], validation_count),
        "val_loss": history["val_loss"][best],
        "train_accuracy": history["accuracy"][best],
        "train_loss": history["loss"][best],
        "best_epoch": best + 1,
    }


def files_changed(exc: BaseException) -> str:
    """The one line when a trial failed because the images it read changed or went missing
    during the search (what it raised, or a check of every file it started from, made
    after any other failure: a file deleted mid-decode fails inside TensorFlow), else ''."""
    from data_tools import pipeline
    from data_tools.errors import FilesChanged

    if isinstance(exc, FilesChanged):
        return str(exc)
    try:
        pipeline.check_expected()
    except FilesChanged as changed:
        return str(changed)
    return ""


def failure_reason(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
