"""Stage 3 (03_Reward_Modeling): reward models at BF16, INT8 and INT4, the quantization study, and the judge.

For each precision in ``reward.precisions``: data -> tokenizer -> model (SFT backbone at that
precision + a one-output head) -> train -> save; then, once every model is saved and every choice made on
training pairs, the final evaluation reads the held-out test pairs. Training is ``reward.method``:

* ``lora`` - TRL ``RewardTrainer`` (Bradley-Terry loss), LoRA on the backbone, head trained in full;
* ``probe`` - the backbone frozen at the precision; each reply's states at block ``reward.probe_layer`` (or
  the block ``reward.probe_layer_search`` chooses), pooled as ``reward.probe_pooling`` says (default
  ``last+mean``), are computed once and the head is fitted on ``chosen - rejected`` by logistic regression
  (:mod:`edgerlhf.core.probe`: features, fit, folder, check, cross-fitted evaluation).

The trained bf16 model is also loaded at int8 and int4 without retraining (post-training
quantization, ``-ptq``). Two judges are trained on pairs no proxy sees, for stage 4: ``judge`` (the
proxies' recipe at bf16) and ``judge-tfidf`` (TF-IDF of the reply, evidence the proxies do not use).
Every model and the baselines (length rules, TF-IDF; :mod:`edgerlhf.core.baselines`) are scored on
the same held-out pairs and compared paired (:func:`edgerlhf.core.metrics.assess`): McNemar with Holm's
correction, paired bootstrap, minimum detectable difference, and a verdict in words. ``models/rm/evaluation.json``
carries each model's verdict and weight digest to stage 4. The models and ``evaluation.json`` are written to one
staging set and swapped in as ``models/rm`` at the end, so an interrupted run leaves the previous set whole.
Probes are also cross-fitted over every pair SFT did not train on (:func:`edgerlhf.core.probe.crossfit_evaluation`),
the evaluation that compares precisions.

Folders: ``models/rm/{bf16,int8,int4,judge,judge-tfidf}``; see :mod:`edgerlhf.core.reward_scoring` for their layouts.
Run without the notebook: ``python -m edgerlhf.reward_modeling --profile quick``.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import EarlyStoppingCallback

from .core.adapters import PRECISIONS, compute_dtype, count_parameters, lora_config, require_finite
from .core.baselines import TfidfReward, baseline_scores
from .core.config import Config, RewardStageConfig
from .core.crossfit import phi
from .core.distributed import main_process_writes
from .core.files import atomic_write_text, new_staging, swap_in_dir
from .core.lm import fit_prompt
from .core.logs import trainer_callbacks
from .core.memory import free_memory, measure
from .core.metrics import agreement, assess, correct, evaluate_pairs
from .core.models import load_tokenizer
from .core.plots import accuracy_figure, margin_figure, reliability_figure
from .core.prefs import TEST, TRAIN, check_data_set, read_prefs, sft_pairs, split_pairs
from .core.probe import (
    check_saved_probe, choose_probe_layer, crossfit_evaluation, fit_head, probe_features, probe_scores, save_probe,
)
from .core.provenance import sft_identity
from .core.reward_scoring import (
    HEAD, JUDGES, dtype_that_ran, folder_mib, load_backbone, loading_cost, score, tokenizer_fingerprint, weights_digest,
    weights_fingerprint, write_info,
)
from .core.stage import begin, choose_micro_batch, cli_main, finish, recorded
from .core.templates import ensure_chat_template, ensure_pad_token
from .core.training import checkpoint_to_resume, keep_trainable_dtype, train_with_backoff, trainer_arguments

#: The second judge's folder under ``models/rm``: TF-IDF of the reply with a Bradley-Terry head (judge's pairs).
TFIDF_JUDGE = JUDGES[1]


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


def build_reward_model(sft_location: str, precision: str, cfg: RewardStageConfig, pad_token_id: int,
                       device: torch.device):
    """SFT backbone at ``precision`` with a one-output head, LoRA on top; the head is trained in full."""
    model, _ = load_backbone(sft_location, precision, device, dtype=compute_dtype(device))
    model.config.pad_token_id = pad_token_id
    if precision != "bf16":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    config = lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, None, "SEQ_CLS", modules_to_save=[HEAD])
    return get_peft_model(model, config)


def make_trainer(model, tokenizer, cfg: RewardStageConfig, args: dict, train: list[dict], validation: list[dict],
                 callbacks: list = ()):
    """TRL ``RewardTrainer`` with the Bradley-Terry loss, early stopping on validation accuracy.

    With ``cfg.group_by_length`` the tokenized pairs get a ``length`` column, the width the
    collator pads a pair to (the longer of its chosen and rejected ids, tokens), for transformers'
    ``LengthGroupedSampler``, which infers lengths only from an ``input_ids`` column that preference data
    lacks; unused columns are then kept (the collator reads only the ids), so the sampler sees it."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(**args, max_length=None, center_rewards_coefficient=cfg.center_rewards_coefficient,
                             disable_dropout=False,  # keep LoRA dropout (research plan: 0.1)
                             remove_unused_columns=not cfg.group_by_length)
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                            eval_dataset=Dataset.from_list(validation), processing_class=tokenizer,
                            callbacks=[EarlyStoppingCallback(cfg.early_stopping_patience), *callbacks])
    if cfg.group_by_length:  # transformers groups the evaluation batches by length too
        def width(e):
            return {"length": max(len(e["chosen_ids"]), len(e["rejected_ids"]))}
        trainer.train_dataset, trainer.eval_dataset = trainer.train_dataset.map(width), trainer.eval_dataset.map(width)
    keep_trainable_dtype(trainer.model, compute_dtype(trainer.model.device))
    return trainer


def write_model_folder(folder: Path, write) -> None:
    """Fill the new ``folder``, inside stage 3's staging set (:func:`run_reward`), with ``write(folder)``; on the
    main process only (:func:`edgerlhf.core.distributed.main_process_writes`), the others wait for it."""
    main_process_writes(write, folder)


def save_trained(trainer, tokenizer, sft_location: str, precision: str, staging: Path, device) -> None:
    """Write a LoRA-trained reward model: bf16 merged into ``model/``; int8/int4 as ``adapter/`` on the SFT backbone.

    Raises:
        ValueError: a weight (merged, or of the adapter model) holds NaN or inf; nothing is written.
    """
    what = f"reward model {staging.name} ({precision}, lora)"
    merged = trainer.model.merge_and_unload() if precision == "bf16" else None
    require_finite((merged if merged is not None else trainer.model).state_dict(), what)
    tokenizer.save_pretrained(staging / "tokenizer")
    info = {"precision": precision, "made_by": "lora", "dtype": dtype_that_ran(precision, device),
            "tokenizer_sha256": tokenizer_fingerprint(staging / "tokenizer")}
    if merged is not None:
        merged.save_pretrained(staging / "model", safe_serialization=True)
        write_info(staging, layout="model", **info)
    else:
        trainer.model.save_pretrained(staging / "adapter")
        write_info(staging, layout="adapter", backbone=sft_location,
                   backbone_sha256=weights_fingerprint(sft_location), **info)


def evaluate_folder(folder: Path, precision: str, test: list[dict], validation: list[dict], cfg: RewardStageConfig,
                    device) -> dict:
    """Load a saved reward model at ``precision`` through the PPO API; measure quality and cost on held-out pairs."""
    model, tokenizer, cost = loading_cost(folder, precision, device)

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
    results.update(cost, peak_memory_scoring=score_m, pairs_per_second=len(test) / seconds,
                   scores_chosen=chosen.tolist(), scores_rejected=rejected.tolist())
    return results


def train_one(name: str, precision: str, cfg: Config, ctx, sft_location: str, tokenizer, train, validation,
              seed: int, out_dir: Path) -> dict:
    """Train a LoRA reward model at ``precision`` into ``out_dir/<name>`` (the staging set); its checkpoints go
    to ``reward.output_dir/checkpoints/<name>``, where a later run resumes from them. Returns training results."""
    r = cfg.reward
    checkpoints = ctx.path(r.output_dir) / "checkpoints" / name
    last = checkpoint_to_resume(checkpoints, r.resume, "reward.resume")
    with measure(ctx.device) as m:
        model = build_reward_model(sft_location, precision, r, tokenizer.pad_token_id, ctx.device)
        parameters = count_parameters(model)  # before training merges the adapter away
        trainer, output, backoffs = train_with_backoff(
            lambda args: make_trainer(model, tokenizer, r, args, train, validation,
                                      trainer_callbacks(cfg.run.report_to, ctx.run_dir, f"reward/{name}")),
            trainer_arguments(r, checkpoints, ctx.device, seed, "eval_accuracy", greater_is_better=True),
            last, cfg.run.max_oom_backoffs)
        write_model_folder(out_dir / name, lambda staging: save_trained(
            trainer, tokenizer, sft_location, precision, staging, ctx.device))
        trainer.accelerator.free_memory()  # accelerate keeps references to prepared models and optimizers
    if not r.keep_checkpoints:
        main_process_writes(shutil.rmtree, checkpoints, ignore_errors=True)
    results = {"parameters": parameters, "global_step": trainer.state.global_step,
               "resumed_from": Path(last).name if last else None, "train_runtime_s": output.metrics["train_runtime"],
               "peak_memory_training": m, "log_history": trainer.state.log_history, "oom_backoffs": backoffs}
    del trainer, model
    free_memory()
    return results


def lora_models(cfg: Config, ctx, sft_location: str, tokenizer, ex: dict[str, list[dict]],
                out_dir: Path) -> dict[str, dict]:
    """``reward.method = "lora"``: train and save every precision (every seed) and the judge. Extra seeds are
    saved in hidden folders ``.<name>-seed<seed>`` that :func:`evaluate_lora_models` removes once evaluated.

    Returns ``{name: entry}`` with the training results; ``entry["seed_folders"]`` lists ``(seed, folder)``."""
    r = cfg.reward
    jobs = [(p, p, "trained", "train", "validation") for p in r.precisions]
    if r.judge:
        jobs.append(("judge", "bf16", "judge (pairs no proxy saw)", "judge_train", "judge_validation"))
    models: dict[str, dict] = {}
    for name, precision, mode, train_split, val_split in jobs:
        seeds = r.seeds if mode == "trained" else r.seeds[:1]
        folders = []
        for i, seed in enumerate(seeds):
            ctx.step = f"models: {name} seed {seed} training"
            folder_name = name if i == 0 else f".{name}-seed{seed}"
            trained = train_one(folder_name, precision, cfg, ctx, sft_location, tokenizer, ex[train_split],
                                ex[val_split], seed, out_dir)
            folders.append((seed, str(out_dir / folder_name)))
            if i == 0:
                models[name] = {"precision": precision, "mode": mode, "method": "lora", "folder": str(out_dir / name),
                                "dtype": dtype_that_ran(precision, ctx.device), "validation_split": val_split,
                                **trained}
        models[name].update(seed_folders=folders)
    return models


def evaluate_lora_models(models: dict[str, dict], cfg: Config, ctx, ex: dict[str, list[dict]], out_dir: Path) -> None:
    """The final evaluation of :func:`lora_models`' models (in place): every seed's folder scored on the test pairs
    (accuracy per seed; the first seed's model is the one kept), extra seeds' folders then removed; and the
    post-training-quantized bf16 model (``-ptq``)."""
    r = cfg.reward
    for name, entry in models.items():
        accuracies, folders, validation = [], entry.pop("seed_folders"), ex[entry.pop("validation_split")]
        for i, (seed, folder) in enumerate(folders):
            ctx.step = f"final evaluation: {name} seed {seed}"
            evaluated = evaluate_folder(Path(folder), entry["precision"], ex["test"], validation, r, ctx.device)
            accuracies.append(evaluated["accuracy"])
            if i == 0:
                entry.update(evaluated)
            else:
                main_process_writes(shutil.rmtree, Path(folder))
        entry.update(seeds=[s for s, _ in folders], seed_accuracies=accuracies)
    if r.post_training_quantization and "bf16" in r.precisions:
        for precision in [p for p in PRECISIONS if p != "bf16"]:
            ctx.step = f"final evaluation: {precision}-ptq"
            models[f"{precision}-ptq"] = {
                "precision": precision, "mode": "post-training quantization", "method": "lora",
                "folder": str(out_dir / "bf16"), "dtype": dtype_that_ran(precision, ctx.device),
                **evaluate_folder(out_dir / "bf16", precision, ex["test"], ex["validation"], r, ctx.device)}


def train_tfidf_judge(folder: Path, ex: dict[str, list[dict]], seed: int) -> tuple[dict, TfidfReward]:
    """Fit and save the second judge (:data:`TFIDF_JUDGE`) on the judge's training pairs: TF-IDF of the reply
    and a linear Bradley-Terry head (:class:`edgerlhf.core.baselines.TfidfReward`), evidence the proxies' heads
    on backbone features do not share. Returns its entry (training results) and the model."""
    def replies(split, side):
        return [e[side][0]["content"] for e in ex[split]]

    start = time.perf_counter()
    model = TfidfReward(seed).fit(replies("judge_train", "chosen"), replies("judge_train", "rejected"))
    seconds = time.perf_counter() - start

    def write(staging: Path) -> None:
        staging.mkdir(parents=True)
        model.save(staging)
        write_info(staging, layout="tfidf", precision=None, made_by="tf-idf", C=model.C)

    write_model_folder(folder, write)
    return {"precision": None, "mode": "judge (pairs no proxy saw)", "method": "tf-idf", "dtype": "float64",
            "folder": str(folder), "C": model.C, "train_pairs": len(ex["judge_train"]), "train_runtime_s": seconds,
            "parameters": {"trainable": int(model.weight.size), "total": int(model.weight.size),
                           "trainable_share": 1.0}}, model


def evaluate_tfidf_judge(entry: dict, model: TfidfReward, ex: dict[str, list[dict]]) -> None:
    """The final evaluation of the TF-IDF judge (in place): the saved folder reloaded and checked to score as
    the fitted model, then accuracy, AUC and calibration (temperature from its validation pairs) on the test pairs.

    Raises:
        RuntimeError: the saved model scores differently from the fitted one.
    """
    saved = TfidfReward.load(entry["folder"])

    def margins(m, split):
        return (m.score([e["chosen"][0]["content"] for e in ex[split]]),
                m.score([e["rejected"][0]["content"] for e in ex[split]]))

    start = time.perf_counter()
    c, rj = margins(saved, "test")
    seconds = time.perf_counter() - start
    if not np.allclose(c, margins(model, "test")[0], rtol=0, atol=1e-9):
        raise RuntimeError(f"{entry['folder']}: the saved TF-IDF judge scores differently from the fitted one")
    vc, vr = margins(saved, "judge_validation")
    mib = folder_mib(Path(entry["folder"]))
    entry.update(seed_accuracies=[float(np.mean(c > rj))], pairs_per_second=len(c) / max(seconds, 1e-9),
                 weights_mib=mib, folder_mib=mib, memory_footprint_mib=None,
                 **evaluate_pairs(c, rj, vc - vr), scores_chosen=c.tolist(), scores_rejected=rj.tolist())


def probe_models(cfg: Config, ctx, sft_location: str, tokenizer, ex: dict[str, list[dict]],
                 out_dir: Path) -> tuple[dict[str, dict], dict | None, dict[str, dict], dict[str, dict]]:
    """``reward.method = "probe"``, before any test pair is read: per precision (bf16 first), one feature pass
    over every training split (the cross-fitted evaluation reads them all), then its head fitted
    (``reward.seeds[0]``: a convex fit, whose training variance the cross-fitted evaluation's fold draws
    measure), saved and checked on validation pairs before the next pass; the judge on bf16 features of its own
    pairs; post-training quantization = the bf16 head on int8/int4 features (the same arithmetic as loading the
    bf16 folder quantized). With ``reward.probe_layer_search`` the first pass reads every candidate block and the
    block chosen on its training pairs is used from then on. :func:`evaluate_probes` scores them on the test pairs.
    Models are saved under ``out_dir`` (the staging set).

    Returns:
        ``(models, search, features, heads)``: an entry per reward model (training results), the layer search's
        result (None without one), ``{precision: {split: (features_chosen, features_rejected)}}`` at the chosen
        block, and ``{name: fit}`` of every head fitted (:func:`edgerlhf.core.probe.fit_head`).
    """
    r = cfg.reward
    ptq = [p for p in PRECISIONS if p != "bf16"] if r.post_training_quantization and "bf16" in r.precisions else []
    layer, search = r.probe_layer, None

    def parameters(width: int, total: int) -> dict:  # the head's weights are the trained ones
        return {"trainable": width, "total": total, "trainable_share": width / total}

    models: dict[str, dict] = {}
    heads: dict[str, dict] = {}
    features: dict[str, dict] = {}
    for i, precision in enumerate(sorted(dict.fromkeys(list(r.precisions) + ptq), key=lambda p: p != "bf16")):
        ctx.step = f"models: {precision} features"
        jobs = [(precision, "trained", "train", "validation")] if precision in r.precisions else []
        if precision == "bf16" and r.judge:
            jobs.append(("judge", "judge (pairs no proxy saw)", "judge_train", "judge_validation"))
        if i == 0 and r.probe_layer_search:  # every candidate block from one pass, chosen on the training pairs
            candidates = sorted(set(r.probe_layer_search))
            many, cost = probe_features(sft_location, precision, tokenizer, ex, r, ctx.device, candidates[-1],
                                        candidates)
            search = {"precision": precision, **choose_probe_layer(many[jobs[0][2]], candidates, r.seeds[0])}
            layer, j = search["chosen"], candidates.index(search["chosen"])
            feats = {k: (c[:, j], rj[:, j]) for k, (c, rj) in many.items()}
            cost["parameters_total"] = cost["parameters_total"][layer]
            del many
        else:
            feats, cost = probe_features(sft_location, precision, tokenizer, ex, r, ctx.device, layer)
        common = {"precision": precision, "method": "probe", "dtype": dtype_that_ran(precision, ctx.device),
                  "probe_layer": layer, "seeds": [r.seeds[0]]}
        for name, mode, train_split, val_split in jobs:
            ctx.step = f"models: {name} fit, save and check"
            fit = heads[name] = fit_head(feats[train_split], r.seeds[0])
            write_model_folder(out_dir / name, lambda staging: save_probe(
                staging, fit["weight"], tokenizer, sft_location, precision, ctx.device, fit, layer, r.probe_pooling))
            models[name] = {
                **common, "mode": mode, "folder": str(out_dir / name), "head": name, "validation_split": val_split,
                "C": fit["C"], "cv_curve": fit["cv_curve"], "train_pairs": len(ex[train_split]),
                "parameters": parameters(fit["weight"].shape[0], cost["parameters_total"]),
                "train_runtime_s": cost["seconds"][train_split], "peak_memory_training": cost["peak_memory_features"],
                **check_saved_probe(out_dir / name, precision, ex[val_split],
                                    probe_scores(fit["weight"], feats[val_split])[0], r, ctx.device)}
        if precision in ptq:
            ctx.step = f"models: {precision}-ptq"
            models[f"{precision}-ptq"] = {
                **common, "mode": "post-training quantization", "folder": str(out_dir / "bf16"), "head": "bf16",
                "validation_split": "validation", "C": heads["bf16"]["C"],
                "parameters": parameters(heads["bf16"]["weight"].shape[0], cost["parameters_total"]),
                "train_pairs": None, "train_runtime_s": None, "peak_memory_training": None,
                **loading_cost(out_dir / "bf16", precision, ctx.device)[2]}
        features[precision] = feats
    return models, search, features, heads


def evaluate_probes(models: dict[str, dict], heads: dict[str, dict], features: dict[str, dict], cfg: Config, ctx,
                    sft_location: str, tokenizer, ex: dict[str, list[dict]]) -> None:
    """The final evaluation of :func:`probe_models`' models (in place): per precision one pass over the test pairs
    through the chosen block (added to ``features``), then each model of that precision scored there: accuracy,
    AUC, calibration (temperature fitted on its validation pairs), margins; and the pass's throughput and memory."""
    for precision in dict.fromkeys(e["precision"] for e in models.values()):
        ctx.step = f"final evaluation: {precision} test features"
        layer = next(e["probe_layer"] for e in models.values() if e["precision"] == precision)
        feats, cost = probe_features(sft_location, precision, tokenizer, {"test": ex["test"]}, cfg.reward,
                                     ctx.device, layer)
        features[precision]["test"] = feats["test"]
        for entry in (e for e in models.values() if e["precision"] == precision):
            weight = heads[entry.pop("head")]["weight"]
            c, rj = probe_scores(weight, feats["test"])
            vc, vr = probe_scores(weight, features[precision][entry.pop("validation_split")])
            entry.update(seed_accuracies=[float(np.mean(c > rj))],
                         pairs_per_second=len(ex["test"]) / cost["seconds"]["test"],
                         blocks_run_when_timed=cost["blocks_run"], peak_memory_scoring=cost["peak_memory_features"],
                         **evaluate_pairs(c, rj, vc - vr), scores_chosen=c.tolist(), scores_rejected=rj.tolist())


def write_evaluation(out_dir: Path, models: dict[str, dict], assessment: dict, inputs: dict[str, str],
                     digests: dict[str, str]) -> Path:
    """``evaluation.json`` in the staging set ``out_dir``: each reward model's held-out verdict and the digest of
    its trained weights (``digests``, by folder name: :func:`edgerlhf.core.reward_scoring.weights_digest`), and the
    sha256 of the ``inputs`` (data files, SFT weights) the set was made from. Stage 4 reads it to label its PPO
    rows and refuses a model whose digest differs (:func:`edgerlhf.core.provenance.check_reward_set`)."""
    keep = ("precision", "mode", "method", "folder", "accuracy", "accuracy_ci95", "n", "learned", "vs_length",
            "vs_best_baseline", "judge_agreement", "dtype")
    summary = {"length_baseline": assessment["length_baseline"], "best_baseline": assessment["best_baseline"],
               "baseline_accuracy": assessment["baseline_accuracy"], "inputs": inputs,
               "models": {name: {**{k: e.get(k) for k in keep}, "weights_sha256": digests[Path(e["folder"]).name]}
                          for name, e in models.items()}}
    return atomic_write_text(out_dir / "evaluation.json", json.dumps(summary, indent=2) + "\n")


def relocate(tree, old: Path, new: Path):
    """Rename, in place, every string in the dict/list ``tree`` that is a path under ``old`` to the same path
    under ``new`` (the staging set's folders, named as they will be once swapped in); returns ``tree``."""
    def move(value):
        if isinstance(value, str) and (value == str(old) or value.startswith(str(old) + "/")):
            return str(new) + value[len(str(old)):]
        return relocate(value, old, new) if isinstance(value, (dict, list)) else value
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in list(items):
        tree[key] = move(value)
    return tree


def swap_set(staging: Path, final_dir: Path) -> None:
    """Swap the complete staging set in as ``final_dir`` (:func:`edgerlhf.core.files.swap_in_dir`); LoRA training
    checkpoints kept under ``final_dir/checkpoints`` (``reward.keep_checkpoints``) move into the new set first."""
    checkpoints = final_dir / "checkpoints"
    if checkpoints.exists():
        checkpoints.rename(staging / "checkpoints")
    swap_in_dir(staging, final_dir)


@recorded("reward")
def run_reward(cfg: Config) -> dict:
    """Run stage 3 end to end and write its record; returns ``{"models", "baselines", "table", "conclusions", ...}``.

    Raises:
        ValueError: unknown precision or method; an empty split after fitting to ``reward.max_length``.
        FileExistsError: checkpoints of an unfinished run exist and ``reward.resume`` is False.
    """
    r = cfg.reward
    ctx = begin(cfg, distributed=True)
    data_dir, final_dir = ctx.path(cfg.data.out_dir), ctx.path(r.output_dir)
    with measure(ctx.device) as stage_m:
        # data: disjoint proxy / judge shares of the training pairs (the held-out test pairs come at the end)
        ctx.step = "data"
        inputs = {f"{name}_sha256": sha for name, sha in check_data_set(data_dir).items()}
        train_rows = read_prefs(data_dir / TRAIN)
        splits = split_pairs(train_rows, r)
        # tokenizer (the SFT model's, with its chat template and pad token)
        ctx.step = "tokenizer"
        sft_location = str(ctx.path(cfg.sft.output_dir) / "model" / "merged")
        inputs.update(sft_identity(Path(sft_location).parent))  # stage 4 checks it saw these data
        # every model and evaluation.json go to one staging set, swapped in as reward.output_dir at the end
        out_dir = main_process_writes(new_staging, final_dir, ctx.run_dir.name)
        micro_batch = None
        if r.method == "lora":  # on CUDA, the micro-batch the planner fits (probes train no network)
            cfg, micro_batch = choose_micro_batch(ctx, "reward", sft_location)
            r = cfg.reward
        tokenizer = load_tokenizer(sft_location)
        ensure_chat_template(tokenizer)
        ensure_pad_token(tokenizer)
        ex, counts = {}, {}
        for name, rows in splits.items():
            ex[name], counts[name] = reward_examples(rows, tokenizer, r.max_length)
        empty = [k for k in ("train", "validation") + (("judge_train", "judge_validation") if r.judge else ())
                 if not ex[k]]
        if empty:
            raise ValueError(f"no pairs left in {empty} after fitting to reward.max_length={r.max_length}: {counts}")
        # models: train and save every precision (every seed), the judge; every choice is made on training pairs
        ctx.step = "models"
        if r.method == "probe":
            models, search, features, heads = probe_models(cfg, ctx, sft_location, tokenizer, ex, out_dir)
        else:
            models, search = lora_models(cfg, ctx, sft_location, tokenizer, ex, out_dir), None
        second_judge = None
        if r.judge:
            ctx.step = f"models: {TFIDF_JUDGE} fit and save"
            second_judge = train_tfidf_judge(out_dir / TFIDF_JUDGE, ex, r.seeds[0])
        # final evaluation: the held-out test pairs are read here, once every model is saved
        ctx.step = "final evaluation: data"
        ex["test"], counts["test"] = reward_examples(
            read_prefs(data_dir / TEST)[: r.max_eval_samples], tokenizer, r.max_length)
        if not ex["test"]:
            raise ValueError(f"no test pairs left after fitting to reward.max_length={r.max_length}: {counts}")
        ctx.step = "final evaluation: baselines"  # trained on the proxies' training pairs
        plain = {k: [{"chosen": e["chosen"][0]["content"], "rejected": e["rejected"][0]["content"]} for e in ex[k]]
                 for k in ("train", "test")}
        baselines = baseline_scores(plain["train"], plain["test"], seed=r.seeds[0])
        for b in baselines.values():
            b.update(evaluate_pairs(b["scores_chosen"], b["scores_rejected"]))
        crossfit = None
        if r.method == "probe":
            evaluate_probes(models, heads, features, cfg, ctx, sft_location, tokenizer, ex)
            if "bf16" in r.precisions:  # every other precision is compared with it
                ctx.step = "final evaluation: cross-fitted"
                sft_train = sft_pairs(train_rows, cfg.sft.max_train_samples, cfg.sft.max_eval_samples)[0]
                crossfit = crossfit_evaluation(features, ex, {(row["chosen"], row["rejected"]) for row in sft_train},
                                               r, r.seeds[0])
            del features
        else:
            evaluate_lora_models(models, cfg, ctx, ex, out_dir)
        if second_judge:
            ctx.step = f"final evaluation: {TFIDF_JUDGE}"
            evaluate_tfidf_judge(*second_judge, ex)
            models[TFIDF_JUDGE] = second_judge[0]
        # paired comparisons on the same test pairs, agreement between models
        ctx.step = "final evaluation: assessment"
        assessment = assess(models, baselines, reference="bf16" if "bf16" in models else None, seed=r.seeds[0])
        judges = [name for name in JUDGES if name in models]
        for entry in models.values():
            margin = np.subtract(entry["scores_chosen"], entry["scores_rejected"])
            if "bf16" in models:
                ref = models["bf16"]
                entry.update(agreement(ref["scores_chosen"] + ref["scores_rejected"],
                                       entry["scores_chosen"] + entry["scores_rejected"],
                                       np.subtract(ref["scores_chosen"], ref["scores_rejected"]), margin))
            entry["judge_agreement"] = {  # share of pairs ranked alike, phi of their correctness (test pairs)
                j: {"agreement": float(np.mean(np.sign(np.subtract(models[j]["scores_chosen"],
                                                                   models[j]["scores_rejected"])) == np.sign(margin))),
                    "phi": phi(correct(models[j]["scores_chosen"], models[j]["scores_rejected"]),
                               correct(entry["scores_chosen"], entry["scores_rejected"]))} for j in judges}
        relocate(models, out_dir, final_dir)  # folders are named where they will be once swapped in
        digests = main_process_writes(lambda: {Path(e["folder"]).name: weights_digest(out_dir / Path(e["folder"]).name)
                                               for e in models.values()})
        main_process_writes(write_evaluation, out_dir, models, assessment, inputs, digests)
        if search:
            losses = ", ".join(f"{c['layer']}: {c['cv_log_loss']:.4f}" for c in search["candidates"])
            assessment["conclusions"].insert(0, (
                f"probe layer: block {search['chosen']} (lowest 5-fold cross-validated log-loss on the "
                f"{search['pairs']} {search['precision']} training pairs, by block: {losses}); the test pairs "
                "played no part in the choice"))
    table = summary_table(models, baselines)
    figures = main_process_writes(lambda: {
        "reliability": str(reliability_figure(models, ctx.run_dir / "figures" / "rm_reliability.png")),
        "margins": str(margin_figure(models, ctx.run_dir / "figures" / "rm_margins.png")),
        "accuracy": str(accuracy_figure(table, ctx.run_dir / "figures" / "rm_accuracy.png")),
    })
    ctx.step = "swap in the reward-model set"
    main_process_writes(swap_set, out_dir, final_dir)
    results = {"method": r.method, "probe_pooling": r.probe_pooling if r.method == "probe" else None,
               "models": models, "baselines": baselines, "table": table, "conclusions": assessment["conclusions"],
               "length_baseline": assessment["length_baseline"], "best_baseline": assessment["best_baseline"],
               "figures": figures, "probe_layer_search": search, "micro_batch_choice": micro_batch,
               "crossfit": crossfit,
               "data": {name: counts[name] for name in counts}}
    results["record"] = str(finish(
        ctx, "reward", results, stage_m,
        model_config={"backbone": sft_location, "precisions": r.precisions, "method": r.method,
                      "lora_rank": r.lora_r if r.method == "lora" else None},
        training_config={k: getattr(r, k) for k in (
            "method", "seeds", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
            "num_train_epochs", "max_length", "gradient_checkpointing", "judge_fraction")},
        data={"train_file": str(data_dir / TRAIN), "test_file": str(data_dir / TEST), **inputs,
              "reward_models_sha256": digests},
    ))
    return results


def summary_table(models: dict[str, dict], baselines: dict[str, dict]) -> list[dict]:
    """One row per baseline and reward model: quality with intervals, paired comparisons, verdict and cost."""
    rows = []
    for name, b in baselines.items():
        rows.append({"model": name, "precision": None, "mode": "baseline", "method": b["description"], "dtype": None,
                     "accuracy": b["accuracy"], "accuracy_ci95": b["accuracy_ci95"], "ties": b["ties"],
                     "auc_roc": b["auc_roc"], "learned": None})
    for name, e in models.items():
        peak = e.get("peak_memory_training") or {}
        ref, length = e.get("vs_reference"), e["vs_length"]
        seeds = e.get("seed_accuracies") or [e["accuracy"]]
        rows.append({
            "model": name, "precision": e["precision"], "mode": e["mode"], "method": e["method"], "dtype": e["dtype"],
            "accuracy": e["accuracy"], "accuracy_ci95": e["accuracy_ci95"], "ties": e["ties"],
            "seed_accuracy_mean": float(np.mean(seeds)), "seed_accuracy_sd": float(np.std(seeds, ddof=1))
            if len(seeds) > 1 else None, "n_seeds": len(seeds),
            "auc_roc": e["auc_roc"], "auc_roc_ci95": e["auc_roc_ci95"], "learned": e["learned"],
            "vs_length_points": 100 * length["difference"], "vs_length_ci95": [100 * x for x in length["ci"]],
            "vs_length_p": length["p_value"], "vs_length_p_holm": length.get("p_holm"),
            "vs_bf16_points": 100 * ref["difference"] if ref else None,
            "vs_bf16_ci95": [100 * x for x in ref["ci"]] if ref else None, "vs_bf16_p": ref["p_value"] if ref else None,
            "vs_bf16_p_holm": ref.get("p_holm") if ref else None,
            "vs_bf16_mde_points": 100 * ref["mde"] if ref else None,
            "ece": e["ece"], "ece_temperature_scaled": e["ece_temperature_scaled"],
            "nll": e["nll"], "brier": e["brier"], "spearman_vs_bf16": e.get("spearman"),
            "same_ranking_vs_bf16": e.get("same_ranking"),
            **{f"{k}_with_{j}": (e.get("judge_agreement") or {}).get(j, {}).get(k) for j in JUDGES
               for k in ("agreement", "phi")},
            "trainable_parameters": (e.get("parameters") or {}).get("trainable"),
            "weights_mib": e["weights_mib"], "folder_mib": e["folder_mib"],
            "memory_footprint_mib": e["memory_footprint_mib"],
            "peak_cpu_rss_training_mib": peak.get("cpu_peak_rss_mib"),
            "peak_cuda_training_mib": peak.get("cuda_peak_allocated_mib"),
            "peak_cpu_rss_scoring_mib": (e.get("peak_memory_scoring") or {}).get("cpu_peak_rss_mib"),
            "peak_cuda_scoring_mib": (e.get("peak_memory_scoring") or {}).get("cuda_peak_allocated_mib"),
            "pairs_per_second": e.get("pairs_per_second"), "train_time_s": e.get("train_runtime_s"),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m edgerlhf.reward_modeling [--profile P] [--config F] [--set K=V ...]``;
    returns the exit status (:func:`edgerlhf.core.stage.cli_main`)."""
    return cli_main("edgerlhf.reward_modeling", "Stage 3: reward models at bf16, int8 and int4.", run_reward,
                    lambda results: "\n".join(results["conclusions"]), argv)


if __name__ == "__main__":
    sys.exit(main())
