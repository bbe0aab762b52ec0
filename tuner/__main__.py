"""``python -m tuner``: the ``effnet-tuner`` command (:mod:`tuner.cli`)."""

from tuner.cli import main

raise SystemExit(main())
