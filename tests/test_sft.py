import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_card
from edgerlhf import sft_finetuning as sft
from edgerlhf.core.hh_rlhf import DataFormatError
from edgerlhf.core.lm import encode_prompt_completion
from edgerlhf.core.models import load_causal_lm, load_tokenizer, prepare_base_model
from edgerlhf.core.prefs import read_prefs, sft_pairs
from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

CPU = torch.device("cpu")


def merged_weights(results) -> dict:
    return load_file(f"{results['model_dir']}/merged/model.safetensors")


@pytest.mark.parametrize("strategy", ["lora", *(pytest.param(s, marks=pytest.mark.slow)  # a stage run each
                                                 for s in ("qlora", "full", "frozen"))])
def test_every_strategy_trains_and_saves(tiny_cfg, strategy):
    cfg = tiny_cfg(**{"sft.strategy": strategy, "sft.max_steps": 2, "sft.frozen_layers": 1})
    results = sft.run_sft(cfg)
    assert results["global_step"] == 2
    info = json.loads(open(f"{results['model_dir']}/sft_info.json").read())
    assert info["strategy"] == strategy and info["dtype"] == "float32"
    assert load_causal_lm(results["model_dir"] + "/merged").config.n_layer == 2
    assert results["perplexity_before"] > 0 and results["perplexity_after"] > 0
    assert len(results["samples"]) == cfg.sft.n_samples
    assert 0 < results["parameters"]["trainable"] <= results["parameters"]["total"]
    assert not (sft.Path(cfg.run.root) / "models/sft/checkpoints").exists()  # removed after success


@pytest.mark.slow  # stage 2 end to end, with a teacher
def test_distill_strategy_moves_the_student(tiny_cfg, tiny_gpt2):
    results = sft.run_sft(tiny_cfg(**{"sft.strategy": "distill", "sft.teacher": "tiny-gpt2", "sft.max_steps": 2,
                                      "sft.learning_rate": 1e-2}))
    assert results["global_step"] == 2 and results["strategy"] == "distill"
    after, before = merged_weights(results), load_file(f"{tiny_gpt2}/model.safetensors")
    moved = [k for k in before if k in after and not torch.equal(after[k], before[k])]
    assert moved, "two distillation steps left every weight of the student unchanged"
    assert results["perplexity_after"] != results["perplexity_before"]


@pytest.mark.slow  # stage 2 end to end
def test_frozen_blocks_stay_bit_identical(tiny_cfg, tiny_gpt2):
    results = sft.run_sft(tiny_cfg(**{"sft.strategy": "frozen", "sft.frozen_layers": 1, "sft.max_steps": 2}))
    after, before = merged_weights(results), load_file(f"{tiny_gpt2}/model.safetensors")
    frozen = [k for k in before if k.startswith("transformer.h.0.")]
    trained = [k for k in before if k.startswith("transformer.h.1.") and k.endswith("weight")]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in trained)


def test_qlora_loads_4bit_layers(tiny_gpt2):
    import bitsandbytes as bnb

    cfg = sft.SFTStageConfig(strategy="qlora")
    model = sft.build_model(tiny_gpt2, cfg, CPU)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)


def examples(tokenizer, data_dir, n=4):
    rows = read_prefs(data_dir / "train_prefs.jsonl")[:n]
    return sft.sft_examples(rows, tokenizer, 256, "truncate_left")[0]


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_completion_mask_is_exactly_the_reply(model_name, models_dir, tiny_data, tmp_path):
    location = prepare_base_model(model_name, models_dir)
    tokenizer = load_tokenizer(location)
    template = ensure_chat_template(tokenizer)
    assert template == ("plain" if model_name == "tiny-gpt2" else "native")
    ensure_pad_token(tokenizer)
    train = examples(tokenizer, tiny_data)
    cfg = sft.SFTStageConfig(max_length=256, max_steps=1, eval_steps=1)
    model = sft.build_model(location, cfg, CPU)
    trainer = sft.make_trainer(model, tokenizer, cfg, sft.training_arguments(cfg, tmp_path, CPU, 0), train, train,
                               None)
    for example, prepared in zip(train, trainer.train_dataset):
        ids, start = encode_prompt_completion(tokenizer, example["prompt"], example["completion"][0]["content"])
        assert prepared["input_ids"] == ids
        assert prepared["labels"] == [-100] * start + ids[start:]
        reply = tokenizer.decode(ids[start:])
        assert example["completion"][0]["content"] in reply and tokenizer.eos_token in reply


def test_loss_falls_on_a_repeated_batch(tiny_gpt2, tiny_data, tmp_path):
    tokenizer = load_tokenizer(tiny_gpt2)
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    batch = examples(tokenizer, tiny_data, n=4) * 8
    cfg = sft.SFTStageConfig(strategy="full", learning_rate=3e-3, warmup_ratio=0.0, per_device_train_batch_size=4,
                        gradient_accumulation_steps=1, max_steps=8, logging_steps=1, eval_steps=100)
    trainer = sft.make_trainer(sft.build_model(tiny_gpt2, cfg, CPU), tokenizer, cfg,
                               sft.training_arguments(cfg, tmp_path, CPU, 0) | {"data_seed": 0}, batch, batch, None)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.5


class Interrupt(Exception):
    pass


@pytest.mark.slow  # interrupt and resume
def test_resume_continues_at_the_saved_step(tiny_cfg, monkeypatch):
    from transformers import TrainerCallback

    common = {"sft.strategy": "full", "sft.max_steps": 4, "sft.eval_steps": 2, "sft.early_stopping_patience": 10}
    straight = merged_weights(sft.run_sft(tiny_cfg(**common, **{"sft.output_dir": "models/straight"})))

    class StopAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Interrupt(f"interrupted after step {state.global_step}")

    real = sft.make_trainer

    def interrupted(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(StopAfterFirstSave())
        return trainer

    monkeypatch.setattr(sft, "make_trainer", interrupted)
    with pytest.raises(Interrupt, match="after step 2"):
        sft.run_sft(tiny_cfg(**common))
    monkeypatch.setattr(sft, "make_trainer", real)
    with pytest.raises(FileExistsError, match="sft.resume=true"):
        sft.run_sft(tiny_cfg(**common))
    resumed = sft.run_sft(tiny_cfg(**common, **{"sft.resume": True}))
    assert resumed["resumed_from"] == "checkpoint-2" and resumed["global_step"] == 4
    weights = merged_weights(resumed)
    assert all(torch.allclose(weights[k], straight[k], atol=1e-6) for k in straight)


@pytest.mark.slow  # stage 2 twice
def test_bad_inputs_fail_clearly_and_keep_the_last_model(tiny_cfg, tmp_path):
    good = sft.run_sft(tiny_cfg(**{"sft.max_steps": 1}))
    before = merged_weights(good)
    with pytest.raises(ValueError, match=r"sft.strategy='magic' \(parameter\) must be one of"):
        sft.run_sft(tiny_cfg(**{"sft.strategy": "magic"}))  # refused when the config is built
    with pytest.raises(ValueError, match=r"target module\(s\) \['nope'\] not in gpt2"):
        sft.run_sft(tiny_cfg(**{"sft.target_modules": ["nope"], "sft.max_steps": 1}))
    assert all(torch.equal(merged_weights(good)[k], v) for k, v in before.items())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train_prefs.jsonl").write_text("\n")
    (empty / "test_prefs.jsonl").write_text("\n")
    write_card(empty)
    with pytest.raises(DataFormatError, match="train_prefs.jsonl: the file has no rows"):
        sft.run_sft(tiny_cfg(**{"data.out_dir": str(empty)}))


@pytest.mark.slow  # stage 2 end to end
def test_sft_never_reads_the_held_out_test_pairs(tiny_cfg, tiny_data, tmp_path):
    data = tmp_path / "train_only"
    data.mkdir()
    shutil.copy(tiny_data / "train_prefs.jsonl", data)  # no test_prefs.jsonl: SFT validates on the training file
    write_card(data)
    results = sft.run_sft(tiny_cfg(**{"data.out_dir": str(data), "sft.max_steps": 1}))
    rows = read_prefs(data / "train_prefs.jsonl")
    train, validation = sft_pairs(rows, 16, 8)  # the tiny profile's sft.max_train_samples / max_eval_samples
    assert validation == rows[-8:] and train == rows[:16] and not {id(r) for r in train} & {id(r) for r in validation}
    assert results["data"]["eval"]["kept"] + results["data"]["eval"]["dropped"] == 8


def test_overlong_prompts_are_truncated_from_the_left_or_dropped(gpt2_tokenizer):
    tok = gpt2_tokenizer
    ensure_chat_template(tok)
    long_turns = []
    for i in range(6):
        long_turns += [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": "ok " * 10}]
    row = {"prompt": long_turns + [{"role": "user", "content": "last?"}], "chosen": "answer", "rejected": "x"}
    fitted, counts = sft.sft_examples([row], tok, 64, "truncate_left")
    assert counts == {"kept": 1, "truncated": 1, "dropped": 0}
    assert fitted[0]["prompt"][-1]["content"] == "last?" and len(fitted[0]["prompt"]) < len(row["prompt"])
    assert sft.sft_examples([row], tok, 64, "drop")[1] == {"kept": 0, "truncated": 0, "dropped": 1}
    assert sft.sft_examples([row], tok, 4, "truncate_left")[1]["dropped"] == 1


@pytest.mark.slow  # interrupt and resume
def test_out_of_memory_backs_off_and_resumes_with_the_same_effective_batch(tiny_cfg, monkeypatch):
    from transformers import TrainerCallback

    common = {"sft.strategy": "full", "sft.max_steps": 4, "sft.eval_steps": 2, "sft.early_stopping_patience": 10,
              "sft.per_device_train_batch_size": 4, "sft.gradient_accumulation_steps": 1}
    real_build = sft.build_model

    def without_dropout(*args, **kwargs):  # dropout masks depend on the micro-batch shape; the rest must not
        model = real_build(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    monkeypatch.setattr(sft, "build_model", without_dropout)
    straight = merged_weights(sft.run_sft(tiny_cfg(**common, **{"sft.output_dir": "models/straight"})))

    class OutOfMemoryAtStep3(TrainerCallback):  # what a too-large micro-batch does on a GPU
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated at step 3)")

    real, built = sft.make_trainer, []

    def flaky(model, tokenizer, cfg, args, *rest):
        built.append((args["per_device_train_batch_size"], args["gradient_accumulation_steps"]))
        trainer = real(model, tokenizer, cfg, args, *rest)
        if args["per_device_train_batch_size"] == 4:
            trainer.add_callback(OutOfMemoryAtStep3())
        return trainer

    monkeypatch.setattr(sft, "make_trainer", flaky)
    results = sft.run_sft(tiny_cfg(**common))
    assert built == [(4, 1), (2, 2)]
    [backoff] = results["oom_backoffs"]
    assert backoff["micro_batch"] == 4 and backoff["retried_from"] == "checkpoint-2" and "step 3" in backoff["error"]
    assert results["global_step"] == 4
    weights = merged_weights(results)
    diff = max((weights[k] - straight[k]).abs().max().item() for k in straight)
    assert diff < 1e-5, diff


@pytest.mark.slow  # two stage runs
def test_a_diverged_run_fails_and_leaves_the_last_good_model_byte_identical(tiny_cfg, tmp_path):
    from edgerlhf.core.files import sha256_file
    from edgerlhf.core.records import newest_records

    good = sft.run_sft(tiny_cfg(**{"sft.max_steps": 1}))
    model_dir = sft.Path(good["model_dir"])

    def digests():
        return {str(p.relative_to(model_dir)): sha256_file(p) for p in sorted(model_dir.rglob("*")) if p.is_file()}

    before = digests()
    assert "merged/model.safetensors" in before
    run_dir = tmp_path / "diverged-run"
    # finite, so the config accepts it; Adam's first steps are ~lr in size, so the weights overflow
    with pytest.raises(ValueError, match=r"SFT (diverged|model).*NaN or inf|SFT diverged") as error:
        sft.run_sft(tiny_cfg(**{"sft.max_steps": 2, "sft.learning_rate": 1e30, "run.run_dir": str(run_dir)}))
    assert str(model_dir) in str(error.value)  # says which model was kept
    assert digests() == before
    record = newest_records(run_dir)["sft"]
    assert record["status"] == "failed" and record["results"]["step"] in ("check losses", "check weights")
    if record["results"]["step"] == "check losses":  # a diverged run is not offered for resuming
        assert not (model_dir.parent / "checkpoints").exists()
        sft.run_sft(tiny_cfg(**{"sft.max_steps": 1}))  # the next run is not blocked by its checkpoints
