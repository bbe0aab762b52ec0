"""Augmentation policies: what a search-space file writes, and the Keras layers they make.

A policy is ``none`` or transforms joined by ``+``, each ``name`` or ``name:strength``::

    augment: [none, flip, "flip+zoom:0.1+contrast:0.2", "rotate:0.05+translate:0.1"]

| transform | Keras 3 layer | strength (default) |
|---|---|---|
| ``flip`` | ``RandomFlip("horizontal")`` | none |
| ``vflip`` | ``RandomFlip("vertical")`` | none |
| ``rotate`` | ``RandomRotation(s)`` | fraction of a full turn, either way (0.05: +-18 degrees) |
| ``zoom`` | ``RandomZoom(s)`` | zoom in or out by up to this fraction (0.1) |
| ``translate`` | ``RandomTranslation(s, s)`` | shift by up to this fraction of the size (0.1) |
| ``contrast`` | ``RandomContrast(s)`` | contrast factor in ``1 +- s`` (0.2) |

Flips and rotations can change a class (text, flags, arrows): the search decides on
validation, which is never augmented. The layers work on float pixels in 0..255 and run only
while features are computed or a model trains: the model a trial keeps and export ships has
no augmentation inside (:mod:`tuner.model.hypermodel`).
"""

from __future__ import annotations

import zlib

from data_tools.errors import InputError

NONE = "none"
# name -> its default strength (None: it takes none)
TRANSFORMS = {
    "flip": None,
    "vflip": None,
    "rotate": 0.05,
    "zoom": 0.1,
    "translate": 0.1,
    "contrast": 0.2,
}
MAX_STRENGTH = 1.0


def parse(policy: str) -> list[tuple[str, float | None]]:
    """``"flip+zoom:0.2"`` -> ``[("flip", None), ("zoom", 0.2)]``; ``none`` -> ``[]``.
    Raises :class:`InputError` (one line: what is wrong, what is valid)."""
    text = str(policy).strip().lower()
    if text in (NONE, ""):
        return []
    out: list[tuple[str, float | None]] = []
    for part in text.split("+"):
        name, sep, value = part.strip().partition(":")
        if name not in TRANSFORMS:
            raise InputError(
                f"augment policy '{policy}': unknown transform '{name}'; valid transforms are "
                f"{', '.join(TRANSFORMS)} (joined by '+', e.g. flip+zoom:0.1), or none"
            )
        default = TRANSFORMS[name]
        if default is None:
            if sep:
                raise InputError(
                    f"augment policy '{policy}': {name} takes no strength; write '{name}'"
                )
            out.append((name, None))
            continue
        try:
            strength = float(value) if sep else default
        except ValueError:
            strength = -1.0
        if not 0 < strength <= MAX_STRENGTH:
            raise InputError(
                f"augment policy '{policy}': {name} strength '{value}' must be a number above "
                f"0 and at most {MAX_STRENGTH:g} (e.g. {name}:{default:g})"
            )
        out.append((name, strength))
    if len({name for name, _ in out}) != len(out):
        raise InputError(f"augment policy '{policy}': a transform appears twice; keep one")
    return out


def canonical(policy: str) -> str:
    """The policy with every strength written out: ``flip+zoom`` -> ``flip+zoom:0.1``."""
    parts = parse(policy)
    if not parts:
        return NONE
    return "+".join(name if s is None else f"{name}:{s:g}" for name, s in parts)


def is_on(policy: str) -> bool:
    return canonical(policy) != NONE


def view_seed(policy: str, seed: int, view: int) -> int:
    """The seed of one augmented view: the same policy, search seed and view index give the
    same transforms, in every process and on resume."""
    return zlib.crc32(f"{canonical(policy)}|{seed}|{view}".encode()) & 0x7FFFFFFF


def layer(policy: str, seed: int):
    """A ``keras.Sequential`` of the policy's random layers, seeded (None for ``none``).
    Call it with ``training=True``; it takes and gives float pixels in 0..255."""
    import keras

    parts = parse(policy)
    if not parts:
        return None
    made = []
    for index, (name, strength) in enumerate(parts):
        s = seed + 7919 * index
        if name == "flip":
            made.append(keras.layers.RandomFlip("horizontal", seed=s))
        elif name == "vflip":
            made.append(keras.layers.RandomFlip("vertical", seed=s))
        elif name == "rotate":
            made.append(keras.layers.RandomRotation(strength, seed=s))
        elif name == "zoom":
            made.append(keras.layers.RandomZoom(strength, seed=s))
        elif name == "translate":
            made.append(keras.layers.RandomTranslation(strength, strength, seed=s))
        elif name == "contrast":
            made.append(keras.layers.RandomContrast(strength, value_range=(0, 255), seed=s))
    return keras.Sequential(made, name="augment")
