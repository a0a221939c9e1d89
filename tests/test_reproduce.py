"""The reproducibility check on synthetic run folders written by the real record functions."""
import json

import pytest
from synthetic_run import stage_results, write_synthetic_run

from edgerlhf.report import latest_records
from edgerlhf.reproduce import compare_runs, compare_values, hardware_note, is_volatile, main


def two_runs(tmp_path, change=None, device="cpu"):
    """Two run folders in different roots; ``change(results)`` edits run B's results before writing."""
    runs = []
    for side in ("a", "b"):
        root = tmp_path / side
        results = stage_results(root)
        if side == "b" and change:
            change(results)
        run_dir = write_synthetic_run(root, results)
        if device != "cpu":
            for path in (run_dir / "records").glob("*.json"):
                record = json.loads(path.read_text())
                record["hardware"]["device"] = device
                path.write_text(json.dumps(record))
        runs.append(run_dir)
    return runs


def test_identical_runs_in_different_folders_reproduce(tmp_path, capsys):
    a, b = two_runs(tmp_path)
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp.json")]) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and " 0 OUT" in out
    assert json.loads((tmp_path / "cmp.json").read_text())["reproduced"] is True


def test_runs_on_different_processors_are_named_but_compared_as_usual(tmp_path, capsys):
    a, b = two_runs(tmp_path)
    assert hardware_note(latest_records(a), latest_records(b)) is None
    for path in (b / "records").glob("*.json"):
        record = json.loads(path.read_text())
        record["hardware"]["cpu"] = "Other CPU 9000"
        path.write_text(json.dumps(record))
    note = hardware_note(latest_records(a), latest_records(b))
    assert note is not None and "'Other CPU 9000'" in note and "bf16" not in note
    assert main([str(a), str(b)]) == 0
    assert note in capsys.readouterr().out
    for run, native in ((a, False), (b, True)):  # only run B's reward models ran in bf16
        for path in (run / "records").glob("*.json"):
            record = json.loads(path.read_text())
            record["hardware"].update(device="cpu", cpu_bf16_native=native)
            record["config"]["run"]["cpu_bf16"] = True
            path.write_text(json.dumps(record))
    assert "float32 in run A and bf16 in run B" in hardware_note(latest_records(a), latest_records(b))


def test_a_metric_beyond_tolerance_fails_and_is_named(tmp_path, capsys):
    a, b = two_runs(tmp_path, lambda r: r["reward"]["models"]["int8"].update(auc_roc=r["reward"]["models"]["int8"]["auc_roc"] + 1e-4))
    assert main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "reward.models.int8.auc_roc" in out and "NOT reproduced (1 out of tolerance)" in out


def test_a_metric_within_tolerance_passes(tmp_path):
    a, b = two_runs(tmp_path, lambda r: r["reward"]["models"]["int8"].update(
        auc_roc=r["reward"]["models"]["int8"]["auc_roc"] * (1 + 1e-7)))
    diffs = {d.key: d for d in compare_runs(a, b)}
    assert diffs["reward.models.int8.auc_roc"].status == "within"
    assert not any(d.failed for d in diffs.values())


def test_times_and_memory_are_not_compared(tmp_path):
    def change(r):
        r["ppo"]["experiments"]["bf16"]["wall_time_s"] = 99.0
        r["ppo"]["experiments"]["bf16"]["peak_memory"]["cpu_peak_rss_mib"] = 1.0
        r["sft"]["tokens_per_second"] = 1.0
    a, b = two_runs(tmp_path, change)
    assert not any(d.failed for d in compare_runs(a, b))
    assert is_volatile("ppo.history[3].time_generation_s") and not is_volatile("sft.perplexity_after")


def test_text_must_match_on_cpu_but_is_only_shown_on_gpu(tmp_path):
    def change(r):
        r["sft"]["samples"][0]["after"] = "Hi there!"
    cpu = {d.key: d for d in compare_runs(*two_runs(tmp_path / "cpu", change))}
    assert cpu["sft.samples[0].after"].status == "OUT"
    gpu = {d.key: d for d in compare_runs(*two_runs(tmp_path / "gpu", change, device="cuda:0"))}
    assert gpu["sft.samples[0].after"].status == "info" and not any(d.failed for d in gpu.values())


def test_gpu_tolerances_are_per_metric():
    assert compare_values("reward.models.bf16.accuracy", 0.75, 0.78, on_gpu=True).status == "within"
    assert compare_values("reward.models.bf16.accuracy", 0.75, 0.85, on_gpu=True).status == "OUT"
    assert compare_values("reward.models.bf16.accuracy", 0.75, 0.78, on_gpu=False).status == "OUT"
    assert compare_values("sft.perplexity_after", 15.0, 15.2, on_gpu=True).status == "within"


def test_data_files_must_be_byte_identical(tmp_path):
    a, b = two_runs(tmp_path, lambda r: r["data"]["files"].update({"train_prefs.jsonl": "0" * 64}))
    failed = [d.key for d in compare_runs(a, b) if d.failed]
    assert "data file train_prefs.jsonl" in failed


def test_a_data_file_changed_on_disk_fails(tmp_path):
    a, b = two_runs(tmp_path)
    (tmp_path / "b" / "data" / "test_prefs.jsonl").write_text('{"id": 3}\n')
    failed = [d.key for d in compare_runs(a, b) if d.failed]
    assert failed == ["data file test_prefs.jsonl on disk (b)"]


def test_a_missing_key_fails(tmp_path):
    a, b = two_runs(tmp_path, lambda r: r["sft"].pop("perplexity_after"))
    assert [d.key for d in compare_runs(a, b) if d.failed] == ["sft.perplexity_after"]


def test_usage_and_missing_records(tmp_path, capsys):
    assert main([]) == 2
    a, _ = two_runs(tmp_path)
    (tmp_path / "c").mkdir()
    assert main([str(a), str(tmp_path / "c")]) == 2
    assert "setup.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--profile", "nope"])
