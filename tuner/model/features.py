"""Backbone features computed once and reused: a frozen trial costs one backbone pass.

A frozen backbone (pretrained weights, no fine-tuning) maps each image to the same features in
every epoch of every trial. They are computed once per (backbone, image size, the values of
the weights that compute them, split, cut, augmented view) from the decoded-pixel cache and
stored as float32 under
``results/<name>/cache/features/`` (written to a temporary file, then renamed; checked on
load, rebuilt when the check fails). The head then trains on them; because the head is the
same layer object inside the full model, the full model is trained too.

Augmentation keeps the cache: view 0 of a train image is the image itself (the plain entry),
views 1..K-1 are seeded transforms of it (:mod:`tuner.model.augment`), each cached once per policy,
seed and index, and the head sees one view per image and epoch, drawn at random.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from data_tools import pipeline, progress
from data_tools.atomic import atomic_path
from tuner.model import backbones

BATCH = 64


def extractor(
    model: keras.Model, part: keras.Model | None = None, branch: str = "backbone"
) -> keras.Model:
    """``pixels -> [input_scale] -> backbone`` (or ``part`` of it, from the backbone's input)
    of a model built by the hypermodel, sharing its layers (so its weights), in inference
    mode. ``branch``: a paired head's ``partner`` (after ``partner_input_scale``) instead."""
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    x = inputs
    scale = "input_scale" if branch == "backbone" else f"{branch}_input_scale"
    if any(layer.name == scale for layer in model.layers):
        x = model.get_layer(scale)(x)
    net = part or model.get_layer(branch)
    return keras.Model(inputs, net(x, training=False), name="feature_extractor")


def split_backbone(model: keras.Model, top_blocks: int) -> tuple[keras.Model, keras.Model, str]:
    """(bottom, top, cut layer name): the backbone cut after its last frozen block.

    EfficientNet's blocks connect only through their outputs (residuals stay inside a
    block), so ``top(bottom(x)) == backbone(x)``; both share the backbone's layers.
    """
    base = model.get_layer("backbone")
    cut = cut_layer(base, top_blocks)
    bottom = keras.Model(base.input, cut.output, name="frozen_bottom")
    top = keras.Model(cut.output, base.output, name="trainable_top")
    return bottom, top, cut.name


# Part of every cache key: raise it when what a cached entry holds changes meaning (2: frozen
# backbones run without stochastic depth, official notop files from a folder normalised as
# ImageNet's, keys from the weights' values; 3: float32 entries).
FORMAT_VERSION = 3
# What cached outputs are stored as. float32, not float16: a head trained and scored on
# float16-rounded features recorded a validation accuracy its shipped float32 model missed by
# an image in 2 of 6 trials on the real B0 set; float32 costs 2.5 KB an image for B0's
# features, against the pixel caches it replaced (150 KB).
DTYPE = np.float32


def weights_fingerprint(net: keras.Model) -> str:
    """SHA-1 of the values of every variable of ``net``, in order (B0: 16 MB, ~0.02 s).

    The values, not the weights' name or file: a fine-tuned backbone, another weights
    folder or a fixed loader all compute other features and must get other entries."""
    return values_fingerprint(("", variable) for variable in net.weights)


def values_fingerprint(labelled: Iterable[tuple[str, Any]]) -> str:
    """SHA-1 of variables' values, in order, each headed by its label, dtype and shape: the
    one fingerprint of weights (a cache entry's, :func:`weights_fingerprint`; the frozen
    weights beneath a checkpoint, :func:`tuner.model.checkpoint.beneath`)."""
    digest = hashlib.sha1()
    for label, variable in labelled:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{label}{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def cache_file(
    cache_dir: str | os.PathLike[str],
    backbone: str,
    size: int,
    weights_key: str,
    split: str,
    source: str,
    cut: str = "pooled",
    view: str = "",
) -> Path:
    """``weights_key`` is the :func:`weights_fingerprint` of what computes the entry;
    ``source`` names the pixels (the decoded cache's file name, which fingerprints the image
    files), so new images never meet old features; ``cut`` names the layer whose output is
    cached (``pooled``: the backbone's features); ``view`` names an augmented view (policy,
    seed, index: :func:`view_name`); the un-augmented images have none."""
    text = f"v{FORMAT_VERSION}|{backbone}|{size}|{weights_key}|{source}|{cut}"
    if view:
        text += f"|{view}"
    key = hashlib.sha1(text.encode())
    safe = backbone.replace(":", "_").replace("/", "_")[-40:]
    return Path(cache_dir) / "features" / f"{split}-{safe}-{size}px-{key.hexdigest()[:16]}.npy"


def view_name(policy: str, seed: int, view: int) -> str:
    """What names augmented view ``view`` (1, 2, ...) in a cache key: a larger view count
    reuses the views of a smaller one."""
    return f"augment={policy}|seed={seed}|view={view}"


@dataclass(frozen=True)
class Pass:
    """One array a pass over a split's images writes to ``target``: a backbone's outputs
    (``forward``: uint8 batches of ``batch`` images -> outputs) or, with no ``forward``, the
    pixels themselves at ``size`` (a decoded-pixel cache)."""

    target: Path
    size: int
    shape: tuple[int, ...]  # of one image's entry
    dtype: type
    forward: Callable[[np.ndarray], tf.Tensor] | None = None
    batch: int = BATCH
    net: keras.Model | None = None  # what ``forward`` runs, kept alive while the pass is
    # Further outputs of the same forward (it then returns a list, ``target``'s first): the
    # activations at fine-tuning cuts, computed on the way to the pooled features.
    more: tuple[tuple[Path, tuple[int, ...]], ...] = ()

    @property
    def outputs(self) -> list[tuple[Path, tuple[int, ...]]]:
        return [(self.target, self.shape), *self.more]

    @property
    def bytes(self) -> int:
        size = np.dtype(self.dtype).itemsize
        return int(sum(size * math.prod(shape) for _, shape in self.outputs))


def load_entry(target: Path, rows: int, dtype=DTYPE) -> np.ndarray | None:
    """A cache entry of ``rows`` rows memory-mapped, or None when it is missing or fails its
    check. Looking does not count as reading: the caller that trains on it marks it
    (:func:`tuner.model.disk.mark_read`, what eviction orders by)."""
    cached = pipeline.load_checked(target, None, dtype)
    if cached is None or cached.shape[0] != rows or cached.ndim < 2:
        return None
    return cached


def run_passes(
    source: Sequence[str] | dict[int, np.ndarray],
    rows: int,
    passes: Sequence[Pass],
    label: str = "backbone pass",
) -> dict[Path | str, float]:
    """Write every pass in one sweep over the images: ``source`` is the split's image files
    (each read and decoded once for all the passes' sizes: :func:`pipeline.stream_sizes`) or
    decoded pixels per size. Each target is built under its lock (processes sharing the folder
    build it once), into a temporary file renamed at the end; a pass another process finished
    meanwhile is skipped. Returns the seconds each target's forward took, and under
    ``"decode"`` the seconds spent waiting for pixels. ``label`` names the sweep's progress
    bar (:mod:`data_tools.progress`)."""
    spent: dict[Path | str, float] = {"decode": 0.0}
    with contextlib.ExitStack() as stack:
        for target in sorted({t for p in passes for t, _ in p.outputs}):
            stack.enter_context(pipeline.cache_lock(target))
        todo = [
            p for p in passes if any(load_entry(t, rows, p.dtype) is None for t, _ in p.outputs)
        ]
        if not todo:
            return spent
        outputs = []
        for pass_ in todo:
            arrays = []
            for target, shape in pass_.outputs:
                tmp = stack.enter_context(atomic_path(target, "cache"))
                arrays.append(np.lib.format.open_memmap(tmp, "w+", pass_.dtype, (rows, *shape)))
            outputs.append(arrays)
        sizes = sorted({p.size for p in todo})
        chunk = _chunk(todo)
        start, waited = 0, time.monotonic()
        with progress.bar(label, rows) as advance:
            for images in _sweep(source, sizes, chunk, rows):
                spent["decode"] += time.monotonic() - waited
                count = len(next(iter(images.values())))
                for pass_, arrays in zip(todo, outputs, strict=True):
                    began = time.monotonic()
                    for out, values in zip(arrays, _apply(pass_, images[pass_.size]), strict=True):
                        out[start : start + count] = values
                    spent[pass_.target] = spent.get(pass_.target, 0.0) + time.monotonic() - began
                start += count
                advance(count)
                waited = time.monotonic()
        for arrays in outputs:
            for out in arrays:
                out.flush()
        del outputs, arrays
    return spent


# A sweep holds this many bytes of decoded pixels at once (all sizes), whatever the set's size.
WINDOW_BYTES = 256 * 1024**2


def _chunk(passes: Sequence[Pass]) -> int:
    """Images a sweep decodes at a time: the largest pass batch, within ``WINDOW_BYTES``."""
    per_image = sum(3 * s * s for s in {p.size for p in passes})
    return max(1, min(max(p.batch for p in passes), WINDOW_BYTES // per_image))


def _sweep(
    source: Sequence[str] | dict[int, np.ndarray], sizes: list[int], chunk: int, rows: int
) -> Iterator[dict[int, np.ndarray]]:
    if isinstance(source, dict):
        for start in range(0, rows, chunk):
            yield {s: np.asarray(source[s][start : start + chunk], np.uint8) for s in sizes}
    else:
        yield from pipeline.stream_sizes(source, sizes, chunk)


def _apply(pass_: Pass, images: np.ndarray) -> list[np.ndarray]:
    """A pass's entries for a chunk of images, one array per output, ``pass_.batch`` images
    at a time (the last padded: the traced forward takes one shape)."""
    if pass_.forward is None:
        return [images]
    parts: list[list[np.ndarray]] = [[] for _ in pass_.outputs]
    for start in range(0, len(images), pass_.batch):
        piece = images[start : start + pass_.batch]
        real = len(piece)
        if real < pass_.batch:
            padding = np.zeros((pass_.batch - real, *piece.shape[1:]), dtype=np.uint8)
            piece = np.concatenate([piece, padding])
        result = pass_.forward(piece)
        for part, values in zip(parts, result if pass_.more else [result], strict=True):
            part.append(np.asarray(values)[:real])
    return [np.concatenate(part) for part in parts]


def feature_pass(
    net: keras.Model,
    target: Path,
    size: int,
    batch: int = BATCH,
    augment: keras.Model | None = None,
    more: Sequence[Path] = (),
) -> Pass:
    """The :class:`Pass` of ``net`` (a frozen extractor, see :func:`extractor`) at ``size``,
    its outputs float32 (:data:`DTYPE`); ``augment`` (a seeded :func:`tuner.model.augment.layer`)
    transforms the pixels first, in training mode: an augmented view. ``more``: where
    ``net``'s further outputs go (:func:`backbone_extractor` with several outputs)."""
    shape = (size, size, 3)
    forward = (
        _traced(net, shape, batch) if augment is None else _augmented(net, augment, shape, batch)
    )
    shapes = net.output_shape if more else [net.output_shape]
    shapes = [tuple(int(d) for d in shape[1:]) for shape in shapes]
    outputs = tuple(zip(more, shapes[1:], strict=True))
    return Pass(target, size, shapes[0], DTYPE, forward, batch, net, outputs)


def backbone_extractor(
    base: keras.Model, size: int, input_scale: float, outputs: Sequence[str] = ("pooled",)
) -> keras.Model:
    """``pixels -> [input_scale] -> base`` in inference mode: :func:`extractor` for a
    backbone built on its own (a pass planned ahead of its trials), with one output per name
    of ``outputs``, in order: ``pooled`` (the backbone's features), ``stages``
    (:func:`tuner.model.backbones.with_stages`: the same forward, its last columns the pooled
    features) or a layer's name (its activations: a fine-tune's cut)."""
    staged = backbones.with_stages(base) if "stages" in outputs else None
    tensors = [
        base.output
        if name == "pooled"
        else staged.output
        if name == "stages"
        else base.get_layer(name).output
        for name in outputs
    ]
    if list(outputs) != ["pooled"]:
        base = keras.Model(base.input, tensors if len(tensors) > 1 else tensors[0], name=base.name)
    inputs = keras.Input((size, size, 3), name="pixels")
    x = inputs
    if input_scale != 1.0:
        x = keras.layers.Rescaling(input_scale, name="input_scale")(x)
    return keras.Model(inputs, base(x, training=False), name="feature_extractor")


def cut_layer(base: keras.Model, top_blocks: int) -> keras.layers.Layer:
    """The last layer of the last frozen block below the top ``top_blocks`` blocks."""
    units = backbones.blocks(base)
    last_frozen = units[len(units) - top_blocks - 1]
    return [layer for layer in base.layers if backbones.block_of(layer.name) == last_frozen][-1]


def _traced(
    net: keras.Model, shape: tuple[int, ...], batch: int = BATCH
) -> Callable[[np.ndarray], tf.Tensor]:
    """``net`` as one traced function on uint8 batches of ``batch`` (the last batch of a
    pass is padded), made once per extractor and batch: tracing B0 costs ~0.8 s, so the
    train and validation passes share it. The pixels become float32 inside the graph: a
    quarter of the bytes to hand over, and 6% less time per image than
    ``predict_on_batch`` on float32 (B0, 128 px, 2 cores)."""
    forwards = _TRACED.setdefault(net, {})
    if batch not in forwards:
        spec = tf.TensorSpec((batch, *shape), tf.uint8)
        model = weakref.ref(net)  # only tracing calls it; a strong one would keep net alive
        forwards[batch] = tf.function(
            lambda images: model()(tf.cast(images, tf.float32), training=False),
            input_signature=[spec],
        )
    return forwards[batch]


_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # extractor -> batch -> pass


def _augmented(
    net: keras.Model, layer: keras.Model, shape: tuple[int, ...], batch: int
) -> Callable[[np.ndarray], tf.Tensor]:
    """``net(layer(pixels))``, the augmentation in training mode (random), the network in
    inference mode, as one traced function for one view (its layer's seed state advances
    batch by batch, so a view is the same in every process that computes it)."""
    spec = tf.TensorSpec((batch, *shape), tf.uint8)
    return tf.function(
        lambda images: net(layer(tf.cast(images, tf.float32), training=True), training=False),
        input_signature=[spec],
    )


class ForModel(keras.callbacks.Callback):
    """Runs a callback as if the full model were training while its head trains on features
    (Keras Tuner's checkpoint callback must save the whole model, not the head)."""

    def __init__(self, inner: keras.callbacks.Callback, model: keras.Model) -> None:
        super().__init__()
        self.inner = inner
        self.full_model = model

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self.inner.set_model(self.full_model)

    def set_params(self, params: dict) -> None:
        super().set_params(params)
        self.inner.set_params(params)


def _forward(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in [n for n in dir(keras.callbacks.Callback) if n.startswith("on_")]:
    setattr(ForModel, _name, _forward(_name))
