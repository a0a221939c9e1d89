"""Every stage module (00_Setup to 04_PPO_Alignment): Plumbing every stage shares: command-line config, the run
folder, seeding and the record."""
from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import DEFAULT_PROFILE, PROFILES, SET_HELP, Config, load_config, parse_cli_sets, validate
from .distributed import is_main_process, main_process_writes, process_info
from .hardware import resolve_device
from .lock import ProjectLock
from .logs import configure_logging, log_to_file, quiet_libraries
from .memory import apply_vram_budget, available_device_mib, measure
from .paths import resolve
from .records import create_run_dir, current_run, make_record, point_current_run, run_finished, write_record
from .reproducibility import seed_everything


@dataclass
class StageContext:
    """What a running stage knows: its config, folders, device and memory budget."""

    cfg: Config
    root: Path
    run_dir: Path
    device: torch.device
    budget: dict
    step: str = "begin"  #: where the stage is, named in its record if it fails (set by the stage as it goes)
    lock: ProjectLock | None = None  #: the project lock this stage took (None inside the runner's hold)

    def path(self, relative: str) -> Path:
        """Resolve a config path against the project root."""
        return resolve(relative, self.root)


def begin(cfg: Config, starts_run: bool = False, distributed: bool = False) -> StageContext:
    """Validate the config, take the project lock, seed everything, resolve the device, apply the VRAM budget
    and find or create the run folder.

    The lock (:class:`edgerlhf.core.lock.ProjectLock` on ``<root>/results``) keeps one run at a time per project
    folder; a stage inside the runner's hold works under it, and a stage run on its own holds it until it ends
    (:func:`recorded` releases it). With ``cfg.run.run_dir`` None, the stage joins the *current run*: the folder
    named by ``results/current_run.json`` (:func:`edgerlhf.core.records.current_run`), so notebooks run by hand in
    order share one run folder as they do under papermill. A stage that ``starts_run`` (00_Setup), or any stage
    when there is no current run or the current run has finished (:func:`edgerlhf.core.records.run_finished`),
    creates a new ``results/runs/<run_id>`` and makes it current: a finished run is never written into. The
    folder is written back into ``cfg`` so the record names it, and checked writable before the stage changes
    anything.
    The stage's log (its ``edgerlhf`` records, and library warnings once
    :func:`edgerlhf.core.logs.quiet_libraries` ran) goes to ``<run folder>/logs/<stage>.log``.

    Only a stage that is ``distributed`` (SFT and reward training, whose library trainers shard the work, and PPO)
    may run in several processes under ``accelerate launch``; its files are written by the main process alone.

    Raises:
        ValueError: a config value out of range (:func:`edgerlhf.core.config.validate`), or a current-run
            pointer that is damaged or names a deleted folder; nothing is written.
        ProjectBusyError: another run holds the project folder (the message names it); nothing is written.
        OSError: the run folder is not writable (:func:`check_writable`); nothing is written.
        RuntimeError: several processes run a stage that is not ``distributed``.
    """
    validate(cfg)  # also a Config built or changed in code, not only through load_config
    configure_logging(cfg.run.log_level)
    processes = process_info()["num_processes"]
    if processes > 1 and not distributed:
        raise RuntimeError(f"this stage runs in one process, not {processes}: start it with python -m, not "
                           "accelerate launch (only edgerlhf.sft_finetuning, edgerlhf.reward_modeling and "
                           "edgerlhf.ppo_alignment shard their training)")
    root = resolve(cfg.run.root)
    stage = _RUNNING[-1] if _RUNNING else None
    lock = ProjectLock(root / "results", f"stage {stage or 'unknown'} on its own", stage)
    main_process_writes(lock.acquire)  # the others work inside the main process's hold
    try:
        main_process_writes(record_abandoned, root / "results", lock.abandoned)
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        if cfg.run.run_dir is None:  # under accelerate launch the main process decides, the others join it
            run_dir = main_process_writes(join_or_start_run, root / "results", cfg.profile, starts_run)
            cfg.run.run_dir = str(run_dir)
        else:
            run_dir = resolve(cfg.run.run_dir, root)
            if run_finished(run_dir):
                raise FileExistsError(f"run.run_dir={run_dir} is a finished run (its manifest.json no longer says "
                                      "running, or it has a REPORT.md) and is never written into: leave run.run_dir "
                                      "unset to start a new run, or name a new folder")
            main_process_writes(run_dir.mkdir, parents=True, exist_ok=True)
        main_process_writes(lock.update, run_dir.name)
        main_process_writes(check_writable, run_dir / "records", run_dir / "figures")
        rank = processes > 1 and process_info()["process_index"]
        log_to_file(run_dir / "logs" / f"{stage or 'stage'}{f'.rank{rank}' if rank else ''}.log")
        device = resolve_device(cfg.run.device)
        from .adapters import use_cpu_bf16  # transformers and bitsandbytes load only once a stage begins
        use_cpu_bf16(cfg.run.cpu_bf16)
        budget = apply_vram_budget(cfg.run.vram_budget_gib, device)
    except BaseException:
        lock.release()
        raise
    ctx = StageContext(cfg=cfg, root=root, run_dir=run_dir, device=device, budget=budget, lock=lock)
    _BEGUN.append(ctx)
    return ctx


def record_abandoned(results: Path, holder: dict | None) -> Path | None:
    """Write a failed record for a stage whose process died holding the project lock (SIGKILL, the OOM killer: no
    ``finally`` ran), from the ``holder`` record it left (:attr:`edgerlhf.core.lock.ProjectLock.abandoned`), into
    its run folder. Returns the record's path; None when ``holder`` is None, was not a stage run on its own (a
    runner's end is recorded in its ``manifest.json`` instead) or names no existing run folder."""
    if not holder or not holder.get("stage") or not holder.get("run_id"):
        return None
    run_dir = results / "runs" / holder["run_id"]
    if not run_dir.is_dir():
        return None
    results_ = {"error": f"interrupted: process {holder.get('pid')} on {holder.get('host')} ended without releasing "
                         "the project lock (killed outright, e.g. SIGKILL or the out-of-memory killer)",
                "step": "unknown (the process was killed before it could record)", "started": holder.get("started")}
    record = make_record(holder["stage"], run_dir, {}, results_, status="failed")
    record["recorded_by"] = "the next run, on taking over the project lock"
    return write_record(record, run_dir)


def check_writable(*folders: Path) -> None:
    """Create each folder if missing and write then delete a probe file in it.

    Raises:
        OSError: a folder cannot be created or written (PermissionError, FileExistsError where a file is in the
            way...; the message names the folder).
    """
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise type(exc)(exc.errno, f"{folder} is not writable ({exc.strerror}); nothing was changed") from None


def join_or_start_run(results: Path, profile: str, starts_run: bool) -> Path:
    """The current run folder under ``results`` (:func:`edgerlhf.core.records.current_run`), or, when
    ``starts_run``, there is none or it has finished, a new ``results/runs/<run_id>`` made current.

    Raises:
        ValueError: the current-run pointer is damaged or names a deleted folder.
    """
    run_dir = None if starts_run else current_run(results)
    if run_dir is None or run_finished(run_dir):
        run_dir = create_run_dir(results, profile)
        point_current_run(results, run_dir)
    return run_dir


#: Contexts begun inside the stage functions now running (innermost last), for :func:`recorded`.
_BEGUN: list[StageContext] = []
#: Names of the :func:`recorded` stages now running (innermost last), for the lock's holder record.
_RUNNING: list[str] = []


def recorded(stage: str):
    """Decorator for a stage's run function ``fn(cfg, ...)``: if it raises (any exception, KeyboardInterrupt
    included) after :func:`begin`, a record with ``status: "failed"``, the error, the step reached
    (``ctx.step``), the whole traceback, wall time and peak memory is written to the run folder, then the
    exception propagates with an attribute ``edgerlhf_failure`` (``{"stage", "step", "record"}``). A failure
    before :func:`begin` (bad config) writes nothing. Either way the project lock :func:`begin` took is released
    on the way out."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg: Config, *args, **kwargs):
            depth = len(_BEGUN)
            _RUNNING.append(stage)
            try:
                with measure() as m:
                    return fn(cfg, *args, **kwargs)
            except BaseException as exc:
                if len(_BEGUN) > depth:
                    ctx = _BEGUN[depth]
                    results = {"error": f"{type(exc).__name__}: {exc}", "step": ctx.step,
                               "traceback": traceback.format_exception(exc)}
                    record = make_record(stage, ctx.run_dir, ctx.cfg.to_dict(), results, measurement=m,
                                         device=str(ctx.device), status="failed")
                    record["vram_budget"] = ctx.budget
                    if is_main_process():  # no barrier here: the other processes may not have failed
                        failure = {"stage": stage, "step": ctx.step, "record": None}
                        try:
                            failure["record"] = str(write_record(record, ctx.run_dir))
                        except OSError as lost:  # said beside the stage's own error, which propagates
                            failure["record_error"] = f"{type(lost).__name__}: {lost}"
                            exc.add_note(f"(its failed record could not be written to {ctx.run_dir}: "
                                         f"{failure['record_error']})")
                        exc.edgerlhf_failure = failure
                raise
            finally:
                for ctx in reversed(_BEGUN[depth:]):
                    if ctx.lock is not None:
                        ctx.lock.release()
                del _BEGUN[depth:]
                _RUNNING.pop()
        return run
    return wrap


def choose_micro_batch(ctx: StageContext, stage: str, model_location: str) -> tuple[Config, dict | None]:
    """The config ``stage`` (``sft`` or ``reward``) should train with: with ``run.auto_micro_batch`` on a CUDA
    device, its micro-batch is the largest that the memory planner fits into the device memory measured now
    (:func:`edgerlhf.core.memory.available_device_mib`, under ``run.vram_budget_gib``) less
    ``run.micro_batch_headroom``, with the effective batch unchanged (:func:`edgerlhf.core.planner.fit_micro_batch`).
    On a CPU, or with the option off, ``ctx.cfg`` is returned unchanged.

    Returns:
        ``(config, choice)``; ``choice`` (None when nothing was chosen) goes into the stage's record: the
        micro-batch and accumulation chosen and configured, the planned peak and the target (MiB).
    """
    from transformers import AutoConfig

    from .adapters import compute_dtype
    from .planner import fit_micro_batch, with_micro_batch

    cfg = ctx.cfg
    available = available_device_mib(ctx.device, cfg.run.vram_budget_gib)
    if not cfg.run.auto_micro_batch or available is None:
        return cfg, None
    compute = "bf16" if compute_dtype(ctx.device) == torch.bfloat16 else "fp32"
    choice = fit_micro_batch(stage, cfg, AutoConfig.from_pretrained(model_location), compute, available,
                             cfg.run.micro_batch_headroom)
    choice["available_mib"] = round(available, 1)
    return with_micro_batch(cfg, choice), choice


def finish(ctx: StageContext, stage: str, results: dict, measurement: dict, **fields) -> Path:
    """Write the stage's run record (see :mod:`edgerlhf.core.records`); returns its path."""
    record = make_record(
        stage, ctx.run_dir, ctx.cfg.to_dict(), results, measurement=measurement, device=str(ctx.device), **fields
    )
    record["vram_budget"] = ctx.budget
    return main_process_writes(write_record, record, ctx.run_dir)  # once, also under accelerate launch


def cli_config(description: str, argv: list[str] | None = None) -> Config:
    """Parse ``--profile``, ``--config FILE`` and repeated ``--set KEY=VALUE`` into a Config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES),
                        help=f"the profile to start from (default: the config file's, else {DEFAULT_PROFILE})")
    parser.add_argument("--config", default=None, help="JSON or YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    args = parser.parse_args(argv)
    return load_config(args.profile, args.config, cli=parse_cli_sets(args.set))


def cli_main(program: str, description: str, run: Callable[[Config], dict], show: Callable[[dict], str],
             argv: list[str] | None = None) -> int:
    """A stage's command line: parse the flags (:func:`cli_config`), ``run`` the stage, print ``show(results)``
    (main process only). A failure prints one line to stderr, naming the step it reached and the failed record
    that holds the whole traceback, instead of a traceback. Returns the exit status: 0 ok, 1 failed, 130
    interrupted (argparse exits with 2 on bad flags)."""
    quiet_libraries()  # library warnings and load reports go to the stage's log file
    try:
        results = run(cli_config(description, argv))
    except (Exception, KeyboardInterrupt) as exc:
        print(f"{program}: {failure_line(exc)}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    if is_main_process():
        print(show(results))
    return 0


def failure_line(exc: BaseException) -> str:
    """One line saying what failed: ``failed at step 'S': Type: message (traceback in RECORD)`` for a stage that
    began, else ``Type: message`` (a config error, refused before anything was written)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    where = getattr(exc, "edgerlhf_failure", None)
    if where is None:
        return text
    kept = (f"traceback in {where['record']}" if where.get("record") else
            f"its failed record could not be written: {where.get('record_error')}")
    return f"stage {where['stage']} failed at step {where['step']!r}: {text} ({kept})"
