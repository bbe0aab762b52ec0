"""A search's folder before its first trial (:func:`prepare`): under the folder's lock, the
data and its split, the weights, the caches' folder and budget, then a dry run's plan or the
config checked against a resumed search's and written, with the stamps of the files it
reads."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from data_tools import atomic, ingest
from data_tools import split as split_mod
from data_tools.atomic import write_text
from data_tools.errors import InputError
from tuner.engine.distribute import Role


@dataclass(frozen=True)
class SearchRequest:
    """The command line, resolved: explicit arguments for :func:`run_search`."""

    data: str | None
    images: str | None
    space: str
    budget_s: float
    name: str
    results: str
    algorithm: str | None
    weights: str
    seed: int | None
    overrides: dict[str, Any]
    overwrite: bool
    cache: str
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: str | None = None
    tensorboard: bool = True  # results/<name>/tensorboard (tuner/report/tensorboard_log.py)
    feature_cache: bool = True
    mixed_precision: str = "auto"
    xla: str = "auto"
    role: Role = Role("single")
    strategy: str = "none"
    gpu_free_mib: float | None = None  # read before TensorFlow was loaded
    cache_dir: str | None = None  # default: results/<name>/cache
    cache_budget: str | None = None  # default: a share of the free space (tuner/model/disk.py)
    dry_run: bool = False  # print the plan, train nothing
    costs: str | None = None  # a cost table for the dry run (tuner/engine/plan.py)
    test_range: tuple[int, int] = split_mod.DEFAULT_TEST_RANGE  # when it splits a label.csv
    validation_range: tuple[int, int] = split_mod.DEFAULT_VALIDATION_RANGE
    split_key: str = "auto"  # the split key's rule when it splits (data_tools/split.py)
    max_pixels: int = 40_000_000  # images declaring more are refused (data_tools/header.py)


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` hands on to the search."""

    out: Path
    space: Any  # the search space (random search when the weights are random)
    table: pd.DataFrame  # train and validation rows
    classes: list[str]
    weights: str | None  # what the backbone constructors get
    weights_label: str  # the weights as the records name them
    accelerated: dict[str, Any]  # mixed precision, XLA, free GPU memory
    cache_dir: Path
    cache_budget: Any  # tuner.model.disk.Budget
    config: dict[str, Any]  # config.yaml
    split_warning: str | None


def prepare(request: SearchRequest, out: Path, space, ledger, console) -> Prepared | int:
    """Prepare ``out`` for the search; a dry run returns its exit code, having printed its
    plan. Processes of one machine prepare a folder one at a time (demo data, split,
    config); the lock lives in the temp folder, so a bad input leaves nothing in the
    results, and the data comes first: a bad label file is reported before any weights are
    fetched."""
    from filelock import FileLock

    from tuner.model import accelerate, disk

    worker = request.role.kind == "worker"
    with FileLock(prepare_lock(out)):
        fresh = _new_folder(out)  # what to remove if this run fails before its first trial
        # the chief (or a lone search) says how it split
        table, classes, facts, warning, stamps = load_data(
            request, out, None if worker else console
        )
        space, weights, label = _weights(request, space, fresh, console)
        accelerated = accelerate.apply(request.mixed_precision, request.xla, request.gpu_free_mib)
        cache_dir = Path(request.cache_dir) if request.cache_dir else out / "cache"
        cache_budget = disk.open_budget(cache_dir, request.cache_budget)
        if not worker:  # what killed processes left half-written
            atomic.sweep(out)
            atomic.sweep(cache_dir)
        if request.dry_run:
            return _dry_run(request, space, table, ledger, cache_budget, console)
        config = {
            "name": request.name,
            "space_file": request.space,
            "space": space.as_dict(),
            "weights": label,
            "budget_s": request.budget_s,
            "feature_cache": request.feature_cache,
            "cache_dir": str(cache_dir),
            "strategy": request.strategy,
            "max_pixels": request.max_pixels,
            **accelerated,
            **facts,
        }
        _write(out, config, table, stamps, ledger, worker)
    return Prepared(
        out=out,
        space=space,
        table=table,
        classes=classes,
        weights=weights,
        weights_label=label,
        accelerated=accelerated,
        cache_dir=cache_dir,
        cache_budget=cache_budget,
        config=config,
        split_warning=warning,
    )


def _weights(
    request: SearchRequest, space, fresh: Path | None, console
) -> tuple[Any, str | None, str]:
    """(the space, the weights the constructors get, their label): a dry run needs none
    (it plans from costs); random weights turn the transfer algorithm into random search.
    Weights that cannot be had remove the folder this run has just made."""
    if request.dry_run:
        weights, label = None if request.weights == "none" else request.weights, request.weights
    else:
        try:
            weights, label = resolve_weights(request.weights, space, request.data is None, console)
        except InputError:
            if fresh is not None:  # the split written a moment ago: nothing of it stays
                shutil.rmtree(fresh, ignore_errors=True)
            raise
    if weights is None and space.algorithm == "transfer":
        # Random features are worth nothing frozen: every trial trains the whole network.
        console.print(
            "random weights: nothing to freeze or fine-tune, so the transfer algorithm's "
            "stages do not apply; searching at random instead (--algorithm random)"
        )
        space = dataclasses.replace(space, algorithm="random")
    return space, weights, label


def _dry_run(request: SearchRequest, space, table, ledger, cache_budget, console) -> int:
    """Print the plan from costs (``--dry-run``); returns its exit code."""
    from tuner.engine import plan

    table_costs = plan.load_costs(request.costs) if request.costs else None
    train_rows = int((table["type"] == "train").sum())
    return plan.dry_run(
        space,
        train_rows,
        len(table) - train_rows,
        max(ledger.remaining(), 0.0),
        table_costs,
        cache_budget,
        console,
    )


def _write(out: Path, config: dict[str, Any], table, stamps, ledger, worker: bool) -> None:
    """Check the config against a resumed search's, write it with the files' stamps (not a
    worker: the chief does) and hold every later read to those stamps: a file changed
    mid-search stops it."""
    from data_tools import pipeline

    check_resume(out, config)
    stamps = ingest.check_stamps(out / FILES, table["path"], stamps)
    out.mkdir(parents=True, exist_ok=True)
    if not worker:
        write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        if stamps is not None:
            write_text(out / FILES, stamps.to_csv(index=False))
        ledger.save()  # the deadline, for workers
    pipeline.expect_files(stamps if stamps is not None else ingest.read_stamps(out / FILES))


def _new_folder(out: Path) -> Path | None:
    """The outermost of ``out`` and its parents that does not exist yet (None: ``out``
    exists)."""
    new = None
    for folder in [out, *out.parents]:
        if folder.exists():
            break
        new = folder
    return new


def prepare_lock(out: Path) -> str:
    """The lock file for preparing ``out`` (one per results folder, in the temp folder)."""
    import hashlib
    import tempfile

    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"effnet-tuner-{key}.lock")


def load_data(request: SearchRequest, out: Path, console=None):
    """(train+validation table, class names, facts for the config, a warning when the
    balanced validation or test is too small to select on, else None, the split's record of
    its checked files or None) from ``--data`` (:func:`data_tools.split.search_table`).
    Splitting a label file here prints which split key it used on ``console``."""
    from data_tools import demo

    data = Path(request.data) if request.data else demo.ensure_demo(request.cache)
    found = split_mod.search_table(
        data,
        request.images,
        out / "split_label.csv",
        request.test_range,
        request.validation_range,
        request.split_key,
    )
    if found.key_line and console is not None:
        console.print(found.key_line, markup=False)
    return found.table, found.classes, found.facts, found.warning, found.stamps


def resolve_weights(choice: str, space, demo: bool, console) -> tuple[str | None, str]:
    """(what the backbone constructors get, a label for the records):
    :func:`tuner.model.backbones.resolve_weights`, except that the demo goes on with random
    weights, saying so, when ImageNet's cannot be had."""
    from tuner.model import backbones

    try:
        return backbones.resolve_weights(choice, space.backbones)
    except backbones.WeightsUnavailable as exc:
        if not demo:
            raise
        console.print(
            f"[yellow]warning:[/yellow] {exc}; the demo goes on with random weights, "
            f"training the whole network"
        )
        return None, "none (imagenet unavailable)"


FILES = "files.csv"  # path, size, mtime_ns of every train and validation image at the start


def check_resume(out: Path, config: dict[str, Any]) -> None:
    """A resumed search must use the same search space and data as the first run."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    for key in ("space", "data", "weights", "classes", "split_ranges", "split_key"):
        if key in ("split_ranges", "split_key") and key not in saved:
            continue  # a search from before they were recorded: the default ones
        if saved.get(key) != config.get(key):
            raise InputError(
                f"{out} holds a search with a different {key}: resume with the "
                f"same settings, pass --overwrite to start again, or pick a new "
                f"--name"
            )
