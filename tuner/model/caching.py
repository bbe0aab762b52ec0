"""What the hypermodel keeps on disk between trials: backbone features and activations.

:class:`FeatureCaching` is the caching half of :class:`~tuner.model.hypermodel.EffNetHyperModel`:
which trials train on cached arrays, the cache files (keyed by the backbone's weights, size,
cut and augmented view), the passes that fill them (and the passes planned ahead for other
feature sets), and room on disk (:mod:`tuner.model.disk`: least recently read entries are
evicted first; what does not fit is computed again, and named in the trial's cache notes).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import keras_tuner as kt
import numpy as np

from tuner.model import augment as augment_mod
from tuner.model import backbones, disk, features

if TYPE_CHECKING:
    from tuner.model.hypermodel import TrialPlan
    from tuner.model.training import _Run


# Cached features or activations up to this size (as float32) are trained on in memory
# (under the 2 GB limit of a tensor in a tf.data graph).
IN_MEMORY_BYTES = 1024**3
# Augmented views of the activations at a fine-tune's cut are cached up to this size on disk
# (float32, every view of the train split); beyond it the fine-tune augments end to end.
VIEW_CACHE_MAX_BYTES = 8 * 1024**3
# The cache names of a backbone's own outputs (the pooled top, or the stage features beside
# it), as against its activations at a fine-tune's cut (named by the cut layer).
FEATURE_CUTS = ("pooled", "stages")


class FeatureCaching:
    """The feature and activation caches of
    :class:`~tuner.model.hypermodel.EffNetHyperModel` (a mixin: it reads the hypermodel's
    ``space``, ``data`` and cache settings)."""

    def uses_feature_cache(self, plan: TrialPlan) -> bool:
        """Phase 1 trains the head on cached features when the backbone is frozen and fixed
        (pretrained weights), caching is on and there is a cache folder."""
        return self.feature_cache and plan.pretrained and self.data.cache_dir is not None

    def _activations_fit(self, model: keras.Model, plan: TrialPlan, count: int) -> bool:
        """Whether the activations at the cut below the top ``count`` blocks (every view of
        the train split, and validation) are cached or fit: augmented views within
        ``VIEW_CACHE_MAX_BYTES``, and what is missing within the cache budget."""
        bottom, top, cut = features.split_backbone(model, count)
        per_image = math.prod(int(d) for d in top.input_shape[1:]) * features.DTYPE().itemsize
        views_bytes = len(self.data.train) * plan.augment_views * per_image
        if plan.augment_views > 1 and views_bytes > VIEW_CACHE_MAX_BYTES:
            return False
        key = features.weights_fingerprint(bottom)
        needed = 0
        for split, views in (("train", plan.augment_views), ("validation", 1)):
            rows = len(self.data.rows(split))
            for view in range(views):
                target = self._target(
                    plan.backbone, plan.image_size, key, split, cut, view, plan.augment
                )
                if features.load_entry(target, rows) is None:
                    needed += rows * per_image
        if self._room(needed, f"activations at {cut}", self._pixels_of(plan.image_size)):
            return True
        self._note("so the fine-tune trains end to end")
        return False

    def _pixels_cacheable(self, size: int) -> bool:
        """Whether an end-to-end fit reads (or builds) the decoded-pixel cache at ``size``:
        yes unless the budget cannot hold it, then every epoch decodes the files."""
        splits = ("train", "validation")
        missing = [s for s in splits if self.data.cached_pixels(s, size) is None]
        rows = sum(len(self.data.rows(s)) for s in missing)
        if self._room(disk.pixel_bytes(rows, size), f"pixels at {size}px"):
            return True
        self._note("so they are decoded from the files every epoch")
        return False

    def _cached(
        self,
        make_net,
        weights_key: str,
        plan: TrialPlan,
        split: str,
        cut: str = "pooled",
        view: int = 0,
    ) -> np.ndarray:
        """A split's cached backbone outputs (features, or activations at ``cut``) of the
        part of the backbone whose weights' fingerprint is ``weights_key``; ``view`` > 0:
        of that augmented view of the images (:mod:`tuner.model.augment`).

        When it must be computed, the pass reads the split's cached pixels at this size if
        there are any, else decodes the image files; a plain pass over the files also
        computes the passes planned ahead (:meth:`_ahead`), from one decode of each file."""
        size, rows = plan.image_size, len(self.data.rows(split))
        target = self._target(plan.backbone, size, weights_key, split, cut, view, plan.augment)
        found = features.load_entry(target, rows)
        self.last_fit.setdefault("cache", []).append("loaded" if found is not None else "computed")
        if found is not None:
            return found
        augment = (
            augment_mod.layer(
                plan.augment, augment_mod.view_seed(plan.augment, self.space.seed, view)
            )
            if view
            else None
        )
        what = f"{split} {cut} outputs of {plan.backbone} {size}px"
        nbytes = rows * features.DTYPE().itemsize * _entry_size(make_net())
        if not self._room(nbytes, what, self._pixels_of(size)):
            raise kt.errors.FailedTrialError(
                f"the cache budget ({disk.format_bytes(self.disk.limit)}) cannot hold the {what}"
                f" even after evicting older entries: raise --cache-budget"
            )
        started = time.monotonic()
        pixels = self.data.cached_pixels(split, size)
        passes = []
        if pixels is None and cut in FEATURE_CUTS and not view:
            passes = self._ahead(split, (plan.backbone, size), target, cut)
        if not any(p.target == target for p in passes):
            passes.insert(
                0, features.feature_pass(make_net(), target, size, plan.pass_batch, augment)
            )
        source = self.data.paths(split) if pixels is None else {size: pixels}
        spent = features.run_passes(source, rows, passes)
        # What the oracle budgets by: this feature set's pass (its forward and the decoding),
        # apart from the passes computed ahead for other feature sets in the same sweep.
        own = spent.get(target, 0.0) + spent["decode"]
        self.last_fit["pass_seconds"] += own
        self.last_fit["ahead_seconds"] += max(time.monotonic() - started - own, 0.0)
        return features.load_entry(target, rows)

    def _target(
        self,
        backbone: str,
        size: int,
        weights_key: str,
        split: str,
        cut: str = "pooled",
        view: int = 0,
        policy: str = augment_mod.NONE,
    ) -> Path:
        view_key = features.view_name(policy, self.space.seed, view) if view else ""
        source = self.data.pixel_file(split, size).name
        return features.cache_file(
            self.data.cache_dir, backbone, size, weights_key, split, source, cut, view_key
        )

    def _ahead(
        self, split: str, current: tuple[str, int], target: Path, cut: str = "pooled"
    ) -> list[features.Pass]:
        """The passes a plain pass over a split's files computes in the same sweep (one
        decode of each file): for each planned (backbone, size) (:attr:`planned`; ``current``
        is the one asked for, whose features, ``cut`` ``pooled`` or ``stages``, go to
        ``target``) its pooled features and the activations at the cuts of
        :attr:`cut_fractions`, those not cached yet and fitting in the budget's free room
        (nothing is evicted for them; the asked-for pooled features are always computed)."""
        rows = len(self.data.rows(split))
        passes, room = [], self.disk.room() if self.disk else math.inf
        # The one asked for first: its features must be computed (their room is reserved).
        for backbone, size in sorted(self.planned, key=lambda pair: pair != current):
            entry = backbones.get(backbone)
            base = backbones.build(entry, size, self.weights)
            backbones.inference_mode(base)
            pooled = self._target(backbone, size, features.weights_fingerprint(base), split)
            asked = (backbone, size) == current and cut == "pooled"
            if asked and pooled != target:
                continue  # other weights than the trial's (cannot happen): its own pass
            cuts = self._cuts(base, entry) if entry.finetunable else {}
            wanted = {
                self._target(backbone, size, key, split, name): name for name, key in cuts.items()
            }
            wanted = {t: n for t, n in wanted.items() if features.load_entry(t, rows) is None}
            if features.load_entry(pooled, rows) is not None and not wanted:
                continue
            made = self._pass_ahead(base, entry, size, pooled, wanted)
            if rows * made.bytes > room and asked:
                made = self._pass_ahead(base, entry, size, pooled, {})  # without the cuts
            if rows * made.bytes <= room or asked:
                passes.append(made)
                room -= rows * made.bytes
            else:
                self._note(f"{backbone} {size}px not computed ahead for {split} (cache budget)")
        return passes

    def _pass_ahead(
        self, base: keras.Model, entry, size: int, pooled: Path, cuts: dict[Path, str]
    ) -> features.Pass:
        """The pass of a backbone built on its own: pooled features, and the activations at
        ``cuts`` ({target: cut layer name}) from the same forward."""
        net = features.backbone_extractor(base, size, entry.input_scale, list(cuts.values()))
        return features.feature_pass(net, pooled, size, self.pass_batch(entry), None, list(cuts))

    def _cuts(self, base: keras.Model, entry: backbones.Backbone) -> dict[str, str]:
        """{cut layer name: fingerprint of the weights below it} for each fine-tune fraction
        the search plans (:attr:`cut_fractions`) that leaves a frozen bottom."""
        units = len(backbones.blocks(base))
        out = {}
        for fraction in self.cut_fractions:
            count = backbones.blocks_for_fraction(base, fraction)
            if 0 < count < units:
                layer = features.cut_layer(base, count)
                bottom = keras.Model(base.input, layer.output)
                out[layer.name] = features.weights_fingerprint(bottom)
        return out

    def _pixels_of(self, size: int) -> frozenset[Path]:
        return frozenset(self.data.pixel_file(s, size) for s in ("train", "validation"))

    def _room(self, nbytes: int, what: str, keep: frozenset[Path] = frozenset()) -> bool:
        """Whether the cache budget holds ``nbytes`` more (evicting the least recently read
        entries when it must; each eviction noted on the trial line)."""
        if self.disk is None:
            return True
        fits, evicted = self.disk.admit(nbytes, keep)
        for path, size in evicted:
            self._note(f"evicted {path.parent.name}/{path.name} ({disk.format_bytes(size)})")
        if not fits:
            self._note(f"{what} ({disk.format_bytes(nbytes)}) over the cache budget")
        return fits

    def _note(self, text: str) -> None:
        """A line of what the cache budget changed in this fit (the trial line says it)."""
        self.last_fit.setdefault("cache_notes", []).append(text)

    def _features(self, run: _Run) -> dict[str, np.ndarray]:
        """The train and validation splits' cached pooled features (one backbone pass per
        split for the whole search)."""
        model = run.model
        make_net = functools.cache(lambda: features.extractor(model))  # built once, if needed
        key = self._fingerprint(model.get_layer("backbone"))
        # Stage features share the backbone's weights (so its fingerprint): their own name.
        cut = "stages" if run.plan.features == "stages" else "pooled"
        return {
            "train": self._train_views(run.plan, make_net, key, cut),
            "validation": self._cached(make_net, key, run.plan, "validation", cut),
        }

    def _train_views(
        self, plan: TrialPlan, make_net, key: str, cut: str = "pooled"
    ) -> np.ndarray | list[np.ndarray]:
        """The train split's cached outputs: one array, or with augmentation a list of the
        plan's views (view 0 is the images themselves, shared with un-augmented trials; the
        others are cached per policy, seed and index, so 8 views reuse 4)."""
        views = [
            self._cached(make_net, key, plan, "train", cut, view)
            for view in range(plan.augment_views)
        ]
        if plan.augment_views > 1:
            where = "cached views" if cut in FEATURE_CUTS else f"cached views at {cut}"
            self._augment_path(plan, f"{where} ({plan.augment_views})")
        return views if len(views) > 1 else views[0]

    def _fingerprint(self, base: keras.Model) -> str:
        """:func:`features.weights_fingerprint` of ``base``, computed once for the shared
        frozen backbone (its weights never change)."""
        shared = self._frozen_backbone is not None and self._frozen_backbone[1] is base
        if shared and self._frozen_fingerprint and self._frozen_fingerprint[0] is base:
            return self._frozen_fingerprint[1]
        key = features.weights_fingerprint(base)
        if shared:
            self._frozen_fingerprint = (base, key)
        return key


def _entry_size(net: keras.Model) -> int:
    """Values of one image's entry of ``net``'s (first) output."""
    shape = net.output_shape[0] if isinstance(net.output_shape, list) else net.output_shape
    return math.prod(int(d) for d in shape[1:])
