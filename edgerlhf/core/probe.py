"""Stage 3 (03_Reward_Modeling, reward.method=probe) and benchmarks/probe_pooling.py: the linear-probe reward model.

A probe is a linear Bradley-Terry head on the frozen SFT backbone's features of a reply (the backbone at
bf16, int8 or int4; its first ``reward.probe_layer`` blocks): ``r(reply) = w . f(prompt + reply)``, with
``f`` the final (normed) hidden state at the reply's last real token, the mean over the reply's tokens,
or both (``reward.probe_pooling``; :func:`edgerlhf.core.reward_scoring.pool_states`). The pieces:

* features - :func:`pair_features` (both replies of a pair from one prompt pass), :func:`probe_features`
  (a backbone at a precision over every split, with its cost);
* the head - :func:`fit_head` (:func:`edgerlhf.core.baselines.fit_pairwise_logistic` on ``f(chosen) -
  f(rejected)``), :func:`choose_probe_layer` (``reward.probe_layer_search``), :func:`probe_scores`;
* the folder - :func:`save_probe` (``head.safetensors`` and ``rm_info.json``), :func:`check_saved_probe`
  (reloaded through the API PPO uses, it must score as its features did);
* :func:`crossfit_evaluation` - every probe precision, the ``-ptq`` models and the baselines cross-fitted
  on the same folds (:mod:`edgerlhf.core.crossfit`).

A saved probe is loaded and scored like any reward model (:func:`edgerlhf.core.reward_scoring.load_reward_model`,
:func:`edgerlhf.core.reward_scoring.score`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .adapters import frozen_dtype, require_finite
from .baselines import fit_pairwise_logistic
from .config import PROBE_POOLINGS, RewardStageConfig
from .crossfit import assess as crossfit_assess
from .crossfit import fold_draws, judge_frontier, length_margins, out_of_fold, probe_fitter, tfidf_fitter
from .lm import common_prefix, encode_prompt_completion, fit_prompt, pad_left, position_ids
from .logs import progress
from .memory import free_memory, measure
from .reward_scoring import (
    HEAD, backbone_of, check_count, check_prompts, dtype_that_ran, load_backbone, loading_cost, score,
    tokenizer_fingerprint, weights_fingerprint, write_info,
)

#: Judge candidates the cross-fit adds with ``last+mean`` pooling: a bf16 head on one half of the features.
JUDGE_CANDIDATES = ("bf16 last-token head", "bf16 mean-pooled head")


@dataclass
class PairTokens:
    """One preference pair's tokens split where the two dialogues part (:func:`encode_pair_suffixes`).

    ``prefix + suffixes[j]`` is exactly what :func:`edgerlhf.core.reward_scoring.score` feeds the model for
    reply ``j`` (0: chosen, 1: rejected); ``reads[j]`` indexes ``suffixes[j]`` at the token the head reads;
    ``starts[j]`` is where reply ``j`` starts in ``prefix + suffixes[j]`` (it may lie inside the prefix when
    both replies begin alike).
    """

    prefix: list[int]
    suffixes: tuple[list[int], list[int]]
    reads: tuple[int, int]
    starts: tuple[int, int]


def encode_pair_suffixes(tokenizer, prompts: list[list[dict]], chosen: list[str], rejected: list[str],
                         max_length: int) -> tuple[list[PairTokens], int]:
    """Token ids of each pair split into the part both replies share and the two reply parts.

    Prompts are truncated from the left by whole turns so both replies fit ``max_length``
    (:func:`edgerlhf.core.lm.fit_prompt`). The head is read where transformers' sequence classification
    pooling reads it, at the last token that is not the pad token (with pad = EOS, as for GPT-2, that
    is the token before a final EOS); each suffix contains that token.

    Returns:
        ``([PairTokens, ...], n_truncated)``.
    Raises:
        ValueError: a pair that does not fit even with only its last user turn; ``max_length < 1``; an unknown
            role (:func:`edgerlhf.core.reward_scoring.check_prompts`).
        TypeError: a malformed prompt (:func:`edgerlhf.core.reward_scoring.check_prompts`).
    """
    check_prompts(prompts)
    check_count(max_length=max_length)
    pad = tokenizer.pad_token_id
    out, truncated = [], 0
    for i, (messages, c, r) in enumerate(zip(prompts, chosen, rejected)):
        fitted, cut = fit_prompt(tokenizer, messages, [c, r], max_length, "truncate_left")
        if fitted is None:
            raise ValueError(f"pair {i}: a reply with its last user turn exceeds max_length={max_length} tokens")
        truncated += int(cut)
        (ids_c, start_c), (ids_r, start_r) = (encode_prompt_completion(tokenizer, fitted, reply) for reply in (c, r))
        read = [max(j for j, t in enumerate(seq) if t != pad) for seq in (ids_c, ids_r)]
        k = min(common_prefix(ids_c, ids_r), *read)
        out.append(PairTokens(ids_c[:k], (ids_c[k:], ids_r[k:]), (read[0] - k, read[1] - k), (start_c, start_r)))
    return out, truncated


def blocks_and_norm(backbone) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """The transformer blocks and the final norm of a backbone (Llama ``layers``/``norm``, GPT-2 ``h``/``ln_f``).

    Raises:
        TypeError: the backbone has neither pair.
    """
    for blocks, norm in (("layers", "norm"), ("h", "ln_f")):
        if hasattr(backbone, blocks) and hasattr(backbone, norm):
            return getattr(backbone, blocks), getattr(backbone, norm)
    raise TypeError(f"{type(backbone).__name__} has no known blocks and final norm (layers/norm or h/ln_f)")


class _BlockTaps:
    """The final states of a backbone pass, or the outputs of chosen blocks (1-based) read through the
    final norm, kept by forward hooks; a context manager that removes its hooks on exit."""

    def __init__(self, backbone, layers: list[int] | None):
        self.layers, self.outputs, self.hooks, self.norm = layers, {}, [], None
        if layers:
            blocks, self.norm = blocks_and_norm(backbone)
            if any(not 1 <= k <= len(blocks) for k in layers):
                raise ValueError(f"layers {layers} must be blocks of the model, in [1, {len(blocks)}]")
            for k in layers:
                self.hooks.append(blocks[k - 1].register_forward_hook(self._keep(k)))

    def _keep(self, k: int):
        def hook(_module, _args, out):
            self.outputs[k] = out[0] if isinstance(out, tuple) else out
        return hook

    def states(self, out) -> list[torch.Tensor]:
        """``[FloatTensor[B, T, H]]``, one per layer (the pass's ``last_hidden_state`` without layers)."""
        if not self.layers:
            return [out.last_hidden_state]
        return [self.norm(self.outputs[k]) for k in self.layers]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


@torch.inference_mode()
def pair_features(model, tokenizer, prompts: list[list[dict]], chosen: list[str], rejected: list[str],
                  batch_size: int = 2, max_length: int = 512, layers: list[int] | None = None,
                  pooling: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """The features a reward head reads for prompt + chosen and prompt + rejected
    (:func:`edgerlhf.core.reward_scoring.pool_states`).

    ``pair_features(..., pooling=p)[0] @ w`` equals :func:`edgerlhf.core.reward_scoring.score` of a model whose
    head weight is ``w`` and whose :func:`edgerlhf.core.reward_scoring.pooling_of` is ``p``. The shared prompt is
    run once per pair and its KV cache reused for both replies (the saving is largest where prompts are longer
    than replies, as in HH-RLHF); reply tokens that fall in the shared part are pooled from the prompt pass.
    Pairs are batched by prompt length, ``batch_size`` at a time; prompts are left-padded and replies
    right-padded, so large batches pay for padding (docs/measurements.md).

    Args:
        model: a sequence-classification reward model or backbone at any precision (its
            :func:`edgerlhf.core.reward_scoring.backbone_of` is run; the head is not).
        prompts: ``N`` chat prompts; chosen, rejected: ``N`` reply strings each.
        layers: read the output of these blocks (1-based) instead, each through the final norm, from the
            same pass: block k's feature equals the final-layer feature of the backbone truncated to k
            blocks (:func:`edgerlhf.core.reward_scoring.load_backbone` ``num_layers=k``).
        pooling: ``last``, ``mean`` or ``last+mean`` (:func:`edgerlhf.core.reward_scoring.pool_states`).
    Returns:
        ``(features_chosen, features_rejected)``, each ``FloatTensor[N, D]`` (float32, CPU; ``D`` is the
        hidden size, twice that for ``last+mean``), or ``FloatTensor[N, len(layers), D]`` with ``layers``.
    Raises:
        ValueError: lengths differ, a pair cannot fit ``max_length``, a layer is not a block of the model,
            an unknown pooling or role, or ``batch_size`` / ``max_length`` below 1.
        TypeError: a malformed prompt (:func:`edgerlhf.core.reward_scoring.check_prompts`), or a ``batch_size`` /
            ``max_length`` that is not an int.
    """
    check_prompts(prompts)
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected replies: "
                         "one of each per prompt expected")
    check_count(batch_size=batch_size, max_length=max_length)
    if pooling not in PROBE_POOLINGS:
        raise ValueError(f"pooling must be one of {list(PROBE_POOLINGS)}, got {pooling!r}")
    backbone = backbone_of(model)
    encoded, _ = encode_pair_suffixes(tokenizer, prompts, chosen, rejected, max_length)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prefix))  # similar prompt lengths together
    width = model.config.hidden_size * (2 if pooling == "last+mean" else 1)
    feats = torch.empty(len(encoded), 2, len(layers) if layers else 1, width, dtype=torch.float32)
    with _BlockTaps(backbone, layers) as taps:
        for start in progress(range(0, len(order), batch_size), min_total=8, desc="pair features", unit="batch",
                              leave=False):
            idx = order[start:start + batch_size]
            feats[idx] = _pair_batch_features(backbone, [encoded[i] for i in idx], tokenizer.pad_token_id, taps,
                                              pooling)
    if not layers:
        return feats[:, 0, 0], feats[:, 1, 0]
    return feats[:, 0], feats[:, 1]


def _pair_batch_features(backbone, pairs: list[PairTokens], pad: int, taps: _BlockTaps, pooling: str) -> torch.Tensor:
    """Features ``FloatTensor[b, 2, L, D]`` of a batch of pairs: the shared prefixes (left-padded) in one
    pass, their KV cache repeated for both replies, the reply parts (right-padded) in a second pass."""
    device = next(backbone.parameters()).device
    prefix, prefix_mask = pad_left([p.prefix for p in pairs], pad)
    prefix, prefix_mask = prefix.to(device), prefix_mask.to(device)
    out = backbone(input_ids=prefix, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                   use_cache=True)
    prefix_states = taps.states(out) if pooling != "last" else None
    cache = out.cache
    cache.batch_repeat_interleave(2)  # rows: prefix 0, prefix 0, prefix 1, ... for chosen, rejected
    suffixes = [p.suffixes[j] for p in pairs for j in (0, 1)]
    width = max(map(len, suffixes))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=device)
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    suffix_mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
    mask = torch.cat([prefix_mask.repeat_interleave(2, dim=0), suffix_mask], dim=1)
    positions = prefix_mask.sum(1).repeat_interleave(2)[:, None] + torch.arange(width, device=device)[None]
    suffix_states = taps.states(backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                                         cache=cache, use_cache=False))
    read = torch.tensor([p.reads[j] for p in pairs for j in (0, 1)], device=device)
    rows = torch.arange(len(suffixes), device=device)
    if pooling == "last":
        per_layer = [states[rows, read] for states in suffix_states]
    else:  # reply tokens: positions start .. k + read of prefix + suffix, k the prefix length
        k = torch.tensor([len(p.prefix) for p in pairs], device=device).repeat_interleave(2)[:, None]
        start = torch.tensor([p.starts[j] for p in pairs for j in (0, 1)], device=device)[:, None]
        t_prefix = torch.arange(prefix.shape[1], device=device)[None] - (prefix.shape[1] - k)  # -1, ... pads
        in_prefix = ((t_prefix >= start) & (t_prefix >= 0)).float()  # [2b, P]
        col = torch.arange(width, device=device)[None]
        in_suffix = ((col + k >= start) & (col <= read[:, None])).float()  # [2b, W]
        count = (in_prefix.sum(1) + in_suffix.sum(1))[:, None]
        per_layer = []
        for before, after in zip(prefix_states, suffix_states):
            mean = (torch.einsum("bp,bph->bh", in_prefix, before.float().repeat_interleave(2, dim=0))
                    + torch.einsum("bw,bwh->bh", in_suffix, after.float())) / count
            per_layer.append(mean if pooling == "mean" else torch.cat([after[rows, read].float(), mean], dim=-1))
    return torch.stack(per_layer, 1).float().cpu().view(len(pairs), 2, len(per_layer), -1)


def probe_features(sft_location: str, precision: str, tokenizer, splits: dict[str, list[dict]], r: RewardStageConfig,
                   device, num_layers: int | None = None, layers: list[int] | None = None) -> tuple[dict, dict]:
    """Frozen-backbone features of every pair in ``splits`` at ``precision``, the backbone truncated to its
    first ``num_layers`` blocks (None: all).

    Returns ``({split: (features_chosen, features_rejected)}, cost)``, features ``FloatTensor[N, hidden]``,
    or ``FloatTensor[N, len(layers), hidden]`` read after each block in ``layers`` (:func:`pair_features`);
    ``cost`` has the seconds per split, the peak memory of the pass, the blocks run, and the parameter
    count (with ``layers``: a dict ``{block: parameters of the backbone truncated there}``).

    Args:
        splits: ``{split: [example, ...]}``, stage 3's conversational examples (``prompt`` messages,
            ``chosen`` / ``rejected`` one assistant message each).
        r: the stage's settings read here: ``feature_batch_size``, ``max_length``, ``probe_pooling``.
    Raises:
        ValueError: ``num_layers`` or a layer outside the backbone's blocks, or a pair that cannot fit
            ``r.max_length`` (:func:`pair_features`).
    """
    feats, seconds = {}, {}
    with measure(device) as m:
        model, _ = load_backbone(sft_location, precision, device, num_layers)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.eval()
        for split, examples in splits.items():
            start = time.perf_counter()
            feats[split] = pair_features(model, tokenizer, [e["prompt"] for e in examples],
                                         [e["chosen"][0]["content"] for e in examples],
                                         [e["rejected"][0]["content"] for e in examples], r.feature_batch_size,
                                         r.max_length, layers, r.probe_pooling)
            seconds[split] = time.perf_counter() - start
        total = sum(p.numel() for p in model.parameters())  # 4-bit weights counted as stored
        blocks = blocks_and_norm(backbone_of(model))[0]
        if layers:
            per_block = [sum(p.numel() for p in block.parameters()) for block in blocks]
            total = {k: total - sum(per_block[k:]) for k in layers}
        blocks_run = len(blocks)
        del model
        free_memory()
    return feats, {"seconds": seconds, "peak_memory_features": m, "parameters_total": total,
                   "blocks_run": blocks_run}


def fit_head(train: tuple[torch.Tensor, torch.Tensor], seed: int) -> dict:
    """The probe's head fitted on training pairs: the linear Bradley-Terry model on ``chosen - rejected``
    features (:func:`edgerlhf.core.baselines.fit_pairwise_logistic`, C by 5-fold cross-validated log-loss).

    Args:
        train: ``(features_chosen, features_rejected)``, each ``FloatTensor[N, D]``.
    Returns:
        ``fit_pairwise_logistic``'s result (``"weight"``: ``float64[D]`` for the raw features, ``"C"``,
        ``"cv_log_loss"``, ``"cv_accuracy"``, ``"cv_curve"``) with ``"seed"``.
    Raises:
        ValueError: fewer than 10 pairs (two per cross-validation fold).
    """
    return {**fit_pairwise_logistic((train[0] - train[1]).numpy(), seed=seed), "seed": seed}


def choose_probe_layer(train: tuple[torch.Tensor, torch.Tensor], layers: list[int], seed: int) -> dict:
    """The block whose features give the lowest 5-fold cross-validated log-loss of the pairwise logistic
    probe on the training pairs (:func:`edgerlhf.core.baselines.fit_pairwise_logistic`, C chosen per block).

    Args:
        train: ``(features_chosen, features_rejected)``, each ``FloatTensor[N, len(layers), hidden]``.
        layers: the blocks the features were read after.
    Returns:
        ``{"chosen": block, "pairs": N, "candidates": [{"layer", "C", "cv_log_loss"}, ...]}``.
    Raises:
        ValueError: fewer than 10 pairs (two per cross-validation fold).
    """
    diff = (train[0] - train[1]).numpy()
    rows = []
    for j, layer in enumerate(layers):
        fit = fit_pairwise_logistic(diff[:, j], seed=seed)
        rows.append({"layer": layer, "C": fit["C"], "cv_log_loss": fit["cv_log_loss"]})
    return {"chosen": min(rows, key=lambda row: row["cv_log_loss"])["layer"], "pairs": len(diff), "candidates": rows}


def probe_scores(weight: np.ndarray, feats: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of the chosen and rejected replies: the head ``weight`` (``float[D]``) on their features
    ``(FloatTensor[N, D], FloatTensor[N, D])``; returns ``(float64[N], float64[N])``."""
    return feats[0].numpy().astype(float) @ weight, feats[1].numpy().astype(float) @ weight


def save_probe(staging: Path, weight: np.ndarray, tokenizer, sft_location: str, precision: str, device,
               fit: dict, num_layers: int | None = None, pooling: str = "last") -> None:
    """Write a probe reward model: ``head.safetensors`` (the ``score`` weight, ``[1, D]`` float32, ``D`` the
    width of ``pooling``'s features) on the SFT backbone named and hashed in ``rm_info.json`` (quantized on
    load like during training), truncated to its first ``num_layers`` blocks when given
    (``reward.probe_layer``).

    Raises:
        ValueError: the head holds NaN or inf; nothing is written.
    """
    head = {f"{HEAD}.weight": torch.tensor(weight, dtype=torch.float32)[None].contiguous()}
    require_finite(head, f"probe reward model {staging.name} ({precision})")
    tokenizer.save_pretrained(staging / "tokenizer")
    save_file(head, staging / "head.safetensors")
    write_info(staging, layout="head", precision=precision, made_by="probe", dtype=dtype_that_ran(precision, device),
               backbone=sft_location, backbone_sha256=weights_fingerprint(sft_location),
               tokenizer_sha256=tokenizer_fingerprint(staging / "tokenizer"), C=fit["C"],
               cv_log_loss=fit["cv_log_loss"], num_layers=num_layers, pooling=pooling)


def check_saved_probe(folder: Path, precision: str, rows: list[dict], expected: np.ndarray, r: RewardStageConfig,
                      device, n: int = 2) -> dict:
    """Load a saved probe through the API PPO uses (:func:`edgerlhf.core.reward_scoring.loading_cost`) and score
    the chosen replies of the first ``n`` of ``rows`` (validation pairs): they must equal the scores its
    features gave (``expected``, ``float[>= n]``), ``|a - b| <= tol (1 + |b|)``, catching a wrong head or
    backbone (an error of order 1).
    ``tol`` is 1e-3 in float32; 0.02 where the backbone runs in bf16 (:func:`edgerlhf.core.adapters.frozen_dtype`:
    8 mantissa bits, and the features' prompt-cached pass rounds differently from the scorer's full pass, 0.0024
    relative on the quick profile); 0.1 at int8: LLM.int8 picks its outlier columns per batch (Dettmers et al.
    2022), so int8 scores depend on which tokens share a matmul (docs/measurements.md).
    Returns its loading cost (:func:`edgerlhf.core.reward_scoring.loading_cost`).

    Raises:
        RuntimeError: the saved model scores differently from the features it was fitted on.
        RewardModelError: the folder does not load (:func:`edgerlhf.core.reward_scoring.load_reward_model`).
    """
    model, tokenizer, cost = loading_cost(folder, precision, device)
    got = score(model, tokenizer, [e["prompt"] for e in rows[:n]], [e["chosen"][0]["content"] for e in rows[:n]],
                r.score_batch_size, r.max_length).numpy()
    tol = 0.1 if precision == "int8" else 0.02 if frozen_dtype(device, precision) == torch.bfloat16 else 1e-3
    if not np.all(np.abs(got - expected[:n]) <= tol * (1 + np.abs(expected[:n]))):
        raise RuntimeError(f"{folder}: the saved reward model scores {got.tolist()} where its features gave "
                           f"{expected[:n].tolist()}")
    del model
    return cost


def crossfit_evaluation(features: dict[str, dict], ex: dict[str, list[dict]], sft_pairs: set, r: RewardStageConfig,
                        seed: int) -> dict:
    """Cross-fitted evaluation (:mod:`edgerlhf.core.crossfit`) of every probe precision, the ``-ptq`` models and
    the baselines, over every kept pair whose replies SFT did not train on, on the same folds.

    Args:
        features: ``{precision: {split: (features_chosen, features_rejected)}}``, ``FloatTensor[n, D]`` each,
            from :func:`edgerlhf.reward_modeling.probe_models` (bf16 among the precisions).
        ex: ``{split: [example, ...]}``, the same splits' examples in the same order.
        sft_pairs: ``{(chosen, rejected)}`` reply texts of the pairs SFT trained on (their features are not
            held out, so they are left out).
    Returns:
        :func:`edgerlhf.core.crossfit.assess`'s result, with ``"judge_frontier"``
        (:func:`edgerlhf.core.crossfit.judge_frontier` of TF-IDF, the judge's recipe - bf16's, so cross-fitted it
        is bf16 - and, with ``last+mean`` pooling, :data:`JUDGE_CANDIDATES`), ``"pool"`` (pairs per split, pairs
        left out), ``"folds"``, ``"draws"`` and ``"wall_time_s"``.
    Raises:
        KeyError: no bf16 features.
        ValueError: fewer kept pairs than ``2 * r.crossfit_folds`` (:func:`edgerlhf.core.crossfit.fold_draws`).
    """
    start = time.perf_counter()
    splits = [s for s in ex if s in features["bf16"]]
    rows = [e for s in splits for e in ex[s]]
    pair = [(e["chosen"][0]["content"], e["rejected"][0]["content"]) for e in rows]
    keep = np.array([p not in sft_pairs for p in pair])
    chosen, rejected = [c for (c, _), k in zip(pair, keep) if k], [j for (_, j), k in zip(pair, keep) if k]
    diff = {p: np.concatenate([(f[s][0] - f[s][1]).numpy().astype(float) for s in splits])[keep]
            for p, f in features.items()}
    assignments = fold_draws(len(chosen), r.crossfit_folds, r.crossfit_draws, seed)
    margins = length_margins(chosen, rejected, r.crossfit_draws)
    jobs = r.crossfit_n_jobs
    margins.update(out_of_fold(*tfidf_fitter(chosen, rejected, seed), assignments, jobs))
    for p in r.precisions:
        ptq = {f"{q}-ptq": diff[q] for q in diff if q != "bf16"} if p == "bf16" and r.post_training_quantization else {}
        margins.update(out_of_fold(*probe_fitter(diff[p], {p: diff[p], **ptq}, seed), assignments, jobs))
    candidates = {}  # judge candidates beyond tf-idf and the judge's own recipe (bf16): one half of the features
    if r.probe_pooling == "last+mean":
        width = diff["bf16"].shape[1] // 2
        for name, cols in ((JUDGE_CANDIDATES[0], slice(None, width)), (JUDGE_CANDIDATES[1], slice(width, None))):
            candidates[name] = out_of_fold(*probe_fitter(diff["bf16"][:, cols], {name: diff["bf16"][:, cols]}, seed),
                                           assignments, jobs)[name]
    order = ["shorter wins", "longer wins", "tf-idf", *r.precisions]  # the -ptq models, then the candidates, last
    margins = {name: margins[name] for name in sorted(margins, key=lambda m: order.index(m) if m in order else 99)}
    out = crossfit_assess({**margins, **candidates}, order[:3], assignments, candidates=tuple(candidates))
    proxies = [m for m in margins if m not in order[:3]]
    out.update(judge_frontier=judge_frontier(out, ["tf-idf", "bf16", *candidates], proxies),
               pool={"pairs": len(chosen), "left_out_sft_trained": int((~keep).sum()),
                     "by_split": {s: len(ex[s]) for s in splits}},
               folds=r.crossfit_folds, draws=r.crossfit_draws, wall_time_s=time.perf_counter() - start)
    return out
