"""Demo data that needs no network: scikit-learn's bundled handwritten digits.

    python -m data_tools.demo --out demo_data

writes ``demo_data/images/<sha1>.png`` (1,797 RGB images, 8x8 pixels, 10 classes) and
``demo_data/label.csv`` in the reference format (``objectId,value``; the objectId is the
SHA-1 of the PNG's bytes, so the hash split spreads the images evenly). The search uses this
when it is given no data.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data_tools import cli
from data_tools.atomic import atomic_path
from data_tools.errors import InputError, run_cli

DIGITS_COUNT = 1797


def digit_pngs() -> list[tuple[bytes, int]]:
    """Each digit as RGB PNG bytes (gray levels 0..16 scaled to 0..255) with its label."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    encoded = []
    for image, label in zip(digits.images, digits.target, strict=True):
        gray = np.round(image * (255 / 16)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB").save(buffer, format="PNG")
        encoded.append((buffer.getvalue(), int(label)))
    return encoded


def write_demo(out: str | os.PathLike[str]) -> Path:
    """Write the demo data set to ``out`` (replacing a previous one); returns its label.csv."""
    out = Path(out)
    if out.exists() and not (out / "label.csv").is_file():
        raise InputError(f"{out} exists and is not a demo data folder: pick a new --out")
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        rows = []
        for data, label in digit_pngs():
            object_id = hashlib.sha1(data).hexdigest()
            (tmp / "images" / f"{object_id}.png").write_bytes(data)
            rows.append((object_id, str(label)))
        pd.DataFrame(rows, columns=["objectId", "value"]).to_csv(tmp / "label.csv", index=False)
    return out / "label.csv"


def ensure_demo(cache_dir: str | os.PathLike[str]) -> Path:
    """The demo data under ``cache_dir/digits``, written on first use; returns its label.csv."""
    labels = Path(cache_dir) / "digits" / "label.csv"
    if labels.is_file() and len(list(labels.parent.glob("images/*.png"))) == DIGITS_COUNT:
        return labels
    return write_demo(labels.parent)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("data_tools.demo", __doc__)
    parser.add_argument("--out", required=True, help="folder to write images/ and label.csv to")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    labels = write_demo(args.out)
    print(f"wrote {DIGITS_COUNT} images to {labels.parent / 'images'} and labels to {labels}")
    print(
        f"next: python -m data_tools.split --labels {labels} --images "
        f"{labels.parent / 'images'} --out {labels.parent / 'split_label.csv'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
