"""Stages 3 and 4 (03_Reward_Modeling, 04_PPO_Alignment): reward models built, saved, loaded at a precision, scored.

A reward model is a ``*ForSequenceClassification`` model with one output (``num_labels=1``)
whose head (``score``) is never quantized. Its folder holds ``rm_info.json``, ``tokenizer/`` and

* ``model/`` - complete full-precision weights (the bf16-trained model, adapter merged). It
  loads at bf16, or at int8/int4 (post-training quantization, quantized on load); or
* ``adapter/`` - the LoRA adapter and trained head of a model trained under int8/int4
  quantization, on top of the SFT backbone named (and hashed) in ``rm_info.json``, which is
  quantized on load exactly as during training; or
* ``head.safetensors`` - only the ``score`` head of a *probe* (``reward.method = "probe"``),
  fitted on the frozen SFT backbone named (and hashed) in ``rm_info.json`` at the precision it
  was trained under. A bf16 probe loads at any precision (int8/int4: post-training quantization).
  ``rm_info.json``'s ``pooling`` says what the head reads (:func:`pool_states`): the last token
  (``[1, hidden]``), the mean over the reply, or both (``[1, 2 * hidden]``).

Quantization is always done on load by bitsandbytes (deterministic), so nothing is stored in
bitsandbytes' serialization format (which does not round-trip GPT-2's Conv1D layers at int8).
The score is the head's output at the last non-pad token (transformers' sequence
classification pooling, which finds it for left and right padding alike), or on the pooled reply
states for a probe fitted with another pooling. A probe's features, head fit, folder writing and
check are in :mod:`edgerlhf.core.probe`; once saved it loads and scores here like any reward model.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from .adapters import frozen_dtype, nf4_in_compute_dtype, quantization_config, require_finite
from .config import PRECISIONS, PROBE_POOLINGS
from .files import folder_digest, sha256_file
from .logs import progress
from .lm import encode_prompt_completion, fit_prompt, pad_left, position_ids
from .memory import MIB, measure
from .models import load_tokenizer
from .prefs import ROLES
from .templates import ensure_chat_template, ensure_pad_token, render_dialogue

logger = logging.getLogger(__name__)
HEAD = "score"
INFO = "rm_info.json"
#: Stage 3's judges (folders under ``models/rm``): the proxies' recipe at bf16, and TF-IDF of the reply.
JUDGES = ("judge", "judge-tfidf")
#: Attribute of a loaded probe reward model naming the pooling its head reads (:func:`pool_states`).
POOLING_ATTRIBUTE = "reward_pooling"


class RewardModelError(ValueError):
    """A reward-model folder is incomplete or does not match what was asked of it."""


class _OnlyErrors(logging.Filter):
    """Lets through records at ERROR and above only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def load_backbone(location: str, precision: str, device: torch.device | str, num_layers: int | None = None,
                  dtype: torch.dtype | None = None):
    """A one-output sequence-classification model from ``location`` at ``precision``; head in full precision.

    ``num_layers`` keeps only the first N transformer blocks (the final norm then reads block N's output;
    the checkpoint's later blocks are not loaded); None keeps them all.

    Returns ``(model, missing_keys)``; ``missing_keys`` lists weights the checkpoint lacked
    (``score.weight`` when starting from a causal LM). ``dtype``: the weights' and arithmetic's dtype; None:
    :func:`edgerlhf.core.adapters.frozen_dtype` (scoring), training passes its compute dtype.
    Raises:
        ValueError: ``num_layers`` outside ``[1, blocks of the checkpoint]``.
    """
    device = torch.device(device)
    dtype = dtype or frozen_dtype(device, precision)
    extra = {}
    if num_layers is not None:
        blocks = AutoConfig.from_pretrained(location, trust_remote_code=False).num_hidden_layers
        if not 1 <= num_layers <= blocks:
            raise ValueError(f"num_layers={num_layers} (reward.probe_layer) must be in [1, {blocks}] for {location}")
        extra["num_hidden_layers"] = num_layers
    # its load report lists every expected key below: a filter, not a higher level (transformers checks a tensor-
    # parallel plan, and warns "layers were not sharded", whenever that logger's level is WARNING or above)
    report = logging.getLogger("transformers.modeling_utils")
    only_errors = _OnlyErrors()
    report.addFilter(only_errors)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=1, dtype=dtype, quantization_config=quantization_config(precision, dtype, [HEAD]),
            device_map={"": str(device)}, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
            **extra,
        )
    finally:
        report.removeFilter(only_errors)

    def cut(key: str) -> bool:  # a weight of a block left out by num_layers (model.layers.<i>. , transformer.h.<i>.)
        block = re.search(r"\.(\d+)\.", key)
        return num_layers is not None and block is not None and int(block[1]) >= num_layers

    unexpected = [k for k in info["unexpected_keys"] if not cut(k)]
    fresh = [k for k in info["missing_keys"] if k.split(".")[0] != HEAD]
    if unexpected or fresh:  # what transformers' report would have said beyond the cut blocks and the new head
        logger.warning("%s: %d checkpoint weights unused (%s), %d weights newly initialised (%s)", location,
                       len(unexpected), ", ".join(unexpected[:5]) or "-", len(fresh), ", ".join(fresh[:5]) or "-")
    return nf4_in_compute_dtype(model), set(info["missing_keys"])


def tokenizer_fingerprint(folder: str | Path) -> str:
    """SHA-256 of a whole saved tokenizer folder (to detect a mismatched tokenizer or chat template): the
    :func:`edgerlhf.core.files.folder_digest` of every file under ``folder`` (``tokenizer.json``,
    ``tokenizer_config.json``, ``chat_template.jinja``...), so an edited, added or removed file changes it. Stage 3
    records it in ``rm_info.json`` and :func:`load_reward_model` compares it.

    Raises:
        RewardModelError: ``folder`` is not a folder or holds no file.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        raise RewardModelError(f"{folder}: no tokenizer files (missing or empty folder)")
    return folder_digest(folder, "*")


def weights_fingerprint(folder: str | Path) -> str:
    """SHA-256 of a checkpoint's ``model.safetensors`` (to detect a changed backbone)."""
    return sha256_file(Path(folder) / "model.safetensors")


#: The file of each layout that holds what training changed (head, adapter or merged weights).
TRAINED_WEIGHTS = {"head": "head.safetensors", "model": "model/model.safetensors",
                   "adapter": "adapter/adapter_model.safetensors", "tfidf": "tfidf.safetensors"}


def weights_digest(folder: str | Path) -> str:
    """SHA-256 of the file holding what training changed in a reward-model folder (:data:`TRAINED_WEIGHTS`).

    Raises:
        RewardModelError: the folder has no ``rm_info.json``.
    """
    return sha256_file(Path(folder) / TRAINED_WEIGHTS[read_info(folder)["layout"]])


def write_info(folder: Path, **info) -> None:
    """Write ``rm_info.json`` (precision, layout, how it was made, fingerprints)."""
    (folder / INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_info(path: str | Path) -> dict:
    """Read a reward-model folder's ``rm_info.json``.

    Raises:
        RewardModelError: the folder has no ``rm_info.json``, or it is not a JSON object whose ``layout`` is one
            of :data:`TRAINED_WEIGHTS` (the message names the file).
    """
    info_path = Path(path) / INFO
    if not info_path.exists():
        raise RewardModelError(f"{path} is not a reward-model folder: {INFO} is missing")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RewardModelError(f"{info_path}: damaged, not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(info, dict) or info.get("layout") not in TRAINED_WEIGHTS:
        raise RewardModelError(f"{info_path}: must be a JSON object with 'layout' one of {list(TRAINED_WEIGHTS)}, "
                               f"got {str(info)[:80]!r}")
    return info


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a reward model's safetensors file, every floating-point one checked finite.

    Raises:
        RewardModelError: the file is missing, truncated or damaged, or a tensor holds NaN or inf (names the file).
    """
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise RewardModelError(f"{path}: missing, truncated or damaged safetensors file ({exc})") from exc
    require_finite(tensors, str(path), error=RewardModelError)
    return tensors


def _check_info(path: Path, info: dict) -> None:
    """What :func:`load_reward_model` reads of ``rm_info.json`` is there and of the right kind.

    Raises:
        RewardModelError: a field missing or of the wrong kind (names the file and the field).
    """
    layout = info["layout"]
    if layout not in ("model", "adapter", "head"):
        raise RewardModelError(f"{path / INFO}: layout {layout!r} is not a neural reward model (model, adapter "
                               "or head); a TF-IDF judge is loaded by edgerlhf.core.baselines")
    if info.get("precision") not in PRECISIONS:
        raise RewardModelError(f"{path / INFO}: 'precision' must be one of {list(PRECISIONS)}, "
                               f"got {info.get('precision')!r}")
    needed = ["tokenizer_sha256"] + ([] if layout == "model" else ["backbone", "backbone_sha256"])
    missing = [key for key in needed if not isinstance(info.get(key), str)]
    if missing:
        raise RewardModelError(f"{path / INFO}: field(s) {missing} missing or not a string")


def state_dict_mib(model: torch.nn.Module) -> float:
    """Bytes of the model's state dict in MiB: quantized weights with their quantization
    constants, full-precision head, adapters - the size its weights take when saved."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights (embeddings = head) once
    return sum(t.numel() * t.element_size() for t in unique.values()) / MIB


def folder_mib(path: Path) -> float:
    """Size of all files under ``path`` in MiB (2**20 bytes)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB


def dtype_that_ran(precision: str, device) -> str:
    """What the backbone's weights and arithmetic really were when scoring (:func:`edgerlhf.core.adapters.
    frozen_dtype`: on a CPU, "bf16" runs in float32 unless the CPU has native bf16); LLM.int8
    quantizes activations to int8 by way of float16 (outlier columns in float16); NF4 weights are dequantized to
    the compute dtype (:func:`edgerlhf.core.adapters.nf4_in_compute_dtype`). Stage 3 records it as
    ``rm_info.json``'s ``dtype``.

    Raises:
        KeyError: ``precision`` is not one of :data:`edgerlhf.core.config.PRECISIONS`.
    """
    compute = str(frozen_dtype(device, precision)).replace("torch.", "")
    return {"bf16": compute, "int8": f"int8 (LLM.int8: int8 weights and activations, outliers in float16), "
                                     f"{compute} elsewhere",
            "int4": f"nf4 (double quant), {compute} compute"}[precision]


def load_reward_model(path: str | Path, precision: str | None = None, device: torch.device | str = "cpu"):
    """Load a saved reward model for scoring; returns ``(model, tokenizer)`` in eval mode.

    Args:
        path: a folder written by stage 3 (``models/rm/<precision>``).
        precision: ``bf16``, ``int8`` or ``int4``; None means the precision it was trained at. A
            bf16-trained model (``model/`` or a bf16 ``head``) loads at any precision: int8/int4 is
            post-training quantization. One trained under int8/int4 loads only at that precision.
        device: where the model runs (the reward model may live on the CPU while the policy is on a GPU).
    Raises:
        RewardModelError: missing head or adapter, a tokenizer folder (any file of it, the chat template
            included) or backbone that differs from the one the model was trained with, a precision the folder
            cannot provide, a damaged ``rm_info.json`` or safetensors file, or trained weights (head, adapter or
            merged model) holding NaN or inf; the message names the file.
    """
    path = Path(path)
    info = read_info(path)
    _check_info(path, info)
    precision = precision or info["precision"]
    fixed = info["layout"] == "adapter" or (info["layout"] == "head" and info["precision"] != "bf16")
    if fixed and precision != info["precision"]:
        raise RewardModelError(f"{path} was trained under {info['precision']} quantization ({info['layout']} layout) "
                               f"and cannot be loaded at {precision}; only a bf16-trained model is quantized on load")
    if tokenizer_fingerprint(path / "tokenizer") != info["tokenizer_sha256"]:  # checked before anything reads it
        raise RewardModelError(f"{path / 'tokenizer'}: tokenizer differs from the one the reward model was trained "
                               "with (a file of the folder, the chat template included, was changed, added or "
                               "removed; a model saved before the whole folder was fingerprinted needs stage 3 again)")
    tokenizer = load_tokenizer(str(path / "tokenizer"))
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    if info["layout"] == "model":
        files = sorted((path / "model").glob("*.safetensors"))
        if not files:
            raise RewardModelError(f"{path / 'model'} has no weights (*.safetensors)")
        for file in files:  # readable and finite before transformers loads them, one file at a time
            read_weights(file)
        model, missing = load_backbone(str(path / "model"), precision, device)
        if f"{HEAD}.weight" in missing:
            raise RewardModelError(f"{path / 'model'} has no trained {HEAD!r} head (score.weight missing)")
    else:
        backbone = info["backbone"]
        if not (Path(backbone) / "model.safetensors").exists() or weights_fingerprint(backbone) != info[
                "backbone_sha256"]:
            raise RewardModelError(f"{path}: its backbone {backbone} is missing or changed since training; "
                                   "retrain the reward model (stage 3)")
        model, _ = load_backbone(backbone, precision, device, info.get("num_layers"))
        if info["layout"] == "head":
            if not (path / "head.safetensors").exists():
                raise RewardModelError(f"{path} has no head weights (head.safetensors)")
            head_file = read_weights(path / "head.safetensors")
            if f"{HEAD}.weight" not in head_file:
                raise RewardModelError(f"{path / 'head.safetensors'} holds no {HEAD}.weight (has {sorted(head_file)})")
            weight = head_file[f"{HEAD}.weight"]
            pooling = info.get("pooling", "last")
            if pooling != "last":  # the head reads pooled states (score() pools them): one float32 row of width D
                setattr(model, HEAD, torch.nn.Linear(weight.shape[1], 1, bias=False, device=device,
                                                     dtype=torch.float32))
                setattr(model, POOLING_ATTRIBUTE, pooling)
            head = getattr(model, HEAD)
            if tuple(weight.shape) != tuple(head.weight.shape):
                raise RewardModelError(f"{path / 'head.safetensors'}: head of shape {tuple(weight.shape)} does not "
                                       f"fit a {pooling}-pooled head {tuple(head.weight.shape)} of its backbone")
            with torch.no_grad():
                head.weight.copy_(weight.to(head.weight.dtype))
        else:
            from peft import PeftModel

            if not (path / "adapter" / "adapter_model.safetensors").exists():
                raise RewardModelError(f"{path / 'adapter'} has no adapter weights")
            read_weights(path / "adapter" / "adapter_model.safetensors")
            model = PeftModel.from_pretrained(model, str(path / "adapter"))
            if not hasattr(model.base_model.model, HEAD) or not hasattr(getattr(model.base_model.model, HEAD),
                                                                         "modules_to_save"):
                raise RewardModelError(f"{path / 'adapter'} does not contain the trained {HEAD!r} head")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def check_prompts(prompts: list[list[dict]]) -> None:
    """Check that ``prompts`` is a list of chat prompts, each a list of ``{"role", "content"}`` messages whose role
    is one the chat templates render (:data:`edgerlhf.core.prefs.ROLES`, lower case) and whose content is a str.

    Raises:
        TypeError: ``prompts`` or a prompt is not a list (a prompt given as a str, say), or a message is not a dict
            with a str ``content``.
        ValueError: an unknown role (``"wizard"``, ``"User"``); the message lists the allowed ones.
    """
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of prompts, each a list of {{'role', 'content'}} messages, got "
                        f"{type(prompts).__name__}")
    for i, messages in enumerate(prompts):
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"prompt {i} must be a list of {{'role', 'content'}} messages, got "
                            f"{type(messages).__name__} {messages!r:.60}")
        for j, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise TypeError(f"prompt {i}, message {j} must be a dict {{'role': str, 'content': str}}, got "
                                f"{message!r:.80}")
            if message.get("role") not in ROLES:
                raise ValueError(f"prompt {i}, message {j}: role {message.get('role')!r} is not one of {list(ROLES)} "
                                 "(the roles the chat templates render, lower case)")


def check_count(**values: int) -> None:
    """Check that each named value (``max_length=...``, ``batch_size=...``) is an int >= 1.

    Raises:
        TypeError: a value that is not an int. ValueError: a value < 1 (0 would silently mean "no limit").
    """
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")


def encode_pairs(tokenizer, prompts: list[list[dict]], replies: list[str], max_length: int,
                 reply_starts: bool = False) -> tuple[list, list | None, dict]:
    """Token ids of prompt + reply for each item, fitted to ``max_length`` tokens from the left.

    Each dialogue is rendered and tokenized once; only an item longer than ``max_length`` goes through
    :func:`edgerlhf.core.lm.fit_prompt`, where the prompt loses its oldest turns first; an item that is still too
    long with only its last user turn keeps its last ``max_length`` tokens (the reply's end, where the
    reward is read). Nothing is dropped.

    Args:
        reply_starts: also return where each reply starts (index of its first token in the item's ids, as
            :func:`edgerlhf.core.lm.encode_prompt_completion` finds it; 0 when the cut reached into the reply);
            this costs one more tokenization of the prompt per item.
    Returns:
        ``(token_lists, starts, counts)``: ``starts`` is a list of int, or None without ``reply_starts``;
        ``counts = {"turns_dropped": items whose prompt lost turns, "tokens_cut": items cut at the token level}``.
    Raises:
        TypeError: a reply that is not a ``str`` (names the item), or a malformed prompt (:func:`check_prompts`).
        ValueError: ``max_length < 1``, an unknown role, or different numbers of prompts and replies.
    """
    check_prompts(prompts)
    check_count(max_length=max_length)
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies: one reply per prompt expected")
    out, starts, counts = [], [], {"turns_dropped": 0, "tokens_cut": 0}
    for i, (messages, reply) in enumerate(zip(prompts, replies)):
        if not isinstance(reply, str):
            raise TypeError(f"item {i}: reply must be a str, got {type(reply).__name__}")
        ids = tokenizer(render_dialogue(tokenizer, messages, reply), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_length:  # the common case: no fitting
            out.append(ids)
            if reply_starts:
                starts.append(encode_prompt_completion(tokenizer, messages, reply)[1])
            continue
        fitted, cut = fit_prompt(tokenizer, messages, [reply], max_length, "truncate_left")
        if fitted is None:
            ids, start = encode_prompt_completion(tokenizer, messages[-1:], reply)
            counts["tokens_cut"] += 1
            out.append(ids[-max_length:])
            starts.append(max(0, start - (len(ids) - max_length)))
            continue
        counts["turns_dropped"] += int(cut)
        ids, start = encode_prompt_completion(tokenizer, fitted, reply)
        out.append(ids)
        starts.append(start)
    return out, starts if reply_starts else None, counts


def pool_states(states: torch.Tensor, start: torch.Tensor, read: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reply features from a backbone's final (normed) hidden states, as a reward head reads them.

    ``last`` is the state at the read token (transformers' sequence-classification pooling); ``mean`` the
    mean of the states of the reply's tokens ``start .. read`` (inclusive); ``last+mean`` both, concatenated
    (in that order). Mean pooling over the reply reads every reply token rather than one (why ``last+mean`` is
    the default of ``reward.probe_pooling``: docs/benchmarks.md, "Reward models that learn").

    Args:
        states: ``FloatTensor[B, T, H]``. start, read: ``LongTensor[B]`` positions in ``[0, T)``, ``start <= read``.
        pooling: one of :data:`edgerlhf.core.config.PROBE_POOLINGS`.
    Returns:
        ``FloatTensor[B, H]`` (``last``, ``mean``) or ``[B, 2H]`` (``last+mean``), in ``states``' dtype.
    Raises:
        ValueError: an unknown pooling, or a reply whose start is after its read token.
    """
    if pooling not in PROBE_POOLINGS:
        raise ValueError(f"pooling must be one of {list(PROBE_POOLINGS)}, got {pooling!r}")
    if bool((start > read).any()):
        raise ValueError(f"a reply starts after its read token (start {start.tolist()}, read {read.tolist()})")
    rows = torch.arange(states.shape[0], device=states.device)
    parts = []
    if pooling in ("last", "last+mean"):
        parts.append(states[rows, read])
    if pooling in ("mean", "last+mean"):
        t = torch.arange(states.shape[1], device=states.device)[None]
        inside = ((t >= start[:, None]) & (t <= read[:, None])).to(states.dtype)
        parts.append((inside[..., None] * states).sum(1) / inside.sum(1, keepdim=True))
    return torch.cat(parts, dim=-1)


def pooling_of(model) -> str:
    """The pooling a loaded reward model's head reads (:func:`pool_states`): ``last`` unless its folder said
    otherwise (a probe fitted with ``reward.probe_pooling``)."""
    return getattr(model, POOLING_ATTRIBUTE, "last")


def position_limit(model) -> int | None:
    """The most positions the model can embed (``max_position_embeddings``, GPT-2's ``n_positions``), or None."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


@torch.inference_mode()
def score(model, tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int = 8,
          max_length: int = 512, counts: dict | None = None, heads: dict | None = None):
    """Rewards of ``replies`` to ``prompts`` (chat messages) under a reward model.

    Over-long items are fitted from the left (:func:`encode_pairs`), never dropped, and counted into
    ``counts`` when given (its ``"turns_dropped"`` / ``"tokens_cut"`` are incremented). Items are sorted
    by length and batched (left padding, with ``position_ids`` that skip the padding) to avoid padding
    waste, then put back in input order. Runs on the model's own device, under inference mode. The head
    reads the model's :func:`pooling_of`: the last real token through the model's own forward, or (a probe
    fitted with ``reward.probe_pooling``) the backbone's final states pooled over the reply by
    :func:`pool_states`, then the head in float32.

    Args:
        prompts: ``N`` prompts, each a list of ``{"role", "content"}`` messages, roles ``system``, ``user`` or
            ``assistant`` (:func:`check_prompts`).
        replies: ``N`` reply strings.
        batch_size: items per forward pass (int >= 1).
        max_length: tokens of prompt + reply (int >= 1).
        heads: ``{name: FloatTensor[1, D]}``, other heads fitted on the same backbone states (e.g. the bf16 head
            of a ``-ptq`` model beside the int8-trained one): the pooled states are computed once and every head
            reads them. Only for a pooled probe (:func:`pooling_of` not ``last``).
    Returns:
        ``FloatTensor[N]`` (float32, on the CPU); with ``heads``, ``{name: FloatTensor[N]}`` instead.
    Raises:
        ValueError: different numbers of prompts and replies; an unknown role; ``batch_size`` or ``max_length``
            below 1, or ``max_length`` beyond the model's positions; ``heads`` for a ``last``-pooled model, or a
            head whose width is not the pooled states'.
        TypeError: prompts that are not lists of message dicts (a prompt given as a str), replies that are not a
            list of ``str``, or a ``batch_size`` / ``max_length`` that is not an int.
    """
    check_prompts(prompts)
    if not isinstance(replies, (list, tuple)):
        raise TypeError(f"replies must be a list of str, got {type(replies).__name__}")
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies: one reply per prompt expected")
    check_count(batch_size=batch_size, max_length=max_length)
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} (reward.max_length) exceeds the reward model's {limit} positions")
    device = next(model.parameters()).device
    pooling = pooling_of(model)
    if heads is not None:
        width = getattr(model, HEAD).weight.shape[1]
        if pooling == "last" or any(w.numel() != width for w in heads.values()):
            raise ValueError(f"extra heads need a pooled probe reward model and width {width}, got pooling "
                             f"{pooling!r} and widths { {k: w.numel() for k, w in heads.items()} }")
    weights = {None: getattr(model, HEAD).weight} if heads is None else heads
    weights = {k: w.detach().float().reshape(-1).to(device) for k, w in weights.items()}
    encoded, starts, cut = encode_pairs(tokenizer, prompts, replies, max_length, reply_starts=pooling != "last")
    if counts is not None:
        for key, value in cut.items():
            counts[key] = counts.get(key, 0) + value
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = {k: torch.empty(len(encoded), dtype=torch.float32) for k in weights}
    rewards = out[next(iter(weights))]
    for start in progress(range(0, len(order), batch_size), min_total=8, desc="scoring", unit="batch", leave=False):
        idx = order[start:start + batch_size]
        ids, mask = pad_left([encoded[i] for i in idx], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        if pooling == "last":
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            rewards[idx] = logits[:, 0].float().cpu()
            continue
        states = backbone_of(model)(input_ids=ids, attention_mask=mask,
                                    position_ids=position_ids(mask)).last_hidden_state
        width = ids.shape[1]
        read = last_real_token(ids, tokenizer.pad_token_id)
        first = torch.tensor([width - len(encoded[i]) + starts[i] for i in idx], device=device)
        pooled = pool_states(states, first, read, pooling).float()
        for k, w in weights.items():
            out[k][idx] = (pooled @ w).cpu()
    return rewards if heads is None else out


def last_real_token(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """``LongTensor[B]``: the last position whose token is not the pad token, as transformers'
    sequence-classification pooling finds it (with pad = EOS, as for GPT-2, the token before a final EOS)."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions * (ids != pad_token_id)).argmax(-1)


def backbone_of(model) -> torch.nn.Module:
    """The transformer under a ``*ForSequenceClassification`` model (``model.model`` for Llama,
    ``model.transformer`` for GPT-2): what the ``score`` head reads."""
    return getattr(model, model.base_model_prefix)


def loading_cost(folder: Path, precision: str, device) -> tuple:
    """Load a saved reward model with :func:`load_reward_model` (the API PPO uses) and measure what it costs.

    Returns:
        ``(model, tokenizer, cost)``, ``cost = {"weights_mib": state dict (:func:`state_dict_mib`), "folder_mib":
        files on disk (:func:`folder_mib`), "memory_footprint_mib": transformers' ``get_memory_footprint``,
        "peak_memory_load": the load's peaks and wall time (:func:`edgerlhf.core.memory.measure`)}``.
    Raises:
        RewardModelError: as :func:`load_reward_model`.
    """
    with measure(device) as load_m:
        model, tokenizer = load_reward_model(folder, precision, device)
    cost = {"weights_mib": state_dict_mib(model), "folder_mib": folder_mib(folder),
            "memory_footprint_mib": model.get_memory_footprint() / MIB, "peak_memory_load": load_m}
    return model, tokenizer, cost
