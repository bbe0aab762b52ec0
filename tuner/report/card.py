"""The model card of an exported model (``best/model_card.md``), from plain data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuner.report.choose import Choice
from tuner.report.results import HYPERPARAMETER_COLUMNS, UNUSED, model_label, plain_value

HYPERPARAMETERS = [*HYPERPARAMETER_COLUMNS, "epochs", "unfrozen_blocks", "augment_path"]


def hyperparameters(row: Mapping[str, Any]) -> dict[str, Any]:
    """A trials.csv row's hyperparameters as the card lists them: those that did nothing
    are marked ``-`` (trials.csv marks them, but keeps the epochs an exact linear head ran,
    one solve, which the cost model reads)."""
    values = {k: plain_value(row[k]) for k in HYPERPARAMETERS if k in row}
    if row.get("solver") == "exact" and "epochs" in values:
        values["epochs"] = UNUSED
    return values


def speed_lines(record: dict[str, Any]) -> list[str]:
    """The Speed section: the Keras model's, or the deployable's against its float model."""
    if "deployable" not in record:
        return [
            f"{record['latency_ms']:.2f} ms per image at batch 1 (median after warm-up), "
            f"{record['images_per_s']:.0f} images/s at batch 32, on {record['device']}."
        ]
    d = record["deployable"]
    calibrated = (
        f", calibrated on {d['calibration_images']} train images" if d["calibration_images"] else ""
    )
    kept = d["val_accuracy"] - d["float_val_accuracy"]
    return [
        f"Exported as the LiteRT `{d['variant']}` variant of the trial (`model.tflite`, "
        f"{d['file_bytes'] / 1e6:.2f} MB{calibrated}); `model.keras` and `saved_model/` are "
        "its float model, for serving.",
        "",
        f"Validation accuracy {d['val_accuracy']:.4f} against the float model's "
        f"{d['float_val_accuracy']:.4f} ({kept:+.4f}); {d['latency_ms']:.2f} ms per image at "
        f"batch 1 in the LiteRT interpreter against the Keras model's "
        f"{d['float_latency_ms']:.2f} ms ({d['float_latency_ms'] / d['latency_ms']:.1f}x), on "
        f"{record['device']}. The test metrics above are the `{d['variant']}` model's.",
        *_kept_float_lines(d),
    ]


def _kept_float_lines(d: dict[str, Any]) -> list[str]:
    """int8-mixed's layers kept in float (selective quantization), one per line."""
    if "kept_float" not in d:
        return []
    kept = d["kept_float"]
    if not kept:
        return ["", "Every layer is int8 (none needed to stay float)."]
    return [
        "",
        f"Kept in float ({len(kept)} layer(s), the worst by int8 error on the calibration images):",
        "",
        *[f"- `{name}`" for name in kept],
    ]


def _value(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def input_section(size: int, tflite: bool, variant: str | None = None) -> list[str]:
    """What a deployer must feed each export (Markdown lines); ``variant``: the LiteRT
    variant ``model.tflite`` is (an ``int8`` one takes uint8 pixels)."""
    resize = (
        f"resized to {size}x{size} the package's way: squashed (aspect ratio not kept, "
        f"no crop), bilinear, antialiased only when shrinking by more than 2x, rounded back "
        f"to whole values 0..255 (`data_tools.pipeline.resize_pixels`)"
    )
    lines = [
        "## Inputs each export expects",
        "",
        "Images are decoded as RGB (`tf.io.decode_image`, 3 channels: grey is repeated, alpha "
        "dropped). EXIF orientation is **not** applied, in training or here: rotate photos "
        "yourself if your camera only tags them.",
        "",
        "| export | input | preprocessing inside |",
        "|---|---|---|",
        "| `saved_model/` (`serving_default`) | raw `uint8 [N, H, W, 3]` RGB, any H and W "
        "| the resize below, then the model | ",
        f"| `model.keras` | `float32 [N, {size}, {size}, 3]`, values 0..255 | "
        "scaling and normalisation (not the resize) |",
    ]
    if tflite or variant:
        kind = "uint8" if variant == "int8" else "float32"
        out = ", gives uint8 probabilities x 1/256" if variant == "int8" else ""
        lines.append(
            f"| `model.tflite`{f' ({variant})' if variant else ''} | `{kind} [N, {size}, "
            f"{size}, 3]`, values 0..255 | scaling and normalisation (not the resize){out} |"
        )
    lines += [
        "",
        f"For `model.keras` and `model.tflite`, feed pixels {resize}. Another resize (PIL's, "
        "OpenCV's, a centre crop) gives other pixels and lower accuracy than the test figures "
        "above.",
    ]
    return lines


def model_card(
    record: dict[str, Any], config: dict[str, Any], choice: Choice, time_column: str
) -> str:
    """Markdown: data, model, validation and test metrics, speed, the choice, how to use.

    Long: the card's text, section after section, in the order it reads; each section is a
    few lines of the record.
    """
    test = record["test"]
    network = model_label(record["backbone"], record["hyperparameters"].get("partner"))
    counts = dict(config.get("split_counts", {}))
    counts["test"] = test["count"]
    lines = [
        f"# Model card: {config['name']} trial {record['trial_id']} ({network})",
        "",
        "## Data",
        "",
        f"- Labels: `{config['data']}`; images: `{config['images']}`",
        f"- Classes ({len(record['classes'])}, in index order): "
        + ", ".join(f"`{c}`" for c in record["classes"]),
        "- Split (reference hash split, balanced validation and test): "
        + ", ".join(f"{k} {v}" for k, v in counts.items()),
        "",
        "## Model",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *[f"| {k} | {_value(v)} |" for k, v in record["hyperparameters"].items()],
        f"| parameters | {record['params']:,} |",
        f"| model.keras | {record['model_bytes'] / 1e6:.1f} MB |",
        "",
        f"Obtained by: {record['model_source']}.",
        "",
        *augment_lines(record),
        *refit_lines(record),
        "## Metrics",
        "",
        "| split | accuracy | loss | balanced accuracy |",
        "|---|---:|---:|---:|",
        f"| validation{' (the trial)' if 'refit' in record else ''} | "
        f"{record['validation']['accuracy']:.4f} | {_value(record['validation']['loss'])} | |",
        f"| test ({test['count']} images, read once, at export)"
        f"{', refit model (exported)' if 'refit' in record else ''} | {test['accuracy']:.4f} | "
        f"{test['loss']:.4f} | {test['balanced_accuracy']:.4f} |",
        *trial_test_row(record),
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | "
            f"{m['support']} |"
            for name, m in test["per_class"].items()
        ],
        "",
        "Confusion matrix (rows: true class, columns: predicted, in class order):",
        "",
        "```",
        *[" ".join(f"{n:6d}" for n in row) for row in test["confusion_matrix"]],
        "```",
        "",
        "## Speed",
        "",
        *speed_lines(record),
    ]
    if "tflite" in record:
        lite = record["tflite"]
        lines += [
            "",
            f"`model.tflite` ({lite['bytes'] / 1e6:.1f} MB) agrees with Keras on the "
            f"test images to {lite['max_abs_difference']:.1e} (same prediction for "
            f"{lite['same_predictions']:.0%}).",
        ]
    if "precision" in record:
        p = record["precision"]
        lines += [
            "",
            f"The trial trained in {p['trial']}; every export is float32 (same weights). On "
            f"the validation images it predicts the trial's class for {p['same_predictions']:.1%} "
            f"of them, its probabilities {p['mean_abs_difference']:.1e} apart on average "
            f"(at most {p['max_abs_difference']:.2f}); the test metrics above are the float32 "
            "model's.",
        ]
    variant = record.get("deployable", {}).get("variant")
    lines += ["", *input_section(int(record["image_size"]), "tflite" in record, variant)]
    lines += [
        "",
        "## Why this trial",
        "",
        f"Rule `{choice.rule}`: {choice.reason}",
        "",
        f"{choice.heading} (val accuracy up, {time_column} down):",
        "",
        "| | trial | model | px | val accuracy | latency ms | train s |",
        "|---|---|---|---:|---:|---:|---:|",
        *[
            f"| {'**chosen**' if r.chosen else ''} | {r.trial_id} | {r.backbone} | "
            f"{int(r.image_size)} | {r.val_accuracy:.4f} | {r.latency_ms:.2f} | "
            f"{r.train_seconds:.0f} |"
            for r in choice.front.itertuples()
        ],
        "",
        "## Use",
        "",
        "```python",
        "import keras, tensorflow as tf",
        "model = keras.models.load_model('model.keras')  # float RGB 0..255 at "
        f"{record['image_size']}x{record['image_size']}",
        "served = tf.saved_model.load('saved_model')",
        "probabilities = served.signatures['serving_default'](",
        "    tf.constant(uint8_images))['probabilities']  # uint8 [N, H, W, 3], any H, W",
        "```",
        "",
        "From the command line: `python -m tuner.predict --model <this folder> IMAGE_OR_FOLDER`. "
        "Serving: TensorFlow Serving loads `saved_model/` as it is (signature "
        "`serving_default`, input `uint8 [N, H, W, 3]`, output `probabilities [N, C]`, classes "
        "in the order of `labels.txt`).",
        "",
    ]
    return "\n".join(lines)


def augment_lines(record: dict[str, Any]) -> list[str]:
    """What augmentation did, when the trial had any: it trained on transformed images; the
    exported model has no augmentation inside."""
    hp = record["hyperparameters"]
    policy = hp.get("augment")
    if not policy or policy == "none":
        return []
    path = f" ({hp['augment_path']})" if hp.get("augment_path") else ""
    return [
        f"Augmentation `{policy}` transformed the training images only{path}. The exported "
        "model contains no augmentation layer: every form computes what was validated.",
        "",
    ]


def refit_lines(record: dict[str, Any]) -> list[str]:
    """How the exported model was refit on train + validation, when it was."""
    if "refit" not in record:
        return []
    refit = record["refit"]
    steps = ", then ".join(refit_step(step) for step in refit["trials"])
    return [
        "## Refit on train + validation",
        "",
        f"The exported model is the chosen configuration trained again on train + validation "
        f"({refit['train_rows']:,} images) for the epochs its trial found best: {steps} "
        f"({refit['seconds']:.0f} s). Its validation rows were training rows, so it has no "
        "validation figure of its own: the one below is the trial's. Both models were "
        "evaluated on test once; the refit is exported whichever scored higher, since "
        "choosing by test would spend the test split. The trial's own model: "
        f"{refit['trial_model_source']}.",
        "",
    ]


def trial_test_row(record: dict[str, Any]) -> list[str]:
    if "trial_test" not in record:
        return []
    test = record["trial_test"]
    return [
        f"| test, the trial's model (not exported) | {test['accuracy']:.4f} | "
        f"{test['loss']:.4f} | {test['balanced_accuracy']:.4f} |"
    ]


def refit_step(step: dict[str, Any]) -> str:
    """``trial 3 (fine-tune, 2 epoch(s))``, ``trial 1 (exact linear head)``."""
    if step["solver"] == "exact":
        return f"trial {step['trial_id']} (exact linear head)"
    return f"trial {step['trial_id']} ({step['stage']}, {step['epochs']} epoch(s))"
