"""Export the model to ship: Pareto front, a trade-off rule, one test evaluation, deployables.

    python -m tuner.export_best                        # the most recent search, knee rule
    python -m tuner.export_best --results results/NAME --rule max-accuracy --max-latency-ms 5
    python -m tuner.export_best --rule weighted --weight -0.07 --target-ms 10 --tflite

1. The Pareto front of the finished trials (val accuracy up, time down; ``--time training``
   uses training time instead of latency) is printed with the chosen trial marked and the
   reason (rules: :mod:`tuner.report.choose`).
2. The chosen trial's model is rebuilt with its best-epoch checkpoint (what the trial
   trained, on the same frozen weights: :mod:`tuner.model.checkpoint`), or loaded whole from
   ``trials/<id>/model.keras`` for a search from before that format, or, when neither is
   there, retrained from its hyperparameters; the output says which.
3. It is evaluated once on the test split, which nothing read before: accuracy, loss,
   balanced accuracy, per-class precision/recall/F1 and the confusion matrix
   (scikit-learn), and its latency on this device.
4. ``results/<name>/best/`` (or ``--out``): ``model.keras``; ``saved_model/`` whose
   ``serving_default`` signature takes raw ``uint8`` RGB images of any size (resizing and
   preprocessing inside) and returns class probabilities; ``model.tflite`` with
   ``--tflite`` (checked against Keras on the test images); ``labels.txt``; ``metrics.json``;
   ``model_card.md``; ``pareto.png`` with the exported trial starred (the search's own
   ``pareto.png`` is redrawn so too). The folder is written beside and renamed into place
   at the end.
   A trial trained in mixed precision (the GPU default) is exported in float32: the same
   weights, every layer float32, checked against the trial's own outputs on the validation
   images (nothing before the one test evaluation reads test)
   (``precision`` in metrics.json).
5. ``--quantize``: before choosing, every trial on the front is converted to LiteRT
   ``float32``, ``float16``, ``dynamic`` and ``int8`` variants, each measured in the
   interpreter (validation accuracy, latency, size: ``deployables.csv``,
   :mod:`tuner.model.quantize`), and the rule chooses among the Keras models and these; a chosen
   variant is evaluated on test in the interpreter and shipped as ``model.tflite``, its
   trial's float model beside it for serving.
6. ``--refit``: the chosen configuration is trained once more on train + validation, for the
   epochs its trial found best, replaying the trial's own schedule (and, for a trial continued
   from another, its parents' first, each to its best epoch), with nothing chosen on the
   validation rows it now trains on. Both models are evaluated on test once; the refit model
   is exported whatever the two figures say (choosing by test would spend the test split),
   and metrics.json and the card give both (``exported``, ``test``, ``trial_test``,
   ``refit``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from data_tools.atomic import atomic_path
from data_tools.errors import InputError, run_cli
from tuner.model import quantize
from tuner.report import results as results_mod
from tuner.report.card import refit_step
from tuner.report.choose import MNAS_WEIGHT, RULES, Choice, choose

FLOAT_TOLERANCE = 1e-4  # Keras vs SavedModel vs TFLite probabilities (float32 arithmetic)
# A mixed-precision trial against its float32 export: float16 activations carry ~3 digits,
# enough to move a borderline prediction, so the check is on the predicted classes.
MIXED_MIN_AGREEMENT = 0.95


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


def front_table(choice: Choice, column: str) -> str:
    """The front as a printable table, the chosen row marked with an arrow."""
    shown = choice.front[
        ["trial_id", "backbone", "image_size", "val_accuracy", "latency_ms", "train_seconds"]
    ].copy()
    shown.insert(0, "", np.where(choice.front["chosen"], "->", ""))
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


# -- the model --------------------------------------------------------------------------------


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
    table, classes = split_table(config, ("train", "validation"))
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

    from tuner.engine.budget import format_seconds

    chain = lineage(folder, row, trials)
    table, classes = split_table(config, ("train", "validation"))
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


def split_table(config: dict[str, Any], types: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Rows of the search's split file of the given types, normalised, and the classes."""
    from data_tools import ingest

    frame = ingest.read_split_csv(config["data"])
    frame = frame[frame["type"].isin(types)].reset_index(drop=True)
    classes = list(config["classes"])
    paths = ingest.resolve_paths(frame, config["images"])
    return ingest.normalise(frame, paths, classes), classes


def probabilities(model, pixels: np.ndarray) -> np.ndarray:
    """Class probabilities ``[N, C]`` (a sigmoid head gives ``[1 - p, p]``)."""
    return two_columns(
        np.asarray(model.predict(pixels.astype("float32"), verbose=0, batch_size=64))
    )


def two_columns(out: np.ndarray) -> np.ndarray:
    """A sigmoid head's ``[N, 1]`` as ``[N, 2]`` class probabilities; softmax as it is."""
    return np.concatenate([1 - out, out], axis=1) if out.shape[1] == 1 else out


# -- the test evaluation ----------------------------------------------------------------------


def test_pixels(config: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The test split decoded at ``size``: (uint8 pixels, labels, table). Read here only."""
    return split_pixels(config, size, "test")


def split_pixels(
    config: dict[str, Any], size: int, split: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """A split decoded at ``size``: (uint8 pixels, labels, table)."""
    from data_tools import pipeline

    table, _ = split_table(config, (split,))
    if table.empty:
        raise InputError(f"the split {config['data']} has no {split} rows: nothing to check on")
    batches = list(pipeline.make_dataset(table, size, 64).as_numpy_iterator())
    return (np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]), table)


def test_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """scikit-learn's numbers for these predictions."""
    from sklearn import metrics

    predicted = probs.argmax(axis=1)
    indices = list(range(len(classes)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    return {
        "count": int(len(labels)),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "loss": float(metrics.log_loss(labels, probs, labels=indices)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(labels, predicted)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=indices).tolist(),
    }


# -- the exports ------------------------------------------------------------------------------


def mixed_policies(model) -> set[str]:
    """The mixed-precision policies (``mixed_float16``, ``mixed_bfloat16``) inside ``model``."""
    return {
        layer.dtype_policy.name
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if layer.dtype_policy.name.startswith("mixed_")
    }


def float32_model(model):
    """``model`` rebuilt with every layer in float32 and the same weights (mixed precision
    keeps its variables in float32, so they carry over exactly). TFLite's converter refuses
    float16 kernels, and a deployer should not need a GPU's half precision."""
    import keras

    def to_float32(node):
        if isinstance(node, dict):
            config = node.get("config")
            if (
                str(node.get("class_name", "")).endswith("DTypePolicy")
                and isinstance(config, dict)
                and str(config.get("name", "")).startswith("mixed_")
            ):
                return {**node, "config": {**config, "name": "float32"}}
            return {key: to_float32(value) for key, value in node.items()}
        if isinstance(node, list):
            return [to_float32(value) for value in node]
        return node

    rebuilt = keras.saving.deserialize_keras_object(
        to_float32(keras.saving.serialize_keras_object(model))
    )
    rebuilt.set_weights(model.get_weights())
    for layer in rebuilt._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()  # its mean and variance tensors, from the assigned variables
    return rebuilt


def write_saved_model(model, size: int, target: Path) -> None:
    """A SavedModel whose ``serving_default`` takes ``uint8 [N, H, W, 3]`` of any H, W."""
    import keras
    import tensorflow as tf

    from data_tools.pipeline import resize_pixels

    binary = model.output_shape[-1] == 1

    def serve(images):
        pixels = tf.cast(resize_pixels(images, size), tf.float32)
        out = model(pixels, training=False)
        return {"probabilities": tf.concat([1 - out, out], axis=1) if binary else out}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)]
    )
    archive.write_out(str(target), verbose=False)


def in_float32(model, pixels: np.ndarray, console):
    """(the model to ship, the precision record or None). A trial trained in mixed precision
    (a GPU's) is rebuilt in float32, the same weights, and checked against its own outputs on
    the validation images ``pixels``: nothing before the one test evaluation reads test."""
    mixed = mixed_policies(model)
    if not mixed:
        return model, None
    trial_probs = probabilities(model, pixels)
    model = float32_model(model)
    probs = probabilities(model, pixels)
    precision = {
        "trial": sorted(mixed)[0],
        "exported": "float32",
        "mean_abs_difference": float(np.abs(trial_probs - probs).mean()),
        "max_abs_difference": float(np.abs(trial_probs - probs).max()),
        "same_predictions": float((trial_probs.argmax(1) == probs.argmax(1)).mean()),
    }
    console.print(
        f"precision: the trial ran in {precision['trial']}; exported in float32 (same "
        f"class as the trial for {precision['same_predictions']:.1%} of the validation images, "
        f"probabilities {precision['mean_abs_difference']:.1e} apart on average)"
    )
    if precision["same_predictions"] < MIXED_MIN_AGREEMENT:
        raise RuntimeError(
            f"the float32 model predicts another class than the {precision['trial']} "
            f"trial for {1 - precision['same_predictions']:.1%} of the validation images "
            f"(at most {1 - MIXED_MIN_AGREEMENT:.0%} allowed)"
        )
    return model, precision


def test_line(metrics: dict[str, Any]) -> str:
    return (
        f"accuracy {metrics['accuracy']:.4f}, balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f}, loss {metrics['loss']:.4f} on "
        f"{metrics['count']} images"
    )


def export(args: argparse.Namespace) -> Path:
    """Choose, evaluate and write ``best/``; returns the folder. The CLI's one call."""
    from rich.console import Console

    from tuner.engine.trial import device_name, measure_latency
    from tuner.report import card
    from tuner.report.choose import TIME_COLUMNS

    console = Console(highlight=False, soft_wrap=True)
    folder = Path(args.results) if args.results else most_recent_search()
    config, trials = load_search(folder)
    deployables = None
    pool = trials
    if args.quantize:
        if args.refit:
            raise InputError(
                "--quantize with --refit: a refit model has no measured variants; run one of them"
            )
        deployables = quantize_front(folder, config, trials, args.calibration_images, console)
        pool = quantize.candidates(trials, deployables)
    choice = choose(
        pool,
        args.rule,
        args.time,
        args.max_latency_ms,
        args.min_accuracy,
        args.weight,
        args.target_ms,
    )
    column = TIME_COLUMNS[args.time]
    console.print(f"Pareto front of {folder} (val accuracy up, {column} down):")
    console.print(front_table(choice, column))
    console.print(f"chosen: trial {choice.trial_id}. {choice.reason}")
    trial_id, variant = quantize.split_id(choice.trial_id)
    row = trials[trials["trial_id"].astype(str) == trial_id].iloc[0]
    model, how = trial_model(folder, row, config)
    console.print(f"model: {how}")
    size = int(row["image_size"])
    check = split_pixels(config, size, "validation")[0] if mixed_policies(model) else None
    model, precision = in_float32(model, check, console)
    pixels, labels, _ = test_pixels(config, size)
    classes = list(config["classes"])
    lite = None
    if variant is None:
        probs = probabilities(model, pixels)
    else:  # the deployable is what ships: it alone is evaluated on test
        lite = (folder / quantize.FOLDER / f"{trial_id}-{variant}.tflite").read_bytes()
        probs = quantize.Runner(lite).probabilities(pixels)
    metrics = test_metrics(labels, probs, classes)
    trial_test = refit_facts = None
    if args.refit:
        trial_test = metrics
        console.print(f"test, the trial's model: {test_line(trial_test)}")
        model, refit_facts = refit(folder, row, trials, config, console)
        if mixed_policies(model) and check is None:
            check = split_pixels(config, size, "validation")[0]
        model, precision = in_float32(model, check, console)
        probs = probabilities(model, pixels)
        metrics = test_metrics(labels, probs, classes)
    deployable = None
    if variant is None:
        latency_ms, images_per_s, _ = measure_latency(model, size)
    else:  # measured in the interpreter already, with its spread
        chosen = deployables[
            (deployables["trial_id"].astype(str) == trial_id) & (deployables["variant"] == variant)
        ].iloc[0]
        deployable = quantize.record(chosen)
        latency_ms, images_per_s = deployable["latency_ms"], None
    out = Path(args.out) if args.out else folder / "best"
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model.save(tmp / "model.keras")
        write_saved_model(model, size, tmp / "saved_model")
        (tmp / "labels.txt").write_text("\n".join(config["classes"]) + "\n")
        record = {
            "search": str(folder),
            "trial_id": choice.trial_id,
            "rule": choice.rule,
            "reason": choice.reason,
            "model_source": how if refit_facts is None else "refit on train + validation",
            "exported": "trial" if refit_facts is None else "refit",
            "backbone": row["backbone"],
            "image_size": size,
            "classes": list(config["classes"]),
            "hyperparameters": card.hyperparameters(row),
            "validation": (
                {"accuracy": float(row["val_accuracy"]), "loss": float(row["val_loss"])}
                if deployable is None
                else {"accuracy": deployable["val_accuracy"], "loss": None}
            ),
            "test": metrics,
            "latency_ms": latency_ms,
            "images_per_s": images_per_s,
            "device": device_name(),
            "params": int(model.count_params()),
            "model_bytes": (tmp / "model.keras").stat().st_size,
        }
        if refit_facts is not None:
            record["trial_test"] = trial_test
            record["refit"] = {**refit_facts, "trial_model_source": how}
        if precision:
            record["precision"] = precision
        if deployable is not None:
            record["deployable"] = deployable
            (tmp / "model.tflite").write_bytes(lite)
        elif args.tflite:
            (tmp / "model.tflite").write_bytes(quantize.convert(model, size, "float32"))
            lite = quantize.Runner((tmp / "model.tflite").read_bytes()).probabilities(pixels)
            record["tflite"] = {
                "max_abs_difference": float(np.abs(lite - probs).max()),
                "same_predictions": float((lite.argmax(1) == probs.argmax(1)).mean()),
                "bytes": (tmp / "model.tflite").stat().st_size,
            }
            if record["tflite"]["max_abs_difference"] > FLOAT_TOLERANCE:
                raise RuntimeError(
                    f"the TFLite model disagrees with Keras by "
                    f"{record['tflite']['max_abs_difference']:.2e}"
                )
        (tmp / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "model_card.md").write_text(card.model_card(record, config, choice, column))
        finished = pool[pool["status"].isin(results_mod.FINISHED)]
        results_mod.plot_pareto(finished, tmp / "pareto.png", exported=choice.trial_id)
    # The search's own plot gets the star too: the trial this export shipped.
    with atomic_path(folder / "pareto.png") as tmp:
        shutil.copyfile(out / "pareto.png", tmp)
    which = "" if refit_facts is None else ", the refit model (exported)"
    console.print(
        f"test{which}: {test_line(metrics)}; {latency_ms:.2f} ms/image on {device_name()}"
    )
    console.print(f"exported to {out}/")
    _log_artifact(folder, config, out, choice, record, console, args, deployables)
    return out


def quantize_front(
    folder: Path, config: dict[str, Any], trials: pd.DataFrame, count: int, console
) -> pd.DataFrame:
    """deployables.csv: every variant of every trial on the latency front, measured
    (:mod:`tuner.model.quantize`); the leaderboard gains their section."""
    front = trials[results_mod.pareto_flags(trials)]
    console.print(
        f"quantizing the {len(front)} trial(s) on the front: "
        f"{', '.join(quantize.VARIANTS)} (int8 calibrated on up to {count} train images)"
    )
    rows, pixels = [], {}
    for _, row in front.iterrows():
        size = int(row["image_size"])
        if size not in pixels:
            validation = split_pixels(config, size, "validation")
            calibration = quantize.calibration_pixels(config, size, count)
            pixels[size] = (validation[:2], calibration)
        (validation, calibration) = pixels[size]
        model, _ = trial_model(folder, row, config)
        model, _ = in_float32(model, validation[0] if mixed_policies(model) else None, console)
        rows += quantize.measure_variants(
            model,
            row,
            validation,
            calibration,
            folder / quantize.FOLDER,
            report=console.print,
        )
    table = quantize.write_table(rows, folder / "deployables.csv")
    leaderboard = results_mod.leaderboard_markdown(trials)
    leaderboard += "\n## Deployable variants (LiteRT, `deployables.csv`)\n\n"
    leaderboard += quantize.markdown(table)
    with atomic_path(folder / "leaderboard.md") as tmp:
        tmp.write_text(leaderboard)
    return table


def _log_artifact(folder, config, out, choice, record, console, args, deployables=None) -> None:
    from tuner.report.wandb_log import WandbLogger

    logger = WandbLogger(
        args.wandb_mode, args.wandb_project, args.wandb_entity, config["name"], folder, console
    )
    metadata = {
        "trial_id": choice.trial_id,
        "rule": choice.rule,
        "test_accuracy": record["test"]["accuracy"],
        "val_accuracy": record["validation"]["accuracy"],
        "latency_ms": record["latency_ms"],
        "backbone": record["backbone"],
        "exported": record["exported"],
    }
    if "trial_test" in record:
        metadata["trial_test_accuracy"] = record["trial_test"]["accuracy"]
    if "deployable" in record:
        metadata["variant"] = record["deployable"]["variant"]
    tables = {} if deployables is None else {"deployables": deployables}
    logger.log_model(out, ["best", choice.rule], metadata, tables)
    if logger.sync_command():
        console.print(f"W&B is offline; to upload: {logger.sync_command()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.export_best",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results", help="results/NAME (default: the most recent search)")
    parser.add_argument(
        "--rule",
        choices=RULES,
        help="default: knee; fastest with only "
        "--min-accuracy, max-accuracy with only --max-latency-ms",
    )
    parser.add_argument("--max-latency-ms", type=float, help="latency cap (ms per image)")
    parser.add_argument("--min-accuracy", type=float, help="val accuracy floor")
    parser.add_argument("--time", choices=["latency", "training"], default="latency")
    parser.add_argument("--weight", type=float, default=MNAS_WEIGHT, help="weighted rule's W")
    parser.add_argument("--target-ms", type=float, help="weighted rule's T (default: median)")
    parser.add_argument("--tflite", action="store_true", help="also write model.tflite")
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="measure LiteRT float32/float16/dynamic/int8 variants of the front's trials "
        "(deployables.csv) and choose among them and the Keras models",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=quantize.CALIBRATION_IMAGES,
        help="train images int8 calibrates on (default: %(default)s)",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="train the chosen configuration again on train + validation for its best "
        "epochs and export that (both models' test figures are reported)",
    )
    parser.add_argument("--out", help="export folder (default: results/NAME/best)")
    parser.add_argument("--wandb-project")
    parser.add_argument("--wandb-entity")
    parser.add_argument("--wandb-mode", choices=["online", "offline", "disabled"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rule is None:
        only_floor = args.min_accuracy is not None and args.max_latency_ms is None
        only_cap = args.max_latency_ms is not None and args.min_accuracy is None
        args.rule = "fastest" if only_floor else ("max-accuracy" if only_cap else "knee")
    export(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
