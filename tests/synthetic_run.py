"""A synthetic run folder: one record per stage, written by the real record functions.

The results have the shape the stages write (see edgerlhf/{setup,data,sft,reward,alignment}.py)
with small made-up values, so report and reproduce tests run in milliseconds.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

from edgerlhf.config import load_config
from edgerlhf.memory import apply_vram_budget
from edgerlhf.stage import StageContext, finish

MEM = {"device": "cpu", "wall_time_s": 2.0, "cpu_peak_rss_mib": 900.0, "cpu_peak_scope": "block",
       "cuda_peak_allocated_mib": None, "cuda_peak_reserved_mib": None}


def _reward_model(precision: str, mode: str, shift: float) -> dict:
    chosen = [0.5 + shift, 0.2, 0.9, -0.1]
    rejected = [0.1, 0.4, 0.3, -0.3]
    return {"precision": precision, "mode": mode, "folder": f"models/rm/{precision}", "accuracy": 0.75, "ties": 0,
            "n": 4, "accuracy_ci95": [0.25, 1.0], "auc_roc": 0.8125, "ece": 0.12, "nll": 0.6, "brier": 0.2,
            "reliability": [{"lo": 0.5, "hi": 0.55, "n": 2, "accuracy": 0.5, "confidence": 0.52},
                            {"lo": 0.55, "hi": 0.6, "n": 2, "accuracy": 1.0, "confidence": 0.57}],
            "weights_mib": 1.5, "peak_memory_training": dict(MEM), "peak_memory_scoring": dict(MEM),
            "pairs_per_second": 40.0, "scores_chosen": chosen, "scores_rejected": rejected}


def _experiment(precision: str, data_dir: Path) -> dict:
    history = [{"step": s, "score": 0.1 * s, "kl": 0.05 * s} for s in (1, 2)]
    return {"precision": precision, "reward_model": str(data_dir.parent / "models" / "rm" / precision),
            "judge_model": str(data_dir.parent / "models" / "rm" / "judge"),
            "before": {"judge_mean": 0.1, "proxy_mean": 0.2, "kl_mean": 0.0},
            "after": {"judge_mean": 0.3, "proxy_mean": 0.5, "kl_mean": 0.1},
            "curve": [{"step": 0, "kl": 0.0, "proxy": 0.2, "judge": 0.1}, {"step": 2, "kl": 0.1, "proxy": 0.5,
                                                                            "judge": 0.3}],
            "history": history, "win_rate": 0.75, "peak_memory": dict(MEM), "wall_time_s": 3.0,
            "samples": [{"prompt": "How do I bake bread?", "sft": "Mix flour and water.", "ppo": "Mix, knead, bake."}]}


def stage_results(root: Path) -> dict[str, dict]:
    """The results of every stage, keyed by stage name; data files are written under ``root/data``."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, text in (("train_prefs.jsonl", '{"id": 1}\n'), ("test_prefs.jsonl", '{"id": 2}\n')):
        (data_dir / name).write_text(text)
        files[name] = hashlib.sha256(text.encode()).hexdigest()
    lengths = {"min": 3.0, "mean": 10.5, "median": 10.0, "p95": 20.0, "max": 24.0}
    models = {"bf16": _reward_model("bf16", "trained", 0.0), "int8": _reward_model("int8", "trained", 0.01),
              "judge": _reward_model("bf16", "judge (other half)", 0.02)}
    experiments = {p: _experiment(p, data_dir) for p in ("bf16", "int8")}
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
                "samples": [{"prompt": "Hi", "before": "hello hello", "after": "Hello!"}]},
        "reward": {"models": models, "data": {"train": {"kept": 20}, "validation": {"kept": 4}, "test": {"kept": 4}},
                   "table": [{"model": k, "precision": m["precision"], "mode": m["mode"], "accuracy": m["accuracy"],
                              "accuracy_ci95": m["accuracy_ci95"], "ties": 0, "auc_roc": m["auc_roc"],
                              "ece": m["ece"], "weights_mib": 1.5, "pairs_per_second": 40.0, "train_time_s": 2.0}
                             for k, m in models.items()]},
        "ppo": {"experiments": experiments,
                "table": [{"reward_precision": p, "judge_before": 0.1, "judge_after": 0.3, "proxy_before": 0.2,
                           "proxy_after": 0.5, "kl": 0.1, "win_rate": 0.75, "wall_time_s": 3.0}
                          for p in experiments]},
    }


def write_synthetic_run(root: Path, results: dict[str, dict] | None = None, skip: tuple[str, ...] = ()) -> Path:
    """Write a run folder ``root/results/runs/run-<root name>`` with one record per stage (via
    :func:`edgerlhf.stage.finish`, as the stages do); returns it."""
    root = Path(root)
    run_dir = root / "results" / "runs" / f"run-{root.name}"
    cfg = load_config("tiny", overrides={"run.root": str(root), "run.run_dir": str(run_dir)})
    ctx = StageContext(cfg=cfg, root=root, run_dir=run_dir, device=torch.device("cpu"),
                       budget=apply_vram_budget(8.0, "cpu"))
    results = copy.deepcopy(results) if results is not None else stage_results(root)
    for stage, res in results.items():
        if stage not in skip:
            finish(ctx, stage, res, dict(MEM))
    return run_dir
