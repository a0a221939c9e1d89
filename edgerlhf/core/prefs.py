"""Stages 1-4: Reading the preference files that stage 1 writes (``train_prefs.jsonl``, ``test_prefs.jsonl``).

Every later stage reads them through :func:`read_prefs`, which validates each row and
names the file, line and field of anything malformed.
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import sha256_file
from .hh_rlhf import DataFormatError

ROLES = ("system", "user", "assistant")
#: Stage 1's files, written and swapped in as one unit: the two splits and the card that lists their sha256.
TRAIN, TEST, CARD = "train_prefs.jsonl", "test_prefs.jsonl", "data_card.json"


def check_data_set(data_dir: str | Path, splits: tuple[str, ...] = (TRAIN, TEST)) -> dict[str, str]:
    """Check that ``splits`` in ``data_dir`` are the files its ``data_card.json`` lists (same sha256), so a stage
    never reads a mixture of two data-stage runs; returns ``{file name: sha256}`` for the run record.

    Raises:
        FileNotFoundError: the card or a file is missing (the message says to run stage 1).
        ValueError: the card is damaged, or a file's sha256 differs from the card's (both named).
    """
    data_dir = Path(data_dir)
    card_path = data_dir / CARD
    if not card_path.exists():
        raise FileNotFoundError(f"{card_path}: no such file; run 01_Data_Preparation "
                                "(python -m edgerlhf.data_preparation) first")
    try:
        listed = json.loads(card_path.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{card_path}: not a data card with a 'files' field ({exc}); run 01_Data_Preparation "
                         "again") from None
    out = {}
    for name in splits:
        path = data_dir / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file; run 01_Data_Preparation first")
        out[name] = sha256_file(path)
        if listed.get(name) != out[name]:
            raise ValueError(f"{path} (sha256 {out[name][:12]}…) is not the file {card_path} lists "
                             f"({str(listed.get(name))[:12]}…): the data files are not one set; run "
                             "01_Data_Preparation again")
    return out


def _check_prompt(prompt: object, where: str) -> list[dict[str, str]]:
    if not isinstance(prompt, list) or not prompt:
        raise DataFormatError(f"{where}: field 'prompt' must be a non-empty list of messages")
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
            message.get("content"), str
        ):
            raise DataFormatError(
                f"{where}: field 'prompt[{i}]' must be {{'role': one of {ROLES}, 'content': str}}, got {message!r:.80}"
            )
    if prompt[-1]["role"] != "user":
        raise DataFormatError(f"{where}: field 'prompt' must end with a user message")
    return prompt


def _reply(value: object, name: str, where: str) -> str:
    """The text of a reply field: one assistant message (TRL's conversational format, as stage 1 writes it) or a
    plain string (files written before that format)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise DataFormatError(f"{where}: field {name!r} must be one assistant message "
                                  f"[{{'role': 'assistant', 'content': str}}], got {value!r:.80}")
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: field {name!r} must hold a non-empty reply text")
    return value


def read_prefs(path: str | Path) -> list[dict]:
    """Read a preference JSONL file into ``[{"prompt": [messages], "chosen": str, "rejected": str, ...}]``.

    The file is in TRL's conversational preference format (``chosen``/``rejected`` each a list of one assistant
    message, :func:`edgerlhf.data_preparation.to_jsonl`); a plain-string reply is read as well. The rows returned
    carry each reply as its text.

    Raises:
        FileNotFoundError: the file is missing (message says to run stage 1 first).
        DataFormatError: the file is empty, a line is not JSON, or a field is missing or
            of the wrong type; the message is ``"<file>:<line>: field '<name>' ..."``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; run 01_Data_Preparation "
                                "(python -m edgerlhf.data_preparation) first")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise DataFormatError(f"{where}: expected an object, got {type(row).__name__}")
            _check_prompt(row.get("prompt"), where)
            for name in ("chosen", "rejected"):
                row[name] = _reply(row.get(name), name, where)
            rows.append(row)
    if not rows:
        raise DataFormatError(f"{path}: the file has no rows")
    return rows


def sft_pairs(rows: list[dict], max_train: int | None, max_validation: int | None) -> tuple[list[dict], list[dict]]:
    """The pairs SFT trains on and those it validates on (checkpoint choice, perplexity, samples), both from the
    training file's ``rows``, so that the held-out test pairs are read only at the final evaluation.

    Validation is the last ``max_validation`` rows (None: 5% of them, at least one); training is the first
    ``max_train`` of the others (None: all). Stage 3 calls this too, to leave SFT's training pairs out of its
    cross-fitted evaluation.

    Raises:
        ValueError: fewer than two rows.
    """
    if len(rows) < 2:
        raise ValueError(f"SFT needs at least 2 training pairs (one to validate on), got {len(rows)}")
    n_val = max_validation if max_validation is not None else max(1, round(0.05 * len(rows)))
    n_val = min(n_val, len(rows) - 1)
    return rows[: len(rows) - n_val][:max_train], rows[len(rows) - n_val:]


def split_pairs(rows: list[dict], r) -> dict[str, list[dict]]:
    """Disjoint slices of the training pairs: the proxies' ``train`` / ``validation`` and the judge's (``r``: the
    ``reward`` config section). Stage 3 trains on them; stage 4's DPO arm on the proxies' ``train``.

    With ``judge`` on, the last ``judge_fraction`` of the pairs go to the judge and no proxy sees them.
    Each share is cut to ``max_train_samples`` and gives ``validation_fraction`` of its pairs (at
    least one) to validation (early stopping, temperature fitting).

    Raises:
        ValueError: ``judge_fraction`` is not in (0, 1).
    """
    if r.judge and not 0 < r.judge_fraction < 1:
        raise ValueError(f"reward.judge_fraction must be in (0, 1), got {r.judge_fraction}")
    n_judge = int(round(r.judge_fraction * len(rows))) if r.judge else 0
    out = {}
    for prefix, share in (("", rows[: len(rows) - n_judge]), ("judge_", rows[len(rows) - n_judge:])):
        share = share[: r.max_train_samples]
        n_val = max(1, int(round(r.validation_fraction * len(share)))) if share else 0
        out[prefix + "validation"], out[prefix + "train"] = share[:n_val], share[n_val:]
    return out
