"""MkDocs hooks: the CLI reference from the commands' own parsers, and files from outside
docs/ (results/README.md) included where a page asks for them."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli_reference() -> str:
    """One section per command: its names and its ``--help``, as argparse prints it."""
    import importlib

    from data_tools import cli as shared
    from tuner import cli

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width
    parts = []
    for name, (module_name, line) in cli.COMMANDS.items():
        shared.console_names[module_name] = f"{cli.PROG} {name}"
        try:
            text = importlib.import_module(module_name).build_parser().format_help()
        finally:
            shared.console_names.pop(module_name, None)
        parts.append(
            f"## {cli.PROG} {name}\n\n{line[0].upper()}{line[1:]}; also "
            f"`python -m {module_name}`.\n\n```text\n{text.rstrip()}\n```\n"
        )
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    for match in re.finditer(r"<!-- include: (\S+) -->", markdown):
        included = (ROOT / match.group(1)).read_text()
        markdown = markdown.replace(match.group(0), included)
    return markdown
