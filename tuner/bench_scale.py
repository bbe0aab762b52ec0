"""Benchmark: how a search's time, memory and disk grow with the number of images.

    python -m tuner.bench_scale [--counts 500,2000,8000] [--sizes 224,300,380] [--backbone T0]
                                [--cache-budget 1GB] [--tree PATH]

For each N of ``--counts``: the first N of a set of seeded 256 px JPEG photos (random crops,
flips and colour shifts of scikit-learn's two sample photos; 4 classes; written once under
``--images-dir`` and reused), split as ``data_tools.split`` splits, and one ``transfer`` search
on them in a fresh process, doing a fixed amount of work whatever N is: the backbone at each
of ``--sizes`` (one feature set each), ``--heads`` heads on each, then ``--fine-tunes``
fine-tunes of the top 20% of blocks for 2 epochs (``max_trials`` ends it; the 10-hour budget
never does). Random weights in a weights folder: cost does not depend on their values, and
the data path does the real work (T0 at 224-380 px keeps a 2-core run to minutes).

Per N it prints: wall time, seconds an image, the seconds of each stage (frozen trials,
fine-tunes, and the rest: reading the data, planning, records), peak RSS of the search process,
the cache folder's bytes (peak, polled every 0.2 s, and final), the peak of everything the run
wrote (cache, results, split), the results folder's other bytes (checkpoints, records), and
decodes an image of the train and validation splits (``data_tools.pipeline.decodes``; the
test split is never read by a search). It ends with one line:

    scale: time x{T} for {r}x the images (linear = {r}), peak RSS x{R}, peak disk {D} GB
    within budget {B} GB, {K} decodes an image

``--tree PATH`` runs the searches from another checkout (say, the code before a change) for a
before/after comparison with the same command; where that code counts no decodes, K is "?".
Targets (issue 21): T <= 18 for 16x the images, R <= 1.5, K = 1 at three sizes, peak disk
within the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_tools import cli

IMAGE_SIZE = 256
RUN_FILE = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def write_photos(folder: Path, count: int, seed: int = 0) -> pd.DataFrame:
    """``count`` seeded 256 px JPEGs in ``folder`` (kept: a later call with a count up to
    what is there writes nothing); returns ``objectId,value`` rows, file names
    ``<objectId>.jpg``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    sources = [np.asarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        source = int(rng.integers(len(sources)))
        flip = bool(rng.integers(2))
        side = int(rng.integers(160, min(sources[source].shape[:2]) + 1))
        top = int(rng.integers(sources[source].shape[0] - side + 1))
        left = int(rng.integers(sources[source].shape[1] - side + 1))
        tint = rng.uniform(0.7, 1.3, 3)
        object_id = f"{i:08x}"
        rows.append((object_id, f"{source}{'f' if flip else ''}"))
        path = folder / f"{object_id}.jpg"
        if path.is_file():
            continue
        crop = sources[source][top : top + side, left : left + side].astype(np.float32) * tint
        image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(path, quality=90)
    return pd.DataFrame(rows, columns=["objectId", "value"])


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (lock files aside)."""
    from tuner.model import disk

    return disk.Budget(folder, 0).used()


class Peak(threading.Thread):
    """Polls a folder's bytes until stopped; ``peak`` is the most it held."""

    def __init__(self, folder: Path, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.folder, self.every, self.peak = folder, every, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, folder_bytes(self.folder))
            self.done.wait(self.every)

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.peak = max(self.peak, folder_bytes(self.folder))
        return self.peak


def run_child(report: Path, argv: list[str]) -> int:
    """In the search's own process: run it, then write its peak RSS and decodes."""
    from data_tools.errors import run_cli
    from tuner import search

    code = run_cli(search.main, argv)
    from data_tools import pipeline

    counted = pipeline.decodes() if hasattr(pipeline, "decodes") else None
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    report.write_text(json.dumps({"code": code, "rss_mb": peak_kb / 1024, "decodes": counted}))
    return code


def _search_argv(args: argparse.Namespace, root: Path, work: Path, cache: Path) -> list[str]:
    """The search's command line: a head a size, then the fine-tunes, in a fixed space."""
    results = work / "results"
    sizes = ",".join(str(s) for s in args.sizes)
    trials = len(args.sizes) * args.heads + args.fine_tunes
    argv = [
        *("--data", str(work / "split_label.csv"), "--images", str(args.images_dir)),
        *("--results", str(results), "--name", "scale", "--weights", str(root / "weights")),
        *("--algorithm", "transfer", "--budget", "10h", "--wandb-mode", "disabled"),
        *("--set", f"backbones=[{args.backbone}]", "--set", f"image_size=[{sizes}]"),
        *("--set", f"head_trials={args.heads}", "--set", f"max_trials={trials}"),
        *("--set", f"finetune_fraction={'[0.0, 0.2]' if args.fine_tunes else 0.0}"),
        # One feature set a size, as the work above counts them: with stage features too
        # (the default) the heads on them took the fine-tunes' trials, and nothing fine-tuned.
        *("--set", "finetune_lr_factor=0.1", "--set", "features=top"),
        *("--set", "epochs=2", "--set", "head_epochs=5", "--set", "seed=0"),
    ]
    if args.tree is None:  # the code before the cache folder and its budget had neither flag
        argv += ["--cache-dir", str(cache)]
        if args.cache_budget:
            argv += ["--cache-budget", args.cache_budget]
    return argv


def one_search(args: argparse.Namespace, root: Path, photos: pd.DataFrame, count: int) -> dict:
    """One search over the first ``count`` photos in a fresh process; what it cost."""
    from data_tools import split

    work = root / f"n{count}"
    work.mkdir(parents=True, exist_ok=True)
    frame = split.split_frame(photos.iloc[:count].reset_index(drop=True))
    frame.to_csv(work / "split_label.csv", index=False)
    results, cache = work / "results", work / "cache"
    argv = _search_argv(args, root, work, cache)
    report = work / "child.json"
    env = dict(os.environ, PYTHONPATH=str(args.tree or Path(__file__).resolve().parent.parent))
    if args.tree is not None:
        cache = results / "scale" / "cache"  # that code's only cache folder
    watched, everything = Peak(cache), Peak(work)
    watched.start()
    everything.start()
    started = time.perf_counter()
    # This file by path: a --tree checkout may not have it; its own tuner runs the search.
    child = [sys.executable, "-c", RUN_FILE, str(Path(__file__)), "--child", str(report), "--"]
    child += argv
    done = subprocess.run(child, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_cache, peak_all = watched.stop(), everything.stop()
    if done.returncode != 0 or not report.is_file():
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"the search on {count} images failed (exit {done.returncode})")
    facts = json.loads(report.read_text())
    table = pd.read_csv(results / "scale" / "trials.csv")
    spent = table.groupby(table["stage"].fillna(""))["train_seconds"].sum()
    cache_final = folder_bytes(cache)
    other = folder_bytes(results) - folder_bytes(results / "scale" / "cache")
    read = int((frame["type"] != "test").sum())  # what a search reads: train + validation
    return {
        "images": count,
        "wall_s": wall,
        "s_per_image": wall / count,
        "frozen_s": float(spent.get("frozen", 0.0)),
        "fine_tune_s": float(spent.get("fine-tune", 0.0)),
        "rest_s": wall - float(spent.sum()),
        "trials": len(table),
        "peak_rss_mb": facts["rss_mb"],
        "cache_peak_mb": peak_cache / 1e6,
        "disk_peak_mb": peak_all / 1e6,
        "cache_final_mb": cache_final / 1e6,
        "other_mb": other / 1e6,
        "kb_per_image": (cache_final + other) / count / 1e3,
        "decodes_per_image": None if facts["decodes"] is None else facts["decodes"] / read,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("tuner.bench_scale", __doc__)
    parser.add_argument("--counts", default="500,2000,8000", help="image counts, one search each")
    parser.add_argument("--sizes", default="224,300,380", help="image sizes every search uses")
    parser.add_argument("--backbone", default="T0", help="the backbone searched (random weights)")
    parser.add_argument("--heads", type=int, default=2, help="heads on each feature set")
    parser.add_argument("--fine-tunes", type=int, default=2, help="0: a frozen search")
    parser.add_argument("--cache-budget", help="e.g. 1GB (default: the search's own)")
    parser.add_argument("--images-dir", type=Path, help="where the photos are kept")
    parser.add_argument("--tree", help="run the searches from this checkout instead")
    parser.add_argument("--out", type=Path, help="write the table as CSV here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return run_child(Path(argv[1]), argv[3:])
    args = build_parser().parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.images_dir = args.images_dir or Path(tempfile.gettempdir()) / "effnet-bench-photos"

    from tuner.model import backbones

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = write_photos(args.images_dir, max(args.counts))
        (root / "weights").mkdir()
        entry = backbones.get(args.backbone)
        net = backbones.build(entry, max(args.sizes), None)
        net.save_weights(root / "weights" / f"{entry.name}.weights.h5")
        rows = []
        for count in args.counts:
            rows.append(one_search(args, root, photos, count))
            print(f"{count} images: {rows[-1]['wall_s']:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        table.to_csv(args.out, index=False)
    print(summary(table, args.cache_budget))
    return 0


def summary(table: pd.DataFrame, budget: str | None) -> str:
    """The closing line: growth from the smallest N to the largest."""
    first, last = table.iloc[0], table.iloc[-1]
    ratio = last["images"] / first["images"]
    decodes = last["decodes_per_image"]
    within = ""
    if budget:
        from tuner.model import disk

        within = f" within budget {disk.parse_size(budget) / 1e9:.2f} GB"
    return (
        f"scale: time x{last['wall_s'] / first['wall_s']:.1f} for {ratio:g}x the images "
        f"(linear = {ratio:g}), peak RSS x{last['peak_rss_mb'] / first['peak_rss_mb']:.2f}, "
        f"peak disk {table['cache_peak_mb'].max() / 1e3:.2f} GB{within}, "
        f"{'?' if pd.isna(decodes) else f'{decodes:.2f}'} decodes an image"
    )


if __name__ == "__main__":
    raise SystemExit(main())
