import gzip
import json
from collections import Counter

import pytest

from edgerlhf.core.hh_rlhf import DataFormatError, Pair, parse_pair, read_rows, split_dialogue


def dialogue(*turns: str) -> str:
    roles = ["Human", "Assistant"]
    return "".join(f"\n\n{roles[i % 2]}: {t}" for i, t in enumerate(turns))


def test_single_turn_split():
    prompt, reply = split_dialogue(dialogue("hi there", "hello!"))
    assert prompt == (("user", "hi there"),)
    assert reply == "hello!"


def test_multi_turn_split_keeps_history_as_messages():
    prompt, reply = split_dialogue(dialogue("q1", "a1", "q2", "a2", "q3", "final answer"))
    assert prompt == (("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), ("user", "q3"))
    assert reply == "final answer"


def test_reply_with_paragraphs_survives():
    _, reply = split_dialogue(dialogue("q", "para one\n\npara two"))
    assert reply == "para one\n\npara two"


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all",
        "preamble" + dialogue("q", "a"),
        "\n\nHuman: q\n\nAssistant: a\n\nAssistant: b",  # two assistant turns in a row
        "\n\nAssistant: only an assistant",
    ],
)
def test_malformed_dialogues(text):
    assert split_dialogue(text) is None


def row(chosen, rejected):
    return {"chosen": chosen, "rejected": rejected}


def test_parse_pair_ok_and_reasons():
    ok = parse_pair(row(dialogue("q", "good"), dialogue("q", "bad")), line=7)
    assert isinstance(ok, Pair) and ok.line == 7 and ok.chosen == "good" and ok.rejected == "bad"
    assert ok.messages() == [{"role": "user", "content": "q"}]
    assert parse_pair(row("junk", dialogue("q", "a")), 1) == "malformed_dialogue"
    assert parse_pair(row(dialogue("q1", "a"), dialogue("q2", "b")), 1) == "prompt_mismatch"
    assert parse_pair(row(dialogue("q", " "), dialogue("q", "b")), 1) == "empty_reply"
    assert parse_pair(row(dialogue("q", "same"), dialogue("q", "same")), 1) == "identical_replies"
    assert parse_pair(row(dialogue("q", "Human: hi"), dialogue("q", "b")), 1) == "role_marker_in_reply"


def test_shared_file_turn_shapes(hh_file):
    """The shared README's counts: 662 one-turn, 584 two-turn, 590 three-turn, 354 four-turn dialogues."""
    turns = Counter()
    reasons = Counter()
    for line, raw in read_rows(hh_file):
        pair = parse_pair(raw, line)
        if isinstance(pair, str):
            reasons[pair] += 1
        else:
            turns[sum(1 for role, _ in pair.prompt if role == "user")] += 1
    total = sum(turns.values()) + sum(reasons.values())
    assert total == 2312
    # Dropped rows are few; each turn count is within the dropped margin of the README's figure.
    dropped = sum(reasons.values())
    assert dropped < 100
    for n, expected in {1: 662, 2: 584, 3: 590, 4: 354}.items():
        assert expected - dropped <= turns[n] <= expected
    assert max(turns) >= 6


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_rows_jsonl_and_gzip(tmp_path):
    rows = [json.dumps(row(dialogue("q", "a"), dialogue("q", "b")))] * 2
    plain = write_jsonl(tmp_path / "x.jsonl", [rows[0], "", rows[1]])
    assert [n for n, _ in read_rows(plain)] == [1, 3]
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(rows) + "\n")
    assert len(list(read_rows(gz))) == 2


def test_read_rows_json_and_csv(tmp_path):
    data = [row(dialogue("q", "a"), dialogue("q", "b"))]
    (tmp_path / "a.json").write_text(json.dumps({"data": data}))
    assert list(read_rows(tmp_path / "a.json")) == [(1, data[0])]
    import csv

    with open(tmp_path / "a.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["chosen", "rejected"])
        writer.writeheader()
        writer.writerows(data)
    (line, got), = list(read_rows(tmp_path / "a.csv"))
    assert got == data[0] and line >= 2


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"chosen": "x", "rejected": ', "x.jsonl:2: not valid JSON"),
        ('{"chosen": "x"}', "x.jsonl:2: field 'rejected' is missing"),
        ('{"chosen": 3, "rejected": "y"}', "x.jsonl:2: field 'chosen' must be a string"),
        ("[1, 2]", "x.jsonl:2: expected an object"),
    ],
)
def test_read_rows_errors_name_file_line_field(tmp_path, bad, message):
    good = json.dumps(row("a", "b"))
    path = write_jsonl(tmp_path / "x.jsonl", [good, bad])
    with pytest.raises(DataFormatError, match=message.replace("[", r"\[")):
        list(read_rows(path))


def test_read_rows_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataFormatError, match="unsupported"):
        list(read_rows(tmp_path / "x.txt"))
    with pytest.raises(FileNotFoundError):
        list(read_rows(tmp_path / "missing.jsonl"))


def test_damaged_files_name_file_and_line(tmp_path):
    good = json.dumps(row("a", "b")).encode()
    (tmp_path / "latin1.jsonl").write_bytes(good + b"\n" + good + b"\n" + good.replace(b"a", b"\xe9") + b"\n")
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:3: not UTF-8 text"):
        list(read_rows(tmp_path / "latin1.jsonl"))
    (tmp_path / "latin1.csv").write_bytes(b"chosen,rejected\n\xe9,b\n")
    with pytest.raises(DataFormatError, match=r"latin1.csv:2: not UTF-8 text"):
        list(read_rows(tmp_path / "latin1.csv"))
    (tmp_path / "plain.jsonl.gz").write_bytes(good + b"\n")  # named .gz, not gzip
    with pytest.raises(DataFormatError, match=r"plain.jsonl.gz:1: damaged gzip file .*BadGzipFile"):
        list(read_rows(tmp_path / "plain.jsonl.gz"))
    whole = gzip.compress((good + b"\n") * 2000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    with pytest.raises(DataFormatError, match=r"cut.jsonl.gz:\d+: damaged gzip file .*EOFError"):
        list(read_rows(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataFormatError, match=r"folder.jsonl: is a directory"):
        list(read_rows(tmp_path / "folder.jsonl"))
