"""Stage 3: reward models at BF16, INT8 and INT4 (TRL ``RewardTrainer``), and the quantization study.

For each precision in ``reward.precisions``: data -> tokenizer -> model (SFT backbone + one-output
head, quantized for int8/int4, LoRA on top) -> trainer -> train (resuming) -> save -> evaluate.
Then the trained bf16 model is also loaded at int8 and int4 without retraining (post-training
quantization), and all models are scored on the same held-out pairs.

Folders: ``models/rm/{bf16,int8,int4}`` (trained under that precision); post-training
quantization is the bf16 folder loaded at int8/int4. See :mod:`edgerlhf.rewards`.
Run without the notebook: ``python -m edgerlhf.reward --profile quick``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import EarlyStoppingCallback

from .adapters import PRECISIONS, compute_dtype, count_parameters, lora_config
from .config import Config, RewardConfig
from .files import swap_in_dir
from .lm import fit_prompt
from .memory import free_memory, measure
from .metrics import agreement, evaluate_pairs
from .models import load_tokenizer
from .plots import margin_figure, reliability_figure
from .prefs import read_prefs
from .rewards import (
    HEAD, load_backbone, load_reward_model, score, state_dict_mib, tokenizer_fingerprint, weights_fingerprint,
    write_info,
)
from .stage import begin, cli_config, finish
from .templates import ensure_chat_template, ensure_pad_token
from .training import checkpoint_to_resume, keep_trainable_dtype, train_with_backoff, trainer_arguments

MIB = 2**20


def reward_examples(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """Conversational preference rows for TRL, prompts truncated from the left so both replies fit.

    Returns ``(examples, {"kept", "truncated", "dropped"})``; a pair is dropped only when a
    reply does not fit even after its last user turn alone.
    """
    examples, counts = [], {"kept": 0, "truncated": 0, "dropped": 0}
    for row in rows:
        messages, cut = fit_prompt(tokenizer, row["prompt"], [row["chosen"], row["rejected"]], max_length)
        if messages is None:
            counts["dropped"] += 1
            continue
        counts["truncated"] += int(cut)
        examples.append({"prompt": messages, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                         "rejected": [{"role": "assistant", "content": row["rejected"]}]})
    counts["kept"] = len(examples)
    return examples, counts


def build_reward_model(sft_location: str, precision: str, cfg: RewardConfig, pad_token_id: int,
                       device: torch.device):
    """SFT backbone at ``precision`` with a one-output head, LoRA on top; the head is trained in full."""
    model, _ = load_backbone(sft_location, precision, device)
    model.config.pad_token_id = pad_token_id
    if precision != "bf16":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    config = lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, None, "SEQ_CLS", modules_to_save=[HEAD])
    return get_peft_model(model, config)


def make_trainer(model, tokenizer, cfg: RewardConfig, args: dict, train: list[dict], validation: list[dict]):
    """TRL ``RewardTrainer`` with the Bradley-Terry loss, early stopping on validation accuracy."""
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    config = TRLRewardConfig(**args, max_length=None, center_rewards_coefficient=cfg.center_rewards_coefficient,
                             disable_dropout=False)  # keep LoRA dropout (research plan: 0.1)
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                            eval_dataset=Dataset.from_list(validation), processing_class=tokenizer,
                            callbacks=[EarlyStoppingCallback(cfg.early_stopping_patience)])
    keep_trainable_dtype(trainer.model, compute_dtype(trainer.model.device))
    return trainer


def folder_mib(path: Path) -> float:
    """Size of all files under ``path`` in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB


def save_trained(trainer, tokenizer, sft_location: str, precision: str, staging: Path, device) -> None:
    """Write a trained reward model: bf16 merged into ``model/``; int8/int4 as ``adapter/`` on the SFT backbone."""
    tokenizer.save_pretrained(staging / "tokenizer")
    info = {"precision": precision, "made_by": "trained", "dtype": str(compute_dtype(torch.device(device))).replace(
        "torch.", ""), "tokenizer_sha256": tokenizer_fingerprint(staging / "tokenizer")}
    if precision == "bf16":
        trainer.model.merge_and_unload().save_pretrained(staging / "model", safe_serialization=True)
        write_info(staging, layout="model", **info)
    else:
        trainer.model.save_pretrained(staging / "adapter")
        write_info(staging, layout="adapter", backbone=sft_location,
                   backbone_sha256=weights_fingerprint(sft_location), **info)


def evaluate_folder(folder: Path, precision: str, test: list[dict], validation: list[dict], cfg: RewardConfig,
                    device) -> dict:
    """Load a saved reward model at ``precision`` through the PPO API; measure quality and cost on held-out pairs."""
    with measure(device) as load_m:
        model, tokenizer = load_reward_model(folder, precision, device)
    prompts = [e["prompt"] for e in test]

    def margins(rows):
        kw = {"batch_size": cfg.score_batch_size, "max_length": cfg.max_length}
        p = [e["prompt"] for e in rows]
        return (score(model, tokenizer, p, [e["chosen"][0]["content"] for e in rows], **kw),
                score(model, tokenizer, p, [e["rejected"][0]["content"] for e in rows], **kw))

    with measure(device) as score_m:
        start = time.perf_counter()
        chosen, rejected = margins(test)
        seconds = time.perf_counter() - start
    val_chosen, val_rejected = margins(validation)
    results = evaluate_pairs(chosen.numpy(), rejected.numpy(), (val_chosen - val_rejected).numpy())
    results.update(
        weights_mib=state_dict_mib(model), folder_mib=folder_mib(folder),
        memory_footprint_mib=model.get_memory_footprint() / MIB,
        peak_memory_load=load_m, peak_memory_scoring=score_m, pairs_per_second=len(prompts) / seconds,
        scores_chosen=chosen.tolist(), scores_rejected=rejected.tolist(),
    )
    return results


def train_one(name: str, precision: str, cfg: Config, ctx, sft_location: str, tokenizer, train, validation) -> dict:
    """Train a reward model at ``precision`` into ``models/rm/<name>``; returns training results."""
    r = cfg.reward
    out_dir = ctx.path(r.output_dir)
    checkpoints = out_dir / "checkpoints" / name
    last = checkpoint_to_resume(checkpoints, r.resume, "reward.resume")
    with measure(ctx.device) as m:
        model = build_reward_model(sft_location, precision, r, tokenizer.pad_token_id, ctx.device)
        trainer, output, backoffs = train_with_backoff(
            lambda args: make_trainer(model, tokenizer, r, args, train, validation),
            trainer_arguments(r, checkpoints, ctx.device, cfg.run.seed, "eval_accuracy", greater_is_better=True),
            last, cfg.run.max_oom_backoffs)
        staging = out_dir / f".staging-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        save_trained(trainer, tokenizer, sft_location, precision, staging, ctx.device)
        swap_in_dir(staging, out_dir / name)
        trainer.accelerator.free_memory()  # accelerate keeps references to prepared models and optimizers
    if not r.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    results = {"parameters": count_parameters(model), "global_step": trainer.state.global_step,
               "resumed_from": Path(last).name if last else None, "train_runtime_s": output.metrics["train_runtime"],
               "peak_memory_training": m, "log_history": trainer.state.log_history, "oom_backoffs": backoffs}
    del trainer, model
    free_memory()
    return results


def run_reward(cfg: Config) -> dict:
    """Run stage 3 end to end and write its record; returns ``{"models": {name: results}, "table": [...]}``.

    Raises:
        ValueError: unknown precision; no pairs left after fitting.
        FileExistsError: checkpoints of an unfinished run exist and ``reward.resume`` is False.
    """
    r = cfg.reward
    unknown = [p for p in r.precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"reward.precisions: unknown {unknown}; choose from {PRECISIONS}")
    ctx = begin(cfg)
    data_dir, out_dir = ctx.path(cfg.data.out_dir), ctx.path(r.output_dir)
    with measure(ctx.device) as stage_m:
        # data
        rows = read_prefs(data_dir / "train_prefs.jsonl")
        halves = (rows[: len(rows) // 2], rows[len(rows) // 2:]) if r.judge else (rows, [])
        rows, judge_rows = halves[0][: r.max_train_samples], halves[1][: r.max_train_samples]
        n_val = max(1, int(round(r.validation_fraction * len(rows))))
        test_rows = read_prefs(data_dir / "test_prefs.jsonl")[: r.max_eval_samples]
        # tokenizer (the SFT model's, with its chat template and pad token)
        sft_location = str(ctx.path(cfg.sft.output_dir) / "model" / "merged")
        tokenizer = load_tokenizer(sft_location)
        ensure_chat_template(tokenizer)
        ensure_pad_token(tokenizer)
        train, train_counts = reward_examples(rows[n_val:], tokenizer, r.max_length)
        validation, val_counts = reward_examples(rows[:n_val], tokenizer, r.max_length)
        test, test_counts = reward_examples(test_rows, tokenizer, r.max_length)
        if not train or not validation or not test:
            raise ValueError(f"no pairs left after fitting to reward.max_length={r.max_length}: "
                             f"train {train_counts}, validation {val_counts}, test {test_counts}")
        # model, trainer, train, save - one precision at a time
        models: dict[str, dict] = {}
        for precision in r.precisions:
            models[precision] = {"precision": precision, "mode": "trained",
                                 **train_one(precision, precision, cfg, ctx, sft_location, tokenizer, train,
                                             validation)}
        if r.judge:  # a bf16 model trained on the other half of the pairs, for judging PPO
            judge_train, _ = reward_examples(judge_rows[n_val:], tokenizer, r.max_length)
            judge_val, _ = reward_examples(judge_rows[:n_val], tokenizer, r.max_length)
            models["judge"] = {"precision": "bf16", "mode": "judge (other half)",
                               **train_one("judge", "bf16", cfg, ctx, sft_location, tokenizer, judge_train, judge_val)}
        if r.post_training_quantization and "bf16" in r.precisions:
            for precision in [p for p in PRECISIONS if p != "bf16"]:
                models[f"{precision}-ptq"] = {"precision": precision, "mode": "post-training quantization"}
        # evaluate every model on the same held-out pairs (post-training quantization: bf16 loaded quantized)
        for name, entry in models.items():
            entry["folder"] = str(out_dir / ("bf16" if entry["mode"] == "post-training quantization" else name))
            entry.update(evaluate_folder(Path(entry["folder"]), entry["precision"], test, validation, r, ctx.device))
        if "bf16" in models:
            ref = models["bf16"]
            for entry in models.values():
                entry.update(agreement(
                    ref["scores_chosen"] + ref["scores_rejected"], entry["scores_chosen"] + entry["scores_rejected"],
                    [c - j for c, j in zip(ref["scores_chosen"], ref["scores_rejected"])],
                    [c - j for c, j in zip(entry["scores_chosen"], entry["scores_rejected"])]))
    table = summary_table(models)
    figures = {
        "reliability": str(reliability_figure(models, ctx.run_dir / "figures" / "rm_reliability.png")),
        "margins": str(margin_figure(models, ctx.run_dir / "figures" / "rm_margins.png")),
    }
    results = {"models": models, "table": table, "figures": figures,
               "data": {"train": train_counts, "validation": val_counts, "test": test_counts}}
    results["record"] = str(finish(
        ctx, "reward", results, stage_m,
        model_config={"backbone": sft_location, "precisions": r.precisions, "lora_rank": r.lora_r},
        training_config={k: getattr(r, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs",
            "max_length", "gradient_checkpointing")},
        data={"train_file": str(data_dir / "train_prefs.jsonl"), "test_file": str(data_dir / "test_prefs.jsonl")},
    ))
    return results


def summary_table(models: dict[str, dict]) -> list[dict]:
    """One row per reward model: precision x mode and the study's metrics."""
    rows = []
    for name, e in models.items():
        peak = e.get("peak_memory_training") or {}
        rows.append({
            "model": name, "precision": e["precision"], "mode": e["mode"],
            "accuracy": e["accuracy"], "accuracy_ci95": e["accuracy_ci95"], "ties": e["ties"],
            "auc_roc": e["auc_roc"], "ece": e["ece"], "ece_temperature_scaled": e["ece_temperature_scaled"],
            "nll": e["nll"], "brier": e["brier"], "spearman_vs_bf16": e.get("spearman"),
            "same_ranking_vs_bf16": e.get("same_ranking"), "weights_mib": e["weights_mib"],
            "folder_mib": e["folder_mib"],
            "memory_footprint_mib": e["memory_footprint_mib"],
            "peak_cpu_rss_training_mib": peak.get("cpu_peak_rss_mib"),
            "cpu_increase_training_mib": peak.get("cpu_peak_increase_mib"),
            "peak_cuda_training_mib": peak.get("cuda_peak_allocated_mib"),
            "peak_cpu_rss_scoring_mib": e["peak_memory_scoring"]["cpu_peak_rss_mib"],
            "cpu_increase_scoring_mib": e["peak_memory_scoring"]["cpu_peak_increase_mib"],
            "peak_cuda_scoring_mib": e["peak_memory_scoring"]["cuda_peak_allocated_mib"],
            "pairs_per_second": e["pairs_per_second"], "train_time_s": e.get("train_runtime_s"),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``python -m edgerlhf.reward [--profile P] [--config F] [--set K=V ...]``."""
    results = run_reward(cli_config("Stage 3: reward models at bf16, int8 and int4.", argv))
    print(json.dumps(results["table"], indent=2))


if __name__ == "__main__":
    main()
