"""What a frozen-backbone reward probe should read: pooling x block x training pairs, at one precision.

    python benchmarks/probe_pooling.py --data data --precision bf16      # after stages 01 and 02 of a run

One feature pass of the SFT backbone (``models/sft/model/merged``) over every training and test pair
(:func:`edgerlhf.core.reward_models.pair_features` with ``pooling="last+mean"``, which holds ``last`` and ``mean``
side by side) reads every block in ``--layers``; then, for each pooling (``last``, ``mean``,
``last+mean``) and block, a linear Bradley-Terry head is fitted
(:func:`edgerlhf.core.baselines.fit_pairwise_logistic`) on the proxies' and the judge's shares of the training
pairs exactly as stage 3 splits them (:func:`edgerlhf.reward_modeling.split_pairs`), and on the first N training
pairs for each N in ``--sizes``. Every fit reports its 5-fold cross-validated log-loss on its own training
pairs (what the stage may choose by) next to its held-out accuracy and the exact McNemar p-value against
"the shorter reply wins" on the test pairs (what the choice is judged by).

Writes ``results/benchmarks/probe_pooling-<precision>.json``. Not a test; CI does not run it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgerlhf.core.baselines import fit_pairwise_logistic, length_scores
from edgerlhf.core.config import load_config
from edgerlhf.core.files import atomic_write_text
from edgerlhf.core.hardware import hardware_report
from edgerlhf.core.models import load_tokenizer
from edgerlhf.core.prefs import read_prefs
from edgerlhf.reward_modeling import split_pairs
from edgerlhf.core.reward_models import load_backbone, pair_features
from edgerlhf.core.stats import mcnemar_exact
from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token


def features(location: str, precision: str, rows: list[dict], layers: list[int], max_length: int,
             batch_size: int) -> tuple[np.ndarray, float]:
    """``float[N, 2, len(layers), 2H]`` (chosen/rejected; ``last`` then ``mean``) and the pass's seconds."""
    tokenizer = load_tokenizer(location)
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    model, _ = load_backbone(location, precision, "cpu", max(layers))
    model.config.pad_token_id = tokenizer.pad_token_id
    start = time.perf_counter()
    fc, fr = pair_features(model.eval(), tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                           [r["rejected"] for r in rows], batch_size, max_length, layers, "last+mean")
    return np.stack([fc.numpy(), fr.numpy()], 1), time.perf_counter() - start


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder with train_prefs.jsonl and test_prefs.jsonl")
    parser.add_argument("--sft", default="models/sft/model/merged", help="the SFT model (backbone)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "int8", "int4"])
    parser.add_argument("--layers", default="8,12,16,20,24,30", help="blocks to read (comma-separated)")
    parser.add_argument("--sizes", default="317,734,1632", help="first-N training-pair sizes (comma-separated)")
    parser.add_argument("--profile", default="quick", help="profile whose reward split and max length are used")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    r = load_config(args.profile).reward
    layers = [int(x) for x in args.layers.split(",")]
    train, test = read_prefs(Path(args.data) / "train_prefs.jsonl"), read_prefs(Path(args.data) / "test_prefs.jsonl")
    feats, seconds = features(args.sft, args.precision, train + test, layers, r.max_length, r.feature_batch_size)
    hidden = feats.shape[-1] // 2
    diff = feats[:, 0] - feats[:, 1]  # [N, L, 2H]
    train_diff, test_diff = diff[: len(train)], diff[len(train):]
    shorter = np.greater(*length_scores([t["chosen"] for t in test], [t["rejected"] for t in test]))
    index = {id(row): i for i, row in enumerate(train)}
    shares = {name: [index[id(row)] for row in rows] for name, rows in split_pairs(train, r).items()
              if name in ("train", "judge_train")}
    shares.update({f"first {n}": list(range(min(n, len(train)))) for n in map(int, args.sizes.split(","))})
    columns = {"last": slice(0, hidden), "mean": slice(hidden, 2 * hidden), "last+mean": slice(0, 2 * hidden)}
    rows = []
    for j, layer in enumerate(layers):
        for pooling, cols in columns.items():
            for share, idx in shares.items():
                fit = fit_pairwise_logistic(train_diff[idx, j, cols], seed=42)
                right = test_diff[:, j, cols] @ fit["weight"] > 0
                test_vs_length = mcnemar_exact(right, shorter)
                rows.append({"block": layer, "pooling": pooling, "train_share": share, "train_pairs": len(idx),
                             "C": fit["C"], "cv_log_loss": fit["cv_log_loss"], "test_accuracy": float(right.mean()),
                             "p_vs_shorter_wins": test_vs_length["p_value"]})
                print(f"block {layer:2d} {pooling:9s} {share:12s} cv {fit['cv_log_loss']:.4f} "
                      f"acc {right.mean():.3f} p {test_vs_length['p_value']:.4f}", flush=True)
    result = {"precision": args.precision, "sft": args.sft, "data": args.data, "profile": args.profile,
              "train_pairs": len(train), "test_pairs": len(test), "shorter_wins_accuracy": float(shorter.mean()),
              "feature_pass_s": seconds, "pairs_per_second": len(train + test) / seconds,
              "hardware": hardware_report("cpu"), "rows": rows}
    path = Path(args.out) / f"probe_pooling-{args.precision}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
