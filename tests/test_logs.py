"""The edgerlhf loggers and progress bars (run.log_level)."""
import logging

import pytest
import torch

from edgerlhf.core.config import PPOStageConfig
from edgerlhf.core.logs import configure_logging, progress, tensorboard_writer, trainer_callbacks


def test_progress_bars_show_at_info_and_not_for_short_loops():
    try:
        configure_logging("INFO")
        assert not progress(range(10)).disable
        assert progress(range(3), min_total=8).disable  # scoring one small batch stays quiet
        configure_logging("WARNING")
        assert progress(range(10)).disable
        assert logging.getLogger("edgerlhf.core.ppo_trainer").getEffectiveLevel() == logging.WARNING
    finally:
        configure_logging("INFO")


def test_a_bad_log_level_is_refused_by_the_config():
    from edgerlhf.core.config import load_config

    with pytest.raises(ValueError, match="run.log_level='LOUD'"):
        load_config("tiny", overrides={"run.log_level": "LOUD"})


def scalar_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow  # SFT and PPO end to end
def test_report_to_tensorboard_writes_sft_and_ppo_curves(tiny_cfg, tiny_gpt2, tmp_path):
    from edgerlhf.core.models import load_causal_lm, load_tokenizer
    from edgerlhf.core.ppo_trainer import TRL_METRIC_NAMES, build_policy, train
    from edgerlhf.core.templates import ensure_pad_token
    from edgerlhf.sft_finetuning import run_sft

    assert trainer_callbacks("none", tmp_path, "x") == [] and tensorboard_writer("none", tmp_path, "x") is None
    with pytest.raises(ValueError, match="run.report_to='wandb'"):
        tensorboard_writer("wandb", tmp_path, "x")
    # SFT: the Trainer's own logs, through transformers' TensorBoardCallback
    results = run_sft(tiny_cfg(**{"run.report_to": "tensorboard", "sft.max_steps": 2, "sft.logging_steps": 1}))
    run_dir = tmp_path / "results" / "runs"
    (sft_board,) = list(run_dir.glob("*/tensorboard/sft"))
    assert "train/loss" in scalar_tags(sft_board) and results["global_step"] == 2
    # PPO: every step under TRL's metric names
    cfg = PPOStageConfig(steps=2, batch_size=2, micro_batch_size=1, ppo_epochs=1, max_new_tokens=3, lora_r=2,
                         lora_alpha=4)
    torch.manual_seed(0)
    policy, head = build_policy(load_causal_lm(tiny_gpt2).eval(), cfg)
    tok = load_tokenizer(tiny_gpt2)
    ensure_pad_token(tok)
    writer = tensorboard_writer("tensorboard", tmp_path, "ppo/bf16")
    history = train(policy, head, tok, [[5, 6, 7], [8, 9]], [[{"role": "user", "content": "q"}]] * 2,
                    lambda p, r: torch.ones(len(r)), cfg, tmp_path / "ck", seed=0, writer=writer)
    writer.close()
    tags = scalar_tags(tmp_path / "tensorboard" / "ppo" / "bf16")
    assert set(TRL_METRIC_NAMES.values()) <= set(tags)
    assert tags["objective/kl"] == pytest.approx([h["kl"] for h in history])


def test_library_warnings_go_to_the_stage_log_and_a_notebook_shows_only_edgerlhf_warnings(tmp_path):
    import subprocess
    import sys

    code = """import logging, sys, warnings
from edgerlhf.core.logs import configure_logging, log_to_file, quiet_libraries
quiet_libraries(notebook=True)
warnings.warn("old api", FutureWarning)
logging.getLogger("transformers.modeling_utils").warning("LOAD REPORT from x")
configure_logging("INFO")
logging.getLogger("edgerlhf.x").info("step 1")
log_to_file(sys.argv[1])
logging.getLogger("edgerlhf.x").warning("careful")
logging.getLogger("bitsandbytes.cpu").warning("no kernel")
"""
    log = tmp_path / "logs" / "sft.log"
    out = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "WARNING edgerlhf.x: careful"
    text = log.read_text()  # records from before the file was named are kept, in order
    assert [m in text for m in ("old api", "LOAD REPORT", "step 1", "careful", "no kernel")] == [True] * 5
    assert text.index("old api") < text.index("step 1") < text.index("careful")
