import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from conftest import write_card
from edgerlhf import reward_modeling as reward
from edgerlhf.core import crossfit, prefs, probe
from edgerlhf.core.lm import encode_prompt_completion
from edgerlhf.core.reward_scoring import RewardModelError, load_backbone, load_reward_model, score


@pytest.fixture
def rm_cfg(tiny_cfg, tiny_sft):
    """Tiny-profile configs on the session's SFT model; LoRA reward models unless ``reward.method`` is given."""
    def make(**over):
        return tiny_cfg(**{"sft.output_dir": str(tiny_sft), "reward.method": "lora", "reward.seeds": [42], **over})
    return make


def test_score_is_read_at_the_last_real_token_for_any_padding(tiny_sft):
    model, _ = load_backbone(str(tiny_sft / "model" / "merged"), "bf16", "cpu")
    from edgerlhf.core.models import load_tokenizer
    from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

    tok = load_tokenizer(str(tiny_sft / "model" / "merged"))
    ensure_chat_template(tok)
    model.config.pad_token_id = ensure_pad_token(tok)
    model.eval()
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question " * 5}]]
    replies = ["short", "a longer reply with several words"]
    batched = score(model, tok, prompts, replies, batch_size=2)
    with torch.no_grad():
        single = torch.tensor([model(input_ids=torch.tensor([encode_prompt_completion(tok, p, r)[0]])).logits[0, 0]
                               for p, r in zip(prompts, replies)])
        ids = [encode_prompt_completion(tok, p, r)[0] for p, r in zip(prompts, replies)]
        width = max(map(len, ids))
        right = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids])
        mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in ids])[:, None]).long()
        right_scores = model(input_ids=right, attention_mask=mask).logits[:, 0]
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(right_scores, single, atol=1e-5)


@pytest.mark.slow  # LoRA training at three precisions
def test_all_precisions_train_and_load_with_a_full_precision_head(rm_cfg):
    results = reward.run_reward(rm_cfg(**{"reward.max_steps": 2}))
    models = results["models"]
    assert set(models) == {"bf16", "int8", "int4", "int8-ptq", "int4-ptq", "judge", "judge-tfidf"}
    assert models["bf16"]["parameters"]["trainable"] > 1000  # LoRA + head, counted before the merge
    for name, entry in models.items():
        assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["auc_roc"] <= 1 and entry["weights_mib"] > 0
    expected = {"int8": bnb.nn.Linear8bitLt, "int4": bnb.nn.Linear4bit}
    for name in ("int8", "int4", "int8-ptq", "int4-ptq"):
        entry = models[name]
        model, _ = load_reward_model(entry["folder"], entry["precision"], "cpu")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert any(isinstance(m, expected[entry["precision"]]) for m in base.modules())
        head = base.score.modules_to_save["default"] if hasattr(base.score, "modules_to_save") else base.score
        assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert models["int8-ptq"]["spearman"] > 0.9 and models["int4-ptq"]["spearman"] > 0.8
    assert models["bf16"]["weights_mib"] > models["int8-ptq"]["weights_mib"] > models["int4-ptq"]["weights_mib"]
    assert [row["model"] for row in json.load(open(results["record"]))["results"]["table"]][3] == "bf16"


@pytest.mark.slow  # stage 3 end to end
def test_loading_errors_are_clear(rm_cfg, tmp_path):
    results = reward.run_reward(rm_cfg(**{"reward.max_steps": 1, "reward.precisions": ["bf16", "int4"],
                                          "reward.post_training_quantization": False, "reward.judge": False}))
    int4 = tmp_path / "int4"
    shutil.copytree(results["models"]["int4"]["folder"], int4)
    with pytest.raises(RewardModelError, match="cannot be loaded at bf16"):
        load_reward_model(int4, "bf16")
    (int4 / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(RewardModelError, match="no adapter weights"):
        load_reward_model(int4)
    bf16 = tmp_path / "bf16"
    shutil.copytree(results["models"]["bf16"]["folder"], bf16)
    tok = bf16 / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text() + " ")  # any change to the tokenizer file
    with pytest.raises(RewardModelError, match="tokenizer differs"):
        load_reward_model(bf16)
    with pytest.raises(RewardModelError, match="rm_info.json is missing"):
        load_reward_model(tmp_path)


@pytest.mark.slow  # stage 3 twice
def test_a_failed_run_keeps_the_previous_model(rm_cfg, monkeypatch):
    cfg = rm_cfg(**{"reward.max_steps": 1, "reward.precisions": ["bf16"], "reward.post_training_quantization": False,
                    "reward.judge": False})
    first = reward.run_reward(cfg)
    weights = open(f"{first['models']['bf16']['folder']}/model/model.safetensors", "rb").read()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reward, "save_trained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        reward.run_reward(cfg)
    assert open(f"{first['models']['bf16']['folder']}/model/model.safetensors", "rb").read() == weights


def toy_rows(n, start):
    rows = []
    for i in range(start, start + n):
        prompt = [{"role": "user", "content": f"Tell me about topic number {i}."}]
        rows.append({"prompt": prompt, "chosen": f"Here is a thought on {i}. Thanks", "rejected": f"Here is {i}. No"})
    return rows


def test_reward_model_learns_a_separable_toy_set(rm_cfg, tmp_path):
    data = tmp_path / "toy"
    data.mkdir()
    for name, rows in (("train_prefs.jsonl", toy_rows(64, 0)), ("test_prefs.jsonl", toy_rows(32, 1000))):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_card(data)
    cfg = rm_cfg(**{"data.out_dir": str(data), "reward.precisions": ["bf16"], "reward.max_train_samples": None,
                    "reward.max_eval_samples": None, "reward.num_train_epochs": 4.0, "reward.learning_rate": 3e-3,
                    "reward.eval_steps": 100, "reward.post_training_quantization": False, "reward.judge": False})
    results = reward.run_reward(cfg)
    assert results["models"]["bf16"]["accuracy"] >= 0.9



def test_over_long_items_are_cut_from_the_left_and_counted_never_aborting_a_batch(tiny_llama_scorer):
    model, tok = tiny_llama_scorer
    history = [{"role": "user", "content": "old " * 30}, {"role": "assistant", "content": "ok " * 30}]
    prompts = [[{"role": "user", "content": "hi"}], history + [{"role": "user", "content": "new"}],
               [{"role": "user", "content": "huge " * 200}]]
    replies = ["fine", "sure", "the end of a long reply"]
    counts = {}
    got = score(model, tok, prompts, replies, batch_size=3, max_length=64, counts=counts)
    assert got.shape == (3,) and torch.isfinite(got).all()
    assert counts == {"turns_dropped": 1, "tokens_cut": 1}
    # the cut item is scored on its last 64 tokens, so its reply's end is what the head reads
    tail = encode_prompt_completion(tok, prompts[2], replies[2])[0][-64:]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([tail])).logits[0, 0]
    assert torch.allclose(got[2], alone, atol=1e-5)
    with pytest.raises(TypeError, match="item 1: reply must be a str, got bytes"):
        score(model, tok, prompts[:2], ["ok", b"bytes"], max_length=64)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the reward model's {limit} positions"):
        score(model, tok, prompts[:1], ["ok"], max_length=limit + 1)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("pooling", ["last", "last+mean"])
def test_pair_features_are_what_the_head_reads(name, precision, pooling, models_dir):
    # prompt run once with its cache reused for both replies == two full passes through score(), also when the
    # replies begin alike (part of the reply is then pooled from the prompt pass)
    from edgerlhf.core.models import load_tokenizer, prepare_base_model
    from edgerlhf.core.probe import pair_features
    from edgerlhf.core.reward_scoring import POOLING_ATTRIBUTE
    from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

    location = prepare_base_model(name, models_dir)
    tok = load_tokenizer(location)
    ensure_chat_template(tok)
    ensure_pad_token(tok)  # GPT-2: pad = EOS, so the head reads the token before the final EOS
    model, _ = load_backbone(location, precision, "cpu")
    model.config.pad_token_id = tok.pad_token_id
    if pooling != "last":
        model.score = torch.nn.Linear(2 * model.config.hidden_size, 1, bias=False)
        setattr(model, POOLING_ATTRIBUTE, pooling)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight)
    prompts = [[{"role": "user", "content": "hi " * (i + 1)}] for i in range(5)]
    chosen = ["yes sure " * (i % 3 + 1) for i in range(5)]
    rejected = ["no" + " way" * i for i in range(4)] + ["yes sure no"]
    fc, fr = pair_features(model.eval(), tok, prompts, chosen, rejected, batch_size=3, pooling=pooling)
    w = model.score.weight.detach().float()[0]
    assert torch.allclose(fc @ w, score(model, tok, prompts, chosen, batch_size=2), atol=1e-4)
    assert torch.allclose(fr @ w, score(model, tok, prompts, rejected, batch_size=5), atol=1e-4)


def test_a_truncated_backbone_loads_without_a_load_report_and_anything_unexpected_is_one_warning(models_dir, tmp_path):
    # the blocks cut by num_layers and the new score head are expected: transformers' multi-line report of them
    # stays out of the logs; a weight that fits neither is named in one line
    import logging

    from safetensors.torch import load_file, save_file

    from edgerlhf.core.models import prepare_base_model

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger("transformers.modeling_utils"), logging.getLogger("edgerlhf.core.reward_scoring"),
               logging.getLogger("transformers.distributed.tensor_parallel")]  # "not sharded": no tensor parallelism
    for logger in loggers:
        logger.addHandler(handler)
    try:
        location = prepare_base_model("tiny-llama", models_dir)
        model, missing = load_backbone(location, "bf16", "cpu", num_layers=1)
        assert len(model.model.layers) == 1 and missing == {"score.weight"}
        assert [r for r in records if r.levelno >= logging.WARNING] == []
        odd = tmp_path / "odd"
        shutil.copytree(location, odd)
        weights = load_file(odd / "model.safetensors")
        save_file({**weights, "model.extra.weight": torch.zeros(2)}, odd / "model.safetensors")
        load_backbone(str(odd), "bf16", "cpu", num_layers=1)
        warned = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and "1 checkpoint weights unused (model.extra.weight)" in warned[0], warned
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_a_cpu_with_native_bf16_scores_in_bf16_unless_run_cpu_bf16_is_off(precision, models_dir, monkeypatch):
    # run.cpu_bf16: bf16 weights / NF4 compute on a CPU that multiplies bf16 natively; the probe's features and
    # score() then agree to bf16's rounding and stay close to the float32 scores; training keeps float32
    import edgerlhf.core.adapters as adapters
    from edgerlhf.core.models import load_tokenizer, prepare_base_model
    from edgerlhf.core.probe import pair_features
    from edgerlhf.core.reward_scoring import dtype_that_ran

    location = prepare_base_model("tiny-llama", models_dir)
    tok = load_tokenizer(location)
    prompts = [[{"role": "user", "content": "hi " * (i + 1)}] for i in range(5)]
    chosen, rejected = ["yes sure " * (i % 3 + 1) for i in range(5)], ["no" + " way" * i for i in range(5)]
    scores = {}
    monkeypatch.setattr(adapters, "cpu_bf16_native", lambda: True)
    for on in (True, False):
        adapters.use_cpu_bf16(on)
        try:
            model, _ = load_backbone(location, precision, "cpu")
            dtype = adapters.frozen_dtype("cpu")
            assert dtype == (torch.bfloat16 if on else torch.float32)
            assert dtype_that_ran(precision, "cpu").count(str(dtype).replace("torch.", "")) == 1
            assert adapters.compute_dtype(torch.device("cpu")) == torch.float32
            assert adapters.frozen_dtype("cpu", "int8") == torch.float32  # LLM.int8 stays float32 on a CPU
        finally:
            adapters.use_cpu_bf16(True)
        assert model.model.norm.weight.dtype == dtype
        model.config.pad_token_id = tok.pad_token_id
        torch.manual_seed(0)
        torch.nn.init.normal_(model.score.weight)
        scores[on] = score(model.eval(), tok, prompts, chosen, batch_size=2)
        fc, _ = pair_features(model, tok, prompts, chosen, rejected, batch_size=3)
        tol = 0.05 * scores[on].abs().max().item() if on else 1e-4
        assert torch.allclose(fc @ model.score.weight.detach().float()[0], scores[on], atol=tol)
    assert torch.allclose(scores[True], scores[False], atol=0.05 * scores[False].abs().max().item())
    assert not torch.equal(scores[True], scores[False])  # bf16 really ran


def test_extra_heads_read_the_same_pooled_states_as_their_own_model(tiny_llama_scorer):
    # best-of-n scores int8 and int8-ptq (two heads on the same int8 states) in one pass
    from edgerlhf.core.reward_scoring import POOLING_ATTRIBUTE

    model, tok = tiny_llama_scorer
    model.score = torch.nn.Linear(2 * model.config.hidden_size, 1, bias=False)
    setattr(model, POOLING_ATTRIBUTE, "last+mean")
    torch.manual_seed(0)
    other = torch.randn(1, 2 * model.config.hidden_size)
    prompts = [[{"role": "user", "content": "hi " * (i + 1)}] for i in range(5)]
    replies = ["yes sure " * (i % 3 + 1) for i in range(5)]
    own = score(model.eval(), tok, prompts, replies, batch_size=2)
    both = score(model, tok, prompts, replies, batch_size=2, heads={"own": model.score.weight, "other": other})
    assert torch.equal(both["own"], own)
    with torch.no_grad():
        model.score.weight.copy_(other)
    assert torch.allclose(both["other"], score(model, tok, prompts, replies, batch_size=2), atol=1e-6)
    with pytest.raises(ValueError, match="width"):
        score(model, tok, prompts, replies, heads={"wrong": torch.randn(1, 3)})


def test_nf4_layers_keep_the_compute_dtype_in_eval_mode(models_dir):
    # bitsandbytes would otherwise repack NF4 weights on a CPU with AVX512-BF16 and round activations to bf16
    from edgerlhf.core.models import prepare_base_model

    model, _ = load_backbone(prepare_base_model("tiny-llama", models_dir), "int4", "cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[1, 2, 3]]))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_mean_pooling_averages_the_reply_tokens_of_one_pass(models_dir):
    from edgerlhf.core.models import load_tokenizer, prepare_base_model
    from edgerlhf.core.probe import pair_features
    from edgerlhf.core.reward_scoring import backbone_of, pool_states
    from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

    states = torch.arange(12.0).view(1, 4, 3)
    assert pool_states(states, torch.tensor([1]), torch.tensor([2]), "mean").tolist() == [[4.5, 5.5, 6.5]]
    assert pool_states(states, torch.tensor([1]), torch.tensor([2]), "last+mean").tolist() == [
        [6.0, 7.0, 8.0, 4.5, 5.5, 6.5]]
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_states(states, torch.tensor([1]), torch.tensor([2]), "max")
    location = prepare_base_model("tiny-llama", models_dir)
    tok = load_tokenizer(location)
    ensure_chat_template(tok)
    ensure_pad_token(tok)
    model, _ = load_backbone(location, "bf16", "cpu")
    prompt = [{"role": "user", "content": "how are you"}]
    fc, _ = pair_features(model.eval(), tok, [prompt], ["fine thanks"], ["bad"], pooling="mean")
    ids, start = encode_prompt_completion(tok, prompt, "fine thanks")
    read = max(j for j, t in enumerate(ids) if t != tok.pad_token_id)
    with torch.no_grad():
        alone = backbone_of(model)(input_ids=torch.tensor([ids])).last_hidden_state[0, start:read + 1].mean(0)
    assert 0 < start < read and torch.allclose(fc[0], alone, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_features_read_after_a_block_equal_the_backbone_truncated_there(name, models_dir):
    from edgerlhf.core.models import load_tokenizer, prepare_base_model
    from edgerlhf.core.probe import pair_features
    from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

    location = prepare_base_model(name, models_dir)
    tok = load_tokenizer(location)
    ensure_chat_template(tok)
    ensure_pad_token(tok)
    prompts = [[{"role": "user", "content": "hi " * (i + 1)}] for i in range(5)]
    chosen, rejected = ["yes sure " * (i % 3 + 1) for i in range(5)], ["no" + " way" * i for i in range(5)]
    full, _ = load_backbone(location, "bf16", "cpu")
    n = full.config.num_hidden_layers
    many = pair_features(full.eval(), tok, prompts, chosen, rejected, batch_size=3, layers=[1, n])
    assert many[0].shape == (5, 2, full.config.hidden_size)
    for j, k in enumerate([1, n]):
        truncated, _ = load_backbone(location, "bf16", "cpu", num_layers=k)
        fc, fr = pair_features(truncated.eval(), tok, prompts, chosen, rejected, batch_size=2)
        assert torch.allclose(many[0][:, j], fc, atol=1e-5) and torch.allclose(many[1][:, j], fr, atol=1e-5), k
    assert not torch.allclose(many[0][:, 0], many[0][:, 1])  # the blocks differ: the test can fail
    with pytest.raises(ValueError, match=rf"must be blocks of the model, in \[1, {n}\]"):
        pair_features(full, tok, prompts, chosen, rejected, layers=[n + 1])


def test_the_probe_layer_is_the_block_whose_training_pairs_cross_validate_best():
    # block 7 carries the preference in one feature, block 3 is noise: the choice must follow the training pairs
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(200, 2, 16, generator=g), torch.randn(200, 2, 16, generator=g)
    chosen[:, 1, 0] += 3.0
    search = probe.choose_probe_layer((chosen, rejected), [3, 7], seed=0)
    assert search["chosen"] == 7 and search["pairs"] == 200
    losses = {c["layer"]: c["cv_log_loss"] for c in search["candidates"]}
    assert losses[7] < 0.3 < 0.6 < losses[3]


@pytest.mark.slow  # stage 3 end to end
def test_a_probe_layer_search_saves_every_model_at_the_chosen_block(rm_cfg):
    results = reward.run_reward(rm_cfg(**{"reward.method": "probe", "reward.probe_layer_search": [1, 2],
                                          "reward.precisions": ["bf16", "int8"]}))
    search = results["probe_layer_search"]
    assert search["precision"] == "bf16" and [c["layer"] for c in search["candidates"]] == [1, 2]
    assert results["conclusions"][0].startswith(f"probe layer: block {search['chosen']} ")
    for name in ("bf16", "int8", "judge", "int8-ptq"):
        info = json.load(open(f"{results['models'][name]['folder']}/rm_info.json"))
        assert info["num_layers"] == search["chosen"] == results["models"][name]["probe_layer"], name
    with pytest.raises(ValueError, match=r"reward.probe_layer_search=\[0\] must be a list of int >= 1"):
        rm_cfg(**{"reward.probe_layer_search": [0]})


@pytest.mark.slow  # stage 3 end to end (seven models)
def test_probe_reward_models_save_load_and_are_assessed(rm_cfg):
    results = reward.run_reward(rm_cfg(**{"reward.method": "probe", "reward.seeds": [42, 43]}))
    models = results["models"]
    assert set(models) == {"bf16", "int8", "int4", "int8-ptq", "int4-ptq", "judge", "judge-tfidf"}
    assert [row["model"] for row in results["table"][:3]] == ["shorter wins", "longer wins", "tf-idf"]
    tfidf = models.pop("judge-tfidf")  # the second judge: TF-IDF on the judge's pairs, saved without pickle
    assert tfidf["method"] == "tf-idf" and isinstance(tfidf["learned"], bool) and tfidf["n"] == models["bf16"]["n"]
    assert sorted(p.name for p in Path(tfidf["folder"]).iterdir()) == ["rm_info.json", "tfidf.json",
                                                                         "tfidf.safetensors"]
    assert set(models["bf16"]["judge_agreement"]) == {"judge", "judge-tfidf"}
    for name, entry in models.items():
        assert entry["method"] == "probe" and entry["seeds"] == [42]  # a convex fit: one seed; draws give the sd
        assert isinstance(entry["learned"], bool) and entry["vs_length"]["n"] == entry["n"]
        assert entry["parameters"]["trainable"] == 128  # last+mean head of a width-64 model, counted as trained
        assert entry["vs_reference"] is None if name == "bf16" else entry["vs_reference"]["n"] == entry["n"]
    assert models["bf16"]["dtype"] == "float32" and models["int4"]["dtype"].startswith("nf4")
    # a bf16 probe loads quantized (post-training quantization) and scores as it was evaluated
    ptq, _ = load_reward_model(models["int8-ptq"]["folder"], "int8", "cpu")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in ptq.modules())
    with pytest.raises(RewardModelError, match="cannot be loaded at bf16"):
        load_reward_model(models["int4"]["folder"], "bf16")
    verdicts = json.load(open(f"{models['bf16']['folder']}/../evaluation.json"))
    assert verdicts["models"]["judge"]["learned"] == models["judge"]["learned"]
    assert any(c.startswith("bf16: ") for c in results["conclusions"])
    # the cross-fitted evaluation: every kept pair SFT did not train on, every precision on the same folds
    cf = results["crossfit"]
    assert set(cf["models"]) == {"shorter wins", "longer wins", "tf-idf", "bf16", "int8", "int4", "int8-ptq",
                                 "int4-ptq", *probe.JUDGE_CANDIDATES}
    assert {f["candidate"] for f in cf["judge_frontier"]} == {"tf-idf", "bf16", *probe.JUDGE_CANDIDATES}
    assert not {c["a"] for c in cf["comparisons"]} & set(probe.JUDGE_CANDIDATES)
    assert cf["pool"]["left_out_sft_trained"] > 0
    assert cf["pool"]["pairs"] + cf["pool"]["left_out_sft_trained"] == sum(cf["pool"]["by_split"].values())
    assert {m["n"] for m in cf["models"].values()} == {cf["pool"]["pairs"]}
    assert {c["family_size"] for c in cf["comparisons"] if c["family"] == "vs bf16"} == {4}
    rows = crossfit.table(cf, ["bf16", "int8", "int4"])
    assert [r["model"] for r in rows][-1] == "int4-ptq" and rows[-1]["vs_bf16_p_holm"] is not None


@pytest.mark.parametrize("method, precisions", [("probe", ["bf16", "int8", "int4"]), ("lora", ["bf16", "int8"])])
@pytest.mark.slow  # stage 3 end to end
def test_the_held_out_test_pairs_are_read_once_after_every_model_is_saved(rm_cfg, monkeypatch, method, precisions):
    cfg = rm_cfg(**{"reward.method": method, "reward.precisions": precisions, "reward.max_steps": 1,
                    "reward.probe_layer_search": [1, 2] if method == "probe" else []})
    out_dir = Path(cfg.run.root) / cfg.reward.output_dir
    reads, real = [], reward.read_prefs

    def recording(path):
        if Path(path).name == "test_prefs.jsonl":  # which models are saved when the test pairs are opened
            staged = out_dir.parent.glob(f".{out_dir.name}.staging-*/*")  # the set is swapped in at the end
            reads.append(sorted(p.name for p in staged if (p / "rm_info.json").exists()))
        return real(path)

    monkeypatch.setattr(reward, "read_prefs", recording)
    results = reward.run_reward(cfg)
    assert reads == [sorted([*precisions, "judge", "judge-tfidf"])]
    assert results["conclusions"] and all(e["n"] == results["data"]["test"]["kept"] for e in results["models"].values())


@pytest.mark.slow  # stage 3 end to end
def test_a_probe_on_the_first_blocks_is_saved_and_loaded_truncated(rm_cfg):
    # tiny-gpt2 has 2 blocks; the probe reads block 1 through the final norm, and the saved model is that
    # truncated backbone plus the head (the stage's own reload check compares its scores with the features)
    results = reward.run_reward(rm_cfg(**{"reward.method": "probe", "reward.probe_layer": 1,
                                          "reward.precisions": ["bf16", "int8"], "reward.judge": False}))
    for name in ("bf16", "int8", "int8-ptq"):
        model, _ = load_reward_model(results["models"][name]["folder"], name[:4], "cpu")
        assert model.config.num_hidden_layers == 1, name
    info = json.load(open(f"{results['models']['bf16']['folder']}/rm_info.json"))
    assert info["num_layers"] == 1
    with pytest.raises(ValueError, match=r"reward.probe_layer\) must be in \[1, 2\]"):
        load_backbone(info["backbone"], "bf16", "cpu", num_layers=3)


def test_the_judge_never_sees_a_proxy_pair(rm_cfg):
    cfg = rm_cfg(**{"reward.judge_fraction": 0.25, "reward.max_train_samples": 100})
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "a", "rejected": "b"} for i in range(40)]
    splits = prefs.split_pairs(rows, cfg.reward)
    proxy = {r["prompt"][0]["content"] for k in ("train", "validation") for r in splits[k]}
    judge = {r["prompt"][0]["content"] for k in ("judge_train", "judge_validation") for r in splits[k]}
    assert len(judge) == 10 and len(proxy) == 30 and not proxy & judge
    assert sum(len(v) for v in splits.values()) == 40
    with pytest.raises(ValueError, match="judge_fraction"):
        prefs.split_pairs(rows, rm_cfg(**{"reward.judge_fraction": 1.0}).reward)


def test_a_judge_with_a_proxys_weights_is_refused(tmp_path):
    from edgerlhf.ppo_alignment import judge_is_independent

    for name, head in (("proxy", b"1"), ("judge", b"2"), ("copy", b"1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rm_info.json").write_text(json.dumps({"layout": "head"}))
        (tmp_path / name / "head.safetensors").write_bytes(head)
    judge_is_independent(tmp_path / "judge", tmp_path / "proxy")
    with pytest.raises(ValueError, match="same weights"):
        judge_is_independent(tmp_path / "copy", tmp_path / "proxy")
    with pytest.raises(ValueError, match="same weights"):
        judge_is_independent(tmp_path / "proxy", tmp_path / "proxy")


def test_reward_inputs_are_the_rendered_dialogue_fitted_from_the_left(gpt2_tokenizer):
    from edgerlhf.core.lm import encode_prompt_completion
    from edgerlhf.core.reward_scoring import encode_pairs
    from edgerlhf.core.templates import ensure_chat_template

    ensure_chat_template(gpt2_tokenizer)
    short = [{"role": "user", "content": "hi there"}]
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"question {i} " * 6}, {"role": "assistant", "content": "ok " * 6}]
    long = turns + [{"role": "user", "content": "last"}]
    huge = [{"role": "user", "content": "word " * 80}]
    out, starts, counts = encode_pairs(gpt2_tokenizer, [short, long, huge], ["yes", "fine", "end"], 48,
                                       reply_starts=True)
    assert out[0] == encode_prompt_completion(gpt2_tokenizer, short, "yes")[0]  # fits: the whole dialogue
    assert len(out[1]) <= 48 and counts == {"turns_dropped": 1, "tokens_cut": 1}
    assert out[1] == encode_prompt_completion(gpt2_tokenizer, long[-3:], "fine")[0]  # oldest turns dropped first
    assert len(out[2]) == 48 and out[2] == encode_prompt_completion(gpt2_tokenizer, huge, "end")[0][-48:]
    full, start = encode_prompt_completion(gpt2_tokenizer, huge, "end")
    assert starts[0] == encode_prompt_completion(gpt2_tokenizer, short, "yes")[1]
    assert starts[2] == start - (len(full) - 48)
    assert out[2][starts[2]:] == full[start:]  # the cut moved the reply's start, not its tokens


def saved_probe(tiny_sft, folder: Path, weight=None) -> Path:
    """A probe reward model saved by stage 3's own writer on the session's SFT model (no training needed)."""
    import numpy as np

    from edgerlhf.core.models import load_tokenizer
    from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

    backbone = str(tiny_sft / "model" / "merged")
    tok = load_tokenizer(backbone)
    ensure_chat_template(tok)  # as stage 3 does before saving: the template is saved with the tokenizer
    ensure_pad_token(tok)
    hidden = json.loads((tiny_sft / "model" / "merged" / "config.json").read_text())["n_embd"]
    weight = np.linspace(-1, 1, hidden) if weight is None else weight
    probe.save_probe(folder, weight, tok, backbone, "bf16", "cpu", {"C": 1.0, "cv_log_loss": 0.6})
    return folder


def test_damaged_or_non_finite_reward_model_files_are_refused_naming_the_file(tiny_sft, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    good = saved_probe(tiny_sft, tmp_path / "good")
    load_reward_model(good)  # the folder as saved loads

    def copy(name):
        return Path(shutil.copytree(good, tmp_path / name))

    head = copy("truncated") / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-8])
    with pytest.raises(RewardModelError, match=r"truncated.head.safetensors: missing, truncated or damaged"):
        load_reward_model(head.parent)
    info = copy("garbage-info") / "rm_info.json"
    info.write_bytes(b"\x00\xffnot json{")
    with pytest.raises(RewardModelError, match=r"garbage-info.rm_info.json: damaged"):
        load_reward_model(info.parent)
    info.write_text('["layout", "head"]')
    with pytest.raises(RewardModelError, match=r"garbage-info.rm_info.json: must be a JSON object"):
        load_reward_model(info.parent)
    info.write_text(json.dumps({**json.loads((good / "rm_info.json").read_text()), "backbone_sha256": None}))
    with pytest.raises(RewardModelError, match=r"rm_info.json: field\(s\) \['backbone_sha256'\] missing"):
        load_reward_model(info.parent)
    nan_head = copy("nan-head") / "head.safetensors"
    weight = torch.linspace(-1, 1, load_reward_model(good)[0].score.weight.shape[1])[None]
    weight[0, 3] = float("nan")
    save_file({"score.weight": weight}, nan_head)
    with pytest.raises(RewardModelError, match=r"nan-head.head.safetensors: 1 of 1 tensors hold NaN or inf "
                                               r"\(score.weight\)"):
        load_reward_model(nan_head.parent)
    # a non-finite head is never written in the first place
    with pytest.raises(ValueError, match=r"probe reward model never \(bf16\): 1 of 1 tensors hold NaN or inf"):
        saved_probe(tiny_sft, tmp_path / "never", np.full(weight.shape[1], np.inf))
    assert not (tmp_path / "never").exists()


def test_a_truncated_merged_model_file_is_named_on_load(tiny_sft, tmp_path):
    from edgerlhf.core.models import load_tokenizer
    from edgerlhf.core.reward_scoring import tokenizer_fingerprint, write_info

    folder = tmp_path / "rm"  # a merged-model layout (stage 3's bf16 LoRA model) around the SFT weights
    shutil.copytree(tiny_sft / "model" / "merged", folder / "model")
    load_tokenizer(str(folder / "model")).save_pretrained(folder / "tokenizer")
    write_info(folder, layout="model", precision="bf16", tokenizer_sha256=tokenizer_fingerprint(folder / "tokenizer"))
    weights = folder / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RewardModelError, match=r"rm.model.model.safetensors: missing, truncated or damaged"):
        load_reward_model(folder)


def test_the_whole_tokenizer_folder_is_fingerprinted(tiny_sft, tmp_path):
    from edgerlhf.core.reward_scoring import tokenizer_fingerprint

    good = saved_probe(tiny_sft, tmp_path / "good")
    template = good / "tokenizer" / "chat_template.jinja"
    assert template.exists() and json.loads((good / "rm_info.json").read_text())["tokenizer_sha256"] == \
        tokenizer_fingerprint(good / "tokenizer")
    for name, change in (("template", lambda t: (t / "chat_template.jinja").write_text(
                              template.read_text().replace("Human:", "Person:"))),
                         ("added", lambda t: (t / "extra.txt").write_text("x")),
                         ("removed", lambda t: (t / "chat_template.jinja").unlink())):
        folder = Path(shutil.copytree(good, tmp_path / name))
        change(folder / "tokenizer")
        with pytest.raises(RewardModelError, match="tokenizer differs from the one the reward model was trained with"):
            load_reward_model(folder)


def test_score_refuses_malformed_inputs_saying_what_was_expected(tiny_llama_scorer):
    from edgerlhf.core.probe import pair_features
    from edgerlhf.core.reward_scoring import encode_pairs

    model, tok = tiny_llama_scorer
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert torch.isfinite(score(model, tok, [prompt], ["hello"], batch_size=1, max_length=64)).all()
    allowed = r"\['system', 'user', 'assistant'\]"
    for role in ("wizard", "User"):
        bad = [{"role": role, "content": "hi"}]
        with pytest.raises(ValueError, match=rf"prompt 0, message 0: role '{role}' is not one of {allowed}"):
            score(model, tok, [bad], ["hello"])
        with pytest.raises(ValueError, match=rf"role '{role}' is not one of {allowed}"):
            pair_features(model, tok, [bad], ["a"], ["b"], max_length=64)
        with pytest.raises(ValueError, match=rf"role '{role}' is not one of {allowed}"):
            encode_pairs(tok, [bad], ["a"], 64)
    with pytest.raises(ValueError, match="max_length=0 must be >= 1"):
        score(model, tok, [prompt], ["hello"], max_length=0)
    with pytest.raises(ValueError, match="max_length=0 must be >= 1"):
        encode_pairs(tok, [prompt], ["hello"], 0)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        score(model, tok, [prompt], ["hello"], batch_size=0)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        pair_features(model, tok, [prompt], ["a"], ["b"], batch_size=0, max_length=64)
    with pytest.raises(TypeError, match=r"max_length must be an int >= 1, got 64.0"):
        score(model, tok, [prompt], ["hello"], max_length=64.0)
    with pytest.raises(TypeError, match=r"prompt 0 must be a list of \{'role', 'content'\} messages, got str"):
        score(model, tok, ["hi"], ["hello"])
    with pytest.raises(TypeError, match=r"prompts must be a list of prompts"):
        score(model, tok, "hi", ["hello"])
    with pytest.raises(TypeError, match=r"prompt 0, message 1 must be a dict \{'role': str, 'content': str\}"):
        score(model, tok, [[prompt[0], "hi"]], ["hello"])
    with pytest.raises(ValueError, match="2 prompts but 1 replies: one reply per prompt expected"):
        score(model, tok, [prompt, prompt], ["hello"])
    with pytest.raises(ValueError, match="2 prompts but 1 replies"):
        encode_pairs(tok, [prompt, prompt], ["hello"], 64)
