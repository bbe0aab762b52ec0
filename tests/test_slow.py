"""Slow tier (python -m pytest -m slow): the real EfficientNetB0, small images."""

from __future__ import annotations

import pandas as pd
import pytest

from data_tools.errors import run_cli
from tuner import search
from tuner.model import space as space_mod

pytestmark = pytest.mark.slow


def test_real_b0_search_on_the_demo(tmp_path, demo_dir):
    argv = [
        "--results",
        str(tmp_path),
        "--cache",
        str(demo_dir.parent),
        "--name",
        "b0",
        "--weights",
        "none",
        "--algorithm",
        "random",
        "--set",
        "backbones=[B0]",
        "--set",
        "epochs=6",
        "--set",
        "max_trials=1",
        "--set",
        "learning_rate=0.003",
        "--set",
        "head_width=0",
        "--set",
        "dropout=0.0",
        "--budget",
        "20m",
        "--space",
        str(space_mod.shipped("quick.yaml")),
    ]
    assert run_cli(search.main, argv) == 0
    table = pd.read_csv(tmp_path / "b0" / "trials.csv")
    assert table.status[0] == "completed" and table.params[0] > 4_000_000
    # Random-init B0 on 32 px digits learns well past chance (0.1) in 6 epochs.
    assert table.val_accuracy[0] > 0.6
