"""Stage 4 (04_PPO_Alignment): the PPO training loop around :func:`edgerlhf.core.ppo.ppo_step`: optimiser, prompt
sampling, checkpoints every N steps, exact resumption, and a saved failing step on non-finite values.

A checkpoint ``checkpoint-<step>/`` holds the LoRA adapter and value head (safetensors) and
``state.pt`` (optimiser, KL controller, running score statistics, RNG states, prompt-sampler
state, step and history): tensors and plain Python values only, read back with ``weights_only=True``.
A step with a non-finite value is saved as ``failed-step-<step>/``: the state from before the step
(a checkpoint it can be resumed from) plus ``rollout.safetensors``, the failing rollout's tensors.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .files import swap_in_dir
from .logs import progress
from .memory import halve_on_oom, measure
from .ppo import KLController, NonFiniteError, RunningMoments, data_parallel, ppo_step
from .reproducibility import rng_state, set_rng_state

logger = logging.getLogger(__name__)

#: Our step statistics under the names TRL's PPO trainers log them (``objective/*``, ``policy/*``, ``loss/*``,
#: ``val/*`` as in TRL's ``PPOTrainer`` since 0.12; ``objective/kl_coef``, ``tokens/responses_len_mean`` and
#: ``ppo/val/var_explained`` as in TRL 0.11), for logs and dashboards read side by side with TRL runs.
TRL_METRIC_NAMES = {
    "score": "objective/scores", "kl": "objective/kl", "non_score_reward": "objective/non_score_reward",
    "reward_total": "objective/rlhf_reward", "beta": "objective/kl_coef", "approx_kl": "policy/approxkl_avg",
    "clipfrac": "policy/clipfrac_avg", "entropy": "policy/entropy_avg", "pg_loss": "loss/policy_avg",
    "vf_loss": "loss/value_avg", "vf_clipfrac": "val/clipfrac_avg", "response_length": "tokens/responses_len_mean",
    "explained_variance": "ppo/val/var_explained",
}


def trl_metrics(stats: dict) -> dict[str, float]:
    """The statistics of one PPO step (:func:`edgerlhf.core.ppo.ppo_step`) that TRL also logs, under TRL's names
    (:data:`TRL_METRIC_NAMES`), in that order."""
    return {trl: stats[ours] for ours, trl in TRL_METRIC_NAMES.items() if ours in stats}


def build_policy(model: torch.nn.Module, cfg) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """Wrap the SFT model (LoRA already merged into its weights) for PPO.

    Returns ``(policy, value_head)``: ``policy`` is a peft ``PeftModel`` with a fresh LoRA adapter
    (``lora_r``, ``lora_alpha``, ``target_modules``, no dropout) whose ``disable_adapter()`` is the reference model;
    ``value_head`` is a float32 ``Linear(hidden_size, 1)`` initialised to zero, on the model's device.
    """
    from peft import get_peft_model

    from .adapters import lora_config

    policy = get_peft_model(model, lora_config(model, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.target_modules, "CAUSAL_LM"))
    value_head = torch.nn.Linear(model.config.hidden_size, 1, dtype=torch.float32)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    return policy, value_head.to(next(model.parameters()).device)


def make_optimizer(model, value_head, cfg) -> torch.optim.Optimizer:
    """AdamW over the trainable LoRA parameters (``learning_rate``) and the value head
    (``value_learning_rate``), eps 1e-5 (CleanRL / Huang et al. 2024), no weight decay."""
    lora = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": lora, "lr": cfg.learning_rate},
                              {"params": list(value_head.parameters()), "lr": cfg.value_learning_rate}],
                             eps=1e-5, weight_decay=0.0)


def snapshot_state(model, value_head, optimizer, kl_ctl, moments, generator) -> dict:
    """An in-memory copy of everything a PPO step changes (adapter, value head, optimiser, beta,
    score statistics, RNGs), so a step that runs out of memory can be retried exactly."""
    return copy.deepcopy({
        "adapter": get_peft_model_state_dict(model), "value_head": value_head.state_dict(),
        "optimizer": optimizer.state_dict(), "beta": kl_ctl.beta, "moments": moments.state_dict() if moments else None,
        "generator": generator.get_state(), "rng": rng_state(),
    })


def restore_state(snapshot: dict, model, value_head, optimizer, kl_ctl, moments, generator) -> None:
    """Put back the state saved by :func:`snapshot_state`."""
    set_peft_model_state_dict(model, snapshot["adapter"])
    value_head.load_state_dict(snapshot["value_head"])
    optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
    kl_ctl.beta = snapshot["beta"]
    if moments is not None:
        moments.load_state_dict(snapshot["moments"])
    generator.set_state(snapshot["generator"])
    set_rng_state(snapshot["rng"])


def latest_checkpoint(folder: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step, or None."""
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return max(found)[1] if found else None


def save_checkpoint(folder: Path, model, value_head, optimizer, state: dict,
                    rollout: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``folder`` atomically (temp folder, then rename); ``rollout`` tensors, when given, go to
    ``rollout.safetensors`` (a failed step's batch)."""
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, staging / "adapter.safetensors")
    save_file(value_head.state_dict(), staging / "value_head.safetensors")
    if rollout is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in rollout.items()}, staging / "rollout.safetensors")
    torch.save({**state, "optimizer": optimizer.state_dict()}, staging / "state.pt")
    return swap_in_dir(staging, folder)


def load_checkpoint(folder: Path, model, value_head, optimizer) -> dict:
    """Restore weights and optimiser from ``folder``; returns the saved loop state."""
    set_peft_model_state_dict(model, load_file(folder / "adapter.safetensors"))
    value_head.load_state_dict(load_file(folder / "value_head.safetensors"))
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state


#: PPO settings a resumed run may change: they do not alter the training trajectory.
RESUME_MAY_CHANGE = ("resume", "keep_checkpoints", "checkpoint_every", "eval_every", "output_dir", "experiments",
                     "n_eval_prompts")


def run_signature(cfg, seed: int, n_prompts: int | None = None) -> dict:
    """What a checkpoint must share with the run that resumes it: every PPO setting but
    :data:`RESUME_MAY_CHANGE`, the seed, and (when given) the number of training prompts."""
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE} | {"seed": seed}
    return out | ({"n_prompts": n_prompts} if n_prompts is not None else {})


def checkpoint_to_resume(checkpoints: Path, resume: bool, signature: dict) -> Path | None:
    """The checkpoint a run continues from, or None for a fresh start; cheap enough to call before any
    model is loaded. Only the keys of ``signature`` are compared (see :func:`run_signature`).

    Raises:
        FileExistsError: checkpoints of an unfinished run exist and ``resume`` is False.
        ValueError: ``resume`` is True but the checkpoint was written under other settings (names them).
    """
    last = latest_checkpoint(checkpoints) if checkpoints.exists() else None
    if last is None:
        return None
    if not resume:
        raise FileExistsError(f"{checkpoints} holds checkpoints of an unfinished run ({last.name}); "
                              "set ppo.resume=true to continue it, or delete the folder to start over")
    saved = torch.load(last / "state.pt", weights_only=True).get("signature", {})
    changed = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
    if changed:
        words = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"{last}: cannot resume with changed settings ({words}); restore them, or delete "
                         f"{checkpoints} to start over")
    return last


def train(model, value_head, tokenizer, queries: list[list[int]], prompts: list, scorer: Callable, cfg,
          checkpoints: Path, seed: int, on_step: Callable | None = None, max_backoffs: int = 3,
          extra: dict | None = None, writer=None) -> list[dict]:
    """Run ``cfg.steps`` PPO iterations; returns one statistics dict per step.

    Each step samples ``cfg.batch_size`` prompts without replacement from a ``torch.Generator``
    seeded with ``seed`` (its state is checkpointed, so a resumed run sees the same prompts).
    With ``cfg.resume`` the loop continues from the latest checkpoint in ``checkpoints``, which must
    have been written under the same settings (:func:`checkpoint_to_resume`).
    ``on_step(step, stats)`` is called after every step (e.g. for periodic evaluation). ``extra``
    (a dict of the caller's picklable state, e.g. its evaluation curve) is saved in every checkpoint
    and, on resume, updated in place from it; ``extra["resumed_from"]`` is then the checkpoint's name.
    ``writer`` (a TensorBoard ``SummaryWriter``, :func:`edgerlhf.core.logs.tensorboard_writer`; None: none) gets
    every step's :func:`trl_metrics` as scalars at the step number, flushed each step, for live curves.

    A step that runs out of memory is retried from the same state with the micro-batch halved and
    the accumulation doubled, and generation and scoring forward passes in halved chunks
    (:func:`edgerlhf.core.memory.halve_on_oom`, at most ``max_backoffs`` times); the back-offs are in
    the step's statistics and the smaller sizes are kept for the rest of the run.

    Under ``accelerate launch`` (several processes, :func:`edgerlhf.core.ppo.data_parallel`) every process runs
    this loop on the same prompts and holds the same weights; :func:`edgerlhf.core.ppo.ppo_step` shares each
    step's sampling and gradients among them. Only the main process writes checkpoints, and an out-of-memory
    error is not retried (the processes would fall out of step).

    Raises:
        FloatingPointError: non-finite score, KL, reward, loss or gradient; the state from before the
            failing step (adapter, value head, optimiser, beta, RNG and prompt-sampler states) and the
            step's rollout are saved to ``checkpoints/failed-step-<n>``, whose path is in the message.
        FileExistsError: checkpoints exist but ``cfg.resume`` is False.
        ValueError: resuming a checkpoint written under other settings.
    """
    rank, world = data_parallel()
    writes = rank == 0
    if world > 1:
        max_backoffs = 0
    optimizer = make_optimizer(model, value_head, cfg)
    generator = torch.Generator().manual_seed(seed)
    kl_ctl = KLController(cfg.init_kl_coef, cfg.adaptive_kl, cfg.adaptive_kl_target, cfg.kl_horizon)
    moments = RunningMoments() if cfg.score_norm else None
    history: list[dict] = []
    extra = {} if extra is None else extra
    start = 0
    signature = run_signature(cfg, seed, len(queries))
    last = checkpoint_to_resume(checkpoints, cfg.resume, signature)
    if last is not None:
        state = load_checkpoint(last, model, value_head, optimizer)
        start, history, kl_ctl.beta = state["step"], state["history"], state["beta"]
        generator.set_state(state["generator"])
        if moments is not None:
            moments.load_state_dict(state["moments"])
        set_rng_state(state["rng"])
        extra.update(state.get("extra", {}), resumed_from=last.name)

    def loop_state(step: int) -> dict:
        return {"step": step, "history": history, "beta": kl_ctl.beta, "generator": generator.get_state(),
                "moments": moments.state_dict() if moments else None, "rng": rng_state(), "signature": signature,
                "extra": {k: v for k, v in extra.items() if k != "resumed_from"}}

    bar = progress(total=cfg.steps, initial=start, desc=f"PPO steps ({checkpoints.name})", unit="step")  # the arm
    for step in range(start, cfg.steps):
        sampler_before = generator.get_state()  # a failed-step save resumes from here: the same prompts again
        idx = torch.randperm(len(queries), generator=generator)[: cfg.batch_size].tolist()
        snapshot = snapshot_state(model, value_head, optimizer, kl_ctl, moments, generator)

        def attempt(micro_batch: int, accumulation: int) -> dict:
            restore_state(snapshot, model, value_head, optimizer, kl_ctl, moments, generator)  # the same step again
            shrink = cfg.micro_batch_size // micro_batch  # 1, 2, 4... after back-offs: generation shrinks alike
            step_cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
                                           generation_batch_size=max(1, (cfg.generation_batch_size or len(idx))
                                                                     // shrink))
            with measure() as peak:
                out = ppo_step(model, value_head, optimizer, kl_ctl, tokenizer, [queries[i] for i in idx],
                               [prompts[i] for i in idx], scorer, step_cfg, generator, moments)
            return {**out, "peak": peak, "cfg": step_cfg}

        try:
            stats, backoffs = halve_on_oom(attempt, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                                           max_backoffs)
        except NonFiniteError as exc:  # save the state the step started from, then fail loudly
            restore_state(snapshot, model, value_head, optimizer, kl_ctl, moments, generator)
            generator.set_state(sampler_before)
            failed = checkpoints / f"failed-step-{step}"
            if writes:
                save_checkpoint(failed, model, value_head, optimizer, loop_state(step) | {"prompt_indices": idx},
                                exc.rollout)
            raise FloatingPointError(f"step {step}: {exc}; state before the step and its rollout saved to "
                                     f"{failed}") from exc
        batch, peak, step_cfg = stats.pop("batch"), stats.pop("peak"), stats.pop("cfg")
        if backoffs:  # keep the smaller sizes for the rest of the run; the effective batch is unchanged
            cfg = step_cfg
        stats.update(peak_cpu_rss_mib=peak["cpu_peak_rss_mib"], peak_cuda_allocated_mib=peak["cuda_peak_allocated_mib"],
                     oom_backoffs=backoffs, micro_batch_size=cfg.micro_batch_size)
        stats.update(step=step + 1, samples=[{"prompt": prompts[i][-1]["content"], "reply": r, "score": float(s)}
                                             for i, r, s in zip(idx[:2], batch.extra["replies"], batch.extra["raw_scores"])])
        history.append(stats)
        metrics = trl_metrics(stats)
        logger.info("PPO step %d/%d: %s (%.1f s)", step + 1, cfg.steps,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), stats["time_step_s"])
        bar.set_postfix({"score": f"{stats['score']:.3f}", "kl": f"{stats['kl']:.3f}"}, refresh=False)
        bar.update()
        if writer is not None:
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step + 1)
            writer.flush()
        if on_step is not None:
            on_step(step + 1, stats)
        if writes and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(checkpoints / f"checkpoint-{step + 1}", model, value_head, optimizer, loop_state(step + 1))
            for old in checkpoints.glob("checkpoint-*"):
                if old.name != f"checkpoint-{step + 1}":
                    shutil.rmtree(old)
    bar.close()
    return history
