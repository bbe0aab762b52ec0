"""tf.data pipelines: decode, convert to RGB, resize, batch, prefetch; decode once per size.

Images leave the pipeline as ``uint8`` RGB, ``[batch, size, size, 3]``, with ``int32`` class
indices. Scaling to what a backbone expects (0..255 for keras.applications EfficientNet,
0..1 for TF-Hub feature vectors) happens inside the model, so a saved model takes the same
raw pixels the pipeline gives it.

Decoding is TensorFlow's ``decode_image``: JPEG (CMYK included), PNG (grayscale, palette,
16-bit, alpha), GIF (first frame), BMP and WebP, always three channels; alpha is dropped.
Resizing squashes to a square with antialiased bilinear interpolation, as
``keras.utils.image_dataset_from_directory`` does by default; EXIF orientation is not
applied (neither does Keras).

With ``cache_dir`` the decoded-and-resized pixels of a split are decoded once per (split,
size, file list) and kept: in memory for this process (one TensorFlow tensor that epochs
gather batches from inside the graph), and in a ``.npy`` file (written in the background)
that every later trial and run reads memory-mapped instead of decoding again. A file that
fails its check on load is rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import mmap
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from filelock import FileLock

from data_tools import header, ingest, progress
from data_tools.atomic import atomic_path

AUTOTUNE = tf.data.AUTOTUNE
# Decoded sets up to this size are decoded in memory and written to the cache in the background.
IN_MEMORY_BYTES = 2 * 1024**3
_PENDING: dict[Path, threading.Thread] = {}  # cache files being written
_PENDING_LOCK = threading.Lock()
# Sets this process decoded, for as long as something (a dataset, a writer) still uses them.
_DECODED: weakref.WeakValueDictionary[Path, tf.Tensor] = weakref.WeakValueDictionary()
# path -> (size, mtime_ns) the search started from (files.csv): see expect_files().
_EXPECTED: dict[str, tuple[int, int]] = {}


def decode_image(path: tf.Tensor, size: int) -> tf.Tensor:
    """Read one image file and return ``uint8 [size, size, 3]`` RGB. Works eagerly and in graphs."""
    return resize_pixels(read_rgb(path), size)


def decode_sizes(path: tf.Tensor, sizes: Sequence[int]) -> tuple[tf.Tensor, ...]:
    """Read and decode one image file once; return it at every size of ``sizes`` (each
    exactly :func:`decode_image` at that size: the same resize of the same pixels)."""
    image = read_rgb(path)
    return tuple(resize_pixels(image, size) for size in sizes)


_DECODES: list[tf.Variable] = []  # made on first use, outside any graph


def decodes() -> int:
    """How many image files this process has decoded (every decode goes through
    :func:`read_rgb`; what ``tuner.bench_scale`` reports as decodes an image)."""
    return int(_DECODES[0].numpy()) if _DECODES else 0


def _decode_counter() -> tf.Variable:
    if not _DECODES:
        with tf.init_scope():
            _DECODES.append(tf.Variable(0, dtype=tf.int64, trainable=False, name="decodes"))
    return _DECODES[0]


def read_rgb(path: tf.Tensor) -> tf.Tensor:
    """The package's one decoder: a file's pixels as ``uint8 [H, W, 3]`` RGB. A file that
    declares more than ``header.MAX_PIXELS`` pixels fails before it is decoded, with the
    decoder's own error (``InvalidArgumentError``): :mod:`data_tools.header`."""
    counted = _decode_counter().assign_add(1)
    with tf.control_dependencies([counted]):
        data = tf.io.read_file(path)
    with tf.control_dependencies([header.check(data)]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def stream_sizes(
    paths: Sequence[str], sizes: Sequence[int], batch: int
) -> Iterator[dict[int, np.ndarray]]:
    """The images of ``paths`` in order, ``batch`` at a time, as ``{size: uint8 [n, size,
    size, 3]}``: each file read and decoded once for all ``sizes`` (decoding in parallel,
    two batches ahead; memory holds those batches, whatever the number of files)."""
    sizes = list(sizes)
    files = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    decoded = files.map(
        lambda p: decode_sizes(p, sizes), num_parallel_calls=AUTOTUNE, deterministic=True
    )
    for images in decoded.batch(batch).prefetch(2).as_numpy_iterator():
        yield dict(zip(sizes, images, strict=True))


def resize_pixels(images: tf.Tensor, size: int) -> tf.Tensor:
    """``uint8`` RGB of any size (one image or a batch) -> ``uint8 [..., size, size, 3]``.

    The one resize of the package: training, evaluation and the exported serving signature
    all use it, so a served model sees exactly the pixels it was trained on. Bilinear; when
    shrinking by more than 2x it is antialiased (plain bilinear would skip source pixels and
    alias), otherwise not: bilinear's 2x2 footprint already covers every source pixel, and
    the antialiased kernel costs 4x the time (2.3k against 9.8k images/s at 160 -> 128 px).
    """
    shape = tf.shape(images)
    height, width = shape[-3], shape[-2]
    shrink = tf.cast(tf.maximum(height, width), tf.float32) / float(size)

    def resize(antialias: bool) -> tf.Tensor:
        out = tf.image.resize(images, [size, size], method="bilinear", antialias=antialias)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    return tf.cond(shrink > 2.0, lambda: resize(True), lambda: resize(False))


def find_unreadable(paths: Sequence[str]) -> list[int]:
    """Positions of the files in ``paths`` that TensorFlow cannot read or decode.

    Uses the same decoder as training, in parallel, so a file passes here exactly when the
    pipeline can use it.
    """

    def probe(i: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
        return tf.reduce_min(tf.shape(read_rgb(path))) * 0 + tf.cast(i, tf.int32)

    ok = _indexed_paths(paths).map(probe, num_parallel_calls=AUTOTUNE)
    ok = ok.ignore_errors()
    readable = set()
    with progress.bar("checking images", len(paths)) as advance:
        for i in ok.batch(256).as_numpy_iterator():
            readable.update(int(j) for j in i)
            advance(len(i))  # the unreadable ones count at the end
    return [i for i in range(len(paths)) if i not in readable]


def _indexed_paths(paths: Sequence[str]) -> tf.data.Dataset:
    """``(row index, path)`` pairs."""
    files = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    return tf.data.Dataset.zip(tf.data.Dataset.range(len(paths)), files)


def paths_dataset(paths: Sequence[str], labels: Sequence[int], size: int) -> tf.data.Dataset:
    """Unbatched ``(image, label)`` pairs decoded from the files, in order, in parallel."""
    files = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(paths), dtype=tf.string), tf.constant(list(labels), dtype=tf.int32))
    )
    return files.map(
        lambda p, y: (decode_image(p, size), y), num_parallel_calls=AUTOTUNE, deterministic=True
    )


def expect_files(stamps: pd.DataFrame | None) -> None:
    """Hold this process's reads to ``stamps`` (``path, size, mtime_ns``: the files a search
    started from, its files.csv; None: no expectation). From then on every pixel-cache
    lookup (:func:`cache_file`, which stats each file anyway) raises
    :class:`~data_tools.errors.FilesChanged` naming the files whose size or modification
    time differ, or that are gone, instead of decoding changed files into a new cache."""
    _EXPECTED.clear()
    if stamps is not None:
        pairs = zip(stamps["size"].astype(int), stamps["mtime_ns"].astype(int), strict=True)
        _EXPECTED.update(zip(stamps["path"].astype(str), pairs, strict=True))


def check_expected() -> None:
    """Raise :class:`~data_tools.errors.FilesChanged` when any expected file differs from
    what :func:`expect_files` recorded."""
    _raise_changed([path for path in _EXPECTED if _differs(path, ingest.stamp(path))])


def _differs(path: str, stamp: tuple[int, int]) -> bool:
    """Whether ``stamp`` is not what :func:`expect_files` recorded for ``path`` (a path it
    did not record never differs)."""
    expected = _EXPECTED.get(str(path))
    return expected is not None and stamp != expected


def _raise_changed(changed: Sequence[str]) -> None:
    if not changed:
        return
    from data_tools.errors import FilesChanged, preview

    described = [
        f"{path} ({'missing' if ingest.stamp(path)[0] < 0 else 'changed'})" for path in changed
    ]
    raise FilesChanged(
        f"{len(changed)} image(s) changed or went missing while the search ran "
        f"({preview(described, 3)}): restore them and run the same command to resume (the "
        f"trial that met them runs again), or start again with --overwrite or a new --name"
    )


def cache_file(
    cache_dir: str | os.PathLike[str], split: str, size: int, paths: Sequence[str]
) -> Path:
    """Where the decoded pixels of these files at this size live.

    The name carries a fingerprint of the file list and each file's size and modification
    time, so a changed data set gets a new cache instead of stale pixels; within a search
    (:func:`expect_files`) a changed or missing file is an error instead.
    """
    digest = hashlib.sha1(str(size).encode())
    changed = []
    for path in paths:
        stamp = ingest.stamp(path)
        if _differs(path, stamp):
            changed.append(str(path))
        elif stamp[0] < 0:
            os.stat(path)  # the file's own FileNotFoundError, as before
        digest.update(f"{path}\0{stamp[0]}\0{stamp[1]}\n".encode())
    _raise_changed(changed)
    return Path(cache_dir) / "decoded" / f"{split}-{size}px-{digest.hexdigest()[:16]}.npy"


def decoded_array(
    paths: Sequence[str], size: int, cache_dir: str | os.PathLike[str], split: str = "data"
) -> np.ndarray:
    """All images of ``paths`` decoded and resized (read-only ``uint8 [N, size, size, 3]``),
    from the on-disk cache when it holds them; see :func:`decoded_pixels`."""
    return np.asarray(decoded_pixels(paths, size, cache_dir, split))


def decoded_pixels(
    paths: Sequence[str], size: int, cache_dir: str | os.PathLike[str], split: str = "data"
) -> tf.Tensor | np.ndarray:
    """All images of ``paths`` decoded and resized: a tensor in memory when this process
    decoded them, else the cache file memory-mapped.

    On first use the images are decoded once. Up to ``IN_MEMORY_BYTES`` they are decoded
    into one tensor, returned at once while a background thread writes the cache file
    (temporary file, then rename), so training starts without waiting for the disk; later
    calls get the same tensor while anything still holds it. Larger sets are decoded
    straight into a memory-mapped file. A cache file of the wrong shape or type, or one
    that cannot be read, is rebuilt.
    """
    target = cache_file(cache_dir, split, size, paths)
    expected = (len(paths), size, size, 3)
    in_memory = _DECODED.get(target)
    if in_memory is not None:
        return in_memory
    # Processes sharing the folder (workers of a distributed search) build it once: the
    # first takes the lock, the others wait for it and read the file.
    with cache_lock(target) as lock:
        cached = load_checked(target, expected, np.uint8)
        if cached is not None:
            return cached
        if math.prod(expected) <= IN_MEMORY_BYTES:
            pixels = _decode_tensor(paths, size)
            _DECODED[target] = pixels
            _write_in_background(target, pixels, lock)
            return pixels
        with atomic_path(target, "cache") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=expected)
            _decode_into(out, paths, size)
            out.flush()
            del out
    return np.load(target, mmap_mode="r")


def cache_lock(target: Path) -> FileLock:
    """The inter-process lock for building ``target`` (releasable from another thread)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target) + ".lock", thread_local=False)


def load_checked(target: Path, shape: tuple[int, ...] | None, dtype) -> np.ndarray | None:
    """``target`` memory-mapped when it holds an array of ``dtype`` (and ``shape``, when
    given); None when it is missing, truncated or corrupt (the caller rebuilds it)."""
    if not target.exists():
        return None
    try:
        cached = np.load(target, mmap_mode="r")
    except (ValueError, OSError, EOFError):
        return None
    if cached.dtype != dtype or (shape is not None and cached.shape != shape):
        return None
    return cached


def _decode_tensor(paths: Sequence[str], size: int) -> tf.Tensor:
    """The images of ``paths``, in order, as one ``uint8 [N, size, size, 3]`` tensor.

    Decoded in parallel into memory TensorFlow allocates: a numpy array of the same size
    would be copied again to become a tensor, and fresh numpy pages were slow to fault in
    on this project's VM (0.3 s for 150 MB while the decoders ran).
    """
    if not paths:
        return tf.zeros([0, size, size, 3], tf.uint8)
    files = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    images = files.map(lambda p: decode_image(p, size), num_parallel_calls=AUTOTUNE)
    return images.batch(len(paths)).get_single_element()


def _decode_into(out: np.ndarray, paths: Sequence[str], size: int) -> None:
    # Order-free decoding (a third faster); each image carries its row index.
    decoded = _indexed_paths(paths).map(
        lambda i, p: (i, decode_image(p, size)),
        num_parallel_calls=AUTOTUNE,
        deterministic=False,
    )
    with progress.bar(f"decoding {size}px", len(paths)) as advance:
        for index, images in decoded.batch(256).prefetch(2).as_numpy_iterator():
            out[index] = images
            advance(len(index))


def _write_in_background(target: Path, pixels: tf.Tensor, lock: FileLock) -> None:
    """Write ``pixels`` to ``target`` (atomically) in a thread; until it is on disk, the
    tensor is served from memory. The thread holds ``lock`` (the caller's, taken once more:
    it counts) until the file is written. Python waits for the thread before exiting; a
    failed write (full disk) leaves no file and is reported once: the next run decodes
    again."""
    lock.acquire()

    def write() -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: this thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # training first
        try:
            with atomic_path(target, "cache") as tmp:
                save_uncached(tmp, np.asarray(pixels))  # a view of the tensor: no copy
        except OSError as error:
            print(f"warning: could not write the decoded-image cache {target}: {error}")
        finally:
            with _PENDING_LOCK:
                _PENDING.pop(target, None)
            lock.release()

    thread = threading.Thread(target=write, name=f"cache-writer-{target.name}")
    with _PENDING_LOCK:
        _PENDING[target] = thread
    thread.start()


def save_uncached(path: Path, array: np.ndarray, chunk: int = 8 * 1024**2) -> None:
    """``np.save(path, array)`` to a new file, bypassing the page cache where the file system
    allows it (``O_DIRECT``, Linux).

    The process holds the array already; a second copy in the page cache means a fresh page
    for every 4 KiB while training runs (the benchmark's decoding, 10 epochs of 3,000 images,
    was ~15% slower with it). Where ``O_DIRECT`` is refused (tmpfs, other systems) it is a
    plain ``np.save``. Other errors (a full disk) are raised.
    """
    try:
        if _save_direct(path, array, chunk):
            return
    except OSError as error:
        if error.errno != errno.EINVAL:  # EINVAL: direct I/O refused here
            raise
    path.unlink(missing_ok=True)
    with open(path, "xb") as handle:
        np.save(handle, array)


def _save_direct(path: Path, array: np.ndarray, chunk: int) -> bool:
    """Write ``array`` as a ``.npy`` file with ``O_DIRECT``; False where it has no such flag."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    head = np.frombuffer(header.getvalue(), np.uint8)
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | direct, 0o644)
    # Direct writes take whole blocks from block-aligned memory: stage through an aligned
    # buffer (anonymous mmap: page-aligned), then cut the file to its length.
    with mmap.mmap(-1, chunk) as buffer:
        stage = np.frombuffer(buffer, np.uint8)
        try:
            stage[: len(head)] = head
            filled, start = len(head), 0
            while start < len(data) or filled:
                step = min(chunk - filled, len(data) - start)
                stage[filled : filled + step] = data[start : start + step]
                start += step
                padded = -(-(filled + step) // 4096) * 4096
                if os.write(fd, memoryview(buffer)[:padded]) < padded:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                filled = 0
            os.ftruncate(fd, len(head) + len(data))
        finally:
            del stage  # a numpy view would keep the buffer from closing
            os.close(fd)
    return True


def finish_cache_writes() -> None:
    """Wait until every decoded-image cache file being written in the background is on disk."""
    with _PENDING_LOCK:
        threads = list(_PENDING.values())
    for thread in threads:
        thread.join()


def make_dataset(
    table: pd.DataFrame,
    size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    split: str = "data",
) -> tf.data.Dataset:
    """A batched, prefetched ``(uint8 images, int32 labels)`` dataset over ``table``'s rows.

    ``table`` needs ``path`` and ``class_index`` columns (see :mod:`data_tools.ingest`).
    Without ``shuffle`` the rows come in table order. With ``cache_dir`` the images are
    decoded once and read back from the cache on every later call.
    """
    paths = table["path"].tolist()
    labels = table["class_index"].to_numpy(dtype=np.int32)
    if cache_dir is None:
        data = paths_dataset(paths, labels, size)
        if shuffle:
            data = data.shuffle(min(len(paths), 10_000), seed=seed, reshuffle_each_iteration=True)
        return data.batch(batch_size).prefetch(AUTOTUNE)
    pixels = decoded_pixels(paths, size, cache_dir, split)
    return array_dataset(pixels, labels, batch_size, shuffle=shuffle, seed=seed)


def array_dataset(
    values: np.ndarray | tf.Tensor | list[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    views: bool = False,
) -> tf.data.Dataset:
    """Batches gathered from an array by shuffled index, as float32 (or the array's uint8 for
    pixels), with int32 labels: nothing is decoded.

    A tensor is gathered from inside the graph (an epoch of 3,000 pixel sets at 128 px:
    0.02 s); a numpy array (in memory or memory-mapped) through ``numpy_function``, so a
    memory-mapped array is never held in memory whole (0.035 s, page cache warm).

    ``views``: ``values`` holds several views of the same rows (a tensor ``[views, rows,
    ...]`` or a list of arrays); each row comes from one view drawn at random, again every
    epoch (an augmented feature cache: :mod:`tuner.model.augment`).
    """
    count = len(labels)
    order = tf.data.Dataset.range(count)
    if shuffle:
        # The whole index list fits in the buffer, so this is a full shuffle every epoch.
        order = order.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    if views:
        view_count = len(values) if isinstance(values, list | tuple) else int(values.shape[0])
        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        order = tf.data.Dataset.zip(order, draws).map(
            lambda index, draw: tf.stack([draw % view_count, index])
        )
    labels = np.asarray(labels, dtype=np.int32)
    if isinstance(values, tf.Tensor):
        label_tensor = tf.constant(labels)

        def load(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            rows = index[:, 1] if views else index
            batch = tf.gather_nd(values, index) if views else tf.gather(values, index)
            if batch.dtype != tf.uint8:
                batch = tf.cast(batch, tf.float32)
            return batch, tf.gather(label_tensor, rows)

    else:
        arrays = list(values) if views else [values]
        out_type = tf.uint8 if arrays[0].dtype == np.uint8 else tf.float32
        shape = arrays[0].shape[1:]

        def gather(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if not views:
                index = np.sort(index)  # sorted reads from a memory map
                return np.asarray(arrays[0][index], dtype=out_type.as_numpy_dtype), labels[index]
            index = index[np.lexsort((index[:, 1], index[:, 0]))]  # sorted reads, view by view
            out = np.empty((len(index), *shape), dtype=out_type.as_numpy_dtype)
            for view in np.unique(index[:, 0]):
                chosen = index[:, 0] == view
                out[chosen] = arrays[int(view)][index[chosen, 1]]
            return out, labels[index[:, 1]]

        def load(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            batch, ys = tf.numpy_function(gather, [index], (out_type, tf.int32), stateful=False)
            batch.set_shape([None, *shape])
            ys.set_shape([None])
            return batch, ys

    # A shuffled epoch has no order to keep: let batches arrive as they are ready.
    batches = order.batch(batch_size).map(
        load, num_parallel_calls=AUTOTUNE, deterministic=not shuffle
    )
    return batches.prefetch(AUTOTUNE)
