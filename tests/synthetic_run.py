"""A synthetic run folder: one record per stage, written by the real record functions.

The results have the shape the stages write (see edgerlhf/{setup,data,sft,reward,alignment}.py)
with small made-up values, so report and reproduce tests run in milliseconds.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch

from edgerlhf.core.arms import PLACEBO, net_of_placebo
from edgerlhf.core.best_of_n import curves, describe
from edgerlhf.ppo_alignment import answer, comparison_table, conclusions, implicit_reward_check, judge_effect
from edgerlhf.core import crossfit
from edgerlhf.core.config import load_config
from edgerlhf.core.memory import apply_vram_budget
from edgerlhf.core.metrics import assess, evaluate_pairs
from edgerlhf.reward_modeling import summary_table
from edgerlhf.core.stage import StageContext, finish

MEM = {"device": "cpu", "wall_time_s": 2.0, "cpu_peak_rss_mib": 900.0, "cpu_peak_scope": "block",
       "cuda_peak_allocated_mib": None, "cuda_peak_reserved_mib": None}


CHOSEN = [0.5, 0.2, 0.9, -0.1] * 10
REJECTED = [0.1, 0.4, 0.3, -0.3] * 10


def _reward_model(precision: str, mode: str, shift: float) -> dict:
    chosen = [c + shift for c in CHOSEN]
    return {"precision": precision, "mode": mode, "method": "probe", "dtype": "float32",
            "folder": f"models/rm/{precision}", **evaluate_pairs(chosen, REJECTED), "seed_accuracies": [0.75, 0.7],
            "parameters": {"trainable": 64, "total": 1234}, "weights_mib": 1.5, "folder_mib": 0.1,
            "memory_footprint_mib": 1.5, "peak_memory_training": dict(MEM), "peak_memory_scoring": dict(MEM),
            "pairs_per_second": 40.0, "train_runtime_s": 2.0, "scores_chosen": chosen, "scores_rejected": REJECTED}


def _crossfit() -> dict:
    """A cross-fitted evaluation by the stage's own function, on made-up margins of 40 pairs, 2 draws of 4 folds."""
    assignments = crossfit.fold_draws(40, folds=4, draws=2)
    base = np.tile(np.r_[[1.0, -0.5, 2.0, 0.3] * 10], (2, 1))
    margins = {"shorter wins": -base[:, ::-1], "longer wins": base[:, ::-1], "tf-idf": base * 0.5 - 0.2,
               "bf16": base, "int8": base + 0.1, "int8-ptq": base - 0.1}
    out = crossfit.assess(margins, ["shorter wins", "longer wins", "tf-idf"], assignments)
    out["judge_frontier"] = crossfit.judge_frontier(out, ["tf-idf", "bf16"], ["bf16", "int8", "int8-ptq"])
    out.update(pool={"pairs": 40, "left_out_sft_trained": 8, "by_split": {"train": 48}}, folds=4, draws=2,
               wall_time_s=1.0)
    return out


def _reward_results() -> dict:
    """Reward-stage results built by the stage's own assessment and table functions on made-up scores (computed
    once per session, about 3 s: a copy each call, so a test may change its own)."""
    if "reward" not in _CACHE:
        _CACHE["reward"] = _compute_reward_results()
    return copy.deepcopy(_CACHE["reward"])


_CACHE: dict[str, dict] = {}


def _compute_reward_results() -> dict:
    models = {"bf16": _reward_model("bf16", "trained", 0.0), "int8": _reward_model("int8", "trained", 0.01),
              "judge": _reward_model("bf16", "judge (pairs no proxy saw)", 0.02)}
    shorter = ([-(i % 5) for i in range(40)], [-(i % 3) for i in range(40)])
    baselines = {name: {"scores_chosen": shorter[0], "scores_rejected": shorter[1], "description": name}
                 for name in ("shorter wins", "longer wins", "tf-idf")}
    for b in baselines.values():
        b.update(evaluate_pairs(b["scores_chosen"], b["scores_rejected"]))
    assessment = assess(models, baselines)
    for e in models.values():
        e["judge_agreement"] = {"judge": {"agreement": 1.0, "phi": 0.5}}
    return {"method": "probe", "models": models, "baselines": baselines, "table": summary_table(models, baselines),
            "crossfit": _crossfit(),
            "conclusions": assessment["conclusions"], "length_baseline": assessment["length_baseline"],
            "data": {"train": {"kept": 20}, "validation": {"kept": 4}, "judge_train": {"kept": 20},
                     "judge_validation": {"kept": 4}, "test": {"kept": 40}}}


def _experiment(precision: str, data_dir: Path) -> dict:
    history = [{"step": s, "score": 0.1 * s, "kl": 0.05 * s, "beta": 0.1} for s in (1, 2)]
    before, after = [0.1, 0.2, 0.0, 0.1], [0.3, 0.2, 0.4, 0.3]
    if precision == PLACEBO:
        after = [0.1, 0.25, 0.05, 0.1]
    return {"precision": precision, "reward_model": str(data_dir.parent / "models" / "rm" / precision),
            "proxy": "bf16" if precision == PLACEBO else precision, "placebo": precision == PLACEBO,
            "proxy_verdict": None if precision == PLACEBO else {"learned": True},
            "before": {"proxy_mean": 0.2, "kl_mean": 0.0, "judge_scores": before, "judge-tfidf_scores": after,
                       "proxy_scores": [0.1, 0.3, 0.2, 0.2],
                       "tokens": [10, 12, 8, 20]},
            "after": {"proxy_mean": 0.5, "kl_mean": 0.1, "judge_scores": after, "judge-tfidf_scores": before,
                      "proxy_scores": [0.4, 0.6, 0.5, 0.5],
                      "tokens": [12, 12, 9, 24] if precision != PLACEBO else [10, 13, 8, 19]},
            "judges": {"judge": judge_effect(after, before, 0), "judge-tfidf": judge_effect(before, after, 0)},
            "implicit_reward": implicit_reward_check([0.5, 0.2, -0.1, 0.3], [0.1, 0.1, 0.1, 0.1], 0),
            "curve": [{"step": 0, "kl": 0.0, "proxy": 0.2, "judge": 0.1, "judge-tfidf": 0.2},
                      {"step": 2, "kl": 0.1, "proxy": 0.5, "judge": 0.3, "judge-tfidf": 0.1}],
            "history": history, "peak_memory": dict(MEM), "wall_time_s": 3.0,
            "samples": [{"prompt": "How do I bake bread?", "sft": "Mix flour and water.", "ppo": "Mix, knead, bake."}]}


def _ppo_results(data_dir: Path) -> dict:
    """PPO-stage results built by the stage's own table and conclusion functions."""
    experiments = {p: _experiment(p, data_dir) for p in ("bf16", "int8", PLACEBO)}
    judges = {name: {"folder": f"models/rm/{name}", "method": method, "accuracy": 0.75,
                     "accuracy_ci95": [0.6, 0.875], "learned": True, "vs_length": {"p_value": 0.01},
                     "length_baseline": "shorter wins",
                     "agreement_with_proxies": {"bf16": {"agreement": 0.9, "phi": 0.6},
                                                "int8": {"agreement": 0.85, "phi": 0.5}}}
              for name, method in (("judge", "probe"), ("judge-tfidf", "tf-idf"))}
    net = net_of_placebo(experiments, list(judges), 0)
    return {"experiments": experiments, "table": comparison_table(experiments, net), "judges": judges,
            "net_of_placebo": net, "conclusions": conclusions(experiments, judges, 0, net), "n_eval_prompts": 4,
            "answer": answer(_best_of_n(), net, experiments, judges, 2),
            "n_implicit_reward_pairs": 4,
            "best_of_n": _best_of_n()}


def _best_of_n() -> dict:
    """Best-of-4 on 40 prompts: bf16 tracks the judge, int8 tracks it less; through the stage's own functions."""
    rng = np.random.default_rng(0)
    quality = rng.normal(size=(40, 4))
    out = curves({"bf16": quality + 0.3 * rng.normal(size=quality.shape),
                  "int8": quality + rng.normal(size=quality.shape)},
                 {"judge": quality, "judge-tfidf": quality + rng.normal(size=quality.shape)},
                 rng.integers(5, 30, size=quality.shape), seed=0)
    return {**out, "words": describe(out)}


def stage_results(root: Path) -> dict[str, dict]:
    """The results of every stage, keyed by stage name; data files are written under ``root/data``."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, text in (("train_prefs.jsonl", '{"id": 1}\n'), ("test_prefs.jsonl", '{"id": 2}\n')):
        (data_dir / name).write_text(text)
        files[name] = hashlib.sha256(text.encode()).hexdigest()
    lengths = {"min": 3.0, "mean": 10.5, "median": 10.0, "p95": 20.0, "max": 24.0}
    return {
        "setup": {"base_model": {"name": "tiny-gpt2", "parameters": 1234}, "disk_free_mib": 50_000,
                  "memory_plan": [{"profile": "tiny", "stage": "sft", "estimate_mib": 100.0, "fits": True,
                                   "budget_gib": 8.0, "advice": ""}], "run_dir": str(root)},
        "data": {"source": {"kind": "file", "location": "hh.jsonl.gz"}, "source_sha256": "ab" * 32,
                 "rows_read": 100, "kept": 90, "counts": {"train": 48, "test": 16}, "template": "plain",
                 "max_length": 256, "dropped": {"malformed_dialogue": 4, "too_long": 6},
                 "token_lengths": {"train": {"prompt": lengths}, "test": {"prompt": lengths}},
                 "files": files, "out_dir": str(data_dir)},
        "sft": {"strategy": "lora", "dtype": "float32", "parameters": {"trainable": 10, "total": 1234},
                "global_step": 4, "tokens_seen": 800, "tokens_per_second": 400.0, "perplexity_before": 900.0,
                "perplexity_after": 850.0, "eval_tokens": 120,
                "log_history": [{"step": 2, "loss": 6.9}, {"step": 4, "loss": 6.7}, {"step": 4, "eval_loss": 6.8}],
                "samples": [{"prompt": "Hi", "before": "hello hello", "after": "Hello!"}], "weights_sha256": SFT_SHA},
        "reward": _reward_results(),
        "ppo": _ppo_results(data_dir),
    }


def write_synthetic_run(root: Path, results: dict[str, dict] | None = None, skip: tuple[str, ...] = ()) -> Path:
    """Write a run folder ``root/results/runs/run-<root name>`` with one record per stage (via
    :func:`edgerlhf.core.stage.finish`, as the stages do); returns it."""
    root = Path(root)
    run_dir = root / "results" / "runs" / f"run-{root.name}"
    cfg = load_config("tiny", overrides={"run.root": str(root), "run.run_dir": str(run_dir)})
    ctx = StageContext(cfg=cfg, root=root, run_dir=run_dir, device=torch.device("cpu"),
                       budget=apply_vram_budget(8.0, "cpu"))
    results = copy.deepcopy(results) if results is not None else stage_results(root)
    for stage, res in results.items():
        if stage not in skip:
            finish(ctx, stage, res, dict(MEM), data=provenance(stage, results["data"]["files"]))
    return run_dir


#: The synthetic SFT model's and reward models' weight digests (what the stages record beside their outputs).
SFT_SHA, RM_SHA = "5f" * 32, {"bf16": "b1" * 32, "int8": "18" * 32, "int4": "14" * 32, "judge": "1d" * 32}


def provenance(stage: str, files: dict[str, str]) -> dict:
    """The ``data`` field of a stage's record: the sha256 of what it read, as the real stages write it."""
    train, test = files["train_prefs.jsonl"], files["test_prefs.jsonl"]
    read = {"train_prefs.jsonl_sha256": train, "test_prefs.jsonl_sha256": test, "sft_weights_sha256": SFT_SHA,
            "sft_train_sha256": train}
    return {"sft": {"train_sha256": train}, "reward": {**read, "reward_models_sha256": RM_SHA},
            "ppo": {**read, "reward_models_sha256": RM_SHA}}.get(stage, {})
