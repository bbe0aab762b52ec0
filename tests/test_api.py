"""The Python API: tuner.search and tuner.load in the calling process, the hypermodel under a
stock Keras Tuner tuner, and tuner.InputError for every bad input the command refuses.
(Export and predict through the API: tests/test_export.py, on its searched fixture.)"""

from __future__ import annotations

import os

import keras_tuner as kt
import pytest

import tuner
from tests.test_bad_input import CASES, snapshot
from tuner import search
from tuner.model import space
from tuner.model.hypermodel import EffNetHyperModel


def test_search_runs_in_process_and_resumes(tmp_path, demo_dir, pretrained_t0, capsys):
    options = dict(
        budget="10m",
        name="api",
        results=tmp_path,
        weights=str(pretrained_t0),
        algorithm="random",
        backbones=["T0"],
        finetune_fraction=0.0,
        epochs=2,
        max_trials=1,
        wandb_mode="disabled",
    )
    found = tuner.search(demo_dir / "label.csv", **options)
    printed = capsys.readouterr().out
    assert isinstance(found, tuner.Search) and found.status == "finished"
    assert found.path == tmp_path / "api" and "search api:" in printed
    assert "split key: reference" in printed  # the demo's SHA-1 names
    assert len(found.trials) == 1 and found.trials.status.iloc[0] == "completed"
    assert found.config["space"]["backbones"] == ["T0"]
    assert len(found.front) == 1
    again = tuner.search(demo_dir / "label.csv", **options)  # resumes: nothing new to run
    assert len(again.trials) == 1 and "1 finished trial(s)" in capsys.readouterr().out
    assert repr(tuner.load(found.path)).endswith("1 finished trial(s))")


def test_the_hypermodel_under_a_stock_keras_tuner_tuner(tmp_path, demo_dir, pretrained_t0):
    model = EffNetHyperModel.from_data(
        demo_dir / "label.csv",
        space="quick",
        weights=str(pretrained_t0),
        directory=tmp_path / "data",
        backbones=["T0"],
        finetune_fraction=0.0,
        head_width=0,
        epochs=2,
    )
    assert (tmp_path / "data" / "split_label.csv").is_file()
    assert len(model.data.train) > 1000 and "test" not in set(model.data.train.type)
    stock = kt.BayesianOptimization(
        model,
        objective="val_accuracy",
        max_trials=2,
        directory=str(tmp_path / "kt"),
        project_name="stock",
    )
    stock.search()
    best = stock.oracle.get_best_trials(1)[0]
    assert best.status == "COMPLETED" and best.score > 0.3  # ten classes: chance is 0.1
    assert stock.get_best_models(1)[0].output_shape == (None, 10)


API_CASES = [c for c in CASES if c[1] is search.main and c[0] not in ("search-set-without-value",)]
API_CASES = [c for c in API_CASES if "gpus" not in c[0]]  # the API runs in this process


def api_arguments(argv: list[str]) -> dict:
    """A search command line as tuner.search's arguments (what differs from the defaults)."""
    parser = search.build_parser()
    given, defaults = vars(parser.parse_args(argv)), vars(parser.parse_args([]))
    options = {k: v for k, v in given.items() if v != defaults[k] and k != "set"}
    return {**options, **space.parse_overrides(given["set"])}


@pytest.mark.parametrize(
    ("make_argv", "expected"), [c[2:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_bad_input_raises_input_error_with_the_commands_line(tmp_path, make_argv, expected):
    box = tmp_path / "box"
    box.mkdir()
    arguments = api_arguments(make_argv(box))
    before, env_before = snapshot(box), dict(os.environ)
    with pytest.raises(tuner.InputError) as raised:
        tuner.search(**arguments)
    assert isinstance(raised.value, ValueError)
    assert expected.format(box=box) in " ".join(str(raised.value).split())
    assert snapshot(box) == before
    os.environ.clear()
    os.environ.update(env_before)


def test_load_and_model_refuse_what_is_not_theirs(tmp_path):
    with pytest.raises(tuner.InputError, match="is not a search's results folder"):
        tuner.load(tmp_path)
    with pytest.raises(tuner.InputError, match="is not an exported model"):
        tuner.Model(tmp_path)
