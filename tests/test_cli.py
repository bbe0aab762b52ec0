"""The console command and every command's --help: one name, help for every option, defaults
shown, plain text, nothing outside the repository cited."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import tuner
from tuner import cli


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_has_plain_help(command):
    module = importlib.import_module(cli.COMMANDS[command][0])
    parser = module.build_parser()
    missing = [
        a.option_strings[0]
        for a in parser._actions
        if a.option_strings and not (a.help or "").strip()
    ]
    assert not missing, f"{command}: options without help: {missing}"
    text = parser.format_help()
    for leak in ("``", ":mod:", ":func:", ":class:", "DESIGN.md", "../shared", "STYLE.md"):
        assert leak not in text, f"{command} --help shows {leak!r}"
    # A default that matters is shown: every option with a non-empty default names it.
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, [], "==SUPPRESS=="):
            assert "default" in parser._get_formatter()._get_help_string(action), action.dest


def test_console_command_runs_the_modules(tmp_path, capsys):
    assert cli.main(["split", "--labels", str(tmp_path / "none.csv"), "--out", "x"]) == 2
    assert "labels file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["search", "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: effnet-tuner search")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serch"])
    assert exited.value.code == 2
    assert "invalid choice: 'serch'" in capsys.readouterr().err


def test_version_from_the_package_metadata():
    from importlib import metadata

    assert tuner.__version__ == metadata.version("effnet-tuner")
    done = subprocess.run(
        [sys.executable, "-m", "tuner", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"effnet-tuner {tuner.__version__}"


def test_tensorflow_log_hidden_unless_verbose():
    from data_tools import cli as shared

    script = (
        "import sys; from data_tools.cli import quiet_tensorflow; quiet_tensorflow([]);"
        "import tensorflow as tf; print(float(tf.constant(1.0) + 1))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "2.0"
    assert quiet.stderr.strip() == "", quiet.stderr  # TensorFlow alone logs 5 lines here
    # --verbose leaves TensorFlow as it is.
    before = list(sys.meta_path)
    shared.quiet_tensorflow(["--verbose"])
    assert sys.meta_path == before


def test_a_long_loop_draws_a_progress_bar_on_a_terminal_only(monkeypatch, capsys):
    from data_tools import progress

    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "status", lambda: "budget 1m spent, 4m left")
    with progress.bar("B0 224px train", total=300) as advance:
        for _ in range(3):
            advance(100)
    assert capsys.readouterr().err == ""  # captured: not a terminal
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with progress.bar("B0 224px train", total=300) as advance:
        for _ in range(3):
            advance(100)
    drawn = capsys.readouterr().err
    assert "B0 224px train" in drawn and "images/s" in drawn and "4m left" in drawn
