"""Weights & Biases: every W&B call of the package is made here, and none can stop a search.

* one run per trial: group = search name, job_type ``trial``, name ``<search>-<trial id>``,
  config = hyperparameters + derived facts, tags (backbone; frozen / fine-tuned / whole
  network), per-epoch metrics through wandb's Keras integration, the trial's row as summary;
* one run per search (job_type ``search``): the trials table with Pareto flags, the
  accuracy-vs-latency scatter, the Pareto plot and the leaderboard, brought up to date at the
  end of every invocation;
* the exported model as an artifact (:meth:`WandbLogger.log_model`).

Run ids are fixed per search and trial (``<search>-<token>-<trial id>``, the token made once
per results folder), so a resumed or re-run trial reopens its run instead of making a second.

Mode: online when credentials exist (``WANDB_API_KEY`` or a stored login), otherwise
offline under ``results/<name>/wandb/`` with the ``wandb sync`` command printed at the end.
If W&B fails (service down, bad key, no network, full disk), the logger says so once, falls
back from online to offline, and from offline to nothing; the search goes on.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tuner.report.results import plain_value

DEFAULT_PROJECT = "effnet-tuner"
MODES = ("online", "offline", "disabled")
OFFLINE_INIT_TIMEOUT_S = 300


def has_credentials() -> bool:
    """True when W&B can log in without asking: an API key in the environment or a stored
    login (``~/.netrc`` or ``$NETRC`` with the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).strip("/")
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(requested: str | None) -> str:
    """The mode asked for, else ``WANDB_MODE``, else online with credentials, else offline."""
    mode = (
        requested or os.environ.get("WANDB_MODE") or ("online" if has_credentials() else "offline")
    )
    return "disabled" if mode in ("disabled", "dryrun-disabled") else mode


def _teardown() -> None:
    try:
        import wandb

        wandb.teardown()
    except Exception:  # noqa: BLE001, S110 - best effort after a failure already reported
        pass


class WandbLogger:
    """The search's W&B connection. Methods never raise; see the module docstring."""

    def __init__(
        self,
        mode: str | None,
        project: str | None,
        entity: str | None,
        search: str,
        results_dir: str | os.PathLike[str],
        console,
    ) -> None:
        self.mode = resolve_mode(mode)
        # Our own one-line messages replace wandb's banner and login chatter.
        os.environ.setdefault("WANDB_SILENT", "true")
        self.project = project or DEFAULT_PROJECT
        self.entity = entity
        self.search = search
        self.dir = Path(results_dir)
        self.console = console
        self.logged_offline = False  # some run of this invocation was written offline
        self.run = None
        self.token = self._token() if self.mode != "disabled" else ""

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    def _token(self) -> str:
        """A random token per results folder, so ``--overwrite`` or a reused name never
        appends to an older search's runs."""
        from filelock import FileLock

        from data_tools.atomic import write_text

        path = self.dir / "wandb_ids.json"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock"):  # workers of one search share one token
                if path.is_file():
                    return json.loads(path.read_text())["token"]
                token = secrets.token_hex(3)
                write_text(path, json.dumps({"token": token}) + "\n")
                return token
        except (OSError, ValueError, KeyError) as exc:
            self._degrade(exc)
            return secrets.token_hex(3)

    def run_id(self, suffix: str) -> str:
        name = re.sub(r"[^A-Za-z0-9_-]", "-", self.search)[:40]
        return f"{name}-{self.token}-{suffix}"

    # -- trials ---------------------------------------------------------------------------

    def start_trial(self, trial_id: str, config: dict[str, Any], tags: list[str]) -> str:
        """Open the trial's run; returns its id ('' when W&B is off or failing)."""
        run = self._init(
            run_id=self.run_id(trial_id),
            name=f"{self.search}-{trial_id}",
            job_type="trial",
            config=config,
            tags=tags,
        )
        return run.id if run is not None else ""

    def keras_callbacks(self) -> list:
        """wandb's own Keras integration: per-epoch metrics into the open run."""
        if self.run is None:
            return []
        try:
            from wandb.integration.keras import WandbMetricsLogger

            return [WandbMetricsLogger(log_freq="epoch")]
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)
            return []

    def finish_trial(self, row: dict[str, Any], failed: bool) -> None:
        """Write the trial's row as the run's summary and close the run."""
        if self.run is None:
            return
        try:
            self.run.config.update(
                {k: plain_value(row[k]) for k in ("params", "batch_size") if k in row},
                allow_val_change=True,
            )
            self.run.summary.update({k: plain_value(v) for k, v in row.items()})
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)
        self._finish(exit_code=1 if failed else 0)

    # -- the search -----------------------------------------------------------------------

    def log_search(
        self,
        trials: pd.DataFrame,
        pareto: Sequence[bool],
        config: dict[str, Any],
        leaderboard: str,
        pareto_png: Path | None,
    ) -> None:
        """Create or update the search's summary run (job_type ``search``)."""
        run = self._init(
            run_id=self.run_id("search"),
            name=f"{self.search}-search",
            job_type="search",
            config=config,
            tags=["search"],
        )
        if run is None:
            return
        try:
            import wandb

            table = _table(wandb, trials.assign(pareto=pareto))
            logged: dict[str, Any] = {
                "trials": table,
                "leaderboard": wandb.Html(f"<pre>{leaderboard}</pre>"),
                "val_accuracy_vs_latency": wandb.plot.scatter(
                    table,
                    "latency_ms",
                    "val_accuracy",
                    title="val accuracy vs latency (ms per image)",
                ),
            }
            if pareto_png is not None and pareto_png.is_file():
                logged["pareto"] = wandb.Image(str(pareto_png))
            run.log(logged)
            finished = trials[trials["status"].isin(["completed", "stopped-budget"])]
            run.summary.update(
                {
                    "trial_count": len(trials),
                    "finished_trials": len(finished),
                    "best_val_accuracy": plain_value(finished["val_accuracy"].max())
                    if len(finished)
                    else None,
                }
            )
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)
        self._finish(exit_code=0)

    def log_model(
        self,
        path: str | os.PathLike[str],
        aliases: list[str],
        metadata: dict[str, Any],
        tables: dict[str, pd.DataFrame] | None = None,
    ) -> None:
        """Log an exported model folder as an artifact (type ``model``) on the search's summary
        run, with ``tables`` (e.g. the deployable variants) beside it. The hook for
        ``tuner.export_best``."""
        run = self._init(
            run_id=self.run_id("search"),
            name=f"{self.search}-search",
            job_type="search",
            config={},
            tags=["search"],
        )
        if run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(
                f"{self.search}-model",
                type="model",
                metadata={k: plain_value(v) for k, v in metadata.items()},
            )
            artifact.add_dir(str(path))
            run.log_artifact(artifact, aliases=aliases)
            for name, frame in (tables or {}).items():
                run.log({name: _table(wandb, frame)})
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)
        self._finish(exit_code=0)

    def sync_command(self) -> str | None:
        """The ``wandb sync`` command that uploads this search's offline runs, if any."""
        if not self.logged_offline:
            return None
        # A glob over the folder: runs of earlier invocations of this search are there too,
        # and `wandb sync` skips the ones already uploaded.
        return f"wandb sync {self.dir / 'wandb'}/offline-run-*"

    # -- plumbing ---------------------------------------------------------------------------

    def _init(self, run_id: str, name: str, job_type: str, config: dict[str, Any], tags: list[str]):
        if not self.enabled:
            return None
        self._finish(exit_code=0)  # one run at a time
        try:
            import wandb

            (self.dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=self.project,
                entity=self.entity,
                group=self.search,
                job_type=job_type,
                name=name,
                id=run_id,
                resume="allow",
                config=config,
                tags=tags,
                dir=str(self.dir),
                mode=self.mode,
                reinit="finish_previous",
                settings=self._settings(wandb),
            )
            self.logged_offline |= self.mode == "offline"
            return self.run
        except Exception as exc:  # noqa: BLE001
            self.run = None
            tried_online = self.mode == "online"
            self._degrade(exc)
            _teardown()  # the failed run still holds its id in wandb's service process
            if tried_online:  # now offline: this run is not lost
                return self._init(run_id, name, job_type, config, tags)
            return None

    def _settings(self, wandb):
        settings = {"silent": True, "console": "off", "x_disable_stats": True}
        if self.mode == "offline":
            # Offline needs no network, only time to start wandb's service on a busy machine:
            # WANDB_INIT_TIMEOUT (for reaching the server) must not cut it short.
            settings["init_timeout"] = OFFLINE_INIT_TIMEOUT_S
        return wandb.Settings(**settings)

    def _finish(self, exit_code: int) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)

    def _degrade(self, exc: BaseException) -> None:
        """Say once that logging is degraded; online falls back to offline, offline to off."""
        if self.mode not in _FALLBACK:
            return
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        next_mode, consequence = _FALLBACK[self.mode]
        self.mode = next_mode
        self.console.print(
            f"[yellow]W&B logging degraded[/yellow] ({first_line}); "
            + consequence.format(folder=self.dir / "wandb")
        )


# After a failure in a mode: the mode to go on in, and what the user is told.
_FALLBACK = {
    "online": ("offline", "logging offline under {folder} instead; the search goes on"),
    "offline": (
        "disabled",
        "W&B logging is off for the rest of this search; everything is still in trials.csv",
    ),
}


def _table(wandb, frame: pd.DataFrame):
    """A W&B Table of ``frame``, empty cells as None (W&B refuses NaN in mixed columns)."""
    return wandb.Table(dataframe=frame.astype(object).where(frame.notna(), None))
