"""``python -m tuner.export_best``'s work: choose a trial, rebuild its model, evaluate it on
test once, and write ``best/`` (the float32 model.keras, a SavedModel, optionally LiteRT
files, the model card, metrics.json, the leaderboard and pareto.png), then log it to W&B."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data_tools import atomic, header
from data_tools.atomic import atomic_path
from data_tools.errors import InputError
from tuner.report import evaluate, html_report, quantize, rebuild
from tuner.report import results as results_mod
from tuner.report.choose import Choice, choose

if TYPE_CHECKING:
    import keras

FLOAT_TOLERANCE = 1e-4  # Keras vs SavedModel vs TFLite probabilities (float32 arithmetic)
# A mixed-precision trial against its float32 export: float16 activations carry ~3 digits,
# enough to move a borderline prediction, so the check is on the predicted classes.
MIXED_MIN_AGREEMENT = 0.95


def front_table(choice: Choice, column: str) -> str:
    """The front as a printable table, the chosen row marked with an arrow."""
    shown = choice.front[
        ["trial_id", "backbone", "image_size", "val_accuracy", "latency_ms", "train_seconds"]
    ].copy()
    shown.insert(0, "", np.where(choice.front["chosen"], "->", ""))
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


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
    """A SavedModel whose ``serving_default`` takes ``uint8 [N, H, W, 3]`` of any H, W up to
    the pixel limit (``header.MAX_PIXELS`` when written; a larger request is an error)."""
    import keras
    import tensorflow as tf

    from data_tools.pipeline import resize_pixels

    binary = model.output_shape[-1] == 1

    limit = header.MAX_PIXELS  # a request over it is an error, not an out-of-memory resize

    def serve(images):
        shape = tf.shape(images, out_type=tf.int64)
        over = tf.debugging.assert_less_equal(
            shape[1] * shape[2],
            tf.constant(limit, tf.int64),
            message=f"images over the pixel limit of the model ({limit:,} pixels)",
        )
        with tf.control_dependencies([over]):
            images = tf.identity(images)
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
    trial_probs = evaluate.probabilities(model, pixels)
    model = float32_model(model)
    probs = evaluate.probabilities(model, pixels)
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


def export(args: argparse.Namespace) -> Path:
    """Choose, evaluate and write ``best/``; returns the folder. The CLI's one call. The
    steps: the search's records (with its LiteRT variants under ``--quantize``), the choice,
    the chosen trial's model rebuilt in float32 and scored on test (the variant's score when
    a variant ships, the refit's under ``--refit``), its latency, then ``best/`` written
    whole and the search's plot, report and W&B artifact told which trial shipped."""
    from rich.console import Console

    from tuner.model.measure import device_name

    console = Console(highlight=False, soft_wrap=True)
    folder = Path(args.results) if args.results else rebuild.most_recent_search()
    config, trials = rebuild.load_search(folder)
    atomic.sweep(folder)  # an export or a search killed mid-write left these
    header.set_max_pixels(config.get("max_pixels", header.DEFAULT_MAX_PIXELS))
    deployables, pool = _candidates(args, folder, config, trials, console)
    choice, column = _choose_and_show(args, pool, config, folder, console)
    trial_id, variant = quantize.split_id(choice.trial_id)
    row = trials[trials["trial_id"].astype(str) == trial_id].iloc[0]
    shipped = _evaluate(args, folder, config, trials, row, choice.trial_id, console)
    if variant is not None:  # measured in the interpreter already, with its spread
        chosen = deployables[
            (deployables["trial_id"].astype(str) == trial_id) & (deployables["variant"] == variant)
        ].iloc[0]
        shipped.deployable = quantize.record(chosen)
    out = Path(args.out) if args.out else folder / "best"
    record = _write_best(out, folder, config, row, choice, column, shipped, args.tflite, pool)
    # The search's own plot gets the star too: the trial this export shipped.
    with atomic_path(folder / "pareto.png", "export") as tmp:
        shutil.copyfile(out / "pareto.png", tmp)
    which = "" if shipped.refit is None else ", the refit model (exported)"
    console.print(
        f"test{which}: {evaluate.test_line(shipped.metrics)}; {record['latency_ms']:.2f} "
        f"ms/image on {device_name()}"
    )
    console.print(f"exported to {out}/")
    html_report.write(folder, shipped=str(choice.trial_id))
    _log_artifact(folder, config, out, choice, record, console, args, deployables)
    return out


def _candidates(args, folder: Path, config, trials: pd.DataFrame, console):
    """(deployables.csv's rows or None, the rows the choice is made among): the trials, and
    under ``--quantize`` their measured LiteRT variants beside them."""
    if not args.quantize:
        return None, trials
    if args.refit:
        raise InputError(
            "--quantize with --refit: a refit model has no measured variants; run one of them"
        )
    deployables = quantize_front(folder, config, trials, args.calibration_images, console)
    return deployables, quantize.candidates(trials, deployables)


def _choose_and_show(args, pool: pd.DataFrame, config, folder: Path, console):
    """(the choice by the rule and limits given, the time column it weighs), with the front
    and the reason printed."""
    from tuner.report.choose import TIME_COLUMNS

    choice = choose(
        pool,
        args.rule,
        args.time,
        args.max_latency_ms,
        args.min_accuracy,
        args.weight,
        args.target_ms,
        config.get("split_counts", {}).get("validation"),
        args.within_se,
    )
    column = TIME_COLUMNS[args.time]
    console.print(f"{choice.heading} of {folder} (val accuracy up, {column} down):")
    console.print(front_table(choice, column))
    console.print(f"chosen: trial {choice.trial_id}. {choice.reason}")
    return choice, column


@dataclass
class _Shipped:
    """The model an export ships, and what it scored on test."""

    model: keras.Model
    how: str  # where its weights came from
    precision: dict | None  # a mixed-precision trial's float32 check
    metrics: dict  # on test
    probs: np.ndarray  # on the test pixels
    pixels: np.ndarray
    lite: bytes | None = None  # the variant's model, when a variant ships
    trial_test: dict | None = None  # under --refit: the trial's own model's test metrics
    refit: dict | None = None  # under --refit: the refit's facts
    deployable: dict | None = None  # the variant's measured row


def _evaluate(args, folder: Path, config, trials, row, candidate: str, console) -> _Shipped:
    """The chosen trial's model rebuilt (in float32), and the test score of what ships: the
    LiteRT variant when one was chosen (``candidate``: ``'003:int8'``; it alone is evaluated
    on test), else the model, or under ``--refit`` the model refit on train + validation
    (the trial's score kept beside it)."""
    trial_id, variant = quantize.split_id(candidate)
    model, how = rebuild.trial_model(folder, row, config)
    console.print(f"model: {how}")
    size = int(row["image_size"])
    check = evaluate.split_pixels(config, size, "validation")[0] if mixed_policies(model) else None
    model, precision = in_float32(model, check, console)
    pixels, labels, _ = evaluate.test_pixels(config, size)
    classes = list(config["classes"])
    lite = None
    if variant is None:
        probs = evaluate.probabilities(model, pixels)
    else:
        lite = (folder / quantize.FOLDER / f"{trial_id}-{variant}.tflite").read_bytes()
        probs = quantize.Runner(lite).probabilities(pixels)
    shipped = _Shipped(
        model, how, precision, evaluate.test_metrics(labels, probs, classes), probs, pixels, lite
    )
    if args.refit:
        shipped.trial_test = shipped.metrics
        console.print(f"test, the trial's model: {evaluate.test_line(shipped.trial_test)}")
        model, shipped.refit = rebuild.refit(folder, row, trials, config, console)
        if mixed_policies(model) and check is None:
            check = evaluate.split_pixels(config, size, "validation")[0]
        shipped.model, shipped.precision = in_float32(model, check, console)
        shipped.probs = evaluate.probabilities(shipped.model, pixels)
        shipped.metrics = evaluate.test_metrics(labels, shipped.probs, classes)
    return shipped


def _write_best(
    out: Path, folder: Path, config, row, choice, column: str, shipped: _Shipped, tflite, pool
) -> dict[str, Any]:
    """Write ``best/`` whole (model, SavedModel, labels, metrics.json, the card, the plot;
    the variant's or, with ``tflite``, a float32 ``model.tflite`` checked against Keras);
    returns metrics.json's record."""
    from tuner.model.measure import device_name, measure_latency
    from tuner.report import card

    size, model, deployable = int(row["image_size"]), shipped.model, shipped.deployable
    if deployable is None:
        latency_ms, images_per_s, _ = measure_latency(model, size)
    else:
        latency_ms, images_per_s = deployable["latency_ms"], None
    with atomic_path(out, "export") as tmp:
        tmp.mkdir(parents=True)
        model.save(tmp / "model.keras")
        write_saved_model(model, size, tmp / "saved_model")
        (tmp / "labels.txt").write_text("\n".join(config["classes"]) + "\n")
        record = {
            "search": str(folder),
            "trial_id": choice.trial_id,
            "rule": choice.rule,
            "rule_pick": choice.picked,
            "within_se": choice.within_se,
            "reason": choice.reason,
            "model_source": shipped.how if shipped.refit is None else "refit on train + validation",
            "exported": "trial" if shipped.refit is None else "refit",
            "backbone": row["backbone"],
            "image_size": size,
            "classes": list(config["classes"]),
            "hyperparameters": card.hyperparameters(row),
            "validation": (
                {"accuracy": float(row["val_accuracy"]), "loss": float(row["val_loss"])}
                if deployable is None
                else {"accuracy": deployable["val_accuracy"], "loss": None}
            ),
            "test": shipped.metrics,
            "latency_ms": latency_ms,
            "images_per_s": images_per_s,
            "device": device_name(),
            "params": int(model.count_params()),
            "model_bytes": (tmp / "model.keras").stat().st_size,
        }
        if shipped.refit is not None:
            record["trial_test"] = shipped.trial_test
            record["refit"] = {**shipped.refit, "trial_model_source": shipped.how}
        if shipped.precision:
            record["precision"] = shipped.precision
        if deployable is not None:
            record["deployable"] = deployable
            (tmp / "model.tflite").write_bytes(shipped.lite)
        elif tflite:
            record["tflite"] = _float_tflite(model, size, tmp / "model.tflite", shipped)
        (tmp / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "model_card.md").write_text(card.model_card(record, config, choice, column))
        finished = pool[pool["status"].isin(results_mod.FINISHED)]
        results_mod.plot_pareto(finished, tmp / "pareto.png", exported=choice.trial_id)
    return record


def _float_tflite(model: keras.Model, size: int, target: Path, shipped: _Shipped) -> dict:
    """Write the model as float32 LiteRT to ``target``; its agreement with Keras on test
    (raises past :data:`FLOAT_TOLERANCE`)."""
    target.write_bytes(quantize.convert(model, size, "float32"))
    lite = quantize.Runner(target.read_bytes()).probabilities(shipped.pixels)
    facts = {
        "max_abs_difference": float(np.abs(lite - shipped.probs).max()),
        "same_predictions": float((lite.argmax(1) == shipped.probs.argmax(1)).mean()),
        "bytes": target.stat().st_size,
    }
    if facts["max_abs_difference"] > FLOAT_TOLERANCE:
        raise RuntimeError(
            f"the TFLite model disagrees with Keras by {facts['max_abs_difference']:.2e}"
        )
    return facts


def quantize_front(
    folder: Path, config: dict[str, Any], trials: pd.DataFrame, count: int, console
) -> pd.DataFrame:
    """deployables.csv: every variant of every trial on the latency front, measured
    (:mod:`tuner.report.quantize`); the leaderboard gains their section."""
    front = trials[results_mod.pareto_flags(trials)]
    console.print(
        f"quantizing the {len(front)} trial(s) on the front: "
        f"{', '.join(quantize.VARIANTS)} (int8 calibrated on up to {count} train images)"
    )
    rows, pixels = [], {}
    for _, row in front.iterrows():
        size = int(row["image_size"])
        if size not in pixels:
            validation = evaluate.split_pixels(config, size, "validation")
            calibration = quantize.calibration_pixels(config, size, count)
            pixels[size] = (validation[:2], calibration)
        (validation, calibration) = pixels[size]
        model, _ = rebuild.trial_model(folder, row, config)
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
    with atomic_path(folder / "leaderboard.md", "export") as tmp:
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
