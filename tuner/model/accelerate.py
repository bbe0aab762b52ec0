"""GPU settings: mixed precision, XLA, and default batch sizes scaled to the free memory.

All three follow ``auto`` (on when a GPU is present), ``on`` or ``off``. The backbone table's
default batch sizes are for an 8 GB card; on another card they are scaled by its free memory
(rounded down to a power of two, at least 8), and out-of-memory retries still halve them.
"""

from __future__ import annotations

import os
import shutil
import subprocess

REFERENCE_MIB = 8 * 1024  # the backbone table's batch sizes are for an 8 GB card
CHOICES = ("auto", "on", "off")


def gpu_present() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve(choice: str, gpu: bool) -> bool:
    """``auto`` -> whether there is a GPU; ``on``/``off`` as said."""
    return gpu if choice == "auto" else choice == "on"


def scaled_batch(table_batch: int, free_mib: float | None, floor: int = 8) -> int:
    """The table's batch for an 8 GB card scaled to ``free_mib`` of GPU memory (power of two,
    at least ``floor``); unchanged when the free memory is unknown (CPU)."""
    if not free_mib:
        return table_batch
    scaled = table_batch * free_mib / REFERENCE_MIB
    power = 1 << max(0, int(scaled).bit_length() - 1)
    return max(floor, power)


def visible_free_mib(smi_csv: str, visible: str | None) -> float | None:
    """Free MiB of the GPU this process will use, from ``nvidia-smi
    --query-gpu=index,uuid,memory.free --format=csv,noheader,nounits`` output.

    nvidia-smi lists every GPU whatever ``CUDA_VISIBLE_DEVICES`` says, while CUDA (and so
    TensorFlow) numbers only the visible ones and uses the first: ``visible`` (that
    variable's value, None when unset) picks the row, by index or by (a prefix of) its UUID
    as CUDA accepts. None where no GPU is visible or the reading cannot be matched."""
    rows = []
    for line in smi_csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                rows.append((parts[0], parts[1], float(parts[2])))
            except ValueError:
                continue
    if not rows:
        return None
    if visible is None:
        return rows[0][2]
    first = visible.split(",")[0].strip()
    if not first or first.startswith("-"):
        return None  # "" or "-1": CUDA sees no GPU
    for index, uuid, free in rows:
        if first == index or (first.startswith("GPU-") and uuid.startswith(first)):
            return free
    return None


def gpu_free_mib() -> float | None:
    """Free memory of the GPU this process will use (:func:`visible_free_mib`), from
    nvidia-smi, or None where there is none. Read it before TensorFlow starts: TF reserves
    most of the memory when it first touches the GPU, after which little looks free."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,uuid,memory.free",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return visible_free_mib(out, os.environ.get("CUDA_VISIBLE_DEVICES"))


def apply(mixed_precision: str, xla: str, free_mib: float | None) -> dict[str, object]:
    """Set the global Keras policy; returns the facts for the config (and for compile).
    ``free_mib`` is :func:`gpu_free_mib` as read before TensorFlow started."""
    import keras

    gpu = gpu_present()
    facts = {
        "gpu": gpu,
        "mixed_precision": resolve(mixed_precision, gpu),
        "xla": resolve(xla, gpu),
        "gpu_free_mib": free_mib if gpu else None,
    }
    keras.mixed_precision.set_global_policy(
        "mixed_float16" if facts["mixed_precision"] else "float32"
    )
    return facts
