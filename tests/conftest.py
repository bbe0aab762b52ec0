"""Shared fixtures: seeded randomness, small image files in every format, the demo data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch) -> None:
    """W&B off unless a test asks for it (``--wandb-mode``, or test_wandb's own fixture):
    an offline run per trial costs seconds and most tests read none."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


def random_rgb(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    """A smooth-ish random RGB image (JPEG-friendly, so lossy formats stay close)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def save_image(path: Path, pixels: np.ndarray, fmt: str, mode: str = "RGB") -> Path:
    """Write ``pixels`` as ``fmt`` in PIL ``mode`` (RGB, L, RGBA, P, CMYK, LA)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(128)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo digits, written once per test session."""
    from data_tools.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo") / "digits").parent


def search_argv(tmp_path: Path, demo_dir: Path, name: str, *extra: str) -> list[str]:
    """``python -m tuner.search`` arguments: the demo digits, the tiny T0 backbone."""
    return [
        "--results",
        str(tmp_path / "results"),
        "--cache",
        str(demo_dir.parent),
        "--name",
        name,
        "--set",
        "backbones=[T0]",
        *extra,
    ]


def frozen(weights: Path) -> list[str]:
    """``tuner.search`` arguments for frozen heads on cached features of the T0 in ``weights``
    (the ``pretrained_t0`` folder): seconds a trial, for tests of what happens around a trial
    (failures, retries, records, W&B), not of how the whole network trains."""
    return ["--weights", str(weights), "--set", "finetune_fraction=0.0"]


def run_search(tmp_path: Path, demo_dir: Path, name: str, *extra: str) -> int:
    """``python -m tuner.search`` in-process (see :func:`search_argv`)."""
    from data_tools.errors import run_cli
    from tuner import search

    return run_cli(search.main, search_argv(tmp_path, demo_dir, name, *extra))


@pytest.fixture(scope="session")
def pretrained_t0(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """A weights folder whose T0 backbone was trained (2 epochs, whole network, on the demo
    digits): frozen random features carry no information, these do, like ImageNet's.

    Trained once per test run: the test processes (pytest-xdist) share one folder beside
    their own temporary folders, the first to arrive training it under a file lock."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: its own folder
        shared = tmp_path_factory.getbasetemp()
    folder = shared / "pretrained_t0"
    with FileLock(str(shared / "pretrained_t0.lock")):
        if not (folder / "T0.weights.h5").is_file():
            _train_t0(folder, demo_dir)
    return folder


def _train_t0(folder: Path, demo_dir: Path) -> None:
    import keras_tuner as kt

    from data_tools import ingest, split
    from tuner.model import hypermodel, space

    folder.mkdir(parents=True, exist_ok=True)
    labels = ingest.read_label_csv(demo_dir / "label.csv")
    frame = split.split_frame(labels)
    frame = frame[frame.type != "test"].reset_index(drop=True)
    classes = ingest.class_names(frame.value)
    table = ingest.normalise(frame, ingest.resolve_paths(frame, demo_dir / "images"), classes)
    data = hypermodel.SplitData(table, classes, cache_dir=str(folder / "cache"))
    search_space = space.load(
        None,
        {"backbones": ["T0"], "head_width": 0, "dropout": 0.0, "learning_rate": 0.005, "epochs": 2},
    )
    maker = hypermodel.EffNetHyperModel(search_space, data, None)
    hp = kt.HyperParameters()
    model = maker.build(hp)
    maker.fit(hp, model, epochs=2)
    written = folder / "T0.partial.weights.h5"  # whole or absent, for the other process
    model.get_layer("backbone").save_weights(written)
    written.rename(folder / "T0.weights.h5")


def rebuilt_val_accuracy(folder: Path, trial_id: str) -> tuple[float, str]:
    """(validation accuracy, how it was obtained) of a trial's model as export assembles it
    from the results folder (its best-epoch checkpoint onto a freshly built model), on the
    validation pixels: what the shipped model scores."""
    from tuner.report import rebuild

    config, table = rebuild.load_search(folder)
    row = table[table.trial_id.astype(str) == str(trial_id)].iloc[0]
    model, source = rebuild.trial_model(folder, row, config)
    maker, _ = rebuild.trial_hypermodel(folder, row, config)
    pixels, _ = maker.data.pixels("validation", int(row["image_size"]))
    probs = model.predict(np.asarray(pixels, dtype="float32"), verbose=0)
    return float((probs.argmax(axis=1) == maker.data.labels("validation")).mean()), source
