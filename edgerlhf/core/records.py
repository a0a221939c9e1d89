"""The runner, every stage and the report: Run records: one JSON file per run and stage, written atomically and never
overwritten.

Shape (the research plan's, extended)::

    {"experiment_id", "run_id", "stage", "date", "status", "profile",
     "model_config", "training_config", "results", "data", "seed",
     "hardware", "software", "wall_time_s", "peak_memory", "config"}
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .distributed import process_info
from .files import atomic_write_text
from .hardware import hardware_report
from .lock import pid_alive

if TYPE_CHECKING:
    import pandas as pd

SOFTWARE = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "papermill", "numpy")


def software_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries the pipeline uses (None for one not installed).

    torch is given as ``torch.__version__``, the build that runs, with its local tag (``2.13.0+cpu``,
    ``2.13.0+cu130``): PyPI's Linux wheels carry the CUDA tag only there, not in the distribution version.
    """
    import torch

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            out[name] = torch.__version__ if name == "torch" else importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def new_run_id(profile: str, now: dt.datetime | None = None) -> str:
    """A run id ``YYYYmmdd-HHMMSS-<profile>`` in UTC."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{profile}"


def create_run_dir(results_dir: str | Path, profile: str) -> Path:
    """Create and return a new, empty ``results_dir/runs/<run_id>`` (suffix ``-2``, ``-3``... on a clash)."""
    base = Path(results_dir) / "runs"
    base.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id(profile)
    for n in range(1, 1000):
        candidate = base / (run_id if n == 1 else f"{run_id}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a fresh run folder under {base}")


#: The pointer to the current run folder, under ``results/``: written when a run starts (00_Setup, or the
#: papermill runner), read by every later stage whose ``run.run_dir`` is None.
CURRENT_RUN = "current_run.json"


def point_current_run(results_dir: str | Path, run_dir: str | Path) -> Path:
    """Make ``run_dir`` the current run of ``results_dir`` (atomically; a run folder of this project)."""
    text = json.dumps({"run_dir": str(Path(run_dir).resolve())}, indent=2) + "\n"
    return atomic_write_text(Path(results_dir) / CURRENT_RUN, text)


def current_run(results_dir: str | Path) -> Path | None:
    """The run folder the pointer under ``results_dir`` names, or None when there is no pointer.

    Raises:
        ValueError: the pointer is not valid JSON with a ``run_dir`` (the message names the file), or it
            names a folder that no longer exists (say which, and how to start a new run).
    """
    path = Path(results_dir) / CURRENT_RUN
    if not path.exists():
        return None
    try:
        run_dir = Path(json.loads(path.read_text(encoding="utf-8"))["run_dir"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a run pointer ({{\"run_dir\": ...}}): {exc}; delete it or run "
                         "00_Setup.ipynb to start a new run") from exc
    if not run_dir.is_dir():
        raise ValueError(f"{path} points to {run_dir}, which does not exist; run 00_Setup.ipynb to start a new "
                         "run, or set run.run_dir")
    return run_dir


def read_manifest(run_dir: str | Path) -> dict | None:
    """``run_dir/manifest.json`` (written by the papermill runner), or None when the run has none.

    A damaged manifest is reported with a warning naming the file and read as ``{"status": "damaged"}``, so one
    bad file in an old run never stops a later one.
    """
    path = Path(run_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logging.getLogger(__name__).warning("%s: damaged run manifest, skipped (%s)", path, exc)
        return {"status": "damaged"}
    if not isinstance(manifest, dict):
        logging.getLogger(__name__).warning("%s: damaged run manifest (not an object), skipped", path)
        return {"status": "damaged"}
    return manifest


def run_finished(run_dir: str | Path) -> bool:
    """True when ``run_dir`` must not be written into again: it has a ``REPORT.md``, or a runner's manifest that
    no longer says ``running`` (ok, failed, or damaged) or whose runner (``pid`` on this ``host``) is dead."""
    manifest = read_manifest(run_dir)
    if (Path(run_dir) / "REPORT.md").exists():
        return True
    if manifest is None:
        return False
    dead = manifest.get("host") == socket.gethostname() and not pid_alive(manifest.get("pid"))
    return manifest.get("status") != "running" or dead


def make_record(
    stage: str,
    run_dir: str | Path,
    config: dict,
    results: dict,
    *,
    model_config: dict | None = None,
    training_config: dict | None = None,
    data: dict | None = None,
    measurement: dict | None = None,
    device: str = "auto",
    status: str = "ok",
) -> dict:
    """Assemble a record for ``stage``; ``config`` is :meth:`edgerlhf.core.config.Config.to_dict` output.

    ``measurement`` is the dict filled by :func:`edgerlhf.core.memory.measure`; its
    ``wall_time_s`` becomes the record's wall time and the rest its ``peak_memory``.
    """
    run_id = Path(run_dir).name
    measurement = dict(measurement or {})
    wall = measurement.pop("wall_time_s", None)
    return {
        "experiment_id": f"{run_id}/{stage}",
        "run_id": run_id,
        "stage": stage,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "status": status,
        "profile": config.get("profile"),
        "model_config": model_config or {},
        "training_config": training_config or {},
        "results": results,
        "data": data or {},
        "seed": config.get("run", {}).get("seed"),
        "python_hash_seed": os.environ.get("PYTHONHASHSEED"),  # str hashing's seed at start-up; None: random
        "hardware": hardware_report(device),
        "software": software_versions(),
        "processes": process_info(),  # how many processes ran the stage (accelerate launch), and which wrote
        "command": sys.argv[:1],
        "wall_time_s": wall,
        "peak_memory": measurement,
        "config": config,
    }


def write_record(record: dict, run_dir: str | Path) -> Path:
    """Write ``record`` to ``run_dir/records/<stage>.json`` atomically; never overwrite.

    If that file exists (the stage was run again in the same run folder) the record goes
    to ``<stage>.2.json``, ``<stage>.3.json``... Returns the path written.
    """
    folder = Path(run_dir) / "records"
    text = json.dumps(record, indent=2, sort_keys=False, default=str) + "\n"
    for n in range(1, 10_000):
        path = folder / (f"{record['stage']}.json" if n == 1 else f"{record['stage']}.{n}.json")
        try:
            return atomic_write_text(path, text, overwrite=False)
        except FileExistsError:
            continue
    raise FileExistsError(f"too many records for stage {record['stage']!r} in {folder}")


def read_record(path: str | Path) -> dict:
    """Load one record.

    Raises:
        ValueError: the file is not valid JSON or lacks ``stage``/``results`` (message names the file).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from exc
    for key in ("stage", "results"):
        if key not in record:
            raise ValueError(f"{path}: record has no field {key!r}")
    return record


def _order(path: Path) -> tuple:
    """Sort key: run folder, stage, then repeat number (``data.json`` before ``data.2.json``)."""
    stage, _, n = path.stem.partition(".")
    return (str(path.parent), stage, int(n) if n.isdigit() else 1)


def record_paths(run_dirs: Iterable[str | Path]) -> list[Path]:
    """All record files of the given run folders, in run, stage and repeat order."""
    return sorted((p for d in run_dirs for p in (Path(d) / "records").glob("*.json")), key=_order)


def load_records(run_dirs: Iterable[str | Path] | str | Path) -> pd.DataFrame:
    """Load the records of one or several run folders into one flat table (one row per record).

    Nested fields become dotted columns (``results.n_train``, ``hardware.device``); the
    full ``config`` is left out to keep the table readable.
    """
    import pandas as pd  # here, not at module level: a stage writing records need not hold pandas in memory

    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    rows: list[dict[str, Any]] = []
    for path in record_paths(run_dirs):
        record = read_record(path)
        record.pop("config", None)
        record["record_file"] = str(path)
        rows.append(record)
    return pd.json_normalize(rows) if rows else pd.DataFrame()


STAGE_ORDER = ("setup", "data", "sft", "reward", "ppo")


def newest_records(run_dir: str | Path) -> dict[str, dict]:
    """The newest record of every stage found in ``run_dir/records`` (``sft.2.json`` wins over
    ``sft.json``), keyed by stage in pipeline order.

    Raises:
        ValueError: a record file is not valid JSON (from :func:`read_record`).
    """
    newest: dict[str, dict] = {}
    for path in record_paths([run_dir]):  # sorted so that repeats come after the first record
        newest[path.stem.partition(".")[0]] = read_record(path)
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    return {stage: newest[stage] for stage in sorted(newest, key=lambda s: (rank.get(s, len(rank)), s))}


def memory_rows(records: dict[str, dict]) -> list[dict]:
    """Peak memory (MiB) of each stage's record, one dict per stage: ``stage``, ``device``,
    ``cpu_peak_rss_mib``, ``cuda_peak_allocated_mib``, ``cuda_peak_reserved_mib`` (None without
    CUDA), ``budget_gib`` and ``budget_applied`` (the VRAM cap the stage ran under)."""
    rows = []
    for stage, record in records.items():
        m, budget = record.get("peak_memory") or {}, record.get("vram_budget") or {}
        rows.append({"stage": stage, "device": m.get("device"), "cpu_peak_rss_mib": m.get("cpu_peak_rss_mib"),
                     "cuda_peak_allocated_mib": m.get("cuda_peak_allocated_mib"),
                     "cuda_peak_reserved_mib": m.get("cuda_peak_reserved_mib"),
                     "budget_gib": budget.get("budget_gib"), "budget_applied": budget.get("applied")})
    return rows


def stage_memory(run_dir: str | Path) -> list[dict]:
    """:func:`memory_rows` of every stage recorded so far in ``run_dir``, in pipeline order."""
    return memory_rows(newest_records(run_dir))
