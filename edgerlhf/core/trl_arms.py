"""Stage 4's other alignment algorithms, run through TRL beside this project's PPO: RLOO (Ahmadian et al. 2024,
``RLOOTrainer``) and GRPO (Shao et al. 2024, ``GRPOTrainer``) against a reward model, and DPO (Rafailov et al. 2023,
``DPOTrainer``) on labelled pairs with no reward model.

Every arm trains the same policy as PPO (the SFT model with a fresh LoRA adapter, :func:`edgerlhf.core.ppo_trainer.
build_policy`; the adapter disabled is the reference model) on the same prompts and seed, and is evaluated by stage 4
as PPO's arms are. :func:`trl_arguments` maps the stage's ``ppo.*`` fields onto TRL's configs.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def reward_function(scorer: Callable, name: str = "proxy") -> Callable:
    """A TRL reward function (``reward_funcs`` of ``RLOOTrainer`` / ``GRPOTrainer``) over a stage-4 scorer.

    Args:
        scorer: ``scorer(prompts, replies) -> FloatTensor[N]``, e.g. :func:`edgerlhf.ppo_alignment.reward_scorer`
            (:func:`edgerlhf.core.reward_scoring.score` times the reward normalisation's gain plus its bias).
        name: TRL logs the rewards under ``rewards/<name>/mean``.
    Returns:
        ``reward(prompts, completions, **kwargs) -> list[float]``: ``prompts`` as the data set holds them (lists of
        ``{"role", "content"}`` messages) and ``completions`` as TRL passes conversational ones (``[{"role":
        "assistant", "content": reply}]``) or plain strings; one float per completion.
    Raises:
        ValueError: a non-finite score (raised before TRL can train on it).
    """
    def reward(prompts, completions, **kwargs) -> list[float]:
        replies = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = torch.as_tensor(scorer(list(prompts), replies), dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise ValueError(f"{name}: non-finite reward for {int((~torch.isfinite(scores)).sum())} of "
                             f"{len(replies)} completions")
        return scores.tolist()

    reward.__name__ = name
    return reward


def trl_arguments(algorithm: str, p, seed: int, output_dir: Path, device: torch.device, max_length: int) -> dict:
    """Keyword arguments of TRL's ``RLOOConfig`` / ``GRPOConfig`` / ``DPOConfig`` from the stage's ``ppo`` section.

    Shared: ``max_steps = steps``, ``learning_rate`` (constant, as PPO's), ``max_grad_norm``, ``seed``; each step takes
    ``batch_size`` sequences as ``micro_batch_size`` per forward pass times ``batch_size / micro_batch_size``
    accumulation steps. RLOO / GRPO: each step samples ``batch_size`` completions, as PPO's rollout does
    (``num_generations`` per prompt, so ``batch_size / num_generations`` prompts), with PPO's ``max_new_tokens``
    (``max_completion_length``), ``temperature``, ``top_k``, ``top_p`` and ``min_new_tokens``; ``beta`` is PPO's
    ``init_kl_coef`` and ``epsilon`` its ``cliprange``; one optimizer step per generation (``num_iterations = 1``,
    TRL's default). DPO: ``batch_size`` labelled pairs per step, ``micro_batch_size / 2`` pairs per forward pass (a
    pair is two sequences; at least one, and a divisor of ``batch_size``), ``beta = dpo_beta``, sequences cut to
    ``max_length`` tokens (prompt + reply). TRL's defaults stand for everything else (GRPO's ``loss_type``,
    ``scale_rewards``...). No checkpoints, no gradient checkpointing, no reports.

    Args:
        algorithm: ``rloo``, ``grpo`` or ``dpo``.
        max_length: DPO's ``max_length`` (tokens); stage 4 passes ``reward.max_length``.
    Raises:
        ValueError: another algorithm; ``batch_size`` not a multiple of ``micro_batch_size`` (or, for RLOO / GRPO, of
            ``num_generations``).
    """
    if algorithm not in ("rloo", "grpo", "dpo"):
        raise ValueError(f"no TRL trainer for algorithm {algorithm!r}; expected rloo, grpo or dpo")
    if p.batch_size % p.micro_batch_size:
        raise ValueError(f"ppo.batch_size={p.batch_size} must be a multiple of ppo.micro_batch_size="
                         f"{p.micro_batch_size} for the {algorithm} arm")
    args = dict(output_dir=str(output_dir), max_steps=p.steps, learning_rate=p.learning_rate,
                max_grad_norm=p.max_grad_norm, seed=seed, data_seed=seed,
                per_device_train_batch_size=p.micro_batch_size,
                gradient_accumulation_steps=p.batch_size // p.micro_batch_size, lr_scheduler_type="constant",
                use_cpu=device.type == "cpu", bf16=False, fp16=False, activation_checkpointing=False,
                save_strategy="no", report_to="none", logging_steps=1, dataloader_num_workers=0)
    if algorithm == "dpo":  # a pair is two sequences (chosen, rejected) in one forward pass
        pairs = math.gcd(p.batch_size, max(1, p.micro_batch_size // 2))  # a divisor of batch_size
        return {**args, "per_device_train_batch_size": pairs, "gradient_accumulation_steps": p.batch_size // pairs,
                "beta": p.dpo_beta, "max_length": max_length}
    if p.batch_size % p.num_generations:
        raise ValueError(f"ppo.batch_size={p.batch_size} must be a multiple of ppo.num_generations="
                         f"{p.num_generations} for the {algorithm} arm")
    return {**args, "num_generations": p.num_generations, "max_completion_length": p.max_new_tokens,
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "beta": p.init_kl_coef,
            "epsilon": p.cliprange, "num_iterations": 1,
            "generation_kwargs": {"min_new_tokens": p.min_new_tokens} if p.min_new_tokens else None}


def _history(log_history: list[dict], beta: float) -> list[dict]:
    """One dict per optimizer step from a TRL trainer's ``state.log_history``, under the names of PPO's step
    statistics where the quantity is the same (``score``: mean training reward, ``entropy`` in nats per token,
    ``response_length`` in tokens, ``clipfrac``, ``time_step_s`` in seconds), the rest under TRL's names; ``beta`` is
    fixed."""
    same = {"reward": "score", "entropy": "entropy", "completions/mean_length": "response_length",
            "clip_ratio/region_mean": "clipfrac", "step_time": "time_step_s"}
    out = []
    for entry in log_history:
        if "loss" not in entry:  # the closing summary (train_runtime...)
            continue
        out.append({"step": int(entry["step"]), "beta": beta,
                    **{same.get(k, k): float(v) for k, v in entry.items() if k != "step"}})
    return out


def _quiet(trainer, algorithm: str, steps: int):
    """Replace the trainer's printed progress (tqdm bar, printed log dicts) by one log line per optimizer step."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    class StepLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                keys = [k for k in ("loss", "reward", "kl", "rewards/margins", "rewards/accuracies", "entropy",
                                    "completions/mean_length") if k in logs]
                logger.info("%s step %d/%d: %s", algorithm.upper(), state.global_step, steps,
                            ", ".join(f"{k} {float(logs[k]):.4g}" for k in keys))

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(StepLog())
    return trainer


def train_online(algorithm: str, policy, tokenizer, prompts: list[list[dict]], reward: Callable, p, seed: int,
                 output_dir: Path, device: torch.device) -> list[dict]:
    """Train ``policy`` (a peft ``PeftModel``; its adapter disabled is the reference) in place with TRL's
    ``RLOOTrainer`` or ``GRPOTrainer`` for ``p.steps`` steps on ``prompts`` (chat messages, already cut to
    ``ppo.max_prompt_length``) rewarded by ``reward`` (:func:`reward_function`); TRL samples the prompts in an
    order seeded by ``seed``.

    Returns:
        the step statistics (:func:`_history`).
    Raises:
        ValueError: see :func:`trl_arguments`; a non-finite reward (:func:`reward_function`).
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config, trainer_class = {"rloo": (RLOOConfig, RLOOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}[algorithm]
    args = config(**trl_arguments(algorithm, p, seed, output_dir, device, 0))
    tokenizer.padding_side = "left"
    trainer = _quiet(trainer_class(model=policy, reward_funcs=reward, args=args, processing_class=tokenizer,
                                   train_dataset=Dataset.from_list([{"prompt": m} for m in prompts])),
                     algorithm, p.steps)
    trainer.train()
    return _history(trainer.state.log_history, p.init_kl_coef)


def train_dpo(policy, tokenizer, pairs: list[dict], p, seed: int, output_dir: Path, device: torch.device,
              max_length: int) -> list[dict]:
    """Train ``policy`` in place with TRL's ``DPOTrainer`` (sigmoid loss, ``beta = p.dpo_beta``; the adapter disabled
    is the reference) for ``p.steps`` steps of ``p.batch_size`` pairs.

    Args:
        pairs: ``[{"prompt": messages, "chosen": [assistant message], "rejected": [assistant message]}]``, the
            prompt already cut to ``ppo.max_prompt_length``.
        max_length: tokens of prompt + reply kept (TRL's ``keep_start`` truncation).
    Returns:
        the step statistics (:func:`_history`; DPO's ``rewards/margins``, ``rewards/accuracies``...).
    """
    import datasets
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**trl_arguments("dpo", p, seed, output_dir, device, max_length))
    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the trainer's tokenizing passes over the pairs: no bars in the notebook
    try:
        trainer = _quiet(DPOTrainer(model=policy, args=args, processing_class=tokenizer,
                                    train_dataset=Dataset.from_list(pairs)), "dpo", p.steps)
    finally:
        if shown:
            datasets.enable_progress_bars()
    trainer.train()
    return _history(trainer.state.log_history, p.dpo_beta)
