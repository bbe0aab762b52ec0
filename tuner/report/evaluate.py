"""A split read back from a search's folder, and a model scored on it: class probabilities and
the one test evaluation's numbers (accuracy, balanced accuracy, loss, per-class report).
Test rows are read here only, and only after the model is chosen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from data_tools.errors import InputError


def split_table(config: dict[str, Any], types: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Rows of the search's split file of the given types, normalised, and the classes."""
    from data_tools import ingest

    frame = ingest.read_split_csv(config["data"])
    frame = frame[frame["type"].isin(types)].reset_index(drop=True)
    classes = list(config["classes"])
    paths = ingest.resolve_paths(frame, config["images"])
    return ingest.normalise(frame, paths, classes), classes


def probabilities(model, pixels: np.ndarray) -> np.ndarray:
    """Class probabilities ``[N, C]`` (a sigmoid head gives ``[1 - p, p]``)."""
    return two_columns(
        np.asarray(model.predict(pixels.astype("float32"), verbose=0, batch_size=64))
    )


def two_columns(out: np.ndarray) -> np.ndarray:
    """A sigmoid head's ``[N, 1]`` as ``[N, 2]`` class probabilities; softmax as it is."""
    return np.concatenate([1 - out, out], axis=1) if out.shape[1] == 1 else out


def test_pixels(config: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The test split decoded at ``size``: (uint8 pixels, labels, table). Read here only."""
    return split_pixels(config, size, "test")


def split_pixels(
    config: dict[str, Any], size: int, split: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """A split decoded at ``size``: (uint8 pixels, labels, table)."""
    from data_tools import pipeline

    table, _ = split_table(config, (split,))
    if table.empty:
        raise InputError(f"the split {config['data']} has no {split} rows: nothing to check on")
    batches = list(pipeline.make_dataset(table, size, 64).as_numpy_iterator())
    return (np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]), table)


def test_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """scikit-learn's numbers for these predictions."""
    from sklearn import metrics

    predicted = probs.argmax(axis=1)
    indices = list(range(len(classes)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    return {
        "count": int(len(labels)),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "loss": float(metrics.log_loss(labels, probs, labels=indices)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(labels, predicted)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=indices).tolist(),
    }


def test_line(metrics: dict[str, Any]) -> str:
    return (
        f"accuracy {metrics['accuracy']:.4f}, balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f}, loss {metrics['loss']:.4f} on "
        f"{metrics['count']} images"
    )
