"""Pure decisions over trial tables: the Pareto front and the leaderboard; the CSV upsert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tuner.report.results import COLUMNS, Results, leaderboard_markdown, pareto_front


def test_pareto_front_keeps_only_undominated_trials() -> None:
    acc = [0.90, 0.85, 0.95, 0.80, 0.95]
    ms = [10.0, 5.0, 30.0, 6.0, 40.0]
    # 0.80@6 is beaten by 0.85@5; 0.95@40 by 0.95@30
    assert pareto_front(acc, ms).tolist() == [True, True, True, False, False]


def test_pareto_front_ties_single_and_empty() -> None:
    assert pareto_front([0.9, 0.9], [5, 5]).tolist() == [True, True]
    assert pareto_front([0.5], [1]).tolist() == [True]
    assert pareto_front([], []).tolist() == []


def row(trial_id: str, acc: float, latency: float, status: str = "completed") -> dict:
    return {
        "trial_id": trial_id,
        "status": status,
        "backbone": "B0",
        "image_size": 224,
        "batch_size": 32,
        "val_accuracy": acc,
        "val_loss": 1 - acc,
        "train_seconds": 60,
        "latency_ms": latency,
        "params": 1000,
        "model_bytes": 2048,
        "epochs": 3,
        "reason": "" if status != "failed" else "FailedTrialError: loss became NaN",
    }


def test_upsert_replaces_by_trial_id_and_keeps_columns(tmp_path: Path) -> None:
    results = Results(tmp_path)
    results.upsert(row("000", 0.5, 3))
    results.upsert(row("001", 0.6, 4))
    results.upsert(row("000", 0.7, 3))
    table = results.rows()
    assert list(table.columns) == COLUMNS
    assert table["trial_id"].tolist() == ["001", "000"]
    assert table.loc[table.trial_id == "000", "val_accuracy"].item() == 0.7
    assert results.history("B0", 224) == [(60.0, 3), (60.0, 3)]
    assert results.history("B1", 224) == []


def test_leaderboard_orders_marks_front_and_lists_failures() -> None:
    table = pd.DataFrame(
        [
            row("000", 0.80, 2.0),
            row("001", 0.90, 9.0),
            row("002", 0.85, 20.0),
            row("003", np.nan, np.nan, "failed"),
        ]
    )
    text = leaderboard_markdown(table)
    assert "| latency | train time vs fastest | pareto |" in text  # not read as latency
    lines = [line for line in text.splitlines() if line.startswith("| 0")]
    assert [line.split("|")[1].strip() for line in lines] == ["001", "002", "000"]
    assert [line.rstrip(" |").endswith("*") for line in lines] == [True, False, True]
    assert "- 003 B0: FailedTrialError: loss became NaN" in text


def test_prune_keeps_what_an_export_could_ship_or_a_trial_continues(tmp_path: Path) -> None:
    from tuner.engine import session
    from tuner.report.choose import shippable

    results = Results(tmp_path)
    # (id, val accuracy, latency, head width, units fine-tuned), all B0 at 224 px.
    specs = [
        ("a", 0.90, 10, 0, ""),  # frozen: always kept
        ("b", 0.80, 20, 0, "7a"),  # a dominated fine-tune: pruned
        ("c", 0.95, 30, 256, "7a top"),  # the front's most accurate
        ("d", 0.70, 40, 0, "6a 7a top"),  # slow to run, the fastest to train: a front
        ("e", 0.94, 31, 0, "top"),  # within one SE of c (0.022 on 100 images), simpler
        ("f", 0.50, 50, 0, "7a"),  # the parent of a running trial: a resume needs it
        ("g", 0.93, 31, 0, "top"),  # in c's band too, but e ships before it at any width
        ("h", 0.60, 60, 0, ""),  # frozen and dominated: kept all the same (kilobytes)
    ]
    for trial_id, acc, ms, width, units in specs:
        r = row(trial_id, acc, ms) | {"head_width": width, "unfrozen_blocks": units}
        r |= {"latency_spread_ms": 2.0, "train_seconds": 10 if trial_id == "d" else 60}
        results.upsert(r)
        folder = tmp_path / "keras_tuner" / f"trial_{trial_id}"
        folder.mkdir(parents=True)
        (folder / "checkpoint.trained.npz").write_bytes(b"weights")
    (results.trial_dir("b")).mkdir(parents=True)
    (results.trial_dir("b") / "model.keras").write_bytes(b"model")  # a search from before
    assert shippable(results.rows(), 100) == {"a", "c", "d", "e"}
    assert shippable(results.rows(), None) == {"a", "c", "d"}  # no count: the fronts

    class Oracle:
        trials: dict = {}
        ended: list = []

        def end_trial(self, trial) -> None:
            self.ended.append(trial)

    oracle = Oracle()
    session.keep_checkpoints(oracle, results, 100)
    oracle.trials = {"i": _running(parent="f")}
    oracle.end_trial("trial")
    assert oracle.ended == ["trial"]
    kept = sorted(p.parent.name[6:] for p in tmp_path.glob("keras_tuner/*/checkpoint.*"))
    assert kept == ["a", "c", "d", "e", "f", "h"]
    assert not (results.trial_dir("b") / "model.keras").exists()
    assert results.checkpoint_bytes() == 6 * len(b"weights")


def _running(parent: str):
    import keras_tuner as kt

    trial = kt.engine.trial.Trial(kt.HyperParameters(), trial_id="i", status="RUNNING")
    trial.hyperparameters.values["tuner/trial_id"] = parent
    return trial


def test_pareto_png_rings_the_front_bars_the_spread_and_stars_the_export() -> None:
    """A front of one point is still seen (ringed); each latency's spread is drawn; the
    exported trial is starred."""
    import matplotlib.pyplot as plt

    from tuner.report.results import pareto_figure

    done = pd.DataFrame(
        {
            "trial_id": ["000", "001", "002"],
            "backbone": ["B0", "B0", "B1"],
            "val_accuracy": [0.9, 0.8, 0.7],
            "latency_ms": [1.0, 1.05, 2.0],
            "latency_spread_ms": [0.2, 0.2, 0.3],
        }
    )
    fig = pareto_figure(done, exported="001")
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == sorted(
        ["latency spread (IQR)", "B0", "B1", "Pareto front", "exported: trial 001"]
    )
    handles = dict(zip(labels, ax.get_legend_handles_labels()[0], strict=True))
    ring = handles["Pareto front"]
    assert ring.get_offsets().tolist() == [[1.0, 0.9]]  # 001 ties 000 on latency: off it
    assert ring.get_facecolors().size == 0 or ring.get_facecolors()[0][3] == 0  # hollow
    assert handles["exported: trial 001"].get_offsets().tolist() == [[1.05, 0.8]]
    bars = handles["latency spread (IQR)"]
    segments = bars.lines[2][0].get_segments()
    ends = np.array([s[:, 0] for s in segments])
    np.testing.assert_allclose(ends, [[0.9, 1.1], [0.95, 1.15], [1.85, 2.15]])
    plt.close(fig)


def test_pareto_png_marks_deployable_variants_and_puts_them_on_one_front() -> None:
    import matplotlib.pyplot as plt

    from tuner.report.results import pareto_figure

    done = pd.DataFrame(
        {
            "trial_id": ["000", "000:int8", "000:float16"],
            "variant": ["keras", "int8", "float16"],
            "backbone": ["B0"] * 3,
            "val_accuracy": [0.9, 0.88, 0.9],
            "latency_ms": [5.0, 1.0, 2.0],
            "latency_spread_ms": [0.1, 0.1, 0.1],
        }
    )
    fig = pareto_figure(done, exported="000:int8")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    found = dict(zip(labels, handles, strict=True))
    assert {"B0", "int8 (LiteRT)", "float16 (LiteRT)", "exported: trial 000:int8"} <= set(found)
    assert found["B0"].get_offsets().tolist() == [[5.0, 0.9]]
    # float16 is as accurate as Keras and faster: the front is int8 and float16 only.
    assert sorted(found["Pareto front"].get_offsets().tolist()) == [[1.0, 0.88], [2.0, 0.9]]
    plt.close(fig)


def test_stage_and_top_models_of_one_backbone_are_measured_apart(tmp_path: Path) -> None:
    # A head on stage features is another network than one on the pooled top: its latency,
    # spread and file size are its own, and trials.csv files from before the column read as top.
    results = Results(tmp_path)
    top = row("000", 0.9, 10.0) | {"head_width": 0, "images_per_s": 100, "features": "top"}
    results.upsert(top | {"latency_spread_ms": 0.5})
    assert results.architecture_facts("B0", 224, 0, "stages") is None
    assert results.architecture_facts("B0", 224, 0, "top")["latency_ms"] == 10.0
    stages = row("001", 0.9, 12.5) | {"head_width": 0, "images_per_s": 80, "features": "stages"}
    results.upsert(stages | {"model_bytes": 4096})
    assert results.architecture_facts("B0", 224, 0, "stages") == {
        "latency_ms": 12.5,
        "images_per_s": 80.0,
        "latency_spread_ms": 0.0,
        "model_bytes": 4096,
    }
    assert results.architecture_facts("B0", 224, 64, "top") is None  # another head
    legacy = Results(tmp_path / "old")
    legacy.upsert(top | {"features": ""})
    assert legacy.architecture_facts("B0", 224, 0)["latency_ms"] == 10.0
