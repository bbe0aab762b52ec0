"""The train and validation splits a search trains and selects on (:class:`SplitData`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from data_tools import pipeline
from tuner.model import augment as augment_mod


class SplitData:
    """Train and validation rows of the normalised table, served as tf.data per size.

    The test split is never given to this class: it is read by export alone.
    """

    def __init__(self, table: pd.DataFrame, classes: Sequence[str], cache_dir: str | None):
        if "type" in table and table["type"].eq("test").any():
            raise ValueError("the search must not see the test split")
        self.train = table[table["type"] == "train"].reset_index(drop=True)
        self.validation = table[table["type"] == "validation"].reset_index(drop=True)
        self.classes = list(classes)
        self.cache_dir = cache_dir

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def datasets(
        self,
        size: int,
        batch_size: int,
        seed: int,
        augment: str = augment_mod.NONE,
        cache: bool = True,
    ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        """(train, validation) as float32 pixels in 0..255 and int32 labels; ``augment``
        transforms the train batches afresh every epoch (validation never). ``cache``: read
        (or build) the decoded-pixel cache; without it every epoch decodes the files."""
        cache_dir = self.cache_dir if cache else None

        def as_float(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return tf.cast(images, tf.float32), labels

        train = pipeline.make_dataset(
            self.train,
            size,
            batch_size,
            shuffle=True,
            seed=seed,
            cache_dir=cache_dir,
            split="train",
        )
        val = pipeline.make_dataset(
            self.validation, size, batch_size, cache_dir=cache_dir, split="validation"
        )
        train = train.map(as_float)
        layer = augment_mod.layer(augment, augment_mod.view_seed(augment, seed, 0))
        if layer is not None:
            train = train.map(
                lambda images, labels: (layer(images, training=True), labels),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return train, val.map(as_float)

    def rows(self, split: str) -> pd.DataFrame:
        return self.train if split == "train" else self.validation

    def paths(self, split: str) -> list[str]:
        return self.rows(split)["path"].tolist()

    def pixel_file(self, split: str, size: int) -> Path:
        """Where a split's decoded pixels at ``size`` are cached; its name fingerprints the
        image files (what every feature entry computed from them is keyed by)."""
        return pipeline.cache_file(self.cache_dir, split, size, self.paths(split))

    def cached_pixels(self, split: str, size: int) -> np.ndarray | None:
        """A split's decoded pixels at ``size`` when they are cached, else None."""
        target = self.pixel_file(split, size)
        expected = (len(self.rows(split)), size, size, 3)
        return pipeline.load_checked(target, expected, np.uint8)

    def pixels(self, split: str, size: int) -> tuple[np.ndarray, str]:
        """(uint8 pixels of a split at ``size`` from the decoded cache, decoded into it when
        missing; the cache file's name)."""
        paths = self.paths(split)
        name = self.pixel_file(split, size).name
        return pipeline.decoded_array(paths, size, self.cache_dir, split), name

    def labels(self, split: str) -> np.ndarray:
        return self.rows(split)["class_index"].to_numpy(dtype=np.int32)

    def class_weights(self) -> dict[int, float]:
        """scikit-learn's ``balanced`` weights over the train split."""
        y = self.train["class_index"].to_numpy()
        present = np.unique(y)
        weights = compute_class_weight("balanced", classes=present, y=y)
        return {int(c): float(w) for c, w in zip(present, weights, strict=True)}
