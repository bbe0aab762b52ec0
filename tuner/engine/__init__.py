"""Search control: what to train next, within the budget, and running it.

Receives the search's request (data, space, budget) from ``python -m tuner.search``; hands
on trials to the model stage (:mod:`tuner.model`: build and fit) and their records to the
report stage (:mod:`tuner.report`: trials.csv, W&B). Start with :mod:`tuner.engine.session`
(one search, end to end), then :mod:`tuner.engine.oracle` and :mod:`tuner.engine.strategy`
(the ``transfer`` algorithm's decisions, from :mod:`tuner.engine.costmodel`),
:mod:`tuner.engine.trial` (one trial: the budget gate, retries, the record),
:mod:`tuner.engine.folder` (a search's folder before its first trial: data, weights,
config), :mod:`tuner.engine.budget`, :mod:`tuner.engine.plan` (``--dry-run``),
:mod:`tuner.engine.adapter` (Keras Tuner's internals, behind one door) and
:mod:`tuner.engine.distribute` (a chief and workers). Uses ``model`` and ``report``; neither
of them imports it.
"""
