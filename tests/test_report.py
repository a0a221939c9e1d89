"""The report builder on a synthetic run folder written by the real record functions."""
import json

import pytest
from synthetic_run import stage_results, write_synthetic_run

from edgerlhf.core.records import make_record, write_record
from edgerlhf.report import STAGES, MissingRecordError, build_report, main

SECTIONS = ["## Hardware and software", "## Wall time", "## Data", "## Supervised fine-tuning", "## Reward models",
            "## PPO alignment", "## Provenance", "## Memory against the 8 GiB budget"]


def test_report_has_every_section_filled_from_the_records(tmp_path):
    results = stage_results(tmp_path)
    results["setup"]["base_model"].update(location="models/base/tiny-gpt2", source="registry", architecture="gpt2",
                                          dtype="float32")
    run_dir = write_synthetic_run(tmp_path, results)
    (run_dir / "manifest.json").write_text(json.dumps({"git_commit": "abc123", "notebooks": [
        {"notebook": "00_Setup.ipynb", "seconds": 5.0}]}))
    text = build_report(run_dir).read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    # numbers that exist only in the records
    for expected in ("| malformed_dialogue | 4 |", "900.00 → 850.00", "| bf16 | trained | float32 | 0.750 [",
                     "+0.200 [", "-0.200 [", "| judge-tfidf change [95% CI] |", "implicit reward: share [95% CI]",
                     "every judge", "- bf16: implicit reward (no judge)", "### Judge candidates",
                     "| agrees with judge (phi) |", "(phi 0.50)", "**What can be concluded:**", "- bf16: ", "abc123",
                     "| base model | tiny-gpt2 |", "| base model parameters | 1,234 |",
                     "| base model architecture | gpt2 |", "| base model dtype | float32 |",
                     "| base model source | registry (`models/base/tiny-gpt2`) |", "Mix, knead, bake.",
                     "| sft | cpu | 900 |", "| shorter wins | baseline |", "0.75 [0.30, 0.95]",
                     "### Cross-fitted evaluation", "**What can be concluded (cross-fitted):**",
                     "- int8-ptq - bf16: ", "Holm-adjusted p = ", "| phi vs bf16 | phi vs int8 |",
                     "Every link holds", "### Best-of-n", "| judge gain at k = 4 [95% CI] | judge fit |",
                     "Between precisions at k = 4 under judge", "after Holm's correction over 1 comparisons", "### PPO",
                     "| judge: arm − placebo [95% CI] |",
                     "**The answer at this scale.** How does the reward model's precision change alignment?",
                     "PPO (2 steps, 1 seed), judge score net of the placebo arm: bf16 ", "cannot be ruled out",
                     "net of the placebo (paired bootstrap over prompts), Holm over 2 arms",
                     "| placebo | none: random rewards (bf16 scores) |",
                     "int8 vs bf16 after PPO, same prompts (paired bootstrap over prompts), Holm over 1 precisions",
                     "| reward models built on this SFT model | `5f5f5f5f5f5f` | `5f5f5f5f5f5f` | yes |"):
        assert expected in text, expected
    assert "not recorded" not in text and "Not shown" not in text
    for figure in ("sft_loss", "rm_accuracy", "rm_reliability", "rm_margins", "ppo_curves", "ppo_overopt", "best_of_n",
                   "memory"):
        assert f"(report_figures/{figure}.png)" in text
        assert (run_dir / "report_figures" / f"{figure}.png").stat().st_size > 1000


def test_a_broken_chain_of_inputs_is_reported(tmp_path):
    run_dir = write_synthetic_run(tmp_path)
    sft = json.loads((run_dir / "records" / "sft.json").read_text())
    sft["data"]["train_sha256"] = "0" * 64  # an SFT model trained on other data than this run's stage 1 wrote
    (run_dir / "records" / "sft.2.json").write_text(json.dumps(sft))
    text = build_report(run_dir).read_text()
    assert "**Inconsistent**, these links do not hold: SFT trained on stage 1's training file." in text
    assert "| SFT trained on stage 1's training file |" in text and "| `000000000000` | **no** |" in text


def test_a_rerun_stage_record_wins(tmp_path):
    run_dir = write_synthetic_run(tmp_path)
    again = json.loads((run_dir / "records" / "sft.json").read_text())
    again["results"]["perplexity_after"] = 700.0
    (run_dir / "records" / "sft.2.json").write_text(json.dumps(again))
    assert "900.00 → 700.00" in build_report(run_dir).read_text()


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_missing_stage_record_is_named(tmp_path, stage, capsys):
    run_dir = write_synthetic_run(tmp_path, skip=(stage,))
    with pytest.raises(MissingRecordError, match=rf"records/{stage}\.json.*{STAGES[stage]}\.ipynb"):
        build_report(run_dir)
    assert not (run_dir / "REPORT.md").exists()
    assert main([str(run_dir)]) == 1
    assert f"edgerlhf.report: building the report of {run_dir}: " in (err := capsys.readouterr().err)
    assert f"{stage}.json" in err


def test_a_base_model_without_parameters_is_reported_as_not_recorded(tmp_path):
    """A setup record written for a non-registry folder before it recorded parameters (issue 34, item 6)."""
    results = stage_results(tmp_path)
    results["setup"]["base_model"] = {"name": "/home/me/my-qwen", "location": "/home/me/my-qwen",
                                      "source": "/home/me/my-qwen"}
    text = build_report(write_synthetic_run(tmp_path, results)).read_text()
    for expected in ("| base model | /home/me/my-qwen |", "| base model parameters | not recorded |",
                     "| base model architecture | not recorded |", "| base model dtype | not recorded |",
                     "900.00 → 850.00"):
        assert expected in text, expected


def test_a_field_a_section_needs_is_named_when_missing(tmp_path):
    results = stage_results(tmp_path)
    del results["data"]["source"]
    text = build_report(write_synthetic_run(tmp_path, results)).read_text()
    assert "## Data\n\nNot shown: `records/data.json` does not record `results.source`" in text
    assert "900.00 → 850.00" in text  # the other sections are whole


def test_a_failed_newest_data_record_is_reported_as_failed(tmp_path, capsys):
    """A data-stage re-run that failed after a finished run (issue 34, item 5) made the report crash with
    KeyError: 'source'."""
    run_dir = write_synthetic_run(tmp_path)
    failed = make_record("data", run_dir, {"profile": "tiny"}, {"error": "ValueError: bad.jsonl: line 3: not JSON",
                                                                 "step": "read", "traceback": []}, status="failed")
    assert write_record(failed, run_dir).name == "data.2.json"
    assert main([str(run_dir)]) == 0, capsys.readouterr().err
    text = (run_dir / "REPORT.md").read_text()
    data = text[text.index("## Data"):text.index("## Supervised fine-tuning")]
    for expected in ("**failed**", "`records/data.2.json`", "step `read`", "ValueError: bad.jsonl: line 3: not JSON",
                     "Earlier records of this stage in this run: `data.json`."):
        assert expected in data, expected
    assert "hh.jsonl.gz" not in data  # the failed record's results are not mixed with the earlier record's
    assert "900.00 → 850.00" in text and "| 01_Data_Preparation | " in text


def test_the_ppo_table_says_how_its_columns_use_two_seeds(tmp_path):
    results = stage_results(tmp_path)
    for arm in results["ppo"]["experiments"].values():
        arm.update(seed=42, after_by_seed=[arm["after"], arm["after"]])
    text = build_report(write_synthetic_run(tmp_path, results)).read_text()
    assert ("Each arm ran 2 seeds under common random numbers: the arm − placebo columns pool prompts and seeds, with "
            "the t interval across the 2 seeds' mean differences (for the length-controlled difference, across the seeds' "
            "intercepts; 1 degree of freedom)") in text
    assert "the first seed's run (seed 42), and the time is the sum over seeds." in text
    one = build_report(write_synthetic_run(tmp_path / "one", stage_results(tmp_path / "one"))).read_text()
    assert "Each arm ran" not in one
