"""One search, from a resolved command line to its results folder (``python -m tuner.search``'s
work): the data and the split, the weights, the hypermodel and its caches, the tuner of the
chosen algorithm with its budget ledger, W&B, the chief's service when distributed, and a
clean stop on a signal, a full disk or the end of the budget."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from data_tools import header, progress
from data_tools.errors import EXIT_INPUT_ERROR, InputError
from tuner.engine.folder import SearchRequest
from tuner.report.text import format_seconds

EXIT_INTERRUPTED = 130
UNTIL_BUDGET = 10**6  # Hyperband iterations when hyperband_iterations is 0


def run_search(request: SearchRequest) -> int:
    """Run (or resume) one search; returns the exit code. The steps: the results folder and
    the budget's clock; under the folder's lock, the data, the weights and the config
    (:func:`tuner.engine.folder.prepare`: a dry run ends there, with its plan); the
    hypermodel and its tuner; the trials (a chief serves them to its workers instead); the
    summary."""
    from rich.console import Console

    from tuner.engine import adapter, folder

    adapter.require()  # a Keras Tuner that changed its internals stops here, in one line
    console = Console(highlight=False, soft_wrap=True)
    out = _results_folder(request)
    space = _space(request)
    ledger = _clock(request, out)
    prepared = folder.prepare(request, out, space, ledger, console)
    if isinstance(prepared, int):
        return prepared  # a dry run: the plan is printed
    role = request.role
    if prepared.split_warning and role.kind != "worker":
        console.print(prepared.split_warning, markup=False)
    tuner, context = _tuner(request, prepared, ledger, console)
    if role.kind == "chief":
        return serve_chief(tuner, context, ledger, role, console, context.results)
    data = tuner.hypermodel.data
    console.print(
        f"search [bold]{request.name}[/bold]: {len(data.train)} train / "
        f"{len(data.validation)} validation images, {len(prepared.classes)} classes; "
        f"{prepared.space.algorithm}; weights {prepared.weights_label}; budget "
        f"{format_seconds(request.budget_s)}, {format_seconds(max(ledger.remaining(), 0))} left"
    )
    code, written = _search(tuner, context, request, prepared.space, console)
    if not written:
        return code  # the disk is full: writing the summary would fail too
    ledger.save()
    if role.kind == "worker":  # the chief writes the summary once every worker is done
        return _worker_done(context.results, role, code, console)
    return finish_search(context.results, context.wandb, prepared.config, ledger, console, code)


def _results_folder(request: SearchRequest) -> Path:
    """``results/<name>``, emptied first by ``--overwrite`` (never by a worker's)."""
    out = Path(request.results) / request.name
    if request.overwrite and request.role.kind == "worker":
        raise InputError(
            "--overwrite on a --worker would delete the folder its chief is using: pass it "
            "to the chief (or to --gpus)"
        )
    if request.overwrite and out.exists():
        shutil.rmtree(out)
    return out


def _space(request: SearchRequest):
    """The search space with the command line's overrides; the image-size limit and the
    weights' spelling are checked here, before any image is decoded or weights fetched."""
    from tuner.model import backbones
    from tuner.model import space as space_mod

    overrides = dict(request.overrides)
    if request.algorithm:
        overrides["algorithm"] = request.algorithm
    if request.seed is not None:
        overrides["seed"] = request.seed
    space = space_mod.load(request.space, overrides)
    header.set_max_pixels(request.max_pixels)  # before any decode, the split's check included
    backbones.check_weights_choice(request.weights)  # a typo fails before the data is read
    return space


def _clock(request: SearchRequest, out: Path):
    """The budget's ledger. The clock starts before the data is read: splitting and caching
    count against the budget. The chief (or the single process) owns it; workers follow
    the deadline it writes."""
    from tuner.engine import budget

    if request.role.kind == "worker":
        return budget.Ledger.follow(out / "budget.json", request.budget_s)
    return budget.Ledger.open(out / "budget.json", request.budget_s)


def _tuner(request: SearchRequest, prepared, ledger, console) -> tuple[Any, Any]:
    """(the tuner of the space's algorithm, the context its trials run in): the hypermodel
    over the splits, the cache plan, the checkpoints pruned and the report rewritten as
    trials end; a chief's oracle refuses trials past the budget."""
    from tuner.engine import distribute, plan, trial
    from tuner.model import hypermodel
    from tuner.report.results import Results
    from tuner.report.wandb_log import WandbLogger

    role, space, out = request.role, prepared.space, prepared.out
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
        weights_label=prepared.weights_label,
        facts=prepared.config,
        wandb=logger,
        role=role.kind,
        tensorboard=request.tensorboard,
    )
    data = hypermodel.SplitData(prepared.table, prepared.classes, str(prepared.cache_dir))
    model = hypermodel.EffNetHyperModel(
        space,
        data,
        prepared.weights,
        callbacks_factory=context.callbacks,
        feature_cache=request.feature_cache,
        jit_compile=bool(prepared.accelerated["xla"]),
        gpu_free_mib=prepared.accelerated["gpu_free_mib"],
    )
    tuner = make_tuner(
        trial.tuner_class(space.algorithm), model, space, out, strategy(request.strategy)
    )
    tuner.context = context
    model.store.disk = prepared.cache_budget
    sets = sweep_sets(role.kind, tuner.oracle, space, data, ledger, request.budget_s, console)
    if request.feature_cache and prepared.weights is not None:
        quiet = role.kind == "worker"  # the chief prints the plan
        plan.plan_cache(model, prepared.cache_budget, sets, space, data, None if quiet else console)
    if role.kind != "worker":  # the oracle's process prunes, whoever ran the trial
        validation = prepared.config.get("split_counts", {}).get("validation")
        keep_checkpoints(tuner.oracle, results, validation)
        report_as_it_goes(tuner.oracle, out)
    if role.kind == "chief":
        distribute.budget_gate(
            tuner.oracle,
            lambda t: trial.chief_refusal(model, t.hyperparameters, context),
            lambda line: (ledger.save(), console.print(line)),
        )
    return tuner, context


def _search(tuner, context, request: SearchRequest, space, console) -> tuple[int, bool]:
    """Run the trials until the algorithm, the budget, a signal, changed images, a full disk
    or repeated failures end them; one line says which. Returns (the exit code, whether
    the results can still be written: not on a full disk)."""
    from tuner.engine import trial

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
                f"stays with the chief and runs again when --worker-id "
                f"{request.role.tuner_id} restarts"
                if request.role.kind == "worker"
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
            return 1, False
        except RuntimeError as exc:
            if "consecutive failures" not in str(exc):
                raise
            console.print(
                f"[red]stopped: {space.max_consecutive_failures} trials failed in a "
                f"row[/red] (last: {exc.args[0].splitlines()[-1]}); reasons are in "
                f"{context.results.trials_csv}; raise max_consecutive_failures with --set to "
                f"go on"
            )
            code = 1
    return code, True


def _worker_done(results, role, code: int, console) -> int:
    """A worker's closing line: its finished trials, and why it ended."""
    from tuner.report.results import FINISHED

    mine = results.rows()
    mine = mine[mine["worker"] == role.tuner_id]
    ended = "" if code else f"; no more trials from the chief at {role.host}:{role.port}"
    console.print(
        f"worker {role.tuner_id}: {int(mine['status'].isin(FINISHED).sum())} finished "
        f"trial(s){ended}"
    )
    return code


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
    return plan.planned_sets(plan.setting_for(space, train, validation, budget_s))


def prepare_transfer(oracle, space, data, ledger, budget_s: float, console) -> list:
    """Give the transfer oracle the budget, the data's size and this device's speed (one
    timed batch of the cheapest backbone), and print its plan; returns the (backbone, size,
    features) its frozen stage plans to run."""
    from tuner.engine import plan

    oracle.setting = plan.setting_for(space, len(data.train), len(data.validation), budget_s)
    oracle.remaining = ledger.remaining
    for line in oracle.plan():
        console.print(line, highlight=False)
    return plan.planned_sets(oracle.setting, oracle.facts())


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
