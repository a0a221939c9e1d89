"""Stage 4 (04_PPO_Alignment): PPO's generation and forward passes, for :mod:`edgerlhf.core.ppo`.

Sampling replies (:func:`rollout`, from a padding-free prefilled cache with the LoRA adapter folded into the
weights), the old log-probs and values from one pass over the reply tokens (:func:`reply_logprobs`), the policy's
log-probs, values and entropy with gradients (:func:`forward_logprobs`, padded or packed) and the reference's
(:func:`reference_logprobs`, the adapter disabled). All log-probs are at the sampling temperature, in float32.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from .lm import logprobs_and_entropy, pad_left, position_ids
from .memory import returning_freed_memory


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
    """Run the block with the LoRA adapter folded into the weights it wraps (``W + s * B A``, peft's
    ``get_delta_weight``), the adapter branch disabled, so a decoding step runs plain layers.

    The original weights are put back afterwards, bit for bit (the reference model and a reward model sharing them
    are unchanged). Costs one copy of the wrapped weights while the block runs, allocated under
    :func:`edgerlhf.core.memory.returning_freed_memory` so it goes back to the OS. A model without an adapter, or
    with a quantized base (int8/int4 weights cannot hold the sum), runs unchanged.
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
    """The key/value cache of every query token but the last, computed on real tokens only (rows in
    :func:`length_groups`, each cut to its own real columns) and laid into one left-padded cache.

    ``generate`` given this cache runs only the last query token before sampling (transformers' prefix caching),
    at the positions (``cumsum(mask) - 1``) its own first pass over the padded block would use. The cache is a
    ``transformers.StaticCache`` with room for ``max_new_tokens`` more positions: decoding writes in place, where a
    ``DynamicCache`` copies the whole cache at every step.

    Args:
        query, query_mask: ``LongTensor[B, P]``, left-padded.
        max_new_tokens: tokens the cache must take after the query's first ``P - 1`` (``generate``'s option).
    Returns:
        A ``StaticCache`` holding ``P - 1`` positions, or None when there is nothing to prefill.
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

    Queries are left-padded; generation starts from :func:`prefill_cache` (adapter on) and decodes with the
    adapter folded in (:func:`merged_adapter`). Tokens after the first EOS become ``pad_id`` and are masked.
    ``chunk_size`` rows go through ``generate`` at a time (None: all), bounding the KV cache.
    ``min_new_tokens`` suppresses EOS before that many tokens (0: none).

    With ``value_head``, the old log-probs and values of the reply tokens come along: by default from
    :func:`reply_logprobs` (one pass over the reply tokens reusing the prefilled cache); with ``from_generation``
    from ``generate``'s own raw logits and last hidden states (computed with the folded weights).

    Returns:
        ``{"query": LongTensor[B, P], "query_mask": [B, P], "response": LongTensor[B, R],
        "response_mask": FloatTensor[B, R], "ended": BoolTensor[B]}``, plus, with ``value_head``,
        ``"logprobs"``, ``"values"`` (``FloatTensor[B, R]``, zero after the last generated step) and
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

    With ``cache`` from :func:`prefill_cache` (adapter on, cropped to the query's ``P - 1`` positions) this is
    :func:`forward_logprobs` over query + reply without recomputing the query (float32 agreement about 1e-5). The
    pass writes its keys and values into ``cache``.

    Args:
        query, query_mask: ``LongTensor[B, P]``, left-padded. response: ``LongTensor[B, R]``;
            response_mask: ``[B, R]`` (1 up to and including the first EOS).
        cache: the query's cache, or None when ``P == 1`` (nothing before the last query token).
    Returns:
        ``{"logprobs": FloatTensor[B, R], "values": FloatTensor[B, R]}`` (float32; meaningless where the mask is 0).
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


def real_widths(batch: dict) -> tuple[int, int]:
    """``(query columns, response columns)`` that hold a real token in at least one row of ``batch`` (the query
    is left-padded, the response right-padded). Uses the host-side ``query_lengths``/``response_lengths`` when
    the batch carries them."""
    if "query_lengths" in batch:  # known on the host (edgerlhf.core.ppo.Batch.select): no wait for the device
        return max(batch["query_lengths"]), max(max(batch["response_lengths"]), 1)
    query = int(batch["query_mask"].sum(dim=1).max())
    response = max(int(batch["response_mask"].sum(dim=1).max()), 1)
    return query, response


def pack_rows(batch: dict) -> dict:
    """The padding-free layout of a micro-batch: each row's real query and reply tokens one after the other in a
    single sequence, positions restarting at 0 for every row. Given ``position_ids`` and no attention mask,
    transformers keeps the rows apart in attention (``masking_utils.find_packed_sequence_indices``).

    Returns:
        ``input_ids``, ``position_ids``: ``LongTensor[1, T]`` (T = real tokens of all rows); ``keep``:
        ``LongTensor[N]``, the positions whose logits predict a reply token (N = real reply tokens); ``labels``
        ``[N]``; ``rows``, ``cols``: ``[N]``, where each result goes in the ``[B, R]`` layout.
    """
    if "query_lengths" in batch:  # known on the host (edgerlhf.core.ppo.Batch.select): no wait for the device
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
    """Log-probs of the response tokens (and values, and entropy) from one forward pass over query + response.

    The pass runs on real tokens only: padded (default), the batch cut to its :func:`real_widths`; with
    ``padding_free``, the rows packed into one sequence (:func:`pack_rows`, TRL's ``padding_free``). Logits are
    computed at the reply positions only (``logits_to_keep``) and reduced at ``temperature`` in float32
    (:func:`edgerlhf.core.lm.logprobs_and_entropy`). Values come from ``value_head`` on the last hidden state (None
    to skip). Gradients flow when called outside ``no_grad``.

    Args:
        batch: ``query [B, P]``, ``query_mask [B, P]`` (left-padded), ``response [B, R]``,
            ``response_mask [B, R]`` (right-padded).
    Returns:
        ``{"logprobs": [B, R], "values": [B, R] or None, "entropy": [B, R] or None}`` (float32, zero where
        nothing was computed).
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
    """Log-probs of the response tokens under the reference model: ``model`` (a peft ``PeftModel`` over the SFT
    model) with its adapter disabled, no second copy.

    Rows are sorted by real length and passed ``chunk_size`` at a time (None: all), so each chunk pads only to its
    own longest row.

    Args:
        batch: ``query``, ``query_mask`` ``[B, P]`` (left-padded), ``response``, ``response_mask`` ``[B, R]``.
    Returns:
        ``FloatTensor[B, R]`` in the batch's row order (meaningless where the mask is 0).
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


def decode_responses(tokenizer, response: torch.Tensor, mask: torch.Tensor, eos_id: int) -> list[str]:
    """Reply texts up to (not including) the first EOS, without special tokens."""
    texts = []
    for row, m in zip(response.tolist(), mask.tolist()):
        tokens = [t for t, keep in zip(row, m) if keep and t != eos_id]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts


def gather_rollouts(local: dict, world: int) -> dict:
    """Every process's rollout as one batch in the prompts' order, on this process's device: process ``r`` of
    ``world`` sampled prompts ``r, r + world, r + 2 world, ...`` (``torch.distributed.all_gather_object``, so any
    backend; a rollout batch is small).

    Args:
        local: this process's ``query``/``query_mask`` ``[b, P]`` (left-padded), ``response``/``response_mask``/
            ``logprobs``/``values``/``ref_logprobs`` ``[b, R]`` (right-padded), ``ended``/``raw_scores`` ``[b]``
            and ``replies`` (``list[str]``); ``pad_id`` (int) fills the token ids.
    Returns:
        The same keys over all rows: prompts padded on the left and replies on the right to the widest process's
        (masks 0, log-probs and values 0 there), rows put back in the prompts' order.
    """
    device = local["query"].device
    parts = [None] * world
    torch.distributed.all_gather_object(parts, {k: v.cpu() if torch.is_tensor(v) else v for k, v in local.items()})
    width_q, width_r = max(p["query"].shape[1] for p in parts), max(p["response"].shape[1] for p in parts)
    out = {}
    for key in ("query", "query_mask", "response", "response_mask", "logprobs", "values", "ref_logprobs"):
        fill = local["pad_id"] if key in ("query", "response") else 0
        out[key] = torch.cat([torch.nn.functional.pad(
            p[key], (width_q - p[key].shape[1], 0) if key.startswith("query") else (0, width_r - p[key].shape[1]),
            value=fill) for p in parts])
    out.update(ended=torch.cat([p["ended"] for p in parts]), raw_scores=torch.cat([p["raw_scores"] for p in parts]))
    origin = torch.cat([torch.arange(len(p["ended"])) * world + r for r, p in enumerate(parts)])
    order = torch.argsort(origin)
    replies = [reply for p in parts for reply in p["replies"]]
    return {**{k: v[order].to(device) for k, v in out.items()}, "replies": [replies[i] for i in order.tolist()]}
