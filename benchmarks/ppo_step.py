"""Benchmark PPO steps: wall time split into generation, scoring, no-grad forward passes and update, the
padded and real tokens of every pass, and peak memory. Writes JSON to results/benchmarks/.

The work of issue 15's comparison with TRL 0.11.4's PPOTrainer (8 prompts, batch 8, micro-batch 2, no
accumulation, 4 PPO epochs, LoRA r16 on all seven projections, up to 64 new tokens at temperature 1, a
scripted reward, the embedded base in float32)::

    python benchmarks/ppo_step.py --policy models/base/smollm2-135m-instruct --reward scripted \\
        --batch 8 --micro-batch 2 --accumulation 1 --ppo-epochs 4 --max-new-tokens 64 --temperature 1.0

    python benchmarks/ppo_step.py --policy models/sft/model/merged --reward models/rm/bf16   # a reward model

``--reply-length N`` forces every reply to N tokens (EOS suppressed), so two implementations do the same
work. Memory: the JSON reports the policy backbone and reward-model weights and the activations of one
micro-batch (one forward + backward of the widest micro-batch, measured alone) next to the measured peak.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest.mock import patch

import torch

from edgerlhf.ppo_alignment import encode_queries, load_policy, reward_scorer
from edgerlhf.core.config import PPOStageConfig
from edgerlhf.core.hardware import hardware_report, resolve_device
from edgerlhf.core.memory import MIB, apply_vram_budget, free_memory, measure, returning_freed_memory
from edgerlhf.core import ppo, rollout
from edgerlhf.core.ppo import KLController, micro_batch_backward, ppo_step
from edgerlhf.core.ppo_trainer import make_optimizer
from edgerlhf.core.prefs import read_prefs
from edgerlhf.core.records import software_versions
from edgerlhf.core.reproducibility import seed_everything
from edgerlhf.core.reward_scoring import load_reward_model, state_dict_mib
from turns import Turns  # benchmarks/turns.py (this script's folder is on sys.path)

PARTS = ("time_generation_s", "time_scoring_s", "time_forward_s", "time_update_s", "time_step_s")
PASSES = ("generation", "no_grad_forward", "update_forward")


def scripted_reward(prompts, replies) -> torch.Tensor:
    """A cheap deterministic reward: the share of distinct words in the reply (0 for an empty reply)."""
    return torch.tensor([len(set(r.split())) / max(len(r.split()), 1) for r in replies], dtype=torch.float32)


@contextmanager
def count_tokens(model):
    """Count the tokens every forward pass of ``model`` processes, by pass: ``generation`` (``use_cache``),
    ``no_grad_forward`` and ``update_forward`` (gradients on). ``padded`` is the width the pass ran at
    (``input_ids.numel()``), ``real`` the positions whose attention mask is 1. (The committed ``*-forced64-amd.json``,
    ``-amd-prefix*``, ``-amd-paired`` and ``-amd-paired2`` counted the ones of the 4-D mask of decoding steps
    into a static cache as generation's real tokens, 98,865 for 1,777: their ``generation.real`` is wrong.)
    The old log-probs' pass over the reply tokens (:func:`edgerlhf.core.rollout.reply_logprobs`) counts as
    ``no_grad_forward``, though it uses a cache."""
    counts = {p: {"calls": 0, "padded": 0, "real": 0} for p in PASSES}
    in_reply_pass = [False]
    reply_logprobs = rollout.reply_logprobs

    def counted_reply_logprobs(*args, **kwargs):  # a no-grad pass, though it runs with the prompt's cache
        in_reply_pass[0] = True
        try:
            return reply_logprobs(*args, **kwargs)
        finally:
            in_reply_pass[0] = False

    def hook(module, args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None:
            return
        name = "no_grad_forward" if in_reply_pass[0] else "generation" if kwargs.get("use_cache") \
            else "update_forward" if torch.is_grad_enabled() else "no_grad_forward"
        counts[name]["calls"] += 1
        counts[name]["padded"] += ids.numel()
        # a 2-D mask marks each position's own token; decoding into a static cache gets a 4-D [B, 1, q, kv] mask
        # of what each query attends to, and every decoded position is real (left padding is all in the prompt)
        real = int(mask[:, -ids.shape[1]:].sum()) if mask is not None and mask.dim() == 2 else ids.numel()
        counts[name]["real"] += real

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with patch.object(rollout, "reply_logprobs", counted_reply_logprobs):
            yield counts
    finally:
        handle.remove()


#: The phases of :func:`edgerlhf.core.ppo.ppo_step` whose peak memory is measured apart, and the function each one
#: is, by its name in :mod:`edgerlhf.core.ppo` (``rollout`` and ``reference_logprobs`` come from
#: :mod:`edgerlhf.core.rollout`; ``ppo_step`` calls them by these names).
PHASES = {"rollout": "rollout", "reference_pass": "reference_logprobs", "update": "ppo_update"}


@contextmanager
def phase_peaks(device):
    """Measure each phase of ``ppo_step`` (:data:`PHASES`: the rollout, i.e. generation and the old log-probs'
    pass over the replies; the reference model's pass; the update) with :func:`edgerlhf.core.memory.measure`,
    by wrapping the functions ``ppo_step`` calls while the block runs. Yields ``{phase: measure's dict}``
    (the last call of each phase), filled as the phases run; nested in the step's own measurement, which still
    sees the whole step's peak."""
    peaks: dict = {}

    def measured(name, fn):
        def run(*args, **kwargs):
            with measure(device) as m:
                out = fn(*args, **kwargs)
            peaks[name] = m
            return out
        return run

    with ExitStack() as stack:
        for name, attribute in PHASES.items():
            stack.enter_context(patch.object(ppo, attribute, measured(name, getattr(ppo, attribute))))
        yield peaks


def steal_seconds() -> float | None:
    """CPU time the hypervisor took from this machine since boot (``/proc/stat`` steal column), in seconds;
    None where not available. Steal during a step means its wall time is not comparable."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    fields = stat.read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else None


def one_micro_batch(policy, value_head, batch, cfg) -> dict:
    """Peak memory of the forward + backward of one micro-batch, the widest ``cfg.micro_batch_size`` rows of
    ``batch``, measured from a trimmed heap (:func:`edgerlhf.core.memory.free_memory`), as the update runs it
    (:func:`edgerlhf.core.ppo.micro_batch_backward`: ``ppo.rows_per_pass`` rows at a time, padding-free, inside
    :func:`edgerlhf.core.memory.returning_freed_memory`)."""
    widest = (batch.query_mask.sum(1) + batch.response_mask.sum(1)).argsort(descending=True)[: cfg.micro_batch_size]
    free_memory()
    with returning_freed_memory(), measure() as m:
        micro_batch_backward(policy, value_head, batch, widest.cpu(), cfg, 1.0)
    policy.zero_grad(set_to_none=True)
    value_head.zero_grad(set_to_none=True)
    return m


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="causal LM folder (the SFT model's merged/ folder)")
    parser.add_argument("--reward", default="scripted", help="reward-model folder, or 'scripted' (share of "
                        "distinct words)")
    parser.add_argument("--reward-precision", default=None, help="bf16, int8 or int4 (default: as trained)")
    parser.add_argument("--prompts", default="data/prefs/train_prefs.jsonl", help="prefs JSONL; its first --batch "
                        "prompts are used")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="maximum new tokens per reply")
    parser.add_argument("--reply-length", type=int, default=None, help="force exactly this many new tokens "
                        "(EOS suppressed); default: stop at EOS")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-targets", nargs="+", default=None, help="module names (default: all seven "
                        "projections of a Llama-style model)")
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--policy-precision", default="bf16", help="bf16 runs in float32 on a CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reward-device", default="cpu")
    parser.add_argument("--vram-budget-gib", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=3, help="steps measured after one warm-up step")
    parser.add_argument("--logprobs-from-generation", action="store_true",
                        help="old log-probs and values from the generation pass (ppo.logprobs_from_generation)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--turns", default=None, help="folder of turn tokens: each step waits for its turn and "
                        "then hands it to trl011_ppo_step.py (benchmarks/paired_ppo_steps.py runs the pair)")
    args = parser.parse_args(argv)
    turns = Turns(args.turns, "edgerlhf", "trl")

    seed_everything(0)
    device = resolve_device(args.device)
    budget = apply_vram_budget(args.vram_budget_gib, device)
    cfg = PPOStageConfig(batch_size=args.batch, micro_batch_size=args.micro_batch,
                    gradient_accumulation_steps=args.accumulation, ppo_epochs=args.ppo_epochs,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0, top_p=1.0,
                    lora_r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=args.lora_targets,
                    policy_precision=args.policy_precision, max_prompt_length=args.max_prompt_length,
                    min_new_tokens=args.reply_length or 0,
                    logprobs_from_generation=args.logprobs_from_generation)
    rss_before_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with measure(device) as load:
        policy, value_head, tokenizer = load_policy(args.policy, cfg, device)
        if args.reward == "scripted":
            rm_mib, scorer = 0.0, scripted_reward
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
        turns.wait()
        cpu, steal, started = time.process_time(), steal_seconds(), time.time()
        with measure(device) as m, count_tokens(policy.get_base_model()) as tokens, phase_peaks(device) as phases:
            stats = ppo_step(policy, value_head, optimizer, kl_ctl, tokenizer, queries, prompts, scorer, cfg, generator)
        turns.pass_on()
        batch = stats.pop("batch")
        if i > 0:  # the first step warms up allocators and kernels
            steps.append({**{k: stats[k] for k in PARTS}, "generated_tokens_per_s": stats["generated_tokens_per_s"],
                          "started_unix_s": started,
                          "cpu_time_s": time.process_time() - cpu,
                          "steal_s": None if steal is None else steal_seconds() - steal,
                          "response_length": stats["response_length"], "tokens": tokens, "peak": m,
                          "peak_by_phase": phases,
                          "losses": {k: stats[k] for k in ("pg_loss", "vf_loss", "approx_kl", "clipfrac")}})
    turns.wait()  # after the other process's last step, so that this measurement does not slow it
    micro = one_micro_batch(policy, value_head, batch, cfg)
    lora_mib = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if "lora_" in n) / MIB
    policy_mib = state_dict_mib(policy.get_base_model()) - lora_mib
    mean = {k: sum(s[k] for s in steps) / len(steps)
            for k in PARTS + ("generated_tokens_per_s", "response_length", "cpu_time_s")}
    median_step_s = sorted(s["time_step_s"] for s in steps)[len(steps) // 2]
    peak_rss = max(s["peak"]["cpu_peak_rss_mib"] for s in steps)
    bound = policy_mib + rm_mib + micro["cpu_peak_increase_mib"]
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
        "hardware": hardware_report(args.device), "software": software_versions(), "vram_budget": budget,
        "query_tokens": [len(q) for q in queries], "mean": mean,
        "median_step_s": median_step_s, "steps": steps,
        "load": load,
        "weights_mib": {"policy_backbone": policy_mib, "reward_model": rm_mib, "lora": lora_mib,
                        "value_head": sum(p.numel() * 4 for p in value_head.parameters()) / MIB},
        "one_micro_batch": micro,
        "peak_mib": {
            "cpu_rss": peak_rss, "cpu_rss_with_load_and_micro_batch": max(peak_rss, load["cpu_peak_rss_mib"],
                                                                          micro["cpu_peak_rss_mib"]),
            "cpu_rss_before_model_load": rss_before_load,
            "cpu_rss_by_phase": {name: max(s["peak_by_phase"][name]["cpu_peak_rss_mib"] for s in steps)
                                 for name in PHASES},
            "cuda_allocated": max((s["peak"]["cuda_peak_allocated_mib"] or 0) for s in steps) or None,
            "weights_plus_one_micro_batch": bound,
            "ratio_to_weights_plus_one_micro_batch": peak_rss / bound,
            "ratio_without_runtime": (peak_rss - rss_before_load) / bound,
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ppo_step-{Path(args.policy).name}-{device.type}-b{args.batch}{args.tag}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({"mean": mean, "median_step_s": median_step_s, "step_s": [s["time_step_s"] for s in steps],
                      "steal_s": [s["steal_s"] for s in steps], "tokens": steps[-1]["tokens"],
                      "weights_mib": report["weights_mib"],
                      "peak_mib": report["peak_mib"], "losses": [s["losses"] for s in steps]}, indent=2))
    print("wrote", path, time.strftime("%H:%M:%S"))
    return path


if __name__ == "__main__":
    main()
