"""Deployable variants of the front's models, measured where they run (LiteRT).

    python -m tuner.export_best --quantize [--calibration-images 200]

For every trial on the search's front (validation accuracy against Keras latency), the
LiteRT converter builds five files from the trial's float32 model (pixels 0..255 at its
size in, class probabilities out):

* ``float32``: no optimisation (what ``--tflite`` writes);
* ``float16``: ``Optimize.DEFAULT`` with float16 weights;
* ``dynamic``: ``Optimize.DEFAULT``: int8 weights, activations quantized on the fly;
* ``int8``: full integer, int8 ops only, calibrated on ``--calibration-images`` train
  images (a seeded draw; never validation or test); it takes uint8 pixels (the
  calibration gives the input a scale of ~1 and a zero point of 0) and gives uint8
  probabilities, which :class:`Runner` quantizes and dequantizes;
* ``int8-mixed``: int8 with the layers whose int8 error costs the accuracy kept in float
  (selective quantization). LiteRT's ``QuantizationDebugger`` measures each quantized
  layer's error on the calibration images (train only): its root mean square error in
  units of its quantization step. The worst 0, 1, 2, 4, ... layers are kept in float in
  turn until the variant's validation accuracy is within ``MIXED_TOLERANCE`` of the float
  model's or ``MIXED_MOST`` layers are (then the most accurate of those tried ships, and
  its row's reason says the tolerance was not met). Float pixels in, float probabilities
  out; the row records how many layers stayed float and which (``kept_float``), as do the
  card and metrics.json when it ships. The step is chosen on validation accuracy, as every
  row of the front is.

Each is measured with the LiteRT interpreter (XNNPACK, its default): accuracy on the
validation images, latency at batch 1 by the rule of the Keras latency (3 warm-up runs, the
median of 10, their interquartile range as the spread) and its file size. The rows go to
``deployables.csv`` beside trials.csv (:data:`COLUMNS`) and the files to ``deployables/``.
A variant the converter or the interpreter refuses keeps the trial's float row and gets a
``failed`` row with one line saying why.

The export then chooses among the float Keras rows and the deployable rows together, with
the same rules and noise-aware ties (a deployable's ``trial_id`` is ``<trial>:<variant>``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_tools.atomic import atomic_path

MIXED = "int8-mixed"
VARIANTS = ("float32", "float16", "dynamic", "int8", MIXED)
CALIBRATION_IMAGES = 200
MIXED_TOLERANCE = 0.02  # int8-mixed: validation accuracy at most this far below the float model's
MIXED_MOST = 128  # int8-mixed: at most this many layers kept in float
DEBUG_IMAGES = 64  # calibration images the debugger measures each layer's error on
COLUMNS = [
    "trial_id",
    "variant",
    "status",
    "reason",
    "backbone",
    "image_size",
    "val_accuracy",
    "float_val_accuracy",
    "latency_ms",
    "latency_spread_ms",
    "float_latency_ms",
    "file_bytes",
    "calibration_images",
    "train_seconds",
    "float_layers",
    "kept_float",
]
KEPT_SEPARATOR = ";"  # between the kept_float layer names in deployables.csv
SEPARATOR = ":"
FOLDER = "deployables"  # the .tflite files, beside deployables.csv


def deployable_id(trial_id: str, variant: str) -> str:
    return f"{trial_id}{SEPARATOR}{variant}"


def split_id(candidate: str) -> tuple[str, str | None]:
    """``'003:int8'`` -> ``('003', 'int8')``; a trial id -> ``(id, None)``."""
    trial, _, variant = str(candidate).partition(SEPARATOR)
    return trial, variant or None


def convert(model, size: int, variant: str, calibration: np.ndarray | None = None) -> bytes:
    """The ``.tflite`` bytes of ``model`` (float pixels 0..255 at ``size``) as ``variant``;
    ``int8`` needs ``calibration`` (uint8 train pixels). ``int8-mixed`` is
    :func:`convert_mixed`'s, with the layers to keep in float chosen by :func:`select_mixed`."""
    return _converter(model, size, variant, calibration).convert()


def _converter(model, size: int, variant: str, calibration: np.ndarray | None = None):
    """LiteRT's converter for ``variant``. The function is frozen first: left as resource
    variables, Keras 3's weights are read uninitialised by the interpreter."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def infer(pixels):
        return model(pixels, training=False)

    frozen = convert_variables_to_constants_v2(infer.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant in ("int8", MIXED):
        if calibration is None or not len(calibration):
            raise ValueError(f"{variant} needs calibration images")
        converter.representative_dataset = _samples(calibration)
        if variant == "int8":  # int8 ops only; int8-mixed falls back to float where kept
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
    elif variant not in ("float32", "dynamic"):
        raise ValueError(f"unknown variant {variant}: one of {', '.join(VARIANTS)}")
    return converter


def _samples(pixels: np.ndarray) -> Callable[[], Any]:
    samples = pixels.astype("float32")

    def representative():
        for i in range(len(samples)):
            yield [samples[i : i + 1]]

    return representative


def _debugger(model, size: int, calibration: np.ndarray, keep_float: Sequence[str] = ()):
    import tensorflow as tf

    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=list(keep_float) or None
    )
    return tf.lite.experimental.QuantizationDebugger(
        converter=_converter(model, size, MIXED, calibration),
        debug_dataset=_samples(calibration[:DEBUG_IMAGES]),
        debug_options=options,
    )


def layer_errors(model, size: int, calibration: np.ndarray) -> pd.DataFrame:
    """Each quantized layer of ``model``'s int8 conversion (``tensor_name``, ``op_name``)
    with its error on up to ``DEBUG_IMAGES`` calibration images: ``error``, the root mean
    square error against float in units of the layer's quantization step (LiteRT's
    ``QuantizationDebugger``); worst first."""
    import io

    debugger = _debugger(model, size, calibration)
    debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    buffer.seek(0)
    stats = pd.read_csv(buffer)
    stats["error"] = np.sqrt(stats["mean_squared_error"]) / stats["scale"]
    stats = stats.sort_values("error", ascending=False, kind="stable")
    return stats[["tensor_name", "op_name", "error"]].reset_index(drop=True)


def convert_mixed(
    model, size: int, calibration: np.ndarray, keep_float: Sequence[str] = ()
) -> bytes:
    """``model`` in int8 (float fallback, float pixels in and probabilities out), but the
    layers named in ``keep_float`` (tensor names of :func:`layer_errors`) in float."""
    return _debugger(model, size, calibration, keep_float).get_nondebug_quantized_model()


def select_mixed(
    model,
    size: int,
    calibration: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    float_accuracy: float,
    report: Callable[[str], None] = print,
) -> tuple[bytes, list[str], float, bool]:
    """The ``int8-mixed`` conversion: the worst 0, 1, 2, 4, ... layers by
    :func:`layer_errors` kept in float, until the validation accuracy is within
    ``MIXED_TOLERANCE`` of ``float_accuracy`` (or ``MIXED_MOST`` layers, or all of them,
    are kept: then the most accurate tried). Returns (the bytes, the layers kept in float,
    its validation accuracy, whether the tolerance was met)."""
    ranked = layer_errors(model, size, calibration)["tensor_name"].tolist()
    most = min(MIXED_MOST, len(ranked))
    counts = [0] + [2**k for k in range(most.bit_length()) if 2**k < most] + [most]
    best: tuple[float, int, bytes] | None = None
    for count in dict.fromkeys(counts):
        content = convert_mixed(model, size, calibration, ranked[:count])
        accuracy = Runner(content).accuracy(validation)
        report(f"  int8-mixed, {count} layer(s) in float: val acc {accuracy:.4f}")
        if best is None or accuracy > best[0]:
            best = (accuracy, count, content)
        if accuracy >= float_accuracy - MIXED_TOLERANCE:
            return content, ranked[:count], accuracy, True
    accuracy, count, content = best
    return content, ranked[:count], accuracy, False


class Runner:
    """A ``.tflite`` model in the LiteRT interpreter: float pixels 0..255 in (quantized for
    an integer input), class probabilities ``[N, C]`` out (dequantized)."""

    def __init__(self, content: bytes, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=content, num_threads=threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = None

    def _feed(self, pixels: np.ndarray) -> None:
        if self.batch != pixels.shape[0]:
            self.interpreter.resize_tensor_input(self.input["index"], list(pixels.shape))
            self.interpreter.allocate_tensors()
            self.batch = pixels.shape[0]
        dtype = self.input["dtype"]
        values = pixels.astype("float32")
        if np.issubdtype(dtype, np.integer):
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            values = np.clip(np.round(values / scale + zero), info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], values.astype(dtype))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self._feed(pixels)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"]).astype("float32")
        if np.issubdtype(self.output["dtype"], np.integer):
            scale, zero = self.output["quantization"]
            out = (out - zero) * scale
        return out

    def probabilities(self, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
        from tuner.report.evaluate import two_columns

        parts = [self(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
        return two_columns(np.concatenate(parts))

    def accuracy(self, validation: tuple[np.ndarray, np.ndarray]) -> float:
        """The share of ``(pixels, labels)`` whose most probable class is the label."""
        pixels, labels = validation
        return float((self.probabilities(pixels).argmax(1) == labels).mean())

    def latency(self, size: int, runs: int = 10) -> tuple[float, float]:
        """(median ms per image at batch 1, interquartile range in ms), after 3 warm-up
        runs: :func:`tuner.model.measure.measure_latency`'s rule."""
        from tuner.model.measure import timed_runs

        one = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
        return timed_runs(lambda: self(one), runs)


def calibration_pixels(config: dict[str, Any], size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` train images (a seeded draw; all of them when there are fewer) at
    ``size``, uint8: what full-integer quantization calibrates on. Never validation or test."""
    from data_tools import pipeline
    from tuner.report.evaluate import split_table

    table, _ = split_table(config, ("train",))
    if len(table) > count:
        table = table.sample(n=count, random_state=seed).reset_index(drop=True)
    batches = pipeline.make_dataset(table, size, 64).as_numpy_iterator()
    return np.concatenate([x for x, _ in batches]).astype("uint8")


def one_line(exc: BaseException) -> str:
    """An exception as one line: the converter's messages run to pages."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}"[:300]


def measure_variants(
    model,
    row: pd.Series,
    validation: tuple[np.ndarray, np.ndarray],
    calibration: np.ndarray,
    folder: Path,
    variants: tuple[str, ...] = VARIANTS,
    report: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Convert ``model`` (trial ``row``'s float32 model) to each variant, write the files
    to ``folder`` and measure each: one :data:`COLUMNS` row per variant."""
    size = int(row["image_size"])
    rows = []
    for variant in variants:
        base = {
            "trial_id": str(row["trial_id"]),
            "variant": variant,
            "backbone": row["backbone"],
            "image_size": size,
            "float_val_accuracy": float(row["val_accuracy"]),
            "float_latency_ms": float(row["latency_ms"]),
            "calibration_images": len(calibration) if variant in ("int8", MIXED) else 0,
            "train_seconds": float(row["train_seconds"]),
        }
        try:
            content, accuracy, extra = _converted(
                model, row, variant, validation, calibration, report
            )
            runner = Runner(content)
            if accuracy is None:  # int8-mixed was scored as its layers were chosen
                accuracy = runner.accuracy(validation)
            latency, spread = runner.latency(size)
        except Exception as exc:  # noqa: BLE001 - any refusal keeps the float row
            reason = one_line(exc)
            report(f"trial {row['trial_id']}: {variant} failed ({reason}); its float row stays")
            rows.append({**base, "status": "failed", "reason": reason})
            continue
        path = folder / f"{row['trial_id']}-{variant}.tflite"
        with atomic_path(path) as tmp:
            tmp.write_bytes(content)
        rows.append(
            {
                **base,
                "status": "completed",
                **extra,
                "val_accuracy": accuracy,
                "latency_ms": latency,
                "latency_spread_ms": spread,
                "file_bytes": len(content),
            }
        )
        report(
            f"trial {row['trial_id']} {variant}: val acc {accuracy:.4f} (float "
            f"{float(row['val_accuracy']):.4f}), {latency:.2f} ms/image (Keras "
            f"{float(row['latency_ms']):.2f}), {len(content) / 1e6:.2f} MB"
        )
    return rows


def _converted(
    model,
    row: pd.Series,
    variant: str,
    validation: tuple[np.ndarray, np.ndarray],
    calibration: np.ndarray,
    report: Callable[[str], None],
) -> tuple[bytes, float | None, dict[str, Any]]:
    """(the variant's ``.tflite`` bytes, its validation accuracy when the conversion scored
    it already (``int8-mixed``), its extra columns: for ``int8-mixed`` the layers kept in
    float, and the reason when the tolerance was not met)."""
    size = int(row["image_size"])
    if variant != MIXED:
        return convert(model, size, variant, calibration), None, {"reason": ""}
    content, kept, accuracy, met = select_mixed(
        model, size, calibration, validation, float(row["val_accuracy"]), report
    )
    reason = (
        ""
        if met
        else f"not within {MIXED_TOLERANCE:g} of the float model's validation accuracy with "
        f"up to {len(kept)} layer(s) in float"
    )
    return (
        content,
        accuracy,
        {
            "reason": reason,
            "float_layers": len(kept),
            "kept_float": KEPT_SEPARATOR.join(kept),
        },
    )


def write_table(rows: list[dict[str, Any]], path: Path) -> pd.DataFrame:
    """deployables.csv (atomically), columns :data:`COLUMNS`."""
    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path, dtype={"trial_id": str, "reason": str, "kept_float": str}, keep_default_na=True
    )


def candidates(trials: pd.DataFrame, deployables: pd.DataFrame) -> pd.DataFrame:
    """Trials (variant ``keras``) and the completed deployables (``trial_id``
    ``<trial>:<variant>``, the trial's other columns) as one table for :func:`choose`."""
    keras_rows = trials.assign(variant="keras", trial_id=trials["trial_id"].astype(str))
    done = deployables[deployables["status"] == "completed"]
    if done.empty:
        return keras_rows
    parents = keras_rows.set_index("trial_id")
    extra = []
    for row in done.itertuples(index=False):
        parent = parents.loc[str(row.trial_id)].to_dict()
        parent.update(
            trial_id=deployable_id(str(row.trial_id), row.variant),
            variant=row.variant,
            val_accuracy=row.val_accuracy,
            latency_ms=row.latency_ms,
            latency_spread_ms=row.latency_spread_ms,
            model_bytes=row.file_bytes,
        )
        extra.append(parent)
    return pd.concat([keras_rows, pd.DataFrame(extra)], ignore_index=True)


def markdown(deployables: pd.DataFrame) -> str:
    """The deployables as a Markdown table (the leaderboard's section and the README's)."""
    lines = [
        "| trial | variant | val acc (float) | latency (Keras) | file size | calibration |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in deployables.itertuples(index=False):
        if row.status != "completed":
            lines.append(f"| {row.trial_id} | {row.variant} | failed: {row.reason} | | | |")
            continue
        variant = row.variant
        if variant == MIXED:
            variant += f" ({int(row.float_layers)} layer(s) in float)"
        if isinstance(row.reason, str) and row.reason:
            variant += f": {row.reason}"
        lines.append(
            f"| {row.trial_id} | {variant} | {row.val_accuracy:.4f} "
            f"({row.float_val_accuracy:.4f}) | {row.latency_ms:.2f} ms "
            f"({row.float_latency_ms:.2f} ms) | {row.file_bytes / 1e6:.2f} MB | "
            f"{int(row.calibration_images) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def kept_float(row) -> list[str]:
    """The layers a deployables.csv row kept in float (int8-mixed's; else none)."""
    names = getattr(row, "kept_float", None)
    return str(names).split(KEPT_SEPARATOR) if isinstance(names, str) and names else []


def record(row) -> dict[str, Any]:
    """What metrics.json and the card say of a chosen deployable (a deployables.csv row)."""
    extra = {"kept_float": kept_float(row)} if row.variant == MIXED else {}
    return {
        **extra,
        "variant": row.variant,
        "calibration_images": int(row.calibration_images),
        "val_accuracy": float(row.val_accuracy),
        "float_val_accuracy": float(row.float_val_accuracy),
        "latency_ms": float(row.latency_ms),
        "latency_spread_ms": float(row.latency_spread_ms),
        "float_latency_ms": float(row.float_latency_ms),
        "file_bytes": int(row.file_bytes),
    }
