"""The header readers behind :mod:`data_tools.header`, in TensorFlow ops (imported only when
an image is checked, so the commands' parsers and --help load no TensorFlow)."""

from __future__ import annotations

import tensorflow as tf


def _bytes(data: tf.Tensor, start: int, length: int) -> tf.Tensor:
    """``length`` bytes of ``data`` from ``start`` as int64 values (zeros past the end)."""
    piece = tf.strings.substr(data, start, length)
    padded = tf.strings.join([piece, tf.strings.substr(tf.constant("\0" * 32), 0, length)])
    raw = tf.io.decode_raw(tf.strings.substr(padded, 0, length), tf.uint8)
    return tf.cast(raw, tf.int64)


def _little(data: tf.Tensor, start: int, length: int) -> tf.Tensor:
    values = _bytes(data, start, length)
    return tf.reduce_sum(values * tf.constant([256**i for i in range(length)], tf.int64))


def _big(data: tf.Tensor, start: int, length: int) -> tf.Tensor:
    values = _bytes(data, start, length)
    return tf.reduce_sum(values * tf.constant([256**i for i in reversed(range(length))], tf.int64))


def _starts(data: tf.Tensor, magic: bytes, at: int = 0) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, at, len(magic)), magic)


def _jpeg(data: tf.Tensor) -> tf.Tensor:
    shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
    return shape[0] * shape[1]


def _webp(data: tf.Tensor) -> tf.Tensor:
    kind = tf.strings.substr(data, 12, 4)

    def lossy() -> tf.Tensor:  # VP8: 14-bit width and height at 26 and 28
        return (_little(data, 26, 2) % 16384) * (_little(data, 28, 2) % 16384)

    def lossless() -> tf.Tensor:  # VP8L: 14 bits each, minus one, packed from byte 21
        bits = _little(data, 21, 4)
        return (bits % 16384 + 1) * ((bits // 16384) % 16384 + 1)

    def extended() -> tf.Tensor:  # VP8X: 24-bit canvas width and height, minus one
        return (_little(data, 24, 3) + 1) * (_little(data, 27, 3) + 1)

    return tf.case(
        [(tf.equal(kind, b"VP8 "), lossy), (tf.equal(kind, b"VP8L"), lossless)],
        default=extended,
    )


def declared_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width x height an encoded image declares (int64), 0 for a kind this does not read."""
    data = tf.convert_to_tensor(data, tf.string)
    return tf.case(
        [
            (_starts(data, b"\x89PNG"), lambda: _big(data, 16, 4) * _big(data, 20, 4)),
            (_starts(data, b"\xff\xd8"), lambda: _jpeg(data)),
            (_starts(data, b"GIF8"), lambda: _little(data, 6, 2) * _little(data, 8, 2)),
            (
                _starts(data, b"BM"),
                lambda: _little(data, 18, 4) * tf.abs(_signed32(_little(data, 22, 4))),
            ),
            (_starts(data, b"RIFF") & _starts(data, b"WEBP", 8), lambda: _webp(data)),
        ],
        default=lambda: tf.constant(0, tf.int64),
    )


def _signed32(value: tf.Tensor) -> tf.Tensor:
    """A little-endian int32 read as unsigned, signed again (a BMP's height may be < 0)."""
    return tf.where(value >= 2**31, value - 2**32, value)
