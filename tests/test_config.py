import json

import pytest

from edgerlhf.core.config import PROFILES, Config, load_config, parse_cli_sets, read_config_file, save_config


def test_defaults_are_the_research_plan():
    cfg = load_config("full")
    assert cfg.model.name == "distilgpt2"
    assert (cfg.data.n_train, cfg.data.n_test) == (5000, 1000)
    assert (cfg.sft.lora_r, cfg.sft.lora_alpha, cfg.sft.lora_dropout) == (16, 32, 0.05)
    assert (cfg.reward.per_device_train_batch_size, cfg.reward.learning_rate) == (4, 2e-4)
    assert (cfg.ppo.batch_size, cfg.ppo.learning_rate, cfg.ppo.init_kl_coef) == (32, 1.41e-5, 0.1)
    assert cfg.run.seed == 42


def test_every_field_has_help():
    import dataclasses

    for section in dataclasses.fields(Config):
        if section.name == "profile":
            continue
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"


def test_profiles_apply_and_layers_override_in_order(tmp_path):
    cfg = load_config("quick")
    assert cfg.model.name == PROFILES["quick"]["model.name"]
    assert cfg.data.n_train == PROFILES["quick"]["data.n_train"]
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  n_train: 7\n  n_test: 3\n")
    cfg = load_config("quick", path, overrides={"data.n_train": 9, "data.n_test": None}, cli={"data.n_train": 11})
    assert cfg.data.n_train == 11  # CLI beats parameter beats file beats profile
    assert cfg.data.n_test == 3  # None parameter keeps the file's value
    assert cfg.model.name == "smollm2-135m-instruct"


def test_file_profile_used_when_none_given(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"profile": "tiny", "ppo": {"steps": 3}}))
    cfg = load_config(None, path)
    assert cfg.profile == "tiny" and cfg.ppo.steps == 3 and cfg.model.name == "tiny-gpt2"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    cfg = load_config("tiny", overrides={"sft.target_modules": ["c_attn"], "run.vram_budget_gib": 6})
    path = save_config(cfg, tmp_path / f"cfg{suffix}")
    again = load_config(None, path)
    assert again == cfg
    assert isinstance(again.run.vram_budget_gib, float)


def test_unknown_keys_and_bad_types_fail_clearly(tmp_path):
    with pytest.raises(KeyError, match="unknown config field 'data.n_trian'"):
        load_config("tiny", overrides={"data.n_trian": 3})
    with pytest.raises(KeyError, match="unknown config section"):
        load_config("tiny", overrides={"nope.x": 3})
    with pytest.raises(TypeError, match="field 'data.n_train' expects"):
        load_config("tiny", cli={"data.n_train": "many"})
    with pytest.raises(KeyError, match="unknown profile"):
        load_config("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        read_config_file(bad)
    with pytest.raises(TypeError, match="config file"):
        (tmp_path / "t.yaml").write_text("data:\n  n_train: lots\n")
        load_config("tiny", tmp_path / "t.yaml")


def test_cli_sets_are_typed():
    assert parse_cli_sets(["data.n_train=100", "data.path=null", "reward.precisions=[bf16, int4]", "x=a=b"]) == {
        "data.n_train": 100, "data.path": None, "reward.precisions": ["bf16", "int4"], "x": "a=b",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_cli_sets(["novalue"])


def test_float_written_without_a_dot_is_a_float():
    # YAML 1.1 reads `1e-4` as a string; a float field takes it as the number it is
    cfg = load_config("tiny", cli=parse_cli_sets(["sft.learning_rate=1e-4", "ppo.init_kl_coef=5E-2"]))
    assert cfg.sft.learning_rate == 1e-4 and cfg.ppo.init_kl_coef == 0.05
    with pytest.raises(TypeError, match="sft.learning_rate"):
        load_config("tiny", cli=parse_cli_sets(["sft.learning_rate=fast"]))


@pytest.mark.parametrize("item, message", [
    ("data.n_test=-4", r"data.n_test=-4 \(command-line flag\) must be >= 1"),
    ("sft.per_device_train_batch_size=-2", r"sft.per_device_train_batch_size=-2 .* must be >= 1"),
    ("ppo.gamma=1.5", r"ppo.gamma=1.5 .* must be in \[0.0, 1.0\]"),
    ("reward.learning_rate=0", r"reward.learning_rate=0.0 .* must be > 0.0"),
    ("reward.method=dpo", r"reward.method='dpo' .* must be one of \['lora', 'probe'\]"),
    ("ppo.experiments=[bf16, fp8]", r"ppo.experiments=.* within"),
    ("reward.seeds=[]", r"reward.seeds=\[\] must be a non-empty list of int"),
    ("sft.max_steps=0", r"sft.max_steps=0 must be -1"),
    ("ppo.max_new_tokens=200", r"ppo.max_prompt_length \+ ppo.max_new_tokens = 128 \+ 200 must be <= "
                                r"reward.max_length=256"),
])
def test_out_of_range_values_fail_before_anything_runs(item, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", cli=parse_cli_sets([item]))


def test_every_profile_is_valid():
    for name in PROFILES:
        load_config(name)


def test_one_default_profile_and_the_field_listing(capsys):
    import dataclasses

    from edgerlhf.core.config import DEFAULT_PROFILE, field_help, main
    from edgerlhf.core.stage import cli_config

    assert DEFAULT_PROFILE == "quick" and load_config().profile == DEFAULT_PROFILE
    assert cli_config("a stage", []).profile == DEFAULT_PROFILE  # python -m edgerlhf.<stage> with no flags
    listing = field_help("quick").splitlines()
    entries = [line for line in listing if not line.startswith(" ")]
    sections = [s for s in dataclasses.fields(Config) if s.name != "profile"]
    n_fields = sum(len(dataclasses.fields(s.default_factory())) for s in sections)
    assert len(entries) == n_fields and len(listing) == 2 * n_fields  # every field, each with its help line
    assert "reward.probe_pooling = 'last+mean'  (str)" in entries
    assert "data.n_train = 1632  (int)  [quick]" in entries and "data.n_train = 5000  (int)" in field_help()
    assert main(["--profile", "tiny"]) == 0 and "model.name = 'tiny-gpt2'  (str)  [tiny]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "dataclass defaults -> profile" in capsys.readouterr().out


def test_the_runner_checks_its_config_before_making_a_run_folder(tmp_path, capsys):
    from edgerlhf.run import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("reward:\n  probe_pooling: max\n")
    assert main(["--config", str(bad), "--root", str(tmp_path), "--no-progress"]) == 1
    assert "reward.probe_pooling='max'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml"), "--root", str(tmp_path), "--no-progress"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "results" / "runs").exists()  # nothing was written


@pytest.mark.slow  # several subprocesses
def test_the_console_script_dispatches_to_every_entry_point():
    import subprocess
    import sys
    from pathlib import Path

    from edgerlhf.cli import COMMANDS

    script = Path(sys.executable).parent / "edgerlhf"
    assert script.exists(), f"{script} missing: `pip install -e .` (scripts/setup.sh) installs the console script"
    listing = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert listing.returncode == 0 and all(f"  {name} " in listing.stdout for name in COMMANDS)
    fields = subprocess.run([str(script), "config", "--profile", "tiny"], capture_output=True, text=True)
    assert fields.returncode == 0 and "model.name = 'tiny-gpt2'  (str)  [tiny]" in fields.stdout
    for name in ("run", "sft", "ppo"):
        helped = subprocess.run([str(script), name, "--help"], capture_output=True, text=True)
        assert helped.returncode == 0 and "--set KEY=VALUE" in helped.stdout, name
    unknown = subprocess.run([str(script), "train"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'train'" in unknown.stderr


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_fields_named_like_trls_hold_what_trls_trainer_gets(stage, tiny_gpt2, tmp_path):
    """An EdgeRLHF field that shares its name with a field of TRL's ``SFTConfig`` / ``RewardConfig`` means the same
    thing: the stage's trainer is built with that value (two documented exceptions)."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from edgerlhf import reward_modeling as reward, sft_finetuning as sft
    from edgerlhf.core.config import RewardStageConfig, SFTStageConfig
    from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

    cpu = torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "No."}] * 4
    if stage == "sft":
        cfg = SFTStageConfig(per_device_train_batch_size=3, gradient_accumulation_steps=5, learning_rate=3e-4,
                             max_steps=7, eval_steps=2, logging_steps=3, save_total_limit=4, max_length=99)
        examples = sft.sft_examples(rows, tokenizer, 99, "truncate_left")[0]
        trainer = sft.make_trainer(sft.build_model(tiny_gpt2, cfg, cpu), tokenizer, cfg,
                                   sft.training_arguments(cfg, tmp_path, cpu, 0), examples, examples, None)
        exceptions = {"output_dir"}  # ours: where the model goes; TRL's: the checkpoints under it
    else:
        cfg = RewardStageConfig(per_device_train_batch_size=3, gradient_accumulation_steps=5, learning_rate=3e-4,
                                max_steps=7, eval_steps=2, logging_steps=3, save_total_limit=4, max_length=99,
                                gradient_checkpointing=False, center_rewards_coefficient=0.01)
        examples = reward.reward_examples(rows, tokenizer, 99)[0]
        model = reward.build_reward_model(tiny_gpt2, "bf16", cfg, tokenizer.pad_token_id, cpu)
        args = reward.trainer_arguments(cfg, tmp_path, cpu, 0, "eval_accuracy", True)
        trainer = reward.make_trainer(model, tokenizer, cfg, args, examples, examples)
        exceptions = {"output_dir", "max_length"}  # max_length: pairs are truncated by us, TRL gets None
    shared = {f.name for f in dataclasses.fields(cfg)} & {f.name for f in dataclasses.fields(trainer.args)}
    assert {"learning_rate", "per_device_train_batch_size", "max_steps", "eval_steps"} <= shared
    differ = {n: (getattr(cfg, n), getattr(trainer.args, n)) for n in shared - exceptions
              if getattr(cfg, n) != getattr(trainer.args, n)}
    assert not differ, differ


@pytest.mark.parametrize("old, new", [("ppo.target_kl", "ppo.adaptive_kl_target"),
                                      ("ppo.mini_batch_size", "ppo.micro_batch_size"),
                                      ("ppo.response_length", "ppo.max_new_tokens"),
                                      ("ppo.min_response_length", "ppo.min_new_tokens")])
def test_renamed_fields_are_refused_with_the_new_name(old, new, tmp_path):
    with pytest.raises(KeyError, match=f"{old}' was renamed to {new}"):
        load_config("tiny", cli={old: 1})
    path = tmp_path / "old.yaml"
    path.write_text(f"{old.split('.')[0]}:\n  {old.split('.')[1]}: 1\n")
    with pytest.raises(KeyError, match=f"config file {path}: config field '{old}' was renamed"):
        load_config("tiny", config_file=path)


def float_fields() -> list[str]:
    """Every field annotated ``float`` or ``Optional[float]``, found from the dataclasses (not from their limits)."""
    import dataclasses
    import typing

    keys = []
    for section in dataclasses.fields(Config):
        if section.name == "profile":
            continue
        hints = typing.get_type_hints(section.default_factory)
        keys += [f"{section.name}.{name}" for name, hint in hints.items() if float in (hint, *typing.get_args(hint))]
    return keys


def test_the_float_fields_are_found_in_every_section():
    keys = float_fields()
    assert {"run.vram_budget_gib", "sft.learning_rate", "reward.center_rewards_coefficient", "ppo.gamma",
            "ppo.missing_eos_penalty", "ppo.approx_kl_stop"} <= set(keys)
    assert len(keys) >= 25


@pytest.mark.parametrize("key", float_fields())
def test_every_float_field_refuses_nan_and_inf_from_every_layer(key, tmp_path):
    import re

    from edgerlhf.core.config import validate

    name = re.escape(key)
    with pytest.raises(ValueError, match=rf"{name}=nan \(command-line flag\) must be a finite number"):
        load_config("tiny", cli=parse_cli_sets([f"{key}=.nan"]))
    with pytest.raises(ValueError, match=rf"{name}=-inf \(parameter\) must be a finite number"):
        load_config("tiny", overrides={key: float("-inf")})
    section, field = key.split(".")
    path = tmp_path / "c.json"
    path.write_text(f'{{"{section}": {{"{field}": Infinity}}}}')  # Python's JSON reader accepts NaN / Infinity
    with pytest.raises(ValueError, match=rf"{name}=inf \(config file .*c.json\) must be a finite number"):
        load_config("tiny", path)
    cfg = load_config("tiny")
    setattr(getattr(cfg, section), field, float("nan"))  # a Config changed in code, checked by validate (begin)
    with pytest.raises(ValueError, match=rf"{name}=nan \(default\) must be a finite number"):
        validate(cfg)


@pytest.mark.parametrize("item, message", [
    ("sft.learning_rate=.inf", r"sft.learning_rate=inf \(command-line flag\) must be a finite number"),
    ("sft.warmup_ratio=.nan", r"sft.warmup_ratio=nan \(command-line flag\) must be a finite number"),
    ("ppo.gamma=.nan", r"ppo.gamma=nan \(command-line flag\) must be a finite number"),
    ("sft.learning_rate=inf", r"sft.learning_rate=inf .* must be a finite number"),  # YAML reads a str
    ("ppo.lam=NaN", r"ppo.lam=nan .* must be a finite number"),
    ("reward.learning_rate=-Infinity", r"reward.learning_rate=-inf .* must be a finite number"),
    ("sft.max_grad_norm=1e999", r"sft.max_grad_norm=inf .* must be a finite number"),  # overflows to inf
    ("run.seed=-1", r"run.seed=-1 \(command-line flag\) must be in \[0, 4294967295\]"),
    ("run.seed=4294967296", r"run.seed=4294967296 .* must be in \[0, 4294967295\]"),
    ("reward.seeds=[42, -1]", r"reward.seeds=\[42, -1\] must be a non-empty list of int in \[0, 4294967295\]"),
    ("ppo.top_p=1.5", r"ppo.top_p=1.5 .* must be in \(0.0, 1.0\]"),
    ("ppo.missing_eos_penalty=-1", r"ppo.missing_eos_penalty=-1.0 .* must be >= 0.0"),
    ("reward.center_rewards_coefficient=-0.01", r"reward.center_rewards_coefficient=-0.01 .* must be >= 0.0"),
])
def test_non_finite_and_out_of_range_values_are_refused_in_one_line(item, message):
    with pytest.raises(ValueError, match=message) as error:
        load_config("tiny", cli=parse_cli_sets([item]))
    assert "\n" not in str(error.value)


def test_a_config_changed_in_code_is_type_checked_and_the_seed_range_is_numpys():
    import numpy as np

    from edgerlhf.core.config import SEED_RANGE, validate

    cfg = load_config("tiny")
    cfg.run.seed = 1.5
    with pytest.raises(ValueError, match=r"run.seed=1.5 \(default\) must be of type int"):
        validate(cfg)
    state = np.random.get_state()
    try:
        np.random.seed(SEED_RANGE[1])  # the largest seed accepted is one NumPy accepts
        for outside in (SEED_RANGE[0] - 1, SEED_RANGE[1] + 1):
            with pytest.raises(ValueError):
                np.random.seed(outside)
    finally:
        np.random.set_state(state)


def test_ppo_seeds_are_none_or_distinct_seeds():
    assert load_config("tiny").ppo.seeds == [42, 43]
    assert load_config("tiny", overrides=[{"ppo.seeds": [1, 2, 3]}]).ppo.seeds == [1, 2, 3]
    for bad in ([], [1, 1], [-1], ["a"]):
        with pytest.raises(ValueError, match=r"ppo\.seeds="):
            load_config("tiny", overrides=[{"ppo.seeds": bad}])
