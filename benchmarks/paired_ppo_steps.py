"""EdgeRLHF's PPO step and TRL 0.11.4's, timed in alternation on one machine's CPU and compared pair by pair.

Runs ``benchmarks/ppo_step.py`` (this venv) and ``benchmarks/trl011_ppo_step.py`` (TRL's venv, see its docstring)
at the same time, taking turns (``benchmarks/turns.py``): warm-up, then EdgeRLHF's step i, TRL's step i, EdgeRLHF's
step i + 1, ... Each pair of neighbouring steps shares the machine's speed of the moment, so the speed-up is
measured per pair (``TRL step / EdgeRLHF step``) and summarised by its geometric mean with a 95% t-interval on the
log ratios (n = ``--steps`` pairs); the two scripts' own JSON files are written as well::

    python benchmarks/paired_ppo_steps.py --trl-python /tmp/trl011/bin/python \\
        --policy models/base/smollm2-135m-instruct --reply-length 64 --steps 5 --tag=-forced64-paired
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from scipy import stats

HERE = Path(__file__).resolve().parent


def paired_speedup(ours: list[float], theirs: list[float], confidence: float = 0.95) -> dict:
    """Per-pair ratios ``theirs[i] / ours[i]`` (seconds per step), their geometric mean and a t-interval on the
    log ratios (Student's t with n - 1 degrees of freedom).

    Raises:
        ValueError: the lists differ in length or hold fewer than two pairs.
    """
    if len(ours) != len(theirs) or len(ours) < 2:
        raise ValueError(f"need two or more pairs of steps, got {len(ours)} and {len(theirs)}")
    logs = [math.log(t / o) for o, t in zip(ours, theirs)]
    n = len(logs)
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"ratios": [math.exp(x) for x in logs], "geometric_mean": math.exp(mean),
            "interval": [math.exp(mean - half), math.exp(mean + half)], "confidence": confidence, "pairs": n}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", required=True, help="the python of TRL 0.11.4's venv")
    parser.add_argument("--policy", required=True)
    parser.add_argument("--prompts", default="data/prefs/train_prefs.jsonl")
    parser.add_argument("--reply-length", type=int, default=64, help="forced reply length (identical tokens)")
    parser.add_argument("--max-prompt-length", type=int, default=512, help="EdgeRLHF's prompt budget (TRL keeps "
                        "whole prompts: keep every prompt whole here too)")
    parser.add_argument("--steps", type=int, default=5, help="pairs of measured steps, after one warm-up each")
    parser.add_argument("--tag", default="-paired")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)

    common = ["--policy", args.policy, "--prompts", args.prompts, "--reply-length", str(args.reply_length),
              "--steps", str(args.steps), f"--tag={args.tag}", "--out", args.out]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "edgerlhf").touch()  # EdgeRLHF's warm-up goes first
        ours = subprocess.Popen([sys.executable, str(HERE / "ppo_step.py"), *common, "--device", "cpu",
                                 "--max-prompt-length", str(args.max_prompt_length), "--turns", folder])
        trl = subprocess.Popen([args.trl_python, str(HERE / "trl011_ppo_step.py"), *common, "--turns", folder])
        codes = ours.wait(), trl.wait()
    if any(codes):
        raise SystemExit(f"a benchmark failed: ppo_step.py exit {codes[0]}, trl011_ppo_step.py exit {codes[1]}")
    out = Path(args.out)
    name = Path(args.policy).name
    mine = json.loads((out / f"ppo_step-{name}-cpu-b8{args.tag}.json").read_text())
    theirs = json.loads((out / f"trl011_ppo_step-{name}-cpu-b8{args.tag}.json").read_text())
    ours_s = [s["time_step_s"] for s in mine["steps"]]
    trl_s = [s["time_step_s"] for s in theirs["steps"]]
    report = {"args": vars(args), "edgerlhf_step_s": ours_s, "trl_step_s": trl_s,
              "started_unix_s": [[a["started_unix_s"], b["started_unix_s"]] for a, b in zip(mine["steps"],
                                                                                         theirs["steps"])],
              "speedup": paired_speedup(ours_s, trl_s),
              "peak_rss_mib": {"edgerlhf": mine["peak_mib"]["cpu_rss"], "trl": theirs["peak_rss_mib"]}}
    path = out / f"paired_ppo_steps-{name}{args.tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    s = report["speedup"]
    print(f"speed-up {s['geometric_mean']:.2f}x, 95% interval [{s['interval'][0]:.2f}, {s['interval'][1]:.2f}] "
          f"over {s['pairs']} pairs; per pair {[round(r, 2) for r in s['ratios']]}; wrote {path}")
    return path


if __name__ == "__main__":
    main()
