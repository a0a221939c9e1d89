"""Stages 2-4 (02_SFT_Finetuning, 03_Reward_Modeling, 04_PPO_Alignment): Precision, quantization, LoRA targets and
layer freezing, shared by SFT, reward models and PPO.

All of it is configuration of the libraries (transformers' ``BitsAndBytesConfig``,
peft's ``LoraConfig``); nothing here reimplements them.
"""
from __future__ import annotations

import logging

import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig

from .config import PRECISIONS  # noqa: F401  (re-exported: the stages import it from here)
from .hardware import cpu_bf16_native


class OncePerMessage(logging.Filter):
    """A logging filter that lets each distinct message through once per process.

    bitsandbytes' LLM.int8 layer logs "inputs will be cast from float32 to float16" at *every* matmul
    when the compute dtype is float32 (every CPU run). In a notebook kernel each line is a message to papermill,
    which slows the stage (docs/measurements.md). The first occurrence is still shown.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_repeated_bitsandbytes_warnings() -> None:
    """Install :class:`OncePerMessage` on bitsandbytes' autograd logger (idempotent)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, OncePerMessage) for f in logger.filters):
        logger.addFilter(OncePerMessage())


quiet_repeated_bitsandbytes_warnings()

#: LoRA targets per architecture: attention and MLP projections (QLoRA, Dettmers et al. 2023,
#: recommends all linear layers). GPT-2 uses Conv1D layers named c_attn / c_proj / c_fc.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA device that supports it, else float32 (CPU training runs in fp32)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


_CPU_BF16 = [True]  # run.cpu_bf16, set by edgerlhf.core.stage.begin through use_cpu_bf16


def use_cpu_bf16(on: bool) -> None:
    """Set ``run.cpu_bf16`` for this process (:func:`edgerlhf.core.stage.begin` calls it): whether reward models
    run in bf16 on a CPU that multiplies bf16 natively (:func:`frozen_dtype`)."""
    _CPU_BF16[0] = bool(on)


def frozen_dtype(device: torch.device | str, precision: str = "bf16") -> torch.dtype:
    """The dtype a reward model's frozen backbone at ``precision`` is loaded and run in (scoring and probe features:
    bf16 weights, NF4's compute dtype, LLM.int8's layers outside the int8 matmuls). :func:`compute_dtype` on CUDA; on
    a CPU, bf16 where the CPU multiplies it natively (:func:`edgerlhf.core.hardware.cpu_bf16_native`) and
    ``run.cpu_bf16`` is on, else float32; LLM.int8 stays float32 on a CPU (with bf16 around it its scores moved with
    batching by up to 0.25, and it ran no faster). Training, and the PPO policy, keep :func:`compute_dtype`. Why:
    bf16 as on the GPU, 2-4x faster than float32 on an AMX CPU (docs/measurements.md)."""
    device = torch.device(device)
    if device.type == "cpu":
        native = _CPU_BF16[0] and cpu_bf16_native() and precision != "int8"
        return torch.bfloat16 if native else torch.float32
    return compute_dtype(device)


def quantization_config(precision: str, dtype: torch.dtype, skip_modules: list[str] | None = None):
    """``BitsAndBytesConfig`` for a precision, or None for ``bf16`` (16-bit weights, no quantization).

    * ``int8``: LLM.int8() (Dettmers et al. 2022), outlier threshold 6.0 (bitsandbytes default).
    * ``int4``: NF4 with double quantization and ``dtype`` compute (QLoRA, Dettmers et al. 2023).

    ``skip_modules`` stay in full precision (a reward model's ``score`` head, for example).

    Raises:
        ValueError: unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "bf16":
        return None
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip_modules,
    )


def nf4_in_compute_dtype(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every NF4 layer of ``model`` on the QLoRA arithmetic: weights dequantized to the compute dtype
    (float32 on a CPU, bf16 on a GPU) and multiplied there, in eval mode as in training (Dettmers et al. 2023).

    bitsandbytes (0.49+) otherwise repacks an NF4 layer's weights on its first eval-mode call on a CPU with
    AVX512-BF16 and from then on runs its fused kernel with the activations rounded to bf16: scores then move
    with how tokens are batched, and that kernel is slower than the dequantizing path on a CPU
    (docs/measurements.md). The switch is the layer's own ``support_avx512bf16_for_cpu`` flag; returns ``model``.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def lora_targets(model: torch.nn.Module, requested: list[str] | None = None) -> list[str]:
    """LoRA target module names for ``model``: ``requested`` if given, else per architecture.

    Raises:
        ValueError: an unknown architecture without ``requested``, or a requested name that is
            not a module of the model (the message lists the model's linear-layer names).
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if requested is None:
        model_type = model.config.model_type
        if model_type not in LORA_TARGETS:
            raise ValueError(f"no default LoRA targets for architecture {model_type!r}; set sft.target_modules")
        return [t for t in LORA_TARGETS[model_type] if t in names]
    missing = [t for t in requested if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ValueError(f"target module(s) {missing} not in {model.config.model_type}; linear layers: {linear}")
    return list(requested)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit")


def lora_config(model, r: int, alpha: int, dropout: float, targets: list[str] | None, task_type: str,
                modules_to_save: list[str] | None = None) -> LoraConfig:
    """A peft ``LoraConfig`` (Hu et al. 2021) on :func:`lora_targets` of ``model``."""
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(model, targets),
        task_type=task_type, modules_to_save=modules_to_save,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (the ``ModuleList`` with ``num_hidden_layers`` entries).

    Raises:
        ValueError: no such list is found.
    """
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def freeze_first_blocks(model: torch.nn.Module, n: int) -> None:
    """Freeze the first ``n`` transformer blocks (``requires_grad=False``); the rest stays trainable.

    Raises:
        ValueError: ``n`` is negative or not below the number of blocks.
    """
    blocks = transformer_blocks(model)
    if not 0 <= n < len(blocks):
        raise ValueError(f"frozen_layers must be in [0, {len(blocks) - 1}], got {n}")
    for block in list(blocks)[:n]:
        block.requires_grad_(False)


def count_parameters(model: torch.nn.Module) -> dict[str, int | float]:
    """``{"trainable", "total", "trainable_share"}`` parameter counts (4-bit weights counted as stored)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_share": trainable / max(total, 1)}


def require_finite(tensors: dict[str, torch.Tensor], what: str, error: type[ValueError] = ValueError) -> None:
    """Refuse weights that hold NaN or +-inf, before anything built from them is saved or used.

    Only floating-point tensors are checked (quantized int8/NF4 storage holds integers, always finite).

    Args:
        tensors: named tensors, e.g. a ``state_dict()`` or a loaded safetensors file.
        what: the model or file they belong to, named in the error.
        error: the ``ValueError`` subclass to raise (a loader raises its own, e.g. ``RewardModelError``).
    Raises:
        ValueError: (``error``) naming ``what``, how many tensors are non-finite and the first ten of their names.
    """
    bad = [name for name, t in tensors.items()
           if torch.is_floating_point(t) and not bool(torch.isfinite(t.detach()).all())]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise error(f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN or inf ({shown})")
