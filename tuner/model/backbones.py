"""The one table of backbone facts, and how to build each backbone.

Every setting that depends on the backbone (native image size, default batch size, the input
range it expects, its blocks for partial unfreezing) is read from :data:`BACKBONES`; the
pipeline and the search ask this table, never the search-space file.

Sources:

* ``B0`` .. ``B7``: ``keras.applications.EfficientNetB0..B7``. ImageNet weights come from
  Keras' cache (``~/.keras/models/efficientnetb0_notop.h5`` ...), downloaded on first use.
  They take pixels in 0..255 and normalise inside.
* ``V2B0`` .. ``V2B3``, ``V2S``, ``V2M``, ``V2L``: ``keras.applications.EfficientNetV2*``
  (Tan & Le 2021), whose ImageNet notop files are ``efficientnetv2-b0_notop.h5`` ...
  ``efficientnetv2-l_notop.h5`` in the same cache. They also take 0..255 and preprocess inside
  (B0-B3: ImageNet mean and std; S/M/L: to -1..1). Their blocks are named as V1's
  (``block6h_...``, then ``top_``), so partial unfreezing and activation caches work alike.
* ``hub:<handle or SavedModel path>``: a TF-Hub image feature-vector module, always frozen,
  wrapped in a Keras 3 layer around ``hub.load`` (``hub.KerasLayer`` is a Keras 2 layer).
  TF-Hub EfficientNet feature vectors take pixels in 0..1.
* ``T0``: a tiny EfficientNet (width x0.25, depth x0.3, 32 px, 173k parameters) built by
  the same Keras code, for fast tests of the production path. Its depth gives stage 6 a
  second block (6b), whose residual branch has stochastic depth as B0..B7's do.
* ``V2T0``: a tiny EfficientNetV2 (V2-B0's blocks, width x0.25, depth x0.3, 32 px, 161k
  parameters) built by Keras' EfficientNetV2 code, for the same tests of the V2 rows: fused
  and depthwise blocks, 9 blocks and ``top``, stochastic depth in 5b, 6b and 6c.

Keras' official notop files store the ImageNet std (not its square) as the Normalization
layer's variance, and ``keras.applications`` adds the missing ``Rescaling(1/sqrt(std))`` only
for ``weights="imagenet"`` (tensorflow issue 49930). A file loaded from a ``--weights``
folder in that layout gets the variance it should have had (std squared), so it computes
what ``--weights imagenet`` computes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from data_tools.errors import InputError

BLOCK_NAME = re.compile(r"^block(\d+[a-z])_")
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)  # what the official files store as the variance
TOP_BLOCK = "top"  # top_conv / top_bn / top_activation: the last unit to unfreeze
V1_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
V2_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/"
TINY = ("tiny", "tiny_v2")  # the constructors of the test backbones (never ImageNet weights)


@dataclass(frozen=True)
class Backbone:
    """Facts about one backbone. ``batch`` is the default batch size for an 8 GB card."""

    name: str
    size: int
    batch: int
    input_scale: float  # multiply 0..255 pixels by this before the backbone
    constructor: str  # attribute of keras.applications, or "hub" / "tiny" / "tiny_v2"
    weights_file: str | None = None  # the notop file in Keras' cache, for ImageNet weights
    handle: str | None = None  # TF-Hub handle or SavedModel path
    gflops: float = 0.39  # multiply-adds of one image at `size` (what a pass costs, relatively)
    weights_url: str = V1_WEIGHTS_URL  # where Keras downloads `weights_file` from
    features: int = 1280  # pooled features an image (what the disk plan counts)
    # Values an image of stage features (with_stages: the tapped stages' pooled outputs, then
    # the pooled top); 0: no stages to tap (a hub module), it reads ``features`` alone.
    stage_features: int = 0
    params: int = 0  # weights of the backbone (no top): what a whole fine-tune's checkpoint holds

    @property
    def finetunable(self) -> bool:
        return self.constructor != "hub"

    def width(self, kind: str = "top") -> int:
        """Values an image a head on this backbone reads: ``kind`` ``top`` (the pooled top)
        or ``stages`` (:func:`with_stages`; a backbone without stages reads its top)."""
        return self.stage_features if kind == "stages" and self.stage_features else self.features


def _keras_effnet(
    variant: str,
    size: int,
    batch: int,
    gflops: float,
    features: int,
    stage_features: int,
    params: int,
    v2: bool = False,
) -> Backbone:
    """A keras.applications row: ``B0`` -> EfficientNetB0 and efficientnetb0_notop.h5;
    ``V2`` + ``S`` -> EfficientNetV2S and efficientnetv2-s_notop.h5 (V2's download address)."""
    family, stem = ("V2", "efficientnetv2-") if v2 else ("", "efficientnet")
    return Backbone(
        f"{family}{variant}",
        size,
        batch,
        1.0,
        f"EfficientNet{family}{variant}",
        f"{stem}{variant.lower()}_notop.h5",
        gflops=gflops,
        weights_url=V2_WEIGHTS_URL if v2 else V1_WEIGHTS_URL,
        features=features,
        stage_features=stage_features,
        params=params,
    )


# GFLOPs at native size and pooled features: the EfficientNet papers' tables (Tan & Le 2019,
# 2021) and keras.applications' top layers; stage features (with_stages' width) and weights:
# counted on each keras.applications model (tests/test_backbones.py checks B0's, V2-B0's and
# the tiny ones'). V2's batches follow V1's at the same size, one step lower from 384 px
# (S/M/L are 2-4x V1's parameters).
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        _keras_effnet("B0", 224, 512, 0.39, 1280, 1984, 4_049_571),
        _keras_effnet("B1", 240, 256, 0.70, 1280, 1984, 6_575_239),
        _keras_effnet("B2", 260, 256, 1.0, 1408, 2176, 7_768_569),
        _keras_effnet("B3", 300, 128, 1.8, 1536, 2384, 10_783_535),
        _keras_effnet("B4", 380, 128, 4.2, 1792, 2784, 17_673_823),
        _keras_effnet("B5", 456, 64, 9.9, 2048, 3168, 28_513_527),
        _keras_effnet("B6", 528, 32, 19.0, 2304, 3568, 40_960_143),
        _keras_effnet("B7", 600, 32, 37.0, 2560, 3968, 64_097_687),
        _keras_effnet("B0", 224, 512, 0.72, 1280, 1728, 5_919_312, v2=True),
        _keras_effnet("B1", 240, 256, 1.2, 1280, 1728, 6_931_124, v2=True),
        _keras_effnet("B2", 260, 256, 1.7, 1408, 1896, 8_769_374, v2=True),
        _keras_effnet("B3", 300, 128, 3.0, 1536, 2072, 12_930_622, v2=True),
        _keras_effnet("S", 384, 64, 8.8, 1280, 1888, 20_331_360, v2=True),
        _keras_effnet("M", 480, 32, 24.0, 1280, 2432, 53_150_388, v2=True),
        _keras_effnet("L", 480, 16, 53.0, 1280, 2720, 117_746_848, v2=True),
        Backbone(
            "T0",
            32,
            64,
            1.0,
            "tiny",
            gflops=0.002,
            features=320,
            stage_features=504,
            params=172_543,
        ),
        Backbone(
            "V2T0",
            32,
            64,
            1.0,
            "tiny_v2",
            gflops=0.002,
            features=320,
            stage_features=440,
            params=161_002,
        ),
    ]
}
_HUB_SIZE = re.compile(r"efficientnet[/_-]?b([0-7])", re.IGNORECASE)
# TF-Hub's V2 feature vectors: .../efficientnet_v2_imagenet21k_b3/feature_vector/2, ..._s/...
_HUB_V2_SIZE = re.compile(r"efficientnet_?v2\w*?[_-](b[0-3]|s|m|l)(?![a-z0-9])", re.IGNORECASE)


def get(name: str) -> Backbone:
    """The table entry for ``name`` (``B0``..``B7``, ``V2B0``..``V2L``, ``T0``, ``V2T0``, or
    ``hub:<handle>``). A hub handle naming an EfficientNet variant gets that row's size."""
    if name.startswith("hub:"):
        handle = name[len("hub:") :]
        like = None
        if match := _HUB_V2_SIZE.search(handle):
            like = BACKBONES[f"V2{match.group(1).upper()}"]
        elif match := _HUB_SIZE.search(handle):
            like = BACKBONES[f"B{match.group(1)}"]
        batch = like.batch if like else 256
        like = like or BACKBONES["B0"]
        return Backbone(
            name,
            like.size,
            batch,
            1 / 255,
            "hub",
            handle=handle,
            gflops=like.gflops,
            features=like.features,
        )
    if name not in BACKBONES:
        raise InputError(
            f"unknown backbone '{name}': valid backbones are "
            f"{', '.join(BACKBONES)} or hub:<handle or SavedModel path>"
        )
    return BACKBONES[name]


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights (``$KERAS_HOME/models`` or ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def build(backbone: Backbone, size: int, weights: str | None) -> keras.Model:
    """The backbone as a Keras model from ``[size, size, 3]`` pixels (already scaled) to
    pooled features. ``weights``: ``"imagenet"``, ``None`` (random), or a folder holding this
    backbone's Keras notop file (``efficientnetb0_notop.h5``, ``efficientnetv2-b0_notop.h5``)
    or a Keras 3 weights file (``B0.weights.h5``, as ``model.save_weights`` writes)."""
    shape = (size, size, 3)
    if backbone.constructor == "hub":  # the module carries its own weights, whatever --weights
        return _hub_model(backbone.handle, shape)
    own_file = None
    if weights not in (None, "imagenet"):
        own_file = weights_file_in(Path(weights), backbone)
        # Keras 3 weights files load after construction; the notop file by the constructor.
        weights = None if own_file.name.endswith(".weights.h5") else str(own_file)
    if backbone.constructor == "tiny":
        from keras.src.applications.efficientnet import EfficientNet

        model = EfficientNet(
            0.25,
            0.3,  # stage 6 repeats: one residual block with stochastic depth (6b)
            32,
            dropout_rate=0.0,
            drop_connect_rate=0.2,  # stochastic depth, as in B0..B7
            name="efficientnet_t0",
            include_top=False,
            weights=None,
            input_shape=shape,
            pooling="avg",
        )
    elif backbone.constructor == "tiny_v2":
        from keras.src.applications.efficientnet_v2 import DEFAULT_BLOCKS_ARGS, EfficientNetV2

        model = EfficientNetV2(
            0.25,
            0.3,  # stages 5 and 6 repeat: residual blocks with stochastic depth (5b, 6b, 6c)
            32,
            dropout_rate=0.0,
            drop_connect_rate=0.2,
            blocks_args=DEFAULT_BLOCKS_ARGS["efficientnetv2-b0"],
            name="efficientnetv2-t0",  # not "-b*": S/M/L's preprocessing (to -1..1)
            include_top=False,
            weights=None,
            input_shape=shape,
            pooling="avg",
        )
    else:
        constructor = getattr(keras.applications, backbone.constructor)
        model = constructor(include_top=False, weights=weights, input_shape=shape, pooling="avg")
    if own_file is not None and own_file.name.endswith(".weights.h5"):
        model.load_weights(own_file)
    if own_file is not None:
        fix_official_normalization(model)
    return model


def fix_official_normalization(model: keras.Model) -> bool:
    """Give a Normalization layer loaded in the official files' layout (variance = the
    ImageNet std) the variance it stands for (std squared): then ``(x - mean) / std``, as
    ``weights="imagenet"`` computes with its extra Rescaling. Returns whether it changed."""
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Normalization) or layer.input_mean is not None:
            continue
        variance = np.asarray(layer.adapt_variance)
        if variance.shape == (3,) and np.allclose(variance, IMAGENET_STD_RGB, rtol=0, atol=1e-6):
            layer.adapt_variance.assign(np.square(variance))
            layer.finalize_state()
            return True
    return False


def inference_mode(model: keras.Model) -> int:
    """Switch off a pretrained backbone's stochastic depth (its Dropout layers; returns how
    many). Keras 3 hands the outer ``training`` flag to nested models over the
    ``training=False`` written at the call site, so without this a frozen backbone drops
    residual branches during ``fit`` and cached features would not equal what training
    sees. BatchNorm needs nothing: a non-trainable BatchNormalization uses its moving
    statistics in Keras 3."""
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    for layer in dropouts:
        layer.rate = 0.0
    return len(dropouts)


def weights_file_in(folder: Path, backbone: Backbone) -> Path:
    """This backbone's weights file in a ``--weights`` folder (or the file itself)."""
    if folder.is_file():
        return folder
    names = [n for n in (backbone.weights_file, f"{backbone.name}.weights.h5") if n]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"--weights {folder} has no weights for {backbone.name}: put {' or '.join(names)} there"
    )


def blocks(model: keras.Model) -> list[str]:
    """The model's unfreezable units in order, bottom to top: ``1a, 2a, 2b, ..., 7a, top``."""
    found = list(
        dict.fromkeys(m.group(1) for layer in model.layers if (m := BLOCK_NAME.match(layer.name)))
    )
    has_top = any(layer.name.startswith("top_") for layer in model.layers)
    return found + ([TOP_BLOCK] if has_top else [])


# Stage features (``features: stages``): the pooled outputs of the last block of each of the
# top stages below ``top`` (B0: 4c, 5c, 6d, 7a), then the pooled top. Measured on the real
# 9-class Twemoji set (B0, 128 px, linear heads, four folds), they scored 0.615 test
# accuracy where the pooled top alone scored 0.533 (+0.07 to +0.09 in every fold): images
# unlike ImageNet's keep more of what tells them apart in the middle stages.
TAPPED_STAGES = 4


def stage_taps(model: keras.Model) -> list[str]:
    """The layers whose pooled outputs :func:`with_stages` adds, bottom to top: the output
    layer of the last block of each of the top :data:`TAPPED_STAGES` stages (none for a
    backbone without blocks, a hub module)."""
    last_of_stage: dict[str, str] = {}
    for unit in blocks(model):
        if unit != TOP_BLOCK:
            last_of_stage[unit.rstrip("abcdefghijklmnopqrstuvwxyz")] = unit
    taps = []
    for unit in list(last_of_stage.values())[-TAPPED_STAGES:]:
        taps.append([layer.name for layer in model.layers if block_of(layer.name) == unit][-1])
    return taps


def features_read(backbone: Backbone, value: object) -> str:
    """What a head on ``backbone`` reads when the space's ``features`` is ``value``
    (``top`` or ``stages``): a hub module has no stages to tap, so always ``top``."""
    return str(value) if backbone.finetunable else "top"


def with_stages(model: keras.Model) -> keras.Model:
    """``model`` (pixels -> pooled features) with the pooled outputs of :func:`stage_taps`
    before its own: one vector ``[stage taps ..., pooled top]``, sharing ``model``'s layers
    (and so its weights and blocks). A model without taps is returned as it is."""
    taps = stage_taps(model)
    if not taps:
        return model
    pooled = [
        keras.layers.GlobalAveragePooling2D(name=f"stage_pool_{block_of(name)}")(
            model.get_layer(name).output
        )
        for name in taps
    ]
    joined = keras.layers.Concatenate(name="stage_features")([*pooled, model.output])
    return keras.Model(model.input, joined, name=model.name)


def block_of(layer_name: str) -> str | None:
    """The unit a layer belongs to (``'6b'``, ``'top'``), or None for the stem and the rest."""
    if match := BLOCK_NAME.match(layer_name):
        return match.group(1)
    return TOP_BLOCK if layer_name.startswith("top_") else None


def unfreeze_top(model: keras.Model, count: int) -> list[str]:
    """Make the top ``count`` blocks trainable, all else frozen; BatchNorm always stays frozen.

    Whole blocks only. Returns the names of the blocks unfrozen. ``count == 0`` freezes the
    whole backbone.
    """
    units = blocks(model)
    chosen = set(units[len(units) - count :]) if count > 0 else set()
    model.trainable = bool(chosen)
    for layer in model.layers:
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = block_of(layer.name) in chosen and not batch_norm
    return [unit for unit in units if unit in chosen]


def blocks_for_fraction(model: keras.Model, fraction: float) -> int:
    """How many top blocks ``fraction`` of the backbone's blocks is (rounded, at least 1 when
    fraction > 0)."""
    if fraction <= 0:
        return 0
    return max(1, round(fraction * len(blocks(model))))


def ensure_weights(backbone: Backbone) -> None:
    """Make sure ImageNet weights for ``backbone`` are in Keras' cache, downloading them if
    they are not. Raises one clear line when they cannot be had (offline)."""
    if backbone.weights_file is None:
        return
    target = keras_cache_dir() / backbone.weights_file
    if target.is_file():
        return
    url = backbone.weights_url + backbone.weights_file
    try:
        keras.utils.get_file(backbone.weights_file, url, cache_subdir="models")
    except Exception:  # noqa: BLE001 - any download failure means the same thing to the user
        raise WeightsUnavailable(
            f"ImageNet weights for {backbone.name} are not in Keras' cache and cannot be "
            f"downloaded: put {backbone.weights_file} in {keras_cache_dir()}/ or run with "
            f"--weights none"
        ) from None


def resolve_weights(choice: str, names: Sequence[str]) -> tuple[str | None, str]:
    """``--weights`` for the backbones ``names``: (what the constructors get, a label for the
    records). ``imagenet`` checks (or downloads) every backbone's file first and raises
    :class:`WeightsUnavailable` naming where to put it; ``none`` is random init; anything else
    must be a folder of notop files. A space of test backbones has no ImageNet weights."""
    check_weights_choice(choice)
    if choice.lower() == "none":
        return None, "none"
    if choice.lower() != "imagenet":
        return str(Path(choice)), str(Path(choice))
    for name in names:
        ensure_weights(get(name))
    if any(get(n).constructor in TINY for n in names):
        return None, "none (test backbone)"
    return "imagenet", "imagenet"


def check_weights_choice(choice: str) -> None:
    """``--weights`` is imagenet, none or an existing folder (checked before any work; whether
    ImageNet's files can be had is :func:`resolve_weights`'s question, asked later)."""
    if choice.lower() not in ("imagenet", "none") and not Path(choice).is_dir():
        raise InputError(
            f"--weights {choice}: not imagenet, none, or a folder holding notop files "
            f"(efficientnetb0_notop.h5, efficientnetv2-b0_notop.h5, ...)"
        )


class WeightsUnavailable(InputError):
    """ImageNet weights are neither cached nor downloadable."""


def _hub_model(handle: str, shape: tuple[int, int, int]) -> keras.Model:
    inputs = keras.Input(shape)
    features = HubFeatures(handle, name="hub_features")(inputs)
    return keras.Model(inputs, features, name="hub_backbone")


@keras.saving.register_keras_serializable(package="effnet_tuner")
class HubFeatures(keras.layers.Layer):
    """A frozen TF-Hub feature-vector module (``hub.load``) as a Keras 3 layer.

    Always float32, whatever the global policy: a module's signature is float32 and refuses
    the float16 that mixed precision would feed it. ``trainable`` in a saved config is
    ignored (always frozen), so ``keras.models.load_model`` rebuilds it."""

    def __init__(self, handle: str, **kwargs) -> None:
        kwargs.pop("trainable", None)
        kwargs["dtype"] = "float32"
        super().__init__(trainable=False, **kwargs)
        import tensorflow_hub as hub

        self.handle = handle
        try:
            self._module = hub.load(handle)
        except Exception as exc:  # noqa: BLE001
            raise InputError(
                f"cannot load TF-Hub module {handle} ({type(exc).__name__}): "
                f"download it and pass hub:<local SavedModel folder>"
            ) from None

    def call(self, inputs):
        import tensorflow as tf

        return self._module(tf.cast(inputs, tf.float32))

    def get_config(self) -> dict:
        return {**super().get_config(), "handle": self.handle}
