"""The report builder on a synthetic run folder written by the real record functions."""
import json

import pytest
from synthetic_run import write_synthetic_run

from edgerlhf.report import STAGES, MissingRecordError, build_report, main

SECTIONS = ["## Hardware and software", "## Wall time", "## Data", "## Supervised fine-tuning", "## Reward models",
            "## PPO alignment", "## Memory against the 8 GiB budget"]


def test_report_has_every_section_filled_from_the_records(tmp_path):
    run_dir = write_synthetic_run(tmp_path)
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
                     "tiny-gpt2 (1,234 parameters)", "Mix, knead, bake.", "| sft | cpu | 900 |",
                     "| shorter wins | baseline |", "0.75 [0.30, 0.95]",
                     "### Cross-fitted evaluation", "**What can be concluded (cross-fitted):**",
                     "- int8-ptq - bf16: ", "Holm-adjusted p = ", "| phi vs bf16 | phi vs int8 |"):
        assert expected in text, expected
    for figure in ("sft_loss", "rm_accuracy", "rm_reliability", "rm_margins", "ppo_curves", "ppo_overopt", "memory"):
        assert f"(report_figures/{figure}.png)" in text
        assert (run_dir / "report_figures" / f"{figure}.png").stat().st_size > 1000


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
    assert f"{stage}.json" in capsys.readouterr().err
