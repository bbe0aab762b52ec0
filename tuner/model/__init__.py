"""The model: what a trial builds and how it trains.

Receives a trial's hyperparameters (from :mod:`tuner.engine`); hands on a trained Keras
model, its metrics at the kept epoch, and its checkpoint. Start with
:mod:`tuner.model.hypermodel` (the plan of a trial, :mod:`tuner.model.trial_plan`, and the
model it builds), then the two parts it composes: :mod:`tuner.model.training` (the
``Trainer``: every fit path) and :mod:`tuner.model.caching` (the ``FeatureStore``: cached
backbone features and activations, with :mod:`tuner.model.features`), the splits
(:mod:`tuner.model.splits`), :mod:`tuner.model.head`,
:mod:`tuner.model.backbones` (the backbone table), :mod:`tuner.model.space` (the search-space
files the hypermodel declares), :mod:`tuner.model.augment`, :mod:`tuner.model.accelerate`,
:mod:`tuner.model.disk` (the cache budget), :mod:`tuner.model.checkpoint` and
:mod:`tuner.model.measure` (latency, size). Imports neither :mod:`tuner.engine` nor
:mod:`tuner.report`.
"""
