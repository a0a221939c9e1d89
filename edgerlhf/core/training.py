"""Stages 2 and 3 (02_SFT_Finetuning, 03_Reward_Modeling): Trainer plumbing shared by the SFT and reward-model stages
(transformers ``TrainingArguments`` names)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint

from .adapters import compute_dtype


def checkpoint_to_resume(checkpoints: Path, resume: bool, key: str) -> str | None:
    """The checkpoint to resume from, or None for a fresh start.

    Raises:
        FileExistsError: checkpoints of an unfinished run exist but ``resume`` is False (the
            message names the config key ``key`` to set), so they are never silently mixed in.
    """
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if last and not resume:
        raise FileExistsError(f"{checkpoints} holds checkpoints of an unfinished run ({Path(last).name}); "
                              f"set {key}=true to continue it, or delete the folder to start over")
    return last if resume else None


def trainer_arguments(section, checkpoints: Path, device: torch.device, seed: int, metric: str | None,
                      greater_is_better: bool = False) -> dict:
    """Keyword arguments for a TRL ``*Config`` from one stage's config section.

    ``section`` provides ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
    ``learning_rate``, ``num_train_epochs``, ``max_steps``, ``warmup_ratio``, ``lr_scheduler_type``,
    ``max_grad_norm``, ``gradient_checkpointing``, ``eval_steps``, ``logging_steps``,
    ``save_total_limit`` and ``group_by_length`` (length-grouped micro-batches). Evaluation and
    checkpoints happen every ``eval_steps`` optimizer steps (each epoch when None); with a ``metric``
    the best checkpoint is loaded at the end (needed by early stopping); ``metric=None`` disables
    evaluation. bf16 only on a CUDA device that supports it.
    """
    eval_strategy = "no" if metric is None else ("steps" if section.eval_steps else "epoch")
    return dict(
        output_dir=str(checkpoints),
        per_device_train_batch_size=section.per_device_train_batch_size,
        per_device_eval_batch_size=section.per_device_train_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        learning_rate=section.learning_rate, num_train_epochs=section.num_train_epochs, max_steps=section.max_steps,
        warmup_steps=section.warmup_ratio, lr_scheduler_type=section.lr_scheduler_type,
        max_grad_norm=section.max_grad_norm,
        activation_checkpointing=section.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=compute_dtype(device) == torch.bfloat16, fp16=False, use_cpu=device.type == "cpu",
        seed=seed, data_seed=seed, logging_steps=section.logging_steps,
        eval_strategy=eval_strategy, eval_steps=section.eval_steps,
        save_strategy="steps" if section.eval_steps or eval_strategy == "no" else "epoch",
        save_steps=section.eval_steps or 500, save_total_limit=section.save_total_limit,
        load_best_model_at_end=metric is not None, metric_for_best_model=metric, greater_is_better=greater_is_better,
        train_sampling_strategy="group_by_length" if section.group_by_length else "random",
        report_to="none", include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
    )


def keep_trainable_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast trainable parameters back to the compute ``dtype`` after a TRL trainer is built.

    TRL casts every trainable parameter of a quantized model to bf16 (following QLoRA,
    Dettmers et al. 2023, section 3). Where compute runs in float32 (CPU) that leaves a
    full-precision head (a reward model's ``score``) with bf16 weights and float32 inputs,
    which fails; keeping trainables in the compute dtype is what that section intends.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def train_with_backoff(build_trainer, args: dict, resume_from: str | None, max_backoffs: int = 3, log=None):
    """Build a trainer from ``args`` and train it; on ``torch.OutOfMemoryError`` back off and retry.

    ``build_trainer(args) -> Trainer`` must build the trainer around the same model each time.
    A back-off halves ``per_device_train_batch_size`` and doubles ``gradient_accumulation_steps``
    (the effective batch is unchanged; :func:`edgerlhf.core.memory.halve_on_oom`), restores the trainable
    weights to where the failed attempt started, and resumes from the newest checkpoint in
    ``args["output_dir"]`` (the Trainer then skips the batches already trained on, in the same
    seeded order), or from ``resume_from`` when no newer checkpoint was written.

    Returns:
        ``(trainer, train_output, backoffs)``; ``backoffs`` lists every failed attempt's
        ``{"micro_batch", "accumulation", "error", "retried_from"}`` for the run record.
    Raises:
        torch.OutOfMemoryError: still out of memory after ``max_backoffs`` back-offs.
    """
    from .memory import halve_on_oom

    state = {"resume": resume_from, "snapshot": None, "resumes": []}

    def attempt(micro_batch: int, accumulation: int):
        trainer = build_trainer({**args, "per_device_train_batch_size": micro_batch,
                                 "per_device_eval_batch_size": micro_batch,
                                 "gradient_accumulation_steps": accumulation})
        trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        if state["snapshot"] is None:  # the weights this training starts from, kept on the CPU
            state["snapshot"] = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
        else:  # undo the failed attempt's updates; a checkpoint, if any, then overrides them
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(state["snapshot"][n])
        try:
            return trainer, trainer.train(resume_from_checkpoint=state["resume"])
        except torch.OutOfMemoryError:
            trainer.accelerator.free_memory()
            newest = get_last_checkpoint(args["output_dir"]) if Path(args["output_dir"]).exists() else None
            state["resume"] = newest or state["resume"]
            state["resumes"].append(Path(state["resume"]).name if state["resume"] else None)
            raise

    (trainer, output), backoffs = halve_on_oom(
        attempt, args["per_device_train_batch_size"], args["gradient_accumulation_steps"], max_backoffs, log)
    for backoff, resume in zip(backoffs, state["resumes"]):
        backoff["retried_from"] = resume  # the checkpoint the next attempt resumed from (None: the start)
    return trainer, output, backoffs
