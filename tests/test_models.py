import pytest
import torch

from edgerlhf.core.models import MARKER, ModelUnavailableError, load_causal_lm, load_tokenizer, prepare_base_model
from edgerlhf.core.templates import PLAIN_TEMPLATE, ensure_chat_template, ensure_pad_token, render_dialogue, render_prompt


def test_tiny_gpt2_is_built_once_and_reloads(tiny_gpt2, models_dir):
    assert (models_dir / "base" / "tiny-gpt2" / MARKER).exists()
    assert (models_dir / "base" / "tiny-gpt2" / "model.safetensors").exists()
    assert prepare_base_model("tiny-gpt2", models_dir) == tiny_gpt2
    model = load_causal_lm(tiny_gpt2)
    assert model.config.n_layer == 2 and model.config.n_embd == 64
    tok = load_tokenizer(tiny_gpt2)
    assert len(tok) == model.config.vocab_size == 50257


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
