import json

import pytest

from edgerlhf.core.config import load_config
from edgerlhf.data_preparation import (
    DataUnavailableError, check_no_leakage, collect, iter_source, prepare, resolve_source, split_by_prompt,
)
from edgerlhf.core.hh_rlhf import DataFormatError, Pair


def dialogue(*turns):
    roles = ["Human", "Assistant"]
    return "".join(f"\n\n{roles[i % 2]}: {t}" for i, t in enumerate(turns))


def test_collect_filters_dedups_and_measures(gpt2_tokenizer):
    rows = [
        (1, {"chosen": dialogue("q1", "yes"), "rejected": dialogue("q1", "no")}),
        (2, {"chosen": dialogue("q1", "again"), "rejected": dialogue("q1", "dup")}),  # duplicate prompt
        (3, {"chosen": dialogue("q2", "word " * 300), "rejected": dialogue("q2", "x")}),  # too long
        (4, {"chosen": dialogue("q3", "same"), "rejected": dialogue("q3", "same")}),
    ]
    got = collect(rows, gpt2_tokenizer, max_length=64)
    assert [p.line for p in got.pairs] == [1]
    assert got.dropped == {"duplicate_prompt": 1, "too_long": 1, "identical_replies": 1}
    assert got.rows_read == 4
    lengths = got.lengths[0]
    assert lengths["prompt"] > 0 and lengths["chosen"] >= 1


def test_split_is_by_prompt_and_seeded():
    train, test = split_by_prompt(100, n_train=60, n_test=20, seed=42)
    assert len(train) == 60 and len(test) == 20 and not set(train) & set(test)
    assert split_by_prompt(100, 60, 20, 42) == (train, test)
    assert split_by_prompt(100, 60, 20, 43) != (train, test)
    small_train, small_test = split_by_prompt(10, n_train=60, n_test=4, seed=0)
    assert len(small_test) == 4 and len(small_train) == 6  # test is filled first


def test_leakage_check_catches_a_shared_prompt():
    a = Pair(prompt=(("user", "q"),), chosen="a", rejected="b", line=1)
    b = Pair(prompt=(("user", "q"),), chosen="c", rejected="d", line=2)
    with pytest.raises(ValueError, match="both train and test"):
        check_no_leakage([a], [b])


def test_source_resolution_order(tmp_path, hh_file):
    cfg = load_config("tiny").data
    assert resolve_source(cfg)["location"] == str(hh_file)  # the local copy
    explicit = tmp_path / "mine.jsonl"
    explicit.write_text("")
    cfg.path = str(explicit)
    assert resolve_source(cfg)["location"] == str(explicit)
    cfg.path = str(tmp_path / "absent.jsonl")
    with pytest.raises(FileNotFoundError, match="data.path"):
        resolve_source(cfg)
    cfg.path, cfg.local_path = None, str(tmp_path / "no-copy.jsonl.gz")
    source = resolve_source(cfg)
    assert source["kind"] == "hub"
    with pytest.raises(DataUnavailableError, match="no local copy .* data.path"):
        next(iter_source(source, cfg))


def tiny_cfg(tmp_path, models_dir, **over):
    values = {"run.root": str(tmp_path), "model.models_dir": str(models_dir), **over}
    return load_config("tiny", overrides=values)


def test_prepare_writes_identical_files_twice(tmp_path, models_dir, hh_file):
    first = prepare(tiny_cfg(tmp_path, models_dir))
    data = tmp_path / "data" / "prefs"
    snapshot = {p.name: p.read_bytes() for p in data.iterdir()}
    assert set(snapshot) == {"train_prefs.jsonl", "test_prefs.jsonl", "data_card.json"}
    second = prepare(tiny_cfg(tmp_path, models_dir))
    assert {p.name: p.read_bytes() for p in data.iterdir()} == snapshot
    assert first["record"] != second["record"]  # two runs, two records
    card = json.loads(snapshot["data_card.json"])
    assert card["counts"] == {"train": 48, "test": 16}
    assert card["source_sha256"] == "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"
    assert sum(card["dropped"].values()) + card["kept"] == card["rows_read"] == 2312
    row = json.loads(snapshot["train_prefs.jsonl"].splitlines()[0])
    assert set(row) == {"prompt", "chosen", "rejected", "source_line"}
    assert row["prompt"][0]["role"] == "user" and row["prompt"][-1]["role"] == "user"
    assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
    train = [json.loads(x)["prompt"] for x in snapshot["train_prefs.jsonl"].splitlines()]
    test = [json.loads(x)["prompt"] for x in snapshot["test_prefs.jsonl"].splitlines()]
    assert not {json.dumps(p) for p in train} & {json.dumps(p) for p in test}


def test_prepare_reports_bad_input_and_keeps_old_files(tmp_path, models_dir):
    cfg = tiny_cfg(tmp_path, models_dir)
    prepare(cfg)
    before = (tmp_path / "data" / "prefs" / "train_prefs.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": dialogue("q", "a"), "rejected": dialogue("q", "b")}) + "\n{\"chosen\": 1}\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: field 'chosen' must be a string"):
        prepare(tiny_cfg(tmp_path, models_dir, **{"data.path": str(bad)}))
    assert (tmp_path / "data" / "prefs" / "train_prefs.jsonl").read_bytes() == before


@pytest.mark.parametrize("content, over", [
    ("", {}),  # empty
    ("\n  \n\n", {}),  # blank lines only
    (None, {}),  # 3 good rows, the tiny profile wants 16 for test
    (None, {"data.n_test": 3}),  # all 3 would be test, none left for training
])
def test_too_little_data_fails_before_writing(tmp_path, models_dir, content, over):
    cfg = tiny_cfg(tmp_path, models_dir)
    prepare(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data" / "prefs").iterdir()}
    small = tmp_path / "small.jsonl"
    rows = [json.dumps({"chosen": dialogue(f"q{i}", "a"), "rejected": dialogue(f"q{i}", "b")}) for i in range(3)]
    small.write_text(content if content is not None else "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"small.jsonl: \d+ row\(s\) read, \d+ usable pair\(s\).*existing data files "
                                         r"are kept"):
        prepare(tiny_cfg(tmp_path, models_dir, **{"data.path": str(small), **over}))
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "prefs").iterdir()} == before


def test_the_files_load_as_trl_conversational_preference_data(tmp_path, models_dir):
    from datasets import load_dataset
    from trl.data_utils import apply_chat_template, is_conversational

    from edgerlhf.core.models import load_tokenizer, prepare_base_model
    from edgerlhf.core.prefs import read_prefs

    prepare(tiny_cfg(tmp_path, models_dir))
    path = tmp_path / "data" / "prefs" / "train_prefs.jsonl"
    example = load_dataset("json", data_files=str(path), split="train")[0]
    assert is_conversational(example)
    tokenizer = load_tokenizer(prepare_base_model("tiny-llama", models_dir))
    rendered = apply_chat_template({k: example[k] for k in ("prompt", "chosen", "rejected")}, tokenizer)
    ours = read_prefs(path)[0]
    assert ours["chosen"] in rendered["chosen"] and ours["rejected"] in rendered["rejected"]
    assert ours["chosen"] == example["chosen"][0]["content"]


def test_reply_fields_must_be_one_assistant_message_or_a_text(tmp_path):
    from edgerlhf.core.hh_rlhf import DataFormatError
    from edgerlhf.core.prefs import read_prefs

    prompt = [{"role": "user", "content": "q"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]})
                    + "\n")
    assert [(r["chosen"], r["rejected"]) for r in read_prefs(path)] == [("a", "b")]
    path.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"})
                    + "\n")
    with pytest.raises(DataFormatError, match=r"p.jsonl:1: field 'chosen' must be one assistant message"):
        read_prefs(path)
