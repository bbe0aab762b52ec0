"""GPU settings: mixed precision, XLA, and default batch sizes scaled to the free memory.

All three follow ``auto`` (on when a GPU is present), ``on`` or ``off``. The backbone table's
default batch sizes are for an 8 GB card; on another card they are scaled by its free memory
(rounded down to a power of two, at least 8), and out-of-memory retries still halve them.
"""

from __future__ import annotations

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


def gpu_free_mib() -> float | None:
    """Free memory of the first GPU from nvidia-smi, or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        return float(out.split()[0])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def apply(mixed_precision: str, xla: str) -> dict[str, object]:
    """Set the global Keras policy; returns the facts for the config (and for compile)."""
    import keras

    gpu = gpu_present()
    facts = {
        "gpu": gpu,
        "mixed_precision": resolve(mixed_precision, gpu),
        "xla": resolve(xla, gpu),
        "gpu_free_mib": gpu_free_mib() if gpu else None,
    }
    keras.mixed_precision.set_global_policy(
        "mixed_float16" if facts["mixed_precision"] else "float32"
    )
    return facts
