import pytest
from transformers import AutoModelForCausalLM, GPT2Config

from edgerlhf.config import load_config
from edgerlhf.memory import estimate
from edgerlhf.models import tiny_config
from edgerlhf.planner import MIB, ModelShape, activations_mib, kv_cache_mib, lora_params, weights_mib


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shape_counts_every_parameter(arch):
    config = tiny_config(arch, vocab_size=1000, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    shape = ModelShape.from_config(config)
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_distilgpt2_shape_offline():
    assert ModelShape.from_config(GPT2Config(n_layer=6)).params == 81_912_576  # distilgpt2's 82 M


def test_arithmetic_on_a_hand_computed_config():
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    shape = ModelShape.from_config(config)
    assert shape.block_linear_params == 2 * 12 * 64 * 64
    assert weights_mib(shape, "int4", "bf16") == pytest.approx(
        (2 * 12 * 64 * 64 * (0.5 + 0.127 / 8) + shape.other_params * 2) / MIB)
    assert lora_params(shape, 8) == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    # Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes per layer at 16-bit
    assert activations_mib(shape, 2, 16, "bf16", False) == pytest.approx(2 * 16 * 2 * 64 * (34 + 5 * 4 * 16 / 64) / MIB)
    assert kv_cache_mib(shape, 3, 10, "bf16") == pytest.approx(2 * 2 * 3 * 10 * 4 * 16 * 2 / MIB)


def test_stage_estimates_respond_to_the_settings():
    cfg = load_config("full")
    config = GPT2Config(n_layer=6)
    lora = estimate("sft", cfg, config)
    cfg.sft.strategy = "qlora"
    assert estimate("sft", cfg, config).breakdown["weights"] < lora.breakdown["weights"]
    cfg.sft.strategy = "full"
    assert estimate("sft", cfg, config).breakdown["trainable_state"] > 50 * lora.breakdown["trainable_state"]
    cfg.sft.gradient_checkpointing = True
    assert estimate("sft", cfg, config).breakdown["activations"] < lora.breakdown["activations"]
    reward = estimate("reward", cfg, config)
    cfg.reward.method = "probe"  # no gradients, no optimizer state: the frozen backbone's inference
    probe = estimate("reward", cfg, config)
    assert "trainable_state" not in probe.breakdown and probe.total_mib < reward.total_mib
    assert probe.breakdown["weights"] == reward.breakdown["weights"]
    ppo = estimate("ppo", cfg, config)
    assert "reward_model_weights" not in ppo.breakdown  # reward model on the CPU (research plan)
    cfg.ppo.reward_device = "cuda"
    assert estimate("ppo", cfg, config).total_mib > ppo.total_mib
    assert ppo.fits(8) and not ppo.fits(0.01) and ppo.fits(None)
    with pytest.raises(ValueError, match="unknown stage"):
        estimate("dpo", cfg, config)
