"""Read offline W&B run files back (wandb has no reader for its own ``.wandb`` format).

The format: a 7-byte header (``:W&B``, 2 magic bytes, 1 version byte), then LevelDB-style
32 KiB blocks of records. Each record is a 7-byte header (CRC32, length, type: 1 full,
2 first, 3 middle, 4 last piece) and a piece of a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def raw_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a header: padding
            position += BLOCK - position % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        piece = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == 0 and length == 0:
            break
        if kind == 1:
            yield piece
        elif kind == 2:
            pending = piece
        elif kind == 3:
            pending += piece
        elif kind == 4:
            yield pending + piece
            pending = b""


def _items(updates) -> dict[str, Any]:
    out = {}
    for item in updates:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


@dataclass
class Run:
    run_id: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)


def read_run(path: Path) -> Run:
    run = Run()
    for payload in raw_records(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.group, run.job_type = r.run_id, r.run_group, r.job_type
            run.name, run.tags = r.display_name, list(r.tags)
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
    return run


def read_runs(wandb_dir: Path, wait_s: float = 60.0) -> list[Run]:
    """Every offline run file under ``wandb_dir``, in the order they were written.

    wandb-core writes a run's file from its own process: on a loaded machine a file read
    just after ``finish()`` was seen empty (no run record) or cut inside a record (protobuf's
    "Wire format was corrupt"). Until every run has its exit record (written last, at
    ``finish()``) the read is tried again, for up to ``wait_s`` seconds."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            paths = sorted(wandb_dir.glob("offline-run-*/run-*.wandb"))
            runs = [read_run(path) for path in paths]
            if all(run.exit_code is not None for run in runs) or time.monotonic() > deadline:
                return runs
        except DecodeError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)
