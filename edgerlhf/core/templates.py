"""Stages 1-4: Rendering prompts and replies as model text, with one template per tokenizer.

Tokenizers that ship a chat template (SmolLM2-Instruct) use it. Those that have none
(distilgpt2) get :data:`PLAIN_TEMPLATE`, the HH-RLHF dialogue format itself::

    "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}...\\n\\nHuman: {user}\\n\\nAssistant:"

with the tokenizer's EOS after a final assistant reply, so a fine-tuned model learns to
stop. Such tokenizers also have no pad token: :func:`ensure_pad_token` sets pad = EOS.
"""
from __future__ import annotations

PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '\n\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\n\nAssistant: ' + message['content'] }}"
    "{%- if loop.last -%}{{ eos_token }}{%- endif -%}"
    "{%- else -%}{{ '\n\n' + message['role'] + ': ' + message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)


def ensure_chat_template(tokenizer) -> str:
    """Give ``tokenizer`` :data:`PLAIN_TEMPLATE` if it has no chat template; returns which one it uses.

    Returns ``"native"`` or ``"plain"``.
    """
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_TEMPLATE
    return "plain" if tokenizer.chat_template == PLAIN_TEMPLATE else "native"


def ensure_pad_token(tokenizer) -> int:
    """Set pad = EOS on a tokenizer without a pad token (GPT-2); returns the pad id.

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text a model sees before it writes its reply (generation prompt added)."""
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_dialogue(tokenizer, messages: list[dict[str, str]], reply: str) -> str:
    """The prompt followed by ``reply`` as the final assistant turn (with its end marker)."""
    ensure_chat_template(tokenizer)
    full = messages + [{"role": "assistant", "content": reply}]
    return tokenizer.apply_chat_template(full, tokenize=False)


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` (no special tokens added beyond those in the text)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def ppo_pad_token(tokenizer) -> int:
    """Give ``tokenizer`` a pad token distinct from EOS where it has one to spare; returns the pad id.

    PPO masks everything after the first EOS itself, so pad = EOS is also correct (GPT-2 has
    no other special token), but a distinct pad keeps padded and finished rows apart. The
    candidate is the tokenizer's UNK token (SmolLM2: ``<|endoftext|>``) when it differs from EOS.

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token
        tokenizer.pad_token = unk if unk is not None and tokenizer.unk_token_id != tokenizer.eos_token_id \
            else tokenizer.eos_token
    return tokenizer.pad_token_id
