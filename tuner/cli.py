"""``effnet-tuner``: one console command whose subcommands are the package's commands.

    effnet-tuner search --data label.csv --budget 20h     # = python -m tuner.search ...
    effnet-tuner export --rule knee                       # = python -m tuner.export_best ...
    effnet-tuner predict --model results/NAME/best photo.jpg
    effnet-tuner --version

Each subcommand runs the same ``main`` as its module, with the same options and exit codes
(2 for bad input, with one line saying what to fix).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from data_tools import cli

PROG = "effnet-tuner"
# subcommand -> (module, one line for the list of subcommands)
COMMANDS: dict[str, tuple[str, str]] = {
    "search": ("tuner.search", "run or resume a budgeted search"),
    "export": ("tuner.export_best", "choose from the front, test once, write best/"),
    "predict": ("tuner.predict", "label images with an exported model"),
    "split": ("data_tools.split", "the balanced hash split of a label file"),
    "demo": ("data_tools.demo", "write the built-in demo images and label.csv"),
    "dashboard": ("tuner.dashboard", "a W&B report of a search"),
    "bench": ("tuner.bench", "speed of the training paths"),
    "bench-quality": ("tuner.bench_quality", "the search against the baselines, over folds"),
    "bench-quantize": ("tuner.bench_quantize", "LiteRT variants of a trial"),
    "bench-scale": ("tuner.bench_scale", "cost and disk as the data grows"),
    "bench-chaos": ("tuner.bench_chaos", "a search killed and resumed, again and again"),
    "bench-split": ("data_tools.bench_split", "the split's speed on a million rows"),
}


def version() -> str:
    import tuner

    return tuner.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=cli.plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [--version] [--verbose] COMMAND [options]",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    parser.add_argument(
        "--verbose", action="store_true", help="show TensorFlow's own log (hidden by default)"
    )
    lines = "\n".join(f"  {name:<15} {line}" for name, (_, line) in COMMANDS.items())
    parser.epilog = f"commands:\n{lines}\n\n{PROG} COMMAND --help shows a command's options."
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="see below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    build_parser().parse_args(argv[: first + 1])  # --help, --version, or a bad COMMAND
    module_name = COMMANDS[argv[first]][0]
    cli.console_names[module_name] = f"{PROG} {argv[first]}"
    module = importlib.import_module(module_name)
    from data_tools.errors import run_cli

    return run_cli(module.main, argv[:first] + argv[first + 1 :])


if __name__ == "__main__":
    raise SystemExit(main())
