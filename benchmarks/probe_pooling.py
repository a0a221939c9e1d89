"""What a frozen-backbone reward probe should read: pooling x block x training pairs, at one precision,
judged on the training pairs only.

    python benchmarks/probe_pooling.py --data data --precision bf16      # after stages 01 and 02 of a run

One feature pass of the SFT backbone (``models/sft/model/merged``) over every *training* pair
(:func:`edgerlhf.core.probe.pair_features` with ``pooling="last+mean"``, which holds ``last`` and ``mean``
side by side) reads every block in ``--layers``; then, for each pooling (``last``, ``mean``,
``last+mean``) and block, a linear Bradley-Terry head (:func:`edgerlhf.core.baselines.fit_pairwise_logistic`) is
cross-validated on the proxies' and the judge's shares of the training pairs exactly as stage 3 splits them
(:func:`edgerlhf.core.prefs.split_pairs`), and on the first N training pairs for each N in ``--sizes``.
Every row reports the head's 5-fold cross-validated log-loss and pairwise accuracy on its training pairs, at the C
whose log-loss was lowest (the same folds): the held-out test pairs are never read, so the default this justifies
is not chosen on them.

Writes ``results/benchmarks/probe_pooling-<precision>.json``. Not a test; CI does not run it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgerlhf.core.baselines import fit_pairwise_logistic
from edgerlhf.core.config import load_config
from edgerlhf.core.files import atomic_write_text
from edgerlhf.core.hardware import hardware_report
from edgerlhf.core.models import load_tokenizer
from edgerlhf.core.prefs import read_prefs
from edgerlhf.core.prefs import split_pairs
from edgerlhf.core.probe import pair_features
from edgerlhf.core.reward_scoring import load_backbone
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
    parser.add_argument("--data", default="data", help="folder with train_prefs.jsonl (the test file is not read)")
    parser.add_argument("--sft", default="models/sft/model/merged", help="the SFT model (backbone)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "int8", "int4"])
    parser.add_argument("--layers", default="8,12,16,20,24,30", help="blocks to read (comma-separated)")
    parser.add_argument("--sizes", default="317,734,1632", help="first-N training-pair sizes (comma-separated)")
    parser.add_argument("--profile", default="quick", help="profile whose reward split and max length are used")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    r = load_config(args.profile).reward
    layers = [int(x) for x in args.layers.split(",")]
    train = read_prefs(Path(args.data) / "train_prefs.jsonl")
    feats, seconds = features(args.sft, args.precision, train, layers, r.max_length, r.feature_batch_size)
    hidden = feats.shape[-1] // 2
    diff = feats[:, 0] - feats[:, 1]  # [N, L, 2H]
    index = {id(row): i for i, row in enumerate(train)}
    shares = {name: [index[id(row)] for row in rows] for name, rows in split_pairs(train, r).items()
              if name in ("train", "judge_train")}
    shares.update({f"first {n}": list(range(min(n, len(train)))) for n in map(int, args.sizes.split(","))})
    columns = {"last": slice(0, hidden), "mean": slice(hidden, 2 * hidden), "last+mean": slice(0, 2 * hidden)}
    rows = []
    for j, layer in enumerate(layers):
        for pooling, cols in columns.items():
            for share, idx in shares.items():
                fit = fit_pairwise_logistic(diff[idx, j, cols], seed=42)
                rows.append({"block": layer, "pooling": pooling, "train_share": share, "train_pairs": len(idx),
                             "C": fit["C"], "cv_log_loss": fit["cv_log_loss"], "cv_accuracy": fit["cv_accuracy"]})
                print(f"block {layer:2d} {pooling:9s} {share:12s} cv log-loss {fit['cv_log_loss']:.4f} "
                      f"cv accuracy {rows[-1]['cv_accuracy']:.3f}", flush=True)
    result = {"precision": args.precision, "sft": args.sft, "data": args.data, "profile": args.profile,
              "train_pairs": len(train), "test_pairs_read": 0, "feature_pass_s": seconds,
              "pairs_per_second": len(train) / seconds, "hardware": hardware_report("cpu"), "rows": rows}
    path = Path(args.out) / f"probe_pooling-{args.precision}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
