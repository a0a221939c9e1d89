"""The reproducibility check (README, CI): check that a run reproduces: re-execute the notebooks twice, or compare two
run folders.

    python -m edgerlhf.reproduce --profile tiny              # run 00 -> 04 twice, then compare
    python -m edgerlhf.reproduce RUN_A RUN_B                 # compare two existing run folders

What is compared, stage by stage, from the newest record of each stage:

* the data files: the sha256 of ``train_prefs.jsonl`` and ``test_prefs.jsonl`` must be identical
  in both records and, where the files are still on disk, equal to the files' own digests;
* every leaf of the records' ``results`` (numbers, lists of numbers, text), after the run's root
  and run folder in paths are replaced by placeholders. Wall times, throughputs, memory peaks,
  dates and host facts are left out: they measure the machine, not the result.

Tolerances (``|a - b| <= atol + rtol * |b|``, as :func:`numpy.isclose`):

* CPU, both runs: ``rtol=1e-5, atol=1e-7`` for every number, and text must match exactly. With
  the same seed and :func:`edgerlhf.core.reproducibility.seed_everything`'s deterministic flags, two
  CPU runs on one machine agree bit for bit. Across processor models bitsandbytes' CPU int8/int4
  arithmetic can differ (docs/measurements.md), so a comparison of runs from two machines prints a
  note naming both processors (:func:`hardware_note`).
* GPU (either run on CUDA): :data:`GPU_TOLERANCES`, per metric; generated text is shown but not
  judged, because cuBLAS/bf16 kernels are not bit-reproducible across runs (PyTorch docs,
  "Reproducibility").

The table of differences is printed; the exit status is 1 when anything is out of tolerance.
"""
from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .core.config import PROFILES, parse_cli_sets
from .core.files import atomic_write_text
from .core.paths import resolve
from .report import latest_records

CPU_TOLERANCE = (1e-5, 1e-7)  # (rtol, atol)
# First match wins; patterns are matched against the dotted key without list indices.
GPU_TOLERANCES: list[tuple[str, tuple[float, float]]] = [
    ("*accuracy*", (0.0, 0.05)), ("*win_rate*", (0.0, 0.1)), ("*same_ranking*", (0.0, 0.1)),
    ("*auc_roc*", (0.0, 0.05)), ("*ece*", (0.0, 0.05)), ("*perplexity*", (0.02, 0.0)),
    ("*loss*", (0.02, 0.02)), ("*nll*", (0.02, 0.02)), ("*brier*", (0.0, 0.02)),
    ("*kl*", (0.1, 0.05)), ("*score*", (0.1, 0.05)), ("*proxy*", (0.1, 0.05)), ("*judge*", (0.1, 0.05)),
    ("*", (0.05, 1e-3)),
]
# Leaves that measure the machine or the moment, not the result (matched against every key segment).
VOLATILE = ["*_s", "*runtime*", "*per_second*", "*_per_s", "*rss*", "*cuda*", "cpu_*", "*increase*",
            "peak_memory*", "date",
            "disk_free_mib", "packages", "hardware", "gguf_file", "python", "*flos*"]
# Data files every run must produce byte-identically.
DATA_FILES = ("train_prefs.jsonl", "test_prefs.jsonl")


@dataclass
class Difference:
    """One compared leaf: where, the two values, the tolerance applied and the verdict."""

    key: str
    a: Any
    b: Any
    tolerance: str
    status: str  # "identical", "within", "OUT", "missing", "info"

    @property
    def failed(self) -> bool:
        return self.status in ("OUT", "missing")


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted.key[i], leaf)`` pairs of nested dicts and lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _plain(key: str) -> str:
    return re.sub(r"\[\d+\]", "", key)


def is_volatile(key: str) -> bool:
    """True for a key that measures the machine or the moment (see :data:`VOLATILE`)."""
    return any(fnmatch.fnmatch(seg, pat) for seg in _plain(key).split(".") for pat in VOLATILE)


def tolerance_for(key: str, on_gpu: bool) -> tuple[float, float]:
    """``(rtol, atol)`` for a metric: :data:`CPU_TOLERANCE`, or the first :data:`GPU_TOLERANCES` match."""
    if not on_gpu:
        return CPU_TOLERANCE
    return next(tol for pat, tol in GPU_TOLERANCES if fnmatch.fnmatch(_plain(key), pat))


def _normalise(value: Any, places: dict[str, str]) -> Any:
    """Replace the run's own folders in a string by placeholders so paths of two runs compare equal."""
    if isinstance(value, str):
        for path, name in places.items():
            value = value.replace(path, name)
    return value


def compare_values(key: str, a: Any, b: Any, on_gpu: bool) -> Difference:
    """Compare one leaf. Numbers use :func:`tolerance_for`; anything else must be equal (text: not on GPU)."""
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numeric:
        rtol, atol = tolerance_for(key, on_gpu)
        tol = f"rtol {rtol:g}, atol {atol:g}"
        if a == b or (math.isnan(a) and math.isnan(b)):
            return Difference(key, a, b, tol, "identical")
        ok = abs(a - b) <= atol + rtol * abs(b)
        return Difference(key, a, b, tol, "within" if ok else "OUT")
    if a == b:
        return Difference(key, a, b, "exact", "identical")
    if on_gpu and isinstance(a, str) and isinstance(b, str):
        return Difference(key, a, b, "text, not judged on GPU", "info")
    return Difference(key, a, b, "exact", "OUT")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_data_files(rec_a: dict, rec_b: dict) -> list[Difference]:
    """The data files: equal recorded digests, and files on disk (where present) matching their record."""
    out = []
    for name in DATA_FILES:
        digests = [r["results"]["files"].get(name) for r in (rec_a, rec_b)]
        out.append(Difference(f"data file {name}", digests[0], digests[1], "byte-identical",
                              "identical" if digests[0] == digests[1] and digests[0] else "OUT"))
        for side, record, digest in (("a", rec_a, digests[0]), ("b", rec_b, digests[1])):
            path = Path(record["results"]["out_dir"]) / name
            if path.exists() and _sha256(path) != digest:
                out.append(Difference(f"data file {name} on disk ({side})", _sha256(path), digest,
                                      "matches its record", "OUT"))
    return out


def compare_runs(run_a: str | Path, run_b: str | Path) -> list[Difference]:
    """Compare the newest record of every stage of two run folders; one :class:`Difference` per leaf.

    Raises:
        edgerlhf.report.MissingRecordError: a stage record is missing in either folder.
    """
    return compare_records(latest_records(run_a), latest_records(run_b))


def compare_records(recs_a: dict[str, dict], recs_b: dict[str, dict]) -> list[Difference]:
    """:func:`compare_runs` on records already read (:func:`edgerlhf.report.latest_records`)."""
    on_gpu = any(r["hardware"]["device"].startswith("cuda") for recs in (recs_a, recs_b) for r in recs.values())
    diffs = compare_data_files(recs_a["data"], recs_b["data"])
    for stage in recs_a:
        places = []
        for recs in (recs_a, recs_b):
            run_cfg = recs[stage]["config"]["run"]
            places.append({str(resolve(run_cfg["run_dir"], run_cfg["root"])): "<run>",
                           str(resolve(run_cfg["root"])): "<root>"})
        leaves = [{k: _normalise(v, p) for k, v in flatten(recs[stage]["results"], stage) if not is_volatile(k)}
                  for recs, p in zip((recs_a, recs_b), places)]
        diffs.append(compare_values(f"{stage}.status", recs_a[stage]["status"], recs_b[stage]["status"], on_gpu))
        for key in list(leaves[0]) + [k for k in leaves[1] if k not in leaves[0]]:
            if key not in leaves[0] or key not in leaves[1]:
                diffs.append(Difference(key, leaves[0].get(key, "<absent>"), leaves[1].get(key, "<absent>"),
                                        "present in both", "missing"))
            else:
                diffs.append(compare_values(key, leaves[0][key], leaves[1][key], on_gpu))
    return diffs


def hardware_note(recs_a: dict[str, dict], recs_b: dict[str, dict]) -> str | None:
    """A warning line when two runs' data-stage records name different processors, else ``None``.

    The processor is the GPU name on CUDA, else the CPU model (``records.hardware``); where one CPU run scored with
    its reward models in bf16 (``run.cpu_bf16`` on a CPU with native bf16) and the other in float32, the line says so.
    """
    names = [recs["data"]["hardware"]["gpu_name"] or recs["data"]["hardware"]["cpu"] for recs in (recs_a, recs_b)]
    if names[0] == names[1]:
        return None
    bf16 = [recs["data"]["hardware"]["device"] == "cpu" and recs["data"]["hardware"].get("cpu_bf16_native", False)
            and recs["data"]["config"]["run"].get("cpu_bf16", False) for recs in (recs_a, recs_b)]
    dtypes = ("" if bf16[0] == bf16[1] else
              f"; reward models ran in {'bf16' if bf16[0] else 'float32'} in run A and "
              f"{'bf16' if bf16[1] else 'float32'} in run B, so every reward and PPO number differs (set "
              "run.cpu_bf16=false for both to compare in float32)")
    return (f"note: the runs ran on different processors ({names[0]!r} vs {names[1]!r}); quantized (int8/int4) "
            "arithmetic is not bit-identical across them, so small differences there are expected" + dtypes)


def _cell(x: Any, width: int = 40) -> str:
    text = f"{x:.6g}" if isinstance(x, float) else str(x)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(diffs: list[Difference], file=None) -> None:
    """Print every leaf that is not identical, then a one-line summary (to ``file``, default stdout)."""
    file = file or sys.stdout
    shown = [d for d in diffs if d.status != "identical"]
    if shown:
        print(f"{'status':8} {'key':60} {'run A':>20} {'run B':>20}  tolerance", file=file)
        for d in shown:
            print(f"{d.status:8} {_cell(d.key, 60):60} {_cell(d.a, 20):>20} {_cell(d.b, 20):>20}  {d.tolerance}",
                  file=file)
    counts = {s: sum(d.status == s for d in diffs) for s in ("identical", "within", "info", "OUT", "missing")}
    print(f"compared {len(diffs)} values: " + ", ".join(f"{n} {s}" for s, n in counts.items()), file=file)


def rerun(profile: str, root: Path, overrides: dict | None = None) -> tuple[Path, Path]:
    """Run notebooks 00 -> 04 twice with papermill into ``root/a`` and ``root/b``; returns the two run folders."""
    from .run import run_notebooks

    return tuple(run_notebooks(profile, overrides=overrides, root=root / side, progress=False)  # type: ignore
                 for side in ("a", "b"))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns 0 when the runs agree, 1 when not, 2 on a usage or input error."""
    parser = argparse.ArgumentParser(description="Re-run the pipeline twice (or take two run folders) and "
                                                 "compare their records metric by metric.")
    parser.add_argument("runs", nargs="*", help="two run folders to compare (omit to re-run with --profile)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="re-run the notebooks twice with this profile")
    parser.add_argument("--root", default=None, help="where the two re-runs go (default: results/reproduce/<time>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=None, help="also write the comparison as JSON to this file")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.profile) or (args.runs and len(args.runs) != 2):
        parser.print_usage(sys.stderr)
        print("edgerlhf.reproduce: give either two run folders or --profile", file=sys.stderr)
        return 2
    if args.profile:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        root = resolve(args.root or f"results/reproduce/{stamp}-{args.profile}")
        from .run import NotebookFailed

        try:
            run_a, run_b = rerun(args.profile, root, parse_cli_sets(args.set))
        except NotebookFailed as exc:
            print(f"edgerlhf.reproduce: a re-run failed, nothing to compare: {exc}", file=sys.stderr)
            return 1
        out = args.out or root / "comparison.json"
    else:
        run_a, run_b = (Path(r) for r in args.runs)
        out = args.out
    try:
        recs_a, recs_b = latest_records(run_a), latest_records(run_b)
        diffs = compare_records(recs_a, recs_b)
    except (FileNotFoundError, ValueError) as exc:
        print(f"edgerlhf.reproduce: {exc}", file=sys.stderr)
        return 2
    print(f"run A: {run_a}\nrun B: {run_b}")
    note = hardware_note(recs_a, recs_b)
    if note:
        print(note)
    print_table(diffs)
    failed = [d for d in diffs if d.failed]
    if out:
        atomic_write_text(out, json.dumps({"run_a": str(run_a), "run_b": str(run_b), "reproduced": not failed,
                                           "differences": [asdict(d) for d in diffs if d.status != "identical"]},
                                          indent=2, default=str) + "\n")
    print("edgerlhf.reproduce: " + ("REPRODUCED" if not failed else f"NOT reproduced ({len(failed)} out of tolerance)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
