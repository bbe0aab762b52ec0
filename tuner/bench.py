"""Benchmark: what the caches buy, against the reference way, side by side in one process.

    python -m tuner.bench [--backbone B0] [--size 128] [--images 3000] [--epochs 10]

On the same images (the demo digits, shifted and written as 160 px JPEG files in class
folders) and the same model (random weights: time does not depend on their values):

* reference: the end-to-end model, its backbone frozen, trained with
  ``keras.utils.image_dataset_from_directory``: every epoch decodes every image again and
  runs it through the whole backbone;
* ours: the search's own trial (``EffNetHyperModel.build`` + ``fit``) with the decoded-pixel
  and feature caches, for a frozen trial, a second frozen trial of the same search (same
  hypermodel, so the built frozen backbone and the cached features are reused), and a
  fine-tune of the top 20% of blocks (half the epochs frozen, half fine-tuning, both ways);
* augmented frozen trial: the same frozen trial with augmentation (``AUGMENT``): the
  reference transforms every image afresh each epoch and runs the backbone on it, ours caches
  the features of ``VIEWS`` views once (view 0 is the plain pass already cached, so this costs
  ``VIEWS - 1`` passes over the train split) and draws one view per image and epoch;
* decoding: images/s over all epochs, ``image_dataset_from_directory`` against our pipeline
  (the first epoch decodes into memory; the cache file is written by a background thread
  meanwhile, whose CPU time counts, but no epoch waits for the disk, so neither does the
  measure).

Each measure is one timed run of a whole trial (build + fit), after a warm-up that builds
and runs the model once; the table ends with one line per measure, ``<measure>: <ratio>x``.
Targets on a 2-core CPU: frozen >= 8x, second frozen >= 50x, fine-tune >= 2x, augmented
frozen >= 2x, decoding >= 3x.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_tools import cli

FINETUNE_FRACTION = 0.2
AUGMENT, VIEWS = "flip+zoom:0.1", 4
TARGETS = {
    "frozen trial": 8,
    "second frozen trial": 50,
    "fine-tune top 20%": 2,
    "augmented frozen trial": 2,
    "decoding": 3,
}


def write_images(root: Path, count: int, seed: int = 0) -> pd.DataFrame:
    """``count`` JPEG files (digits shifted by a few pixels, 160 px) in ``root/<split>/<class>``;
    returns the table our pipeline reads (objectId, path, value, class_index, type)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        k = i % len(digits.images)
        gray = np.roll(digits.images[k] * (255 / 16), rng.integers(-1, 2, size=2), (0, 1))
        image = Image.fromarray(np.stack([gray.astype(np.uint8)] * 3, -1)).resize((160, 160))
        split = "validation" if i % 7 == 0 else "train"
        label = str(digits.target[k])
        path = root / split / label / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        rows.append((f"{i:05d}", str(path), label, int(label), split))
    return pd.DataFrame(rows, columns=["objectId", "path", "value", "class_index", "type"])


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("tuner.bench", __doc__)
    parser.add_argument("--backbone", default="B0", help="the backbone timed (random weights)")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels")
    parser.add_argument("--images", type=int, default=3000, help="images written and trained on")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every trial")
    parser.add_argument("--batch", type=int, default=32, help="training batch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the images and a backbone's weights to a temporary folder, time each measure
    both ways (:class:`_Bench`), print the table."""
    args = build_parser().parse_args(argv)

    import tensorflow as tf

    from tuner.model import backbones

    tf.get_logger().setLevel("ERROR")  # retracing notices for every fresh model: expected here
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = write_images(root / "images", args.images)
        (root / "weights").mkdir()
        entry = backbones.get(args.backbone)
        weights = root / "weights" / f"{entry.name}.weights.h5"
        backbones.build(entry, args.size, None).save_weights(weights)
        rows, decoded = _Bench(args, root, table).measure()
    _print_table(args, table, rows, decoded)
    return 0


class _Bench:
    """Our trials (a hypermodel over the written images, its caches under ``root``) and the
    reference's (Keras' image_dataset_from_directory and fit), timed side by side."""

    def __init__(self, args: argparse.Namespace, root: Path, table) -> None:
        self.args, self.root, self.table = args, root, table
        self.classes = [str(d) for d in range(10)]

    def maker(self, finetune: float, cache: Path, policy: str = "none"):
        from tuner.model import hypermodel, space

        args = self.args
        fixed = {
            "augment": policy,
            "augment_views": VIEWS,
            "backbones": [args.backbone],
            "image_size": args.size,
            "batch_size": args.batch,
            "head_width": 128,
            "dropout": 0.0,
            "learning_rate": 1e-3,
            "finetune_fraction": finetune,
            "class_weight": "none",
            "epochs": args.epochs,
        }
        data = hypermodel.SplitData(self.table, self.classes, cache_dir=str(cache))
        weights = str(self.root / "weights")
        return hypermodel.EffNetHyperModel(
            space.load(None, fixed), data, weights, jit_compile=False
        )

    def ours(self, finetune: float, cache: Path, m=None, policy: str = "none"):
        """One trial; pass the hypermodel of an earlier trial to continue its search."""
        import keras_tuner as kt

        m = m or self.maker(finetune, cache, policy)
        hp = kt.HyperParameters()
        m.fit(hp, m.build(hp))
        return m

    def keras_data(self, split: str):
        import keras

        return keras.utils.image_dataset_from_directory(
            self.root / "images" / split,
            image_size=(self.args.size, self.args.size),
            batch_size=self.args.batch,
            shuffle=split == "train",
            seed=0,
            verbose=False,
        )

    def reference(self, finetune: float, policy: str = "none") -> None:
        """The Keras way: image_dataset_from_directory, fit frozen, then fine-tune."""
        import keras_tuner as kt

        from tuner.model import augment, backbones, training

        epochs = self.args.epochs
        m = self.maker(finetune, self.root / "unused")
        model = m.build(kt.HyperParameters())
        train, val = self.keras_data("train"), self.keras_data("validation")
        layer = augment.layer(policy, 0)
        if layer is not None:
            train = train.map(lambda x, y: (layer(x, training=True), y))
        tuned = training.finetune_epochs(m.space, epochs) if finetune else 0
        frozen_epochs = epochs - tuned
        model.fit(train, validation_data=val, epochs=frozen_epochs, verbose=0, shuffle=False)
        if finetune:
            base = model.get_layer("backbone")
            backbones.unfreeze_top(base, backbones.blocks_for_fraction(base, finetune))
            training.compile_model(model, 1e-4, 10, jit_compile=False)
            model.fit(
                train,
                validation_data=val,
                epochs=epochs,
                initial_epoch=frozen_epochs,
                verbose=0,
                shuffle=False,  # the dataset shuffles itself
            )

    def decode_ours(self, cache: Path) -> None:
        from data_tools import pipeline

        # Built once and iterated each epoch, as Keras' fit does (and as decode_keras).
        args = self.args
        data = pipeline.make_dataset(
            self.table, args.size, args.batch, shuffle=True, cache_dir=cache, split="all"
        )
        for _ in range(args.epochs):
            for _batch in data:
                pass

    def decode_keras(self) -> None:
        data = self.keras_data("train").concatenate(self.keras_data("validation"))
        for _ in range(self.args.epochs):
            for _batch in data:
                pass

    def measure(self) -> tuple[list[tuple[str, float, float]], tuple[float, float]]:
        """(rows of (measure, reference s, ours s), (Keras' decoding s, ours)), in a
        search's order: a warm-up, decoding (a search's first trial decodes), then trials."""
        from data_tools import pipeline

        root = self.root
        # Warm-up: build the backbone and run it once (TensorFlow's first-call costs).
        timed(lambda: self.ours(0.0, root / "warmup"))
        keras_s = timed(self.decode_keras)
        ours_s = timed(lambda: self.decode_ours(root / "decode"))
        pipeline.finish_cache_writes()  # outside the measure: training never waits for it
        cache = root / "cache"
        search: list = []  # one hypermodel per search, as the CLI
        first = timed(lambda: self.reference(0.0))
        rows = [("frozen trial", first, timed(lambda: search.append(self.ours(0.0, cache))))]
        rows.append(("second frozen trial", first, timed(lambda: self.ours(0.0, cache, search[0]))))
        rows.append(
            (
                "fine-tune top 20%",
                timed(lambda: self.reference(FINETUNE_FRACTION)),
                timed(lambda: self.ours(FINETUNE_FRACTION, cache)),
            )
        )
        # The plain features are cached (the first frozen trial): as in a search, where the
        # augmented feature set comes after its plain twin.
        rows.append(
            (
                "augmented frozen trial",
                timed(lambda: self.reference(0.0, AUGMENT)),
                timed(lambda: self.ours(0.0, cache, policy=AUGMENT)),
            )
        )
        rows.append(("decoding", keras_s, ours_s))
        return rows, (keras_s, ours_s)


def _print_table(args: argparse.Namespace, table, rows, decoded: tuple[float, float]) -> None:
    from tuner.model.measure import device_name

    keras_s, ours_s = decoded
    images = len(table) * args.epochs
    print(
        f"{args.backbone} at {args.size} px, {len(table)} images "
        f"({(table.type == 'train').sum()} train), {args.epochs} epochs, batch {args.batch}, "
        f"on {device_name()}"
    )
    print(f"{'measure':<22}{'reference s':>12}{'ours s':>10}{'ratio':>9}{'target':>8}")
    for name, ref, mine in rows:
        print(f"{name:<22}{ref:>12.1f}{mine:>10.1f}{ref / mine:>8.1f}x{TARGETS[name]:>7}x")
    print(
        f"decoding images/s: image_dataset_from_directory {images / keras_s:,.0f}, "
        f"ours {images / ours_s:,.0f}"
    )
    for name, ref, mine in rows:
        print(f"{name}: {ref / mine:.1f}x")


if __name__ == "__main__":
    raise SystemExit(main())
