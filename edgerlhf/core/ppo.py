"""PPO with a KL penalty for language models: EdgeRLHF's own, memory-lean implementation.

Read top to bottom in the order of the algorithm (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences"; Ouyang et al. 2022; Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO"):

1. rollout        sample replies to training prompts; mask everything after the first EOS
2. score          reward model on the truncated text (+ optional missing-EOS penalty, normalisation)
3. log-probs      recompute log pi (and the values) by a pass over the reply tokens that reuses the prompt's
                  keys and values from the rollout's prefill, and log pi_ref by a forward pass with the LoRA
                  adapter disabled (the same network), both at the sampling temperature
4. rewards        per-token -beta * KL_t, plus the score at the last real token
5. GAE            advantages and returns (gamma, lambda), advantages whitened over real tokens
6. update         PPO epochs over shuffled minibatches: clipped surrogate + clipped value loss
7. KL controller  beta fixed or adaptive (Ziegler et al. 2019)

Memory: one backbone holds policy (LoRA on), reference (LoRA off) and value head (a linear
layer on the last hidden state); the reward model may live on another device.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .lm import pad_left, position_ids
from .memory import returning_freed_memory, trim_heap

# --------------------------------------------------------------------------------------------
# 0. masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (any shape, same shape)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``x`` over masked positions (Bessel's correction)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to mean 0, std 1 over masked positions; masked-out entries become 0.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as TRL does for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --------------------------------------------------------------------------------------------
# 1. rollout


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens: up to and including the first EOS.

    Args:
        responses: ``LongTensor[B, R]`` sampled tokens.
    Returns:
        ``(mask FloatTensor[B, R], ended BoolTensor[B])``; ``ended`` is True where an EOS was emitted.
    """
    is_eos = responses == eos_id
    ended = is_eos.any(dim=1)
    first = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(ended, responses.shape[1] - 1,
                                                                                dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)[None]
    return (positions <= first[:, None]).float(), ended


@contextmanager
def merged_adapter(model):
    """Run the block with the LoRA adapter folded into the weights it wraps, for fast generation.

    Each wrapped layer gets a new weight ``W + s * B A`` (peft's ``get_delta_weight``) and the adapter branch is
    disabled, so a decoding step runs the plain layers instead of three extra matmuls per layer (on a 2-core CPU
    2.2 s of 11.6 s for 8 replies of 64 tokens with SmolLM2-135M). The original weights are not modified: they
    are put back afterwards, bit for bit, so the reference model (adapter disabled) and any reward model sharing
    them (:func:`edgerlhf.ppo_alignment.share_frozen_weights`) are unchanged. Costs one extra copy of the wrapped
    weights while the block runs, allocated under :func:`edgerlhf.core.memory.returning_freed_memory` so that it
    goes back to the operating system afterwards instead of staying in the heap (SmolLM2-135M: 405 MiB). A model
    with no adapter, or a quantized base (int8/int4 weights cannot hold the sum), runs unchanged.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if isinstance(model, PeftModel) else []
    if not layers or any(not m.get_base_layer().weight.dtype.is_floating_point for m in layers):
        yield
        return
    originals = []
    try:
        with torch.no_grad(), returning_freed_memory():  # copies mapped apart from the heap: unmapped when freed
            for layer in layers:
                base = layer.get_base_layer()
                delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A)
                originals.append((base, base.weight))
                base.weight = torch.nn.Parameter(base.weight + delta.to(base.weight.dtype), requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, weight in originals:
            base.weight = weight


def length_groups(lengths: list[int], slack: float = 0.1) -> list[list[int]]:
    """Row indices sorted by length (longest first) and cut into groups that each pad only to their own longest
    row: a group closes when one more row would make its padding exceed ``slack`` of its real tokens.

    Returns:
        Lists of row indices (every row once).
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else None
        if group is not None:
            widest, real = lengths[group[0]], sum(lengths[j] for j in group) + lengths[i]
            if widest * (len(group) + 1) - real <= slack * real:
                group.append(i)
                continue
        groups.append([i])
    return groups


@torch.no_grad()
def prefill_cache(model, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int = 1):
    """The key/value cache of every query token but the last, computed on real tokens only, in a preallocated
    cache with room for ``max_new_tokens`` more positions.

    ``generate`` would run its first pass over the whole left-padded ``[B, P]`` block; for prompts of unequal
    length most of it is padding (8 training prompts of 38-252 tokens: 2,016 positions for 954 tokens, and 4 s of a
    13 s rollout on 2 CPU cores). Here the rows go through the model in :func:`length_groups`, each group cut to
    its own real columns, and their keys and values are laid into one left-padded cache (zeros at padding, which
    the attention mask hides). ``generate`` given this cache runs only the last query token before sampling
    (transformers' prefix caching), at the same positions (``cumsum(mask) - 1``) as its own first pass would use.

    The cache is a ``transformers.StaticCache`` of ``P - 1 + max_new_tokens`` positions: each decoding step writes
    its keys in place, where the default ``DynamicCache`` concatenates, i.e. copies the whole cache of all 30
    layers, at every step (SmolLM2-135M, 8 replies of 64 tokens on 2 CPU cores, measured by hand, no JSON kept:
    7.5 s of decoding against 8.2-8.9 s, the same tokens sampled).

    Args:
        query, query_mask: ``LongTensor[B, P]``, left-padded.
        max_new_tokens: forward passes (tokens) the cache must take after the query's first ``P - 1`` tokens:
            the last query token and each new token but the final one, i.e. ``generate``'s ``max_new_tokens``.
    Returns:
        A ``transformers.StaticCache`` holding ``P - 1`` positions, or None when ``P < 2`` (nothing to prefill).
    Raises:
        ValueError: the model has sliding-window attention layers (their cache keeps only the last window).
    """
    from transformers import StaticCache

    width = query.shape[1] - 1
    lengths = (query_mask.sum(dim=1) - 1).clamp(min=0).tolist()  # the tokens before each row's last one
    if width < 1 or max(lengths) == 0:
        return None
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    for group in length_groups(lengths):
        cols = lengths[group[0]]
        if cols == 0:  # one-token queries: nothing to cache, their rows stay zero (and masked)
            continue
        rows = torch.tensor(group, device=query.device)
        ids, mask = query[rows, width - cols:width], query_mask[rows, width - cols:width]
        group_cache = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                            logits_to_keep=1).cache
        for layer, computed in zip(cache.layers, group_cache.layers):
            if layer.is_sliding:
                raise ValueError(f"prefill_cache lays whole prompts into the cache; {type(model).__name__} has "
                                 "sliding-window attention layers")
            if not layer.is_initialized:  # allocate [B, heads, P - 1 + max_new_tokens, head_dim] zeros and mark
                heads = computed.keys.shape[1]  # the first P - 1 positions as filled (no copy: expanded zeros)
                layer.update(*(t.new_zeros(()).expand(len(query), heads, width, t.shape[3])
                               for t in (computed.keys, computed.values)))
            layer.keys[rows, :, width - cols:width] = computed.keys
            layer.values[rows, :, width - cols:width] = computed.values
    return cache


@torch.no_grad()
def rollout(model, queries: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int, temperature: float,
            top_k: int, top_p: float, chunk_size: int | None = None, min_new_tokens: int = 0,
            value_head: torch.nn.Module | None = None, from_generation: bool = False) -> dict:
    """Sample one reply per query with the policy (adapter on, dropout off).

    Queries are left-padded; ``generate`` builds its own position ids from the attention mask, and starts from
    a cache of the queries computed without their padding, with the adapter on (:func:`prefill_cache`). The
    adapter is folded into the weights while decoding (:func:`merged_adapter`).
    Tokens after the first EOS are replaced by ``pad_id`` and masked. ``chunk_size`` rows go
    through ``generate`` at a time (None: all), which bounds the KV cache (memory back-off).
    ``min_new_tokens`` suppresses EOS before that many tokens (``generate``'s option; 0: none).

    With ``value_head``, the old policy log-probs and values of the reply tokens come along. By default from
    :func:`reply_logprobs`: one no-grad pass over the reply tokens that reuses the query's keys and values from
    the prefill, i.e. the policy's forward pass over query + reply without recomputing the query. With
    ``from_generation`` (``ppo.logprobs_from_generation``) from the generation pass itself: ``log_softmax(logits /
    temperature)`` of ``generate``'s raw logits (float32) and ``value_head`` on the last hidden state at each
    decoding step, computed with the folded weights.

    Returns:
        ``{"query": LongTensor[B, P], "query_mask": [B, P], "response": LongTensor[B, R],
        "response_mask": FloatTensor[B, R], "ended": BoolTensor[B]}``, plus, with ``value_head``,
        ``"logprobs"`` and ``"values"`` (``FloatTensor[B, R]``, zero after the last generated step) and
        ``"time_old_logprobs_s"``, the seconds :func:`reply_logprobs` took (0 with ``from_generation``).
    """
    device = next(model.parameters()).device
    query, query_mask = pad_left(queries, pad_id)
    query, query_mask = query.to(device), query_mask.to(device)
    model.eval()
    responses, logprobs, values = [], [], []
    seconds, from_generation = 0.0, from_generation and value_head is not None
    for rows in torch.arange(len(queries)).split(chunk_size or len(queries)):
        cache = prefill_cache(model, query[rows], query_mask[rows], max_new_tokens)  # adapter on, as the update
        with merged_adapter(model):
            out = model.generate(
                input_ids=query[rows], attention_mask=query_mask[rows], max_new_tokens=max_new_tokens, cache=cache,
                do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=pad_id,
                eos_token_id=eos_id, min_new_tokens=min_new_tokens, return_dict_in_generate=True,
                output_logits=from_generation, output_hidden_states=from_generation,
            )
        response = out.sequences[:, query.shape[1]:]
        missing = max_new_tokens - response.shape[1]  # generation stopped early for every row: pad to a fixed width
        if from_generation:
            step_logits = torch.stack(out.logits, dim=1)  # [b, steps, V], raw
            logprobs.append(logprobs_and_entropy(step_logits, response, temperature)[0])
            hidden = torch.stack([h[-1][:, -1] for h in out.hidden_states], dim=1)  # [b, steps, H], last layer
            values.append(value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float())
        elif value_head is not None:
            t = time.perf_counter()
            if cache is not None:  # forget the decoded positions: the reply pass rewrites them with the adapter on
                cache.crop(-(cache.get_seq_length() - (query.shape[1] - 1)))
            old = reply_logprobs(model, value_head, query[rows], query_mask[rows], response,
                                 response_mask(response, eos_id)[0], temperature, cache)
            logprobs.append(old["logprobs"])
            values.append(old["values"])
            seconds += time.perf_counter() - t
        del cache
        if value_head is not None:
            logprobs[-1], values[-1] = (torch.nn.functional.pad(x, (0, missing)) for x in (logprobs[-1], values[-1]))
        responses.append(torch.nn.functional.pad(response, (0, missing), value=pad_id))
    response = torch.cat(responses)
    mask, ended = response_mask(response, eos_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_id))
    out = {"query": query, "query_mask": query_mask, "response": response, "response_mask": mask, "ended": ended}
    if value_head is not None:
        out.update(logprobs=torch.cat(logprobs), values=torch.cat(values), time_old_logprobs_s=seconds)
    return out


@torch.no_grad()
def reply_logprobs(model, value_head, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                   response_mask: torch.Tensor, temperature: float, cache=None) -> dict:
    """Log-probs and values of the reply tokens from one no-grad pass over the last query token and the reply
    (but its last token), attending to the other query tokens' keys and values in ``cache``.

    With ``cache`` from :func:`prefill_cache` (built with the adapter on, cropped to the query's ``P - 1``
    positions), this is :func:`forward_logprobs` over query + reply without recomputing the query: the same
    products, in another order (float32 agreement about 1e-5). On the benchmark's 8 prompts of 1,273 tokens with
    replies of 64 (SmolLM2-135M, 2 CPU cores) a step's no-grad phase, this pass and the reference pass, took
    4.8-5.4 s against 9.0 s with a padded policy pass over query and reply (``results/benchmarks/ppo_step-*-amd-
    prefix*.json`` against ``*-amd.json``); alone, measured by hand, 1.3-1.4 s against 4.3-4.9 s. The prefill
    now runs the adapter's products instead of folded weights; that cost was not measured in pairs. The pass
    writes its keys and values into ``cache``.

    Args:
        query, query_mask: ``LongTensor[B, P]``, left-padded. response: ``LongTensor[B, R]``;
            response_mask: ``[B, R]`` (1 up to and including the first EOS).
        cache: the query's cache, or None when ``P == 1`` (nothing before the last query token).
    Returns:
        ``{"logprobs": FloatTensor[B, R], "values": FloatTensor[B, R]}`` (float32; computed but meaningless
        where the mask is 0).
    Raises:
        ValueError: ``cache`` is None but the query is wider than one token.
    """
    width, steps = query.shape[1], response.shape[1]
    if cache is None and width > 1:
        raise ValueError(f"reply_logprobs needs the cache of the query's first {width - 1} tokens (prefill_cache)")
    ids = torch.cat([query[:, -1:], response[:, :-1]], dim=1)
    mask = torch.cat([query_mask, response_mask[:, :-1].to(query_mask.dtype)], dim=1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)[:, -steps:], cache=cache,
                use_cache=cache is not None, output_hidden_states=True)
    logprobs = logprobs_and_entropy(out.logits, response, temperature)[0]
    values = value_head(out.hidden_states[-1].to(value_head.weight.dtype)).squeeze(-1).float()
    return {"logprobs": logprobs, "values": values}


# --------------------------------------------------------------------------------------------
# 3. log-probs and values by forward passes


def real_widths(batch: dict) -> tuple[int, int]:
    """``(query columns, response columns)`` that hold a real token in at least one row of ``batch``: the
    query is left-padded and the response right-padded, so every other column is padding for all rows. Uses the
    host-side ``query_lengths``/``response_lengths`` when the batch carries them."""
    if "query_lengths" in batch:  # known on the host (:meth:`Batch.select`): no wait for the device
        return max(batch["query_lengths"]), max(max(batch["response_lengths"]), 1)
    query = int(batch["query_mask"].sum(dim=1).max())
    response = max(int(batch["response_mask"].sum(dim=1).max()), 1)
    return query, response


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = False):
    """Log-probability of each label and the entropy of each position's distribution under
    ``softmax(logits / temperature)``, in float32, from one log-sum-exp per position (the "selective
    log-softmax" of TRL/OpenRLHF; no ``[B, T, V]`` log-softmax, and no rounding of bf16 logits by the division).

    ``z = logits / T``; ``log p(y) = z_y - logsumexp(z)``; ``H = logsumexp(z) - sum_v softmax(z)_v z_v``
    (no gradient).

    Args:
        logits: ``[B, T, V]`` (any float dtype; cast to float32 one row at a time, then divided by ``T``).
        labels: ``LongTensor[B, T]``.
    Returns:
        ``(logprobs FloatTensor[B, T], entropy FloatTensor[B, T] or None)``.
    """
    logprobs, entropy = [], []
    for z, y in zip(logits, labels):
        z = z.float() if temperature == 1.0 else z.float() / temperature  # no pass over [T, V] to divide by 1
        lse = torch.logsumexp(z, dim=-1)
        logprobs.append(z.gather(-1, y[:, None]).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                entropy.append(lse - (torch.exp(z - lse[:, None]) * z).sum(dim=-1))
    return torch.stack(logprobs), torch.stack(entropy) if with_entropy else None


def pack_rows(batch: dict) -> dict:
    """The padding-free layout of a micro-batch: each row's real query and reply tokens one after the other
    in a single sequence, positions restarting at 0 for every row. Given ``position_ids`` and no attention
    mask, transformers keeps the rows apart in attention (``masking_utils.find_packed_sequence_indices``).

    Returns:
        ``input_ids``, ``position_ids``: ``LongTensor[1, T]`` (T = real tokens of all rows); ``keep``:
        ``LongTensor[N]``, the positions whose logits predict a reply token (N = real reply tokens); ``labels``
        ``[N]``; ``rows``, ``cols``: ``[N]``, where each result goes in the ``[B, R]`` layout.
    """
    if "query_lengths" in batch:  # known on the host (:meth:`Batch.select`): no wait for the device
        query_len, reply_len = batch["query_lengths"], [max(r, 1) for r in batch["response_lengths"]]
    else:
        query_len = batch["query_mask"].sum(dim=1).tolist()
        reply_len = batch["response_mask"].sum(dim=1).long().clamp(min=1).tolist()
    width = batch["query"].shape[1]
    ids, pos, keep, rows, cols = [], [], [], [], []
    offset = 0
    for i, (q, r) in enumerate(zip(query_len, reply_len)):
        ids += [batch["query"][i, width - q:], batch["response"][i, :r]]
        pos.append(torch.arange(q + r))
        keep.append(torch.arange(offset + q - 1, offset + q + r - 1))
        rows.append(torch.full((r,), i))
        cols.append(torch.arange(r))
        offset += q + r
    device = batch["query"].device
    input_ids = torch.cat(ids)[None]
    return {"input_ids": input_ids, "position_ids": torch.cat(pos)[None].to(device), "keep": torch.cat(keep).to(device),
            "labels": input_ids[0, torch.cat(keep).to(device) + 1], "rows": torch.cat(rows).to(device),
            "cols": torch.cat(cols).to(device)}


def forward_logprobs(model, value_head, batch: dict, temperature: float, with_entropy: bool = False,
                     padding_free: bool = False) -> dict:
    """Log-probs of the response tokens (and values) from one forward pass over query + response.

    The pass runs on real tokens only. Padded (default): the batch is cut to its real columns
    (:func:`real_widths`: no all-padding query column on the left, nothing after the longest reply).
    ``padding_free``: the rows are packed into one sequence (:func:`pack_rows`, TRL's ``padding_free``), so no
    padding at all is computed, at the price of attention over the packed length (worth it for a few rows of
    unequal length: PPO's micro-batches). Logits are computed at the reply positions only (``logits_to_keep``),
    divided by the sampling ``temperature`` and reduced in float32 (:func:`logprobs_and_entropy`). Positions are
    ``cumsum(mask) - 1`` (padded) or restart per row (packed), so left padding never shifts them. Values come from
    ``value_head`` on the last hidden state (None to skip). Results are laid out ``[B, R]`` as the batch, zero
    where nothing was computed (consumers mask them). Gradients flow when called outside ``no_grad``.

    Args:
        batch: ``query [B, P]``, ``query_mask [B, P]`` (left-padded), ``response [B, R]``,
            ``response_mask [B, R]`` (right-padded).
    Returns:
        ``{"logprobs": [B, R], "values": [B, R] or None, "entropy": [B, R] or None}`` (float32).
    """
    shape = batch["response"].shape
    hidden_states = value_head is not None
    if padding_free:
        packed = pack_rows(batch)
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                    output_hidden_states=hidden_states, logits_to_keep=packed["keep"])
        logprobs, entropy = logprobs_and_entropy(out.logits, packed["labels"][None], temperature, with_entropy)
        hidden = out.hidden_states[-1][:, packed["keep"]] if hidden_states else None
        where = (packed["rows"], packed["cols"])

        def layout(x):  # [1, N] -> [B, R]
            return None if x is None else torch.zeros(shape, dtype=x.dtype, device=x.device).index_put(where, x[0])
    else:
        q_cols, r_cols = real_widths(batch)
        query, query_mask = batch["query"][:, -q_cols:], batch["query_mask"][:, -q_cols:]
        response, response_mask = batch["response"][:, :r_cols], batch["response_mask"][:, :r_cols]
        mask = torch.cat([query_mask, response_mask.long()], dim=1)
        # logits only at the R + 1 last positions: position t predicts token t + 1, so positions Q - 1 .. Q + R - 2
        # predict the response; never the [B, Q + R, V] full-vocabulary block
        out = model(input_ids=torch.cat([query, response], dim=1), attention_mask=mask,
                    position_ids=position_ids(mask), output_hidden_states=hidden_states, use_cache=False,
                    logits_to_keep=r_cols + 1)
        logprobs, entropy = logprobs_and_entropy(out.logits[:, :-1], response, temperature, with_entropy)
        hidden = out.hidden_states[-1][:, q_cols - 1:-1] if hidden_states else None

        def layout(x):  # [B, r_cols] -> [B, R]
            return None if x is None else torch.nn.functional.pad(x, (0, shape[1] - r_cols))
    values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float() if hidden_states else None
    return {"logprobs": layout(logprobs), "values": layout(values), "entropy": layout(entropy)}


@torch.no_grad()
def reference_logprobs(model, batch: dict, temperature: float, chunk_size: int | None = None) -> torch.Tensor:
    """Log-probs of the response tokens under the reference model: ``model`` with its adapter disabled (no
    second copy).

    ``model`` is a peft ``PeftModel``; ``model.disable_adapter()`` gives the SFT model, whose LoRA
    was merged into the base weights before PPO (see :func:`edgerlhf.ppo_alignment.load_policy`).
    Rows are sorted by real length (query + reply tokens) and passed ``chunk_size`` at a time (None: all),
    so each chunk pads only to its own longest row; rows do not interact, so the grouping changes nothing
    but the padding. The policy's old log-probs and values come from :func:`rollout` (:func:`reply_logprobs`).

    Args:
        batch: ``query``, ``query_mask`` ``[B, P]`` (left-padded), ``response``, ``response_mask`` ``[B, R]``.
    Returns:
        ``FloatTensor[B, R]`` in the batch's row order (computed but meaningless where the mask is 0).
    """
    model.eval()
    lengths = batch["query_mask"].sum(dim=1) + batch["response_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    out = torch.zeros(batch["response"].shape, device=batch["response"].device)
    for rows in order.split(chunk_size or len(order)):
        chunk = {k: batch[k][rows] for k in ("query", "query_mask", "response", "response_mask")}
        with model.disable_adapter():
            out[rows] = forward_logprobs(model, None, chunk, temperature)["logprobs"]
    return out


# --------------------------------------------------------------------------------------------
# 4. per-token rewards


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) for sampled tokens (Schulman 2020, "Approximating KL").

    ``k1 = log pi - log pi_ref`` (unbiased, can be negative); ``k3 = (r - 1) - log r`` with
    ``r = pi_ref / pi`` (unbiased, non-negative).

    Raises:
        ValueError: unknown estimator.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a ``[B, R]`` mask (the EOS when one was emitted)."""
    return (mask.sum(dim=1) - 1).clamp(min=0).long()


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    beta: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-beta * KL_t`` with the reward-model score added at the last real token.

    Args:
        scores: ``[B]`` reward-model scores. logprobs, ref_logprobs, mask: ``[B, R]``.
    Returns:
        ``(rewards [B, R], kl [B, R])``, both zero after the last real token.
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    rewards = -beta * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.device)
    return rewards, kl


def final_scores(raw_scores: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float,
                 moments: RunningMoments | None = None) -> torch.Tensor:
    """The scores PPO adds at the last real token: ``missing_eos_penalty`` subtracted where no EOS was emitted
    (TRL's ``missing_eos_penalty``), then, with ``moments``, normalised by the running mean and standard
    deviation after folding this batch in (TRL's ``use_score_scaling`` with ``use_score_norm``).

    Args:
        raw_scores: ``[B]`` reward-model scores. ended: ``BoolTensor[B]``.
    Returns:
        ``FloatTensor[B]``.
    """
    scores = raw_scores - missing_eos_penalty * (~ended).float()
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / moments.std
    return scores


class NonFiniteError(FloatingPointError):
    """A non-finite score, KL, reward, loss or gradient in a PPO step; ``rollout`` holds the step's tensors
    (query, response, masks, scores, log-probs, values where computed) so the failure can be inspected."""

    def __init__(self, message: str, rollout: dict[str, torch.Tensor]):
        super().__init__(message)
        self.rollout = rollout


class RunningMoments:
    """Running mean and standard deviation over all values seen (Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of values into the running statistics."""
        x = x.detach().double()
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


# --------------------------------------------------------------------------------------------
# 5. advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    Positions after the last real token have value and reward 0, so the last real token
    bootstraps from 0 (the episode ends there).

    Args:
        rewards, values, mask: ``[B, R]``.
    Returns:
        ``(advantages [B, R], returns [B, R])`` with ``returns = advantages + values``.
    """
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over real tokens (1 is perfect, <= 0 is useless)."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# 6. losses


def policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float) -> dict:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``L^CLIP = -E[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)]`` with ``r_t = exp(log pi - log pi_old)``.
    Also returns ``approx_kl`` (the k3 estimate of KL(pi_old || pi), CleanRL) and ``clipfrac``.
    """
    logratio = new_logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
        clipfrac = masked_mean(((ratio - 1.0).abs() > cliprange).float(), mask)
    return {"pg_loss": pg_loss, "approx_kl": approx_kl, "clipfrac": clipfrac}


def value_loss(new_values, old_values, returns, mask, cliprange_value: float) -> dict:
    """Clipped value loss (PPO2 baselines, Huang et al. 2024 detail #11):
    ``0.5 * E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)]``."""
    v_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return {"vf_loss": vf_loss, "vf_clipfrac": vf_clipfrac}


# --------------------------------------------------------------------------------------------
# 7. KL controller


@dataclass
class KLController:
    """KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019, section 2.2).

    Adaptive update after each batch of ``n_steps`` samples with mean sequence KL ``kl``:
    ``e = clip(kl / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    beta: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        """Update beta from the batch's mean KL (nats per sequence); returns the new beta."""
        if self.adaptive:
            error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


# --------------------------------------------------------------------------------------------
# The update over one rollout batch


@dataclass
class Batch:
    """One rollout batch, everything ``[B, ...]`` on the policy's device."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    extra: dict = field(default_factory=dict)

    def select(self, idx: torch.Tensor) -> dict:
        """The rows ``idx`` (a CPU ``LongTensor``) as the dict :func:`forward_logprobs` takes, plus the PPO targets
        and the rows' real lengths as Python lists (``query_lengths``, ``response_lengths``, read from the device
        once per batch), so cutting and packing a micro-batch does not wait for the device."""
        if "lengths" not in self.extra:  # one device-to-host copy per batch, not one per micro-batch
            self.extra["lengths"] = (self.query_mask.sum(dim=1).tolist(), self.response_mask.sum(dim=1).long().tolist())
        query_lengths, response_lengths = self.extra["lengths"]
        rows, on_device = idx.tolist(), idx.to(self.query.device)
        return {**{k: getattr(self, k)[on_device] for k in ("query", "query_mask", "response", "response_mask",
                                                            "logprobs", "values", "advantages", "returns")},
                "query_lengths": [query_lengths[i] for i in rows],
                "response_lengths": [response_lengths[i] for i in rows]}


#: The statistics of an update micro-batch, in the order :func:`micro_batch_backward` returns them.
UPDATE_STATS = ("pg_loss", "vf_loss", "loss", "approx_kl", "clipfrac", "vf_clipfrac", "entropy")


def micro_batch_backward(model, value_head, batch: Batch, micro: torch.Tensor, cfg, weight: float) -> torch.Tensor:
    """Forward and backward of one update micro-batch (the rows ``micro`` of ``batch``): its loss
    ``pg_loss + vf_coef * vf_loss`` is a token mean over the micro-batch's real reply tokens, and ``weight`` times
    its gradient is added to the parameters' ``.grad``.

    The rows go through the model ``cfg.rows_per_pass`` at a time (None: all at once, packed by ``padding_free``),
    each pass's loss weighted by its share of the micro-batch's reply tokens, so the sum of the passes' gradients
    is the micro-batch's gradient (up to float summation order): only memory and time change. One row per pass
    holds one row's activations, and attends with a plain causal kernel where packed rows need a block mask
    (SmolLM2-135M, 2 CPU cores, the benchmark's widest two rows: 741 against 1,401 MiB of activations in
    ``results/benchmarks/ppo_step-*-forced64-amd*.json``; 3.1-3.7 against 4.4-5.2 s in a measurement by hand, no
    JSON kept).

    Args:
        micro: ``LongTensor[m]`` (CPU), row indices of ``batch``.
        weight: the micro-batch's share of its optimizer step (rows / minibatch rows).
    Returns:
        ``FloatTensor[7]``: the micro-batch's :data:`UPDATE_STATS` (token means over its reply tokens).
    """
    passes = [batch.select(rows) for rows in micro.split(cfg.rows_per_pass or len(micro))]
    tokens = sum(sum(mb["response_lengths"]) for mb in passes)
    total = None
    for mb in passes:
        share = sum(mb["response_lengths"]) / tokens
        new = forward_logprobs(model, value_head, mb, cfg.temperature, with_entropy=True,
                               padding_free=cfg.padding_free)
        mask = mb["response_mask"]
        pg = policy_loss(new["logprobs"], mb["logprobs"], mb["advantages"], mask, cfg.cliprange)
        vf = value_loss(new["values"], mb["values"], mb["returns"], mask, cfg.cliprange_value)
        loss = pg["pg_loss"] + cfg.vf_coef * vf["vf_loss"]
        (loss * share * weight).backward()
        values = {**pg, **vf, "loss": loss, "entropy": masked_mean(new["entropy"], mask)}
        part = torch.stack([values[k].detach().float() for k in UPDATE_STATS]) * share
        total = part if total is None else total + part
    return total


def ppo_update(model, value_head, optimizer, batch: Batch, cfg, generator: torch.Generator) -> dict:
    """Several PPO epochs over shuffled minibatches of ``batch``, with gradient accumulation.

    Each epoch shuffles the rows with ``generator``; each optimizer step takes ``mini_batch_size *
    gradient_accumulation_steps`` rows (a minibatch) in micro-batches of ``mini_batch_size``, whose losses
    are weighted by their share of the minibatch's rows (:func:`micro_batch_backward`). Before every
    ``optimizer.step()`` the step's losses and the gradient norm (``clip_grad_norm_``, ``max_grad_norm``) must be
    finite, and its mean approximate KL is compared with ``approx_kl_stop``: above it, the step is dropped and the
    update ends (checked per minibatch, as TRL's ``early_stopping``). One host-device synchronisation per optimizer
    step.

    ``cfg`` provides ``ppo_epochs``, ``mini_batch_size``, ``gradient_accumulation_steps``, ``rows_per_pass``,
    ``padding_free``, ``cliprange``, ``cliprange_value``, ``vf_coef``, ``max_grad_norm``, ``temperature`` and
    ``approx_kl_stop`` (None: never).

    Raises:
        FloatingPointError: a loss or the gradient norm is not finite (nothing is stepped with it).
    Returns:
        Means over micro-batches of ``pg_loss``, ``vf_loss``, ``loss``, ``approx_kl``, ``clipfrac``,
        ``vf_clipfrac``, ``entropy``, plus ``epochs`` run, ``optimizer_steps`` and ``early_stopped``.
    """
    n = batch.query.shape[0]
    per_step = cfg.mini_batch_size * cfg.gradient_accumulation_steps
    stats: list[torch.Tensor] = []  # one [micro-batches, len(UPDATE_STATS)] block per optimizer step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.eval()  # dropout off: log-probs must match the rollout's
    steps = epochs = 0
    stopped = False
    for _ in range(cfg.ppo_epochs):
        epochs += 1
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, per_step):
            optimizer.zero_grad(set_to_none=True)
            step_idx = order[start:start + per_step]
            step_stats = []
            for micro in step_idx.split(cfg.mini_batch_size):
                share = len(micro) / len(step_idx)
                step_stats.append(micro_batch_backward(model, value_head, batch, micro, cfg, share))
            block = torch.stack(step_stats)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            checks = torch.cat([block[:, :3].flatten(), grad_norm.reshape(1).float().to(block.device),
                                block[:, 3].mean().reshape(1)]).tolist()  # the one synchronisation
            if not all(math.isfinite(v) for v in checks[:-1]):
                raise FloatingPointError(f"non-finite PPO loss or gradient (pg, vf, total per micro-batch, then the "
                                         f"gradient norm: {checks[:-1]})")
            stats.append(block)
            if cfg.approx_kl_stop is not None and checks[-1] > cfg.approx_kl_stop:
                optimizer.zero_grad(set_to_none=True)  # the policy already moved too far: drop this step
                stopped = True
                break
            optimizer.step()
            steps += 1
        if stopped:
            break
    means = torch.cat(stats).mean(dim=0).tolist()
    return {**dict(zip(UPDATE_STATS, means)), "epochs": epochs, "optimizer_steps": steps, "early_stopped": stopped}


def decode_responses(tokenizer, response: torch.Tensor, mask: torch.Tensor, eos_id: int) -> list[str]:
    """Reply texts up to (not including) the first EOS, without special tokens."""
    texts = []
    for row, m in zip(response.tolist(), mask.tolist()):
        tokens = [t for t, keep in zip(row, m) if keep and t != eos_id]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts


def ppo_step(model, value_head, optimizer, kl_ctl: KLController, tokenizer, queries: list[list[int]],
             prompts: list, scorer, cfg, generator: torch.Generator, moments: RunningMoments | None = None) -> dict:
    """One PPO iteration on one batch of prompts: rollout, score, rewards, GAE, update, KL control.

    Args:
        queries: token ids of the rendered prompts (one per sample).
        prompts: the same prompts as chat messages, passed to ``scorer``.
        scorer: ``scorer(prompts, replies) -> FloatTensor[B]`` (a reward model, or a scripted reward).
        cfg: a :class:`edgerlhf.core.config.PPOStageConfig`.
        moments: running statistics for score normalisation (``cfg.score_norm``); None: off.
    Raises:
        NonFiniteError: a non-finite score, KL, reward, loss or gradient (a ``FloatingPointError`` carrying the
            rollout's tensors).
        ValueError: the tokenizer has no pad or no EOS token.
    Returns:
        The step's statistics (score, KL, rewards, beta, explained variance, reply length, EOS share, the
        :func:`ppo_update` means, timings in seconds) and ``"batch"``: the rollout as a :class:`Batch`.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} needs a pad and an EOS token for PPO")
    timing = {}
    step_start = t = time.perf_counter()
    ro = rollout(model, queries, pad_id, eos_id, cfg.response_length, cfg.temperature, cfg.top_k, cfg.top_p,
                 cfg.generation_batch_size, cfg.min_response_length, value_head, cfg.logprobs_from_generation)
    trim_heap()  # the KV cache and decoding buffers, freed, would otherwise stay resident under the update's peak
    timing["time_generation_s"] = time.perf_counter() - t - ro["time_old_logprobs_s"]  # the reply pass: forward
    mask = ro["response_mask"]
    t = time.perf_counter()
    replies = decode_responses(tokenizer, ro["response"], mask, eos_id)
    raw_scores = scorer(prompts, replies).float().to(mask.device)
    timing["time_scoring_s"] = time.perf_counter() - t
    scores = final_scores(raw_scores, ro["ended"], cfg.missing_eos_penalty, moments)
    t = time.perf_counter()
    chunk = cfg.generation_batch_size or cfg.mini_batch_size * cfg.gradient_accumulation_steps
    with returning_freed_memory():  # large freed activations go back to the OS (not during generation: slower)
        lp = {"logprobs": ro["logprobs"], "values": ro["values"],
              "ref_logprobs": reference_logprobs(model, ro, cfg.temperature, chunk)}
    timing["time_forward_s"] = time.perf_counter() - t + ro["time_old_logprobs_s"]
    rewards, kl = compute_rewards(scores, lp["logprobs"], lp["ref_logprobs"], mask, kl_ctl.beta, cfg.kl_estimator)
    tensors = {**{k: ro[k] for k in ("query", "query_mask", "response", "response_mask")}, "raw_scores": raw_scores,
               "scores": scores, **lp, "kl": kl, "rewards": rewards}
    for name, tensor in (("score", scores), ("KL", kl), ("reward", rewards)):
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(f"non-finite {name} in the rollout batch", tensors)
    advantages, returns = gae(rewards, lp["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    batch = Batch(query=ro["query"], query_mask=ro["query_mask"], response=ro["response"], response_mask=mask,
                  logprobs=lp["logprobs"], values=lp["values"], advantages=advantages, returns=returns,
                  extra={"replies": replies, "raw_scores": raw_scores})
    t = time.perf_counter()
    try:
        with returning_freed_memory():
            update = ppo_update(model, value_head, optimizer, batch, cfg, generator)
    except FloatingPointError as exc:  # re-raised with the rollout attached, for the failed-step save
        raise NonFiniteError(str(exc), {**tensors, "advantages": advantages, "returns": returns}) from exc
    timing["time_update_s"] = time.perf_counter() - t
    beta_used = kl_ctl.beta
    names = ("score", "score_std", "kl", "reward_total", "non_score_reward", "response_length", "eos_share",
             "generated")
    values = torch.stack([raw_scores.mean(), raw_scores.std() if len(queries) > 1 else raw_scores.new_zeros(()),
                          kl.sum(dim=1).mean(), rewards.sum(dim=1).mean(), (-beta_used * kl).sum(dim=1).mean(),
                          mask.sum(dim=1).mean(), ro["ended"].float().mean(), mask.sum()]).tolist()  # one wait
    summary = dict(zip(names, values))
    kl_ctl.update(summary["kl"], len(queries))
    generated = summary.pop("generated")
    return {
        **summary, "beta": beta_used, "explained_variance": explained_variance(lp["values"], returns, mask),
        "generated_tokens_per_s": generated / max(timing["time_generation_s"], 1e-9),
        **update, **timing, "time_step_s": time.perf_counter() - step_start, "batch": batch,
    }


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states, for exact resumption, as tensors and plain
    Python values only, so a checkpoint loads with ``torch.load(..., weights_only=True)``."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by :func:`rng_state`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
