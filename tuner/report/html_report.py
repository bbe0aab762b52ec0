"""``results/<name>/report.html``: one self-contained page about a search, for a browser with
no server, no account and no network. The search writes it when it ends (finished, out of
budget or interrupted), while it runs at most once a minute as trials end
(``tuner.engine.session.report_as_it_goes``), and ``export_best`` again with the shipped
trial marked. It holds:

* the leaderboard: every finished trial, best validation accuracy first;
* the accuracy/latency front: every finished trial with its latency spread (interquartile
  range of the timed runs) as an error bar, the front joined, the shipped trial starred;
* validation accuracy as the search went, by stage (trial order, cumulative training time);
* each trial's validation curve, read from the search's TensorBoard runs when they exist;
* which hyperparameters mattered: permutation importance of a random forest fitted to
  validation accuracy over the finished trials (scikit-learn), when there are enough trials.

Plots are inline SVG; the page references nothing outside itself.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_tools.atomic import write_text
from tuner.report.results import FINISHED, Results, latency_front
from tuner.report.tensorboard_log import HPARAMS, run_dir

NAME = "report.html"
MIN_TRIALS_FOR_IMPORTANCE = 6
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
    "th{background:#f3f3f3}h2{margin-top:1.6em}"
)


def write(folder: Path, shipped: str | None = None) -> Path | None:
    """Write ``folder/report.html`` from trials.csv, ``shipped`` (default: the trial of
    ``best/metrics.json`` when an export is there) marked; None when no trial has finished."""
    folder = Path(folder)
    table = Results(folder).rows()
    done = table[table["status"].isin(FINISHED)].reset_index(drop=True)
    if done.empty:
        return None
    shipped = shipped or _shipped(folder)
    sections = [
        ("Leaderboard", _leaderboard(done, shipped)),
        ("Accuracy against latency", _svg(_front_plot(done, shipped))),
        ("Validation accuracy as the search went", _svg(_timeline(done))),
        ("Learning curves", _curves(folder, done)),
        ("Which hyperparameters mattered", _importance(done)),
    ]
    body = "".join(f"<h2>{html.escape(title)}</h2>\n{content}\n" for title, content in sections)
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(folder.name)}"
        f"</title><style>{STYLE}</style></head><body>\n<h1>Search {html.escape(folder.name)}"
        f"</h1>\n<p>{len(done)} finished trial(s) of {len(table)}"
        f"{'; exported trial ' + html.escape(shipped) if shipped else ''}.</p>\n{body}"
        f"</body></html>\n"
    )
    target = folder / NAME
    write_text(target, page)
    return target


def _shipped(folder: Path) -> str | None:
    record = folder / "best" / "metrics.json"
    if not record.is_file():
        return None
    return str(json.loads(record.read_text()).get("trial_id", "")) or None


def _leaderboard(done: pd.DataFrame, shipped: str | None) -> str:
    columns = [
        c
        for c in (
            "trial_id",
            "stage",
            "backbone",
            "image_size",
            "features",
            "partner",
            "head_width",
            "finetune_fraction",
            "val_accuracy",
            "latency_ms",
            "train_seconds",
            "model_bytes",
        )
        if c in done
    ]
    shown = done.sort_values("val_accuracy", ascending=False)[columns].copy()
    shown.insert(0, "shipped", np.where(shown["trial_id"].astype(str) == shipped, "★", ""))
    return shown.to_html(index=False, classes="leaderboard", float_format=lambda v: f"{v:.4g}")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4))


def _svg(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # inline: no XML prolog, no DOCTYPE


def _front_plot(done: pd.DataFrame, shipped: str | None):
    fig, ax = _figure()
    spread = pd.to_numeric(done.get("latency_spread_ms"), errors="coerce").fillna(0) / 2
    ax.errorbar(
        done["latency_ms"], done["val_accuracy"], xerr=spread, fmt="o", alpha=0.5, label="trials"
    )
    front = done[latency_front(done)].sort_values("latency_ms")
    ax.plot(front["latency_ms"], front["val_accuracy"], "-o", color="C1", label="front")
    chosen = done[done["trial_id"].astype(str) == shipped]
    if len(chosen):
        ax.plot(
            chosen["latency_ms"], chosen["val_accuracy"], "*", ms=18, color="C3", label="shipped"
        )
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms per image, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    return fig


def _timeline(done: pd.DataFrame):
    fig, ax = _figure()
    minutes = pd.to_numeric(done["train_seconds"], errors="coerce").fillna(0).cumsum() / 60
    stages = done["stage"].fillna("").replace("", "trial")
    for stage in pd.unique(stages):
        mask = (stages == stage).to_numpy()
        ax.plot(minutes[mask], done["val_accuracy"][mask], "o", label=stage)
    ax.plot(minutes, done["val_accuracy"].cummax(), "-", color="grey", label="best so far")
    ax.set_xlabel("training time, cumulative (minutes)")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    return fig


def _curves(folder: Path, done: pd.DataFrame) -> str:
    curves = {}
    for trial_id in done["trial_id"].astype(str):
        values = _epoch_curve(run_dir(folder, trial_id), "epoch_val_accuracy")
        if len(values) > 1:
            curves[trial_id] = values
    if not curves:
        return "<p>No trial trained for more than one epoch (or TensorBoard runs are off).</p>"
    fig, ax = _figure()
    for trial_id, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, alpha=0.6, label=f"trial {trial_id}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    return _svg(fig)


def _epoch_curve(run: Path, tag: str) -> list[float]:
    if not run.is_dir():
        return []
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = event_accumulator.EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    if tag not in events.Tags().get("tensors", []):
        return []
    return [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]


def _importance(done: pd.DataFrame) -> str:
    if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
        return f"<p>Fewer than {MIN_TRIALS_FOR_IMPORTANCE} finished trials: too few to say.</p>"
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance

    features = pd.DataFrame(index=done.index)
    for name in [h for h in HPARAMS if h in done]:
        column = done[name].replace("-", np.nan)
        numeric = pd.to_numeric(column, errors="coerce")
        if numeric.notna().all():
            features[name] = numeric
        elif column.nunique(dropna=False) > 1:
            features[name] = column.astype(str).astype("category").cat.codes
    features = features.loc[:, features.nunique() > 1]
    if features.empty:
        return "<p>Every finished trial has the same hyperparameters.</p>"
    target = done["val_accuracy"].astype(float)
    forest = RandomForestRegressor(n_estimators=100, random_state=0).fit(features, target)
    scores = permutation_importance(forest, features, target, n_repeats=5, random_state=0)
    table = pd.DataFrame(
        {"hyperparameter": features.columns, "importance": scores.importances_mean}
    ).sort_values("importance", ascending=False)
    note = (
        "<p>Permutation importance (the drop in a random forest's R² on validation accuracy "
        "when the hyperparameter's values are shuffled), over the finished trials.</p>"
    )
    return note + table.to_html(index=False, float_format=lambda v: f"{v:.4f}")
