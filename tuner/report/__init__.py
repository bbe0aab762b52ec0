"""Results and reports: what the trials measured, which model to ship, and the files a user gets.

Receives trial records (from :mod:`tuner.engine`) and the models of :mod:`tuner.model`; hands
on trials.csv, the leaderboard and pareto.png, the W&B runs, and ``best/`` (the chosen model,
its test metrics, its model card). Start with :mod:`tuner.report.results` (trials.csv), then
:mod:`tuner.report.choose` (the Pareto front and the rules), :mod:`tuner.report.export`
(``export_best``'s work, with :mod:`tuner.report.rebuild` and :mod:`tuner.report.evaluate`),
:mod:`tuner.report.card`, :mod:`tuner.report.quantize` (LiteRT variants),
:mod:`tuner.report.wandb_log`, and the quality benchmark's :mod:`tuner.report.baselines` and
:mod:`tuner.report.quality`. Uses :mod:`tuner.model`; never imports :mod:`tuner.engine`.
"""
