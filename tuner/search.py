"""Budgeted, resumable Keras Tuner search over EfficientNet transfer-learning classifiers.

    python -m tuner.search --budget 5m                       # the demo digits, quick.yaml
    python -m tuner.search --data label.csv --images images/ --budget 20h

``--data`` is a split file (``objectId,value,type``), an unsplit ``label.csv`` (split first,
exactly like ``python -m data_tools.split``; the split is saved with the results) or a
folder with one sub-folder per class. Without ``--data`` the demo digits are written to a
cache folder and ``search_spaces/quick.yaml`` is used.

Re-running with the same ``--name`` resumes: finished trials are kept and never repeated,
and the budget counts the time already spent. ``--overwrite`` starts again.

``--gpus 0,1`` runs a chief and one worker per GPU; ``--chief HOST:PORT`` and ``--worker
HOST:PORT`` run them by hand, on several machines (see :mod:`tuner.engine.distribute`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools import cli
from data_tools import split as split_mod
from data_tools.errors import InputError, run_cli
from tuner.engine.session import SearchRequest, run_search


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "effnet-tuner"


def build_parser() -> argparse.ArgumentParser:
    """The command's options (the Python API reads its defaults here too).

    Long: one ``add_argument`` after another, in the order ``--help`` lists them; split up,
    the help's order would live in another place than the options.
    """
    parser = cli.parser("tuner.search", __doc__)
    parser.add_argument(
        "--data", help="split_label.csv, label.csv or a class folder (default: the demo digits)"
    )
    parser.add_argument("--images", help="image folder (default: images/ beside --data)")
    split_mod.add_range_arguments(parser, "; used when --data is a label.csv or a class folder")
    split_mod.add_key_argument(parser, "; used when --data is a label.csv or a class folder")
    split_mod.add_max_pixels_argument(parser)
    parser.add_argument(
        "--space",
        help="search-space YAML (default: search_spaces/default.yaml; quick.yaml for the demo)",
    )
    parser.add_argument(
        "--budget",
        default="5m",
        help="wall clock for the whole search, across resumes: 20h, 90m, 45s, 1h30m",
    )
    parser.add_argument("--name", help="search name: results/<name>/ (default: from the data)")
    parser.add_argument("--results", default="results", help="results root folder")
    parser.add_argument(
        "--algorithm",
        choices=["transfer", "hyperband", "bayesian", "random"],
        help="transfer (default): frozen heads on cached features, then successive halving "
        "of fine-tunes, within the budget; the others for comparison",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (Keras' cache), none (random init) or a folder holding notop files "
        "(efficientnetb<N>_notop.h5, efficientnetv2-<b0..b3|s|m|l>_notop.h5)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="the search's random seed (heads' initialisation, shuffling, the oracle's draws); "
        "default: the space's seed",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a search-space key (value read as YAML); repeatable",
    )
    parser.add_argument("--overwrite", action="store_true", help="start the search again")
    parser.add_argument(
        "--feature-cache",
        choices=["on", "off"],
        default="on",
        help="train frozen heads on backbone features computed once (default)",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=["auto", "on", "off"],
        default="auto",
        help="mixed float16 (auto: on when a GPU is present)",
    )
    parser.add_argument(
        "--xla",
        choices=["auto", "on", "off"],
        default="auto",
        help="XLA compilation (auto: on when a GPU is present)",
    )
    parser.add_argument("--wandb-project", help="W&B project (default: effnet-tuner)")
    parser.add_argument("--wandb-entity", help="W&B entity (team or user)")
    parser.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        help="default: online with W&B credentials, else offline under results/<name>/wandb",
    )
    parser.add_argument(
        "--tensorboard",
        choices=["on", "off"],
        default="on",
        help="one TensorBoard run per finished trial (HParams and epoch curves) under "
        "results/<name>/tensorboard: tensorboard --logdir results/<name>/tensorboard",
    )
    parser.add_argument(
        "--cache", default=str(default_cache()), help="where the demo data is written"
    )
    parser.add_argument(
        "--cache-dir",
        help="where features, activations and decoded pixels are cached (default: "
        "results/<name>/cache); e.g. a larger or faster disk",
    )
    parser.add_argument(
        "--cache-budget",
        metavar="SIZE",
        help="the most the cache folder may hold, e.g. 40GB (default: half the free space on "
        "its disk at start); the search plans around it and says so",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the budget buys (stages, passes, heads, fine-tune rungs, disk, the "
        "expected end) and train nothing",
    )
    parser.add_argument(
        "--costs",
        metavar="FILE",
        help="with --dry-run: plan from this cost table (seconds an image per backbone) "
        "instead of a timed batch here; see tuner/engine/plan.py",
    )
    scale = parser.add_argument_group("scaling out (see README, 'Scaling out')")
    scale.add_argument(
        "--chief",
        metavar="HOST:PORT",
        help="serve Keras Tuner's oracle on HOST:PORT for --worker processes (trains nothing)",
    )
    scale.add_argument(
        "--worker", metavar="HOST:PORT", help="run trials handed out by the chief at HOST:PORT"
    )
    scale.add_argument(
        "--worker-id",
        help="this worker's name (unique; reuse it after a crash to rerun its trial); "
        "default: KERASTUNER_TUNER_ID, else <host>-gpu<N> or <host>-<pid>",
    )
    scale.add_argument(
        "--gpus",
        metavar="0,1,...",
        help="on this machine: start a chief and one worker per listed GPU",
    )
    scale.add_argument(
        "--strategy",
        choices=["none", "mirrored"],
        default="none",
        help="mirrored: each trial trains on all GPUs this process sees (MirroredStrategy)",
    )
    return parser


def resolve_request(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> SearchRequest:
    """The parsed command line as a :class:`SearchRequest`; ``overrides`` (the Python API's
    settings) stand in for ``--set``."""
    from tuner.model import accelerate

    # First, before anything loads TensorFlow: once TF has touched the GPU, most of its memory
    # is reserved, and the batch sizes scaled to the free memory would drop to the floor.
    free_mib = accelerate.gpu_free_mib()

    from tuner.engine import budget, distribute
    from tuner.model import disk, space

    if args.cache_budget is not None:
        disk.parse_size(args.cache_budget)  # a malformed size fails before any work
    if args.costs and not args.dry_run:
        raise InputError("--costs is what --dry-run plans from: add --dry-run, or drop --costs")
    demo = args.data is None
    if not demo and not Path(args.data).exists():
        raise InputError(
            f"--data {args.data} does not exist: pass a split_label.csv, a "
            f"label.csv or a folder with one sub-folder per class"
        )
    name = args.name or ("demo" if demo else name_from_data(Path(args.data)))
    default_space = space.shipped("quick.yaml" if demo else "default.yaml")
    return SearchRequest(
        data=args.data,
        images=args.images,
        space=args.space or str(default_space),
        budget_s=budget.parse_budget(args.budget),
        name=name,
        results=args.results,
        algorithm=args.algorithm,
        weights=args.weights,
        seed=args.seed,
        overrides=space.parse_overrides(args.set) if overrides is None else dict(overrides),
        overwrite=args.overwrite,
        cache=args.cache,
        wandb_project=args.wandb_project,
        wandb_entity=args.wandb_entity,
        wandb_mode=args.wandb_mode,
        feature_cache=args.feature_cache == "on",
        mixed_precision=args.mixed_precision,
        xla=args.xla,
        role=distribute.resolve_role(args.chief, args.worker, args.worker_id),
        strategy=args.strategy,
        gpu_free_mib=free_mib,
        cache_dir=args.cache_dir,
        cache_budget=args.cache_budget,
        dry_run=args.dry_run,
        costs=args.costs,
        test_range=args.test_range,
        validation_range=args.validation_range,
        split_key=args.key,
        tensorboard=args.tensorboard == "on",
        max_pixels=args.max_pixels,
    )


def name_from_data(data: Path) -> str:
    """The default ``--name``: the data's folder (a class folder's own name)."""
    return (data.name if data.is_dir() else data.parent.name or data.stem) or "search"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.gpus is not None:
        return launch_gpus(args, argv)
    return run_search(resolve_request(args))


def launch_gpus(args: argparse.Namespace, argv: list[str]) -> int:
    """``--gpus 0,1``: a chief and one worker per GPU on this machine, on loopback."""
    from tuner.engine import distribute

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise InputError(f"--gpus {args.gpus!r}: list distinct GPU numbers, e.g. --gpus 0,1,2,3")
    if args.chief or args.worker:
        raise InputError("--gpus starts its own chief and workers: drop --chief/--worker")
    request = resolve_request(args)
    out = Path(request.results) / request.name
    if request.overwrite and out.exists():
        shutil.rmtree(out)  # here, once, before any process uses the folder
    return distribute.launch(distribute.launcher_argv(argv), gpus)


class _Command(types.ModuleType):
    """This module, callable: ``tuner.search(...)`` is :func:`tuner.api.search` while ``python
    -m tuner.search`` and ``tuner.search.main`` stay the command (the package attribute and
    the submodule share one name, so the module takes the function's call)."""

    def __call__(self, *args: Any, **kwargs: Any):
        from tuner import api

        return api.search(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature(tuner.search), help in notebooks
        import inspect

        from tuner import api

        return inspect.signature(api.search)


sys.modules[__name__].__class__ = _Command


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
