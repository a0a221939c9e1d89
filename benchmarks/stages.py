"""Benchmark every stage of a run: peak memory against the planner's estimate, and throughput.

    python benchmarks/stages.py --run-dir results/runs/<run_id>     # a run that already happened
    python benchmarks/stages.py --profile quick                     # run notebooks 00 -> 04 first

Writes ``results/benchmarks/stages-<run_id>.json`` and a bar chart beside it. Figures come from
the stage records: the measured peak is the CUDA peak allocated on a GPU; on a CPU it is the
stage's peak resident memory above what the process held when the stage began
(``cpu_peak_increase_mib``: the tensors the stage itself allocated, plus allocator slack).
The estimate is :func:`edgerlhf.core.planner.estimate` for the dtype that really ran (float32 on a
CPU). Throughput: SFT and reward training in tokens per second, reward scoring in pairs per
second, and the PPO step split into generation, scoring, forward passes and update (seconds).
Not a test; CI does not run it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from matplotlib.figure import Figure

from edgerlhf.core.config import flatten, load_config
from edgerlhf.core.files import atomic_write_text
from edgerlhf.core.planner import estimate
from edgerlhf.core.models import model_config
from edgerlhf.core.plots import save
from edgerlhf.report import latest_records

PPO_PARTS = ("time_generation_s", "time_scoring_s", "time_forward_s", "time_update_s", "time_step_s")


def measured_mib(peak: dict) -> tuple[float | None, str]:
    """The measured peak of a stage and what it is (CUDA peak allocated, or CPU peak increase)."""
    if peak.get("cuda_peak_allocated_mib") is not None:
        return peak["cuda_peak_allocated_mib"], "cuda_peak_allocated_mib"
    return peak.get("cpu_peak_increase_mib"), "cpu_peak_increase_mib"


def stage_rows(records: dict) -> list[dict]:
    """One row per training stage: estimate, measurement and throughput, from the run's records."""
    setup = records["setup"]
    cfg = load_config(setup["profile"], overrides={k: v for k, v in flatten(setup["config"]).items() if "." in k})
    base = setup["results"]["base_model"]
    shape = model_config(base["name"], base["location"])
    compute = "fp32" if setup["hardware"]["device"] == "cpu" else "bf16"  # the dtype the stages ran in
    rows = []
    for stage in ("sft", "reward", "ppo"):
        record = records[stage]
        est = estimate(stage, cfg, shape, compute)
        value, kind = measured_mib(record["peak_memory"])
        row = {"stage": stage, "device": record["peak_memory"].get("device"), "estimate_mib": est.total_mib,
               "estimate_breakdown_mib": est.breakdown, "measured_mib": value, "measured": kind,
               "cpu_peak_rss_mib": record["peak_memory"].get("cpu_peak_rss_mib"),
               "wall_time_s": record["wall_time_s"]}
        results = record["results"]
        if stage == "sft":
            row["train_tokens_per_second"] = results["tokens_per_second"]
        elif stage == "reward":
            row["models"] = {name: {"train_tokens_per_second": _tokens_per_second(m.get("log_history", [])),
                                    "scoring_pairs_per_second": m["pairs_per_second"],
                                    "measured_training_mib": measured_mib(m.get("peak_memory_training") or {})[0]}
                             for name, m in results["models"].items()}
        else:
            row["experiments"] = {name: {part: mean(h[part] for h in e["history"]) for part in PPO_PARTS}
                                  | {"generated_tokens_per_s": mean(h["generated_tokens_per_s"] for h in e["history"])}
                                  for name, e in results["experiments"].items()}
        rows.append(row)
    return rows


def _tokens_per_second(log_history: list[dict]) -> float | None:
    """Training tokens per second from a Trainer's final log entry (None when it was not trained)."""
    final = [e for e in log_history if "train_runtime" in e and "num_input_tokens_seen" in e]
    return final[-1]["num_input_tokens_seen"] / final[-1]["train_runtime"] if final else None


def figure(rows: list[dict], path: Path) -> Path:
    """Estimate against measurement per stage."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["estimate_mib"] for r in rows], 0.4, label="planner estimate")
    ax.bar([i + 0.2 for i in x], [r["measured_mib"] or 0 for r in rows], 0.4, label=f"measured ({rows[0]['measured']})")
    ax.set_xticks(list(x), [r["stage"] for r in rows])
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)
    return save(fig, path)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a finished run folder")
    source.add_argument("--profile", help="run notebooks 00 -> 04 with this profile first")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    if args.profile:
        from edgerlhf.run import run_notebooks

        run_dir = run_notebooks(args.profile)
    else:
        run_dir = Path(args.run_dir)
    records = latest_records(run_dir)
    rows = stage_rows(records)
    out = Path(args.out)
    result = {"run_dir": str(run_dir), "hardware": records["setup"]["hardware"],
              "software": records["setup"]["software"], "stages": rows,
              "figure": str(figure(rows, out / f"stages-{run_dir.name}.png"))}
    path = atomic_write_text(out / f"stages-{run_dir.name}.json", json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['stage']:7} estimate {r['estimate_mib']:8.0f} MiB   measured {r['measured_mib'] or 0:8.0f} MiB "
              f"({r['measured']})   wall {r['wall_time_s']:7.1f} s")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
