"""Slow tier: the package as a user installs it. The built wheel, installed into a fresh
environment (no editable install, no checkout on the path), runs a search and an export
from an empty folder; the quickstart notebook executes top to bottom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_and_runs_a_search_and_an_export_from_any_folder(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("effnet_tuner-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    python = bin_dir / "python"
    # The dependencies (TensorFlow and the rest) from this environment's site-packages, as
    # a plain path: its .pth files (an editable install of this checkout) are not read.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "anywhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled", XDG_CACHE_HOME=str(tmp_path / "cache"))

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bin_dir / "effnet-tuner"), *argv],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    where = subprocess.run(
        [str(python), "-c", "import tuner; print(tuner.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(site), where  # the installed package, not the checkout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("effnet-tuner 0.")
    searched = run("search", "--budget", "1m")
    assert searched.returncode == 0, searched.stdout + searched.stderr
    assert "search demo:" in searched.stdout  # the shipped quick.yaml found, in the wheel
    exported = run("export")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    record = json.loads((work / "results" / "demo" / "best" / "metrics.json").read_text())
    assert record["test"]["count"] > 0
    assert "oneDNN" not in searched.stderr + exported.stderr  # TensorFlow's log stays hidden


def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason='pip install -e ".[test,notebook]"')
    nbclient = pytest.importorskip("nbclient", reason='pip install -e ".[test,notebook]"')
    path = ROOT / "examples" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")  # cleared
    os.environ.setdefault("WANDB_MODE", "disabled")
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    assert (tmp_path / "results" / "quickstart" / "best" / "metrics.json").is_file()
    last = notebook.cells[-1].outputs
    assert last and "label" in json.dumps(last)


def test_the_documentation_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings"):
        pytest.importorskip(module, reason='pip install -e ".[docs]"')
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    commands = (site / "reference" / "cli" / "index.html").read_text()
    assert "usage: effnet-tuner search" in commands and "--within-se" in commands
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "Run, or resume, a search" in api and "from_data" in api
