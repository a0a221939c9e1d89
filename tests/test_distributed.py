"""SFT, reward training and PPO under ``accelerate launch`` with two CPU processes (gloo), as they would run on two
GPUs (issue 14 item 6, issue 37 item 4): the trainers shard the batches, PPO shares its rollouts and sums its
gradients (one update equal to one process's), and every file (models, figures, the record) is written once, by the
main process, with the number of processes in the record."""
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


def test_ppo_runs_in_two_processes_and_writes_once(tmp_path, models_dir, tiny_data, tiny_sft, tiny_cfg):
    from edgerlhf.reward_modeling import run_reward

    sets = {"sft.output_dir": str(tiny_sft), "reward.method": "probe", "reward.precisions": ["bf16"]}
    run_dir = tmp_path / "results" / "runs" / "two-processes"
    run_reward(tiny_cfg(**sets, **{"run.run_dir": str(run_dir)}))
    ppo = launch("edgerlhf.ppo_alignment", tmp_path, models_dir, tiny_data, run_dir, f"sft.output_dir={tiny_sft}",
                 "ppo.experiments=[bf16]", "ppo.seeds=[42]")
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    record = json.loads((run_dir / "records" / "ppo.json").read_text())
    assert sorted(p.name for p in (run_dir / "records").iterdir()) == ["ppo.json", "reward.json"]
    assert record["processes"]["num_processes"] == 2 and record["processes"]["backend"] == "gloo"
    assert record["status"] == "ok"
    cfg = load_config("tiny")
    for arm in ("bf16", "placebo"):
        history = record["results"]["experiments"][arm]["history"]
        assert len(history) == cfg.ppo.steps and all(s["optimizer_steps"] > 0 for s in history)
        assert (tmp_path / "models" / "ppo" / arm / "value_head.safetensors").exists()
    assert not (tmp_path / "models" / "ppo" / "checkpoints" / "bf16").exists()  # removed once, by the main process
    assert ppo.stdout.count(record["results"]["conclusions"][0]) == 1  # the summary is printed once


def test_a_stage_that_does_not_shard_refuses_several_processes(tiny_cfg, monkeypatch):
    import edgerlhf.core.stage as stage

    monkeypatch.setattr(stage, "process_info", lambda: {"num_processes": 2})
    with pytest.raises(RuntimeError, match="runs in one process, not 2"):
        begin(tiny_cfg())
    monkeypatch.setattr(stage, "process_info", lambda: {"num_processes": 1})
    begin(tiny_cfg())


def _update_in_process(rank: int, world: int, init_file: str, location: str, folder: str) -> None:
    """One of ``world`` gloo processes: the tiny policy, the saved rollout batch, one :func:`ppo.ppo_update`;
    writes its trainable weights and statistics to ``folder/rank<rank>.pt``."""
    import torch

    from edgerlhf.core import ppo

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        policy, head, batch, cfg = _update_inputs(location, Path(folder))
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad] + list(head.parameters()),
                                      lr=1e-2)
        stats = ppo.ppo_update(policy, head, optimizer, batch, cfg, torch.Generator().manual_seed(1))
        torch.save({"weights": _trainable(policy, head), "stats": stats}, Path(folder) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _update_inputs(location: str, folder: Path):
    """The tiny policy (the same initial weights in every process) and the rollout batch saved in ``folder``."""
    import torch
    from test_ppo import CFG, tiny_policy

    from edgerlhf.core import ppo
    from edgerlhf.core.config import PPOStageConfig

    policy, head = tiny_policy(location)
    batch = ppo.Batch(**torch.load(folder / "batch.pt", weights_only=True))
    cfg = PPOStageConfig(**{**CFG.__dict__, "batch_size": 5, "micro_batch_size": 3, "gradient_accumulation_steps": 1,
                            "ppo_epochs": 2})
    return policy, head, batch, cfg


def _trainable(policy, head):
    return [p.detach().clone() for p in policy.parameters() if p.requires_grad] + \
        [p.detach().clone() for p in head.parameters()]


def test_a_ppo_update_in_two_processes_equals_the_update_in_one(tmp_path, models_dir):
    # fixed rollouts: 5 replies of unequal length; minibatches of 3 rows split 2 + 1 across the processes, the last
    # minibatch of 2 rows 1 + 1; two epochs, so the second runs at ratios other than 1
    import torch
    import torch.multiprocessing as mp
    from test_ppo import update_batch

    from edgerlhf.core import ppo
    from edgerlhf.core.models import prepare_base_model

    location = prepare_base_model("tiny-llama", models_dir)
    _, _, batch = update_batch("tiny-llama", models_dir, n=5, fixed_length=True)
    for row, keep in enumerate((1, 5, 2, 4, 3)):
        batch.response_mask[row, keep:] = 0
    for name in ("advantages", "returns"):
        setattr(batch, name, getattr(batch, name) * batch.response_mask)
    torch.save({k: getattr(batch, k) for k in ("query", "query_mask", "response", "response_mask", "logprobs",
                                               "values", "advantages", "returns")}, tmp_path / "batch.pt")
    policy, head, one_batch, cfg = _update_inputs(location, tmp_path)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad] + list(head.parameters()),
                                  lr=1e-2)
    before = _trainable(policy, head)
    one = ppo.ppo_update(policy, head, optimizer, one_batch, cfg, torch.Generator().manual_seed(1))
    expected = _trainable(policy, head)
    assert one["optimizer_steps"] == 4 and one["approx_kl"] > 0
    assert max(float((a - b).abs().max()) for a, b in zip(expected, before)) > 1e-3  # the update moved the weights
    mp.spawn(_update_in_process, args=(2, str(tmp_path / "init"), location, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        two = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b in zip(expected, two["weights"]):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
        for key in ppo.UPDATE_STATS:
            assert two["stats"][key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
