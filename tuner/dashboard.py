"""A W&B report comparing one search's trials, built from code (wandb-workspaces).

    python -m tuner.dashboard --search NAME [--project P] [--entity E]

The report is filtered to the search's group and trial runs and holds: parallel coordinates
from the hyperparameters to val accuracy, a scatter of latency against val accuracy, val
accuracy by backbone, a run comparer, and per-epoch curves.

Online (W&B credentials present) it is published and its URL printed. Offline it is written
to ``results/<name>/dashboard.json`` (every block and panel with its type and settings), with
the command that publishes it later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools import cli
from data_tools.atomic import write_text
from data_tools.errors import InputError, run_cli
from tuner.report.wandb_log import DEFAULT_PROJECT, resolve_mode

# Hyperparameters on the parallel-coordinates axes, left to right, before val accuracy.
HYPERPARAMETERS = [
    "backbone",
    "image_size",
    "head_width",
    "dropout",
    "learning_rate",
    "finetune_fraction",
    "class_weight",
]
EPOCH_CURVES = ["epoch/val_accuracy", "epoch/val_loss", "epoch/accuracy", "epoch/loss"]


def build_report(search: str, project: str, entity: str):
    """The report object (nothing is sent anywhere)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runs = wr.Runset(
        entity=entity,
        project=project,
        name=f"search {search}",
        filters=[expr.Metric("Group") == search, expr.Metric("JobType") == "trial"],
    )
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(name)) for name in HYPERPARAMETERS]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("val_accuracy")))
    panels = [
        wr.ParallelCoordinatesPlot(title="hyperparameters -> val accuracy", columns=columns),
        wr.ScatterPlot(
            title="val accuracy vs latency",
            x=wr.SummaryMetric("latency_ms"),
            y=wr.SummaryMetric("val_accuracy"),
        ),
        wr.BarPlot(
            title="val accuracy by backbone",
            metrics=[wr.SummaryMetric("val_accuracy")],
            groupby=wr.Config("backbone"),
            groupby_aggfunc="max",
        ),
        wr.RunComparer(diff_only="split"),
        *[wr.LinePlot(title=curve, x="epoch/epoch", y=[curve]) for curve in EPOCH_CURVES],
    ]
    return wr.Report(
        project=project,
        entity=entity,
        title=f"effnet-tuner search: {search}",
        description=f"Trials of the search '{search}' (W&B group '{search}'), made by "
        f"python -m tuner.dashboard.",
        blocks=[
            wr.H1(f"Search {search}"),
            wr.P(
                "Each run is one trial; the Pareto trade-off is in the search run "
                f"'{search}-search'."
            ),
            wr.PanelGrid(runsets=[runs], panels=panels),
        ],
    )


def specification(value: Any) -> Any:
    """The report as plain data, every block and panel tagged with its type."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: specification(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
        return {"type": type(value).__name__, **fields}
    if isinstance(value, list | tuple):
        return [specification(item) for item in value]
    if isinstance(value, dict):
        return {str(k): specification(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("tuner.dashboard", __doc__)
    parser.add_argument("--search", required=True, help="the search name (its W&B group)")
    parser.add_argument("--project", default=DEFAULT_PROJECT, help="W&B project")
    parser.add_argument("--entity", default="", help="W&B entity (default: your own)")
    parser.add_argument("--results", default="results", help="results root folder")
    parser.add_argument(
        "--mode",
        choices=["online", "offline"],
        help="default: online with W&B credentials, else offline",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.results) / args.search
    if not out.is_dir():
        raise InputError(
            f"no search named '{args.search}' in {args.results}/: run "
            f"python -m tuner.search --name {args.search} first, or pass --results"
        )
    report = build_report(args.search, args.project, args.entity)
    if resolve_mode(args.mode) == "online":
        try:
            report.save()
            print(f"published: {report.url}")
            return 0
        except Exception as exc:  # noqa: BLE001 - any W&B failure: keep the spec instead
            print(
                f"could not publish the report ({str(exc).splitlines()[0][:200]}); "
                f"writing it offline instead"
            )
    target = out / "dashboard.json"
    write_text(target, json.dumps(specification(report), indent=1) + "\n")
    print(f"wrote the report's specification to {target}")
    print(
        f"to publish it: wandb login (or set WANDB_API_KEY), upload the runs with "
        f"'wandb sync {out / 'wandb'}/offline-run-*', then run python -m tuner.dashboard "
        f"--search {args.search} --project {args.project}"
        + (f" --entity {args.entity}" if args.entity else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
