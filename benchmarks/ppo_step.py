"""Benchmark one PPO step: wall time split into generation, scoring, forward passes and update,
and peak memory, for a given policy, reward model and batch. Writes JSON to results/benchmarks/.

    python benchmarks/ppo_step.py --policy models/sft/model/merged --reward models/rm/bf16 --batch 8
    python benchmarks/ppo_step.py --policy models/base/smollm2-135m-instruct --reward none   # constant reward

The memory target (issue 5): the peak stays near policy backbone weights + reward-model weights +
activations, with no second copy for the reference or the value function. The JSON reports those
weights next to the measured peak.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

from edgerlhf.alignment import encode_queries, load_policy, reward_scorer
from edgerlhf.config import PPOConfig
from edgerlhf.hardware import hardware_report, resolve_device
from edgerlhf.memory import apply_vram_budget, measure
from edgerlhf.ppo import KLController, ppo_step
from edgerlhf.ppo_loop import make_optimizer
from edgerlhf.prefs import read_prefs
from edgerlhf.records import software_versions
from edgerlhf.reproducibility import seed_everything
from edgerlhf.rewards import load_reward_model, state_dict_mib

PARTS = ("time_generation_s", "time_scoring_s", "time_forward_s", "time_update_s", "time_step_s")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="causal LM folder (the SFT model's merged/ folder)")
    parser.add_argument("--reward", default="none", help="reward-model folder, or 'none' for a constant reward")
    parser.add_argument("--reward-precision", default=None, help="bf16, int8 or int4 (default: as trained)")
    parser.add_argument("--prompts", default="data/train_prefs.jsonl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mini-batch", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--policy-precision", default="bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reward-device", default="cpu")
    parser.add_argument("--vram-budget-gib", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=2, help="steps measured after one warm-up step")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)

    seed_everything(0)
    device = resolve_device(args.device)
    budget = apply_vram_budget(args.vram_budget_gib, device)
    cfg = PPOConfig(batch_size=args.batch, mini_batch_size=args.mini_batch, gradient_accumulation_steps=1,
                    ppo_epochs=1, response_length=args.response_length, policy_precision=args.policy_precision)
    with measure(device) as load:
        policy, value_head, tokenizer = load_policy(args.policy, cfg, device)
        if args.reward == "none":
            rm_mib = 0.0

            def scorer(prompts, replies):
                return torch.zeros(len(replies))
        else:
            rm, rm_tok = load_reward_model(args.reward, args.reward_precision, resolve_device(args.reward_device))
            rm_mib = state_dict_mib(rm)
            scorer = reward_scorer(rm, rm_tok, cfg, max_length=512)
    queries, prompts = encode_queries(tokenizer, read_prefs(args.prompts)[: args.batch], cfg.max_prompt_length)
    optimizer = make_optimizer(policy, value_head, cfg)
    kl_ctl = KLController(cfg.init_kl_coef)
    generator = torch.Generator().manual_seed(0)
    steps = []
    for i in range(args.steps + 1):
        with measure(device) as m:
            stats = ppo_step(policy, value_head, optimizer, kl_ctl, tokenizer, queries, prompts, scorer, cfg, generator)
        stats.pop("batch")
        if i > 0:  # the first step warms up allocators and kernels
            steps.append({**{k: stats[k] for k in PARTS}, "generated_tokens_per_s": stats["generated_tokens_per_s"],
                          "response_length": stats["response_length"], "peak": m})
    policy_mib = state_dict_mib(policy.get_base_model()) - sum(
        p.numel() * p.element_size() for n, p in policy.named_parameters() if "lora_" in n) / 2**20
    mean = {k: sum(s[k] for s in steps) / len(steps) for k in PARTS + ("generated_tokens_per_s",)}
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
        "hardware": hardware_report(args.device), "software": software_versions(), "vram_budget": budget,
        "mean": mean, "steps": steps, "load": load,
        "weights_mib": {"policy_backbone": policy_mib, "reward_model": rm_mib,
                        "lora_and_value_head": sum(p.numel() * p.element_size() for p in optimizer.param_groups[0]["params"])
                        / 2**20 + sum(p.numel() * 4 for p in value_head.parameters()) / 2**20},
        "peak_mib": {"cpu_rss": max(s["peak"]["cpu_peak_rss_mib"] for s in steps),
                     "cuda_allocated": max((s["peak"]["cuda_peak_allocated_mib"] or 0) for s in steps) or None},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ppo_step-{Path(args.policy).name}-{device.type}-b{args.batch}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({"mean": mean, "weights_mib": report["weights_mib"], "peak_mib": report["peak_mib"]}, indent=2))
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
