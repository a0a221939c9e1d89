"""Stages 2-4 (02_SFT_Finetuning, 03_Reward_Modeling, 04_PPO_Alignment): language-model utilities: prompt/completion
encoding, padding, per-token log-probabilities and entropy, and perplexity of completions.
"""
from __future__ import annotations

import math

import torch

from .templates import render_dialogue, render_prompt


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_prompt_completion(tokenizer, messages: list[dict], reply: str) -> tuple[list[int], int]:
    """Tokenise prompt + reply with the chat template; returns ``(input_ids, completion_start)``.

    The completion starts where the tokenised prompt (with its generation prompt) and
    the tokenised prompt + reply diverge, exactly as TRL's ``SFTTrainer`` computes its
    completion mask, so perplexity here and the SFT loss cover the same tokens.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(render_dialogue(tokenizer, messages, reply), add_special_tokens=False)["input_ids"]
    return full_ids, common_prefix(prompt_ids, full_ids)


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask``, both ``LongTensor[B, T]``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: ``cumsum(mask) - 1``, clamped at 0. Shape ``[B, T]``."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each label and the entropy (nats) of each position under ``softmax(logits /
    temperature)``, in float32, one ``[T, V]`` row at a time (the "selective log-softmax" of TRL/OpenRLHF).

    ``z = logits / T``; ``log p(y) = z_y - logsumexp(z)``; ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` (no
    gradient). Hand-written: TRL's ``selective_log_softmax``/``entropy_from_logits`` differ in float32 rounding.

    Args:
        logits: ``[B, T, V]`` (any float dtype; cast to float32 row by row, then divided by ``T``).
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


@torch.no_grad()
def completion_logprobs(model, tokenizer, examples: list[tuple[list[dict], str]], batch_size: int = 4
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability (nats) of each reply given its prompt, at temperature 1, and its token count.
    Logits are computed at the reply positions only (``logits_to_keep``).

    Args:
        examples: ``[(messages, reply), ...]``; the reply's tokens are those :func:`encode_prompt_completion` finds.
    Returns:
        ``(logprobs DoubleTensor[N], tokens LongTensor[N])`` in the order of ``examples``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_prompt_completion(tokenizer, m, r) for m, r in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths together
    logprobs, tokens = torch.zeros(len(encoded), dtype=torch.float64), torch.zeros(len(encoded), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad_left([encoded[i][0] for i in rows], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        replies = max(len(encoded[i][0]) - encoded[i][1] for i in rows)  # left padding: replies end every row
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                       logits_to_keep=replies + 1).logits[:, :-1]  # the logits at t predict token t + 1
        logp = logprobs_and_entropy(logits, ids[:, ids.shape[1] - replies:])[0]
        for row, i in enumerate(rows):
            count = len(encoded[i][0]) - encoded[i][1]
            logprobs[i], tokens[i] = logp[row, replies - count:].sum().item(), count
    model.train(was_training)
    return logprobs, tokens


@torch.no_grad()
def pair_logprobs(model, tokenizer, prompts: list[list[dict]], chosen: list[str], rejected: list[str],
                  batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_logprobs` of both replies of each preference pair, the shared prompt run once: its KV
    cache is repeated for the two replies (as :func:`edgerlhf.core.probe.pair_features` does), so a pair costs
    one prompt and two replies instead of two prompts and two replies.

    Each pair's shared part stops one token before the earlier reply starts, so every logit read comes from the
    reply pass. Pairs are batched by length (shared part + longer reply), ``batch_size`` pairs at a time; replies
    are right-padded to the longest of the batch, so large batches pay for padding.

    Args:
        prompts: ``N`` chat prompts; chosen, rejected: ``N`` reply strings each.
    Returns:
        ``(logprobs_chosen, logprobs_rejected)``, each ``DoubleTensor[N]`` (nats, temperature 1).
    Raises:
        ValueError: lengths differ.
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected replies: "
                         "one of each per prompt expected")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = []
    for messages, c, r in zip(prompts, chosen, rejected):
        (ids_c, start_c), (ids_r, start_r) = (encode_prompt_completion(tokenizer, messages, reply) for reply in (c, r))
        k = max(0, min(common_prefix(ids_c, ids_r), start_c, start_r) - 1)
        pairs.append((ids_c[:k], (ids_c[k:], ids_r[k:]), (start_c - k, start_r - k)))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + max(map(len, pairs[i][1])))
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        suffixes = [pairs[i][1][j] for i in rows for j in (0, 1)]
        width = max(map(len, suffixes))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in suffixes], device=device)
        suffix_mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in suffixes])[:, None]).long()
        prefix, prefix_mask = pad_left([pairs[i][0] for i in rows], pad_id)
        cache = None
        if prefix.shape[1]:
            prefix, prefix_mask = prefix.to(device), prefix_mask.to(device)
            cache = model(input_ids=prefix, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                          use_cache=True, logits_to_keep=1).cache
            cache.batch_repeat_interleave(2)  # rows: pair 0 chosen, pair 0 rejected, pair 1 chosen, ...
        mask = torch.cat([prefix_mask.repeat_interleave(2, dim=0), suffix_mask], dim=1).to(device)
        positions = prefix_mask.sum(1).repeat_interleave(2)[:, None].to(device) + torch.arange(width, device=device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=False).logits[:, :-1]  # the logits at t predict token t + 1
        logp = logprobs_and_entropy(logits, ids[:, 1:])[0]
        for row, (i, j) in enumerate((i, j) for i in rows for j in (0, 1)):
            first, end = pairs[i][2][j], len(pairs[i][1][j])  # the reply's tokens: suffix[first:end]
            out[i, j] = logp[row, first - 1:end - 1].sum().item()
    model.train(was_training)
    return out[:, 0], out[:, 1]


def completion_nll(model, tokenizer, examples: list[tuple[list[dict], str]], batch_size: int = 4) -> dict:
    """Summed negative log-likelihood (nats) of each reply given its prompt (:func:`completion_logprobs`).

    Args:
        examples: ``[(messages, reply), ...]``.
    Returns:
        ``{"nll": float total nats, "tokens": int completion tokens, "perplexity": exp(nll/tokens)}``.
    """
    logprobs, tokens = completion_logprobs(model, tokenizer, examples, batch_size)
    total, count = -float(logprobs.sum()), int(tokens.sum())
    return {"nll": total, "tokens": count, "perplexity": math.exp(total / max(count, 1))}


def fit_prompt(
    tokenizer, messages: list[dict], replies: list[str], max_length: int, mode: str = "truncate_left"
) -> tuple[list[dict] | None, bool]:
    """Make prompt + the longest reply fit ``max_length`` tokens by truncating the prompt from the left.

    Truncation works on whole turns: the oldest user/assistant exchange is dropped until
    the rendered dialogue fits, so the chat template stays valid and the replies always
    survive intact. Returns ``(messages, truncated)``; ``messages`` is None when the pair
    must be dropped (``mode="drop"``, or even the last user turn alone is too long).

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in ("truncate_left", "drop"):
        raise ValueError(f"overlong must be 'truncate_left' or 'drop', got {mode!r}")

    def length(msgs: list[dict]) -> int:
        return max(len(encode_prompt_completion(tokenizer, msgs, reply)[0]) for reply in replies)

    if length(messages) <= max_length:
        return messages, False
    if mode == "drop":
        return None, False
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while len(turns) > 1:
        turns = turns[2:]  # drop the oldest user/assistant exchange
        if length(system + turns) <= max_length:
            return system + turns, True
    return None, False
