"""One search, from a resolved command line to its results folder (``python -m tuner.search``'s
work): the data and the split, the weights, the hypermodel and its caches, the tuner of the
chosen algorithm with its budget ledger, W&B, the chief's service when distributed, and a
clean stop on a signal, a full disk or the end of the budget."""

from __future__ import annotations

import dataclasses
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from data_tools import atomic, header, ingest, progress
from data_tools import split as split_mod
from data_tools.atomic import write_text
from data_tools.errors import EXIT_INPUT_ERROR, InputError
from tuner.engine.distribute import Role
from tuner.report.text import format_seconds

EXIT_INTERRUPTED = 130
UNTIL_BUDGET = 10**6  # Hyperband iterations when hyperband_iterations is 0


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


def run_search(request: SearchRequest) -> int:
    """Run (or resume) one search; returns the exit code. Reads top to bottom."""
    from filelock import FileLock
    from rich.console import Console

    from tuner.engine import adapter, budget, distribute, plan, trial
    from tuner.model import accelerate, backbones, disk, hypermodel
    from tuner.model import space as space_mod
    from tuner.report.results import FINISHED, Results
    from tuner.report.wandb_log import WandbLogger

    adapter.require()  # a Keras Tuner that changed its internals stops here, in one line
    console = Console(highlight=False, soft_wrap=True)
    out = Path(request.results) / request.name
    role = request.role
    if request.overwrite and role.kind == "worker":
        raise InputError(
            "--overwrite on a --worker would delete the folder its chief is using: pass it "
            "to the chief (or to --gpus)"
        )
    if request.overwrite and out.exists():
        shutil.rmtree(out)
    overrides = dict(request.overrides)
    if request.algorithm:
        overrides["algorithm"] = request.algorithm
    if request.seed is not None:
        overrides["seed"] = request.seed
    space = space_mod.load(request.space, overrides)
    header.set_max_pixels(request.max_pixels)  # before any decode, the split's check included
    backbones.check_weights_choice(request.weights)  # a typo fails before the data is read
    # The clock starts before the data is read: splitting and caching count against the budget.
    # The chief (or the single process) owns it; workers follow the deadline it writes.
    if role.kind == "worker":
        ledger = budget.Ledger.follow(out / "budget.json", request.budget_s)
    else:
        ledger = budget.Ledger.open(out / "budget.json", request.budget_s)
    # Processes of one machine prepare the folder one at a time (demo data, split, config);
    # the lock lives in the temp folder, so a bad input leaves nothing in the results.
    with FileLock(prepare_lock(out)):
        fresh = _new_folder(out)  # what to remove if this run fails before its first trial
        # The data first: a bad label file is reported before any weights are fetched.
        quiet = role.kind == "worker"  # the chief (or a lone search) says how it split
        table, classes, data_facts, split_warning, split_stamps = load_data(
            request, out, None if quiet else console
        )
        try:
            weights, weights_label = (
                (None if request.weights == "none" else request.weights, request.weights)
                if request.dry_run  # plans from costs: no weights needed
                else resolve_weights(request.weights, space, request.data is None, console)
            )
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
        accelerated = accelerate.apply(request.mixed_precision, request.xla, request.gpu_free_mib)
        cache_dir = Path(request.cache_dir) if request.cache_dir else out / "cache"
        cache_budget = disk.open_budget(cache_dir, request.cache_budget)
        if role.kind != "worker":  # what killed processes left half-written
            atomic.sweep(out)
            atomic.sweep(cache_dir)
        if request.dry_run:
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
        config = {
            "name": request.name,
            "space_file": request.space,
            "space": space.as_dict(),
            "weights": weights_label,
            "budget_s": request.budget_s,
            "feature_cache": request.feature_cache,
            "cache_dir": str(cache_dir),
            "strategy": request.strategy,
            "max_pixels": request.max_pixels,
            **accelerated,
            **data_facts,
        }
        check_resume(out, config)
        stamps = ingest.check_stamps(out / FILES, table["path"], split_stamps)
        out.mkdir(parents=True, exist_ok=True)
        if role.kind != "worker":
            write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            if stamps is not None:
                write_text(out / FILES, stamps.to_csv(index=False))
            ledger.save()  # the deadline, for workers
        # From here every read is held to those stamps: a file changed mid-search stops it.
        from data_tools import pipeline

        pipeline.expect_files(stamps if stamps is not None else ingest.read_stamps(out / FILES))
    if split_warning and role.kind != "worker":
        console.print(split_warning, markup=False)

    results = Results(out)
    progress.status = lambda: (
        f"budget {format_seconds(ledger.spent())} spent, "
        f"{format_seconds(max(ledger.remaining(), 0))} left"
    )
    logger = WandbLogger(
        request.wandb_mode, request.wandb_project, request.wandb_entity, request.name, out, console
    )
    context = trial.SearchContext(
        ledger=ledger,
        results=results,
        console=console,
        weights_label=weights_label,
        facts=config,
        wandb=logger,
        role=role.kind,
        tensorboard=request.tensorboard,
    )
    data = hypermodel.SplitData(table, classes, cache_dir=str(cache_dir))
    model = hypermodel.EffNetHyperModel(
        space,
        data,
        weights,
        callbacks_factory=context.callbacks,
        feature_cache=request.feature_cache,
        jit_compile=bool(accelerated["xla"]),
        gpu_free_mib=accelerated["gpu_free_mib"],
    )
    tuner = make_tuner(
        trial.tuner_class(space.algorithm), model, space, out, strategy(request.strategy)
    )
    tuner.context = context
    model.store.disk = cache_budget
    sets = sweep_sets(role.kind, tuner.oracle, space, data, ledger, request.budget_s, console)
    if request.feature_cache and weights is not None:
        quiet = role.kind == "worker"  # the chief prints the plan
        plan.plan_cache(model, cache_budget, sets, space, data, None if quiet else console)
    if role.kind != "worker":  # the oracle's process prunes, whoever ran the trial
        keep_checkpoints(tuner.oracle, results, config.get("split_counts", {}).get("validation"))
        report_as_it_goes(tuner.oracle, out)
    if role.kind == "chief":
        distribute.budget_gate(
            tuner.oracle,
            lambda t: trial.chief_refusal(model, t.hyperparameters, context),
            lambda line: (ledger.save(), console.print(line)),
        )
        return serve_chief(tuner, context, ledger, role, console, results)

    console.print(
        f"search [bold]{request.name}[/bold]: {len(data.train)} train / "
        f"{len(data.validation)} validation images, {len(classes)} classes; "
        f"{space.algorithm}; weights {weights_label}; budget "
        f"{format_seconds(request.budget_s)}, "
        f"{format_seconds(max(ledger.remaining(), 0))} left"
    )
    code = 0
    with _stop_on_signals(context):
        try:
            tuner.search(verbose=0)
            why = getattr(tuner.oracle, "reason", "") or "the algorithm has no more trials to run"
            console.print(f"search finished: {why}")
        except trial.BudgetExhausted as exc:
            console.print(f"budget reached: {exc}")
        except trial.Interrupted:
            again = (
                f"stays with the chief and runs again when --worker-id {role.tuner_id} restarts"
                if role.kind == "worker"
                else "is discarded and will run again on resume"
            )
            console.print(
                f"[yellow]interrupted[/yellow]: the running trial {again}; finished trials are kept"
            )
            code = EXIT_INTERRUPTED
        except trial.DataChanged as exc:
            console.print(f"[red]stopped:[/red] {escape(str(exc))}", highlight=False)
            code = EXIT_INPUT_ERROR
        except trial.DiskFull as exc:
            console.print(
                f"[red]stopped: the disk is full[/red] ({exc}); the results written so far "
                f"are intact: free some space, then resume with the same command"
            )
            return 1  # writing the summary would fail too
        except RuntimeError as exc:
            if "consecutive failures" not in str(exc):
                raise
            console.print(
                f"[red]stopped: {space.max_consecutive_failures} trials failed in a "
                f"row[/red] (last: {exc.args[0].splitlines()[-1]}); reasons are in "
                f"{results.trials_csv}; raise max_consecutive_failures with --set to "
                f"go on"
            )
            code = 1
    ledger.save()
    if role.kind == "worker":  # the chief writes the summary once every worker is done
        mine = results.rows()
        mine = mine[mine["worker"] == role.tuner_id]
        ended = "" if code else f"; no more trials from the chief at {role.host}:{role.port}"
        console.print(
            f"worker {role.tuner_id}: {int(mine['status'].isin(FINISHED).sum())} finished "
            f"trial(s){ended}"
        )
        return code
    return finish_search(results, logger, config, ledger, console, code)


REPORT_EVERY_S = 60.0


def report_as_it_goes(oracle, out: Path, every_s: float = REPORT_EVERY_S) -> None:
    """After a trial ends, rewrite ``report.html`` when the last write is ``every_s`` old
    (the search's end writes it anyway): a long search can be looked at while it runs."""
    import time

    from tuner.report import html_report

    end_trial, last = oracle.end_trial, [time.monotonic()]

    def ended(trial, *args, **kwargs):
        result = end_trial(trial, *args, **kwargs)
        if time.monotonic() - last[0] >= every_s:
            html_report.write(out)
            last[0] = time.monotonic()
        return result

    oracle.end_trial = ended


def _new_folder(out: Path) -> Path | None:
    """The outermost of ``out`` and its parents that does not exist yet (None: ``out``
    exists)."""
    new = None
    for folder in [out, *out.parents]:
        if folder.exists():
            break
        new = folder
    return new


def keep_checkpoints(oracle, results, validation_count: int | None) -> None:
    """After each trial ends (here or on a worker), delete the checkpoints that no export
    could ship (:func:`tuner.report.choose.shippable`) and no later trial continues
    (:func:`tuner.engine.oracle.continued_from`): ``Results.prune_checkpoints``."""
    from tuner.engine.oracle import continued_from
    from tuner.report.choose import shippable

    end_trial = oracle.end_trial

    def ended(trial, *args, **kwargs):
        out = end_trial(trial, *args, **kwargs)
        keep = shippable(results.rows(), validation_count) | continued_from(oracle)
        results.prune_checkpoints(keep)
        return out

    oracle.end_trial = ended


def prepare_lock(out: Path) -> str:
    """The lock file for preparing ``out`` (one per results folder, in the temp folder)."""
    import hashlib
    import tempfile

    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"effnet-tuner-{key}.lock")


def finish_search(results, logger, config, ledger, console, code: int) -> int:
    """leaderboard.md, pareto.png, the W&B search run, the closing lines; returns ``code``."""
    from tuner.report import html_report
    from tuner.report.results import FINISHED, pareto_flags

    out = results.dir
    rows, leaderboard = results.write_summary()
    finished = int(rows["status"].isin(FINISHED).sum())
    print(leaderboard)
    logger.log_search(rows, pareto_flags(rows), config, leaderboard, out / "pareto.png")
    if html_report.write(out):
        console.print(f"report: {out / html_report.NAME} (open it in a browser)")
    if logger.sync_command():
        console.print(f"W&B runs are offline; to upload them: {logger.sync_command()}")
    console.print(
        f"{finished} finished trial(s) in {format_seconds(ledger.spent())} of "
        f"{format_seconds(config['budget_s'])}; results in {out}/; resume with "
        f"the same command (--name {config['name']})"
    )
    return code


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


def serve_chief(tuner, context, ledger, role, console, results) -> int:
    """The chief: serve the oracle until the workers are done (or the budget is), then
    write the summary. Ctrl-C/SIGTERM stop it at once (trials stay with the oracle)."""
    import threading

    from tuner.engine import distribute

    console.print(
        f"chief: serving trials on {role.host}:{role.port}; start workers with "
        f"--worker {role.host}:{role.port}"
    )
    exposed = distribute.exposure_warning(role.host)
    if exposed:
        console.print(exposed, markup=False, highlight=False)
    stop = threading.Event()

    def keep_time() -> None:  # the chief sleeps in Keras Tuner's server loop
        while not stop.wait(10):
            ledger.save()

    threading.Thread(target=keep_time, daemon=True).start()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    code = 0
    try:
        tuner.search(verbose=0)
    except KeyboardInterrupt:
        console.print("[yellow]chief interrupted[/yellow]: restart it to go on")
        code = EXIT_INTERRUPTED
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)
    ledger.save()
    return finish_search(results, context.wandb, context.facts, ledger, console, code)


def strategy(name: str):
    """The tf.distribute strategy for one trial (None: Keras' default, one device)."""
    if name == "none":
        return None
    import tensorflow as tf

    return tf.distribute.MirroredStrategy()


def sweep_sets(role: str, oracle, space, data, ledger, budget_s: float, console) -> list:
    """The (backbone, size, features) a first sweep over the files computes ahead: the
    transfer strategy's frozen stage (the chief, or a lone search, also hands the oracle its
    setting and prints the plan; a worker plans alike from its own timed batch, quietly), or
    the space's first backbone and size for the other algorithms."""
    from tuner.engine import plan

    if space.algorithm != "transfer":
        return plan.first_set(space)
    if role != "worker":
        return prepare_transfer(oracle, space, data, ledger, budget_s, console)
    train, validation = len(data.train), len(data.validation)
    return planned_sets(plan.setting_for(space, train, validation, budget_s))


def prepare_transfer(oracle, space, data, ledger, budget_s: float, console) -> list:
    """Give the transfer oracle the budget, the data's size and this device's speed (one
    timed batch of the cheapest backbone), and print its plan; returns the (backbone, size,
    features) its frozen stage plans to run."""
    from tuner.engine import plan

    oracle.setting = plan.setting_for(space, len(data.train), len(data.validation), budget_s)
    oracle.remaining = ledger.remaining
    for line in oracle.plan():
        console.print(line, highlight=False)
    return planned_sets(oracle.setting, oracle.facts())


def planned_sets(setting, facts=()) -> list[tuple[str, int, str]]:
    """The (backbone, size, features) the transfer strategy's frozen stage plans to run in
    ``setting``: what a first sweep over the files computes ahead."""
    from tuner.engine import strategy

    planned = strategy.planned_sets(setting, list(facts))
    return list(dict.fromkeys((fs.backbone, fs.pixels, fs.features) for fs in planned))


ZERO_SEED = 10_007  # above Keras Tuner's own random range (1..10000)


def oracle_seed(seed: int) -> int:
    """The space's ``seed`` as Keras Tuner's oracles take it. They read a falsy seed as none
    (``seed or random.randint(1, 10000)``), so the default ``seed: 0`` drew other heads and
    Hyperband other trials on every run; 0 is passed as a fixed non-zero seed instead."""
    return int(seed) if seed else ZERO_SEED


def make_tuner(cls: type, model, space, out: Path, distribution_strategy=None):
    """The Keras Tuner object, reloading its state from ``out/keras_tuner`` when present."""
    import keras_tuner as kt

    from tuner.model.training import BEST_EPOCH_METRIC

    common = dict(
        hypermodel=model,
        distribution_strategy=distribution_strategy,
        objective=kt.Objective(BEST_EPOCH_METRIC, "max"),
        seed=oracle_seed(space.seed),
        directory=str(out),
        project_name="keras_tuner",
        overwrite=False,
        max_consecutive_failed_trials=space.max_consecutive_failures,
    )
    if space.algorithm == "transfer":
        from tuner.engine.oracle import TransferOracle

        oracle = TransferOracle(
            common.pop("objective"),
            space,
            max_trials=space.max_trials,
            seed=common.pop("seed"),
            max_consecutive_failed_trials=common.pop("max_consecutive_failed_trials"),
        )
        return cls(oracle=oracle, **common)
    if space.algorithm == "hyperband":
        return cls(
            max_epochs=space.epochs,
            factor=space.hyperband_factor,
            # Keras Tuner runs its brackets this many times, then ends; 0 asks for as many as
            # the budget holds (the budget gate ends it), so it spends its budget like the rest.
            hyperband_iterations=space.hyperband_iterations or UNTIL_BUDGET,
            **common,
        )
    return cls(max_trials=space.max_trials, **common)


class _stop_on_signals:
    """First Ctrl-C/SIGTERM: stop the running trial at the next batch. Second: stop now."""

    def __init__(self, context) -> None:
        self.context = context
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.context.interrupt_requested:
            raise KeyboardInterrupt
        self.context.interrupt_requested = True
        print("stopping at the next batch (again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
