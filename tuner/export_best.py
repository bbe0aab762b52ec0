"""Export the model to ship: Pareto front, a trade-off rule, one test evaluation, deployables.

    python -m tuner.export_best                        # the most recent search, knee rule
    python -m tuner.export_best --results results/NAME --rule max-accuracy --max-latency-ms 5
    python -m tuner.export_best --rule weighted --weight -0.07 --target-ms 10 --tflite

1. The Pareto front of the finished trials (val accuracy up, time down; ``--time training``
   uses training time instead of latency) is printed with the chosen trial marked and the
   reason (rules: :mod:`tuner.report.choose`). Then the one-standard-error rule: if a
   simpler trial (fewer backbone units fine-tuned, then a narrower head) is no slower and
   its val accuracy is within one binomial standard error of the pick's (``--within-se``;
   0 turns it off), that one ships: on a few hundred validation images the best of many
   trials is partly the luckiest.
2. The chosen trial's model is rebuilt with its best-epoch checkpoint (what the trial
   trained, on the same frozen weights: :mod:`tuner.model.checkpoint`), or loaded whole from
   ``trials/<id>/model.keras`` for a search from before that format, or, when neither is
   there, retrained from its hyperparameters; the output says which.
3. It is evaluated once on the test split, which nothing read before: accuracy, loss,
   balanced accuracy, per-class precision/recall/F1 and the confusion matrix
   (scikit-learn), and its latency on this device.
4. ``results/<name>/best/`` (or ``--out``): ``model.keras``; ``saved_model/`` whose
   ``serving_default`` signature takes raw ``uint8`` RGB images of any size (resizing and
   preprocessing inside) and returns class probabilities; ``model.tflite`` with
   ``--tflite`` (checked against Keras on the test images); ``labels.txt``; ``metrics.json``;
   ``model_card.md``; ``pareto.png`` with the exported trial starred (the search's own
   ``pareto.png`` is redrawn so too). The folder is written beside and renamed into place
   at the end.
   A trial trained in mixed precision (the GPU default) is exported in float32: the same
   weights, every layer float32, checked against the trial's own outputs on the validation
   images (nothing before the one test evaluation reads test)
   (``precision`` in metrics.json).
5. ``--quantize``: before choosing, every trial on the front is converted to LiteRT
   ``float32``, ``float16``, ``dynamic`` and ``int8`` variants, each measured in the
   interpreter (validation accuracy, latency, size: ``deployables.csv``,
   :mod:`tuner.report.quantize`), and the rule chooses among the Keras models and these; a chosen
   variant is evaluated on test in the interpreter and shipped as ``model.tflite``, its
   trial's float model beside it for serving.
6. ``--refit``: the chosen configuration is trained once more on train + validation, for the
   epochs its trial found best, replaying the trial's own schedule (and, for a trial continued
   from another, its parents' first, each to its best epoch), with nothing chosen on the
   validation rows it now trains on. Both models are evaluated on test once; the refit model
   is exported whatever the two figures say (choosing by test would spend the test split),
   and metrics.json and the card give both (``exported``, ``test``, ``trial_test``,
   ``refit``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from data_tools import cli
from data_tools.errors import run_cli
from tuner.report import export, quantize
from tuner.report.choose import MNAS_WEIGHT, RULES, WITHIN_SE


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("tuner.export_best", __doc__)
    parser.add_argument("--results", help="results/NAME (default: the most recent search)")
    parser.add_argument(
        "--rule",
        choices=RULES,
        help="default: knee; fastest with only "
        "--min-accuracy, max-accuracy with only --max-latency-ms",
    )
    parser.add_argument("--max-latency-ms", type=float, help="latency cap (ms per image)")
    parser.add_argument("--min-accuracy", type=float, help="val accuracy floor")
    parser.add_argument(
        "--time",
        choices=["latency", "training"],
        default="latency",
        help="the front's time axis: inference latency per image, or training seconds",
    )
    parser.add_argument("--weight", type=float, default=MNAS_WEIGHT, help="weighted rule's W")
    parser.add_argument("--target-ms", type=float, help="weighted rule's T (default: median)")
    parser.add_argument(
        "--within-se",
        type=float,
        default=WITHIN_SE,
        help="ship the simplest trial (fewest units fine-tuned, then narrowest head) that "
        "is no slower than the rule's pick and within this many standard errors of its val "
        "accuracy; 0 ships the pick (default: %(default)s)",
    )
    parser.add_argument("--tflite", action="store_true", help="also write model.tflite")
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="measure LiteRT float32/float16/dynamic/int8 variants of the front's trials "
        "(deployables.csv) and choose among them and the Keras models",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=quantize.CALIBRATION_IMAGES,
        help="train images int8 calibrates on (default: %(default)s)",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="train the chosen configuration again on train + validation for its best "
        "epochs and export that (both models' test figures are reported)",
    )
    parser.add_argument("--out", help="export folder (default: results/NAME/best)")
    parser.add_argument(
        "--wandb-project", help="W&B project of the model artifact (default: the search's)"
    )
    parser.add_argument("--wandb-entity", help="W&B entity (team or user; default: your own)")
    parser.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        help="default: online with W&B credentials, else offline under results/NAME/wandb",
    )
    return parser


def default_rule(min_accuracy: float | None, max_latency_ms: float | None) -> str:
    """The rule when none is given: fastest with only a floor, max-accuracy with only a cap,
    else knee."""
    if min_accuracy is not None and max_latency_ms is None:
        return "fastest"
    return "max-accuracy" if max_latency_ms is not None and min_accuracy is None else "knee"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.rule = args.rule or default_rule(args.min_accuracy, args.max_latency_ms)
    export.export(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
