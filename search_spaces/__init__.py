"""The search spaces that ship with effnet-tuner, installed as ``tuner.search_spaces``
(``importlib.resources``); copy one to start your own."""
