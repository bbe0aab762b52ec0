"""An image's size from its header, before anything is decoded: the pixel limit's check.

A 23,000 x 23,000 PNG of one colour is a 0.8 MB file and 1.6 GB of RGB once decoded; Pillow
refuses such "decompression bombs" from 89 megapixels on, TensorFlow's decoders only past
their int32 limits. So every decode of the package (:func:`data_tools.pipeline.read_rgb`)
first reads the width and height the file declares, in TensorFlow ops (graphs and eager
alike, no Python per image: :mod:`data_tools._header_ops`), and refuses a file over
:data:`MAX_PIXELS` before its pixels exist. JPEG, PNG, GIF, BMP and WebP (lossy, lossless
and extended) headers are read; a file that is none of them declares 0 pixels here and is
left to the decoder, which refuses it.
"""

from __future__ import annotations

DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: a 7,300 x 5,500 photo; 120 MB of RGB
MAX_PIXELS = DEFAULT_MAX_PIXELS  # set by the commands' --max-pixels (set_max_pixels)


def set_max_pixels(limit: int) -> None:
    """The limit every decode built from now on applies (datasets read it when traced)."""
    global MAX_PIXELS
    MAX_PIXELS = int(limit)


def declared_pixels(data):
    """Width x height an encoded image (bytes or a string tensor) declares, as an int64
    tensor; 0 for a kind this does not read."""
    from data_tools import _header_ops

    return _header_ops.declared_pixels(data)


def check(data, limit: int | None = None):
    """An op that fails (``InvalidArgumentError``, the decoder's own error type, so every
    path that counts undecodable files counts this one too) when ``data`` declares more than
    ``limit`` pixels (default :data:`MAX_PIXELS`)."""
    import tensorflow as tf

    limit = MAX_PIXELS if limit is None else limit
    return tf.debugging.assert_less_equal(
        declared_pixels(data),
        tf.constant(limit, tf.int64),
        message=f"the image is over the pixel limit ({limit:,} pixels; --max-pixels)",
    )
