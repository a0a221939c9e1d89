"""Stage 4 (04_PPO_Alignment): PPO alignment against the BF16, INT8 and INT4 reward models (EXP-1/2/3).

For each reward-model precision: the same SFT policy, seed and training prompts ->
PPO (:mod:`edgerlhf.core.ppo`, :mod:`edgerlhf.core.ppo_trainer`) -> save -> evaluate on held-out prompts.

Before PPO, best-of-n (:mod:`edgerlhf.core.best_of_n`): ``ppo.best_of_n`` SFT replies to each of
``ppo.best_of_n_prompts`` held-out prompts, sampled once (the SFT model in the reward models' dtype,
:func:`edgerlhf.core.adapters.frozen_dtype`: no PPO reply is compared with them); every proxy (each precision,
trained and post-training quantized) picks its best of the first k, every judge scores the picks; gains, fits and
paired differences between precisions.

Evaluation, the same for every experiment so rows compare:

* the SFT replies to the held-out prompts are sampled once (fixed seed) and shared by all experiments;
* every **judge** stage 3 trained on pairs that no proxy saw scores every experiment: ``judge`` (the
  proxies' recipe at bf16, never the weights of a proxy, also with ``ppo.reward_mode = "ptq"``) and
  ``judge-tfidf`` (TF-IDF of the reply: other evidence, other errors);
* per prompt and judge, the change (PPO reply minus SFT reply) with a paired bootstrap interval, the
  win rate with a Wilson interval, and the minimum detectable change; experiments are compared
  with each other on the same prompts; a direction is concluded only where every judge finds it;
* a check that needs no judge: on held-out labelled pairs, the share where the policy raises
  ``log pi(chosen) - log pi(rejected)`` over the SFT model (the implicit reward of Rafailov et al. 2023);
* the conclusions are stated in words, and withheld when a judge itself did not beat the length
  baseline in stage 3 (``models/rm/evaluation.json``);
* every evaluation samples under :func:`torch.random.fork_rng`, so evaluating changes nothing in
  training (``eval_every`` 0 and 1 give the same trajectory).

Outputs: ``models/ppo/<precision>/`` (LoRA adapter and value head), the stage record with
per-step statistics, the comparison table, and figures. Run without the notebook:
``python -m edgerlhf.ppo_alignment --profile quick``; in N processes (GPUs, or gloo on CPUs):
``accelerate launch --num_processes N -m edgerlhf.ppo_alignment``: each PPO step's prompts are split among the
processes and its gradients summed (:func:`edgerlhf.core.ppo.ppo_update`), every process repeats the evaluations
(the same numbers), and the main process alone writes.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from .core.adapters import compute_dtype, frozen_dtype, nf4_in_compute_dtype, quantization_config, require_finite
from .core.arms import (MOVED_KL, PLACEBO, arm_names, arms_by_algorithm, compare_arms, movement_sentence,
                         net_of_placebo, parse_arm, placebo_scorer, policy_movement)
from .core.best_of_n import curves, describe, fit_gao
from .core.config import Config, PPOStageConfig
from .core.distributed import is_main_process, main_process_writes, process_info
from .core.files import new_staging, swap_in_dir
from .core.hardware import resolve_device
from .core.lm import fit_prompt, pair_logprobs
from .core.logs import tensorboard_writer
from .core.memory import MIB, free_memory, measure
from .core.models import load_causal_lm, load_tokenizer
from .core.plots import algorithms_figure, best_of_n_figure, overoptimisation_figure, ppo_curves_figure
from .core.rollout import decode_responses, reference_logprobs, rollout
from .core.ppo_trainer import build_policy, checkpoint_to_resume, run_signature, train
from .core.prefs import TEST, TRAIN, check_data_set, read_prefs, split_pairs
from .core.provenance import check_reward_inputs, check_reward_set, sft_identity
from .core.reproducibility import seed_everything
from .core.reward_scoring import HEAD, JUDGES, backbone_of, load_reward_model, read_info, score, weights_digest
from .core.stage import begin, cli_main, finish, recorded
from .core.stats import ALPHA, mde_paired_mean, paired_bootstrap, wilson_interval
from .core.templates import ensure_chat_template, ppo_pad_token, render_prompt
from .core.trl_arms import reward_function, train_dpo, train_online

JUDGE = JUDGES[0]  # required; the other judges of :data:`edgerlhf.core.reward_scoring.JUDGES` are used when present


def load_policy(sft_location: str, cfg: PPOStageConfig, device: torch.device, dtype: torch.dtype | None = None):
    """The SFT model (its LoRA already merged in stage 2) at ``cfg.policy_precision`` with a fresh
    PPO adapter and a zero value head; the adapter disabled is the reference model.

    For an int8/int4 policy the merged full-precision weights are quantized on load (merge first,
    then quantize). Returns ``(policy, value_head, tokenizer)``.

    ``dtype`` of the frozen base; None: :func:`edgerlhf.core.adapters.compute_dtype` (float32 on a CPU: in bf16 on an
    AMX CPU a quick-profile PPO arm took as long, docs/measurements.md).
    """
    dtype = dtype or compute_dtype(device)
    qc = quantization_config(cfg.policy_precision, dtype)
    if qc is None:
        model = load_causal_lm(sft_location, dtype).to(device)
    else:
        model = nf4_in_compute_dtype(load_causal_lm(sft_location, dtype, quantization_config=qc,
                                                    device_map={"": str(device)}))
    policy, value_head = build_policy(model.eval(), cfg)
    tokenizer = load_tokenizer(sft_location)
    ensure_chat_template(tokenizer)
    ppo_pad_token(tokenizer)
    return policy, value_head, tokenizer


def share_frozen_weights(reward_model, policy) -> float:
    """Point the reward model's backbone weights at the policy's frozen base weights wherever they are the
    same tensor values, so the process holds the SFT backbone once instead of once per model (stage 3's
    probes and judge are that backbone, frozen, plus a head).

    Safe because neither side changes them: PPO trains only the LoRA adapter and the value head and never
    merges the adapter into the base weights. Only floating-point parameters with the same name (peft's
    ``.base_layer`` removed), shape, dtype, device and values are shared; quantized or different weights are
    left alone. Returns the weights no longer held twice, in MiB.
    """
    base = {name.replace(".base_layer", ""): param
            for name, param in backbone_of(policy.get_base_model()).named_parameters()}
    shared = 0
    for name, param in backbone_of(reward_model).named_parameters():
        other = base.get(name)
        if (other is None or not param.dtype.is_floating_point or other.dtype != param.dtype
                or other.shape != param.shape or other.device != param.device or other.data_ptr() == param.data_ptr()):
            continue
        if torch.equal(param, other):
            param.data = other.data
            shared += param.numel() * param.element_size()
    return shared / MIB


def encode_queries(tokenizer, rows: list[dict], max_prompt_length: int,
                   counts: dict | None = None) -> tuple[list[list[int]], list[list[dict]]]:
    """Token ids of the rendered prompts, truncated from the left by whole turns to ``max_prompt_length``
    tokens; a prompt whose last user turn alone is longer is skipped, and counted into ``counts``
    (``"prompts_kept"``, ``"prompts_truncated"``, ``"prompts_dropped"``) when given.

    Returns:
        ``(queries, prompts)`` of equal length.
    Raises:
        ValueError: no prompt fits (names ``ppo.max_prompt_length``).
    """
    queries, prompts, seen = [], [], {"prompts_kept": 0, "prompts_truncated": 0, "prompts_dropped": 0}
    for row in rows:
        messages, cut = fit_prompt(tokenizer, row["prompt"], [""], max_prompt_length)
        if messages is None:
            seen["prompts_dropped"] += 1
            continue
        seen["prompts_kept"] += 1
        seen["prompts_truncated"] += int(cut)
        queries.append(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
        prompts.append(messages)
    if rows and not queries:
        raise ValueError(f"none of the {len(rows)} prompts fits ppo.max_prompt_length={max_prompt_length} tokens, "
                         "even with only its last user turn")
    if counts is not None:
        counts.update(seen)
    return queries, prompts


def dpo_pairs(tokenizer, rows: list[dict], max_prompt_length: int) -> list[dict]:
    """Preference rows as TRL's ``DPOTrainer`` takes them (``prompt``: messages, ``chosen`` / ``rejected``: one
    assistant message each), the prompt cut to ``max_prompt_length`` tokens as :func:`encode_queries` cuts PPO's; a
    row whose last user turn alone is longer is left out."""
    out = []
    for row in rows:
        messages, _ = fit_prompt(tokenizer, row["prompt"], [""], max_prompt_length)
        if messages is not None:
            out.append({"prompt": messages, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                        "rejected": [{"role": "assistant", "content": row["rejected"]}]})
    return out


def reward_scorer(model, tokenizer, cfg: PPOStageConfig, max_length: int, gain: float = 1.0, bias: float = 0.0,
                  counts: dict | None = None):
    """``scorer(prompts, replies) -> FloatTensor[B]``: the reward model's score times ``gain`` plus ``bias``;
    over-long items are fitted from the left and counted into ``counts``
    (see :func:`edgerlhf.core.reward_scoring.score`)."""
    def scorer(prompts, replies):
        return gain * score(model, tokenizer, prompts, replies, cfg.score_batch_size, max_length, counts) + bias
    return scorer


@contextmanager
def isolated_rng(seed: int, device: torch.device):
    """Run the block on its own random stream seeded with ``seed``; the caller's torch CPU (and CUDA)
    RNG state is restored afterwards (``torch.random.fork_rng``), so an evaluation in the middle of
    training does not change the rollouts that follow it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample_replies(policy, tokenizer, queries, cfg: PPOStageConfig, seed: int, value_head=None) -> dict:
    """Sample one reply per held-out prompt (training's sampling, fixed ``seed``, isolated RNG), ``cfg.eval_batch_size``
    prompts per ``generate`` call (None: ``cfg.batch_size``).

    With ``value_head`` given, also the KL of each reply to the reference (adapter disabled):
    ``sum_t log pi - log pi_ref`` over its tokens (k1, nats per reply). Returns ``{"replies", "tokens", "kl"}``
    (``tokens``: each reply's length in tokens, its EOS included).
    """
    device = next(policy.parameters()).device
    replies, tokens, kls = [], [], []
    with isolated_rng(seed, device):
        batch = cfg.eval_batch_size or cfg.batch_size
        for start in range(0, len(queries), batch):
            ro = rollout(policy, queries[start:start + batch], tokenizer.pad_token_id,
                         tokenizer.eos_token_id, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                         min_new_tokens=cfg.min_new_tokens, value_head=value_head)
            if value_head is not None:
                ref = reference_logprobs(policy, ro, cfg.temperature)
                kls += ((ro["logprobs"] - ref) * ro["response_mask"]).sum(dim=1).tolist()
            replies += decode_responses(tokenizer, ro["response"], ro["response_mask"], tokenizer.eos_token_id)
            tokens += ro["response_mask"].sum(dim=1).tolist()
    return {"replies": replies, "tokens": tokens, "kl": kls or None}


def sample_and_measure(policy, value_head, tokenizer, queries, prompts, cfg: PPOStageConfig, scorers: dict,
                       seed: int) -> dict:
    """Sample replies to held-out prompts (:func:`sample_replies`), score them with every scorer and
    measure their KL to the reference. Returns replies, per-reply KL and scores, and their means."""
    out = sample_replies(policy, tokenizer, queries, cfg, seed, value_head)
    scores = {name: fn(prompts, out["replies"]).tolist() for name, fn in scorers.items()}
    return {"replies": out["replies"], "tokens": out["tokens"], "kl": out["kl"],
            **{f"{name}_scores": s for name, s in scores.items()},
            **{f"{name}_mean": float(np.mean(s)) for name, s in scores.items()}, "kl_mean": float(np.mean(out["kl"]))}


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


def proxy_location(rm_dir: Path, name: str) -> tuple[Path, str]:
    """Folder and precision of a proxy named as in stage 3's table: ``int8`` -> ``(rm_dir/int8, "int8")``;
    ``int8-ptq`` (post-training quantized) -> ``(rm_dir/bf16, "int8")``."""
    precision, _, ptq = name.partition("-")
    return rm_dir / ("bf16" if ptq else precision), precision


@torch.no_grad()
def best_of_n_replies(policy, tokenizer, rows: list[dict], cfg: PPOStageConfig, seed: int) -> dict:
    """``cfg.best_of_n`` SFT replies to each of ``rows``' prompts (:func:`sample_replies`, one fixed ``seed``),
    shared by every proxy. Returns ``{"prompts": [P], "replies": [P][n], "tokens": int[P, n]}``."""
    n = cfg.best_of_n
    queries, prompts = encode_queries(tokenizer, rows, cfg.max_prompt_length)
    out = sample_replies(policy, tokenizer, [q for q in queries for _ in range(n)], cfg, seed)
    return {"prompts": prompts, "replies": [out["replies"][i * n:(i + 1) * n] for i in range(len(rows))],
            "tokens": np.asarray(out["tokens"]).reshape(len(rows), n)}


def shared_backbones(rm_dir: Path, proxies: list[str]) -> list[list[tuple[str, Path, str]]]:
    """``proxies`` (stage 3's names) grouped by the backbone states their heads read (:func:`states_key`): pooled
    probes on the same backbone folder, precision, block and pooling (``int8`` and ``int8-ptq`` read the same int8
    states) share one pass; any other model is a group of its own. Returns groups of ``(name, folder, precision)``
    in first-seen order (:func:`proxy_location`)."""
    groups: dict = {}
    for name in proxies:
        folder, precision = proxy_location(rm_dir, name)
        groups.setdefault(states_key(folder, precision) or name, []).append((name, folder, precision))
    return list(groups.values())


def states_key(folder: Path, precision: str) -> tuple | None:
    """What a pooled probe's head reads: ``(backbone folder, precision, blocks, pooling)``; None for a model whose
    head cannot share a pass (a LoRA model, a merged model, or ``last`` pooling through the model's own head)."""
    info = read_info(folder)
    if info["layout"] != "head" or info.get("pooling", "last") == "last":
        return None
    return info["backbone"], precision, info.get("num_layers"), info["pooling"]


def best_of_n_evaluation(samples: dict, rm_dir: Path, verdicts: dict, judges: dict, cfg: Config, ctx) -> dict:
    """Score every best-of-n reply with every proxy of stage 3's table (``verdicts``: ``evaluation.json``'s
    ``models``, judges left out; loaded one at a time) and every judge, then :func:`edgerlhf.core.best_of_n.curves`
    and its words. Adds ``proxy_scores``/``judge_scores`` (``[P][n]``, for re-analysis), the replies to the first 2
    prompts, each scorer's truncation counts, and the seconds spent sampling (``samples["sampling_s"]``) and
    scoring.

    Raises:
        ValueError: a judge is one of the proxies (:func:`judge_is_independent`), or a score is not finite.
    """
    p, n = cfg.ppo, cfg.ppo.best_of_n
    started = time.perf_counter()
    flat_prompts = [pr for pr in samples["prompts"] for _ in range(n)]
    flat_replies = [r for replies in samples["replies"] for r in replies]
    shape = (len(samples["prompts"]), n)
    proxy_scores, judge_scores, truncation, device = {}, {}, {}, resolve_device(p.reward_device)
    riders = {name: states_key(j["folder"], "bf16") for name, j in judges.items() if j["model"] is not None}
    for members in shared_backbones(rm_dir, [m for m in verdicts if m not in judges]):
        names = [name for name, _, _ in members]
        ctx.step = f"best-of-{n}: scoring with {', '.join(names)}"
        for _, folder, _ in members:
            for judge in judges.values():
                judge_is_independent(judge["folder"], folder)
        heads = {}
        for name, folder, precision in members[1:]:  # each other head loaded (and checked) whole, one at a time
            other, _ = load_reward_model(folder, precision, device)
            heads[name] = getattr(other, HEAD).weight.detach().clone()
            del other
        name, folder, precision = members[0]
        key = states_key(folder, precision)
        riding = [j for j, k in riders.items() if key is not None and k == key and j not in judge_scores]
        heads.update({f"judge {j}": getattr(judges[j]["model"], HEAD).weight for j in riding})  # same states
        model, tok = load_reward_model(folder, precision, device)
        counts = {}
        scores = score(model, tok, flat_prompts, flat_replies, p.score_batch_size, cfg.reward.max_length, counts,
                       heads={name: getattr(model, HEAD).weight, **heads} if heads else None)
        for name in names:
            proxy_scores[name] = (scores[name] if heads else scores).numpy().reshape(shape)
            truncation[name] = counts
        for j in riding:
            judge_scores[j] = scores[f"judge {j}"].numpy().reshape(shape)
        del model
        free_memory()
    ctx.step = f"best-of-{n}: scoring with the judges"
    judge_scores.update({name: j["scorer"](flat_prompts, flat_replies).numpy().reshape(shape)
                         for name, j in judges.items() if name not in judge_scores})
    judge_scores = {name: judge_scores[name] for name in judges}
    out = curves(proxy_scores, judge_scores, samples["tokens"], reference="bf16", seed=cfg.run.seed)
    out["words"] = describe(out, unlearned=tuple(name for name in judges if not verdicts[name]["learned"]))
    out.update(proxy_scores={k: v.tolist() for k, v in proxy_scores.items()},
               judge_scores={k: v.tolist() for k, v in judge_scores.items()}, tokens=samples["tokens"].tolist(),
               truncation=truncation, sampling_s=samples["sampling_s"], sampling_dtype=samples.get("sampling_dtype"),
               scoring_s=time.perf_counter() - started,
               examples=[{"prompt": pr[-1]["content"], "replies": replies}
                         for pr, replies in zip(samples["prompts"][:2], samples["replies"][:2])])
    return out


def judge_is_independent(judge_folder: Path, proxy_folder: Path) -> None:
    """Check that the judge is not a proxy: a different folder and different trained weights.

    Raises:
        ValueError: the judge and the proxy are the same folder, or hold the same trained weights.
    """
    if judge_folder.resolve() == proxy_folder.resolve() or weights_digest(judge_folder) == weights_digest(proxy_folder):
        raise ValueError(f"the judge {judge_folder} has the same weights as the proxy {proxy_folder}: a policy "
                         "cannot be judged by the reward model it was trained against")


def rm_verdicts(rm_dir: Path) -> dict:
    """Stage 3's held-out verdicts (``models/rm/evaluation.json``).

    Raises:
        FileNotFoundError: stage 3 has not written them (the message names the notebook to run).
    """
    path = rm_dir / "evaluation.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no reward-model evaluation; run 03_Reward_Modeling "
                                "(python -m edgerlhf.reward_modeling) first")
    return json.loads(path.read_text())


def load_judges(rm_dir: Path, cfg: Config) -> dict[str, dict]:
    """Every judge folder of :data:`JUDGES` present under ``rm_dir``, loaded for scoring.

    Returns ``{name: {"folder", "model", "scorer", "truncation"}}``; ``scorer(prompts, replies) -> FloatTensor[B]``.
    ``model`` is the reward model (None for TF-IDF, which reads the reply's words only).

    Raises:
        FileNotFoundError: no ``judge`` folder (stage 3 ran with ``reward.judge=false``).
    """
    if not (rm_dir / JUDGE).exists():
        raise FileNotFoundError(f"{rm_dir / JUDGE}: no judge reward model; run 03_Reward_Modeling with reward.judge=true")
    out = {}
    for name in (j for j in JUDGES if (rm_dir / j).exists()):
        folder, truncation = rm_dir / name, {}
        if (folder / "tfidf.json").exists():
            from .core.baselines import TfidfReward  # on use: scikit-learn loads scipy.stats (see test_packaging)

            tfidf = TfidfReward.load(folder)
            out[name] = {"folder": folder, "model": None, "truncation": None,
                         "scorer": lambda prompts, replies, m=tfidf: torch.tensor(m.score(replies), dtype=torch.float32)}
        else:
            model, tok = load_reward_model(folder, "bf16", resolve_device(cfg.ppo.reward_device))
            out[name] = {"folder": folder, "model": model, "truncation": truncation,
                         "scorer": reward_scorer(model, tok, cfg.ppo, cfg.reward.max_length, counts=truncation)}
    return out


def judge_effect(after, before, seed: int) -> dict:
    """One judge's verdict on one experiment, paired per prompt: the mean change (PPO reply - SFT reply) with a
    paired bootstrap interval (:func:`edgerlhf.core.stats.paired_bootstrap`), the minimum detectable change (80%
    power), and the win rate (ties count half) with a Wilson interval. ``after``, ``before``: ``float[n]``."""
    after, before = np.asarray(after, float), np.asarray(before, float)
    change, n = paired_bootstrap(after, before, seed=seed), len(after)
    wins = float(np.sum(after > before) + 0.5 * np.sum(after == before))
    return {"before_mean": float(before.mean()), "after_mean": float(after.mean()), "change": change,
            "change_mde": mde_paired_mean(n, change["sd_difference"]), "win_rate": wins / n,
            "win_rate_ci95": wilson_interval(wins, n), "win_ties": int(np.sum(after == before))}


def preference_margins(model, tokenizer, rows: list[dict], batch_size: int) -> np.ndarray:
    """``log pi(chosen | prompt) - log pi(rejected | prompt)`` of each labelled pair under ``model`` (temperature
    1), ``float[N]`` nats (:func:`edgerlhf.core.lm.pair_logprobs`: the prompt run once per pair). ``batch_size``
    replies per batch on a GPU; one pair at a time on a CPU, where padding replies together cost more than
    batching saved (docs/measurements.md)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    chosen, rejected = pair_logprobs(model, tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                     [r["rejected"] for r in rows], 1 if on_cpu else max(1, batch_size // 2))
    return (chosen - rejected).numpy()


def implicit_reward_check(policy_margins, sft_margins, seed: int) -> dict:
    """The judge-free check: ``h = (policy margin) - (SFT margin)`` per held-out labelled pair, the implicit reward
    of DPO (Rafailov et al. 2023) up to its ``beta``. Returns the share of pairs with ``h > 0`` (ties half) with
    its Wilson interval and the exact sign test of "no more often than not" (``scipy.stats.binomtest`` on the
    untied pairs), and the mean ``h`` (nats) with its paired bootstrap interval."""
    from scipy.stats import binomtest

    h = np.asarray(policy_margins, float) - np.asarray(sft_margins, float)
    up, untied = int(np.sum(h > 0)), int(np.sum(h != 0))
    share = (up + 0.5 * (len(h) - untied)) / len(h)
    return {"n": len(h), "share_chosen_raised": share, "share_ci95": wilson_interval(up + 0.5 * (len(h) - untied),
                                                                                     len(h)),
            "sign_test_p": float(binomtest(up, untied, 0.5).pvalue) if untied else 1.0, "ties": len(h) - untied,
            "mean_nats": paired_bootstrap(policy_margins, sft_margins, seed=seed)}


def checkpoint_folder(out_dir: Path, arm: str, seed: int, first: bool) -> Path:
    """Where one arm's PPO run under ``seed`` checkpoints: ``checkpoints/<arm>`` for the first seed (the run whose
    policy is saved), ``checkpoints/<arm>-seed<seed>`` for the others."""
    return out_dir / "checkpoints" / (arm if first else f"{arm}-seed{seed}")


def with_seeds(done: list[dict]) -> dict:
    """One arm's record from its runs, one per seed: the first seed's record whole, plus, with two or more seeds,
    ``after_by_seed`` (each run's evaluation, what :func:`edgerlhf.core.arms.compare_arms` pairs) and ``seed_runs``
    (each other run's judge changes, implicit-reward check, KL, steps, time and peak memory); ``wall_time_s`` is
    then the sum over seeds."""
    first = dict(done[0])
    if len(done) > 1:
        first["after_by_seed"] = [d["after"] for d in done]
        first["seed_runs"] = [{k: d[k] for k in ("seed", "judges", "implicit_reward", "history", "wall_time_s",
                                                 "phase_s", "peak_memory", "resumed_from")} for d in done[1:]]
        first["wall_time_s"] = float(sum(d["wall_time_s"] for d in done))
    return first


def run_experiment(arm: str, cfg: Config, ctx, sft_location: str, shared: dict, seed: int | None = None,
                   save: bool = True) -> dict:
    """One arm (:func:`edgerlhf.core.arms.arm_names`) under one training ``seed`` (None: ``run.seed``): PPO against a
    reward-model precision (EXP-1/2/3), :data:`~edgerlhf.core.arms.PLACEBO` (PPO on random rewards on the bf16
    proxy's scale), RLOO or GRPO against a precision, or DPO on the proxies' training pairs
    (:mod:`edgerlhf.core.trl_arms`); arms without a reward model of their own are scored by the bf16 proxy. Then
    evaluate the held-out prompts after training against the shared SFT replies, with every judge, and the
    implicit-reward check; returns its results. ``save``: write the policy to ``models/ppo/<arm>`` (the first seed's
    run); the others checkpoint under ``<arm>-seed<seed>``.

    Raises:
        ValueError: the trained policy adapter or value head holds NaN or inf; the experiment's last good model
            folder is kept as it was.
    """
    p = cfg.ppo
    seed = cfg.run.seed if seed is None else seed
    placebo = arm == PLACEBO
    algorithm, precision = parse_arm(arm)
    own_reward = precision is not None  # the placebo and DPO train on no reward model; the bf16 proxy scores them
    precision = precision or "bf16"
    rm_dir = ctx.path(cfg.reward.output_dir)
    rm_folder = rm_dir / (precision if p.reward_mode == "trained" else "bf16")
    for judge in shared["judges"].values():
        judge_is_independent(judge["folder"], rm_folder)
    reward_device = resolve_device(p.reward_device)
    seed_everything(seed, cfg.run.deterministic)  # the same seed for every arm: common random numbers
    eval_queries, eval_prompts = shared["eval_queries"], shared["eval_prompts"]
    before = shared["before"]
    phase_s, clock = {}, [time.perf_counter()]

    def lap(name: str) -> None:  # seconds since the previous lap, recorded under ``name``
        now = time.perf_counter()
        phase_s[name] = round(now - clock[0], 3)
        clock[0] = now

    with measure(ctx.device) as m:
        ctx.step = f"experiment {arm}: loading"
        proxy_model, proxy_tok = load_reward_model(rm_folder, precision, reward_device)
        policy, value_head, tokenizer = load_policy(sft_location, p, ctx.device)
        shared_mib = {"proxy": share_frozen_weights(proxy_model, policy),
                      **{name: share_frozen_weights(j["model"], policy)
                         for name, j in shared["judges"].items() if j["model"] is not None}}
        prompt_counts, truncation = {}, {}
        queries, prompts = encode_queries(tokenizer, shared["train"], p.max_prompt_length, prompt_counts)
        proxy = reward_scorer(proxy_model, proxy_tok, p, cfg.reward.max_length, counts=truncation)
        gain, bias = (normalisation(policy, value_head, tokenizer, queries, prompts, p, proxy, cfg.run.seed)
                      if algorithm != "dpo" else (1.0, 0.0))
        scorers = {"proxy": proxy, **{name: j["scorer"] for name, j in shared["judges"].items()}}
        proxy_before = proxy(eval_prompts, before["replies"]).tolist()
        # the evaluation curve, checkpointed with the policy so that a resumed run keeps its points
        extra = {"curve": [{"step": 0, "kl": 0.0, "proxy": float(np.mean(proxy_before)),
                            **{name: float(np.mean(before[f"{name}_scores"])) for name in shared["judges"]}}]}

        lap("loading_s")
        board = tensorboard_writer(cfg.run.report_to, ctx.run_dir, f"ppo/{arm}") if is_main_process() else None
        # the placebo arm's rewards: random, on the scale the proxy's normalised scores of SFT replies have
        training_reward = (placebo_scorer(gain * float(np.mean(proxy_before)) + bias,
                                          gain * float(np.std(proxy_before)), seed) if placebo else
                           reward_scorer(proxy_model, proxy_tok, p, cfg.reward.max_length, gain, bias, truncation))

        def on_step(step, stats):
            ctx.step = f"experiment {arm}: PPO step {step} of {p.steps} done"
            if p.eval_every and step % p.eval_every == 0 and step != p.steps:
                point = sample_and_measure(policy, value_head, tokenizer, eval_queries, eval_prompts, p, scorers,
                                           seed)
                extra["curve"].append({"step": step, "kl": point["kl_mean"], "proxy": point["proxy_mean"],
                                       **{name: point[f"{name}_mean"] for name in shared["judges"]}})

        out_dir = ctx.path(p.output_dir)
        checkpoints = checkpoint_folder(out_dir, arm, seed, save)
        if algorithm == "ppo":
            history = train(policy, value_head, tokenizer, queries, prompts, training_reward, p,
                            checkpoints, seed, on_step, cfg.run.max_oom_backoffs, extra, board)
        elif algorithm == "dpo":
            history = train_dpo(policy, tokenizer, shared["dpo_pairs"], p, seed, checkpoints, ctx.device,
                                cfg.reward.max_length)
        else:
            history = train_online(algorithm, policy, tokenizer, prompts, reward_function(training_reward), p, seed,
                                   checkpoints, ctx.device)
        if board is not None:
            board.close()
        curve = extra["curve"]
        lap("ppo_s")
        ctx.step = f"experiment {arm}: evaluation after training"
        after = sample_and_measure(policy, value_head, tokenizer, eval_queries, eval_prompts, p, scorers, seed)
        lap("evaluation_s")
        curve.append({"step": p.steps, "kl": after["kl_mean"], "proxy": after["proxy_mean"],
                      **{name: after[f"{name}_mean"] for name in shared["judges"]}})
        ctx.step = f"experiment {arm}: implicit-reward check"
        implicit = implicit_reward_check(preference_margins(policy, tokenizer, shared["labelled"], p.score_batch_size),
                                         shared["sft_margins"], cfg.run.seed)
        lap("implicit_reward_s")
        ctx.step = f"experiment {arm}: saving"  # a diverged policy fails here: the last good model stays
        kept = f"{arm}; {out_dir / arm} is kept as it was"
        try:
            require_finite(get_peft_model_state_dict(policy), f"PPO policy adapter ({kept})")
            require_finite(value_head.state_dict(), f"PPO value head ({kept})")
        except ValueError:  # diverged: its checkpoints would only resume the divergence and block the next run
            main_process_writes(shutil.rmtree, checkpoints, ignore_errors=True)
            raise

        def write_policy():  # every process holds the same policy: the main one writes it
            staging = new_staging(out_dir / arm, ctx.run_dir.name)
            policy.save_pretrained(staging / "adapter")
            save_file(value_head.state_dict(), staging / "value_head.safetensors")
            (staging / "ppo_info.json").write_text(json.dumps(
                {"sft_model": sft_location, "reward_model": str(rm_folder) if own_reward else None,
                 "algorithm": algorithm, "reward_precision": precision if own_reward else None,
                 "policy_precision": p.policy_precision, "steps": p.steps}, indent=2) + "\n")
            swap_in_dir(staging, out_dir / arm)

        if save:
            main_process_writes(write_policy)
        if not p.keep_checkpoints:
            main_process_writes(shutil.rmtree, checkpoints, ignore_errors=True)
        lap("saving_s")
    proxy_name = precision if p.reward_mode == "trained" else ("bf16" if precision == "bf16" else f"{precision}-ptq")
    return {
        "precision": arm, "algorithm": algorithm, "reward_model": str(rm_folder) if own_reward else None,
        "proxy": proxy_name, "placebo": placebo,
        "proxy_verdict": shared["verdicts"]["models"].get(proxy_name) if own_reward else None,
        "reward_gain": gain, "reward_bias": bias,
        "before": {"replies": before["replies"], "tokens": before["tokens"], "proxy_scores": proxy_before,
                   "proxy_mean": float(np.mean(proxy_before)), "kl_mean": 0.0, **{f"{name}_scores": before[f"{name}_scores"] for name in shared["judges"]}},
        "after": after, "curve": curve,
        "judges": {name: judge_effect(after[f"{name}_scores"], before[f"{name}_scores"], cfg.run.seed)
                   for name in shared["judges"]},
        "implicit_reward": implicit,
        "training_prompts": prompt_counts, "reward_truncation": truncation, "weights_shared_mib": shared_mib,
        "resumed_from": extra.get("resumed_from"), "seed": seed,
        "history": history, "peak_memory": m, "wall_time_s": m["wall_time_s"], "phase_s": phase_s,
        "model_dir": str(out_dir / arm) if save else None,
        "samples": [{"prompt": pr[-1]["content"], "sft": b, "ppo": a, "sft_tokens": before["tokens"][i],
                     "ppo_tokens": after["tokens"][i], "proxy_sft": proxy_before[i],
                     "proxy_ppo": after["proxy_scores"][i],
                     **{f"{name}_{when}": scores[i] for name in shared["judges"]
                        for when, scores in (("sft", before[f"{name}_scores"]), ("ppo", after[f"{name}_scores"]))}}
                    for i, (pr, b, a) in enumerate(zip(eval_prompts, before["replies"], after["replies"]))],
    }


def sample_views(samples: list[dict], judge: str = "judge", k: int = 2, seed: int = 0) -> list[dict]:
    """The held-out replies a reader should see side by side: the ``k`` whose ``judge`` score rose most under PPO,
    the ``k`` where it fell most and ``k`` drawn at random from the rest (``seed``), each sample with ``shown``
    (why it is shown), ``judge_change`` and ``length_change`` (PPO − SFT reply tokens) added. Picking the top
    gains alone would hide what PPO made worse.

    Raises:
        KeyError: the samples carry no ``<judge>_sft`` / ``<judge>_ppo`` scores.
    """
    rows = [{**s, "judge_change": s[f"{judge}_ppo"] - s[f"{judge}_sft"],
             "length_change": s["ppo_tokens"] - s["sft_tokens"]} for s in samples]
    order = sorted(range(len(rows)), key=lambda i: rows[i]["judge_change"])
    best, worst = order[::-1][:k], [i for i in order[:k] if i not in order[::-1][:k]]
    rest = [i for i in range(len(rows)) if i not in best and i not in worst]
    chosen = np.random.default_rng(seed).choice(rest, size=min(k, len(rest)), replace=False).tolist() if rest else []
    return ([{"shown": f"largest {judge} gain", **rows[i]} for i in best]
            + [{"shown": f"largest {judge} loss", **rows[i]} for i in worst]
            + [{"shown": "random", **rows[i]} for i in sorted(chosen)])


def direction(ci) -> int:
    """+1 where an interval ``[lo, hi]`` lies above 0, -1 where below, 0 where it holds 0."""
    return 1 if ci[0] > 0 else (-1 if ci[1] < 0 else 0)


def _ci(ci, digits: int = 3) -> str:
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def conclusions(experiments: dict[str, dict], judges: dict[str, dict], seed: int, net: dict | None = None) -> list[str]:
    """What the PPO table allows one to conclude, in words generated from its numbers.

    Only comparisons get a verdict: each arm against the placebo (``net``, :func:`edgerlhf.core.arms.net_of_placebo`)
    and each precision against bf16 after PPO, both per prompt with Holm's correction over the arms inside each
    judge's family. A direction is stated only where every judge finds it (Holm-adjusted p < 0.05, same sign); a
    difference that every judge finds but that the length-controlled difference does not is said to be explained by
    length. A single arm's change from the SFT replies is given as numbers only. Withheld when a judge did not beat
    the length baseline in stage 3; an arm whose proxy did not is labelled as having optimised a length proxy. The
    implicit-reward check (no judge) is stated per arm.

    Args:
        judges: ``{name: stage 3's verdict}`` (``accuracy``, ``accuracy_ci95``, ``learned``, ``vs_length``).
        net: the arms against the placebo; None when no placebo arm ran.
    """
    weak = [name for name, j in judges.items() if not j["learned"]]
    if weak:
        accuracies = ", ".join(f"{judges[n]['accuracy']:.3f}" for n in weak)
        one = len(weak) == 1
        return [f"Withheld: {', '.join(weak)} (held-out accuracy {accuracies}) {'does' if one else 'do'} not beat "
                f"the length baseline, so a change in {'its score' if one else 'their scores'} says nothing about "
                "alignment quality; no conclusion about PPO is drawn from the judges (the implicit-reward check below "
                "needs none)."] + [
            implicit_sentence(name, e["implicit_reward"]) for name, e in experiments.items()]
    out = [f"{len(judges)} judge{'s' if len(judges) > 1 else ''}, trained on pairs no proxy saw: " + "; ".join(
        f"{name} held-out accuracy {j['accuracy']:.3f} [{j['accuracy_ci95'][0]:.3f}, {j['accuracy_ci95'][1]:.3f}], "
        f"better than the length baseline (p = {j['vs_length']['p_value']:.3g})" for name, j in judges.items())
        + ("." if len(judges) > 1 else "; with one judge, the directions below rest on it alone.")]
    if net is None:
        out.append("No placebo arm (ppo.placebo = false): a change after PPO mixes the reward model's effect with the "
                   "drift any PPO run causes, so no arm gets a verdict of its own; only arms are compared.")
    for name, e in experiments.items():
        effects = e["judges"]
        n = next(iter(effects.values()))["change"]["n"]
        text = f"{name}: judge score change per prompt (PPO - SFT reply, n = {n}): " + "; ".join(
            f"{j} {v['change']['mean_difference']:+.3f} {_ci(v['change']['ci'])}" for j, v in effects.items())
        if net is not None and name in net:
            text += "; " + _net_sentence(name, net[name], list(effects))
        if (e.get("proxy_verdict") or {}).get("learned") is False:
            text += f"; its proxy {e['proxy']} did NOT learn more than length, so this run optimised a length proxy"
        out += [text, implicit_sentence(name, e["implicit_reward"])]
    judge_names = list(next(iter(experiments.values()))["judges"])
    for algorithm, names in arms_by_algorithm(experiments).items():
        reference, precisions = names.get("bf16"), [n for precision, n in names.items() if precision != "bf16"]
        if reference is None or not precisions:
            continue
        versus = compare_arms(experiments, precisions, reference, judge_names, seed)
        for a in precisions:
            d = experiments[a]["vs_bf16_after"] = versus[a]
            agreed = holm_direction(d)
            verdict = (f"every judge scores the {a}-aligned policy {'higher' if agreed > 0 else 'lower'}" if agreed
                       else "no difference detectable by every judge (minimum detectable " + ", ".join(
                           f"{j} {x['mde']:.3f}" for j, x in d.items()) + ")")
            out.append(f"{a} vs {reference} after {algorithm.upper()}, same prompts "
                       f"({d[judge_names[0]]['interval']}), Holm over {len(precisions)} precisions: " + "; ".join(
                           f"{j} {x['mean_difference']:+.3f} {_ci(x['ci'])} (p_Holm {x['p_holm']:.2g})"
                           for j, x in d.items()) + f": {verdict}")
    return out


def rl_fits(curve: list[dict], judges: list[str]) -> dict[str, dict | None]:
    """Gao et al. (2023)'s RL form ``d (alpha - beta log d)`` (:func:`edgerlhf.core.best_of_n.fit_gao`,
    ``form="rl"``) of each judge's change since step 0 against ``d = sqrt(KL)`` over an arm's evaluation curve
    (``[{"kl", <judge>: mean score}]``, KL in nats per reply). Point estimates; None for a judge where fewer than
    three evaluations have KL > 0 (two parameters need a third point to be a fit, not an interpolation)."""
    d = np.sqrt(np.clip([c["kl"] for c in curve], 0.0, None))
    if np.sum(d > 0) < 3:
        return {j: None for j in judges}
    out = {}
    for j in judges:
        alpha, beta = fit_gao(d, [c[j] - curve[0][j] for c in curve], "rl")
        out[j] = {"alpha": alpha, "beta": beta, "points": int(np.sum(d > 0))}
    return out


def holm_direction(tests: dict[str, dict], alpha: float = ALPHA) -> int:
    """+1 / -1 where every judge's test is below ``alpha`` after Holm's correction with the same sign, else 0."""
    found = {int(np.sign(t["mean_difference"])) if t["p_holm"] < alpha else 0 for t in tests.values()}
    return found.pop() if len(found) == 1 else 0


def _net_sentence(name: str, net: dict, judges: list[str]) -> str:
    """One arm against the placebo in words (:func:`edgerlhf.core.arms.net_of_placebo`)."""
    size = net[judges[0]]["family_size"]
    parts = [f"{j} {net[j]['mean_difference']:+.3f} {_ci(net[j]['ci'])} (p_Holm {net[j]['p_holm']:.2g}; "
             f"length-controlled {net[j]['length_controlled']['intercept']:+.3f} "
             f"{_ci(net[j]['length_controlled']['ci'])})" for j in judges]
    agreed = holm_direction({j: net[j] for j in judges})
    if agreed:
        verdict = f"every judge scores the {name} policy {'above' if agreed > 0 else 'below'} the placebo policy"
        held = [j for j in judges if direction(net[j]["length_controlled"]["ci"]) == agreed]
        if len(held) < len(judges):
            verdict += (", but not once length is controlled under " + ", ".join(j for j in judges if j not in held)
                        + ": the difference is explained by reply length there")
    else:
        verdict = "no effect beyond the placebo detectable by every judge (minimum detectable " + ", ".join(
            f"{j} {net[j]['mde']:.3f}" for j in judges) + ")"
    length, vs = net["length_change"], net["length_vs_placebo"]
    return (f"net of the placebo ({net[judges[0]]['interval']}), Holm over {size} arms: " + "; ".join(parts)
            + f": {verdict}. Reply length "
            f"{length['mean_difference']:+.1f} {_ci(length['ci'], 1)} tokens from SFT, "
            f"{vs['mean_difference']:+.1f} {_ci(vs['ci'], 1)} from the placebo")


def answer(bon: dict | None, net: dict | None, experiments: dict[str, dict], judges: dict[str, dict],
           steps: int, movement: dict | None = None) -> str:
    """The one paragraph that answers "how does the reward model's precision change alignment?" from this run's
    numbers: best-of-n's gains per precision at ``k = n`` and each precision − bf16 with its interval, Holm-adjusted
    p and MDE, per judge; every arm's effect net of the placebo; each precision − bf16 after training, per algorithm
    (:func:`precision_by_algorithm`; call :func:`conclusions` first, which computes it); whether training moved the
    policies (``movement``, :func:`edgerlhf.core.arms.policy_movement`); and the smallest differences this run could
    have detected. Judges that did not beat the length baseline are named and their numbers not read as alignment."""
    weak = [j for j, v in judges.items() if not v["learned"]]
    parts = ["How does the reward model's precision change alignment? At this run's scale (judges: "
             + ", ".join(judges) + ")"]
    if weak:
        parts.append(f"{', '.join(weak)} did not beat the length baseline, so the scores below say nothing about "
                     "alignment")
    mdes = []
    if bon:
        for j, diffs in bon["vs_reference"].items():
            gains = "; ".join(f"{g['proxy']} {g['mean_difference']:+.3f} {_ci(g['ci'])}" for g in bon["gains_at_n"][j])
            found = [d for d in diffs if d["p_holm"] < ALPHA]
            verdict = ("detectable after Holm's correction: " + ", ".join(
                f"{d['proxy']} {d['mean_difference']:+.3f} {_ci(d['ci'])}" for d in found) if found else
                f"none detectable after Holm's correction over {len(diffs)} comparisons")
            mdes += [d["mde"] for d in diffs]
            low, high = min(d["mde"] for d in diffs), max(d["mde"] for d in diffs)
            parts.append(f"best-of-{bon['n']} on {bon['n_prompts']} held-out prompts (KL {bon['kl_bon'][-1]:.2f} "
                         f"nats), {j} gain over a random SFT reply: {gains}; differences from bf16: {verdict} "
                         f"(MDE {low:.3f}" + (f"–{high:.3f})" if high > low else ")"))
        proxies = [d["proxy"] for d in next(iter(bon["vs_reference"].values()), [])]
        agreed = {a: holm_direction({j: next(d for d in diffs if d["proxy"] == a)
                                     for j, diffs in bon["vs_reference"].items()}) for a in proxies}
        found = [f"{a} {'above' if s > 0 else 'below'} bf16" for a, s in agreed.items() if s]
        if proxies:
            parts.append("under best-of-n, " + ("every judge finds " + ", ".join(found) if found else
                                                "no precision difference from bf16 is found by every judge"))
    if net:
        for j in judges:
            effects = "; ".join(f"{a} {x[j]['mean_difference']:+.3f} {_ci(x[j]['ci'])}" for a, x in net.items())
            found = [a for a, x in net.items() if x[j]["p_holm"] < ALPHA]
            seeds = next(iter(net.values()))[j]["seeds"]
            who = "PPO" if all(parse_arm(a)[0] == "ppo" for a in net) else "every arm (PPO unless named)"
            parts.append(f"{who} ({steps} steps, {seeds} seed{'s' if seeds > 1 else ''}), {j} score net of the "
                         f"placebo arm: {effects}; "
                         + ("detectable after Holm's correction for " + ", ".join(found) if found else
                            "none detectable after Holm's correction"))
            mdes += [x[j]["mde"] for x in net.values()]
    elif experiments:
        parts.append("PPO ran without a placebo arm, so its changes are not separated from drift")
    crossed, more = precision_by_algorithm(experiments)
    parts += crossed
    mdes += more
    if movement and not movement["moved"]:
        lo, hi = (f"{f(x['kl'] for x in movement['arms'].values()):.2f}" for f in (min, max))
        trainer = "PPO" if all(parse_arm(a)[0] == "ppo" for a in experiments) else "Training"
        parts.append(f"{trainer} did not move every policy {MOVED_KL:g} nat from the SFT model ("
                     + (lo if lo == hi else f"{lo} to {hi}") + " nats per reply), so its effects are those of a "
                     "small step")
    if mdes:
        one_seed = not net or next(iter(net.values()))[next(iter(judges))]["seeds"] == 1
        parts.append(f"differences smaller than {max(mdes):.3f} judge units (the largest minimum detectable "
                     "difference above) cannot be ruled out" + (", and one PPO seed says nothing about the spread "
                                                                "across training runs" if one_seed else ""))
    return "; ".join(parts) + "."


def precision_by_algorithm(experiments: dict[str, dict]) -> tuple[list[str], list[float]]:
    """The answer's "precision x algorithm" part: for each algorithm trained on a reward model (PPO, RLOO, GRPO),
    each precision's judge difference from its bf16 arm after training (``vs_bf16_after``, written by
    :func:`conclusions`) with its interval, and whether every judge finds one after Holm's correction; the algorithms
    run at one precision are named as such. Returns the phrases and the comparisons' minimum detectable differences
    (judge units)."""
    phrases, mdes, single = [], [], []
    for algorithm, names in arms_by_algorithm(experiments).items():
        versus = {n: experiments[n]["vs_bf16_after"] for n in names.values() if "vs_bf16_after" in experiments[n]}
        if not versus:
            single.append(f"{algorithm.upper()} ({', '.join(names)})")
            continue
        diffs = "; ".join(f"{n} " + ", ".join(f"{j} {x['mean_difference']:+.3f} {_ci(x['ci'])}" for j, x in d.items())
                          for n, d in versus.items())
        signs = {n: holm_direction(d) for n, d in versus.items()}
        found = [f"{n} {'above' if s > 0 else 'below'} bf16" for n, s in signs.items() if s]
        mdes += [x["mde"] for d in versus.values() for x in d.values()]
        phrases.append(f"under {algorithm.upper()}, each precision's judge scores minus bf16's after training: {diffs}; "
                       + ("every judge finds " + ", ".join(found) if found else
                          "no precision difference from bf16 found by every judge"))
    if single:
        phrases.append("precision was not varied under " + ", ".join(single) + " in this run")
    return phrases, mdes


def implicit_sentence(name: str, check: dict) -> str:
    """The implicit-reward check (:func:`implicit_reward_check`) of one experiment in words."""
    lo, hi = check["share_ci95"]
    m = check["mean_nats"]
    if lo > 0.5 or hi < 0.5:
        verdict = (f"the policy moved towards the {'human-chosen' if lo > 0.5 else 'human-rejected'} replies more "
                   "often than not")
    else:
        verdict = "no shift towards either reply detectable"
    return (f"{name}: implicit reward (no judge): the policy raises log pi(chosen) - log pi(rejected) over the SFT "
            f"model on {check['share_chosen_raised']:.2f} [{lo:.2f}, {hi:.2f}] of {check['n']} held-out labelled "
            f"pairs (sign test p = {check['sign_test_p']:.3g}, {check['ties']} ties; mean {m['mean_difference']:+.3f} "
            f"{_ci(m['ci'])} nats): {verdict}")


def comparison_table(experiments: dict[str, dict], net: dict | None = None) -> list[dict]:
    """The research plan's table with its intervals: arm | algorithm | proxy | per judge: before -> after, the paired
    change, its minimum detectable change and win rate, and (with ``net``, :func:`edgerlhf.core.arms.net_of_placebo`)
    the difference from the placebo policy, Holm-adjusted p and length-controlled | reply length change (tokens) |
    implicit-reward share | proxy before -> after with the change's paired interval | KL | time | peak memory. A
    judge's columns are prefixed by its name (``judge-tfidf`` -> ``judge_tfidf_``); the placebo's own net columns
    are None."""
    rows = []
    for name, e in experiments.items():
        verdict = e.get("proxy_verdict") or {}
        algorithm = e.get("algorithm", "ppo")
        proxy = (f"none: random rewards ({e['proxy']} scores)" if e.get("placebo") else
                 f"none: labelled pairs ({e['proxy']} scores)" if algorithm == "dpo" else e["proxy"])
        row = {"reward_precision": name, "algorithm": algorithm, "proxy": proxy,
               "proxy_learned": verdict.get("learned")}
        vs_placebo = (net or {}).get(name)
        for j, v in e["judges"].items():
            key = j.replace("-", "_")
            row.update({f"{key}_before": v["before_mean"], f"{key}_after": v["after_mean"],
                        f"{key}_change": v["change"]["mean_difference"], f"{key}_change_ci95": v["change"]["ci"],
                        f"{key}_change_mde": v["change_mde"], f"{key}_win_rate": v["win_rate"],
                        f"{key}_win_rate_ci95": v["win_rate_ci95"]})
            if net is not None:
                x = (vs_placebo or {}).get(j)
                row.update({f"{key}_net_placebo": x and x["mean_difference"], f"{key}_net_placebo_ci95": x and x["ci"],
                            f"{key}_net_placebo_p_holm": x and x["p_holm"],
                            f"{key}_net_length_controlled": x and x["length_controlled"]["intercept"],
                            f"{key}_net_length_controlled_ci95": x and x["length_controlled"]["ci"]})
        tokens = paired_bootstrap(e["after"]["tokens"], e["before"]["tokens"])
        row.update({"length_change_tokens": tokens["mean_difference"], "length_change_tokens_ci95": tokens["ci"]})
        implicit = e["implicit_reward"]
        row.update({
            "implicit_share": implicit["share_chosen_raised"], "implicit_share_ci95": implicit["share_ci95"],
            "implicit_sign_test_p": implicit["sign_test_p"], "implicit_pairs": implicit["n"],
            "n_prompts": next(iter(e["judges"].values()))["change"]["n"],
            "proxy_before": e["before"]["proxy_mean"], "proxy_after": e["after"]["proxy_mean"],
            "proxy_change_ci95": paired_bootstrap(e["after"]["proxy_scores"], e["before"]["proxy_scores"])["ci"],
            "kl": e["after"]["kl_mean"], "wall_time_s": e["wall_time_s"],
            "peak_cpu_rss_mib": e["peak_memory"]["cpu_peak_rss_mib"],
            "peak_cuda_mib": e["peak_memory"]["cuda_peak_allocated_mib"],
        })
        rows.append(row)
    return rows


@recorded("ppo")
def run_alignment(cfg: Config) -> dict:
    """Run stage 4 (every experiment) and write its record; returns ``{"experiments", "table", "judge", ...}``.

    Raises:
        ValueError: unknown precision or reward mode; a judge that is a proxy.
        FileNotFoundError: missing SFT model, judge, reward models, their evaluation or preference files.
    """
    p = cfg.ppo
    others = [a for a in p.algorithms if a != "ppo"]
    if others and process_info()["num_processes"] > 1:
        raise ValueError(f"ppo.algorithms={p.algorithms!r}: the {', '.join(others)} arms run in one process; under "
                         "accelerate launch set ppo.algorithms=[ppo]")
    ctx = begin(cfg, distributed=True)  # under accelerate launch the processes share PPO's rollouts and gradients
    sft_location = str(ctx.path(cfg.sft.output_dir) / "model" / "merged")
    if not Path(sft_location).exists():
        raise FileNotFoundError(f"{sft_location}: no SFT model; run 02_SFT_Finetuning "
                                "(python -m edgerlhf.sft_finetuning) first")
    rm_dir = ctx.path(cfg.reward.output_dir)
    if not (rm_dir / JUDGE).exists():
        raise FileNotFoundError(f"{rm_dir / JUDGE}: no judge reward model; run 03_Reward_Modeling with reward.judge=true")
    verdicts = rm_verdicts(rm_dir)
    data_dir = ctx.path(cfg.data.out_dir)
    # provenance: the data, the SFT model and the reward-model set belong together, and each model is the one judged
    ctx.step = "provenance"
    data_hashes = check_data_set(data_dir)
    inputs = {f"{name}_sha256": sha for name, sha in data_hashes.items()}
    inputs.update(sft_identity(Path(sft_location).parent, data_hashes))
    check_reward_inputs(rm_dir / "evaluation.json", verdicts.get("inputs"),
                        {k: inputs[k] for k in (f"{TRAIN}_sha256", f"{TEST}_sha256", "sft_weights_sha256")})
    inputs["reward_models_sha256"] = check_reward_set(rm_dir, verdicts)
    ctx.step = "checkpoints"
    arms, seeds = arm_names(p), p.seeds or [cfg.run.seed]
    for arm in arms:  # an unfinished run, or a resume under changed settings: refuse before loading
        for seed in seeds:
            checkpoint_to_resume(checkpoint_folder(ctx.path(p.output_dir), arm, seed, seed == seeds[0]), p.resume,
                                 run_signature(p, seed))
    test_rows = read_prefs(data_dir / TEST)
    eval_rows, labelled = test_rows[: p.n_eval_prompts], test_rows[: p.n_implicit_reward_pairs]
    with measure(ctx.device) as m:
        bon_rows = test_rows[: p.best_of_n_prompts] if p.best_of_n else []
        if bon_rows:  # no PPO reply is compared with these: the SFT model runs as the reward models do
            ctx.step = f"best-of-{p.best_of_n}: SFT replies to {len(bon_rows)} held-out prompts"
            started, sampling_dtype = time.perf_counter(), frozen_dtype(ctx.device, p.policy_precision)
            policy, _, tokenizer = load_policy(sft_location, p, ctx.device, sampling_dtype)
            bon_samples = best_of_n_replies(policy, tokenizer, bon_rows, p, cfg.run.seed)
            bon_samples.update(sampling_s=time.perf_counter() - started,
                               sampling_dtype=str(sampling_dtype).replace("torch.", ""))
            del policy
        # the SFT replies to the held-out prompts: sampled once (in the PPO policy's dtype), judged once, shared by
        # every experiment
        ctx.step = "SFT replies to the held-out prompts"
        policy, _, tokenizer = load_policy(sft_location, p, ctx.device)
        eval_counts = {}
        eval_queries, eval_prompts = encode_queries(tokenizer, eval_rows, p.max_prompt_length, eval_counts)
        before = sample_replies(policy, tokenizer, eval_queries, p, cfg.run.seed)
        ctx.step = "SFT margins on the held-out labelled pairs"
        with policy.disable_adapter():  # the reference: the SFT model itself
            sft_margins = preference_margins(policy, tokenizer, labelled, p.score_batch_size)
        del policy
        free_memory()
        judges = load_judges(rm_dir, cfg)
        for name, judge in judges.items():
            before[f"{name}_scores"] = judge["scorer"](eval_prompts, before["replies"]).tolist()
        bon = best_of_n_evaluation(bon_samples, rm_dir, verdicts["models"], judges, cfg, ctx) if bon_rows else None
        train_rows = read_prefs(data_dir / TRAIN)
        # DPO's data set, once for every seed: the proxies' training pairs
        dpo = dpo_pairs(tokenizer, split_pairs(train_rows, cfg.reward)["train"], p.max_prompt_length) if (
            "dpo" in p.algorithms) else []
        shared = {"train": train_rows, "dpo_pairs": dpo, "eval_queries": eval_queries,
                  "eval_prompts": eval_prompts, "before": before, "judges": judges, "verdicts": verdicts,
                  "labelled": labelled, "sft_margins": sft_margins}
        experiments = {}
        for arm in arms:
            done = [run_experiment(arm, cfg, ctx, sft_location, shared, seed, save=seed == seeds[0])
                    for seed in seeds]
            experiments[arm] = with_seeds(done)
            free_memory()  # that experiment's policy and proxy are unreferenced now: return their pages
    judge_info = {
        name: {"folder": str(j["folder"]), **verdicts["models"][name], "length_baseline": verdicts["length_baseline"],
               "truncation": j["truncation"],
               "agreement_with_proxies": {e: ((x["proxy_verdict"] or {}).get("judge_agreement") or {}).get(name)
                                          for e, x in experiments.items() if not x["placebo"]}}
        for name, j in judges.items()}
    net = (net_of_placebo(experiments, list(judges), cfg.run.seed) if PLACEBO in experiments and len(experiments) > 1
           else None)
    movement = policy_movement(experiments, p.steps, p.batch_size, p.adaptive_kl, p.kl_horizon)
    words = conclusions(experiments, judge_info, cfg.run.seed, net) + [movement_sentence(movement)]
    summary = answer(bon, net, experiments, judge_info, p.steps, movement)
    for e in experiments.values():
        e["rl_fit"] = rl_fits(e["curve"], list(judges))

    def draw() -> dict[str, str]:  # the figures, drawn once under accelerate launch
        out = {"curves": str(ppo_curves_figure(experiments, ctx.run_dir / "figures" / "ppo_curves.png",
                                               kl_target=p.adaptive_kl_target if p.adaptive_kl else None)),
               "overoptimisation": str(overoptimisation_figure(experiments,
                                                               ctx.run_dir / "figures" / "ppo_overopt.png"))}
        if bon is not None:
            out["best_of_n"] = str(best_of_n_figure(bon, ctx.run_dir / "figures" / "best_of_n.png"))
        if net is not None:
            out["algorithms"] = str(algorithms_figure(experiments, net, ctx.run_dir / "figures" / "ppo_algorithms.png"))
        return out

    figures = main_process_writes(draw)
    results = {"experiments": experiments, "table": comparison_table(experiments, net), "net_of_placebo": net,
               "judges": judge_info, "policy_movement": movement,
               "answer": summary, "conclusions": words, "best_of_n": bon, "n_eval_prompts": len(eval_prompts),
               "eval_prompts": eval_counts,
               "n_implicit_reward_pairs": len(labelled), "figures": figures}
    results["record"] = str(finish(
        ctx, "ppo", results, m,
        model_config={"policy": sft_location, "policy_precision": p.policy_precision, "lora_rank": p.lora_r,
                      "policy_dtype": str(compute_dtype(ctx.device)).replace("torch.", ""),
                      "reward_mode": p.reward_mode, "judges": [str(j["folder"]) for j in judges.values()]},
        training_config={k: getattr(p, k) for k in (
            "steps", "batch_size", "micro_batch_size", "gradient_accumulation_steps", "ppo_epochs", "learning_rate",
            "max_new_tokens", "init_kl_coef", "adaptive_kl", "adaptive_kl_target", "gamma", "lam", "cliprange",
            "cliprange_value", "vf_coef", "max_grad_norm", "temperature", "algorithms", "trl_experiments",
            "num_generations", "dpo_beta")},
        data={"train_file": str(data_dir / TRAIN), "test_file": str(data_dir / TEST), **inputs},
    ))
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m edgerlhf.ppo_alignment [--profile P] [--config F] [--set K=V ...]``;
    returns the exit status (:func:`edgerlhf.core.stage.cli_main`)."""
    return cli_main("edgerlhf.ppo_alignment", "Stage 4: PPO against bf16/int8/int4 reward models.", run_alignment,
                    lambda results: "\n".join(results["conclusions"]), argv)


if __name__ == "__main__":
    sys.exit(main())
