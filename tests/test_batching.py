"""Length-grouped micro-batches in the library trainers (``group_by_length``, issue 14 item 2): the same
examples, in batches that pad less."""
import pytest
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from edgerlhf import reward_modeling as reward, sft_finetuning as sft
from edgerlhf.core.config import RewardStageConfig, SFTStageConfig, load_config
from edgerlhf.core.models import load_tokenizer
from edgerlhf.core.prefs import read_prefs
from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

CPU = torch.device("cpu")


def padding(trainer) -> tuple[int, int, list]:
    """(padded positions, real tokens, the examples' first ids) over one epoch of the trainer's batches."""
    padded = real = 0
    seen = []
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"]
        padded += int(mask.numel() - mask.sum())
        real += int(mask.sum())
        seen += [tuple(row[m.bool()].tolist()) for row, m in zip(batch["input_ids"], mask)]
    return padded, real, sorted(seen)


def tokenizer_of(location):
    tokenizer = load_tokenizer(location)
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    return tokenizer


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_length_grouped_batches_hold_the_same_examples_with_less_padding(stage, tiny_gpt2, tiny_sft, tiny_data,
                                                                       tmp_path):
    rows = read_prefs(tiny_data / "train_prefs.jsonl")
    out = {}
    for grouped in (False, True):
        if stage == "sft":
            cfg = SFTStageConfig(per_device_train_batch_size=4, max_length=256, max_steps=1, eval_steps=1,
                            group_by_length=grouped)
            tokenizer = tokenizer_of(tiny_gpt2)
            examples = sft.sft_examples(rows, tokenizer, 256, "truncate_left")[0]
            trainer = sft.make_trainer(sft.build_model(tiny_gpt2, cfg, CPU), tokenizer, cfg,
                                       sft.training_arguments(cfg, tmp_path / str(grouped), CPU, 0), examples,
                                       examples[:4], None)
        else:
            cfg = RewardStageConfig(per_device_train_batch_size=4, max_length=256, max_steps=1, eval_steps=1,
                               gradient_checkpointing=False, group_by_length=grouped)
            location = str(tiny_sft / "model" / "merged")
            tokenizer = tokenizer_of(location)
            examples = reward.reward_examples(rows, tokenizer, 256)[0]
            model = reward.build_reward_model(location, "bf16", cfg, tokenizer.pad_token_id, CPU)
            args = reward.trainer_arguments(cfg, tmp_path / str(grouped), CPU, 0, "eval_accuracy", True)
            trainer = reward.make_trainer(model, tokenizer, cfg, args, examples, examples[:4])
        sampler = trainer._get_train_sampler(trainer.train_dataset)
        assert isinstance(sampler, LengthGroupedSampler) == grouped
        out[grouped] = padding(trainer)
    (pad_random, real_random, seen_random), (pad_grouped, real_grouped, seen_grouped) = out[False], out[True]
    assert seen_grouped == seen_random and real_grouped == real_random  # the same examples, every one once
    assert pad_grouped < 0.75 * pad_random, (pad_grouped, pad_random)  # reward: pairs still pad chosen vs rejected


def test_the_full_profile_groups_by_length():
    cfg = load_config("full")
    assert cfg.sft.group_by_length and cfg.reward.group_by_length
    assert not load_config("quick").sft.group_by_length  # micro-batch 1: nothing to save, reference order kept
