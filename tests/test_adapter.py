"""Keras Tuner's internals behind one door (tuner/engine/adapter.py): the installed Keras
Tuner has what the adapter relies on, and one that does not stops a search in one line."""

from __future__ import annotations

import keras_tuner as kt
import pytest

from data_tools.errors import run_cli
from tuner import search
from tuner.engine import adapter


def test_the_installed_keras_tuner_has_everything_the_adapter_relies_on():
    assert adapter.missing() == [], (
        f"keras-tuner {kt.__version__} changed what tuner/engine/adapter.py relies on "
        f"(tested: {adapter.TESTED}): {adapter.missing()}"
    )


@pytest.mark.parametrize(
    ("owner", "name", "named"),
    [
        (kt.Tuner, "_try_build", "kt.Tuner._try_build"),
        (kt.Tuner, "_build_and_fit_model", "kt.Tuner._build_and_fit_model"),
        (adapter.tuner_utils.SaveBestEpoch, "_save_model", "SaveBestEpoch._save_model"),
    ],
)
def test_a_keras_tuner_that_lost_an_internal_stops_the_search_in_one_line(
    tmp_path, capsys, monkeypatch, owner, name, named
):
    monkeypatch.delattr(owner, name)
    assert adapter.missing() == [named]
    code = run_cli(search.main, ["--results", str(tmp_path), "--budget", "1m"])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert err.count("\n") == 1 and named in err and f"keras-tuner{adapter.TESTED}" in err, err
    assert list(tmp_path.iterdir()) == []  # it stopped before anything was written


def test_an_oracle_without_its_retry_queue_is_named(monkeypatch):
    made = kt.oracles.RandomSearchOracle.__init__

    def without_queue(self, *args, **kwargs):
        made(self, *args, **kwargs)
        del self._retry_queue

    monkeypatch.setattr(kt.oracles.RandomSearchOracle, "__init__", without_queue)
    assert adapter.missing() == ["Oracle()._retry_queue"]
