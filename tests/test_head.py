"""The head: standardized features, a linear head fitted exactly, scored as Keras scores it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tuner.model import head as head_mod
from tuner.model.hypermodel import auto_train_batch
from tuner.model.training import compile_model


def blobs(classes: int, n: int = 120, d: int = 12, seed: int = 0):
    """Features on wildly different scales (as EfficientNet's pooled units are)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 1, (classes, d))
    x = (centres[y] + rng.normal(0, 1.5, (n, d))) * np.logspace(-2, 2, d)
    return x.astype("float32"), y.astype("int32")


@pytest.mark.parametrize("classes", [2, 4])
def test_linear_head_is_scikit_learns_solution_and_keras_computes_it(classes):
    x, y = blobs(classes)
    l2 = 1e-3
    head = head_mod.build_head(x.shape[1], 0, 0.0, classes, l2)
    head_mod.standardize(head, x)
    standardized = head.get_layer("standardize")(x).numpy()
    np.testing.assert_allclose(standardized.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(standardized.std(axis=0), 1, atol=1e-3)
    head_mod.fit_linear(head, x, y, l2, None)
    reference = LogisticRegression(C=1 / (2 * len(x) * l2), max_iter=1000, tol=1e-8).fit(
        standardized.astype("float64"), y
    )
    expected = reference.predict_proba(standardized.astype("float64"))
    out = head.predict(x, verbose=0)
    got = np.concatenate([1 - out, out], axis=1) if classes == 2 else out
    np.testing.assert_allclose(got, expected, atol=2e-3)


@pytest.mark.parametrize("classes", [2, 4])
def test_linear_scores_are_what_keras_evaluate_reports(classes):
    x, y = blobs(classes, seed=1)
    l2 = 1e-2
    head = head_mod.build_head(x.shape[1], 0, 0.0, classes, l2)
    head_mod.standardize(head, x)
    head_mod.fit_linear(head, x, y, l2, {c: 1.0 + c for c in range(classes)})
    compile_model(head, 1e-3, classes, jit_compile=False)
    keras_scores = head.evaluate(x, y, verbose=0, return_dict=True)
    ours = head_mod.linear_scores(head, x, y, l2)
    assert ours["accuracy"] == pytest.approx(keras_scores["accuracy"], abs=1e-6)
    assert ours["loss"] == pytest.approx(keras_scores["loss"], rel=1e-4)


def test_standardizing_makes_the_exact_head_better_than_raw_scales():
    x, y = blobs(3, n=300, seed=2)
    train, test = slice(0, 200), slice(200, 300)
    head = head_mod.build_head(x.shape[1], 0, 0.0, 3, 1e-3)
    head_mod.standardize(head, x[train])
    head_mod.fit_linear(head, x[train], y[train], 1e-3, None)
    ours = head_mod.linear_scores(head, x[test], y[test], 0.0)["accuracy"]
    raw = LogisticRegression(C=1 / (2 * 200 * 1e-3), max_iter=200).fit(x[train], y[train])
    assert ours > raw.score(x[test], y[test])


def test_auto_train_batch_leaves_at_least_30_steps_an_epoch():
    assert auto_train_batch(1800, 512, 8) == 32  # 56 steps
    assert auto_train_batch(19658, 512, 8) == 512  # 38 steps
    assert auto_train_batch(19658, 64, 8) == 64  # memory first
    assert auto_train_batch(100, 64, 8) == 8  # the floor
    for rows in (200, 1000, 5000, 60000):
        batch = auto_train_batch(rows, 4096, 1)
        assert rows // batch >= 30 and rows // (2 * batch) < 30
