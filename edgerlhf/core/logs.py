"""Stages 2-4: Logging and progress bars: the ``edgerlhf`` loggers at ``run.log_level``, tqdm bars shown at INFO, and
the opt-in live curves of ``run.report_to`` (TensorBoard)."""
from __future__ import annotations

import logging
from pathlib import Path
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


#: ``run.report_to`` values: no live curves, or TensorBoard event files under ``<run folder>/tensorboard/``.
REPORT_TO = ("none", "tensorboard")


def tensorboard_writer(report_to: str, run_dir: str | Path, name: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing to ``<run_dir>/tensorboard/<name>`` when ``report_to``
    is ``"tensorboard"``, else None. Watch it live with ``tensorboard --logdir <run_dir>/tensorboard``.

    Raises:
        ValueError: ``report_to`` is not one of :data:`REPORT_TO`.
        ModuleNotFoundError: TensorBoard is not installed (the message names the extra that installs it).
    """
    if report_to not in REPORT_TO:
        raise ValueError(f"run.report_to={report_to!r}: choose one of {REPORT_TO}")
    if report_to == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as exc:  # torch's module needs the tensorboard package: say how to get it
        raise ModuleNotFoundError("run.report_to='tensorboard' needs TensorBoard: "
                                  "EDGERLHF_EXTRAS=dev,tracking bash scripts/setup.sh "
                                  "(or pip install 'edgerlhf[tracking]')") from exc
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / name))


def trainer_callbacks(report_to: str, run_dir: str | Path, name: str) -> list:
    """Callbacks that send a transformers ``Trainer``'s logs (loss, learning rate, eval metrics, under the
    Trainer's names) to ``run.report_to``: transformers' ``TensorBoardCallback`` on :func:`tensorboard_writer`'s
    folder, or none."""
    writer = tensorboard_writer(report_to, run_dir, name)
    if writer is None:
        return []
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=writer)]
