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
  with the same budget as ours (its brackets again until the budget is spent);
* ``longer`` (not in ``all``: it is slow): our own search at 4x the budget; its test
  accuracy minus ours is the **regret**, what the budget left on the table;
* ours: ``python -m tuner.search`` (the space's own algorithm) then ``export_best`` (knee
  rule, then the one-standard-error rule, as for every search here, ``hyperband`` and
  ``longer`` too), once with each hand recipe's training time as its budget (the seed's,
  and the longest: the budget of ``hyperband`` too), or ``--budget`` for all.

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
same split, weights and settings (a killed run goes on where it stopped); a search's settings
include its space file's content and the package's version, so an edited space or another
release searches again. Delete a file to run that method again. A baseline that cannot run
(``keras-example`` on a ``hub:`` backbone, which it cannot unfreeze) is skipped with one
line; the others still run.

``--baseline all --folds 3`` took 62 minutes on 1,873 images at ``--image-size 128`` on a
2-core CPU (a fourth fold about 21 more); at 224 px expect 5-7x that (the seed recipe's
10 epochs took 1m42s at 128 px, 12m29s at 224 px).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_tools import cli
from data_tools.atomic import write_text
from data_tools.errors import InputError, run_cli
from data_tools.split import DEFAULT_TEST_RANGE, DEFAULT_VALIDATION_RANGE, parse_range
from tuner.report.baselines import KERAS_EXAMPLE, SEED, run_keras_example, run_recipe
from tuner.report.quality import (
    ALL,
    BASELINES,
    HAND,
    LONGER,
    OVER_TIME,
    fold_ranges,
    print_report,
    range_text,
    summarise,
)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("tuner.bench_quality", __doc__)
    parser.add_argument("--data", required=True, help="label.csv or a class folder")
    parser.add_argument("--images", help="image folder (default: images/ beside --data)")
    parser.add_argument("--weights", default="imagenet", help="imagenet or a weights folder")
    parser.add_argument(
        "--baseline",
        default="all",
        help=f"comma-separated from {', '.join(BASELINES)}, or all (= {', '.join(ALL)})",
    )
    parser.add_argument("--folds", type=int, default=3, help="rotations of the ranges (3)")
    parser.add_argument("--test-range", default=range_text(DEFAULT_TEST_RANGE), help="fold 1's")
    parser.add_argument(
        "--validation-range",
        default=range_text(DEFAULT_VALIDATION_RANGE),
        help="fold 1's (the folds rotate both ranges)",
    )
    parser.add_argument("--image-size", type=int, help="the recipes' (and searches') size")
    parser.add_argument("--space", help="the searches' space file (default: default.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the searches' space overrides, as tuner.search's --set; repeatable",
    )
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


def check_weights(args: argparse.Namespace, recipe_backbone: str) -> None:
    """The recipes' and the searches' backbones have weights (one line naming the fix)."""
    from rich.console import Console

    from tuner.engine import folder
    from tuner.model import backbones, space

    overrides = space.parse_overrides(args.set)
    searched = space.load(args.space or space.shipped("default.yaml"), overrides)
    wanted = space.load(None, {"backbones": [recipe_backbone, *searched.backbones]})
    folder.resolve_weights(args.weights, wanted, demo=False, console=Console())
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
        "features": hp.get("features", "top"),
        "val_accuracy": exported["validation"]["accuracy"],
        "test": {k: exported["test"][k] for k in ("count", "accuracy", "balanced_accuracy")},
    }


def space_key(space_file: str | None) -> dict:
    """What a kept search result was searched with beside the split, weights and ``--set``:
    the space file, its content (an edited default.yaml is another space) and the package's
    version (another search method)."""
    from importlib import metadata

    from tuner.model import space

    path = space.resolve(space_file) if space_file else space.shipped("default.yaml")
    try:
        version = metadata.version("effnet-tuner")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "unknown"
    return {
        "space": space_file,
        "space_sha": hashlib.sha1(path.read_bytes()).hexdigest(),
        "version": version,
    }


@dataclass(frozen=True)
class _Fold:
    """One fold's data and where its results are kept."""

    args: argparse.Namespace
    folder: Path
    label: str  # "fold 2"
    split_file: Path
    images: Path | None
    key: dict  # what every kept result of the fold depends on: the split, the weights


def run_fold(args: argparse.Namespace, index: int, ranges: dict, wanted: list[str]) -> dict:
    """Every method on fold ``index``: each method's result and the comparisons. The steps:
    the fold's split; the hand recipes (their training times are our budgets unless
    ``--budget`` sets one); our searches at those budgets; the extra searches (hyperband,
    longer); each method against ours. Every result is kept and reused (:func:`_kept`)."""
    from tuner.report.choose import WITHIN_SE

    folder = Path(args.results) / f"{_name(args)}-quality" / f"fold{index + 1}"
    split_file, images = split_data(args, folder, ranges)
    split_sha = hashlib.sha1(split_file.read_bytes()).hexdigest()
    key = {"split": split_sha, "weights": args.weights}
    fold = _Fold(args, folder, f"fold {index + 1}", split_file, images, key)
    methods = _hand_recipes(fold, wanted)
    main_budget, budgets = _budgets(args, methods)
    sizes = [f"image_size={args.image_size}"] if args.image_size else []
    # The export's choice is part of a search's result: a kept one from another rule is rerun.
    choice = {"rule": "knee", "within_se": WITHIN_SE}
    search_key = {**key, **space_key(args.space), "set": [*args.set, *sizes], "choice": choice}
    ours: dict[float, dict] = {}
    for seconds in sorted(set(budgets.values())):
        tag = f"search-{seconds:.0f}s"
        print(f"{fold.label}: our search, --budget {seconds:.0f}s", flush=True)
        ours[seconds] = _kept(
            folder / f"{tag}.json",
            {**search_key, "budget_s": seconds},
            f"{fold.label}: our search at {seconds:.0f}s",
            lambda s=seconds, t=tag: run_search(args, split_file, images, folder, t, s, sizes),
        )
    methods |= _extra_searches(fold, wanted, main_budget, search_key, sizes)
    comparisons = {
        name: _comparison(args, name, theirs, ours[budgets.get(name, main_budget)], main_budget)
        for name, theirs in methods.items()
    }
    return {
        "fold": index + 1,
        "split_ranges": ranges,
        "methods": methods,
        "ours": {f"{s:.0f}s": r for s, r in ours.items()},
        "comparisons": comparisons,
    }


def _hand_recipes(fold: _Fold, wanted: list[str]) -> dict[str, dict]:
    """The hand recipes asked for (seed, keras-example), each trained on the fold."""
    from tuner.report.text import format_seconds

    args = fold.args
    weights = None if args.weights == "none" else args.weights
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
    for name in (n for n in HAND if n in wanted):
        function, recipe = recipes[name]
        print(f"{fold.label}: {name} recipe ({recipe})", flush=True)
        methods[name] = _kept(
            fold.folder / f"{name}.json",
            {**fold.key, **recipe},
            f"{fold.label}: {name}",
            lambda f=function, r=recipe: f(fold.split_file, fold.images, weights, r),
        )
        print(
            f"{fold.label}: {name}: test accuracy {methods[name]['test']['accuracy']:.4f} "
            f"after {format_seconds(methods[name]['train_seconds'])} of training",
            flush=True,
        )
    return methods


def _budgets(args: argparse.Namespace, methods: dict[str, dict]) -> tuple[float, dict]:
    """(the main budget: ``--budget``, else the longest hand recipe's training time; our
    budget against each method: the main one, or under no ``--budget`` that recipe's time)."""
    from tuner.engine import budget

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
    budgets = {name: main_budget if args.budget else times[name] for name in times}
    return main_budget, budgets | {"main": main_budget}


def _extra_searches(
    fold: _Fold, wanted: list[str], main_budget: float, search_key: dict, sizes: list[str]
) -> dict[str, dict]:
    """Hyperband at the main budget, and ours at :data:`LONGER` times it, as asked."""
    extra = {"hyperband": (["algorithm=hyperband"], 1), "longer": ([], LONGER)}
    methods = {}
    for name in (n for n in ("hyperband", "longer") if n in wanted):
        sets, times_budget = extra[name]
        seconds = main_budget * times_budget
        print(f"{fold.label}: {name} search, --budget {seconds:.0f}s", flush=True)
        methods[name] = _kept(
            fold.folder / f"{name}.json",
            {**search_key, "budget_s": seconds, "extra": sets},
            f"{fold.label}: {name}",
            lambda s=seconds, e=sets, n=name: run_search(
                fold.args, fold.split_file, fold.images, fold.folder, n, s, [*sizes, *e]
            ),
        )
    return methods


def _comparison(
    args: argparse.Namespace, name: str, theirs: dict, mine: dict, main_budget: float
) -> dict:
    """Ours against one method: the test accuracies, the times, and whether the two ran at
    equal wall clock (within :data:`OVER_TIME`; never for ``longer``)."""
    their_time = theirs.get("train_seconds", theirs.get("wall_seconds"))
    if name == "longer":
        equal = False
    elif name == "hyperband":
        equal = max(mine["wall_seconds"], theirs["wall_seconds"]) <= OVER_TIME * main_budget
    else:
        equal = not args.budget and mine["wall_seconds"] <= OVER_TIME * their_time
    return {
        "ours": mine["test"]["accuracy"],
        "theirs": theirs["test"]["accuracy"],
        "difference": mine["test"]["accuracy"] - theirs["test"]["accuracy"],
        "our_seconds": mine["wall_seconds"],
        "their_seconds": their_time,
        "our_budget_s": mine["budget_s"],
        "equal_wall_clock": equal,
    }


def _name(args: argparse.Namespace) -> str:
    from tuner import search

    return args.name or search.name_from_data(Path(args.data))


def _native(backbone: str) -> int:
    from tuner.model import backbones

    return backbones.get(backbone).size


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


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
