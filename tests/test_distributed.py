"""SFT and reward training under ``accelerate launch`` with two CPU processes (gloo), as they would run on two GPUs
(issue 14 item 6): the trainers shard the batches, and every file (models, figures, the record) is written once,
by the main process, with the number of processes in the record."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgerlhf.core.config import load_config
from edgerlhf.core.stage import begin

pytestmark = pytest.mark.slow  # two processes under accelerate launch



def launch(module: str, root: Path, models_dir: Path, data_dir: Path, run_dir: Path, *sets: str):
    """``accelerate launch`` of ``module`` in two processes on the CPU (accelerate's torchrun launcher)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    flags = [f"run.root={root}", f"model.models_dir={models_dir}", f"data.out_dir={data_dir}",
             f"run.run_dir={run_dir}", *sets]
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--num_cpu_threads_per_process", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29533", "-m", module, "--profile", "tiny"]
    for flag in flags:
        cmd += ["--set", flag]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_sft_and_reward_training_run_in_two_processes_and_write_once(tmp_path, models_dir, tiny_data):
    run_dir = tmp_path / "results" / "runs" / "two-processes"
    sft = launch("edgerlhf.sft_finetuning", tmp_path, models_dir, tiny_data, run_dir)
    assert sft.returncode == 0, sft.stderr[-3000:]
    reward = launch("edgerlhf.reward_modeling", tmp_path, models_dir, tiny_data, run_dir, "reward.method=lora",
                    "reward.seeds=[42]", "reward.post_training_quantization=false")
    assert reward.returncode == 0, reward.stderr[-3000:]
    records = sorted(p.name for p in (run_dir / "records").iterdir())
    assert records == ["reward.json", "sft.json"]  # one record per stage, not one per process
    sft_record = json.loads((run_dir / "records" / "sft.json").read_text())
    for record in (sft_record, json.loads((run_dir / "records" / "reward.json").read_text())):
        assert record["processes"]["num_processes"] == 2 and record["processes"]["backend"] == "gloo"
        assert record["processes"]["process_index"] == 0 and record["status"] == "ok"
    cfg = load_config("tiny")
    samples = cfg.sft.max_train_samples
    # each optimizer step takes one micro-batch from each process: half the steps of one process
    assert sft_record["results"]["global_step"] == -(-samples // (2 * cfg.sft.per_device_train_batch_size))
    assert (tmp_path / "models" / "sft" / "model" / "merged" / "model.safetensors").exists()
    rm = tmp_path / "models" / "rm"
    assert (rm / "evaluation.json").exists() and all((rm / p).is_dir() for p in ("bf16", "int8", "int4", "judge"))
    leftovers = [p.name for p in list((tmp_path / "models").iterdir()) + list((tmp_path / "models" / "sft").iterdir())
                 if ".staging" in p.name]
    assert leftovers == []
    assert sft.stdout.count('"record"') == 1  # the summary is printed once


def test_a_stage_that_does_not_shard_refuses_several_processes(tiny_cfg, monkeypatch):
    import edgerlhf.core.stage as stage

    monkeypatch.setattr(stage, "process_info", lambda: {"num_processes": 2})
    with pytest.raises(RuntimeError, match="runs in one process, not 2"):
        begin(tiny_cfg())
    monkeypatch.setattr(stage, "process_info", lambda: {"num_processes": 1})
    begin(tiny_cfg())
