"""Run the notebooks 00 -> 04 in order with papermill into one run folder.

    python -m edgerlhf.run --profile quick              # the whole pipeline
    python -m edgerlhf.run --profile tiny --only 00,01  # a subset
    python -m edgerlhf.run --profile quick --set data.n_train=256

Executed notebooks go to ``results/runs/<run_id>/notebooks/``, stage records to
``.../records/``, figures to ``.../figures/``, ``manifest.json`` lists what ran, and a whole
run ends with ``REPORT.md`` (and ``report_figures/``) built from the records.
The run stops at the first failing notebook and names it and the failing cell.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from .config import PROFILES, parse_cli_sets
from .files import atomic_write_text
from .paths import REPO_ROOT, resolve
from .records import create_run_dir

NOTEBOOKS = [
    "00_Setup.ipynb",
    "01_Data_Preparation.ipynb",
    "02_SFT_Finetuning.ipynb",
    "03_Reward_Modeling.ipynb",
    "04_PPO_Alignment.ipynb",
]


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


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


def run_notebooks(
    profile: str,
    only: str | None = None,
    overrides: dict | None = None,
    root: str | Path = ".",
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Execute the selected notebooks with papermill; returns the run folder.

    Each notebook's ``parameters`` cell receives ``profile``, ``root``, ``run_dir`` and
    ``overrides`` (dotted config keys). A manifest is rewritten after every notebook. When all
    five notebooks ran, ``REPORT.md`` is built in the run folder (:mod:`edgerlhf.report`).

    Raises:
        NotebookFailed: a notebook raised; earlier notebooks' outputs are kept.
    """
    import papermill as pm
    from tqdm.auto import tqdm

    root = resolve(root)
    run_dir = resolve(run_dir, root) if run_dir else create_run_dir(root / "results", profile)
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    manifest = {
        "run_id": run_dir.name, "profile": profile, "overrides": overrides or {}, "root": str(root),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "python": sys.executable, "status": "running", "notebooks": [],
    }
    parameters = {"profile": profile, "root": str(root), "run_dir": str(run_dir), "overrides": overrides or {}}
    selected = select(only)
    for name in tqdm(selected, desc="notebooks", unit="nb", disable=not progress):
        entry = {"notebook": name, "output": str(run_dir / "notebooks" / name), "status": "running"}
        manifest["notebooks"].append(entry)
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                str(REPO_ROOT / name), entry["output"], parameters=parameters, cwd=str(root),
                progress_bar=progress, kernel_name="python3",
            )
        except pm.PapermillExecutionError as exc:
            entry.update(status="failed", seconds=round(time.perf_counter() - start, 1),
                         error=f"cell {exc.exec_count}: {exc.ename}: {exc.evalue}")
            manifest["status"] = "failed"
            atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
            raise NotebookFailed(f"{name} failed at cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
                                 f"(executed copy: {entry['output']})") from exc
        entry.update(status="ok", seconds=round(time.perf_counter() - start, 1))
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    manifest["status"] = "ok"
    manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if selected == NOTEBOOKS:  # a whole run: its report, from the records just written
        from .report import build_report

        build_report(run_dir)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 ok, 1 a notebook failed)."""
    parser = argparse.ArgumentParser(description="Run the EdgeRLHF notebooks with papermill.")
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,01")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--root", default=".", help="project root holding data/, models/, results/")
    parser.add_argument("--run-dir", default=None, help="run folder (default: a new results/runs/<run_id>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    try:
        run_dir = run_notebooks(args.profile, args.only, parse_cli_sets(args.set), args.root, args.run_dir,
                                progress=not args.no_progress)
    except NotebookFailed as exc:
        print(f"edgerlhf.run: {exc}", file=sys.stderr)
        return 1
    print(f"edgerlhf.run: done; results in {run_dir}" + (f"; report: {run_dir / 'REPORT.md'}"
                                                            if (run_dir / "REPORT.md").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
