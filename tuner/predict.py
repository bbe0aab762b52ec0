"""Predict with an exported model: label and probability per image.

    python -m tuner.predict --model results/NAME/best photo.jpg other.png
    python -m tuner.predict --model results/NAME/best images/ > predictions.csv

Images are decoded at their own size and handed to the SavedModel's ``serving_default``
signature, which resizes them exactly as training did. When the export shipped a LiteRT
variant (``export_best --quantize``: ``deployable`` in metrics.json), that ``model.tflite``
predicts instead, on the same resize: the model the test figures describe. One image per line
(``path: label (probability)``); a folder gives a CSV (``path,label,probability`` and one
column per class) on stdout or in ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data_tools import cli, header
from data_tools import split as split_mod
from data_tools.errors import InputError, run_cli
from data_tools.ingest import IMAGE_EXTENSIONS


def load(model_dir: str | Path):
    """(the serving function, the class names) of an exported model folder."""
    model_dir = Path(model_dir)
    saved, labels = model_dir / "saved_model", model_dir / "labels.txt"
    if not saved.is_dir() or not labels.is_file():
        raise InputError(
            f"{model_dir} is not an exported model (no saved_model/ or "
            f"labels.txt): run python -m tuner.export_best first"
        )
    import json

    import tensorflow as tf

    classes = labels.read_text().split("\n")[:-1]
    metrics = model_dir / "metrics.json"
    record = json.loads(metrics.read_text()) if metrics.is_file() else {}
    if "deployable" in record:
        return lite_serving(model_dir / "model.tflite", int(record["image_size"])), classes
    return tf.saved_model.load(str(saved)).signatures["serving_default"], classes


def lite_serving(path: Path, size: int):
    """``serving_default``'s contract (``uint8 [N, H, W, 3]`` of any size ->
    ``{"probabilities": [N, C]}``) for a ``.tflite`` variant: the package's resize, then
    the LiteRT interpreter."""
    import tensorflow as tf

    from data_tools.pipeline import resize_pixels
    from tuner.report.quantize import Runner

    runner = Runner(path.read_bytes())

    def serve(images):
        pixels = resize_pixels(images, size).numpy()
        return {"probabilities": tf.constant(runner.probabilities(pixels))}

    return serve


def image_files(items: Sequence[str]) -> tuple[list[Path], bool]:
    """The image files named or found in folders; True when a folder was given."""
    files, any_folder = [], False
    for item in items:
        path = Path(item)
        if path.is_dir():
            any_folder = True
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{item} does not exist: pass image files or folders")
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(items)}")
    return files, any_folder


def predict(serve, classes: list[str], files: Sequence[Path]) -> pd.DataFrame:
    """One row per file: path, label, probability, then each class's probability (an
    unreadable file: an empty label and NaN)."""
    import tensorflow as tf

    from data_tools.pipeline import read_rgb

    rows = []
    for file in files:
        try:  # the training decoder, its pixel limit included
            image = read_rgb(tf.constant(str(file)))
        except tf.errors.InvalidArgumentError:
            rows.append({"path": str(file), "label": "", "probability": float("nan")})
            continue
        rows.append({"path": str(file), **_row(serve, classes, image)})
    return pd.DataFrame(rows)


def predict_arrays(serve, classes: list[str], images: Sequence) -> pd.DataFrame:
    """One row per decoded ``uint8 [H, W, 3]`` image: label, probability, each class's."""
    return pd.DataFrame([_row(serve, classes, image) for image in images])


def _row(serve, classes: list[str], image) -> dict[str, object]:
    """The label, its probability and every class's, for one ``uint8 [H, W, 3]`` image."""
    import tensorflow as tf

    probs = serve(tf.expand_dims(tf.convert_to_tensor(image, tf.uint8), 0))["probabilities"]
    probs = probs.numpy()[0]
    best = int(probs.argmax())
    return {
        "label": classes[best],
        "probability": float(probs[best]),
        **{c: float(p) for c, p in zip(classes, probs, strict=True)},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("tuner.predict", __doc__)
    parser.add_argument("--model", required=True, help="an exported folder (results/NAME/best)")
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    parser.add_argument("--out", help="write the CSV here instead of stdout")
    split_mod.add_max_pixels_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    header.set_max_pixels(args.max_pixels)
    serve, classes = load(args.model)
    files, any_folder = image_files(args.images)
    table = predict(serve, classes, files)
    if any_folder or args.out:
        table.to_csv(args.out or sys.stdout, index=False, float_format="%.6f")
    else:
        for row in table.itertuples():
            shown = f"{row.label} ({row.probability:.4f})" if row.label else "unreadable image"
            print(f"{row.path}: {shown}")
    return 0 if table["label"].ne("").all() else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
