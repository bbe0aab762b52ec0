"""results/<name>/: trials.csv (one row a trial), leaderboard.md, pareto.png.

The decisions here are pure functions over a trials table (:func:`pareto_front`,
:func:`leaderboard_markdown`); the file writing around them is thin and atomic.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from data_tools.atomic import atomic_path, write_text

# How trials.csv, W&B configs and model cards show a hyperparameter that did nothing in a
# trial (hypermodel.TrialPlan.unused).
UNUSED = "-"
# trials.csv columns, in order (results/README.md explains each).
# The hyperparameters of a trial, as trials.csv, W&B and the model card name them.
HYPERPARAMETER_COLUMNS = [
    "backbone",
    "image_size",
    "batch_size",
    "head_width",
    "dropout",
    "learning_rate",
    "finetune_fraction",
    "finetune_lr_factor",
    "class_weight",
    "l2",
    "augment",
    "augment_views",
    "features",
    "partner",
    "partner_features",
    "pass_batch",
    "solver",
    "weights",
]
COLUMNS = [
    "trial_id",
    "status",
    "reason",
    "stage",
    *HYPERPARAMETER_COLUMNS,
    "val_accuracy",
    "val_loss",
    "train_accuracy",
    "train_loss",
    "best_epoch",
    "epochs",
    "train_seconds",
    "latency_ms",
    "latency_spread_ms",
    "images_per_s",
    "device",
    "params",
    "model_bytes",
    "unfrozen_blocks",
    "augment_path",
    "cache_notes",
    "hyperband_epochs",
    "resumed_from",
    "wandb_run_id",
    "worker",
]
FINISHED = ("completed", "stopped-budget")
# What one network is, whatever trained it: the backbone at its size, with what its head reads
# (``features``: the pooled top, or the stage features beside it), and a paired head's second
# backbone and its features. Trials on one network and head width are one architecture: one
# latency, spread and file size between them.
NETWORK = ("backbone", "image_size", "features", "partner", "partner_features")
ARCHITECTURE = (*NETWORK, "head_width")


def network_key(table: pd.DataFrame, columns: Iterable[str] = NETWORK) -> pd.DataFrame:
    """``columns`` of ``table`` as text, comparable between rows and files (a trials.csv from
    before the ``features`` column reads as the pooled top it measured, one from before
    paired heads as none)."""
    out = pd.DataFrame(index=table.index)
    for column in columns:
        values = table[column] if column in table else pd.Series(np.nan, index=table.index)
        if column == "features":
            values = values.fillna("top")
        elif column.startswith("partner"):  # none ("-", or a file from before pairs): ""
            values = values.fillna("").replace(UNUSED, "")
        out[column] = values.map(_key_text)
    return out


def same_network(
    table: pd.DataFrame, like: Mapping[str, Any], columns: Iterable[str] = NETWORK
) -> pd.Series:
    """The rows of ``table`` on the network of ``like`` (a row, or a dict of its columns):
    equal in ``columns`` (:data:`NETWORK`; :data:`ARCHITECTURE` adds the head width),
    compared as :func:`network_key` writes them. The one definition of "the same network"
    and of "the same architecture"."""
    columns = list(columns)
    wanted = network_key(pd.DataFrame([dict(like)]), columns).iloc[0]
    return (network_key(table, columns) == wanted).all(axis=1)


def _key_text(value: Any) -> str:
    value = plain_value(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def exact_accuracy(accuracy: Any, count: int | None) -> Any:
    """An accuracy measured on ``count`` images as the fraction it is, correct / count (a
    number or a column): Keras' float32 metric (0.9638554453849792) and an exact count of the
    same 160 of 166 images (0.963855421686747) are then one value, and tie everywhere they
    are compared. Without a count, rounded to float32's 7 significant digits."""
    values = np.asarray(accuracy, dtype=float)
    snapped = np.round(values * count) / count if count else np.round(values, 6)
    if isinstance(accuracy, pd.Series):
        return pd.Series(snapped, index=accuracy.index, name=accuracy.name)
    return float(snapped) if snapped.ndim == 0 else snapped


def plain_value(value: Any) -> Any:
    """A trial value as JSON and W&B take it: numpy scalars as Python, NaN (an empty CSV
    cell) as None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


class Results:
    """The results folder of one search."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.trials_csv = self.dir / "trials.csv"

    def rows(self) -> pd.DataFrame:
        """trials.csv as a table (empty, with every column, before the first trial)."""
        if not self.trials_csv.is_file():
            return pd.DataFrame(columns=COLUMNS)
        table = pd.read_csv(
            self.trials_csv,
            dtype={
                "trial_id": str,
                "resumed_from": str,
                "reason": str,
                "wandb_run_id": str,
                "worker": str,
            },
        )
        return table.reindex(columns=COLUMNS)  # a file from before a column was added

    def upsert(self, row: dict[str, Any]) -> None:
        """Add a trial's row, or replace the row with the same trial_id; atomic rewrite.

        Workers of a distributed search share the file: the read-modify-write holds a file
        lock, so concurrent writers never lose or double a row.
        """
        with self.lock():
            table = self.rows()
            table = table[table["trial_id"] != str(row["trial_id"])]
            new = pd.DataFrame([{column: row.get(column, "") for column in COLUMNS}])
            table = new if table.empty else pd.concat([table, new], ignore_index=True)
            with atomic_path(self.trials_csv, "trials") as tmp:
                table[COLUMNS].to_csv(tmp, index=False)

    def lock(self) -> FileLock:
        """The lock every writer of trials.csv holds (across processes and machines that
        share the folder)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.trials_csv) + ".lock")

    def history(
        self, backbone: str, image_size: int, finetune_fraction: float | str = 0.0
    ) -> list[tuple[float, int]]:
        """(train seconds, epochs) of finished trials of this backbone, size and fine-tune
        fraction (``"-"``: random-init trials, which train everything)."""
        table = self.rows()
        fractions = table["finetune_fraction"].astype(str)
        wanted = (
            fractions == "-"
            if finetune_fraction == "-"
            else (pd.to_numeric(fractions, errors="coerce").fillna(0.0) == float(finetune_fraction))
        )
        done = table[
            table["status"].isin(FINISHED)
            & (table["backbone"] == backbone)
            & (table["image_size"] == image_size)
            & wanted
        ]
        return list(
            zip(done["train_seconds"].astype(float), done["epochs"].astype(int), strict=True)
        )

    def architecture_facts(
        self,
        backbone: str,
        image_size: int,
        head_width: int,
        features: str = "top",
        partner: str = "",
        partner_features: str = "",
    ) -> dict[str, float] | None:
        """What was already measured for this architecture (:data:`ARCHITECTURE`: backbone,
        size, what the head reads, a paired head's partner, head width) in this search:
        ``latency_ms``, ``images_per_s``, ``latency_spread_ms`` and ``model_bytes``. Trials
        that differ only in training share one figure."""
        table = self.rows()
        done = table[table["status"].isin(FINISHED)].dropna(subset=["latency_ms", "model_bytes"])
        wanted = {
            "backbone": backbone,
            "image_size": image_size,
            "features": features,
            "partner": partner,
            "partner_features": partner_features,
            "head_width": head_width,
        }
        same = same_network(done, wanted, ARCHITECTURE)
        if not same.any():
            return None
        first = done[same].iloc[0]
        spread = first.get("latency_spread_ms")
        return {
            "latency_ms": float(first["latency_ms"]),
            "images_per_s": float(first["images_per_s"]),
            "latency_spread_ms": float(spread) if pd.notna(spread) else 0.0,
            "model_bytes": int(first["model_bytes"]),
        }

    def prune_checkpoints(self, keep: set[str]) -> list[str]:
        """Delete the checkpoints of finished trials that trained backbone weights (a
        fine-tune's blocks: hundreds of MB for B7; with random weights the whole network)
        and are not in ``keep`` (what an export could ship: :func:`tuner.report.choose.
        shippable`; what the search may still continue); returns their ids. A frozen head's
        checkpoint (kilobytes to megabytes) is always kept: the one-standard-error rule ships
        frozen heads most. A trial once dominated stays dominated as trials are added, so a
        long search keeps a handful of fine-tunes, not hundreds; an export of a pruned trial
        retrains it from its hyperparameters."""
        from tuner.model import checkpoint

        done = self.rows()
        done = done[done["status"].isin(FINISHED)]
        units = done["unfrozen_blocks"].fillna("").astype(str).str.strip() != ""
        whole = done["weights"].astype(str).eq("none")
        pruned = []
        for trial_id in done.loc[units | whole, "trial_id"].astype(str):
            if trial_id in keep:
                continue
            folder = self.dir / "keras_tuner" / f"trial_{trial_id}"
            files = [folder / checkpoint.FILE, folder / checkpoint.LEGACY_FILE]
            files.append(self.trial_dir(trial_id) / "model.keras")  # a search from before
            found = [path for path in files if path.exists()]
            for path in found:
                path.unlink(missing_ok=True)
            if found:
                pruned.append(trial_id)
        return pruned

    def checkpoint_bytes(self) -> int:
        """Bytes the trials' checkpoints take now."""
        folder = self.dir / "keras_tuner"
        return sum(p.stat().st_size for p in folder.glob("trial_*/checkpoint.*") if p.is_file())

    def trial_dir(self, trial_id: str) -> Path:
        return self.dir / "trials" / str(trial_id)

    def write_summary(self) -> tuple[pd.DataFrame, str]:
        """leaderboard.md and pareto.png from trials.csv; returns (all trials, leaderboard)."""
        table = self.rows()
        done = table[table["status"].isin(FINISHED)].reset_index(drop=True)
        leaderboard = leaderboard_markdown(table)
        write_text(self.dir / "leaderboard.md", leaderboard)
        if not done.empty:
            plot_pareto(done, self.dir / "pareto.png")
        return table, leaderboard


def pareto_front(
    accuracy: Iterable[float], cost: Iterable[float], spread: Iterable[float] | None = None
) -> np.ndarray:
    """True for each trial that no other trial beats: at least as accurate and as cheap, and
    strictly better in one. Ties (same accuracy and cost) are all on the front.

    ``spread``: how much each cost varies between measurements (latency: the interquartile
    range of its timed runs). Two costs closer than the larger of their spreads are a tie,
    so a trial is not kept on the front for being "faster" by measurement noise."""
    acc = np.asarray(list(accuracy), dtype=float)
    time = np.asarray(list(cost), dtype=float)
    noise = np.zeros(len(acc)) if spread is None else np.nan_to_num(np.asarray(list(spread), float))
    dominated = np.zeros(len(acc), dtype=bool)
    for i in range(len(acc)):
        tie = np.maximum(noise, noise[i])
        better_or_equal = (acc >= acc[i]) & no_costlier(time, noise, i)
        strictly = (acc > acc[i]) | (time < time[i] - tie)
        dominated[i] = bool(np.any(better_or_equal & strictly))
    return ~dominated


def no_costlier(cost: np.ndarray, noise: np.ndarray, reference: int) -> np.ndarray:
    """True for each cost at most ``cost[reference]``, where two costs closer than the larger
    of their spreads (``noise``, 0 where unmeasured) are a tie."""
    return cost <= cost[reference] + np.maximum(noise, noise[reference])


def latency_front(table: pd.DataFrame) -> np.ndarray:
    """:func:`pareto_front` of val accuracy against latency, with its measured spread."""
    spread = table.get("latency_spread_ms")
    return pareto_front(table["val_accuracy"], table["latency_ms"], spread)


def pareto_flags(table: pd.DataFrame) -> np.ndarray:
    """Per trials.csv row: on the front of finished trials (val accuracy up, latency down);
    unfinished trials are never on it."""
    finished = table["status"].isin(FINISHED).to_numpy()
    flags = np.zeros(len(table), dtype=bool)
    if finished.any():
        flags[finished] = latency_front(table.loc[finished])
    return flags


def model_label(backbone: Any, partner: Any) -> str:
    """``B0``, or a paired head's ``B0 + V2B0`` (no partner: empty, NaN or ``-``)."""
    partner = plain_value(partner)
    return f"{backbone} + {partner}" if partner not in (None, "", UNUSED) else str(backbone)


def leaderboard_markdown(table: pd.DataFrame) -> str:
    """The reference table, filled in: finished trials by val accuracy, best first."""
    done = table.assign(pareto=pareto_flags(table))[table["status"].isin(FINISHED)]
    lines = [
        "| trial | model | px | batch | file size | params | val loss | val acc | "
        "train time | latency | train time vs fastest | pareto |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    if not done.empty:
        fastest = done["train_seconds"].astype(float).min()
        done = done.sort_values(["val_accuracy", "latency_ms"], ascending=[False, True])
        for row in done.itertuples():
            stopped = " (budget)" if row.status == "stopped-budget" else ""
            model = model_label(row.backbone, getattr(row, "partner", None))
            lines.append(
                f"| {row.trial_id} | {model}{stopped} | {int(row.image_size)} | "
                f"{int(row.batch_size)} | {_size(row.model_bytes)} | {int(row.params):,} | "
                f"{float(row.val_loss):.4f} | {float(row.val_accuracy):.4f} | "
                f"{_duration(row.train_seconds)} | {float(row.latency_ms):.2f} ms | "
                f"{float(row.train_seconds) / fastest:.1f}x | {'*' if row.pareto else ''} |"
            )
    failed = table[~table["status"].isin(FINISHED)]
    text = "\n".join(lines) + "\n"
    if not failed.empty:
        text += "\nFailed trials:\n\n" + "".join(
            f"- {row.trial_id} {row.backbone}: {row.reason}\n" for row in failed.itertuples()
        )
    return text


def _size(num_bytes: Any) -> str:
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _duration(seconds: Any) -> str:
    from tuner.report.text import format_seconds

    return format_seconds(float(seconds))


def plot_pareto(done: pd.DataFrame, path: Path, exported: str | None = None) -> None:
    """pareto.png: :func:`pareto_figure` of the finished trials, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = pareto_figure(done, exported)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


VARIANT_MARKERS = {"float32": "s", "float16": "D", "dynamic": "^", "int8": "v", "int8-mixed": "P"}


def _spread_bars(ax, done: pd.DataFrame) -> None:
    """Each point's measured latency spread (interquartile range), as a horizontal bar."""
    if "latency_spread_ms" not in done:
        return
    spread = pd.to_numeric(done["latency_spread_ms"], errors="coerce").fillna(0.0)
    if (spread > 0).any():
        ax.errorbar(
            done["latency_ms"].astype(float),
            done["val_accuracy"].astype(float),
            xerr=spread / 2,
            fmt="none",
            ecolor="grey",
            elinewidth=1,
            capsize=2,
            label="latency spread (IQR)",
        )


def pareto_figure(done: pd.DataFrame, exported: str | None = None):
    """Val accuracy against latency, one colour per backbone; each latency's measured
    spread (interquartile range) as a horizontal bar; the Pareto front's points ringed and
    joined (a front of one point is still seen); the ``exported`` trial starred. Rows with
    a ``variant`` other than ``keras`` (export's deployables) get one marker a variant, and
    the front is over all rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    _spread_bars(ax, done)
    variants = done["variant"].fillna("keras") if "variant" in done else None
    keras_rows = done if variants is None else done[variants == "keras"]
    labels = [
        model_label(b, p)
        for b, p in zip(
            keras_rows["backbone"],
            keras_rows.get("partner", pd.Series(None, index=keras_rows.index)),
            strict=True,
        )
    ]
    for backbone, group in keras_rows.groupby(pd.Series(labels, index=keras_rows.index)):
        ax.scatter(group["latency_ms"], group["val_accuracy"], label=backbone, alpha=0.8)
    if variants is not None:  # deployables (tuner.report.quantize): one marker a variant
        for variant, group in done[variants != "keras"].groupby("variant"):
            ax.scatter(
                group["latency_ms"],
                group["val_accuracy"],
                marker=VARIANT_MARKERS.get(variant, "x"),
                label=f"{variant} (LiteRT)",
                alpha=0.8,
            )
    front = done[latency_front(done)].sort_values("latency_ms")
    ax.step(front["latency_ms"], front["val_accuracy"], where="post", color="black", linewidth=1)
    ax.scatter(
        front["latency_ms"],
        front["val_accuracy"],
        s=160,
        facecolors="none",
        edgecolors="black",
        linewidths=1.2,
        label="Pareto front",
    )
    chosen = done[done["trial_id"].astype(str) == str(exported)] if exported else done.iloc[:0]
    if not chosen.empty:
        ax.scatter(
            chosen["latency_ms"],
            chosen["val_accuracy"],
            marker="*",
            s=320,
            color="gold",
            edgecolors="black",
            zorder=5,
            label=f"exported: trial {exported}",
        )
    ax.set_xlabel("inference latency, ms per image (batch 1)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
