"""The tf.data pipeline, eagerly and inside tf.data, against PIL; and the decoded cache."""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from data_tools import pipeline
from data_tools.atomic import atomic_path
from tests.conftest import random_rgb, save_image

# (format, PIL mode, extension, max abs difference from PIL's own RGB conversion)
FORMATS = [
    ("PNG", "RGB", ".png", 0),
    ("PNG", "L", ".png", 0),  # grayscale
    ("PNG", "RGBA", ".png", 0),  # alpha is dropped, like PIL's convert("RGB")
    ("PNG", "P", ".png", 0),  # palette
    ("PNG", "LA", ".png", 0),
    ("JPEG", "RGB", ".jpg", 6),  # TF and PIL ship different libjpeg builds (upsampling)
    ("JPEG", "L", ".jpg", 6),
    ("JPEG", "CMYK", ".jpg", 6),  # CMYK -> RGB conversion rounding differs slightly
    ("GIF", "P", ".gif", 0),
    ("BMP", "RGB", ".bmp", 0),
    ("WEBP", "RGB", ".webp", 3),
]


def pil_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize(
    "fmt,mode,ext,tolerance", FORMATS, ids=[f"{f}-{m}" for f, m, *_ in FORMATS]
)
def test_every_format_decodes_to_pils_rgb(tmp_path: Path, fmt, mode, ext, tolerance) -> None:
    path = save_image(tmp_path / f"img{ext}", random_rgb(24, 24), fmt, mode)
    eager = pipeline.decode_image(tf.constant(str(path)), 24).numpy()  # same size: no resampling
    assert eager.dtype == np.uint8 and eager.shape == (24, 24, 3)
    difference = np.abs(eager.astype(int) - pil_rgb(path))
    assert difference.max() <= tolerance
    assert difference.mean() < 1.0  # a swapped channel or a wrong conversion is far above this


def test_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(random_rgb(16, 16, seed=s)).convert("P") for s in (1, 2, 3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = pipeline.decode_image(tf.constant(str(path)), 16).numpy()
    assert np.array_equal(decoded, np.asarray(frames[0].convert("RGB")))


def test_resize_is_close_to_pils_bilinear(tmp_path: Path) -> None:
    path = save_image(tmp_path / "big.png", random_rgb(120, 90), "PNG")
    ours = pipeline.decode_image(tf.constant(str(path)), 32).numpy().astype(float)
    theirs = np.asarray(Image.open(path).resize((32, 32), Image.BILINEAR)).astype(float)
    # Two antialiasing kernels: not identical, but the same picture.
    assert np.abs(ours - theirs).mean() < 2.0
    assert np.abs(ours - theirs).max() < 40


def make_table(tmp_path: Path, count: int = 23) -> pd.DataFrame:
    formats = [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")]
    rows = []
    for i in range(count):
        fmt, ext = formats[i % len(formats)]
        height, width = 20 + i, 40 - i  # every image a different shape
        path = save_image(tmp_path / "img" / f"{i:03d}{ext}", random_rgb(height, width, i), fmt)
        rows.append((f"{i:03d}", str(path), str(i % 3), i % 3))
    return pd.DataFrame(rows, columns=["objectId", "path", "value", "class_index"])


def test_dataset_equals_eager_decoding_in_order(tmp_path: Path) -> None:
    table = make_table(tmp_path)
    data = pipeline.make_dataset(table, size=16, batch_size=5)
    batches = list(data.as_numpy_iterator())
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert images.dtype == np.uint8 and images.shape == (23, 16, 16, 3)
    assert labels.dtype == np.int32 and labels.tolist() == table["class_index"].tolist()
    for i, path in enumerate(table["path"]):
        assert np.array_equal(images[i], pipeline.decode_image(tf.constant(path), 16).numpy())


def test_cache_gives_the_same_pixels_and_never_decodes_again(tmp_path: Path) -> None:
    table = make_table(tmp_path)
    cache = tmp_path / "cache"
    direct = np.concatenate([x for x, _ in pipeline.make_dataset(table, 16, 8).as_numpy_iterator()])
    cached = pipeline.make_dataset(table, 16, 8, cache_dir=cache, split="train")
    first = np.concatenate([x for x, _ in cached.as_numpy_iterator()])
    assert np.array_equal(first, direct)
    # While a dataset holds the decoded tensor, the next call gets that same tensor.
    in_memory = pipeline.decoded_pixels(table["path"].tolist(), 16, cache, "train")
    assert isinstance(in_memory, tf.Tensor) and np.array_equal(in_memory, direct)
    del cached, in_memory
    gc.collect()
    pipeline.finish_cache_writes()  # the file is written in the background
    files = list((cache / "decoded").glob("train-16px-*.npy"))
    assert len(files) == 1 and files[0].stat().st_size >= 23 * 16 * 16 * 3
    # Make every source file undecodable (same size and mtime, so the cache stays valid):
    # the second dataset must come from the cache alone.
    for path in table["path"]:
        stat = os.stat(path)
        Path(path).write_bytes(b"\0" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = pipeline.make_dataset(table, 16, 8, cache_dir=cache, split="train")
    assert np.array_equal(np.concatenate([x for x, _ in again.as_numpy_iterator()]), direct)
    loaded = pipeline.decoded_pixels(table["path"].tolist(), 16, cache, "train")
    assert isinstance(loaded, np.memmap)  # from the file, not from memory


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((3, 50, 50, 3), np.uint8),
        ((7, 1280), np.float16),
        ((0, 4, 4, 3), np.uint8),
        ((1,), np.uint8),
    ],
)
def test_cache_file_written_past_the_page_cache_is_what_np_save_writes(
    tmp_path: Path, shape, dtype
) -> None:
    array = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    np.save(tmp_path / "expected.npy", array)
    # A small chunk so the array spans several direct writes, the last one partial.
    pipeline.save_uncached(tmp_path / "ours.npy", array, chunk=8192)
    assert (tmp_path / "ours.npy").read_bytes() == (tmp_path / "expected.npy").read_bytes()


def test_cache_file_falls_back_to_np_save_where_direct_io_is_refused(
    tmp_path: Path, monkeypatch
) -> None:
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    array = np.arange(5000, dtype=np.uint8).reshape(5, 1000)
    pipeline.save_uncached(tmp_path / "x.npy", array)
    assert np.array_equal(np.load(tmp_path / "x.npy"), array)


def test_cache_file_on_a_full_disk_raises_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no direct I/O on this system")
    monkeypatch.setattr(os, "write", lambda fd, data: len(data) // 2)  # the disk filled up
    target = tmp_path / "decoded" / "x.npy"
    with pytest.raises(OSError) as raised, atomic_path(target) as tmp:
        pipeline.save_uncached(tmp, np.zeros((3, 4096), np.uint8))
    assert raised.value.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []


def test_corrupt_cache_file_is_rebuilt(tmp_path: Path) -> None:
    table = make_table(tmp_path, count=6)
    cache = tmp_path / "cache"
    pipeline.decoded_array(table["path"].tolist(), 16, cache, "train")
    pipeline.finish_cache_writes()
    (cache_file,) = (cache / "decoded").glob("*.npy")
    cache_file.write_bytes(cache_file.read_bytes()[:200])  # truncated by a crash
    rebuilt = pipeline.decoded_array(table["path"].tolist(), 16, cache, "train")
    assert rebuilt.shape == (6, 16, 16, 3)
    assert np.array_equal(rebuilt[2], pipeline.decode_image(tf.constant(table.path[2]), 16))


def test_changed_files_get_a_new_cache(tmp_path: Path) -> None:
    table = make_table(tmp_path, count=4)
    first = pipeline.cache_file(tmp_path, "train", 16, table["path"].tolist())
    save_image(Path(table.path[0]), random_rgb(50, 50, 99), "PNG")
    assert pipeline.cache_file(tmp_path, "train", 16, table["path"].tolist()) != first
    assert pipeline.cache_file(tmp_path, "train", 32, table["path"].tolist()) != first


@pytest.mark.parametrize("cached", [False, True])
def test_shuffled_epochs_cover_every_row_once_in_a_new_order(tmp_path: Path, cached: bool) -> None:
    table = make_table(tmp_path)
    data = pipeline.make_dataset(
        table, 8, 4, shuffle=True, seed=1, cache_dir=tmp_path / "c" if cached else None
    )
    epochs = []
    for _ in range(2):
        pairs = [
            (img.tobytes(), int(y))
            for x, ys in data.as_numpy_iterator()
            for img, y in zip(x, ys, strict=True)
        ]
        epochs.append(pairs)
    expected = sorted(
        (pipeline.decode_image(tf.constant(p), 8).numpy().tobytes(), int(y))
        for p, y in zip(table.path, table.class_index, strict=True)
    )
    assert sorted(epochs[0]) == expected and sorted(epochs[1]) == expected
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_unreadable_files_are_found_by_the_training_decoder(tmp_path: Path) -> None:
    table = make_table(tmp_path, count=5)
    Path(table.path[1]).write_bytes(b"GIF89a but not really")
    Path(table.path[3]).write_bytes(Path(table.path[3]).read_bytes()[:30])
    assert pipeline.find_unreadable(table["path"].tolist()) == [1, 3]
