"""Search quality against the baselines a Keras user would run, over folds, on your own data.

    python -m tuner.bench_quality --data label.csv [--images DIR] [--weights imagenet|FOLDER]
        [--baseline seed|keras-example|hyperband|longer|all] [--folds 3]
        [--test-range 0-63 --validation-range 64-127] [--image-size N]
        [--space FILE] [--set KEY=VALUE]

For each of ``--folds`` K disjoint rotations of the test and validation bucket ranges (fold
i shifts both by i times the test range's width, wrapping past bucket 255 to 0: test 0-63 /
validation 64-127, then 64-127 / 128-191, 128-191 / 192-255 and, for ``--folds 4``, 192-255 /
0-63, so that four folds test every bucket once), on the package's split of ``--data`` for that fold
(``results/<name>-quality/fold<i>/split_label.csv``, as ``python -m data_tools.split``):

* ``seed``: the seeds' hand recipe: the frozen B0 (same weights), a Dense softmax (sigmoid
  for two classes) on its pooled features, Adam at Keras' defaults, 10 epochs of batch 512
  (the seeds' B0 run), every image decoded and run through the backbone each epoch;
* ``keras-example``: keras-io's ``image_classification_efficientnet_fine_tuning.py``: the
  frozen B0, GlobalAveragePooling, BatchNormalization, Dropout 0.2, a Dense softmax; its
  augmentation (RandomRotation 0.15, RandomTranslation 0.1, RandomFlip, RandomContrast 0.1)
  on the train batches; Adam at 1e-2 for 25 epochs of batch 64; then its last 20 layers
  unfrozen (BatchNormalization kept frozen) and Adam at 1e-5 for 4 epochs;
* ``hyperband``: ``python -m tuner.search --set algorithm=hyperband`` over the same space,
  with the same budget as ours;
* ``longer`` (not in ``all``: it is slow): our own search at 4x the budget; its test
  accuracy minus ours is the **regret**, what the budget left on the table;
* ours: ``python -m tuner.search`` (the space's own algorithm) then ``export_best`` (knee
  rule), once with each hand recipe's training time as its budget (the seed's, and the
  longest: the budget of ``hyperband`` too), or ``--budget`` for all.

Hand recipes train at ``--image-size`` (default: the backbone's native size; the searches
then keep their space's sizes; given, the searches get ``--set image_size=N`` too), their
training time is the time of their ``fit`` calls, and their last epoch is evaluated once on
the fold's test split. A search's time is its whole wall clock; its model is evaluated on
test once, by ``export_best``. Nothing reads test before.

The report gives every fold's numbers, then per baseline our mean test accuracy minus its
over the folds with a 95% paired confidence interval (Student's t over the K paired
differences), and ends with one line per baseline::

    quality vs keras-example: +0.123 (95% CI +0.050..+0.196) over 3 folds at equal wall clock

("at equal wall clock" only when each fold's search kept within 10% of the baseline's time;
otherwise the line gives the times). Everything is written to ``bench_quality.json``.

Each method's result is kept in ``fold<i>/<method>.json`` and reused by a later run on the
same split, weights and settings (a killed run goes on where it stopped); delete a file to
run that method again. A baseline that cannot run (``keras-example`` on a ``hub:`` backbone,
which it cannot unfreeze) is skipped with one line; the others still run.

``--baseline all --folds 3`` took 62 minutes on 1,873 images at ``--image-size 128`` on a
2-core CPU; at 224 px expect 5-7x that (the seed recipe's 10 epochs took 1m42s at 128 px,
12m29s at 224 px).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.atomic import write_text
from data_tools.errors import InputError, run_cli
from data_tools.split import DEFAULT_TEST_RANGE, DEFAULT_VALIDATION_RANGE, parse_range

SEED = {"backbone": "B0", "epochs": 10, "batch_size": 512}
KERAS_EXAMPLE = {
    "backbone": "B0",
    "epochs": 25,
    "batch_size": 64,
    "learning_rate": 1e-2,
    "dropout": 0.2,
    "unfrozen_layers": 20,
    "finetune_epochs": 4,
    "finetune_learning_rate": 1e-5,
}
BASELINES = ("seed", "keras-example", "hyperband", "longer")
ALL = ("seed", "keras-example", "hyperband")
HAND = ("seed", "keras-example")
LONGER = 4  # the longer search's budget, in budgets
BUCKETS = 256  # hash buckets 0..255 (data_tools.split)
# A search whose wall clock (start-up, split and records included) passes its baseline's
# time by more than this is not "at equal wall clock".
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
    parser.add_argument(
        "--baseline",
        default="all",
        help=f"comma-separated from {', '.join(BASELINES)}, or all (= {', '.join(ALL)})",
    )
    parser.add_argument("--folds", type=int, default=3, help="rotations of the ranges (3)")
    parser.add_argument("--test-range", default=_text(DEFAULT_TEST_RANGE), help="fold 1's")
    parser.add_argument("--validation-range", default=_text(DEFAULT_VALIDATION_RANGE))
    parser.add_argument("--image-size", type=int, help="the recipes' (and searches') size")
    parser.add_argument("--space", help="the searches' space file (default: default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", help="results/<name>-quality/ (default: from the data)")
    parser.add_argument("--results", default="results", help="results root folder")
    parser.add_argument("--budget", help="every search's budget (default: the recipes' times)")
    quick = parser.add_argument_group("quicker, smaller recipes (default: the originals)")
    quick.add_argument("--recipe-backbone", default=SEED["backbone"], help="both recipes'")
    quick.add_argument("--recipe-epochs", type=int, default=SEED["epochs"], help="seed's")
    quick.add_argument("--recipe-batch", type=int, default=SEED["batch_size"], help="seed's")
    quick.add_argument(
        "--example-epochs",
        default=f"{KERAS_EXAMPLE['epochs']},{KERAS_EXAMPLE['finetune_epochs']}",
        help="keras-example's frozen and fine-tune epochs",
    )
    return parser


def _text(pair: tuple[int, int]) -> str:
    return f"{pair[0]}-{pair[1]}"


def parse_baselines(text: str) -> list[str]:
    """``'all'`` or a comma-separated list -> the baselines, in :data:`BASELINES` order."""
    wanted = {item.strip() for item in text.split(",") if item.strip()}
    if "all" in wanted:
        wanted = (wanted - {"all"}) | set(ALL)
    unknown = sorted(wanted - set(BASELINES))
    if unknown or not wanted:
        raise InputError(
            f"--baseline {text}: {', '.join(unknown) or 'none given'} is not a baseline; "
            f"choose from {', '.join(BASELINES)} or all"
        )
    return [name for name in BASELINES if name in wanted]


def fold_ranges(test: str, validation: str, folds: int) -> list[dict[str, str]]:
    """The K folds' ``{"test": "a-b", "validation": "c-d"}``: fold i shifts both ranges by
    i times the test range's width, wrapping past the last bucket to the first (K-fold
    cross-validation: with 64-wide ranges, four folds test every bucket once). The test
    ranges are disjoint, and no shifted range may straddle the wrap."""
    low, high = parse_range(test)
    vlow, vhigh = parse_range(validation)
    if not (0 <= low <= high < BUCKETS and 0 <= vlow <= vhigh < BUCKETS):
        raise InputError(
            f"--test-range {test} / --validation-range {validation}: ranges are LOW-HIGH "
            f"within the hash buckets 0-{BUCKETS - 1}"
        )
    width = high - low + 1

    def shifted(i: int) -> dict[str, tuple[int, int]] | None:
        out = {}
        for key, (a, b) in (("test", (low, high)), ("validation", (vlow, vhigh))):
            a, b = (a + i * width) % BUCKETS, (b + i * width) % BUCKETS
            if a > b:
                return None  # the range would straddle the wrap
            out[key] = (a, b)
        return out

    largest = 0
    while (largest + 1) * width <= BUCKETS and shifted(largest) is not None:
        largest += 1
    if not 1 <= folds <= largest:
        raise InputError(
            f"--folds {folds}: test buckets {test} and validation buckets {validation}, "
            f"shifted by {width} buckets a fold (wrapping past {BUCKETS - 1}), fit "
            f"{largest} fold(s) with disjoint test buckets; pass --folds {largest} or "
            f"narrower ranges"
        )
    return [
        {key: _text(span) for key, span in shifted(i).items()}  # type: ignore[union-attr]
        for i in range(folds)
    ]


def split_data(args: argparse.Namespace, folder: Path, ranges: dict[str, str]) -> tuple[Path, Path]:
    """The package's split of ``--data`` with ``ranges`` (written again when a later run asks
    for other ranges: ``split_ranges.json`` records them); returns (split file, images)."""
    from data_tools import split

    data = Path(args.data)
    if not data.exists():
        raise InputError(f"--data {data} does not exist: pass a label.csv or a class folder")
    images = (
        Path(args.images) if args.images else (data if data.is_dir() else data.parent / "images")
    )
    target, record = folder / "split_label.csv", folder / "split_ranges.json"
    recorded = json.loads(record.read_text()) if record.is_file() else None
    if not target.is_file() or recorded != ranges:
        folder.mkdir(parents=True, exist_ok=True)
        split.split_files(
            data,
            target,
            images=None if data.is_dir() else images,
            test_range=parse_range(ranges["test"]),
            validation_range=parse_range(ranges["validation"]),
        )
        write_text(record, json.dumps(ranges) + "\n")
    print(f"split: test buckets {ranges['test']}, validation buckets {ranges['validation']}")
    return target, images


def _recipe_data(split_file: Path, images: Path) -> tuple[dict, Any, list[str]]:
    from data_tools import ingest
    from tuner.report import evaluate

    config = {"data": str(split_file), "images": str(images)}
    frame = ingest.read_split_csv(split_file)
    config["classes"] = ingest.class_names(frame["value"])
    table, _ = evaluate.split_table(config, ("train", "validation"))
    return config, table, config["classes"]


def _dataset(table, split: str, size: int, batch: int, shuffle: bool, augment=None):
    import tensorflow as tf

    from data_tools import pipeline

    rows = table[table["type"] == split]
    data = pipeline.make_dataset(rows, size, batch, shuffle=shuffle)
    data = data.map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augment is not None:  # as the example maps its augmentation over the train batches
        data = data.map(lambda x, y: (augment(x, training=True), y))
    return data


def _evaluate(model, config: dict, size: int, seconds: float, history: dict, facts: dict) -> dict:
    """The one test evaluation of a hand recipe's last epoch, and what it ran."""
    from tuner.report import evaluate

    pixels, labels, _ = evaluate.test_pixels(config, size)
    probs = evaluate.probabilities(model, pixels)
    metrics = evaluate.test_metrics(labels, probs, config["classes"])
    return {
        "train_seconds": seconds,
        "val_accuracy_last_epoch": float(history["val_accuracy"][-1]),
        "test": {k: metrics[k] for k in ("count", "accuracy", "balanced_accuracy", "loss")},
        "classes": config["classes"],
        "image_size": size,
        **facts,
    }


def run_recipe(split_file: Path, images: Path, weights: str | None, recipe: dict) -> dict:
    """The seeds' recipe (``recipe``: backbone, image size, epochs, batch) on the split: its
    test metrics, training seconds and what it ran."""
    import keras

    from tuner.model import backbones

    config, table, classes = _recipe_data(split_file, images)
    size, batch = recipe["image_size"], recipe["batch_size"]
    model = recipe_model(backbones.get(recipe["backbone"]), size, weights, len(classes))
    binary = len(classes) == 2
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    train = _dataset(table, "train", size, batch, True)
    val = _dataset(table, "validation", size, batch, False)
    started = time.monotonic()
    history = model.fit(train, validation_data=val, epochs=recipe["epochs"], verbose=2)
    seconds = time.monotonic() - started
    return _evaluate(model, config, size, seconds, history.history, recipe)


def recipe_model(entry, size: int, weights: str | None, classes: int):
    """The recipe's model: uint8-valued pixels -> the backbone's input scale (0..1 for a
    TF-Hub module, as the seeds rescaled by 1/255) -> the frozen backbone -> a Dense
    softmax (sigmoid for two classes)."""
    import keras

    from tuner.model import backbones

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


def keras_example_model(entry, size: int, weights: str | None, classes: int):
    """keras-io's EfficientNet fine-tuning example's model, with ``(model, backbone)``:
    the frozen backbone (pooled: its GlobalAveragePooling), BatchNormalization, Dropout 0.2
    and a Dense softmax. As in the example (one flat functional graph), the backbone's
    stochastic depth runs during ``fit``."""
    import keras

    from tuner.model import backbones

    base = backbones.build(entry, size, weights)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = base(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(KERAS_EXAMPLE["dropout"], name="top_dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="pred")(x)
    return keras.Model(inputs, outputs, name="EfficientNet"), base


def unfreeze_like_the_example(model, base, count: int = KERAS_EXAMPLE["unfrozen_layers"]):
    """The example's ``unfreeze_model``: of the flat model's last ``count`` layers (its 3
    head layers after the pooling, then the backbone's last layers, the pooling included),
    every one but BatchNormalization becomes trainable. Returns the backbone layers
    unfrozen."""
    import keras

    head = model.layers[model.layers.index(base) + 1 :]
    tail = base.layers[-(count - len(head)) :]
    base.trainable = True
    chosen = {id(layer) for layer in tail}
    for layer in base.layers:
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = id(layer) in chosen and not batch_norm
    return [layer.name for layer in tail if layer.trainable]


def example_augmentation():
    """The example's ``img_augmentation`` layers (Keras defaults otherwise: RandomFlip flips
    both ways, RandomContrast takes 0..255)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomRotation(factor=0.15),
            keras.layers.RandomTranslation(height_factor=0.1, width_factor=0.1),
            keras.layers.RandomFlip(),
            keras.layers.RandomContrast(factor=0.1),
        ],
        name="img_augmentation",
    )


def run_keras_example(split_file: Path, images: Path, weights: str | None, recipe: dict) -> dict:
    """keras-io's EfficientNet fine-tuning recipe on the split (see the module docstring)."""
    import keras

    from tuner.model import backbones

    config, table, classes = _recipe_data(split_file, images)
    size, batch = recipe["image_size"], recipe["batch_size"]
    model, base = keras_example_model(
        backbones.get(recipe["backbone"]), size, weights, len(classes)
    )
    train = _dataset(table, "train", size, batch, True, example_augmentation())
    val = _dataset(table, "validation", size, batch, False)

    def fit(rate: float, epochs: int):
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model.fit(train, validation_data=val, epochs=epochs, verbose=2).history

    started = time.monotonic()
    history = fit(recipe["learning_rate"], recipe["epochs"])
    unfrozen = unfreeze_like_the_example(model, base, recipe["unfrozen_layers"])
    history = fit(recipe["finetune_learning_rate"], recipe["finetune_epochs"])
    seconds = time.monotonic() - started
    return _evaluate(model, config, size, seconds, history, {**recipe, "unfrozen": len(unfrozen)})


def check_weights(args: argparse.Namespace, recipe_backbone: str) -> None:
    """The recipes' and the searches' backbones have weights (one line naming the fix)."""
    from rich.console import Console

    from tuner import search
    from tuner.engine import session
    from tuner.model import backbones, space

    overrides = space.parse_overrides(args.set)
    searched = space.load(args.space or search.SPACES / "default.yaml", overrides)
    wanted = space.load(None, {"backbones": [recipe_backbone, *searched.backbones]})
    session.resolve_weights(args.weights, wanted, demo=False, console=Console())
    if args.weights not in ("imagenet", "none"):
        for name in wanted.backbones:
            backbones.weights_file_in(Path(args.weights), backbones.get(str(name)))


def skipped(baseline: str, args: argparse.Namespace) -> str | None:
    """Why ``baseline`` cannot run with these arguments (None: it can)."""
    from tuner.model import backbones

    if baseline == "keras-example" and not backbones.get(args.recipe_backbone).finetunable:
        return (
            f"keras-example skipped: {args.recipe_backbone} is a frozen TF-Hub module, and "
            f"the example unfreezes its last {KERAS_EXAMPLE['unfrozen_layers']} layers"
        )
    if baseline == "hyperband" and "algorithm=hyperband" in [s.replace(" ", "") for s in args.set]:
        return "hyperband skipped: the searched algorithm is hyperband already (--set)"
    return None


def _kept(path: Path, key: dict, label: str, run) -> dict:
    """``run()``'s result, or the one kept in ``path`` for the same ``key``."""
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") == key:
        print(f"{label}: reusing its run in {path}", flush=True)
        return saved["result"]
    result = run()
    write_text(path, json.dumps({"key": key, "result": result}, indent=1) + "\n")
    return result


def run_search(
    args: argparse.Namespace,
    split_file: Path,
    images: Path,
    folder: Path,
    name: str,
    budget_s: float,
    sets: Sequence[str] = (),
) -> dict:
    """``tuner.search`` with ``budget_s``, then ``export_best``: its exported model's
    numbers (test read once, by the export)."""
    from tuner import export_best, search

    argv = [
        *("--data", str(split_file), "--images", str(images), "--weights", args.weights),
        *("--budget", f"{budget_s:.3f}s", "--name", name, "--results", str(folder)),
        "--overwrite",
        *(["--space", args.space] if args.space else []),
        *[item for value in [*args.set, *sets] for item in ("--set", value)],
    ]
    started = time.monotonic()
    code = search.main(argv)
    wall = time.monotonic() - started
    if code != 0:
        raise InputError(f"the search {name} ended with exit code {code}: see its output above")
    export_best.main(["--results", str(folder / name)])
    exported = json.loads((folder / name / "best" / "metrics.json").read_text())
    hp = exported.get("hyperparameters", {})
    return {
        "budget_s": budget_s,
        "wall_seconds": wall,
        "trial_id": exported["trial_id"],
        "backbone": exported["backbone"],
        "image_size": exported["image_size"],
        "finetune_fraction": hp.get("finetune_fraction"),
        "head_width": hp.get("head_width"),
        "val_accuracy": exported["validation"]["accuracy"],
        "test": {k: exported["test"][k] for k in ("count", "accuracy", "balanced_accuracy")},
    }


def run_fold(args: argparse.Namespace, index: int, ranges: dict, wanted: list[str]) -> dict:
    """Every method on fold ``index``: each method's result and the comparisons."""
    from tuner.engine import budget
    from tuner.report.text import format_seconds

    folder = Path(args.results) / f"{_name(args)}-quality" / f"fold{index + 1}"
    split_file, images = split_data(args, folder, ranges)
    weights = None if args.weights == "none" else args.weights
    split_sha = hashlib.sha1(split_file.read_bytes()).hexdigest()
    base_key = {"split": split_sha, "weights": args.weights}
    size = args.image_size or _native(args.recipe_backbone)
    frozen, tuned = (int(n) for n in args.example_epochs.split(","))
    recipes = {
        "seed": (
            run_recipe,
            {
                **SEED,
                "backbone": args.recipe_backbone,
                "image_size": size,
                "epochs": args.recipe_epochs,
                "batch_size": args.recipe_batch,
            },
        ),
        "keras-example": (
            run_keras_example,
            {
                **KERAS_EXAMPLE,
                "backbone": args.recipe_backbone,
                "image_size": size,
                "epochs": frozen,
                "finetune_epochs": tuned,
            },
        ),
    }
    methods: dict[str, dict] = {}
    label = f"fold {index + 1}"
    for name in (n for n in HAND if n in wanted):
        function, recipe = recipes[name]
        print(f"{label}: {name} recipe ({recipe})", flush=True)
        methods[name] = _kept(
            folder / f"{name}.json",
            {**base_key, **recipe},
            f"{label}: {name}",
            lambda f=function, r=recipe: f(split_file, images, weights, r),
        )
        print(
            f"{label}: {name}: test accuracy {methods[name]['test']['accuracy']:.4f} after "
            f"{format_seconds(methods[name]['train_seconds'])} of training",
            flush=True,
        )
    times = {name: methods[name]["train_seconds"] for name in methods}
    if args.budget:
        main_budget = budget.parse_budget(args.budget)
    elif times:
        main_budget = max(times.values())
    else:
        raise InputError(
            f"--baseline {args.baseline}: no hand recipe to take the budget from; "
            f"add seed or keras-example, or pass --budget"
        )
    # Ours at each hand recipe's time (one search when they are the same budget).
    budgets = {name: main_budget if args.budget else times[name] for name in times}
    budgets["main"] = main_budget
    sizes = [f"image_size={args.image_size}"] if args.image_size else []
    search_key = {**base_key, "space": args.space, "set": [*args.set, *sizes]}
    ours: dict[float, dict] = {}
    for seconds in sorted(set(budgets.values())):
        tag = f"search-{seconds:.0f}s"
        print(f"{label}: our search, --budget {seconds:.0f}s", flush=True)
        ours[seconds] = _kept(
            folder / f"{tag}.json",
            {**search_key, "budget_s": seconds},
            f"{label}: our search at {seconds:.0f}s",
            lambda s=seconds, t=tag: run_search(args, split_file, images, folder, t, s, sizes),
        )
    extra = {"hyperband": (["algorithm=hyperband"], 1), "longer": ([], LONGER)}
    for name in (n for n in ("hyperband", "longer") if n in wanted):
        sets, times_budget = extra[name]
        seconds = main_budget * times_budget
        print(f"{label}: {name} search, --budget {seconds:.0f}s", flush=True)
        methods[name] = _kept(
            folder / f"{name}.json",
            {**search_key, "budget_s": seconds, "extra": sets},
            f"{label}: {name}",
            lambda s=seconds, e=sets, n=name: run_search(
                args, split_file, images, folder, n, s, [*sizes, *e]
            ),
        )
    comparisons = {}
    for name, theirs in methods.items():
        mine = ours[budgets.get(name, main_budget)]
        their_time = theirs.get("train_seconds", theirs.get("wall_seconds"))
        if name == "longer":
            equal = False
        elif name == "hyperband":
            equal = max(mine["wall_seconds"], theirs["wall_seconds"]) <= OVER_TIME * main_budget
        else:
            equal = not args.budget and mine["wall_seconds"] <= OVER_TIME * their_time
        comparisons[name] = {
            "ours": mine["test"]["accuracy"],
            "theirs": theirs["test"]["accuracy"],
            "difference": mine["test"]["accuracy"] - theirs["test"]["accuracy"],
            "our_seconds": mine["wall_seconds"],
            "their_seconds": their_time,
            "our_budget_s": mine["budget_s"],
            "equal_wall_clock": equal,
        }
    return {
        "fold": index + 1,
        "split_ranges": ranges,
        "methods": methods,
        "ours": {f"{s:.0f}s": r for s, r in ours.items()},
        "comparisons": comparisons,
    }


def _name(args: argparse.Namespace) -> str:
    from tuner import search

    return args.name or search._name_from_data(Path(args.data))


def _native(backbone: str) -> int:
    from tuner.model import backbones

    return backbones.get(backbone).size


def paired_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of paired differences (NaN for one pair)."""
    from scipy import stats

    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def summarise(folds: list[dict]) -> dict:
    """Per baseline: the per-fold differences, their mean and 95% paired interval."""
    summary = {}
    for name in BASELINES:
        rows = [fold["comparisons"][name] for fold in folds if name in fold["comparisons"]]
        if not rows:
            continue
        differences = [row["difference"] for row in rows]
        low, high = paired_interval(differences)
        summary[name] = {
            "mean": sum(differences) / len(differences),
            "ci95": [low, high],
            "per_fold": differences,
            "folds": len(rows),
            "equal_wall_clock": all(row["equal_wall_clock"] for row in rows),
            "our_seconds": [row["our_seconds"] for row in rows],
            "their_seconds": [row["their_seconds"] for row in rows],
        }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wanted = parse_baselines(args.baseline)
    folds = fold_ranges(args.test_range, args.validation_range, args.folds)
    for name in list(wanted):
        if reason := skipped(name, args):
            print(reason, flush=True)
            wanted.remove(name)
    check_weights(args, args.recipe_backbone)  # before the first recipe's quarter of an hour
    results = [run_fold(args, index, ranges, wanted) for index, ranges in enumerate(folds)]
    report = {"baselines": wanted, "folds": results, "summary": summarise(results)}
    folder = Path(args.results) / f"{_name(args)}-quality"
    write_text(folder / "bench_quality.json", json.dumps(report, indent=1) + "\n")
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    from tuner.report.text import format_seconds

    print(f"{'fold':<6}{'method':<16}{'test acc':>9}{'balanced':>10}{'time':>10}  model")
    for fold in report["folds"]:
        rows = [(n, m, m.get("train_seconds")) for n, m in fold["methods"].items()]
        rows += [(f"ours {s}", m, None) for s, m in fold["ours"].items()]
        for name, method, trained in rows:
            seconds = trained if trained is not None else method["wall_seconds"]
            if trained is not None:
                model = f"{method['backbone']} {method['image_size']}px, {method['epochs']} epochs"
            else:
                tuned = method.get("finetune_fraction") or 0
                model = f"trial {method['trial_id']}: {method['backbone']} {method['image_size']}px"
                model += f", top {tuned:.0%} fine-tuned" if tuned else ", frozen"
            print(
                f"{fold['fold']:<6}{name:<16}{method['test']['accuracy']:>9.4f}"
                f"{method['test']['balanced_accuracy']:>10.4f}{format_seconds(seconds):>10}  "
                f"{model}"
            )
        ranges = fold["split_ranges"]
        count = next(iter(fold["methods"].values()), next(iter(fold["ours"].values())))
        print(
            f"{'':<6}test images: {count['test']['count']} (test buckets {ranges['test']}, "
            f"validation buckets {ranges['validation']})"
        )
        budgets = ", ".join(
            f"vs {name} {format_seconds(row['our_budget_s'])}"
            for name, row in fold["comparisons"].items()
            if "our_budget_s" in row
        )
        if budgets:
            print(f"{'':<6}our search's budget: {budgets}")
    for name, row in report["summary"].items():
        per_fold = ", ".join(f"{d:+.3f}" for d in row["per_fold"])
        print(f"ours - {name} per fold: {per_fold}")
    for name, row in report["summary"].items():
        print(quality_line(name, row))


def quality_line(name: str, row: dict) -> str:
    """``quality vs <baseline>: +X.XXX (95% CI +L..+H) over K folds at equal wall clock``;
    for ``longer``, the regret; "at equal wall clock" only when it was."""
    from tuner.report.text import format_seconds

    low, high = row["ci95"]
    interval = "95% CI n/a: one fold" if math.isnan(low) else f"95% CI {low:+.3f}..{high:+.3f}"
    folds = f"over {row['folds']} fold{'s' if row['folds'] != 1 else ''}"
    if name == "longer":
        low, high = -high, -low
        interval = interval if math.isnan(low) else f"95% CI {low:+.3f}..{high:+.3f}"
        return (
            f"regret vs longer: {-row['mean']:+.3f} ({interval}) {folds}: test accuracy a "
            f"search at {LONGER}x the budget gained"
        )
    line = f"quality vs {name}: {row['mean']:+.3f} ({interval}) {folds}"
    if row["equal_wall_clock"]:
        return f"{line} at equal wall clock"
    ours = "/".join(format_seconds(s) for s in row["our_seconds"])
    theirs = "/".join(format_seconds(s) for s in row["their_seconds"])
    return f"{line} (ours took {ours} against {theirs}: not equal wall clock)"


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
