"""Repository promises: README's commands, CI running exactly README's test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.strip() for line in lines if line.startswith("    pip install")]


def test_readme_opens_with_demo_and_test_commands() -> None:
    demo, test = readme_commands()[:2]
    assert "data_tools.demo" in demo or "tuner.search" in demo
    assert test.startswith('pip install -e ".[test]"') and "pytest" in test


def test_ci_runs_readmes_test_command() -> None:
    test = readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines
