"""Stage 1 (01_Data_Preparation): Reading and parsing Anthropic HH-RLHF preference rows (Bai et al. 2022,
arXiv:2204.05862).

Each row is ``{"chosen": str, "rejected": str}``; both are whole dialogues
``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that share every turn but the last Assistant
reply. :func:`parse_pair` splits a row at the last ``\\n\\nAssistant:`` into the shared
prompt, as chat messages (``role``/``content``) that any chat template can render, and
the two final replies.
"""
from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
FIELDS = ("chosen", "rejected")
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv")


class DataFormatError(ValueError):
    """A row of an input file is malformed; the message names file, line and field."""


@dataclass(frozen=True)
class Pair:
    """One parsed preference pair. ``prompt`` is a tuple of ``(role, content)`` turns."""

    prompt: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    line: int

    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages ``[{"role": ..., "content": ...}, ...]``."""
        return [{"role": r, "content": c} for r, c in self.prompt]


def _numbered(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of a local file (gzip-decompressed for ``.gz``), each line decoded as UTF-8
    on its own, so that bytes that are not UTF-8 (UnicodeDecodeError), a ``.gz`` cut short (EOFError) or
    not gzip at all (``gzip.BadGzipFile``) become a :class:`DataFormatError` naming the file and line."""
    number = 0
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
        it = iter(fh)
        while True:
            try:
                raw = next(it)
            except StopIteration:
                return
            except (EOFError, OSError) as exc:
                what = "damaged gzip file" if path.name.endswith(".gz") else "read error"
                raise DataFormatError(f"{path}:{number + 1}: {what} after {number} complete "
                                      f"line(s): {type(exc).__name__}: {exc}") from exc
            number += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{path}:{number}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
            yield number, text


def check_row(row: object, where: str) -> dict[str, str]:
    """Validate one raw row: a mapping with string ``chosen`` and ``rejected``."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected an object with fields {FIELDS}, got {type(row).__name__}")
    for name in FIELDS:
        if name not in row:
            raise DataFormatError(f"{where}: field {name!r} is missing")
        if not isinstance(row[name], str):
            raise DataFormatError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    return {name: row[name] for name in FIELDS}


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, {"chosen", "rejected"})`` from a local HH-RLHF-format file.

    Formats: ``.jsonl`` / ``.jsonl.gz`` (one object per line, blank lines skipped),
    ``.json`` (a list of objects, or ``{"data": [...]}``; the "line" is the 1-based
    index), ``.csv`` (header with ``chosen`` and ``rejected``; the line is the file line).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: a directory, unknown suffix, bytes that are not UTF-8, a damaged ``.gz``,
            invalid JSON, or a row with a missing/wrong field; the message is ``"<file>:<line>: ..."``
            and names the field.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise DataFormatError(f"{path}: is a directory or special file, not a data file")
    if not path.name.endswith(SUFFIXES):
        raise DataFormatError(f"{path}: unsupported file type; use one of {SUFFIXES}")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for number, text in _numbered(path):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
            yield number, check_row(row, f"{path}:{number}")
    elif path.name.endswith(".json"):
        try:
            tree = json.loads("".join(text for _, text in _numbered(path)))
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        items = tree.get("data") if isinstance(tree, dict) else tree
        if not isinstance(items, list):
            raise DataFormatError(f"{path}: expected a list of rows or {{\"data\": [...]}}")
        for number, row in enumerate(items, start=1):
            yield number, check_row(row, f"{path}: row {number}")
    else:
        reader = csv.DictReader(text for _, text in _numbered(path))
        missing = [f for f in FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise DataFormatError(f"{path}:1: header lacks field(s) {missing}")
        for row in reader:
            yield reader.line_num, check_row(row, f"{path}:{reader.line_num}")


def split_dialogue(text: str) -> tuple[tuple[tuple[str, str], ...], str] | None:
    """Split a dialogue at its last ``\\n\\nAssistant:`` into (prompt turns, final reply).

    Returns None when the dialogue is malformed: no Assistant turn, text before the
    first turn, or turns that do not alternate user/assistant starting and ending
    (before the reply) with the user.
    """
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        return None
    parts = _TURN.split(text[:cut])
    if parts[0].strip():
        return None
    roles, contents = parts[1::2], parts[2::2]
    if not roles or len(roles) % 2 == 0:
        return None
    if any(role != ("Human" if i % 2 == 0 else "Assistant") for i, role in enumerate(roles)):
        return None
    turns = tuple((_ROLE[r], c.strip()) for r, c in zip(roles, contents))
    return turns, text[cut + len(ASSISTANT):].strip()


def parse_pair(row: dict[str, str], line: int) -> Pair | str:
    """Parse a raw row into a :class:`Pair`, or return the reason it is dropped.

    Reasons, checked in this order: ``malformed_dialogue``, ``prompt_mismatch`` (the two
    dialogues differ before the last reply), ``empty_reply``, ``identical_replies``,
    ``role_marker_in_reply`` (a reply that itself contains ``Human:``/``Assistant:``,
    i.e. the annotator's text leaked a turn).
    """
    chosen, rejected = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
    if chosen is None or rejected is None:
        return "malformed_dialogue"
    if chosen[0] != rejected[0]:
        return "prompt_mismatch"
    if not chosen[1] or not rejected[1]:
        return "empty_reply"
    if chosen[1] == rejected[1]:
        return "identical_replies"
    if any(marker in reply for reply in (chosen[1], rejected[1]) for marker in ("Human:", "Assistant:")):
        return "role_marker_in_reply"
    return Pair(prompt=chosen[0], chosen=chosen[1], rejected=rejected[1], line=line)
