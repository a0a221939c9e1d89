"""Stage 1 (01_Data_Preparation): preference data. Source -> parse -> filter -> de-duplicate -> split by prompt ->
write.

Outputs (in ``data.out_dir``): ``train_prefs.jsonl`` and ``test_prefs.jsonl`` with rows
``{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message], "source_line": int}``
(TRL's conversational preference format: ``load_dataset("json", ...)`` feeds TRL's trainers directly), and
``data_card.json`` (counts, drop reasons, token-length statistics, source, hashes, seed).
Re-running with the same input, tokenizer and seed gives byte-identical files.

Run without the notebook: ``python -m edgerlhf.data_preparation --profile quick``.
"""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .core.config import Config, DataConfig
from .core.files import atomic_write_text, new_staging, sha256_file, swap_in_dir
from .core.prefs import CARD
from .core.hh_rlhf import Pair, check_row, parse_pair, read_rows
from .core.memory import measure
from .core.models import load_tokenizer, prepare_base_model
from .core.paths import resolve
from .core.plots import new_figure, save
from .core.stage import StageContext, begin, cli_main, finish, recorded
from .core.templates import count_tokens, ensure_chat_template, render_dialogue, render_prompt

DROP_REASONS = (
    "malformed_dialogue", "prompt_mismatch", "empty_reply", "identical_replies",
    "role_marker_in_reply", "duplicate_prompt", "too_long",
)


class DataUnavailableError(RuntimeError):
    """Neither the given path, nor the local copy, nor the Hub could provide the data."""


@dataclass
class Collected:
    """Pairs that survived filtering, their token lengths, and what was dropped."""

    pairs: list[Pair] = field(default_factory=list)
    lengths: list[dict[str, int]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    rows_read: int = 0


def resolve_source(cfg: DataConfig, root: str | Path = ".") -> dict:
    """Pick the input: ``cfg.path``, then the local copy ``cfg.local_path``, then the Hub.

    Returns ``{"kind": "file" | "hub", "location": str, "tried": [...]}``.

    Raises:
        FileNotFoundError: ``cfg.path`` is given but does not exist (no silent fall-through).
    """
    if cfg.path:
        path = resolve(cfg.path, root)
        if not path.exists():
            raise FileNotFoundError(f"data.path={cfg.path!r}: {path} does not exist")
        return {"kind": "file", "location": str(path), "tried": [str(path)]}
    local = resolve(cfg.local_path, root)
    if local.exists():
        return {"kind": "file", "location": str(local), "tried": [str(local)]}
    return {"kind": "hub", "location": cfg.hub_id, "tried": [str(local), f"hub:{cfg.hub_id}"]}


def iter_source(source: dict, cfg: DataConfig):
    """Yield ``(line, row)`` from the resolved source (local file, or the Hub via ``datasets``).

    Raises:
        DataUnavailableError: the Hub cannot be reached and there is no local copy.
    """
    if source["kind"] == "file":
        yield from read_rows(source["location"])
        return
    import datasets  # imported here: only the Hub path needs it

    try:
        ds = datasets.load_dataset(cfg.hub_id, data_dir=cfg.hub_data_dir, split=cfg.hub_split)
    except Exception as exc:  # re-raised with the two ways to fix it; nothing is swallowed
        raise DataUnavailableError(
            f"no local copy at {source['tried'][0]} and the Hub data set {cfg.hub_id!r} could not be loaded "
            f"({type(exc).__name__}: {exc}). Either set data.path / data.local_path to an HH-RLHF file, or run "
            "where the Hugging Face Hub is reachable."
        ) from exc
    source["fingerprint"] = ds._fingerprint
    for number, row in enumerate(ds, start=1):
        yield number, check_row(row, f"hub:{cfg.hub_id} row {number}")


def collect(rows, tokenizer, max_length: int) -> Collected:
    """Parse, filter and de-duplicate rows; measure token lengths with the model's template.

    A pair is ``too_long`` when its rendered prompt plus its longer reply exceeds
    ``max_length`` tokens. Duplicated prompts keep their first occurrence.
    """
    out = Collected()
    seen: set = set()
    for line, row in rows:
        out.rows_read += 1
        pair = parse_pair(row, line)
        if isinstance(pair, str):
            out.dropped[pair] += 1
            continue
        if pair.prompt in seen:
            out.dropped["duplicate_prompt"] += 1
            continue
        seen.add(pair.prompt)
        messages = pair.messages()
        prompt_len = count_tokens(tokenizer, render_prompt(tokenizer, messages))
        chosen_len = count_tokens(tokenizer, render_dialogue(tokenizer, messages, pair.chosen))
        rejected_len = count_tokens(tokenizer, render_dialogue(tokenizer, messages, pair.rejected))
        if max(chosen_len, rejected_len) > max_length:
            out.dropped["too_long"] += 1
            continue
        out.pairs.append(pair)
        out.lengths.append(
            {"prompt": prompt_len, "chosen": chosen_len - prompt_len, "rejected": rejected_len - prompt_len}
        )
    return out


def split_by_prompt(n_pairs: int, n_train: int, n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Shuffle indices with ``random.Random(seed)``; the first ``n_test`` are test, the next ``n_train`` train.

    Prompts are unique after :func:`collect`, so splitting indices splits prompts.
    """
    order = list(range(n_pairs))
    random.Random(seed).shuffle(order)
    return order[n_test:n_test + n_train], order[:n_test]


def check_counts(got: Collected, n_train: int, n_test: int, where: str) -> None:
    """Refuse a split with an empty training or test set, before anything is written.

    ``split_by_prompt`` fills the test split first, so too few usable pairs leave training empty.

    Raises:
        ValueError: fewer than 2 usable pairs, or fewer than ``n_test + 1``; the message names the
            input, the rows read, what was dropped and why, and the two fixes.
    """
    kept = len(got.pairs)
    if kept < 2 or kept <= n_test:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(got.dropped.items())) or "none"
        raise ValueError(
            f"{where}: {got.rows_read} row(s) read, {kept} usable pair(s) after filtering (dropped: {dropped}); "
            f"data.n_test={n_test} would leave {max(kept - n_test, 0)} for training (data.n_train={n_train}). "
            "Lower data.n_test, raise data.max_length, or use a larger file; the existing data files are kept."
        )


def check_no_leakage(train: list[Pair], test: list[Pair]) -> None:
    """Raise ``ValueError`` if any prompt is in both splits."""
    shared = {p.prompt for p in train} & {p.prompt for p in test}
    if shared:
        raise ValueError(f"{len(shared)} prompt(s) appear in both train and test")


def length_stats(values: list[int]) -> dict[str, float]:
    """min / mean / median / p95 / max of token counts (rounded to 0.01)."""
    if not values:
        return {}
    a = np.asarray(values)
    stats = {"min": a.min(), "mean": a.mean(), "median": np.median(a), "p95": np.percentile(a, 95), "max": a.max()}
    return {k: round(float(v), 2) for k, v in stats.items()}


def to_jsonl(pairs: list[Pair]) -> str:
    """Serialise pairs as JSON Lines (UTF-8, one object per line, fixed key order) in TRL's conversational
    preference format with an explicit prompt: ``prompt`` the dialogue so far (messages ending with the user's
    turn), ``chosen`` and ``rejected`` each one assistant message, so ``datasets.load_dataset("json", ...)``
    gives rows that TRL's ``RewardTrainer`` and ``DPOTrainer`` take as they are."""
    def reply(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    rows = (
        {"prompt": p.messages(), "chosen": reply(p.chosen), "rejected": reply(p.rejected), "source_line": p.line}
        for p in pairs
    )
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def length_figure(lengths: dict[str, list[int]], path: Path) -> Path:
    """Save histograms of prompt / chosen / rejected token lengths and of the per-pair difference chosen − rejected
    to ``path`` (PNG). ``lengths`` holds one count per pair under each of ``prompt``, ``chosen`` and ``rejected``,
    every list in the same pair order (as :func:`prepare` passes them); the two replies share bins and x range.
    The difference panel writes in the share of pairs whose chosen reply is shorter."""
    if not len(lengths["chosen"]) == len(lengths["rejected"]) == len(lengths["prompt"]):
        raise ValueError("length_figure: prompt, chosen and rejected need one length per pair each")
    diff = np.subtract(lengths["chosen"], lengths["rejected"])
    reply_bins = np.histogram_bin_edges(np.concatenate([lengths["chosen"], lengths["rejected"]]), bins=30)
    fig = new_figure((13, 3.6))
    axes = fig.subplots(1, 4)
    units = {"prompt": "prompt tokens (chat template)", "chosen": "reply tokens (with end-of-turn)",
             "rejected": "reply tokens (with end-of-turn)"}
    for ax, (name, xlabel) in zip(axes, units.items()):
        ax.hist(lengths[name], bins=30 if name == "prompt" else reply_bins, color="#4c72b0")
        ax.set_title(f"{name}: median {np.median(lengths[name]):g} tokens", fontsize=9)
        ax.set(xlabel=xlabel, ylabel="pairs")
    axes[2].sharex(axes[1])
    ax = axes[3]
    # about 40 bins of whole tokens with an edge at -0.5: every bar left of the line is a shorter chosen reply
    width = max(1, -(-int(diff.max() - diff.min()) // 40))
    edges = np.arange(diff.min() // width * width, diff.max() + 2 * width, width) - 0.5
    ax.hist(diff, bins=edges, color="#8172b2")
    ax.axvline(0, color="black", lw=1)
    ax.text(0.03, 0.97, f"chosen shorter: {np.mean(diff < 0):.0%}\nequal: {np.mean(diff == 0):.0%}\n"
            f"chosen longer: {np.mean(diff > 0):.0%}\n(line: equal length)", transform=ax.transAxes, va="top",
            fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    ax.set_title("chosen − rejected, per pair", fontsize=9)
    ax.set(xlabel="reply length difference (tokens)", ylabel="pairs")
    fig.suptitle(f"Token lengths of the {len(diff):,} kept pairs (train + test)", fontsize=10)
    return save(fig, path)


@recorded("data")
def prepare(cfg: Config) -> dict:
    """Run stage 1 end to end and write its record; returns the stage's results dict."""
    ctx: StageContext = begin(cfg)
    with measure(ctx.device) as m:
        ctx.step = "tokenizer"
        base = prepare_base_model(cfg.model.name, ctx.path(cfg.model.models_dir))
        tokenizer = load_tokenizer(base)
        template = ensure_chat_template(tokenizer)
        ctx.step = "read source"
        source = resolve_source(cfg.data, ctx.root)
        got = collect(iter_source(source, cfg.data), tokenizer, cfg.data.max_length)
        ctx.step = "split"
        check_counts(got, cfg.data.n_train, cfg.data.n_test, source["location"])
        train_idx, test_idx = split_by_prompt(len(got.pairs), cfg.data.n_train, cfg.data.n_test, cfg.run.seed)
        train, test = [got.pairs[i] for i in train_idx], [got.pairs[i] for i in test_idx]
        check_no_leakage(train, test)
        out_dir = ctx.path(cfg.data.out_dir)
        # the three files are one unit: written to a staging folder, swapped in together once complete
        ctx.step = f"write: staging set beside {out_dir}"
        staging = new_staging(out_dir, ctx.run_dir.name)
        texts = {"train_prefs.jsonl": to_jsonl(train), "test_prefs.jsonl": to_jsonl(test)}
        for name, text in texts.items():
            atomic_write_text(staging / name, text)
        split_lengths = {
            split: {k: length_stats([got.lengths[i][k] for i in idx]) for k in ("prompt", "chosen", "rejected")}
            for split, idx in (("train", train_idx), ("test", test_idx))
        }
        card = {
            "source": {k: v for k, v in source.items() if k != "tried"},
            "source_sha256": sha256_file(source["location"]) if source["kind"] == "file" else None,
            "tried": source["tried"],
            "seed": cfg.run.seed,
            "tokenizer": cfg.model.name,
            "template": template,
            "max_length": cfg.data.max_length,
            "rows_read": got.rows_read,
            "dropped": {reason: got.dropped.get(reason, 0) for reason in DROP_REASONS},
            "kept": len(got.pairs),
            "requested": {"train": cfg.data.n_train, "test": cfg.data.n_test},
            "counts": {"train": len(train), "test": len(test)},
            "token_lengths": split_lengths,
            "files": {name: sha256_file(staging / name) for name in texts},
        }
        atomic_write_text(staging / CARD, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        ctx.step = "write: figure"
        figure = length_figure(
            {k: [got.lengths[i][k] for i in train_idx + test_idx] for k in ("prompt", "chosen", "rejected")},
            ctx.run_dir / "figures" / "data_lengths.png",
        )
        ctx.step = "write: swap in"
        swap_in_dir(staging, out_dir)
    ctx.step = "record"
    results = {**card, "out_dir": str(out_dir), "figure": str(figure)}
    results["record"] = str(
        finish(ctx, "data", results, m, model_config={"base_model": cfg.model.name, "location": base},
               training_config={}, data={"source": card["source"], "sha256": card["source_sha256"]})
    )
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m edgerlhf.data_preparation [--profile P] [--config F] [--set K=V ...]``;
    returns the exit status (:func:`edgerlhf.core.stage.cli_main`)."""
    return cli_main("edgerlhf.data_preparation", "Stage 1: prepare HH-RLHF preference pairs.", prepare,
                    lambda results: json.dumps({k: results[k] for k in ("rows_read", "dropped", "counts", "record")},
                                               indent=2), argv)


if __name__ == "__main__":
    sys.exit(main())
