"""effnet-tuner: a budgeted Keras Tuner search over EfficientNet transfer-learning classifiers.

The Python API (:mod:`tuner.api`)::

    import tuner

    found = tuner.search("label.csv", images="images/", budget="20m")
    found.trials, found.front
    model = found.export()                  # -> tuner.Model (results/<name>/best)
    model.predict("photos/")

``tuner.search`` is also the command's module (``python -m tuner.search``); calling it runs
:func:`tuner.api.search`. Inside, the stage packages: ``engine/`` (budget, oracle, trials),
``model/`` (hypermodel, backbones, caches), ``report/`` (results, choice, export).
"""

from importlib import metadata as _metadata

from data_tools.errors import InputError
from tuner.api import Model, Search, load

try:
    __version__ = _metadata.version("effnet-tuner")
except _metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
    __version__ = "0+unknown"

__all__ = ["InputError", "Model", "Search", "__version__", "load", "search"]


def __getattr__(name: str):
    # tuner.search is imported on first use, not here: python -m tuner.search runs the module
    # as __main__, and runpy warns when the package has imported it already.
    if name == "search":
        import importlib

        return importlib.import_module("tuner.search")
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
