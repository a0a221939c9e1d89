"""How much of a training batch is padding, in random order and in length-grouped order (``group_by_length``).

    python benchmarks/padding.py --data data --tokenizer models/base/smollm2-135m-instruct --profile full

Tokenizes the training pairs of ``--data`` as stages 2 and 3 do (SFT: prompt + chosen reply, fitted to
``sft.max_length``; reward: chosen and rejected, fitted to ``reward.max_length``), draws one epoch of
micro-batches of the profile's ``per_device_train_batch_size`` with transformers' ``RandomSampler`` order and
with its ``LengthGroupedSampler`` (what ``train_sampling_strategy="group_by_length"`` uses; a reward pair's length
is the longer of its two replies), and counts the positions the collators pad to (each batch to its longest
sequence; a reward batch holds chosen and rejected rows). No model runs: on a GPU, where the time of a batch
grows with its padded width, ``padded / real`` tokens is the factor that grouping can remove.

Writes ``results/benchmarks/padding-<profile>.json``. Not a test; CI does not run it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from edgerlhf.core.config import load_config
from edgerlhf.core.files import atomic_write_text
from edgerlhf.core.lm import encode_prompt_completion
from edgerlhf.core.models import load_tokenizer
from edgerlhf.core.prefs import read_prefs
from edgerlhf.reward_modeling import reward_examples
from edgerlhf.sft_finetuning import sft_examples
from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token


def batch_tokens(widths: list[list[int]], order: list[int], batch: int) -> dict:
    """``widths[i]``: the token counts of item ``i``'s rows (1 for SFT, 2 for a reward pair). Returns the padded
    and real tokens of the micro-batches of ``batch`` items drawn in ``order``, and their ratio."""
    padded = real = 0
    for start in range(0, len(order), batch):
        rows = [w for i in order[start:start + batch] for w in widths[i]]
        padded += max(rows) * len(rows)
        real += sum(rows)
    return {"padded_tokens": padded, "real_tokens": real, "padded_per_real": padded / real}


def compare(widths: list[list[int]], batch: int, seed: int) -> dict:
    """Random order against length-grouped order, one epoch each, the same seed."""
    random_order = torch.randperm(len(widths), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped = list(LengthGroupedSampler(batch, lengths=[max(w) for w in widths],
                                        generator=torch.Generator().manual_seed(seed)))
    out = {"items": len(widths), "micro_batch": batch, "random": batch_tokens(widths, random_order, batch),
           "group_by_length": batch_tokens(widths, grouped, batch)}
    out["padded_tokens_saved"] = 1 - out["group_by_length"]["padded_tokens"] / out["random"]["padded_tokens"]
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data", help="folder with train_prefs.jsonl (stage 01's output)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (the base or SFT model)")
    parser.add_argument("--profile", default="full", help="profile whose batch sizes and lengths to use")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    cfg = load_config(args.profile)
    tokenizer = load_tokenizer(args.tokenizer)
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    rows = read_prefs(Path(args.data) / "train_prefs.jsonl")
    sft_rows = sft_examples(rows[: cfg.sft.max_train_samples], tokenizer, cfg.sft.max_length, cfg.sft.overlong)[0]
    sft_widths = [[len(encode_prompt_completion(tokenizer, e["prompt"], e["completion"][0]["content"])[0])]
                  for e in sft_rows]
    rm_rows = reward_examples(rows, tokenizer, cfg.reward.max_length)[0]
    rm_widths = [[len(encode_prompt_completion(tokenizer, e["prompt"], e[side][0]["content"])[0])
                  for side in ("chosen", "rejected")] for e in rm_rows]
    result = {"profile": args.profile, "data": str(args.data), "tokenizer": str(args.tokenizer),
              "sft": compare(sft_widths, cfg.sft.per_device_train_batch_size, args.seed),
              "reward": compare(rm_widths, cfg.reward.per_device_train_batch_size, args.seed)}
    for stage in ("sft", "reward"):
        r = result[stage]
        print(f"{stage}: {r['items']} items, micro-batch {r['micro_batch']}: padded/real "
              f"{r['random']['padded_per_real']:.2f} random, {r['group_by_length']['padded_per_real']:.2f} grouped "
              f"({r['padded_tokens_saved']:.0%} fewer positions in the batches)")
    path = Path(args.out) / f"padding-{args.profile}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
