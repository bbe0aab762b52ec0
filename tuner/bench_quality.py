"""Search quality against the seeds' recipe at equal wall clock, on your own data.

    python -m tuner.bench_quality --data label.csv [--images DIR] [--weights imagenet|FOLDER]
        [--test-range 0-24 --validation-range 25-49] [--space FILE] [--set KEY=VALUE]

1. the package's split of ``--data`` (a ``label.csv`` or a class folder; as
   ``python -m data_tools.split`` with the same ranges), written to
   ``results/<name>-quality/split_label.csv``;
2. the seeds' recipe on that split: the frozen B0 at 224 px (same weights), a Dense softmax
   (sigmoid for two classes) on its pooled features, Adam at Keras' defaults, 10 epochs of
   batch 32, every image decoded and run through the backbone each epoch; the last epoch is
   evaluated once on the test split; its training time is T;
3. ``python -m tuner.search`` on the same split with ``--budget T`` (default space: the
   transfer algorithm), then ``python -m tuner.export_best`` (knee rule), which evaluates
   the chosen model once on the test split;
4. both test accuracies, times, the split's bucket ranges and the difference, ending with
   ``quality: +X.XXX test accuracy at equal wall clock`` (only when it was: with an explicit
   ``--budget``, or a search that overran the recipe's time by more than 10%, the line gives
   both times instead); everything is also written to
   ``results/<name>-quality/bench_quality.json``.

The split is written again when a later run asks for other ranges (``split_ranges.json``
records them), and so the recipe runs again on it. A ``hub:`` recipe backbone gets its
input scale (0..1), as the seeds' TF-Hub recipe rescaled by 1/255.

The recipe's run is kept in ``recipe.json`` and reused by a later run on the same split and
weights (to compare search settings against one baseline); delete it to run it again.

About 2 x T plus the export: T was 13-14 minutes for ~1,700 train and validation images at
224 px on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from data_tools.atomic import write_text
from data_tools.errors import InputError, run_cli
from data_tools.split import DEFAULT_TEST_RANGE, DEFAULT_VALIDATION_RANGE, parse_range

RECIPE = {"backbone": "B0", "image_size": 224, "epochs": 10, "batch_size": 32}
# A search whose wall clock (start-up, split and records included) passes the recipe's
# training time by more than this is not "at equal wall clock".
OVER_TIME = 1.1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.bench_quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="label.csv or a class folder")
    parser.add_argument("--images", help="image folder (default: images/ beside --data)")
    parser.add_argument("--weights", default="imagenet", help="imagenet or a weights folder")
    parser.add_argument("--test-range", default=_text(DEFAULT_TEST_RANGE))
    parser.add_argument("--validation-range", default=_text(DEFAULT_VALIDATION_RANGE))
    parser.add_argument("--space", help="the search's space file (default: default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", help="results/<name>-quality/ (default: from the data)")
    parser.add_argument("--results", default="results", help="results root folder")
    parser.add_argument("--budget", help="the search's budget (default: the recipe's time)")
    quick = parser.add_argument_group("a quicker, smaller recipe (default: the seeds' own)")
    quick.add_argument("--recipe-backbone", default=RECIPE["backbone"])
    quick.add_argument("--recipe-size", type=int, default=RECIPE["image_size"])
    quick.add_argument("--recipe-epochs", type=int, default=RECIPE["epochs"])
    return parser


def _text(pair: tuple[int, int]) -> str:
    return f"{pair[0]}-{pair[1]}"


def split_data(args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    """The package's split of ``--data`` with the ranges asked for (written again when a
    later run asks for other ranges: ``split_ranges.json`` records them); returns (split
    file, images)."""
    from data_tools import split

    data = Path(args.data)
    if not data.exists():
        raise InputError(f"--data {data} does not exist: pass a label.csv or a class folder")
    images = (
        Path(args.images) if args.images else (data if data.is_dir() else data.parent / "images")
    )
    target, record = folder / "split_label.csv", folder / "split_ranges.json"
    ranges = {"test": args.test_range, "validation": args.validation_range}
    recorded = json.loads(record.read_text()) if record.is_file() else None
    if not target.is_file() or recorded != ranges:
        folder.mkdir(parents=True, exist_ok=True)
        split.split_files(
            data,
            target,
            images=None if data.is_dir() else images,
            test_range=parse_range(args.test_range),
            validation_range=parse_range(args.validation_range),
        )
        write_text(record, json.dumps(ranges) + "\n")
    print(f"split: test buckets {args.test_range}, validation buckets {args.validation_range}")
    return target, images


def run_recipe(split_file: Path, images: Path, weights: str | None, recipe: dict) -> dict:
    """The seeds' recipe (``recipe``: backbone, image size, epochs, batch) on the split: its
    test metrics, training seconds and the split's counts."""
    import keras

    from data_tools import ingest, pipeline
    from tuner import backbones, export_best

    config = {"data": str(split_file), "images": str(images)}
    frame = ingest.read_split_csv(split_file)
    classes = ingest.class_names(frame["value"])
    config["classes"] = classes
    table, _ = export_best.split_table(config, ("train", "validation"))
    size, batch = recipe["image_size"], recipe["batch_size"]
    model = recipe_model(backbones.get(recipe["backbone"]), size, weights, len(classes))
    binary = len(classes) == 2
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    def dataset(split: str, shuffle: bool):
        import tensorflow as tf

        rows = table[table["type"] == split]
        data = pipeline.make_dataset(rows, size, batch, shuffle=shuffle)
        return data.map(lambda x, y: (tf.cast(x, tf.float32), y))

    train, val = dataset("train", True), dataset("validation", False)
    started = time.monotonic()
    history = model.fit(train, validation_data=val, epochs=recipe["epochs"], verbose=2)
    seconds = time.monotonic() - started
    pixels, labels, _ = export_best.test_pixels(config, size)
    probs = export_best.probabilities(model, pixels)
    metrics = export_best.test_metrics(labels, probs, classes)
    return {
        "train_seconds": seconds,
        "val_accuracy_last_epoch": float(history.history["val_accuracy"][-1]),
        "test": {k: metrics[k] for k in ("count", "accuracy", "balanced_accuracy", "loss")},
        "split_counts": {str(k): int(v) for k, v in frame["type"].value_counts().items()},
        "classes": classes,
        **recipe,
    }


def recipe_model(entry, size: int, weights: str | None, classes: int):
    """The recipe's model: uint8-valued pixels -> the backbone's input scale (0..1 for a
    TF-Hub module, as the seeds rescaled by 1/255) -> the frozen backbone -> a Dense
    softmax (sigmoid for two classes)."""
    import keras

    from tuner import backbones

    base = backbones.build(entry, size, weights)
    base.trainable = False
    backbones.inference_mode(base)  # a frozen feature extractor, as the TF-Hub layer was
    inputs = keras.Input((size, size, 3))
    x = inputs
    if entry.input_scale != 1.0:
        x = keras.layers.Rescaling(entry.input_scale, name="input_scale")(x)
    features = base(x, training=False)
    binary = classes == 2
    outputs = keras.layers.Dense(
        1 if binary else classes, activation="sigmoid" if binary else "softmax"
    )(features)
    return keras.Model(inputs, outputs)


def check_weights(args: argparse.Namespace, recipe_backbone: str) -> None:
    """The recipe's and the search's backbones have weights (one line naming the fix)."""
    from rich.console import Console

    from tuner import backbones, search, space

    overrides = space.parse_overrides(args.set)
    searched = space.load(args.space or search.SPACES / "default.yaml", overrides)
    wanted = space.load(None, {"backbones": [recipe_backbone, *searched.backbones]})
    search.resolve_weights(args.weights, wanted, demo=False, console=Console())
    if args.weights not in ("imagenet", "none"):
        for name in wanted.backbones:
            backbones.weights_file_in(Path(args.weights), backbones.get(str(name)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tuner import budget, export_best, search

    data = Path(args.data)
    name = f"{args.name or search._name_from_data(data)}-quality"
    folder = Path(args.results) / name
    split_file, images = split_data(args, folder)
    weights = None if args.weights == "none" else args.weights
    wanted = {
        **RECIPE,
        "backbone": args.recipe_backbone,
        "image_size": args.recipe_size,
        "epochs": args.recipe_epochs,
    }
    check_weights(args, wanted["backbone"])  # before the recipe's quarter of an hour
    recipe_file = folder / "recipe.json"
    key = {"split": split_file.read_text(), "weights": args.weights, **wanted}
    saved = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    if saved.get("key") == key:
        recipe = saved["recipe"]
        print(f"1/3 the seeds' recipe: reusing its run in {recipe_file}", flush=True)
    else:
        print(f"1/3 the seeds' recipe on {split_file} ({wanted})", flush=True)
        recipe = run_recipe(split_file, images, weights, wanted)
        write_text(recipe_file, json.dumps({"key": key, "recipe": recipe}, indent=1) + "\n")
    budget_s = budget.parse_budget(args.budget) if args.budget else recipe["train_seconds"]
    print(
        f"recipe: test accuracy {recipe['test']['accuracy']:.4f} after "
        f"{budget.format_seconds(recipe['train_seconds'])} of training",
        flush=True,
    )
    print(f"2/3 the search, --budget {budget_s:.0f}s", flush=True)
    search_argv = [
        "--data",
        str(split_file),
        "--images",
        str(images),
        "--weights",
        args.weights,
        "--budget",
        f"{budget_s:.3f}s",
        "--name",
        "search",
        "--results",
        str(folder),
        "--overwrite",
        *(["--space", args.space] if args.space else []),
        *[item for value in args.set for item in ("--set", value)],
    ]
    started = time.monotonic()
    code = search.main(search_argv)
    search_seconds = time.monotonic() - started
    if code != 0:
        raise InputError(f"the search ended with exit code {code}: see its output above")
    print("3/3 export_best", flush=True)
    export_best.main(["--results", str(folder / "search")])
    exported = json.loads((folder / "search" / "best" / "metrics.json").read_text())
    report = {
        "recipe": recipe,
        "search": {
            "budget_s": budget_s,
            "wall_seconds": search_seconds,
            "trial_id": exported["trial_id"],
            "backbone": exported["backbone"],
            "image_size": exported["image_size"],
            "val_accuracy": exported["validation"]["accuracy"],
            "test": {k: exported["test"][k] for k in ("count", "accuracy", "balanced_accuracy")},
        },
    }
    report["difference"] = report["search"]["test"]["accuracy"] - recipe["test"]["accuracy"]
    report["split_ranges"] = {"test": args.test_range, "validation": args.validation_range}
    # Equal wall clock only when the search had the recipe's time and kept to it.
    report["equal_wall_clock"] = (
        args.budget is None and search_seconds <= OVER_TIME * recipe["train_seconds"]
    )
    (folder / "bench_quality.json").write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    from tuner.budget import format_seconds

    recipe, found = report["recipe"], report["search"]
    print(f"{'':<28}{'test acc':>9}{'balanced':>10}{'time':>10}  model")
    print(
        f"{'seeds recipe':<28}{recipe['test']['accuracy']:>9.4f}"
        f"{recipe['test']['balanced_accuracy']:>10.4f}"
        f"{format_seconds(recipe['train_seconds']):>10}  "
        f"{recipe['backbone']} {recipe['image_size']}px frozen, Dense, {recipe['epochs']} epochs"
    )
    print(
        f"{'search + export_best':<28}{found['test']['accuracy']:>9.4f}"
        f"{found['test']['balanced_accuracy']:>10.4f}"
        f"{format_seconds(found['wall_seconds']):>10}  "
        f"trial {found['trial_id']}: {found['backbone']} {found['image_size']}px"
    )
    ranges = report.get("split_ranges", {})
    print(
        f"test images: {recipe['test']['count']} (test buckets {ranges.get('test', '?')}, "
        f"validation buckets {ranges.get('validation', '?')})"
    )
    print(quality_line(report))


def quality_line(report: dict) -> str:
    """The closing line; "at equal wall clock" only when it was."""
    from tuner.budget import format_seconds

    line = f"quality: {report['difference']:+.3f} test accuracy"
    if report.get("equal_wall_clock", True):
        return f"{line} at equal wall clock"
    return (
        f"{line} (the search took {format_seconds(report['search']['wall_seconds'])} against "
        f"the recipe's {format_seconds(report['recipe']['train_seconds'])}: not equal wall clock)"
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
