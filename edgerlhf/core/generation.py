"""Stage 2 (02_SFT_Finetuning) and the notebooks' sample replies: batched, left-padded generation with sampling
arguments."""
from __future__ import annotations

import torch

from .lm import pad_left
from .templates import ensure_pad_token, render_prompt


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 8,
) -> list[str]:
    """Replies to chat prompts (lists of messages), rendered with the tokenizer's template.

    Prompts are left-padded in batches of ``batch_size``; greedy unless ``do_sample``. The
    reply is decoded up to its first EOS, without special tokens, and stripped.

    Returns:
        One reply string per prompt, in the input order.
    """
    pad_id = ensure_pad_token(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [tokenizer(render_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in chunk]
        ids, mask = pad_left(encoded, pad_id)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {
            "do_sample": False}
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling,
        )
        for row in out[:, ids.shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return replies


def chat(model, tokenizer, messages: list[dict], **kwargs) -> str:
    """One reply to a conversation (``[{"role", "content"}, ...]``); kwargs as in :func:`generate`."""
    return generate(model, tokenizer, [messages], batch_size=1, **kwargs)[0]
