"""What the hypermodel keeps on disk between trials: backbone features and activations.

:class:`FeatureStore` is the part of :class:`~tuner.model.hypermodel.EffNetHyperModel` that
keeps them: which trials train on cached arrays, the cache files (keyed by the backbone's
weights, size, cut and augmented view), the passes that fill them (and the passes planned
ahead for other feature sets), and room on disk (:mod:`tuner.model.disk`: least recently
read entries are evicted first; what does not fit is computed again, and named in the
trial's cache notes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import keras_tuner as kt
import numpy as np

from tuner.model import augment as augment_mod
from tuner.model import backbones, disk, features

if TYPE_CHECKING:
    from tuner.model.splits import SplitData
    from tuner.model.trial_plan import FitFacts, TrialPlan


# Cached features or activations up to this size (as float32) are trained on in memory
# (under the 2 GB limit of a tensor in a tf.data graph).
IN_MEMORY_BYTES = 1024**3
# Augmented views of the activations at a fine-tune's cut are cached up to this size on disk
# (float32, every view of the train split); beyond it the fine-tune augments end to end.
VIEW_CACHE_MAX_BYTES = 8 * 1024**3
# The cache names of a backbone's own outputs (the pooled top, or the stage features beside
# it), as against its activations at a fine-tune's cut (named by the cut layer).
FEATURE_CUTS = ("pooled", "stages")


class FeatureStore:
    """The feature and activation caches of a search's train and validation splits.

    ``pass_batch(entry)`` gives the batch of a backbone's forward passes. The search sets
    :attr:`planned` (the feature sets whose passes come with any plain pass over the files),
    :attr:`cut_fractions` (whose cuts' activations come with them) and :attr:`disk` (the
    cache folder's budget; None: no limit). Every call that may read, compute or evict takes
    the fit's :class:`~tuner.model.trial_plan.FitFacts`, where it says what it did."""

    def __init__(
        self,
        data: SplitData,
        seed: int,
        weights: str | None,
        pass_batch: Callable[[backbones.Backbone], int],
        enabled: bool = True,
    ) -> None:
        self.data = data
        self.seed = seed  # of augmented views
        self.weights = weights  # of the backbones a pass ahead builds
        self.pass_batch = pass_batch
        self.enabled = enabled  # train frozen heads on cached backbone features
        self.planned: list[tuple[str, int, str]] = []  # (backbone, size, top or stages)
        self.cut_fractions: tuple[float, ...] = ()
        self.disk: disk.Budget | None = None
        self._frozen_key: tuple[keras.Model, str] | None = None  # a frozen backbone's

    def uses_cache(self, plan: TrialPlan) -> bool:
        """Phase 1 trains the head on cached features when the backbone is frozen and fixed
        (pretrained weights), caching is on and there is a cache folder."""
        return self.caches(plan.pretrained)

    def caches(self, pretrained: bool) -> bool:
        """:meth:`uses_cache` for a backbone with or without pretrained weights (what a
        plan is made from)."""
        return self.enabled and pretrained and self.data.cache_dir is not None

    def activations_fit(
        self, model: keras.Model, plan: TrialPlan, count: int, facts: FitFacts
    ) -> bool:
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
                target = self.target(
                    plan.backbone, plan.image_size, key, split, cut, view, plan.augment
                )
                if features.load_entry(target, rows) is None:
                    needed += rows * per_image
        if self._room(facts, needed, f"activations at {cut}", self._pixels_of(plan.image_size)):
            return True
        facts.note("so the fine-tune trains end to end")
        return False

    def pixels_cacheable(self, size: int, facts: FitFacts) -> bool:
        """Whether an end-to-end fit reads (or builds) the decoded-pixel cache at ``size``:
        yes unless the budget cannot hold it, then every epoch decodes the files."""
        splits = ("train", "validation")
        missing = [s for s in splits if self.data.cached_pixels(s, size) is None]
        rows = sum(len(self.data.rows(s)) for s in missing)
        if self._room(facts, disk.pixel_bytes(rows, size), f"pixels at {size}px"):
            return True
        facts.note("so they are decoded from the files every epoch")
        return False

    def features(self, model: keras.Model, plan: TrialPlan, facts: FitFacts) -> dict:
        """The train and validation splits' cached features of ``model``'s backbone (pooled,
        or its stage features): one backbone pass per split for the whole search. A paired
        head's are both backbones' side by side, the model's order (each backbone's entries
        are those of its own frozen trials)."""
        own = self._features_of(model, plan, "backbone", facts)
        if not plan.partner:
            return own
        second = plan.partner_plan()
        batch = min(second.pass_batch, self.pass_batch(backbones.get(second.backbone)))
        second = dataclasses.replace(second, pass_batch=batch)  # its own backbone's batch
        other = self._features_of(model, second, "partner", facts)
        return {
            split: np.concatenate([np.asarray(own[split]), np.asarray(other[split])], axis=-1)
            for split in ("train", "validation")
        }

    def _features_of(self, model: keras.Model, plan: TrialPlan, branch: str, facts) -> dict:
        make_net = functools.cache(lambda: features.extractor(model, branch=branch))
        key = self._fingerprint(model.get_layer(branch), plan)
        # Stage features share the backbone's weights (so its fingerprint): their own name.
        cut = "stages" if plan.features == "stages" else "pooled"
        return self.arrays(plan, make_net, key, cut, facts)

    def arrays(
        self,
        plan: TrialPlan,
        make_net: Callable[[], keras.Model],
        key: str,
        cut: str,
        facts: FitFacts,
    ) -> dict:
        """{"train": its cached outputs (a list of views when augmented: :meth:`_train_views`),
        "validation": its cached outputs} of ``make_net()`` (whose weights' fingerprint is
        ``key``) at ``cut``: ``pooled``, ``stages`` or a fine-tune's cut layer."""
        return {
            "train": self._train_views(plan, make_net, key, cut, facts),
            "validation": self._cached(make_net, key, plan, "validation", cut, 0, facts),
        }

    def _cached(
        self,
        make_net,
        weights_key: str,
        plan: TrialPlan,
        split: str,
        cut: str,
        view: int,
        facts: FitFacts,
    ) -> np.ndarray:
        """A split's cached backbone outputs (features, or activations at ``cut``) of the
        part of the backbone whose weights' fingerprint is ``weights_key``; ``view`` > 0:
        of that augmented view of the images (:mod:`tuner.model.augment`).

        When it must be computed, the pass reads the split's cached pixels at this size if
        there are any, else decodes the image files; a plain pass over the files also
        computes the passes planned ahead (:func:`_ahead`), from one decode of each file.
        An entry another process evicts before this one reads it is computed again (once)."""
        size, rows = plan.image_size, len(self.data.rows(split))
        target = self.target(plan.backbone, size, weights_key, split, cut, view, plan.augment)
        found = features.load_entry(target, rows)
        facts.setdefault("cache", []).append("loaded" if found is not None else "computed")
        computed = 0
        while found is None:
            if computed == 2:
                raise kt.errors.FailedTrialError(
                    f"the {split} {cut} outputs of {plan.backbone} {size}px were evicted by "
                    f"another process sharing the cache before this trial could read them, "
                    f"twice: raise --cache-budget"
                )
            self._compute(make_net, plan, split, target, cut, view, facts)
            found = features.load_entry(target, rows)
            computed += 1
        disk.mark_read(target)
        return found

    def _compute(
        self,
        make_net,
        plan: TrialPlan,
        split: str,
        target: Path,
        cut: str,
        view: int,
        facts: FitFacts,
    ) -> None:
        """Write ``target`` (with the passes planned ahead, on a plain pass over the files),
        within the cache budget; its time goes to the trial's pass or ahead seconds."""
        size, rows = plan.image_size, len(self.data.rows(split))
        augment = (
            augment_mod.layer(plan.augment, augment_mod.view_seed(plan.augment, self.seed, view))
            if view
            else None
        )
        what = f"{split} {cut} outputs of {plan.backbone} {size}px"
        nbytes = disk.entry_bytes(rows, _entry_size(make_net()), features.DTYPE().itemsize)
        if not self._room(facts, nbytes, what, self._pixels_of(size), reserve=target):
            raise kt.errors.FailedTrialError(
                f"the cache budget ({disk.format_bytes(self.disk.limit)}) cannot hold the {what}"
                f" even after evicting older entries: raise --cache-budget"
            )
        started = time.monotonic()
        pixels = self.data.cached_pixels(split, size)
        passes = []
        try:
            if pixels is None and cut in FEATURE_CUTS and not view:
                passes = _ahead(self, split, (plan.backbone, size), target, cut, facts)
            if not any(p.target == target for p in passes):
                passes.insert(
                    0, features.feature_pass(make_net(), target, size, plan.pass_batch, augment)
                )
            source = self.data.paths(split) if pixels is None else {size: pixels}
            label = f"{plan.backbone} {size}px {split}" + (f" view {view}" if view else "")
            spent = features.run_passes(source, rows, passes, label)
        finally:
            if self.disk is not None:
                self.disk.release([t for p in passes for t, _ in p.outputs] + [target])
        # What the oracle budgets by: this feature set's pass (its forward and the decoding),
        # apart from the passes computed ahead for other feature sets in the same sweep.
        own = spent.get(target, 0.0) + spent["decode"]
        facts["pass_seconds"] += own
        facts["ahead_seconds"] += max(time.monotonic() - started - own, 0.0)

    def target(
        self,
        backbone: str,
        size: int,
        weights_key: str,
        split: str,
        cut: str = "pooled",
        view: int = 0,
        policy: str = augment_mod.NONE,
    ) -> Path:
        view_key = features.view_name(policy, self.seed, view) if view else ""
        source = self.data.pixel_file(split, size).name
        return features.cache_file(
            self.data.cache_dir, backbone, size, weights_key, split, source, cut, view_key
        )

    def _pixels_of(self, size: int) -> frozenset[Path]:
        return frozenset(self.data.pixel_file(s, size) for s in ("train", "validation"))

    def _room(
        self,
        facts: FitFacts,
        nbytes: int,
        what: str,
        keep: frozenset[Path] = frozenset(),
        reserve: Path | None = None,
    ) -> bool:
        """Whether the cache budget holds ``nbytes`` more (evicting the least recently read
        entries when it must; each eviction noted on the trial line); ``reserve``: the entry
        they are for, reserved until it is written."""
        if self.disk is None:
            return True
        fits, evicted = self.disk.admit(nbytes, keep, reserve)
        for path, size in evicted:
            facts.note(f"evicted {path.parent.name}/{path.name} ({disk.format_bytes(size)})")
        if not fits:
            facts.note(f"{what} ({disk.format_bytes(nbytes)}) over the cache budget")
        return fits

    def _train_views(
        self, plan: TrialPlan, make_net, key: str, cut: str, facts: FitFacts
    ) -> np.ndarray | list[np.ndarray]:
        """The train split's cached outputs: one array, or with augmentation a list of the
        plan's views (view 0 is the images themselves, shared with un-augmented trials; the
        others are cached per policy, seed and index, so 8 views reuse 4)."""
        views = [
            self._cached(make_net, key, plan, "train", cut, view, facts)
            for view in range(plan.augment_views)
        ]
        if plan.augment_views > 1:
            where = "cached views" if cut in FEATURE_CUTS else f"cached views at {cut}"
            facts.augmented(plan, f"{where} ({plan.augment_views})")
        return views if len(views) > 1 else views[0]

    def _fingerprint(self, base: keras.Model, plan: TrialPlan) -> str:
        """:func:`features.weights_fingerprint` of ``base``, computed once for a frozen
        pretrained backbone (its weights never change, and trials share it)."""
        frozen = plan.pretrained and not plan.fine_tunes
        if frozen and self._frozen_key is not None and self._frozen_key[0] is base:
            return self._frozen_key[1]
        key = features.weights_fingerprint(base)
        if frozen:
            self._frozen_key = (base, key)
        return key


def _ahead(
    store: FeatureStore,
    split: str,
    current: tuple[str, int],
    target: Path,
    cut: str,
    facts: FitFacts,
) -> list[features.Pass]:
    """The passes a plain pass over a split's files computes in the same sweep (one decode
    of each file), one forward per (backbone, size): the store's planned features
    (:attr:`FeatureStore.planned`: ``top`` and ``stages``, one forward gives both) and the
    activations at the cuts of :attr:`FeatureStore.cut_fractions`, those not cached yet.
    ``current`` is the one asked for, whose ``cut`` (``pooled`` or ``stages``) goes to
    ``target`` (reserved already, always computed); the rest are reserved in the budget's
    free room, nothing evicted for them, and left for later when they do not fit."""
    rows = len(store.data.rows(split))
    wanted: dict[tuple[str, int], list[str]] = {current: [cut]}
    for backbone, size, kind in store.planned:
        name = "stages" if kind == "stages" else "pooled"
        if name not in wanted.setdefault((backbone, size), []):
            wanted[(backbone, size)].append(name)
    passes = []
    for (backbone, size), names in wanted.items():  # the one asked for first
        entry = backbones.get(backbone)
        cuts_wanted = bool(store.cut_fractions) and entry.finetunable
        if (backbone, size) == current and names == [cut] and not cuts_wanted:
            continue  # nothing beside the asked entry: the trial's own network's pass
        base = backbones.build(entry, size, store.weights)
        backbones.inference_mode(base)
        key = features.weights_fingerprint(base)
        names = [n for n in names if n == "pooled" or entry.finetunable]
        outputs = {store.target(backbone, size, key, split, n): n for n in names}
        asked = (backbone, size) == current
        if asked and target not in outputs:
            continue  # other weights than the trial's (cannot happen): its own pass
        cuts = _cuts(base, store.cut_fractions) if entry.finetunable else {}
        outputs |= {store.target(backbone, size, k, split, n): n for n, k in cuts.items()}
        missing = {
            t: n for t, n in outputs.items() if t == target or features.load_entry(t, rows) is None
        }
        if not missing:
            continue
        made = _pass_ahead(store, base, entry, size, missing, target if asked else None, rows)
        if made is not None:
            passes.append(made)
        else:
            facts.note(f"{backbone} {size}px not computed ahead for {split} (cache budget)")
    return passes


def _pass_ahead(
    store: FeatureStore,
    base: keras.Model,
    entry: backbones.Backbone,
    size: int,
    outputs: dict[Path, str],
    asked: Path | None,
    rows: int,
) -> features.Pass | None:
    """One forward of a backbone built on its own that writes ``outputs`` ({target: what:
    ``pooled``, ``stages`` or a cut layer's name}), ``asked`` first; the outputs besides
    ``asked`` are reserved in the budget's free room: all of them, else the features
    without the cuts' activations, else ``asked`` alone (None: nothing to compute)."""
    features_only = {t: n for t, n in outputs.items() if n in FEATURE_CUTS}
    for option in (outputs, features_only, {asked: outputs[asked]} if asked else {}):
        if not option:
            continue
        ordered = sorted(option, key=lambda t: t != asked)
        net = features.backbone_extractor(
            base, size, entry.input_scale, [option[t] for t in ordered]
        )
        made = features.feature_pass(
            net, ordered[0], size, store.pass_batch(entry), None, ordered[1:]
        )
        extra = {
            t: disk.entry_bytes(rows, math.prod(shape), made.dtype().itemsize)
            for t, shape in made.outputs
            if t != asked
        }
        if store.disk is None or not extra or store.disk.claim(extra):
            return made
    return None


def _cuts(base: keras.Model, fractions: tuple[float, ...]) -> dict[str, str]:
    """{cut layer name: fingerprint of the weights below it} for each fine-tune fraction
    the search plans (``fractions``) that leaves a frozen bottom."""
    units = len(backbones.blocks(base))
    out = {}
    for fraction in fractions:
        count = backbones.blocks_for_fraction(base, fraction)
        if 0 < count < units:
            layer = features.cut_layer(base, count)
            bottom = keras.Model(base.input, layer.output)
            out[layer.name] = features.weights_fingerprint(bottom)
    return out


def _entry_size(net: keras.Model) -> int:
    """Values of one image's entry of ``net``'s (first) output."""
    shape = net.output_shape[0] if isinstance(net.output_shape, list) else net.output_shape
    return math.prod(int(d) for d in shape[1:])
