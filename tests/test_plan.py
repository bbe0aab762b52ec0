"""What a budget buys, before spending it: the strategy played forward on a cost table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from data_tools.errors import InputError
from tests.conftest import run_search
from tuner.engine import costmodel, plan, widening
from tuner.model import space

TABLE = """
decode: 1.0e-3
heads: {exact: 2.0, adam: 10.0}
backbones:
  B0: {pass: 1.0e-4, fine_tune: 1.0e-3}
  B1: {pass: 2.0e-4, fine_tune: 2.0e-3}
"""


def table(tmp_path: Path, text: str = TABLE) -> plan.CostTable:
    path = tmp_path / "costs.yaml"
    path.write_text(text)
    return plan.load_costs(path)


def test_a_cost_table_prices_passes_decoding_and_fine_tunes(tmp_path):
    costs = table(tmp_path)
    searched = space.load(
        None, {"backbones": ["B0", "B1"], "finetune_fraction": [0.0, 0.2], "features": "top"}
    )
    setting = plan.setting_for(searched, 9_000, 1_000, 3600, costs)
    b0, b1 = setting.feature_sets
    priced = costmodel.Costs(setting, [])
    # The cheapest set pays the one decode of every file; each its own pass.
    assert priced.pass_seconds(b0) == pytest.approx(10_000 * (1e-4 + 1e-3))
    assert priced.pass_seconds(b1) == pytest.approx(10_000 * 2e-4)
    assert priced.epoch_seconds(b1, 0.2) == pytest.approx(0.2 * 2e-3 * 9_000)
    assert priced.head_seconds("adam") == pytest.approx(10.0 + costmodel.PRIOR_OVERHEAD_SECONDS)


def test_the_play_takes_a_forward_pass_in_milliseconds_as_a_trials_latency(tmp_path):
    """A dry run cannot measure latency: its trials carry one image's forward pass, in ms,
    from the cost table (or the calibrated seconds per GFLOP), not a count of GFLOPs."""
    searched = space.load(None, {"backbones": ["B0", "B1"], "features": "top"})
    setting = plan.setting_for(searched, 9_000, 1_000, 3600, table(tmp_path))
    b0, b1 = setting.feature_sets
    priced = costmodel.Costs(setting, [])
    assert priced.forward_ms(b0) == pytest.approx(0.1)  # 1.0e-4 s an image, no decode
    assert priced.forward_ms(b1) == pytest.approx(0.2)
    moves, _ = plan.play(setting)
    played = plan._finished(setting, priced, moves[0], "0", {b0.plain(): 0}, [])
    assert played.latency_ms == pytest.approx(priced.forward_ms(moves[0].feature_set))
    # Without a table: this machine's calibration (seconds a GFLOP of one image).
    calibrated = dataclasses.replace(setting, table=None, seconds_per_gflop=2e-3)
    expected = 1000 * 2e-3 * b1.gflops()
    assert costmodel.Costs(calibrated, []).forward_ms(b1) == pytest.approx(expected)


def test_a_long_budget_plays_out_to_fine_tunes_then_ends_with_time_left(tmp_path):
    searched = space.load(
        None,
        {"backbones": ["B0", "B1"], "finetune_fraction": [0.0, 0.2], "head_trials": 4},
    )
    setting = plan.setting_for(searched, 9_000, 1_000, 20 * 3600, table(tmp_path))
    moves, why = plan.play(setting)
    frozen = [m for m in moves if m.stage == costmodel.FROZEN]
    tuned = [m for m in moves if m.stage == costmodel.FINE_TUNE]
    assert {m.feature_set.backbone for m in frozen} == {"B0", "B1"}
    assert {m.feature_set.backbone for m in tuned} == {"B0", "B1"}
    bracketed = [m for m in tuned if m.bracket != widening.WIDENING]
    assert max(m.epochs for m in bracketed) == searched.epochs  # rungs up to the space's limit
    # The space exhausted, it widens from the best fine-tune (the play assumes a longer one
    # scores higher), each a trial with its reason; then it ends and says why, with figures.
    widened = [m for m in tuned if m.bracket == widening.WIDENING]
    longer = widening.LONGER * searched.epochs
    assert (widened[0].initial_epoch, widened[0].epochs, widened[0].fraction) == (
        searched.epochs,
        longer,
        0.2,
    )
    assert f"continued from {searched.epochs} to {longer} epochs" in widened[0].why
    assert why.startswith("nothing left that validation could detect: best validation accuracy")
    assert "standard error" in why and "on 1000 images" in why
    lines = "\n".join(plan.summary(setting, moves, why))
    assert f"widening: {len(widened)} trials" in lines
    spent = sum(m.estimate_s for m in moves)
    assert f"dry run: {len(moves)} trials" in lines and "expected end" in lines
    assert spent < setting.budget_s


def test_a_table_without_a_needed_backbone_or_numbers_is_one_line(tmp_path):
    with pytest.raises(InputError, match="has no 'backbones:' table"):
        table(tmp_path, "decode: 1\n")
    with pytest.raises(InputError, match="needs a number for 'pass'"):
        table(tmp_path, "backbones:\n  B0: {fine_tune: 1}\n")
    costs = table(tmp_path)
    searched = space.load(None, {"backbones": ["B3"]})
    with pytest.raises(InputError, match="no pass cost for B3"):
        plan.play(plan.setting_for(searched, 900, 100, 3600, costs))


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, demo_dir, pretrained_t0, capsys):
    costs = tmp_path / "t0.yaml"
    costs.write_text("backbones:\n  T0: {pass: 1.0e-4, fine_tune: 1.0e-3}\n")
    argv = ["--algorithm", "transfer", "--weights", str(pretrained_t0), "--budget", "2h"]
    assert run_search(tmp_path, demo_dir, "dry", *argv, "--dry-run", "--costs", str(costs)) == 0
    out = capsys.readouterr().out
    assert f"costs from --costs {costs}" in out and "expected end: after ~" in out
    assert "cache plan" in out and "features T0 32px" in out
    # One line each for stage features and the top, each its own size (504 and 320 values
    # an image on T0), and what checkpoints take.
    stages = re.search(r"features T0 32px stages +([\d.]+) MB", out)
    top = re.search(r"features T0 32px top +([\d.]+) MB", out)
    assert float(stages.group(1)) > float(top.group(1)), out
    assert "checkpoints: what each trial trained" in out
    folder = tmp_path / "results" / "dry"
    assert not (folder / "trials.csv").exists() and not (folder / "keras_tuner").exists()


def test_the_tops_pass_is_charged_once_beside_its_stage_features(tmp_path):
    # The stage features' sweep writes the pooled top too (one forward): the top set's
    # heads cost their heads, no pass; its augmented views still pay their own passes.
    costs = table(tmp_path)
    searched = space.load(None, {"backbones": ["B0"], "augment": ["none", "flip"]})
    setting = plan.setting_for(searched, 9_000, 1_000, 3600, costs)
    stages, top = [fs for fs in setting.feature_sets if fs.views == 1]
    assert (stages.features, top.features) == ("stages", "top")
    priced = costmodel.Costs(setting, [])
    assert priced.pass_seconds(stages) == pytest.approx(10_000 * (1e-4 + 1e-3))
    assert priced.pass_seconds(top) == 0.0
    views = next(fs for fs in setting.feature_sets if fs.features == "top" and fs.views > 1)
    extra = 10_000 * 1e-4 * setting.train_share * (views.views - 1)
    assert priced.pass_seconds(views) == pytest.approx(extra)
    # A top searched alone pays its own pass.
    alone = plan.setting_for(
        space.load(None, {"backbones": ["B0"], "features": "top"}), 9_000, 1_000, 3600, costs
    )
    assert costmodel.Costs(alone, []).pass_seconds(alone.feature_sets[0]) > 0


def test_the_play_pairs_two_backbones_at_the_better_ones_size_with_both_forwards(tmp_path):
    """On a small validation split (wide noise band) the play widens with a paired head: B1's
    best linear head with B0's, B0 run at 240 px (its pass there first); its latency both
    forward passes; the summary lists it under widening."""
    searched = space.load(
        None, {"backbones": ["B0", "B1"], "finetune_fraction": 0.0, "features": "top"}
    )
    setting = plan.setting_for(searched, 180, 20, 3600, table(tmp_path))
    moves, why = plan.play(setting)
    paired = [m for m in moves if m.stage == costmodel.PAIRED]
    assert len(paired) == 1, [m.why for m in moves]
    b1 = setting.feature_sets[1]
    assert (paired[0].feature_set, paired[0].partner) == (
        b1,
        costmodel.FeatureSet("B0", "240", 240),
    )
    priced = costmodel.Costs(setting, [])
    assert paired[0].estimate_s > 2 * priced.head_seconds("exact")  # B0's pass at 240 px
    lines = plan.summary(setting, moves, why)
    assert any("a linear head on B1 240px and B0 240px at once" in line for line in lines)
    assert why.startswith("nothing left")
