import pytest
from transformers import AutoModelForCausalLM, GPT2Config

from edgerlhf.core.config import load_config
from edgerlhf.core.planner import estimate
from edgerlhf.core.models import tiny_config
from edgerlhf.core.planner import MIB, ModelShape, activations_mib, kv_cache_mib, lora_params, weights_mib


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
    probe = estimate("reward", cfg, config)  # the default: no gradients, no optimizer state, the backbone's inference
    cfg.reward.method = "lora"
    reward = estimate("reward", cfg, config)
    assert "trainable_state" not in probe.breakdown and probe.total_mib < reward.total_mib
    assert probe.breakdown["weights"] == reward.breakdown["weights"]
    ppo = estimate("ppo", cfg, config)
    assert "reward_model_weights" not in ppo.breakdown  # reward model on the CPU (research plan)
    cfg.ppo.reward_device = "cuda"
    assert estimate("ppo", cfg, config).total_mib > ppo.total_mib
    assert ppo.fits(8) and not ppo.fits(0.01) and ppo.fits(None)
    with pytest.raises(ValueError, match="unknown stage"):
        estimate("dpo", cfg, config)


def smollm2_shape_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def test_the_micro_batch_is_the_largest_that_fits_and_the_effective_batch_is_kept():
    from edgerlhf.core.planner import fit_micro_batch, with_micro_batch

    cfg = load_config("full", overrides={"sft.per_device_train_batch_size": 8, "sft.gradient_accumulation_steps": 4})
    model = smollm2_shape_config()
    budget = 8 * 1024
    choice = fit_micro_batch("sft", cfg, model, "bf16", budget, headroom=0.25)
    b, accumulation = choice["micro_batch"], choice["accumulation"]
    assert choice["fits"] and b * accumulation == 32 and 32 % b == 0
    assert choice["estimate_mib"] <= 0.75 * budget == choice["target_mib"]
    if b < 32:  # the next divisor up would not have fitted
        larger = next(d for d in range(b + 1, 33) if 32 % d == 0)
        bigger = with_micro_batch(cfg, {**choice, "micro_batch": larger, "accumulation": 32 // larger})
        assert estimate("sft", bigger, model, "bf16").total_mib > choice["target_mib"]
    chosen = with_micro_batch(cfg, choice)
    assert (chosen.sft.per_device_train_batch_size, chosen.sft.gradient_accumulation_steps) == (b, accumulation)
    assert cfg.sft.per_device_train_batch_size == 8  # the original config is untouched
    # more memory, a larger micro-batch; none at all, the configured values stay and fits is False
    assert fit_micro_batch("sft", cfg, model, "bf16", 4 * budget)["micro_batch"] >= b
    none = fit_micro_batch("sft", cfg, model, "bf16", 10.0)
    assert not none["fits"] and (none["micro_batch"], none["accumulation"]) == (8, 4)
    with pytest.raises(ValueError, match="headroom"):
        fit_micro_batch("sft", cfg, model, "bf16", budget, headroom=1.0)
    with pytest.raises(ValueError, match="unknown stage"):
        fit_micro_batch("dpo", cfg, model, "bf16", budget)



def test_every_training_stage_keeps_its_effective_batch():
    from edgerlhf.core.planner import fit_micro_batch

    cfg = load_config("full")
    for stage, section, micro in (("reward", "reward", "per_device_train_batch_size"),
                                  ("ppo", "ppo", "micro_batch_size")):
        before = getattr(getattr(cfg, section), micro) * getattr(cfg, section).gradient_accumulation_steps
        choice = fit_micro_batch(stage, cfg, smollm2_shape_config(), "bf16", 8 * 1024)
        assert choice["fits"] and choice["micro_batch"] * choice["accumulation"] == before, stage
