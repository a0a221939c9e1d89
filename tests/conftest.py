"""Shared fixtures. Tests never touch the Hub: HF_HUB_OFFLINE is set before transformers loads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from edgerlhf.core.paths import shared_dir  # noqa: E402

HH_FILE = shared_dir() / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
GPT2_TOKENIZER = shared_dir() / "tokenizers" / "distilgpt2"


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Every in-process test runs as on a CPU without native bf16 (reward models in float32, whatever
    ``run.cpu_bf16`` says), so the arithmetic identities tested hold on any CI machine; the bf16 path's tests
    patch :func:`edgerlhf.core.adapters.cpu_bf16_native` back to True."""
    import edgerlhf.core.adapters as adapters

    monkeypatch.setattr(adapters, "cpu_bf16_native", lambda: False)


@pytest.fixture(scope="session")
def hh_file() -> Path:
    assert HH_FILE.exists(), f"the shared HH-RLHF file is missing at {HH_FILE}"
    return HH_FILE


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """One models/ folder per test session, so tiny base models are built once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_gpt2(models_dir) -> str:
    from edgerlhf.core.models import prepare_base_model

    return prepare_base_model("tiny-gpt2", models_dir)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, models_dir) -> Path:
    """data/ prepared once with the tiny profile from the shared HH-RLHF file."""
    from edgerlhf.core.config import load_config
    from edgerlhf.data_preparation import prepare

    root = tmp_path_factory.mktemp("tinyroot")
    prepare(load_config("tiny", overrides={"run.root": str(root), "model.models_dir": str(models_dir)}))
    return root / "data" / "prefs"


@pytest.fixture
def tiny_cfg(tmp_path, models_dir, tiny_data):
    """A factory of tiny-profile configs that share data and base models but write to tmp_path."""
    from edgerlhf.core.config import load_config

    def make(**over):
        values = {"run.root": str(tmp_path), "model.models_dir": str(models_dir), "data.out_dir": str(tiny_data)}
        return load_config("tiny", overrides=[values, over])

    return make


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory, models_dir, tiny_data) -> Path:
    """A tiny SFT model (one optimizer step), trained once per session; returns its sft.output_dir."""
    from edgerlhf.core.config import load_config
    from edgerlhf.sft_finetuning import run_sft

    root = tmp_path_factory.mktemp("sftroot")
    run_sft(load_config("tiny", overrides={"run.root": str(root), "model.models_dir": str(models_dir),
                                           "data.out_dir": str(tiny_data), "sft.max_steps": 1}))
    return root / "models" / "sft"


@pytest.fixture
def tiny_llama_scorer(models_dir):
    """A tiny random Llama backbone in eval mode and its tokenizer (chat template, pad token), for ``score``."""
    from edgerlhf.core.models import load_tokenizer, prepare_base_model
    from edgerlhf.core.reward_scoring import load_backbone
    from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

    location = prepare_base_model("tiny-llama", models_dir)
    tok = load_tokenizer(location)
    ensure_chat_template(tok)
    ensure_pad_token(tok)
    model, _ = load_backbone(location, "bf16", "cpu")
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def write_card(folder: Path) -> Path:
    """A minimal ``data_card.json`` listing the sha256 of the preference files in ``folder``, as stage 1 writes it
    (later stages refuse a data folder whose files its card does not list)."""
    import json

    from edgerlhf.core.files import sha256_file

    files = {p.name: sha256_file(p) for p in sorted(Path(folder).glob("*_prefs.jsonl"))}
    path = Path(folder) / "data_card.json"
    path.write_text(json.dumps({"files": files}) + "\n")
    return path
