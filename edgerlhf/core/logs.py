"""Logging and progress bars: the ``edgerlhf`` loggers at ``run.log_level``, and tqdm bars shown at INFO."""
from __future__ import annotations

import logging
from typing import Iterable

ROOT = "edgerlhf"


def configure_logging(level: str) -> logging.Logger:
    """Set the ``edgerlhf`` loggers to ``level`` (``run.log_level``: DEBUG, INFO, WARNING or ERROR) and give
    them one handler writing ``LEVEL name: message`` to stderr, unless the application configured a handler of
    its own (then records propagate to it)."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return logger


def progress(iterable: Iterable | None = None, min_total: int = 1, **kwargs):
    """A tqdm progress bar (``tqdm.auto``: a widget in Jupyter, text elsewhere) over ``iterable``, shown when
    the ``edgerlhf`` loggers are at INFO or below and the bar has at least ``min_total`` steps (short loops,
    such as scoring one PPO batch, stay quiet). ``kwargs`` go to ``tqdm`` (``total``, ``desc``, ``unit``...)."""
    from tqdm.auto import tqdm

    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    quiet = not logging.getLogger(ROOT).isEnabledFor(logging.INFO) or (total is not None and total < min_total)
    return tqdm(iterable, disable=quiet, **kwargs)
