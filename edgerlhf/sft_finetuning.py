"""Stage 2 (02_SFT_Finetuning): supervised fine-tuning of the base model on prompt + chosen reply (TRL
``SFTTrainer``).

data -> tokenizer -> model -> trainer -> train (resuming from the last checkpoint) -> save -> evaluate.

Outputs in ``sft.output_dir`` (default ``models/sft``)::

    checkpoints/checkpoint-<step>/   while training (removed after success unless keep_checkpoints)
    model/merged/                    full weights with any adapter merged, + tokenizer: what stages 3-4 load
    model/adapter/                   the LoRA adapter (lora, qlora, distill)
    model/sft_info.json              strategy, dtype, base model, metrics, weights digest, training file sha256

``model/`` is replaced only after a run succeeds with finite losses and weights, so a failed or diverged run leaves
the last good model.
Run without the notebook: ``python -m edgerlhf.sft_finetuning --profile quick`` (or under ``accelerate launch -m``).
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import EarlyStoppingCallback

from .core.adapters import (
    compute_dtype, count_parameters, freeze_first_blocks, lora_config, nf4_in_compute_dtype, quantization_config,
    require_finite,
)
from .core.config import Config, SFTStageConfig
from .core.distributed import main_process_writes
from .core.files import atomic_write_text, folder_digest, new_staging, swap_in_dir
from .core.generation import generate
from .core.lm import completion_nll, fit_prompt
from .core.logs import trainer_callbacks
from .core.memory import free_memory, measure
from .core.models import load_causal_lm, load_tokenizer, prepare_base_model
from .core.plots import loss_figure
from .core.prefs import TRAIN, check_data_set, read_prefs, sft_pairs
from .core.stage import begin, choose_micro_batch, cli_main, finish, recorded
from .core.templates import ensure_chat_template, ensure_pad_token
from .core.training import checkpoint_to_resume, train_with_backoff, trainer_arguments

def sft_examples(rows: list[dict], tokenizer, max_length: int, overlong: str) -> tuple[list[dict], dict]:
    """Conversational prompt-completion rows for TRL, fitted to ``max_length`` tokens.

    Returns ``(examples, counts)`` with ``examples[i] = {"prompt": [messages], "completion":
    [{"role": "assistant", "content": chosen}]}`` and ``counts = {"kept", "truncated", "dropped"}``.
    """
    examples, counts = [], {"kept": 0, "truncated": 0, "dropped": 0}
    for row in rows:
        messages, truncated = fit_prompt(tokenizer, row["prompt"], [row["chosen"]], max_length, overlong)
        if messages is None:
            counts["dropped"] += 1
            continue
        counts["truncated"] += int(truncated)
        examples.append({"prompt": messages, "completion": [{"role": "assistant", "content": row["chosen"]}]})
    counts["kept"] = len(examples)
    return examples, counts


def build_model(location: str, cfg: SFTStageConfig, device: torch.device,
                loaded: torch.nn.Module | None = None) -> torch.nn.Module:
    """The model to train for ``cfg.strategy``: LoRA/QLoRA-wrapped, fully trainable, or partly frozen.

    ``loaded`` is the base model already in memory in the compute dtype (reused, not loaded again);
    ``qlora`` always loads its own 4-bit copy.

    Raises:
        ValueError: unknown strategy or target module, or ``frozen_layers`` out of range.
    """
    dtype = compute_dtype(device)
    if cfg.strategy == "qlora":
        model = nf4_in_compute_dtype(load_causal_lm(location, dtype, quantization_config=quantization_config(
            "int4", dtype), device_map={"": str(device)}))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model = loaded if loaded is not None else load_causal_lm(location, dtype).to(device)
    if cfg.strategy in ("lora", "qlora", "distill"):
        config = lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, "CAUSAL_LM")
        model = get_peft_model(model, config)
    elif cfg.strategy == "frozen":
        freeze_first_blocks(model, cfg.frozen_layers)
    return model


def training_arguments(cfg: SFTStageConfig, checkpoints: Path, device: torch.device, seed: int) -> dict:
    """TRL trainer arguments; evaluation on eval loss, except for ``distill`` (no eval set)."""
    metric = None if cfg.strategy == "distill" else "eval_loss"
    return trainer_arguments(cfg, checkpoints, device, seed, metric, greater_is_better=False)


def make_trainer(model, tokenizer, cfg: SFTStageConfig, args: dict, train: list[dict], evaluation: list[dict],
                 teacher_location: str | None, callbacks: list = ()):
    """TRL's ``SFTTrainer`` (completion-only loss, early stopping on eval loss) or, for
    ``distill``, TRL's ``DistillationTrainer`` (on-policy generalized JSD to the teacher)."""
    from datasets import Dataset

    if cfg.strategy == "distill":
        from trl import DistillationConfig, DistillationTrainer

        teacher = load_causal_lm(teacher_location, compute_dtype(model.device)).to(model.device)
        config = DistillationConfig(**args, max_completion_length=cfg.sample_max_new_tokens)
        prompts = Dataset.from_list([{"prompt": e["prompt"]} for e in train])
        return DistillationTrainer(model=model, teacher_model=teacher, args=config, train_dataset=prompts,
                                   processing_class=tokenizer, callbacks=list(callbacks))
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**args, max_length=cfg.max_length, completion_only_loss=True, packing=False)
    return SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(evaluation),
        processing_class=tokenizer, callbacks=[EarlyStoppingCallback(cfg.early_stopping_patience), *callbacks],
    )


def merged_model(trained, cfg: SFTStageConfig, base_location: str, adapter_dir: Path | None, device: torch.device):
    """The trained weights as one plain model in the compute dtype (adapter merged).

    QLoRA's adapter is merged into the base loaded in full precision, not into 4-bit weights.
    """
    if adapter_dir is None:
        return trained
    if cfg.strategy == "qlora":
        base = load_causal_lm(base_location, compute_dtype(device)).to(device)
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return trained.merge_and_unload()


def start_staging(staging: Path, model, adapter_dir: Path | None) -> None:
    """Save the trained adapter into ``adapter_dir`` (None: no adapter) in the new, empty ``staging`` folder."""
    if adapter_dir is not None:
        model.save_pretrained(adapter_dir)


def save_merged(model, tokenizer, folder: Path) -> None:
    """Save the merged model (safetensors) and its tokenizer into ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def finish_model(staging: Path, model_dir: Path, info: dict, checkpoints: Path | None) -> None:
    """Write ``sft_info.json`` into ``staging``, swap it in as ``model_dir`` (the old model stays until the new
    one is complete) and remove the ``checkpoints`` folder unless it is None."""
    atomic_write_text(staging / "sft_info.json", json.dumps(info, indent=2) + "\n")
    swap_in_dir(staging, model_dir)
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)


def require_finite_losses(log_history: list[dict], train_loss: float | None, model_dir: Path,
                          checkpoints: Path) -> None:
    """Refuse a run whose final training loss (the Trainer's mean over the run) or last eval loss is NaN or inf:
    it diverged, and its model must not replace the one in ``model_dir``. Its ``checkpoints`` are removed first:
    resuming would continue the divergence, and they would block the next run (``sft.resume``).

    Raises:
        ValueError: naming the non-finite losses and ``model_dir`` (kept as it was).
    """
    last_eval = next((e["eval_loss"] for e in reversed(log_history) if "eval_loss" in e), None)
    bad = {k: v for k, v in (("train_loss", train_loss), ("eval_loss", last_eval))
           if v is not None and not math.isfinite(v)}
    if bad:
        main_process_writes(shutil.rmtree, checkpoints, ignore_errors=True)
        raise ValueError(f"SFT diverged: final {bad} (try a lower sft.learning_rate); {model_dir} is kept as it was, "
                         f"and the run's checkpoints ({checkpoints}) were removed: a diverged run is not resumed")


def samples_table(prompts: list[list[dict]], before: list[str], after: list[str]) -> list[dict]:
    """Rows ``{"prompt": last user turn, "before": reply, "after": reply}`` for the notebook."""
    return [{"prompt": p[-1]["content"], "before": b, "after": a} for p, b, a in zip(prompts, before, after)]


@recorded("sft")
def run_sft(cfg: Config) -> dict:
    """Run stage 2 end to end and write its record; returns the stage's results.

    Raises:
        ValueError: unknown strategy, target module or overlong mode; empty data after fitting; a run that
            diverged (a non-finite final loss, weight or perplexity), which leaves ``model/`` as it was.
        FileExistsError: checkpoints of an interrupted run exist and ``sft.resume`` is False.
        DataFormatError / FileNotFoundError: bad or missing preference files.
    """
    s = cfg.sft
    if s.strategy == "distill" and not s.teacher:
        raise ValueError("sft.strategy='distill' needs sft.teacher (a registry name or model folder)")
    ctx = begin(cfg, distributed=True)
    out_dir, data_dir = ctx.path(s.output_dir), ctx.path(cfg.data.out_dir)
    checkpoints = out_dir / "checkpoints"
    last = checkpoint_to_resume(checkpoints, s.resume, "sft.resume")
    with measure(ctx.device) as m:
        # data
        ctx.step = "data"
        data_sha256 = {TRAIN: check_data_set(data_dir, (TRAIN,))[TRAIN]}
        train_rows, eval_rows = sft_pairs(read_prefs(data_dir / TRAIN), s.max_train_samples, s.max_eval_samples)
        # tokenizer
        ctx.step = "tokenizer"
        base = prepare_base_model(cfg.model.name, ctx.path(cfg.model.models_dir))
        train_cfg, micro_batch = choose_micro_batch(ctx, "sft", base)  # on CUDA, the micro-batch the planner fits
        s = train_cfg.sft
        tokenizer = load_tokenizer(base)
        template = ensure_chat_template(tokenizer)
        ensure_pad_token(tokenizer)
        train, train_counts = sft_examples(train_rows, tokenizer, s.max_length, s.overlong)
        evaluation, eval_counts = sft_examples(eval_rows, tokenizer, s.max_length, s.overlong)
        if not train or not evaluation:
            raise ValueError(f"no SFT examples left after fitting to sft.max_length={s.max_length}: "
                             f"train {train_counts}, eval {eval_counts}")
        pairs = [(e["prompt"], e["completion"][0]["content"]) for e in evaluation]
        sample_prompts = [e["prompt"] for e in evaluation[: s.n_samples]]
        # model, and the "before" measurements on the untouched base
        ctx.step = "model"
        base_model = load_causal_lm(base, compute_dtype(ctx.device)).to(ctx.device)
        before = completion_nll(base_model, tokenizer, pairs)
        samples_before = generate(base_model, tokenizer, sample_prompts, max_new_tokens=s.sample_max_new_tokens)
        free_memory()  # the perplexity pass's logits are gone; give their pages back before training
        if s.strategy == "qlora":  # trains its own 4-bit copy
            del base_model
            base_model = None
        teacher = prepare_base_model(s.teacher, ctx.path(cfg.model.models_dir)) if s.teacher else None
        model = build_model(base, s, ctx.device, base_model)
        parameters = count_parameters(model)
        # trainer, train
        ctx.step = "train"
        trainer, output, backoffs = train_with_backoff(
            lambda args: make_trainer(model, tokenizer, s, args, train, evaluation, teacher,
                                      trainer_callbacks(cfg.run.report_to, ctx.run_dir, "sft")),
            training_arguments(s, checkpoints, ctx.device, cfg.run.seed), last, cfg.run.max_oom_backoffs)
        # a diverged run fails here: nothing of it is swapped in (model/ stays the last good model)
        ctx.step = "check losses"
        require_finite_losses(trainer.state.log_history, output.training_loss, out_dir / "model", checkpoints)
        # save (into a staging folder, swapped in only when complete)
        ctx.step = "save"
        staging = main_process_writes(new_staging, out_dir / "model", ctx.run_dir.name)
        adapter_dir = staging / "adapter" if isinstance(trainer.model, PeftModel) else None
        main_process_writes(start_staging, staging, trainer.model, adapter_dir)
        final = merged_model(trainer.model, s, base, adapter_dir, ctx.device)
        trainer.accelerator.free_memory()  # accelerate keeps references to prepared models and optimizers
        free_memory()
        ctx.step = "check weights"
        require_finite(final.state_dict(), f"SFT model ({s.strategy}, merged; {out_dir / 'model'} is kept as it was)")
        ctx.step = "save"
        main_process_writes(save_merged, final, tokenizer, staging / "merged")
        # evaluate the merged model: what stages 3 and 4 load
        ctx.step = "evaluate"
        after = completion_nll(final, tokenizer, pairs)
        if not math.isfinite(after["perplexity"]):
            raise ValueError(f"SFT model: perplexity after training is {after['perplexity']} on the validation "
                             f"pairs; {out_dir / 'model'} is kept as it was")
        samples_after = generate(final, tokenizer, sample_prompts, max_new_tokens=s.sample_max_new_tokens)
        results = {
            "strategy": s.strategy, "dtype": str(compute_dtype(ctx.device)).replace("torch.", ""),
            "template": template, "parameters": parameters,
            "data": {"train": train_counts, "eval": eval_counts},
            "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "eval_tokens": before["tokens"], "global_step": trainer.state.global_step,
            "resumed_from": Path(last).name if last else None,
            "best_checkpoint": Path(trainer.state.best_model_checkpoint).name
            if trainer.state.best_model_checkpoint else None,
            "train_runtime_s": output.metrics.get("train_runtime"),
            "tokens_seen": trainer.state.num_input_tokens_seen,
            "tokens_per_second": trainer.state.num_input_tokens_seen / max(output.metrics.get("train_runtime", 0), 1e-9),
            "log_history": trainer.state.log_history, "oom_backoffs": backoffs, "micro_batch_choice": micro_batch,
            "samples": samples_table(sample_prompts, samples_before, samples_after),
        }
        results["data_sha256"] = data_sha256
        results["weights_sha256"] = main_process_writes(folder_digest, staging / "merged")
        info = {k: v for k, v in results.items() if k not in ("log_history", "samples")} | {"base_model": base}
        main_process_writes(finish_model, staging, out_dir / "model", info,
                            None if s.keep_checkpoints else checkpoints)
    results["model_dir"] = str(out_dir / "model")
    results["figure"] = str(main_process_writes(loss_figure, trainer.state.log_history,
                                                ctx.run_dir / "figures" / "sft_loss.png"))
    results["record"] = str(finish(
        ctx, "sft", results, m, model_config={"base_model": cfg.model.name, "strategy": s.strategy,
                                              "lora_rank": s.lora_r if s.strategy in ("lora", "qlora", "distill")
                                              else None},
        training_config={k: getattr(s, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs",
            "max_length", "warmup_ratio", "lr_scheduler_type")},
        data={"train_file": str(data_dir / TRAIN), "train_sha256": data_sha256[TRAIN]},
    ))
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m edgerlhf.sft_finetuning [--profile P] [--config F] [--set K=V ...]``;
    returns the exit status (:func:`edgerlhf.core.stage.cli_main`)."""
    keys = ("strategy", "perplexity_before", "perplexity_after", "tokens_per_second", "model_dir", "record")
    return cli_main("edgerlhf.sft_finetuning", "Stage 2: supervised fine-tuning.", run_sft,
                    lambda results: json.dumps({k: results[k] for k in keys}, indent=2), argv)


if __name__ == "__main__":
    sys.exit(main())
