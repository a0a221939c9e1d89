"""A model of the user's own, end to end (issue 34, item 7): the tiny pipeline and its report on a local folder
that is not in the registry, of a second architecture (a tiny random Qwen2 with the SmolLM2 tokenizer)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch


@pytest.mark.slow
def test_tiny_pipeline_and_report_run_on_a_local_qwen2_folder(tmp_path):
    """The whole runner (five notebooks, then REPORT.md) on a non-registry folder; about 2.5 min on 2 CPUs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from edgerlhf.core.models import EMBEDDED_GGUF, REGISTRY, embedded_folder

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_folder()), gguf_file=EMBEDDED_GGUF)  # SmolLM2's
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=512, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    folder = tmp_path / "my-qwen2"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    assert str(folder) not in REGISTRY and tokenizer.chat_template
    parameters = sum(p.numel() for p in model.parameters())

    root = tmp_path / "project"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "edgerlhf.run", "--profile", "tiny", "--root", str(root),
                          "--set", f"model.name={folder}", "--no-progress"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    print(f"tiny pipeline on {folder.name}: {time.perf_counter() - start:.0f} s")
    assert run.returncode == 0, run.stderr[-4000:]

    (run_dir,) = (root / "results" / "runs").iterdir()
    records = {p.name: json.loads(p.read_text()) for p in (run_dir / "records").glob("*.json")}
    assert sorted(records) == ["data.json", "ppo.json", "reward.json", "setup.json", "sft.json"]
    assert {name: r["status"] for name, r in records.items()} == dict.fromkeys(records, "ok")
    assert records["setup.json"]["results"]["base_model"] == {
        "name": str(folder), "location": str(folder), "source": "local folder", "architecture": "qwen2",
        "dtype": "float32", "parameters": parameters}
    assert records["data.json"]["results"]["template"] == "native"  # the folder's own chat template was used
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "ok"

    report = (run_dir / "REPORT.md").read_text()
    for expected in (f"| base model | {folder} |", f"| base model source | local folder (`{folder}`) |",
                     "| base model architecture | qwen2 |", f"| base model parameters | {parameters:,} |",
                     "| base model dtype | float32 |"):
        assert expected in report, expected
    assert "Every link holds" in report  # the stages' records chain by sha256 (data -> SFT -> RMs -> PPO)
    for absent in ("not recorded", "Not shown", "**failed**"):
        assert absent not in report, absent
