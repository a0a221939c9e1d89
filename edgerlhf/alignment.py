"""Stage 4: PPO alignment against the BF16, INT8 and INT4 reward models (EXP-1/2/3).

For each reward-model precision: the same SFT policy, seed and training prompts ->
PPO (:mod:`edgerlhf.ppo`, :mod:`edgerlhf.ppo_loop`) -> save -> evaluate on held-out prompts:
mean score under the reward model used in training (proxy) and under a judge it was not
trained against (the bf16 model for the int8/int4 runs; for the bf16 run the ``judge`` model
trained on the other half of the pairs), KL to the SFT model, and the judge's win rate of
PPO replies over SFT replies.

Outputs: ``models/ppo/<precision>/`` (LoRA adapter and value head), the stage record with
per-step statistics, the comparison table, and figures. Run without the notebook:
``python -m edgerlhf.alignment --profile quick`` (also ``python -m edgerlhf.ppo``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import PRECISIONS, compute_dtype, quantization_config
from .config import Config, PPOConfig
from .files import swap_in_dir
from .hardware import resolve_device
from .lm import fit_prompt
from .memory import measure
from .models import load_causal_lm, load_tokenizer
from .plots import overoptimisation_figure, ppo_curves_figure
from .ppo import decode_responses, policy_and_reference_logprobs, rollout
from .ppo_loop import build_policy, train
from .prefs import read_prefs
from .reproducibility import seed_everything
from .rewards import load_reward_model, score
from .stage import begin, cli_config, finish
from .templates import ensure_chat_template, ppo_pad_token, render_prompt


def load_policy(sft_location: str, cfg: PPOConfig, device: torch.device):
    """The SFT model (its LoRA already merged in stage 2) at ``cfg.policy_precision`` with a fresh
    PPO adapter and a zero value head; the adapter disabled is the reference model.

    For an int8/int4 policy the merged full-precision weights are quantized on load (merge first,
    then quantize). Returns ``(policy, value_head, tokenizer)``.
    """
    dtype = compute_dtype(device)
    qc = quantization_config(cfg.policy_precision, dtype)
    if qc is None:
        model = load_causal_lm(sft_location, dtype).to(device)
    else:
        model = load_causal_lm(sft_location, dtype, quantization_config=qc, device_map={"": str(device)})
    policy, value_head = build_policy(model.eval(), cfg)
    tokenizer = load_tokenizer(sft_location)
    ensure_chat_template(tokenizer)
    ppo_pad_token(tokenizer)
    return policy, value_head, tokenizer


def encode_queries(tokenizer, rows: list[dict], max_prompt_length: int) -> tuple[list[list[int]], list[list[dict]]]:
    """Token ids of the rendered prompts, truncated from the left by whole turns; prompts that
    cannot fit are skipped. Returns ``(queries, prompts)`` of equal length."""
    queries, prompts = [], []
    for row in rows:
        messages, _ = fit_prompt(tokenizer, row["prompt"], [""], max_prompt_length)
        if messages is not None:
            queries.append(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
            prompts.append(messages)
    return queries, prompts


def reward_scorer(model, tokenizer, cfg: PPOConfig, max_length: int, gain: float = 1.0, bias: float = 0.0):
    """``scorer(prompts, replies) -> FloatTensor[B]``: the reward model's score times ``gain`` plus ``bias``."""
    def scorer(prompts, replies):
        return gain * score(model, tokenizer, prompts, replies, cfg.score_batch_size, max_length) + bias
    return scorer


@torch.no_grad()
def sample_and_measure(policy, value_head, tokenizer, queries, prompts, cfg: PPOConfig, scorers: dict,
                       seed: int) -> dict:
    """Sample replies to held-out prompts (same sampling as training, fixed seed); score them with
    every scorer and measure their KL to the reference (summed over tokens, k1, per sequence)."""
    torch.manual_seed(seed)
    replies, kls = [], []
    for start in range(0, len(queries), cfg.batch_size):
        ro = rollout(policy, queries[start:start + cfg.batch_size], tokenizer.pad_token_id, tokenizer.eos_token_id,
                     cfg.response_length, cfg.temperature, cfg.top_k, cfg.top_p)
        lp = policy_and_reference_logprobs(policy, value_head, ro, cfg.temperature)
        kls += ((lp["logprobs"] - lp["ref_logprobs"]) * ro["response_mask"]).sum(dim=1).tolist()
        replies += decode_responses(tokenizer, ro["response"], ro["response_mask"], tokenizer.eos_token_id)
    scores = {name: fn(prompts, replies).tolist() for name, fn in scorers.items()}
    return {"replies": replies, "kl": kls, **{f"{name}_scores": s for name, s in scores.items()},
            **{f"{name}_mean": sum(s) / len(s) for name, s in scores.items()}, "kl_mean": sum(kls) / len(kls)}


def normalisation(policy, value_head, tokenizer, queries, prompts, cfg, scorer, seed) -> tuple[float, float]:
    """Gain and bias that give SFT replies to ``cfg.reward_norm_samples`` training prompts mean 0 and
    std 1 under ``scorer`` (Ziegler et al. 2019); (1, 0) when the option is off."""
    if cfg.reward_norm_samples <= 0:
        return 1.0, 0.0
    n = cfg.reward_norm_samples
    out = sample_and_measure(policy, value_head, tokenizer, queries[:n], prompts[:n], cfg, {"rm": scorer}, seed)
    s = torch.tensor(out["rm_scores"])
    std = float(s.std()) if len(s) > 1 else 1.0
    return 1.0 / max(std, 1e-6), -float(s.mean()) / max(std, 1e-6)


def run_experiment(precision: str, cfg: Config, ctx, sft_location: str, data: dict) -> dict:
    """EXP at one reward-model precision: train PPO, evaluate before and after; returns its results."""
    p = cfg.ppo
    rm_dir = ctx.path(cfg.reward.output_dir)
    rm_folder = rm_dir / (precision if p.reward_mode == "trained" else "bf16")
    judge_folder = rm_dir / ("judge" if precision == "bf16" else "bf16")
    reward_device = resolve_device(p.reward_device)
    seed_everything(cfg.run.seed, cfg.run.deterministic)  # the same seed for every experiment
    with measure(ctx.device) as m:
        proxy_model, proxy_tok = load_reward_model(rm_folder, precision, reward_device)
        judge_model, judge_tok = load_reward_model(judge_folder, "bf16", reward_device)
        policy, value_head, tokenizer = load_policy(sft_location, p, ctx.device)
        queries, prompts = encode_queries(tokenizer, data["train"], p.max_prompt_length)
        eval_queries, eval_prompts = encode_queries(tokenizer, data["eval"], p.max_prompt_length)
        gain, bias = normalisation(policy, value_head, tokenizer, queries, prompts, p,
                                   reward_scorer(proxy_model, proxy_tok, p, cfg.reward.max_length), cfg.run.seed)
        scorers = {"proxy": reward_scorer(proxy_model, proxy_tok, p, cfg.reward.max_length),
                   "judge": reward_scorer(judge_model, judge_tok, p, cfg.reward.max_length)}
        before = sample_and_measure(policy, value_head, tokenizer, eval_queries, eval_prompts, p, scorers, cfg.run.seed)
        curve = [{"step": 0, "kl": before["kl_mean"], "proxy": before["proxy_mean"], "judge": before["judge_mean"]}]

        def on_step(step, stats):
            if p.eval_every and step % p.eval_every == 0 and step != p.steps:
                point = sample_and_measure(policy, value_head, tokenizer, eval_queries, eval_prompts, p, scorers,
                                           cfg.run.seed)
                curve.append({"step": step, "kl": point["kl_mean"], "proxy": point["proxy_mean"],
                              "judge": point["judge_mean"]})

        out_dir = ctx.path(p.output_dir)
        checkpoints = out_dir / "checkpoints" / precision
        history = train(policy, value_head, tokenizer, queries, prompts,
                        reward_scorer(proxy_model, proxy_tok, p, cfg.reward.max_length, gain, bias), p, checkpoints,
                        cfg.run.seed, on_step, cfg.run.max_oom_backoffs)
        after = sample_and_measure(policy, value_head, tokenizer, eval_queries, eval_prompts, p, scorers, cfg.run.seed)
        curve.append({"step": p.steps, "kl": after["kl_mean"], "proxy": after["proxy_mean"],
                      "judge": after["judge_mean"]})
        staging = out_dir / f".staging-{precision}"
        shutil.rmtree(staging, ignore_errors=True)
        policy.save_pretrained(staging / "adapter")
        save_file(value_head.state_dict(), staging / "value_head.safetensors")
        (staging / "ppo_info.json").write_text(json.dumps(
            {"sft_model": sft_location, "reward_model": str(rm_folder), "reward_precision": precision,
             "policy_precision": p.policy_precision, "steps": p.steps}, indent=2) + "\n")
        swap_in_dir(staging, out_dir / precision)
        if not p.keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    wins = [a > b for a, b in zip(after["judge_scores"], before["judge_scores"])]
    ties = sum(a == b for a, b in zip(after["judge_scores"], before["judge_scores"]))
    return {
        "precision": precision, "reward_model": str(rm_folder), "judge_model": str(judge_folder),
        "reward_gain": gain, "reward_bias": bias, "before": before, "after": after, "curve": curve,
        "win_rate": sum(wins) / len(wins), "win_ties": ties, "history": history, "peak_memory": m,
        "wall_time_s": m["wall_time_s"], "model_dir": str(out_dir / precision),
        "samples": [{"prompt": pr[-1]["content"], "sft": b, "ppo": a}
                    for pr, b, a in zip(eval_prompts, before["replies"], after["replies"])],
    }


def comparison_table(experiments: dict[str, dict]) -> list[dict]:
    """The research plan's table: precision | judge before -> after | proxy after | KL | time | peak memory."""
    rows = []
    for name, e in experiments.items():
        rows.append({
            "reward_precision": name, "judge_before": e["before"]["judge_mean"], "judge_after": e["after"]["judge_mean"],
            "proxy_before": e["before"]["proxy_mean"], "proxy_after": e["after"]["proxy_mean"],
            "kl": e["after"]["kl_mean"], "win_rate": e["win_rate"], "wall_time_s": e["wall_time_s"],
            "peak_cpu_rss_mib": e["peak_memory"]["cpu_peak_rss_mib"],
            "peak_cuda_mib": e["peak_memory"]["cuda_peak_allocated_mib"],
        })
    return rows


def run_alignment(cfg: Config) -> dict:
    """Run stage 4 (every experiment) and write its record; returns ``{"experiments", "table", ...}``.

    Raises:
        ValueError: unknown precision or reward mode.
        FileNotFoundError: missing SFT model, reward models or preference files.
    """
    p = cfg.ppo
    unknown = [e for e in p.experiments if e not in PRECISIONS]
    if unknown or p.reward_mode not in ("trained", "ptq"):
        raise ValueError(f"ppo.experiments must be within {PRECISIONS} and ppo.reward_mode 'trained' or 'ptq'; "
                         f"got {p.experiments}, {p.reward_mode!r}")
    ctx = begin(cfg)
    sft_location = str(ctx.path(cfg.sft.output_dir) / "model" / "merged")
    if not Path(sft_location).exists():
        raise FileNotFoundError(f"{sft_location}: no SFT model; run 02_SFT_Finetuning (python -m edgerlhf.sft) first")
    data_dir = ctx.path(cfg.data.out_dir)
    data = {"train": read_prefs(data_dir / "train_prefs.jsonl"),
            "eval": read_prefs(data_dir / "test_prefs.jsonl")[: p.n_eval_prompts]}
    with measure(ctx.device) as m:
        experiments = {precision: run_experiment(precision, cfg, ctx, sft_location, data) for precision in p.experiments}
    figures = {
        "curves": str(ppo_curves_figure(experiments, ctx.run_dir / "figures" / "ppo_curves.png")),
        "overoptimisation": str(overoptimisation_figure(experiments, ctx.run_dir / "figures" / "ppo_overopt.png")),
    }
    results = {"experiments": experiments, "table": comparison_table(experiments), "figures": figures}
    results["record"] = str(finish(
        ctx, "ppo", results, m,
        model_config={"policy": sft_location, "policy_precision": p.policy_precision, "lora_rank": p.lora_r,
                      "reward_mode": p.reward_mode},
        training_config={k: getattr(p, k) for k in (
            "steps", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "learning_rate",
            "response_length", "init_kl_coef", "adaptive_kl", "target_kl", "gamma", "lam", "cliprange",
            "cliprange_value", "vf_coef", "max_grad_norm", "temperature")},
        data={"train_file": str(data_dir / "train_prefs.jsonl"), "test_file": str(data_dir / "test_prefs.jsonl")},
    ))
    return results


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``python -m edgerlhf.alignment [--profile P] [--config F] [--set K=V ...]``."""
    results = run_alignment(cli_config("Stage 4: PPO against bf16/int8/int4 reward models.", argv))
    print(json.dumps(results["table"], indent=2))


if __name__ == "__main__":
    main()
