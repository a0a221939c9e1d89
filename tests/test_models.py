import pytest
import torch

from edgerlhf.core.models import (MARKER, ModelUnavailableError, describe_base, load_causal_lm, load_tokenizer,
                                  model_config, prepare_base_model)
from edgerlhf.core.templates import PLAIN_TEMPLATE, ensure_chat_template, ensure_pad_token, render_dialogue, render_prompt


def test_tiny_gpt2_is_built_once_and_reloads(tiny_gpt2, models_dir):
    assert (models_dir / "base" / "tiny-gpt2" / MARKER).exists()
    assert (models_dir / "base" / "tiny-gpt2" / "model.safetensors").exists()
    assert prepare_base_model("tiny-gpt2", models_dir) == tiny_gpt2
    model = load_causal_lm(tiny_gpt2)
    assert model.config.n_layer == 2 and model.config.n_embd == 64
    tok = load_tokenizer(tiny_gpt2)
    assert len(tok) == model.config.vocab_size == 50257


def test_describe_base_records_any_model(tiny_gpt2, tmp_path):
    """Parameters, dtype, architecture and source for a registry entry, a local folder and a Hub id alike."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    registry = describe_base("tiny-gpt2", tiny_gpt2, model_config("tiny-gpt2", tiny_gpt2))
    built = sum(p.numel() for p in load_causal_lm(tiny_gpt2).parameters())
    assert registry == {"name": "tiny-gpt2", "parameters": built, "init": "random", "init_seed": 0,
                        "source": "registry", "architecture": "gpt2", "dtype": "float32"}
    assert describe_base("distilgpt2", "distilgpt2", model_config("distilgpt2", "distilgpt2")) == {
        "source": "registry", "architecture": "gpt2", "dtype": "float32", "parameters": 81_912_576}
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=100, tie_word_embeddings=False, dtype="bfloat16")
    own = AutoModelForCausalLM.from_config(config)
    own.save_pretrained(tmp_path / "own", safe_serialization=True)
    expected = {"architecture": "qwen2", "dtype": "bfloat16", "parameters": sum(p.numel() for p in own.parameters())}
    folder = str(tmp_path / "own")
    assert describe_base(folder, folder, model_config(folder, folder)) == {"source": "local folder", **expected}
    assert describe_base("someone/own-qwen", "someone/own-qwen", config) == {"source": "Hub", **expected}


def test_hub_names_fail_clearly_offline():
    with pytest.raises(ModelUnavailableError, match="(?s)Hub is unreachable.*smollm2-135m-instruct"):
        load_tokenizer("no-such-org/no-such-model-xyz")


def test_plain_template_matches_hh_format(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert ensure_chat_template(tok) == "plain" and tok.chat_template == PLAIN_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"}]
    prompt = render_prompt(tok, msgs)
    assert prompt == "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: q\n\nAssistant:"
    full = render_dialogue(tok, msgs, "answer")
    assert full == prompt + " answer<|endoftext|>"
    assert ensure_pad_token(tok) == tok.eos_token_id


@pytest.mark.slow
def test_embedded_model_conversion_is_faithful(tmp_path):
    """The safetensors copy gives the same logits as the GGUF-loaded model (about 30 s on 2 CPUs)."""
    from transformers import AutoModelForCausalLM

    from edgerlhf.core.models import EMBEDDED_GGUF, embedded_folder

    location = prepare_base_model("smollm2-135m-instruct", tmp_path)
    converted = load_causal_lm(location).eval()
    original = AutoModelForCausalLM.from_pretrained(str(embedded_folder()), gguf_file=EMBEDDED_GGUF).eval()
    tok = load_tokenizer(location)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)
