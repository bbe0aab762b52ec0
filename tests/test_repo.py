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


def test_readme_is_a_short_guide_whose_commands_and_links_exist() -> None:
    import importlib.util
    import re

    from tuner import cli

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    shown = re.findall(r"(?:^|[`\s])effnet-tuner ([a-z][a-z-]*)", text)
    assert {"search", "export", "predict"} <= set(shown)
    for name in shown:
        assert name in cli.COMMANDS, f"README shows effnet-tuner {name}, which does not exist"
    for module in set(re.findall(r"python -m ([a-z_.]+)", text)):
        assert importlib.util.find_spec(module) is not None, f"python -m {module} does not exist"
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / link).exists(), f"README links {link}, which is not in the repository"
    assert "../shared" not in text


def test_every_docs_page_is_in_the_nav_and_the_cli_reference_has_every_command() -> None:
    """What `mkdocs build --strict` (the slow tier) also checks, without MkDocs: the nav
    names every page, and the generated reference prints every command's --help."""
    import yaml

    from docs import hooks
    from tuner import cli

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in pages(item)]
        return [p for value in node.values() for p in pages(value)]

    listed = set(pages(nav))
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert listed == on_disk
    reference = hooks.cli_reference()
    for name, (module, _) in cli.COMMANDS.items():
        assert f"usage: effnet-tuner {name}" in reference and f"python -m {module}" in reference
    assert "--within-se" in reference and "--key {auto,reference,sha1}" in reference
