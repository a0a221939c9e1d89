"""The runner (README's first command): run the notebooks 00 -> 04 in order with papermill into one run folder.

    python -m edgerlhf.run --profile quick              # the whole pipeline
    python -m edgerlhf.run --profile tiny --only 00,01  # a subset
    python -m edgerlhf.run --profile quick --set data.n_train=256

Executed notebooks go to ``results/runs/<run_id>/notebooks/`` (each also as HTML), stage records to
``.../records/``, figures to ``.../figures/``, ``manifest.json`` lists what ran, and a whole
run ends with ``REPORT.md`` (and ``report_figures/``) built from the records.
The run stops at the first failing notebook and names it and the failing cell.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .core.config import DEFAULT_PROFILE, PROFILES, SET_HELP, load_config, parse_cli_sets
from .core.files import atomic_write_text
from .core.paths import REPO_ROOT, resolve
from .core.lock import ProjectBusyError, ProjectLock, pid_alive
from .core.records import create_run_dir, point_current_run, read_manifest

NOTEBOOKS = [
    "00_Setup.ipynb",
    "01_Data_Preparation.ipynb",
    "02_SFT_Finetuning.ipynb",
    "03_Reward_Modeling.ipynb",
    "04_PPO_Alignment.ipynb",
]


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


class ReportFailed(RuntimeError):
    """Every notebook ran but ``REPORT.md`` could not be built; the message names the run and the error."""


def select(only: str | None) -> list[str]:
    """Notebooks to run: all, or those whose two-digit prefix is in ``only`` (``"00,01"``).

    Raises:
        ValueError: a prefix that matches no notebook.
    """
    if not only:
        return list(NOTEBOOKS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(nb.startswith(w.zfill(2) + "_") for nb in NOTEBOOKS)]
    if unknown:
        raise ValueError(f"--only: no notebook starts with {unknown}; choose from {[nb[:2] for nb in NOTEBOOKS]}")
    return [nb for nb in NOTEBOOKS if nb[:2] in {w.zfill(2) for w in wanted}]


def git_commit() -> str | None:
    """The checkout's commit hash, or None outside a git checkout."""
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_manifest(run_dir: Path, manifest: dict) -> None:
    """Write ``run_dir/manifest.json`` atomically (the previous version stays whole until replaced)."""
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def mark_abandoned(results_dir: Path) -> list[Path]:
    """Mark as failed every manifest under ``results_dir/runs`` that still says ``running`` although its
    runner (``pid`` on this ``host``) no longer exists: a runner killed by SIGKILL or the OOM killer cannot
    write its own ending. A damaged manifest is skipped with a warning naming it
    (:func:`edgerlhf.core.records.read_manifest`). Returns the manifests changed."""
    changed = []
    for path in sorted((results_dir / "runs").glob("*/manifest.json")):
        manifest = read_manifest(path.parent)
        if manifest.get("status") != "running" or manifest.get("host") != socket.gethostname():
            continue
        if pid_alive(manifest.get("pid")):
            continue
        manifest["status"] = "failed"
        manifest["error"] = f"interrupted: runner process {manifest.get('pid')} ended without writing its status"
        for entry in manifest.get("notebooks", []):
            if entry.get("status") == "running":
                entry.update(status="failed", error="interrupted")
        manifest["marked_failed"] = _now()
        write_manifest(path.parent, manifest)
        changed.append(path)
    return changed


def run_notebooks(
    profile: str | None,
    only: str | None = None,
    overrides: dict | None = None,
    root: str | Path = ".",
    run_dir: str | Path | None = None,
    progress: bool = True,
    config_file: str | Path | None = None,
) -> Path:
    """Execute the selected notebooks with papermill; returns the run folder.

    Each notebook's ``parameters`` cell receives ``profile``, ``root``, ``run_dir``, ``overrides``
    (dotted config keys) and ``config_file`` (a JSON/YAML file, applied before the overrides); the
    config they make is checked first. ``manifest.json`` is written before the first notebook
    (``status: "running"``, the runner's ``pid`` and ``host``) and rewritten after every notebook and
    on every way out: ``ok``, or ``failed`` with the error (a notebook's exception, a dead kernel,
    KeyboardInterrupt, SIGTERM). Runs left ``running`` by a runner that was killed outright are marked
    ``failed`` by the next run (:func:`mark_abandoned`). When all five notebooks ran, ``REPORT.md`` is
    built in the run folder (:mod:`edgerlhf.report`).

    Raises:
        NotebookFailed: a notebook raised or its kernel died; earlier notebooks' outputs are kept.
        ReportFailed: every notebook ran, but the report could not be built.
        ProjectBusyError: another run holds the project folder (:class:`edgerlhf.core.lock.ProjectLock`); nothing
            is written.
        FileExistsError: ``run_dir`` exists and is not empty (a finished or running run is never written into).
        FileNotFoundError: ``config_file`` does not exist. ValueError, KeyError, TypeError: it, the profile or
            an override is invalid (checked before anything is written, by :func:`edgerlhf.core.config.load_config`).
    """
    root = resolve(root)
    selected = select(only)
    if config_file is not None:
        config_file = resolve(config_file)
        if not config_file.is_file():
            raise FileNotFoundError(f"--config {config_file}: no such file")
    # bad input fails here, before any folder; profile None: the config file's, else the default profile
    profile = load_config(profile, config_file, overrides=overrides or {}).profile
    lock = ProjectLock(root / "results", f"edgerlhf.run --profile {profile}")
    lock.acquire()  # one run at a time: a second refuses here, having written nothing
    try:
        if lock.abandoned:  # a stage run on its own was killed holding the lock: record its failure
            from .core.stage import record_abandoned

            record_abandoned(root / "results", lock.abandoned)
        return _run(lock, selected, profile, overrides, root, run_dir, progress, config_file)
    finally:
        lock.release()


def _run(lock: ProjectLock, selected: list[str], profile: str, overrides: dict | None, root: Path,
         run_dir: str | Path | None, progress: bool, config_file: Path | None) -> Path:
    """:func:`run_notebooks` once the project lock is held."""
    import papermill as pm
    from tqdm import tqdm
    from traitlets.config import Config

    if run_dir:
        run_dir = resolve(run_dir, root)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"--run-dir {run_dir} exists and is not empty; a run folder is never written "
                                  "into twice (choose a new folder, or leave --run-dir out)")
    mark_abandoned(root / "results")
    manifest = {
        "run_id": None, "profile": profile, "overrides": overrides or {}, "root": str(root),
        "started": _now(), "git_commit": git_commit(), "python": sys.executable, "pid": os.getpid(),
        "host": socket.gethostname(), "status": "running", "notebooks": [],
    }
    if run_dir:
        existed = run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        existed, run_dir = False, create_run_dir(root / "results", profile)
    try:  # a run that cannot start leaves no folder behind and does not become the current run
        manifest["run_id"] = run_dir.name
        (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
        write_manifest(run_dir, manifest)
    except BaseException as exc:
        if existed:
            shutil.rmtree(run_dir / "notebooks", ignore_errors=True)
        else:
            shutil.rmtree(run_dir)
        if isinstance(exc, OSError):  # say what was being done
            raise type(exc)(exc.errno, f"could not start the run in {run_dir} (removed again): {exc.strerror}") from exc
        raise
    lock.update(run_dir.name)
    os.environ.setdefault("PYTHONHASHSEED", "0")  # read at start-up by the kernels below, not by this process
    manifest["python_hash_seed"] = os.environ["PYTHONHASHSEED"]
    point_current_run(root / "results", run_dir)  # notebooks opened by hand afterwards join this run
    parameters = {"profile": profile, "root": str(root), "run_dir": str(run_dir), "overrides": overrides or {},
                  "config_file": str(config_file) if config_file else None}
    for name in tqdm(selected, desc="notebooks", unit="nb", disable=not progress):
        entry = {"notebook": name, "output": str(run_dir / "notebooks" / name), "status": "running"}
        manifest["notebooks"].append(entry)
        write_manifest(run_dir, manifest)
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                str(REPO_ROOT / name), entry["output"], parameters=parameters, cwd=str(root),
                progress_bar=progress, kernel_name="python3",
                coalesce_streams=True,  # a progress bar is saved as its last line, not as every redraw
                config=Config({"KernelManager": {"transport": "ipc"}}),  # local sockets: no network, no TCP warning
            )
        except BaseException as exc:  # recorded, then re-raised: nothing is swallowed
            if isinstance(exc, pm.PapermillExecutionError):
                error, where = f"cell {exc.exec_count}: {exc.ename}: {exc.evalue}", " at "
            else:  # a dead kernel (nbclient DeadKernelError), KeyboardInterrupt, SIGTERM (SystemExit)...
                error, where = f"{type(exc).__name__}: {exc}", ": "
            entry.update(status="failed", seconds=round(time.perf_counter() - start, 1), error=error)
            manifest.update(status="failed", finished=_now())
            write_manifest(run_dir, manifest)
            if isinstance(exc, Exception):
                raise NotebookFailed(f"{name} failed{where}{error} (executed copy: {entry['output']})") from exc
            raise
        entry.update(status="ok", seconds=round(time.perf_counter() - start, 1),
                     html=str(export_html(Path(entry["output"]))))
        write_manifest(run_dir, manifest)
    manifest["status"] = "ok"
    manifest["finished"] = _now()
    write_manifest(run_dir, manifest)
    if selected == NOTEBOOKS:  # a whole run: its report, from the records just written
        from .report import build_report

        try:
            build_report(run_dir)
        except (OSError, ValueError) as exc:  # said with what was being done, then raised
            raise ReportFailed(f"all notebooks ran, but building the report of {run_dir} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    return run_dir


def export_html(notebook: Path) -> Path:
    """Write the executed ``notebook`` as ``<name>.html`` beside it (nbconvert's HTML exporter, the classic
    template; figures are embedded), so a run can be read without Jupyter. Returns the HTML file's path."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="classic").from_notebook_node(nbformat.read(notebook, as_version=4))
    html = notebook.with_suffix(".html")
    atomic_write_text(html, body)
    return html


def _terminate(signum, frame):
    """SIGTERM handler: raise SystemExit so that the manifest records the failure on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 ok, 1 a notebook failed)."""
    parser = argparse.ArgumentParser(description="Run the EdgeRLHF notebooks with papermill.")
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES),
                        help=f"the profile to start from (default: the config file's, else {DEFAULT_PROFILE})")
    parser.add_argument("--config", default=None, help="JSON or YAML config file, applied after the profile")
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,01")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    parser.add_argument("--root", default=".", help="project root holding data/, models/, results/")
    parser.add_argument("--run-dir", default=None, help="run folder (default: a new results/runs/<run_id>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        run_dir = run_notebooks(args.profile, args.only, parse_cli_sets(args.set), args.root, args.run_dir,
                                progress=not args.no_progress, config_file=args.config)
    except (NotebookFailed, ReportFailed, ProjectBusyError, OSError, KeyError, TypeError, ValueError) as exc:
        print(f"edgerlhf.run: {exc}", file=sys.stderr)
        return 1
    print(f"edgerlhf.run: done; results in {run_dir}" + (f"; report: {run_dir / 'REPORT.md'}"
                                                            if (run_dir / "REPORT.md").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
