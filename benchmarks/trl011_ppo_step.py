"""The same PPO work as ``benchmarks/ppo_step.py``, done by TRL 0.11.4's ``PPOTrainer`` (the last TRL with a PPO
trainer for this loop), so the two are measured side by side on one machine. Writes JSON to results/benchmarks/.

It runs in a venv of its own, since TRL 0.11.4 needs transformers 4.x (EdgeRLHF needs 5.x), and imports nothing
from ``edgerlhf``::

    python3 -m venv /tmp/trl011
    /tmp/trl011/bin/pip install torch==2.13.0 trl==0.11.4 transformers==4.46.3 peft==0.13.2 accelerate==1.1.1 \\
        "datasets<3.2" rich  # rich: imported by TRL 0.11.4 but not among its requirements
    /tmp/trl011/bin/python benchmarks/trl011_ppo_step.py --policy models/base/smollm2-135m-instruct \\
        --prompts data/prefs/train_prefs.jsonl

The work matches ``ppo_step.py``'s defaults: the first 8 prompts of the prefs file rendered with the chat template,
batch 8, micro-batch 2 (``--micro-batch``, TRL 0.11's ``mini_batch_size``), no accumulation, 4 PPO epochs, LoRA r16
(alpha 32, no dropout) on all seven projections, up to 64 new tokens (``--max-new-tokens``) sampled at temperature 1
with top-k and top-p off, generation of the whole batch at once, the scripted reward (share of distinct words),
EdgeRLHF's default policy learning rate, KL controller and PPO coefficients, in float32. TRL 0.11.4 has one Adam
(eps 1e-8) for the policy and the value head at 1.41e-5, where EdgeRLHF's AdamW gives the value head 1e-4 and uses
eps 1e-5 (``edgerlhf.core.ppo_trainer.make_optimizer``): the losses differ, the work timed does not. Time is split as
TRL reports it (``time/ppo/forward_pass`` is its no-grad pass for log-probs, values and reference log-probs;
``time/ppo/optimize_step`` its update); peak RSS is the kernel's VmHWM inside each step, reset before it, as
``edgerlhf.core.memory.measure`` does.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers
import trl
from peft import LoraConfig
from transformers import PreTrainedTokenizerFast
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from turns import Turns  # benchmarks/turns.py (this script's folder is on sys.path; standard library only)

MIB = 2**20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def scripted_reward(replies: list[str]) -> list[torch.Tensor]:
    """The reward of ``ppo_step.py``: the share of distinct words in the reply (0 for an empty reply)."""
    return [torch.tensor(len(set(r.split())) / max(len(r.split()), 1), dtype=torch.float32) for r in replies]


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """Peak resident set size (VmHWM) of this process since the last reset, in MiB."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def read_prompts(path: str, n: int) -> list[list[dict]]:
    """The ``prompt`` message lists of the first ``n`` rows of a prefs JSONL file (EdgeRLHF's format)."""
    rows = []
    with open(path) as fh:
        for line in fh:
            rows.append(json.loads(line)["prompt"])
            if len(rows) == n:
                break
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="causal LM folder (safetensors)")
    parser.add_argument("--prompts", default="data/prefs/train_prefs.jsonl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2, help="TRL 0.11's mini_batch_size")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reply-length", type=int, default=None, help="force exactly this many new tokens "
                        "(min_new_tokens = max_new_tokens: EOS suppressed until then), as ppo_step.py's flag")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3, help="steps measured after one warm-up step")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--turns", default=None, help="folder of turn tokens: each step waits for its turn and "
                        "then hands it to ppo_step.py (benchmarks/paired_ppo_steps.py runs the pair)")
    args = parser.parse_args(argv)
    turns = Turns(args.turns, "trl", "edgerlhf")

    torch.manual_seed(0)
    # folders saved by transformers 5 name the tokenizer class TokenizersBackend and keep the chat template in
    # chat_template.jinja, both unknown to transformers 4.46: read tokenizer.json and the template directly
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.policy)
    template = Path(args.policy) / "chat_template.jinja"
    if tokenizer.chat_template is None and template.exists():
        tokenizer.chat_template = template.read_text()
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token  # as edgerlhf.core.templates.ppo_pad_token (SmolLM2)
    config = PPOConfig(batch_size=args.batch, mini_batch_size=args.micro_batch,
                       gradient_accumulation_steps=args.accumulation, ppo_epochs=args.ppo_epochs,
                       learning_rate=1.41e-5, init_kl_coef=0.1, adap_kl_ctrl=True, target=6.0, horizon=10000,
                       gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, max_grad_norm=0.5,
                       seed=0, log_with=None)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(args.policy, peft_config=lora,
                                                              torch_dtype=torch.float32)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    prompts = read_prompts(args.prompts, args.batch)
    queries = [torch.tensor(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True))
               for p in prompts]
    generation = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": args.temperature,
                  "max_new_tokens": args.reply_length or args.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": tokenizer.eos_token_id}
    if args.reply_length:
        generation["min_new_tokens"] = args.reply_length
    steps = []
    for i in range(args.steps + 1):
        turns.wait()
        peak_rss_reset()
        started, start = time.time(), time.perf_counter()
        responses = trainer.generate(queries, batch_size=args.batch, return_prompt=False, **generation)
        generated = time.perf_counter()
        rewards = scripted_reward(tokenizer.batch_decode(responses, skip_special_tokens=True))
        stats = trainer.step(queries, responses, rewards)
        end = time.perf_counter()
        turns.pass_on()
        if i > 0:  # the first step warms up allocators and kernels, as in ppo_step.py
            steps.append({"time_generation_s": generated - start, "time_rest_s": end - generated,
                          "time_step_s": end - start, "started_unix_s": started,
                          "trl_timing_s": {k: float(v) for k, v in stats.items() if k.startswith("time/")},
                          "response_length": sum(len(r) for r in responses) / len(responses),
                          "peak_rss_mib": peak_rss_mib(),
                          "losses": {k: float(stats[k]) for k in ("ppo/loss/policy", "ppo/loss/value",
                                                                  "ppo/policy/approxkl", "ppo/policy/clipfrac")}})
            print(json.dumps(steps[-1]), flush=True)
    mean = {k: sum(s[k] for s in steps) / len(steps)
            for k in ("time_generation_s", "time_rest_s", "time_step_s", "response_length")}
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
              "implementation": "TRL 0.11.4 PPOTrainer", "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
              "software": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "trl": trl.__version__},
              "query_tokens": [len(q) for q in queries], "mean": mean,
              "median_step_s": sorted(s["time_step_s"] for s in steps)[len(steps) // 2],
              "peak_rss_mib": max(s["peak_rss_mib"] for s in steps), "steps": steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"trl011_ppo_step-{Path(args.policy).name}-cpu-b{args.batch}{args.tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"mean": mean, "median_step_s": report["median_step_s"], "peak_rss_mib": report["peak_rss_mib"]}))
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
