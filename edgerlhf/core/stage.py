"""Plumbing every stage shares: command-line config, the run folder, seeding and the record."""
from __future__ import annotations

import argparse
import functools
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEFAULT_PROFILE, PROFILES, SET_HELP, Config, load_config, parse_cli_sets, validate
from .distributed import main_process_writes, process_info
from .hardware import resolve_device
from .logs import configure_logging
from .memory import apply_vram_budget, available_device_mib, measure
from .paths import resolve
from .records import create_run_dir, current_run, make_record, point_current_run, write_record
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

    def path(self, relative: str) -> Path:
        """Resolve a config path against the project root."""
        return resolve(relative, self.root)


def begin(cfg: Config, starts_run: bool = False, distributed: bool = False) -> StageContext:
    """Validate the config, seed everything, resolve the device, apply the VRAM budget and find or create
    the run folder.

    With ``cfg.run.run_dir`` None, the stage joins the *current run*: the folder named by
    ``results/current_run.json`` (:func:`edgerlhf.core.records.current_run`), so notebooks run by hand in order
    share one run folder as they do under papermill. A stage that ``starts_run`` (00_Setup), or any stage
    when there is no current run, creates a new ``results/runs/<run_id>`` and makes it current. The folder
    is written back into ``cfg`` so the record names it.

    Only a stage that is ``distributed`` (SFT and reward training, whose library trainers shard the work) may
    run in several processes under ``accelerate launch``; its files are written by the main process alone.

    Raises:
        ValueError: a config value out of range (:func:`edgerlhf.core.config.validate`), or a current-run
            pointer that is damaged or names a deleted folder; nothing is written.
        RuntimeError: several processes run a stage that is not ``distributed``.
    """
    validate(cfg)  # also a Config built or changed in code, not only through load_config
    configure_logging(cfg.run.log_level)
    processes = process_info()["num_processes"]
    if processes > 1 and not distributed:
        raise RuntimeError(f"this stage runs in one process, not {processes}: start it with python -m, not "
                           "accelerate launch (only edgerlhf.sft_finetuning and edgerlhf.reward_modeling shard "
                           "their training)")
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    root = resolve(cfg.run.root)
    if cfg.run.run_dir is None:  # under accelerate launch the main process decides, the others join it
        run_dir = main_process_writes(join_or_start_run, root / "results", cfg.profile, starts_run)
        cfg.run.run_dir = str(run_dir)
    else:
        run_dir = resolve(cfg.run.run_dir, root)
        run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.run.device)
    budget = apply_vram_budget(cfg.run.vram_budget_gib, device)
    ctx = StageContext(cfg=cfg, root=root, run_dir=run_dir, device=device, budget=budget)
    _BEGUN.append(ctx)
    return ctx


def join_or_start_run(results: Path, profile: str, starts_run: bool) -> Path:
    """The current run folder under ``results`` (:func:`edgerlhf.core.records.current_run`), or, when
    ``starts_run`` or there is none, a new ``results/runs/<run_id>`` made current.

    Raises:
        ValueError: the current-run pointer is damaged or names a deleted folder.
    """
    run_dir = None if starts_run else current_run(results)
    if run_dir is None:
        run_dir = create_run_dir(results, profile)
        point_current_run(results, run_dir)
    return run_dir


#: Contexts begun inside the stage functions now running (innermost last), for :func:`recorded`.
_BEGUN: list[StageContext] = []


def recorded(stage: str):
    """Decorator for a stage's run function ``fn(cfg, ...)``: if it raises (any exception, KeyboardInterrupt
    included) after :func:`begin`, a record with ``status: "failed"``, the error, the step reached
    (``ctx.step``), the last traceback lines, wall time and peak memory is written to the run folder, then
    the exception propagates unchanged. A failure before :func:`begin` (bad config) writes nothing."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg: Config, *args, **kwargs):
            depth = len(_BEGUN)
            try:
                with measure() as m:
                    return fn(cfg, *args, **kwargs)
            except BaseException as exc:
                if len(_BEGUN) > depth:
                    ctx = _BEGUN[depth]
                    results = {"error": f"{type(exc).__name__}: {exc}", "step": ctx.step,
                               "traceback": traceback.format_exception(exc)[-4:]}
                    record = make_record(stage, ctx.run_dir, ctx.cfg.to_dict(), results, measurement=m,
                                         device=str(ctx.device), status="failed")
                    record["vram_budget"] = ctx.budget
                    write_record(record, ctx.run_dir)
                raise
            finally:
                del _BEGUN[depth:]
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
