"""The transfer algorithm end to end on the tiny T0 backbone with pretrained weights: its plan,
the frozen stage, successive halving of fine-tunes from the frozen checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_search
from tuner.report.choose import shippable


def transfer(tmp_path: Path, demo_dir: Path, weights: Path, name: str, budget: str) -> int:
    return run_search(
        tmp_path,
        demo_dir,
        name,
        "--weights",
        str(weights),
        "--algorithm",
        "transfer",
        "--set",
        "head_trials=4",
        "--set",
        "head_width=[0, 16]",
        "--set",
        "head_epochs=30",
        "--set",
        "epochs=3",
        "--set",
        "finetune_fraction=[0.0, 0.2]",
        "--set",
        "finetune_lr_factor=[0.1, 0.01]",
        # The pooled top only: heads on stage features are never fine-tuned (their order and
        # parents: test_strategy), and seven trials are to reach the fine-tunes.
        "--set",
        "features=top",
        # Seven trials end the search whatever the machine's speed: the budget of the second
        # run is ample, so what is checked does not depend on the load (the first run's budget
        # cuts it short: the resume goes on from there).
        "--set",
        "max_trials=7",
        "--budget",
        budget,
    )


def test_transfer_search_runs_its_stages_in_order_and_resumes(
    tmp_path, demo_dir, pretrained_t0, capsys
):
    assert transfer(tmp_path, demo_dir, pretrained_t0, "tl", "20s") == 0
    out = capsys.readouterr().out
    assert "plan for " in out and "frozen stage (up to" in out
    assert "T0 32px" in out and "successive halving over 1, 3 epochs" in out
    folder = tmp_path / "results" / "tl"
    first = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    first_text = pd.read_csv(folder / "trials.csv", dtype=str)  # compared as written
    first_spent = json.loads((folder / "budget.json").read_text())["spent_s"]
    assert 1 <= len(first) < 7
    assert first.stage[0] == "frozen" and first.solver[0] == "exact"
    assert "frozen stage: head 1/4 on T0 32px" in out

    # The resume keeps every trial and goes on to the seventh.
    assert transfer(tmp_path, demo_dir, pretrained_t0, "tl", "6m") == 0
    out += capsys.readouterr().out
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str, "resumed_from": str})
    assert len(table) == 7
    # The first run's rows are kept as they were, and its time counts against the budget.
    again = pd.read_csv(folder / "trials.csv", dtype=str).iloc[: len(first)]
    pd.testing.assert_frame_equal(again, first_text)
    assert json.loads((folder / "budget.json").read_text())["spent_s"] > first_spent + 5
    assert "search finished" in out
    oracle = json.loads((folder / "keras_tuner" / "oracle.json").read_text())
    assert len(oracle["end_order"]) == 7
    assert len(list((folder / "keras_tuner").glob("trial_*"))) == 7  # rows = Keras Tuner's trials
    # A third run has nothing left to do and adds nothing.
    assert transfer(tmp_path, demo_dir, pretrained_t0, "tl", "6m") == 0
    assert len(pd.read_csv(folder / "trials.csv")) == 7
    # The 40 s deadline may stop the first run's last trial at an epoch end (a slow
    # machine): it is kept as it is, and every trial after it completes.
    later = ~table.trial_id.isin(first.trial_id)
    assert (table.status[later] == "completed").all(), table.reason
    assert table.status.isin(["completed", "stopped-budget"]).all(), table.reason
    assert (first.status[:-1] == "completed").all(), first.reason

    frozen = table[table.stage == "frozen"]
    fine = table[table.stage == "fine-tune"]
    # The frozen stage first: linear heads fitted exactly (one "epoch"), then hidden-layer
    # heads trained by Adam.
    assert list(table.stage[:2]) == ["frozen", "frozen"]
    assert (frozen.solver == np.where(frozen.head_width == 0, "exact", "adam")).all()
    assert list(frozen.head_width[:2]) == [0, 0] and (frozen.head_width[2:] == 16).all()
    assert (frozen.epochs[frozen.solver == "exact"] == 1).all()
    assert (frozen.finetune_fraction.astype(float) == 0).all()
    # What did nothing is marked: an exact head's rate and dropout, a frozen trial's factor.
    exact = frozen[frozen.solver == "exact"]
    assert (exact.learning_rate == "-").all() and (exact.dropout == "-").all()
    assert (frozen.finetune_lr_factor == "-").all() and (table.augment_views == "-").all()
    assert (frozen.learning_rate[frozen.solver == "adam"] != "-").all()
    # Fine-tunes start from a frozen trial's checkpoint; a promotion continues a fine-tune.
    assert len(fine) >= 2, out
    first_rung = fine[fine.hyperband_epochs == 1]
    assert len(first_rung) >= 1
    assert set(first_rung.resumed_from) <= set(frozen.trial_id)
    assert set(first_rung.finetune_fraction.astype(float)) == {0.2}
    assert set(first_rung.finetune_lr_factor.astype(float)) <= {0.1, 0.01}
    promoted = fine[fine.hyperband_epochs == 3]
    assert set(promoted.resumed_from) <= set(first_rung.trial_id)
    assert (promoted.epochs == 2).all()
    assert "fine-tune stage: bracket 1" in out
    # One latency per architecture: trials that differ in training only share it.
    for _, same in table.groupby(["backbone", "head_width"]):
        assert same.latency_ms.nunique() == 1
    # Every trial's estimate came from the oracle and was printed on its line.
    assert out.count("about ") >= len(table)
    # Checkpoints (test_results has the rule): every frozen head's is kept, and of the
    # fine-tunes at least those on a front; the others went as the search moved on.
    kept = {p.parent.name[6:] for p in folder.glob("keras_tuner/trial_*/checkpoint.trained.npz")}
    assert set(frozen.trial_id) | shippable(table, None) <= kept


def test_a_paired_head_reads_two_backbones_and_is_what_the_rebuild_scores(
    tmp_path, demo_dir, pretrained_t0, capsys, monkeypatch
):
    """Widening pairs the best linear heads of T0 (trained weights) and V2T0 (random ones:
    weak, so the noise band is widened here to admit it): one model, both backbones, the
    head fitted on both features, its latency measured on the whole of it."""
    import shutil

    import keras

    from tests.conftest import rebuilt_val_accuracy
    from tuner.engine import strategy, widening
    from tuner.model import backbones
    from tuner.report import rebuild

    weights = tmp_path / "weights"
    shutil.copytree(pretrained_t0, weights, ignore=shutil.ignore_patterns("cache"))
    backbones.build(backbones.get("V2T0"), 32, None).save_weights(weights / "V2T0.weights.h5")
    monkeypatch.setattr(widening, "WIDEN_WITHIN", 100.0)
    monkeypatch.setattr(strategy, "EXTRA_HEADS", 1)  # no extra heads: straight to the pair
    code = run_search(
        tmp_path,
        demo_dir,
        "pair",
        *("--weights", str(weights), "--algorithm", "transfer", "--budget", "5m"),
        *("--set", "backbones=[T0, V2T0]", "--set", "features=top"),
        *("--set", "head_trials=1", "--set", "finetune_fraction=0.0"),
    )
    assert code == 0
    out = capsys.readouterr().out
    folder = tmp_path / "results" / "pair"
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    pair = table[table.stage == "paired"]
    assert len(pair) == 1, table[["trial_id", "stage", "backbone", "partner"]]
    row = pair.iloc[0]
    # The better of the two linear heads comes first.
    assert {row.backbone, row.partner} == {"T0", "V2T0"}
    assert (row.partner_features, row.solver) == ("top", "exact")
    assert (table.partner[table.stage != "paired"] == "-").all()
    assert f"paired: {row.backbone} + {row.partner} 32px" in out
    assert f"a linear head on {row.backbone} 32px and {row.partner} 32px at once" in out
    assert (
        f"| {row.trial_id} | {row.backbone} + {row.partner} |"
        in (folder / "leaderboard.md").read_text()
    )
    # Its own architecture: measured on the whole model (both backbones), not shared with a
    # single backbone's (a tiny model's latency is mostly overhead, so not compared).
    singles = table[table.stage == "frozen"]
    assert row.latency_ms > 0 and row.latency_ms not in set(singles.latency_ms)
    params = singles.groupby("backbone").params.first()
    assert row.params > params["T0"] + params["V2T0"] - 2 * 10 * 330  # less the heads
    # The shipped model is the trial's: the rebuild scores what the trial recorded.
    assert rebuilt_val_accuracy(folder, row.trial_id)[0] == pytest.approx(row.val_accuracy)
    config, rows = rebuild.load_search(folder)
    model, _ = rebuild.trial_model(folder, rows[rows.trial_id == row.trial_id].iloc[0], config)
    assert {"backbone", "partner", "head"} <= {layer.name for layer in model.layers}
    saved = tmp_path / "pair.keras"
    model.save(saved)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        keras.models.load_model(saved).predict(pixels, verbose=0),
        model.predict(pixels, verbose=0),
        atol=1e-5,
    )
