"""Fault injection: the runner is killed outright (SIGKILL) in the middle of each training stage, then
re-run with resume. The final models and records must equal an uninterrupted run's, nothing good may be
lost, the killed runner's kernel must not live on, and every interrupted run must end up marked failed."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from transformers.trainer_utils import get_last_checkpoint

from edgerlhf.core.ppo_trainer import latest_checkpoint
from edgerlhf.core.records import newest_records
from edgerlhf.reproduce import compare_records

pytestmark = pytest.mark.slow  # kill-and-resume runs of the whole runner

#: Record fields that differ after a resume by the libraries' bookkeeping, not by what was learnt: TRL's
#: ``num_tokens`` log counter and transformers' ``num_input_tokens_seen`` restart at the resume point, and
#: ``train_loss`` averages only the steps run after it; the per-step losses and the weights are compared.
RESUME_BOOKKEEPING = re.compile(r"resumed_from|num_tokens|^sft\.train_loss$|^sft\.tokens_seen$|^sft\.tokens_per_second$|"
                                r"^sft\.log_history\[\d+\]\.train_loss$")

#: Longer than the tiny profile's defaults, so that each kill lands well inside its stage: the kill follows the
#: watched file by the polling and process-gathering latency, and on a busy 2-core machine a 4-step int8
#: experiment once finished (checkpoints cleaned up) before its kill landed; 8 steps leave 7 steps of margin. No
#: placebo arm and no best-of-n: they resume like any arm, and would only lengthen the test.
LONGER = ["sft.max_train_samples=48", "ppo.steps=8", "ppo.experiments=[bf16, int8]", "ppo.placebo=false",
          "ppo.best_of_n=0"]


def start(root: Path, only: str, *sets: str) -> subprocess.Popen:
    args = [a for s in (*LONGER, *sets) for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "edgerlhf.run", "--profile", "tiny", "--only", only, "--root",
                             str(root), "--no-progress", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]


def kill_when(proc: subprocess.Popen, root: Path, pattern: str) -> None:
    """SIGKILL the runner as soon as a path matching ``pattern`` exists under ``root``; its kernel must die too.
    The kill lands a little later than the path appears (polling, then gathering the process family), so a
    fast machine may have written a later checkpoint by then: callers read what the kill left behind."""
    deadline = time.monotonic() + 900
    while not list(root.glob(pattern)):
        assert proc.poll() is None, f"finished before {pattern} appeared: {proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    _, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, f"the killed runner's kernel lives on: {alive}"


def final_records(root: Path) -> dict[str, dict]:
    """The newest successful record of every stage across all run folders under ``root``."""
    out: dict[str, dict] = {}
    for run in sorted((root / "results" / "runs").iterdir()):
        for stage, record in newest_records(run).items():
            if record["status"] == "ok":
                out[stage] = record
    return out


def test_kill_then_resume_equals_an_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    finish(start(a, "00,01,02,03,04"))
    finish(start(b, "00,01"))
    kill_when(start(b, "02"), b, "models/sft/checkpoints/checkpoint-2/trainer_state.json")
    assert not (b / "models/sft/model").exists()
    sft_left = Path(get_last_checkpoint(str(b / "models/sft/checkpoints"))).name  # checkpoint-2 or later
    finish(start(b, "02", "sft.resume=true"))
    kill_when(start(b, "03"), b, "models/.rm.staging-*/bf16/head.safetensors")  # between two reward models
    assert not (b / "models/rm").exists()  # the set is swapped in whole, or not at all
    finish(start(b, "03"))
    kill_when(start(b, "04"), b, "models/ppo/checkpoints/bf16/checkpoint-2/state.pt")
    kill_when(start(b, "04", "ppo.resume=true"), b, "models/ppo/checkpoints/int8/checkpoint-1/state.pt")
    assert (b / "models/ppo/bf16/value_head.safetensors").exists()  # finished before the kill, kept
    left = latest_checkpoint(b / "models/ppo/checkpoints/int8")  # checkpoint-1, or a later one on a fast machine
    assert left is not None and not (b / "models/ppo/int8").exists()  # killed inside the int8 experiment
    finish(start(b, "04", "ppo.resume=true"))

    manifests = {p.parent.name: json.loads(p.read_text()) for p in (b / "results/runs").glob("*/manifest.json")}
    assert sorted(m["status"] for m in manifests.values()).count("failed") == 4
    assert all(m["status"] in ("ok", "failed") for m in manifests.values())  # none left "running"
    recs_a, recs_b = final_records(a), final_records(b)
    assert list(recs_a) == list(recs_b) == ["setup", "data", "sft", "reward", "ppo"]
    assert recs_b["sft"]["results"]["resumed_from"] == sft_left
    assert recs_b["ppo"]["results"]["experiments"]["int8"]["resumed_from"] == left.name
    diffs = [d for d in compare_records(recs_a, recs_b) if d.failed and not RESUME_BOOKKEEPING.search(d.key)]
    assert not diffs, "\n".join(f"{d.key}: {d.a} vs {d.b}" for d in diffs[:20])
    for name in ("sft/model/merged/model.safetensors", "ppo/bf16/value_head.safetensors",
                 "ppo/int8/adapter/adapter_model.safetensors"):
        assert (a / "models" / name).read_bytes() == (b / "models" / name).read_bytes(), name
