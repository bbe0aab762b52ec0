"""The Python API: tuner.search and tuner.load in the calling process, the hypermodel under a
stock Keras Tuner tuner, and tuner.InputError for every bad input the command refuses.
(Export and predict through the API: tests/test_export.py, on its searched fixture.)"""

from __future__ import annotations

import os

import keras_tuner as kt
import pandas as pd
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
    stamps = pd.read_csv(found.path / "files.csv")  # what a resume checks the images against
    assert len(stamps) == sum(found.config["split_counts"].values()) and (stamps["size"] > 0).all()
    assert len(found.front) == 1
    sessions = hparams_sessions(found.path / "tensorboard")
    row = found.trials.iloc[0]
    assert list(sessions) == [str(row.trial_id)]
    values, scalars = sessions[str(row.trial_id)]
    assert values["backbone"] == "T0" and values["stage"] == ""
    assert "dropout" in values and "finetune_lr_factor" not in values  # unused: left out
    assert scalars["val_accuracy"] == [pytest.approx(row.val_accuracy)]
    assert scalars["latency_ms"] == [pytest.approx(row.latency_ms)]
    assert len(scalars["epoch_val_accuracy"]) == 2  # the epoch curve
    report = read_report(found.path / "report.html")
    assert report.rows == [[str(row.trial_id)]] and report.svgs >= 2
    assert report.external == []  # self-contained: no src=, no href= to anything else
    again = tuner.search(demo_dir / "label.csv", **options)  # resumes: nothing new to run
    assert len(again.trials) == 1 and "1 finished trial(s)" in capsys.readouterr().out
    assert repr(tuner.load(found.path)).endswith("1 finished trial(s))")
    assert list(hparams_sessions(found.path / "tensorboard")) == [str(row.trial_id)]


def hparams_sessions(logdir) -> dict[str, tuple[dict, dict[str, list[float]]]]:
    """Per HParams session in ``logdir``, read by TensorBoard's own reader: (its
    hyperparameters, its scalars by tag). A session written twice would fail."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata
    from tensorboard.util import tensor_util

    sessions = {}
    for run in sorted(p for p in logdir.iterdir() if p.is_dir()):
        events = event_accumulator.EventAccumulator(str(run), size_guidance={"tensors": 0})
        events.Reload()
        starts = events.PluginTagToContent(metadata.PLUGIN_NAME)
        assert len(starts) == 1 and len(list(run.glob("events.*"))) == 1, run
        info = metadata.parse_session_start_info_plugin_data(next(iter(starts.values())))
        assert info.group_name not in sessions
        values = {
            k: v.string_value if v.HasField("string_value") else v.number_value
            for k, v in info.hparams.items()
        }
        scalars = {
            tag: [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]
            if tag != metadata.SESSION_START_INFO_TAG
        }
        sessions[info.group_name] = (values, scalars)
    return sessions


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
    found = tuner.Search(tmp_path)
    with pytest.raises(tuner.InputError, match="unknown option\\(s\\) max_latency; valid"):
        found.export(max_latency=5)
    with pytest.raises(tuner.InputError, match="rule 'best' is not one of knee"):
        found.export(rule="best")


def test_export_picks_the_commands_default_rule():
    from tuner.export_best import default_rule

    assert default_rule(None, None) == "knee"
    assert default_rule(0.9, None) == "fastest"
    assert default_rule(None, 5.0) == "max-accuracy"
    assert default_rule(0.9, 5.0) == "knee"


def read_report(path):
    """report.html through an HTML parser: the leaderboard's trial ids (one list per row),
    the inline SVG plots, and every reference to something outside the file."""
    from html.parser import HTMLParser

    class Reader(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows, self.svgs, self.external = [], 0, []
            self.table, self.cells, self.column, self.trial_column = 0, None, 0, None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            for key in ("src", "href"):
                if attrs.get(key) and not attrs[key].startswith("#"):
                    self.external.append(attrs[key])
            if tag == "link" or (tag == "script" and "src" in attrs):
                self.external.append(tag)
            self.svgs += tag == "svg"
            if tag == "table" and "leaderboard" in attrs.get("class", ""):
                self.table = 1
            elif self.table and tag == "tr":
                self.cells, self.column = [], 0
            elif self.table and tag in ("td", "th"):
                self.column += 1

        def handle_endtag(self, tag):
            if self.table and tag == "tr" and self.cells:
                self.rows.append(self.cells)
            if tag == "table":
                self.table = 0

        def handle_data(self, data):
            if self.table and self.cells is not None and data.strip():
                if data.strip() == "trial_id":
                    self.trial_column = self.column
                elif self.column == self.trial_column:
                    self.cells.append(data.strip())

    reader = Reader()
    reader.feed(path.read_text())
    return reader


def test_the_report_is_rewritten_as_trials_end(tmp_path, monkeypatch):
    """Throttled: a trial's end rewrites report.html only once the last write is old."""
    from tuner.engine import session
    from tuner.report import html_report

    written = []
    monkeypatch.setattr(html_report, "write", lambda folder: written.append(folder))

    class Oracle:
        def end_trial(self, trial, *args, **kwargs):
            return trial

    often, seldom = Oracle(), Oracle()
    session.report_as_it_goes(often, tmp_path, every_s=0.0)
    session.report_as_it_goes(seldom, tmp_path, every_s=3600.0)
    assert often.end_trial("t") == "t" and written == [tmp_path]
    assert seldom.end_trial("u") == "u" and written == [tmp_path]  # written a moment ago
