"""Stages 0-4: Logging and progress bars: the ``edgerlhf`` loggers at ``run.log_level``, each stage's log file
``<run folder>/logs/<stage>.log``, libraries' warnings kept out of notebooks, tqdm bars shown at INFO, and the
opt-in live curves of ``run.report_to`` (TensorBoard)."""
from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path
from typing import Iterable

ROOT = "edgerlhf"

#: Loggers of the libraries (and Python's ``warnings``, as ``py.warnings``) that :func:`quiet_libraries` sends to
#: the stage's log file: transformers' load reports, bitsandbytes' kernel notices, deprecation warnings.
LIBRARY_LOGGERS = ("py.warnings", "transformers", "datasets", "huggingface_hub", "accelerate", "peft", "trl",
                   "bitsandbytes", "torch")

_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
#: Holds records until a stage names its log file (:func:`log_to_file`), then passes each one on at once.
_RUN_LOG = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
_CONSOLE = logging.StreamHandler()
_CONSOLE.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def configure_logging(level: str) -> logging.Logger:
    """Set the ``edgerlhf`` loggers to ``level`` (``run.log_level``: DEBUG, INFO, WARNING or ERROR), send them to
    the stage's log file (:func:`log_to_file`) and give them one handler writing ``LEVEL name: message`` to stderr,
    unless the application configured a handler of its own (then records propagate to it)."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    if _RUN_LOG not in logger.handlers:
        logger.addHandler(_RUN_LOG)
    if _CONSOLE not in logger.handlers and not logging.getLogger().handlers:
        logger.addHandler(_CONSOLE)
    return logger


def quiet_libraries(notebook: bool = False) -> None:
    """Keep library output out of what a person reads: Python warnings and the :data:`LIBRARY_LOGGERS` go to the
    stage's log file only (held in memory until a stage names it), and the progress bars of transformers,
    datasets and huggingface_hub are off. With ``notebook``, the ``edgerlhf`` loggers also show only warnings and
    errors in the notebook (everything at ``run.log_level`` still reaches the log file). Idempotent; the
    notebooks call it first, stage command lines before they parse their flags."""
    logging.captureWarnings(True)

    def route():
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers[:] = [_RUN_LOG]
            logger.propagate = False

    route()  # before the imports below, which warn (tqdm in a kernel without ipywidgets)
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    for library in (transformers_logging, datasets.utils.logging, huggingface_hub.utils.logging):
        library.get_logger()  # each library adds its own stderr handler on first use: let it, then replace it
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    route()
    if notebook:
        _CONSOLE.setLevel(logging.WARNING)


def log_to_file(path: str | Path) -> Path:
    """Append from now on every ``edgerlhf`` record and every library record routed by :func:`quiet_libraries`
    (with those held since) to ``path`` (created with its folder), closing the previous stage's file. Returns
    ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_FORMAT)
    previous = _RUN_LOG.target
    _RUN_LOG.acquire()
    try:
        _RUN_LOG.setTarget(handler)
        _RUN_LOG.flushLevel = logging.NOTSET  # from now on each record is written as it comes
    finally:
        _RUN_LOG.release()
    _RUN_LOG.flush()
    if previous is not None:
        previous.close()
    return path


def progress(iterable: Iterable | None = None, min_total: int = 1, **kwargs):
    """A text tqdm progress bar over ``iterable`` (no widget: a saved notebook keeps its last line), shown when
    the ``edgerlhf`` loggers are at INFO or below and the bar has at least ``min_total`` steps (short loops,
    such as scoring one PPO batch, stay quiet). ``kwargs`` go to ``tqdm`` (``total``, ``desc``, ``unit``...)."""
    from tqdm import tqdm

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
