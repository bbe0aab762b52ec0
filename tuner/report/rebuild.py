"""A trial's model, rebuilt from its search's folder: the search's config and trials.csv, the
hypermodel the search used (the same split, settings and caches), and the trial's model as
the search trained it: its checkpoint assembled onto a freshly built model (its parents'
first, for a continued fine-tune), or retrained when the checkpoint is gone; and the refit of
a chosen configuration on train + validation (``export_best --refit``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from data_tools.errors import InputError
from tuner.report import evaluate
from tuner.report.card import refit_step


def most_recent_search(root: str | Path = "results") -> Path:
    """The results folder whose trials.csv changed last."""
    found = sorted(Path(root).glob("*/trials.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(
            f"no search results in {root}/: run python -m tuner.search first, or "
            f"pass --results results/NAME"
        )
    return found[-1].parent


def load_search(folder: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    if not (folder / "trials.csv").is_file() or not (folder / "config.yaml").is_file():
        raise InputError(
            f"{folder} is not a search's results folder (no trials.csv or "
            f"config.yaml): pass --results results/NAME"
        )
    from tuner.report.results import Results

    return yaml.safe_load((folder / "config.yaml").read_text()), Results(folder).rows()


def weights_argument(label: str) -> str | None:
    """The search's recorded weights label back to what the backbone constructors take."""
    return None if label.startswith("none") else label


def trial_model(folder: Path, row: pd.Series, config: dict[str, Any]):
    """(model, how it was obtained): its architecture rebuilt with its best-epoch checkpoint
    (kept for every trial: what it trained, on the frozen weights the rebuild loads:
    :mod:`tuner.model.checkpoint`); a whole model a search from before that format kept; else a
    retrain from its hyperparameters."""
    import keras

    from tuner.model import checkpoint

    saved = folder / "trials" / str(row["trial_id"]) / "model.keras"
    if saved.is_file():
        return keras.models.load_model(saved), f"loaded its checkpoint {saved}"
    trial_dir = folder / "keras_tuner" / f"trial_{row['trial_id']}"
    if not (trial_dir / "trial.json").is_file():
        raise InputError(
            f"trial {row['trial_id']} has neither a checkpoint nor Keras Tuner's "
            f"record ({trial_dir / 'trial.json'}): choose another trial or rerun the search"
        )
    maker, hp = trial_hypermodel(folder, row, config)
    # As the trial was built: in mixed precision when the search ran in it (the export
    # then makes it float32 and checks that it computes the same).
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(
        "mixed_float16" if config.get("mixed_precision") else "float32"
    )
    try:
        model = maker.build(hp)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    weights = checkpoint.find(trial_dir)
    if weights is not None:
        checkpoint.load(model, weights)
        return model, f"rebuilt it with its best-epoch weights {weights}"
    # A continued trial (a fine-tune, a promotion) is retrained from its lineage, as the
    # search ran it: each ancestor from its own checkpoint where it is kept, else retrained.
    _, trials = load_search(folder)
    model, _ = replay(maker, lineage(folder, row, trials), folder, refit=False)
    return model, "retrained it from its hyperparameters (its checkpoint was not kept)"


def trial_values(folder: Path, trial_id: str):
    """The trial's hyperparameters as Keras Tuner recorded them (``trial.json``)."""
    import keras_tuner as kt

    trial_json = folder / "keras_tuner" / f"trial_{trial_id}" / "trial.json"
    if not trial_json.is_file():
        raise InputError(
            f"trial {trial_id} has no Keras Tuner record ({trial_json}): choose another "
            f"trial or rerun the search"
        )
    return kt.HyperParameters.from_config(json.loads(trial_json.read_text())["hyperparameters"])


def trial_hypermodel(folder: Path, row: pd.Series, config: dict[str, Any]):
    """(the search's hypermodel over the train and validation rows, the trial's values)."""
    table, classes = evaluate.split_table(config, ("train", "validation"))
    maker = search_hypermodel(folder, config, table, classes)
    maker.batch_override = int(row["batch_size"])
    return maker, trial_values(folder, str(row["trial_id"]))


def search_hypermodel(folder: Path, config: dict[str, Any], table: pd.DataFrame, classes):
    """The search's hypermodel (its space, weights, cache folder and ``--feature-cache``
    setting: a retrain or refit trains as the search did) over ``table``'s rows."""
    from tuner.model import hypermodel, space

    cache_dir = config.get("cache_dir") or str(folder / "cache")  # --cache-dir, if given
    data = hypermodel.SplitData(table, classes, cache_dir=cache_dir)
    return hypermodel.EffNetHyperModel(
        space.load(None, config["space"]),
        data,
        weights_argument(config["weights"]),
        feature_cache=bool(config.get("feature_cache", True)),
    )


def lineage(folder: Path, row: pd.Series, trials: pd.DataFrame) -> list[tuple[pd.Series, Any]]:
    """The trial and the trials it continued (``tuner/trial_id``: a fine-tune from its
    frozen head, a promoted rung from the shorter one), first ancestor first, with values."""
    chain = []
    current = row
    while True:
        hp = trial_values(folder, str(current["trial_id"]))
        chain.append((current, hp))
        parent = str(hp.values.get("tuner/trial_id") or "")
        if not parent:
            return chain[::-1]
        found = trials[trials["trial_id"].astype(str) == parent]
        if found.empty:
            raise InputError(
                f"trial {current['trial_id']} continued trial {parent}, which "
                f"{folder / 'trials.csv'} does not hold: cannot replay its lineage"
            )
        current = found.iloc[0]


def refit(folder: Path, row: pd.Series, trials: pd.DataFrame, config: dict[str, Any], console):
    """(the model, facts): the trial's configuration trained again on train + validation.

    Each trial of its :func:`lineage` is replayed as the search ran it (same values, epochs,
    initial epoch, batch) but stops at the epoch that trial found best and keeps it; the
    next continues from those weights, as it continued from that best-epoch checkpoint. A
    linear head is fitted exactly again. The validation rows stay the hypermodel's validation
    split only because its code paths score one; nothing is chosen on them. Test rows never
    reach it (:class:`~tuner.model.hypermodel.SplitData` refuses them)."""
    import time

    from tuner.report.text import format_seconds

    chain = lineage(folder, row, trials)
    table, classes = evaluate.split_table(config, ("train", "validation"))
    both = pd.concat(
        [table.assign(type="train"), table[table["type"] == "validation"]], ignore_index=True
    )
    maker = search_hypermodel(folder, config, both, classes)
    started = time.monotonic()
    model, steps = replay(maker, chain, folder, refit=True)
    facts = {
        "train_rows": len(maker.data.train),
        "trials": steps,
        "seconds": time.monotonic() - started,
    }
    console.print(
        f"refit: {', then '.join(map(refit_step, steps))} on {facts['train_rows']:,} images "
        f"(train + validation) in {format_seconds(facts['seconds'])}"
    )
    return model, facts


def replay(maker, chain: list, folder: Path, refit: bool):
    """(the last model, its steps): a :func:`lineage` trained again link by link, each from
    the weights the link before it ended with, with its own values, epochs, initial epoch and
    batch. ``refit``: each link stops at the epoch its trial found best and keeps it (its
    validation rows are training rows); else each trains as in the search, keeping its best
    epoch, and a link whose checkpoint is kept is loaded instead of trained."""
    import tempfile

    from tuner.model import checkpoint

    steps = []
    with tempfile.TemporaryDirectory() as tmp:
        previous = None
        for link, hp in chain:
            maker.batch_override = int(link["batch_size"])
            model = maker.build(hp)
            kept = checkpoint.find(folder / "keras_tuner" / f"trial_{link['trial_id']}")
            if not refit and kept is not None:
                checkpoint.load(model, kept)
            else:
                if previous is not None:
                    model.load_weights(previous)
                initial = int(hp.values.get("tuner/initial_epoch", 0))
                epochs = hp.values.get("tuner/epochs")
                maker.stop_after = initial + int(link["best_epoch"]) if refit else None
                epochs = int(epochs) if epochs else None
                maker.fit(hp, model, epochs=epochs, initial_epoch=initial)
                steps.append(
                    {
                        "trial_id": str(link["trial_id"]),
                        "stage": maker.last_fit["plan"].stage or maker.last_fit["plan"].mode,
                        "solver": maker.last_fit["plan"].solver,
                        "epochs": int(maker.last_fit["epochs_run"]),
                    }
                )
            previous = Path(tmp) / f"{link['trial_id']}.weights.h5"
            model.save_weights(previous)
    return model, steps
