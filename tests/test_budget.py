"""Budget arithmetic: durations, estimates, the decision to start, the ledger across resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from data_tools.errors import InputError
from tuner.engine import budget
from tuner.report.text import format_seconds


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("20h", 72000),
        ("90m", 5400),
        ("45s", 45),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("2m30s", 150),
        (" 10M ", 600),
    ],
)
def test_parse_budget(text: str, seconds: float) -> None:
    assert budget.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "20", "h", "20x", "1h-5m", "0s", "abc"])
def test_bad_budget_is_one_line(text: str) -> None:
    with pytest.raises(InputError, match="write e.g. 20h, 90m, 45s or 1h30m|longer than zero"):
        budget.parse_budget(text)


def test_format_seconds() -> None:
    assert format_seconds(5025) == "1h23m45s"
    assert format_seconds(42.3) == "42s"
    assert format_seconds(61) == "1m01s"
    assert format_seconds(-5) == "0s"


def test_estimate_and_start_decision() -> None:
    assert budget.estimate_seconds([], 10) is None
    # 2 trials at 10 s/epoch and one at 20 s/epoch: median 10 s/epoch, +10% margin
    assert budget.estimate_seconds([(30, 3), (50, 5), (40, 2)], 4) == pytest.approx(44.0)
    assert budget.can_start(None, 1.0)  # no history: start, the deadline guard stops it
    assert not budget.can_start(None, 0.0)
    assert budget.can_start(44.0, 45.0) and not budget.can_start(44.0, 43.0)


def test_ledger_counts_time_across_resumes(tmp_path: Path) -> None:
    path = tmp_path / "budget.json"
    first = budget.Ledger.open(path, 100.0)
    first.started -= 30  # pretend this invocation ran 30 s
    first.save()
    assert json.loads(path.read_text())["spent_s"] == pytest.approx(30, abs=0.5)
    second = budget.Ledger.open(path, 100.0)
    assert second.remaining() == pytest.approx(70, abs=0.5)
    time.sleep(0.05)
    assert second.spent() > 30


def test_batch_scales_with_free_gpu_memory() -> None:
    from tuner.model.accelerate import resolve, scaled_batch

    assert scaled_batch(512, None) == 512  # CPU: the table's value
    assert scaled_batch(512, 8192) == 512
    assert scaled_batch(512, 24000) == 1024  # 24 GB card: x2.9, rounded down to a power of 2
    assert scaled_batch(32, 2048) == 8  # small card: never below the floor
    assert resolve("auto", gpu=True) and not resolve("auto", gpu=False)
    assert resolve("on", gpu=False) and not resolve("off", gpu=True)


SMI = "0, GPU-aaaa1111-2222, 1200\n1, GPU-bbbb3333-4444, 23000\n"


@pytest.mark.parametrize(
    "visible,free",
    [
        (None, 1200),  # unset: CUDA uses GPU 0
        ("1", 23000),  # a --gpus worker: its own GPU, not GPU 0
        ("1,0", 23000),  # the first visible one
        ("GPU-bbbb", 23000),  # by UUID prefix, as CUDA accepts
        ("", None),  # no GPU visible
        ("-1", None),
        ("7", None),  # no such GPU: unknown, so the table's batches
    ],
)
def test_free_memory_is_read_for_the_gpu_this_process_uses(visible, free) -> None:
    from tuner.model.accelerate import visible_free_mib

    assert visible_free_mib(SMI, visible) == free
    assert visible_free_mib("", visible) is None  # nvidia-smi printed nothing


def test_search_reads_gpu_memory_before_tensorflow_is_loaded(tmp_path) -> None:
    """A fake nvidia-smi on PATH looks at its caller's memory map: TensorFlow reserves most
    of the GPU when it starts, so the reading must come before TF is even loaded."""
    import os
    import subprocess
    import sys

    from tests.test_distribute import ROOT, clean_env

    record = tmp_path / "smi.txt"
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f"if grep -q libtensorflow /proc/$PPID/maps; then echo tf >> {record}; "
        f"else echo before >> {record}; fi\n"
        'echo "0, GPU-aaaa, 1200"\necho "1, GPU-bbbb, 23000"\n'
    )
    fake.chmod(0o755)
    env = {**clean_env(), "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    env["CUDA_VISIBLE_DEVICES"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "tuner.search", "--results", str(tmp_path), "--set", "epochs=-1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "epochs" in done.stderr  # stopped at the bad value
    assert record.read_text() == "before\n"
