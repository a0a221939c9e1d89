"""Stage 0 (00_Setup) and every training stage's micro-batch: Memory planner: predict a stage's peak device memory
from first principles.

    from edgerlhf.core.planner import estimate
    plan = estimate("sft", cfg, model_config)      # MemoryEstimate(total_mib, breakdown, ...)

Every term is arithmetic on the model's shape and the stage's settings; the sources:

* weights: bytes per parameter - fp32 4, bf16 2, LLM.int8 1 (+ one fp32 scale per output row),
  NF4 0.5 + double-quantized constants (8-bit absmax per 64 weights, fp32 per 256 blocks:
  0.127 bits per weight; Dettmers et al. 2023). Only the linear layers inside the transformer
  blocks are quantized; embeddings, norms and the head keep the compute dtype (bitsandbytes).
* training state: LoRA (Hu et al. 2021) adds ``r * (d_in + d_out)`` parameters per adapted layer;
  every trainable parameter costs fp32 weight + gradient + two AdamW moments = 16 bytes.
* activations per layer: ``s * b * h * (34 + 5 * a * s / h)`` bytes at 16-bit (Korthikanti et al.
  2022, eq. 2), scaled by bytes/2 for fp32; with gradient checkpointing only each layer's input
  (``2 * s * b * h`` bytes at 16-bit) plus one layer's full activations.
* logits: ``b * s * V`` float32 values, counted three times in training (logits, log-softmax,
  gradient) and once in no-grad forwards.
* KV cache: ``2 * layers * b * T * kv_heads * head_dim`` values in the compute dtype.

It is a model, not a measurement: allocator overhead, fragmentation and library buffers are not
included; ``benchmarks/stages.py`` compares it with measured peaks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .memory import MIB

BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 0.127 / 8}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    block_linear_params: int  # parameters of the linear layers inside the transformer blocks
    other_params: int  # embeddings, norms, untied head
    lora_shapes: tuple = ()  # (d_in, d_out) of each LoRA-adapted layer in one block

    @property
    def params(self) -> int:
        return self.block_linear_params + self.other_params

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Shape of a GPT-2 or Llama-style ``transformers`` config (LoRA on attention and MLP projections)."""
        h = config.hidden_size
        if config.model_type == "gpt2":
            inter = config.n_inner or 4 * h
            kv_heads, heads = config.n_head, config.n_head
            lora = ((h, 3 * h), (h, h), (h, inter), (inter, h))  # c_attn, attn c_proj, c_fc, mlp c_proj
            other = config.vocab_size * h + config.n_positions * h + (4 * config.n_layer + 2) * h
            bias = config.n_layer * (3 * h + h + inter + h)
            other += bias
        else:
            inter, heads = config.intermediate_size, config.num_attention_heads
            kv_heads = config.num_key_value_heads or heads
            head_dim = getattr(config, "head_dim", None) or h // heads
            kv = kv_heads * head_dim
            lora = ((h, heads * head_dim), (h, kv), (h, kv), (heads * head_dim, h), (h, inter), (h, inter), (inter, h))
            tied = getattr(config, "tie_word_embeddings", True)
            other = config.vocab_size * h * (1 if tied else 2) + (2 * config.num_hidden_layers + 1) * h
        block = config.num_hidden_layers * sum(i * o for i, o in lora)
        return cls(config.num_hidden_layers, h, inter, heads, kv_heads, config.vocab_size, block, other, lora)


@dataclass
class MemoryEstimate:
    """A predicted peak in MiB with its parts, and whether it fits a budget."""

    stage: str
    total_mib: float
    breakdown: dict = field(default_factory=dict)

    def fits(self, budget_gib: float | None) -> bool:
        """True when the total is within ``budget_gib`` (always True without a budget)."""
        return budget_gib is None or self.total_mib <= budget_gib * 1024


def weights_mib(shape: ModelShape, precision: str, compute: str) -> float:
    """Weights in MiB: block linear layers at ``precision``, the rest at the ``compute`` dtype."""
    per_row = 4 * shape.layers * sum(o for _, o in shape.lora_shapes) if precision == "int8" else 0
    return (shape.block_linear_params * BYTES[precision] + per_row + shape.other_params * BYTES[compute]) / MIB


def lora_params(shape: ModelShape, r: int) -> int:
    """LoRA parameters on every adapted layer of every block: ``r * (d_in + d_out)`` each."""
    return shape.layers * sum(r * (i + o) for i, o in shape.lora_shapes)


def activations_mib(shape: ModelShape, batch: int, seq: int, compute: str, checkpointing: bool) -> float:
    """Training activations of the transformer blocks (Korthikanti et al. 2022), in MiB."""
    scale = BYTES[compute] / 2
    one_layer = seq * batch * shape.hidden * (34 + 5 * shape.heads * seq / shape.hidden) * scale
    if checkpointing:
        return (shape.layers * 2 * seq * batch * shape.hidden * scale + one_layer) / MIB
    return shape.layers * one_layer / MIB


def logits_mib(shape: ModelShape, batch: int, seq: int, copies: int) -> float:
    """``copies`` float32 ``[batch, seq, vocab]`` tensors, in MiB."""
    return copies * batch * seq * shape.vocab * 4 / MIB


def kv_cache_mib(shape: ModelShape, batch: int, tokens: int, compute: str) -> float:
    """Key/value cache for ``tokens`` positions, in MiB."""
    head_dim = shape.hidden // shape.heads
    return 2 * shape.layers * batch * tokens * shape.kv_heads * head_dim * BYTES[compute] / MIB


def estimate(stage: str, cfg, model_config, compute: str = "bf16") -> MemoryEstimate:
    """Predict the peak device memory of ``stage`` (``sft``, ``reward`` or ``ppo``) for ``cfg``
    (a :class:`edgerlhf.core.config.Config`) and a ``transformers`` model config. The reward stage is LoRA
    training (``reward.method = "lora"``) or, for ``probe``, inference of the frozen backbone.

    Raises:
        ValueError: unknown stage.
    """
    shape = ModelShape.from_config(model_config)
    parts: dict[str, float] = {}
    if stage == "sft":
        s = cfg.sft
        precision = "int4" if s.strategy == "qlora" else compute
        parts["weights"] = weights_mib(shape, precision, compute)
        trainable = shape.params if s.strategy in ("full", "frozen") else lora_params(shape, s.lora_r)
        parts["trainable_state"] = trainable * 16 / MIB
        b, seq = s.per_device_train_batch_size, s.max_length
        parts["activations"] = activations_mib(shape, b, seq, compute, s.gradient_checkpointing)
        parts["logits"] = logits_mib(shape, b, seq, 3)
    elif stage == "reward":
        r = cfg.reward
        precision = max(r.precisions, key=lambda p: BYTES[p if p != "bf16" else compute])
        parts["weights"] = weights_mib(shape, precision if precision != "bf16" else compute, compute)
        if r.method == "probe":  # a frozen backbone read without gradients: the prompt's cache for both replies,
            rows = 2 * r.feature_batch_size  # and one block's activations at a time
            parts["kv_cache"] = kv_cache_mib(shape, rows, r.max_length, compute)
            parts["activations (one block)"] = activations_mib(shape, rows, r.max_length, compute, False) / shape.layers
        else:
            parts["trainable_state"] = (lora_params(shape, r.lora_r) + shape.hidden) * 16 / MIB
            b = 2 * r.per_device_train_batch_size  # chosen and rejected in one forward
            parts["activations"] = activations_mib(shape, b, r.max_length, compute, r.gradient_checkpointing)
    elif stage == "ppo":
        p = cfg.ppo
        precision = p.policy_precision if p.policy_precision != "bf16" else compute
        parts["policy_weights"] = weights_mib(shape, precision, compute)
        parts["trainable_state"] = (lora_params(shape, p.lora_r) + shape.hidden + 1) * 16 / MIB
        if p.reward_device != "cpu":
            parts["reward_model_weights"] = weights_mib(shape, compute, compute)
        seq = p.max_prompt_length + p.max_new_tokens
        rows = min(p.generation_batch_size or p.batch_size, p.batch_size)  # per generate / forward call
        generation = kv_cache_mib(shape, rows, seq, compute) + logits_mib(shape, rows, 1, 2)
        # the old log-probs' pass over the replies of one generate call, with its prompts' cache (rollout.reply_logprobs)
        no_grad_forward = kv_cache_mib(shape, rows, seq, compute) + logits_mib(shape, rows, p.max_new_tokens, 1)
        per_pass = min(p.rows_per_pass or p.micro_batch_size, p.micro_batch_size)  # rows in one forward/backward
        training = activations_mib(shape, per_pass, seq, compute, False) + logits_mib(
            shape, per_pass, p.max_new_tokens, 3)
        parts["activations (largest phase)"] = max(generation, no_grad_forward, training)
    else:
        raise ValueError(f"unknown stage {stage!r}; choose sft, reward or ppo")
    return MemoryEstimate(stage, sum(parts.values()), parts)


#: Each training stage's micro-batch and accumulation fields: (section, micro-batch field, accumulation field).
MICRO_BATCH_FIELDS = {
    "sft": ("sft", "per_device_train_batch_size", "gradient_accumulation_steps"),
    "reward": ("reward", "per_device_train_batch_size", "gradient_accumulation_steps"),
    "ppo": ("ppo", "micro_batch_size", "gradient_accumulation_steps"),
}


def fit_micro_batch(stage: str, cfg, model_config, compute: str, available_mib: float,
                    headroom: float = 0.25) -> dict:
    """The largest micro-batch of ``stage`` whose planned peak (:func:`estimate`) fits ``(1 - headroom) *
    available_mib``, with the effective batch (micro-batch x gradient accumulation) unchanged.

    Candidates are the divisors of the effective batch (the accumulation becomes effective / micro-batch, so
    the optimisation is the same up to the order of summation). Under a cap of 8 GiB the default headroom of 0.25
    plans for 6 GiB, the space left for allocator fragmentation and library buffers that the planner does not
    model (the project's target: SFT reserved memory <= 6 GiB of the 8 GiB cap). When even a micro-batch of 1 does
    not fit, the configured values are kept and ``fits`` is False (the planner's advice and the out-of-memory
    back-off then apply).

    Args:
        stage: ``sft``, ``reward`` or ``ppo``.
        available_mib: device memory this process may use, in MiB (:func:`edgerlhf.core.memory.available_device_mib`).
        headroom: fraction of ``available_mib`` kept free, in [0, 1).
    Returns:
        ``{"stage", "micro_batch", "accumulation", "configured": [micro, accumulation], "estimate_mib",
        "target_mib", "fits"}``.
    Raises:
        ValueError: unknown stage, or ``headroom`` outside [0, 1).
    """
    if stage not in MICRO_BATCH_FIELDS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(MICRO_BATCH_FIELDS)}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    section_name, micro_key, accum_key = MICRO_BATCH_FIELDS[stage]
    section = getattr(cfg, section_name)
    micro, accum = getattr(section, micro_key), getattr(section, accum_key)
    effective, target = micro * accum, (1 - headroom) * available_mib
    chosen = None
    for b in (d for d in range(1, effective + 1) if effective % d == 0):
        trial = dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **{micro_key: b})})
        total = estimate(stage, trial, model_config, compute).total_mib
        if total > target:
            break  # the estimate grows with the micro-batch
        chosen = (b, total)
    fits = chosen is not None
    b, total = chosen if fits else (micro, estimate(stage, cfg, model_config, compute).total_mib)
    return {"stage": stage, "micro_batch": b, "accumulation": effective // b if fits else accum,
            "configured": [micro, accum], "estimate_mib": round(total, 1), "target_mib": round(target, 1),
            "fits": fits}


def with_micro_batch(cfg, choice: dict):
    """``cfg`` with ``choice``'s micro-batch and accumulation (from :func:`fit_micro_batch`) in its stage's
    section; ``cfg`` itself is not changed."""
    section_name, micro_key, accum_key = MICRO_BATCH_FIELDS[choice["stage"]]
    section = dataclasses.replace(getattr(cfg, section_name), **{micro_key: choice["micro_batch"],
                                                                  accum_key: choice["accumulation"]})
    return dataclasses.replace(cfg, **{section_name: section})


ADVICE = {
    "sft": "set sft.gradient_checkpointing=true, halve sft.per_device_train_batch_size (double the accumulation), "
           "or use sft.strategy=qlora",
    "reward": "keep reward.gradient_checkpointing=true, halve reward.per_device_train_batch_size, or lower "
              "reward.max_length",
    "ppo": "keep ppo.reward_device=cpu, halve ppo.micro_batch_size, set ppo.generation_batch_size, lower "
           "ppo.max_new_tokens, or use ppo.policy_precision=int4",
}


def plan(cfg, model_config, compute: str, budget_gib: float | None) -> list[dict]:
    """One row per training stage: predicted peak (MiB), its parts, whether it fits, what to change if not."""
    rows = []
    for stage in ("sft", "reward", "ppo"):
        est = estimate(stage, cfg, model_config, compute)
        fits = est.fits(budget_gib)
        rows.append({"stage": stage, "estimate_mib": round(est.total_mib, 1), "fits": fits,
                     "budget_gib": budget_gib, "advice": "" if fits else ADVICE[stage],
                     **{f"{k}_mib": round(v, 1) for k, v in est.breakdown.items()}})
    return rows

