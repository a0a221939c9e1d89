"""Stage 4's RLOO, GRPO and DPO arms through TRL (edgerlhf.core.trl_arms): the reward-function adapter, the mapping
of the ``ppo`` section onto TRL's configs, the arms' names, and the stage end to end on the tiny profile (slow)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgerlhf.core import trl_arms
from edgerlhf.core.arms import PLACEBO, arm_names, parse_arm
from edgerlhf.core.config import load_config


def test_the_reward_function_gives_the_scores_of_score(tiny_llama_scorer):
    from edgerlhf.core.reward_scoring import score
    from edgerlhf.ppo_alignment import reward_scorer

    rm, tok = tiny_llama_scorer
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score.weight)
    p = load_config("tiny").ppo
    prompts = [[{"role": "user", "content": "hi " * (i + 1)}] for i in range(3)]
    replies = ["yes", "no way", "ok then"]
    expected = score(rm, tok, prompts, replies, p.score_batch_size, 128)
    reward = trl_arms.reward_function(reward_scorer(rm, tok, p, 128, gain=2.0, bias=-1.0), "proxy")
    # TRL passes conversational completions as one assistant message each; plain strings are accepted too
    got = reward(prompts, [[{"role": "assistant", "content": r}] for r in replies], completion_ids=None)
    assert reward.__name__ == "proxy" and isinstance(got, list) and len(got) == 3
    assert got == pytest.approx((2.0 * expected - 1.0).tolist(), abs=1e-6)
    assert reward(prompts, replies) == got
    nan = trl_arms.reward_function(lambda prompts, replies: torch.tensor([0.0, math.nan, 1.0]), "broken")
    with pytest.raises(ValueError, match="broken: non-finite reward for 1 of 3"):
        nan(prompts, replies)


def test_the_ppo_section_maps_onto_trls_configs(tmp_path):
    from trl import DPOConfig, GRPOConfig, RLOOConfig

    cfg = load_config("quick")
    p = cfg.ppo
    device = torch.device("cpu")
    for algorithm, config in (("rloo", RLOOConfig), ("grpo", GRPOConfig)):
        args = config(**trl_arms.trl_arguments(algorithm, p, 43, tmp_path, device, cfg.reward.max_length))
        # each step samples batch_size completions, as PPO's rollout does: batch_size / num_generations prompts
        assert args.generation_batch_size == p.batch_size and args.num_generations == p.num_generations
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == p.batch_size
        assert args.steps_per_generation == args.gradient_accumulation_steps and args.num_iterations == 1
        assert (args.max_steps, args.learning_rate, args.seed) == (p.steps, p.learning_rate, 43)
        assert args.lr_scheduler_type == "constant"  # PPO's learning rate does not decay
        assert (args.beta, args.epsilon) == (p.init_kl_coef, p.cliprange)
        assert (args.max_completion_length, args.temperature, args.top_p) == (p.max_new_tokens, p.temperature,
                                                                             p.top_p)
        assert args.max_grad_norm == p.max_grad_norm and args.report_to == [] and args.save_strategy == "no"
    dpo = DPOConfig(**trl_arms.trl_arguments("dpo", p, 42, tmp_path, device, cfg.reward.max_length))
    assert (dpo.beta, dpo.max_length, dpo.max_steps) == (p.dpo_beta, cfg.reward.max_length, p.steps)
    assert dpo.per_device_train_batch_size * dpo.gradient_accumulation_steps == p.batch_size
    assert dpo.per_device_train_batch_size == p.micro_batch_size // 2  # pairs: micro_batch_size sequences per pass
    with pytest.raises(ValueError, match="no TRL trainer for algorithm 'ppo'"):
        trl_arms.trl_arguments("ppo", p, 42, tmp_path, device, 384)
    with pytest.raises(ValueError, match="ppo.batch_size=8 must be a multiple of ppo.num_generations=3"):
        load_config("quick", overrides={"ppo.num_generations": 3})  # the quick profile runs RLOO and GRPO
    odd = load_config("quick", overrides={"ppo.num_generations": 3, "ppo.algorithms": ["ppo"]}).ppo
    with pytest.raises(ValueError, match="ppo.batch_size=8 must be a multiple of ppo.num_generations=3"):
        trl_arms.trl_arguments("grpo", odd, 42, tmp_path, device, 384)


def test_arm_names_and_their_algorithms():
    p = load_config("tiny", overrides={"ppo.experiments": ["bf16", "int4"], "ppo.trl_experiments": ["bf16", "int8"],
                                       "ppo.algorithms": ["grpo", "dpo", "ppo", "rloo"]}).ppo
    names = arm_names(p)
    assert names == ["bf16", "int4", "rloo-bf16", "rloo-int8", "grpo-bf16", "grpo-int8", "dpo", PLACEBO]
    assert [parse_arm(n) for n in names] == [("ppo", "bf16"), ("ppo", "int4"), ("rloo", "bf16"), ("rloo", "int8"),
                                             ("grpo", "bf16"), ("grpo", "int8"), ("dpo", None), ("ppo", None)]
    no_ppo = load_config("tiny", overrides={"ppo.algorithms": ["dpo"], "ppo.placebo": False}).ppo
    assert arm_names(no_ppo) == ["dpo"]


@pytest.mark.parametrize("over, message", [
    ({"ppo.algorithms": ["ppo", "a2c"]}, r"ppo.algorithms=\['ppo', 'a2c'\] must be a non-empty list of distinct"),
    ({"ppo.algorithms": ["grpo", "grpo"]}, "must be a non-empty list of distinct"),
    ({"ppo.algorithms": []}, "must be a non-empty list of distinct"),
    ({"ppo.trl_experiments": ["fp8"]}, r"ppo.trl_experiments=\['fp8'\] must be a non-empty list within"),
    ({"ppo.algorithms": ["rloo"], "ppo.num_generations": 3}, "multiple of ppo.num_generations=3"),
    ({"ppo.algorithms": ["dpo"], "ppo.micro_batch_size": 3}, "multiple of ppo.micro_batch_size=3 for the dpo arms"),
    ({"ppo.num_generations": 1}, "ppo.num_generations=1"),
    ({"ppo.dpo_beta": 0.0}, "ppo.dpo_beta=0.0"),
])
def test_bad_algorithm_settings_are_refused_naming_the_field(over, message):
    with pytest.raises(ValueError, match=message):
        load_config("quick", overrides=over)


@pytest.mark.slow  # stages 3 and 4 on the tiny profile
def test_stage4_runs_rloo_grpo_and_dpo_arms_beside_ppo(tmp_path, tiny_cfg, tiny_sft):
    from edgerlhf.ppo_alignment import run_alignment
    from edgerlhf.reward_modeling import run_reward

    sets = {"sft.output_dir": str(tiny_sft), "reward.method": "probe", "reward.precisions": ["bf16"]}
    run_reward(tiny_cfg(**sets))
    cfg = tiny_cfg(**sets, **{"ppo.experiments": ["bf16"], "ppo.seeds": [42, 43], "ppo.trl_experiments": ["bf16"],
                              "ppo.algorithms": ["ppo", "rloo", "grpo", "dpo"], "ppo.num_generations": 2})
    results = run_alignment(cfg)
    arms = ["bf16", "rloo-bf16", "grpo-bf16", "dpo", PLACEBO]
    assert list(results["experiments"]) == arms
    assert [row["algorithm"] for row in results["table"]] == ["ppo", "rloo", "grpo", "dpo", "ppo"]
    for arm in arms:
        e = results["experiments"][arm]
        assert e["algorithm"] == parse_arm(arm)[0] and len(e["after_by_seed"]) == 2
        assert [h["step"] for h in e["history"]] == list(range(1, cfg.ppo.steps + 1))
        assert all(math.isfinite(h["loss" if e["algorithm"] != "ppo" else "pg_loss"]) for h in e["history"])
        assert len(e["after"]["replies"]) == results["n_eval_prompts"] and math.isfinite(e["after"]["kl_mean"])
        assert e["implicit_reward"]["n"] == cfg.ppo.n_implicit_reward_pairs
        info = json.loads((tmp_path / "models" / "ppo" / arm / "ppo_info.json").read_text())
        assert info["algorithm"] == e["algorithm"]
        assert (tmp_path / "models" / "ppo" / arm / "adapter" / "adapter_model.safetensors").exists()
    assert results["experiments"]["dpo"]["reward_model"] is None and "labelled pairs" in results["table"][3]["proxy"]
    assert results["experiments"]["rloo-bf16"]["reward_model"].endswith("bf16")
    for arm in ("rloo-bf16", "grpo-bf16", "dpo"):  # trained: LoRA's B matrices start at zero
        adapter = load_file(tmp_path / "models" / "ppo" / arm / "adapter" / "adapter_model.safetensors")
        assert any(t.abs().max() > 0 for n, t in adapter.items() if "lora_B" in n)
    assert set(results["net_of_placebo"]) == set(arms) - {PLACEBO}
    assert any("every arm (PPO unless named)" in part for part in results["answer"].split(";"))
    assert not list((tmp_path / "models" / "ppo" / "checkpoints").glob("*"))
    assert Path(results["figures"]["algorithms"]).exists()
    # the report's PPO section lists every arm and says how the other algorithms are read
    from edgerlhf.report import section_ppo

    record = json.loads(Path(results["record"]).read_text())
    text = section_ppo({"ppo": record}, tmp_path / "figures")
    assert "Arms other than PPO (dpo, grpo, rloo) train the same policy LoRA" in text
    assert all(f"| {arm} |" in text for arm in arms)


def test_trls_step_statistics_take_ppos_names_where_the_quantity_is_the_same():
    logged = [{"step": 1, "loss": 0.1, "reward": -0.3, "completions/mean_length": 12.0, "step_time": 0.4,
               "kl": 0.01}, {"train_runtime": 9.0, "step": 1}]
    history = trl_arms._history(logged, beta=0.1)
    assert history == [{"step": 1, "beta": 0.1, "loss": 0.1, "score": -0.3, "response_length": 12.0,
                        "time_step_s": 0.4, "kl": 0.01}]  # time_step_s: a timing, which reproduce skips
