"""What a model costs on this device: latency at batch 1 (the median and spread of timed runs),
throughput, file size, and the device's name."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf


def measure_latency(model: keras.Model, size: int, runs: int = 10) -> tuple[float, float, float]:
    """(median ms per image at batch 1, images/s at batch 32, interquartile range of the
    batch-1 runs in ms), after warm-up, on this device."""
    rng = np.random.default_rng(0)
    one = rng.uniform(0, 255, (1, size, size, 3)).astype("float32")
    many = rng.uniform(0, 255, (32, size, size, 3)).astype("float32")
    predict: Callable = model.predict_on_batch
    median_ms, spread_ms = timed_runs(lambda: predict(one), runs)
    predict(many)
    batch = []
    for _ in range(3):
        start = time.perf_counter()
        predict(many)
        batch.append(time.perf_counter() - start)
    return median_ms, 32 / statistics.median(batch), spread_ms


def timed_runs(call: Callable[[], Any], runs: int = 10) -> tuple[float, float]:
    """(median ms, interquartile range ms) of ``runs`` calls after 3 warm-up calls: the
    package's latency rule (Keras models here, LiteRT files in :mod:`tuner.report.quantize`)."""
    for _ in range(3):
        call()
    single = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        single.append(time.perf_counter() - start)
    quartiles = np.percentile(single, [25, 75]) * 1000
    return statistics.median(single) * 1000, float(quartiles[1] - quartiles[0])


def model_file_bytes(model: keras.Model, folder: Path) -> int:
    """The size in bytes of ``model`` saved as a .keras file (written in ``folder``, then
    deleted: the file a user exports is this size)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "measured.keras"
    try:
        model.save(path)
        return path.stat().st_size
    finally:
        path.unlink(missing_ok=True)


@functools.cache  # asked for every trial row; the device does not change under a process
def device_name() -> str:
    """The accelerator's name, or the CPU's with its core count."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return details.get("device_name", "GPU")
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"
