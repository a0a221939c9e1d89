"""Every stage, the runner and the notebooks' `parameters` cells: Configuration: one dataclass per stage, named
profiles, JSON/YAML files and overrides.

Every field carries its meaning and source in ``metadata["help"]`` (listed by
``python -m edgerlhf.core.config [--profile P]``), like TRL's ``*Config`` classes.
Defaults are the research plan's (``../shared/RESEARCH_PLAN.md``) or the cited
paper's / library's. A *profile* (``tiny``, ``quick``, ``full``) is only a set of
dotted overrides such as ``{"data.n_train": 512}``; values are applied in this
order, later ones winning::

    dataclass defaults -> profile -> config file -> papermill parameters -> CLI flags
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .files import atomic_write_text


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
#: What Python's ``float()`` reads as a non-finite number (``nan``, ``inf``, ``-Infinity``): read so, then refused
#: by :func:`validate` with the key named, like YAML's ``.nan`` / ``.inf``.
_NONFINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)
#: Seeds must fit NumPy's legacy seeding (``numpy.random.seed``, called by transformers' ``set_seed``): [0, 2**32 - 1].
SEED_RANGE = (0, 2**32 - 1)
#: The profile every entry point starts from when none is named (the runner, the stage modules,
#: :func:`load_config`): it runs offline on a CPU with the embedded model.
DEFAULT_PROFILE = "quick"
#: Choices of the enumerated fields, shared with the stage modules that act on them.
PRECISIONS = ("bf16", "int8", "int4")
REWARD_METHODS = ("lora", "probe")
#: Stage 4's alignment algorithms (``ppo.algorithms``): this project's PPO, then TRL's (edgerlhf.core.trl_arms).
ALGORITHMS = ("ppo", "rloo", "grpo", "dpo")
#: What a probe's head reads of the reply (:func:`edgerlhf.core.reward_scoring.pool_states`).
PROBE_POOLINGS = ("last", "mean", "last+mean")
SFT_STRATEGIES = ("lora", "qlora", "full", "frozen", "distill")


#: Allowed values of a numeric or enumerated field (its ``limit``): ``(low, high)`` bounds (inclusive, None: open),
#: ``("above", x)`` (strictly greater) or ``("above", x, high)`` (and at most ``high``), or a tuple of choices.
_POSITIVE = (1, None)


def _f(default: Any, help: str, limit: Any = None) -> Any:
    """A dataclass field with a default, a help text and its allowed values (mutable defaults copied).

    ``limit`` (see :data:`_POSITIVE`'s comment) is kept in ``metadata["limit"]`` and checked by :func:`validate`.
    """
    metadata = {"help": help, "limit": limit}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Settings shared by every stage of one run."""

    root: str = _f(".", "Project root (str). `data/`, `models/` and `results/` are resolved against it.")
    run_dir: Optional[str] = _f(
        None, "Folder of this run's records and figures (str). None: `results/runs/<run_id>` is created."
    )
    seed: int = _f(42, "Seed for `random`, NumPy and torch (int). Research plan: 42.", limit=SEED_RANGE)
    deterministic: bool = _f(
        True, "Deterministic algorithms, warn-only (bool). Research plan: cudnn.deterministic=True, benchmark=False."
    )
    device: str = _f("auto", "Device (str): `auto` (CUDA if present, else CPU), `cpu`, `cuda`, `cuda:N`.")
    cpu_bf16: bool = _f(
        True, "On a CPU with native bf16 (Intel AMX or AVX512-BF16), reward models score and read probe features in "
        "bf16 as on a GPU (bool), except LLM.int8 (float32: in bf16 its scores moved with batching); 2-4x faster "
        "there than float32 (docs/measurements.md). Training and the PPO policy run in float32 on a CPU either way. "
        "False: float32 on every CPU, as a CPU without native bf16 runs. Records name the dtype that ran."
    )
    vram_budget_gib: Optional[float] = _f(
        8.0, "Device-memory cap in GiB (float) applied on CUDA so any card behaves like an 8 GB one; None: no cap.",
        limit=("above", 0.0)
    )
    max_oom_backoffs: int = _f(
        3, "Out-of-memory back-offs per training run or PPO step (int): each halves the micro-batch and doubles "
        "gradient accumulation, so the effective batch is unchanged; 0 lets the error through.", limit=(0, None)
    )
    log_level: str = _f(
        "INFO", "Level of the `edgerlhf` loggers (str: DEBUG, INFO, WARNING, ERROR). INFO logs each PPO step under "
        "TRL's metric names and shows progress bars (PPO steps, reward scoring); WARNING keeps only warnings.",
        limit=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    report_to: str = _f(
        "none", "Live training curves (str): `none`, or `tensorboard` (event files under `<run folder>/tensorboard/`: "
        "SFT and reward training under the Trainer's names, PPO steps under TRL's; needs the `tracking` extra).",
        limit=("none", "tensorboard")
    )
    auto_micro_batch: bool = _f(
        True, "On CUDA, SFT and reward training choose their micro-batch (bool): the largest divisor of the "
        "effective batch (micro-batch x accumulation, kept) whose planned peak "
        "(`edgerlhf.core.planner.fit_micro_batch`) "
        "fits the memory measured free under `vram_budget_gib`, less `micro_batch_headroom`; the choice is recorded. "
        "Ignored on a CPU, where the configured sizes stand (they were chosen for a CPU's RAM and speed)."
    )
    micro_batch_headroom: float = _f(
        0.25, "Fraction of the available device memory the micro-batch choice leaves free (float in [0, 0.9]) for "
        "what the planner does not model (allocator fragmentation, library buffers); 0.25 of 8 GiB plans for 6 GiB.",
        limit=(0.0, 0.9)
    )


@dataclass
class BaseModelConfig:
    """The base model every stage starts from."""

    name: str = _f(
        "distilgpt2",
        "Base model (str): a registry name (`distilgpt2`, `smollm2-135m-instruct`, `tiny-gpt2`, `tiny-llama`), "
        "a local folder, or a Hub id. Research plan: distilgpt2 (82 M parameters).",
    )
    models_dir: str = _f("models", "Folder for prepared base models and trained checkpoints (str).")


@dataclass
class DataConfig:
    """Stage 1: preference pairs from HH-RLHF (Bai et al. 2022)."""

    path: Optional[str] = _f(
        None, "Explicit input file (.jsonl, .jsonl.gz, .json, .csv) in HH-RLHF format (str). Tried first."
    )
    local_path: str = _f(
        "shared:data/hh-rlhf/harmless-base/test.jsonl.gz",
        "Local copy tried second (str; `shared:` means the shared folder beside the checkout).",
    )
    hub_id: str = _f("Anthropic/hh-rlhf", "Hub data set tried last (str). Research plan: Anthropic/hh-rlhf.")
    hub_data_dir: Optional[str] = _f(None, "Hub `data_dir` subset, e.g. `harmless-base` (str); None: all subsets.")
    hub_split: str = _f("train", "Hub split to sample from (str).")
    n_train: int = _f(5000, "Maximum training pairs after filtering (int). Research plan: 5,000.", limit=_POSITIVE)
    n_test: int = _f(1000, "Maximum held-out pairs after filtering (int). Research plan: 1,000.", limit=_POSITIVE)
    max_length: int = _f(
        512, "Maximum tokens of rendered prompt + longer reply (int); longer rows are dropped. Research plan: 512.",
        limit=(8, None)
    )
    out_dir: str = _f("data/prefs", "Folder of stage 1's set, `train_prefs.jsonl`, `test_prefs.jsonl` and "
                                    "`data_card.json`, replaced as one unit (str).")


_GROUP_HELP = (
    "Length-grouped micro-batches (bool): transformers' `LengthGroupedSampler` "
    "(`train_sampling_strategy='group_by_length'`) puts sequences of similar length in one micro-batch, so dynamic "
    "padding pads less (benchmarks/padding.py measures how much); False: random order (transformers' default). "
    "The full profile turns it on; at a micro-batch of 1 there is no padding to save."
)


@dataclass
class SFTStageConfig:
    """Stage 2: supervised fine-tuning on prompt + chosen reply. (Named apart from TRL's ``SFTConfig``, the
    trainer arguments this section is turned into.)"""

    strategy: str = _f(
        "lora",
        "One of `lora` (LoRA adapter), `qlora` (NF4 4-bit base + LoRA, Dettmers et al. 2023), `full` (all weights), "
        "`frozen` (first `frozen_layers` blocks frozen), `distill` (on-policy distillation from `teacher`, TRL) (str).",
        limit=SFT_STRATEGIES,
    )
    teacher: Optional[str] = _f(None, "With `distill`: teacher model, any registry name or folder sharing the tokenizer.")
    lora_r: int = _f(16, "LoRA rank r (int). Research plan: 16 (Hu et al. 2021 use 1-64).", limit=_POSITIVE)
    lora_alpha: int = _f(32, "LoRA scaling alpha (int). Research plan: 32.", limit=_POSITIVE)
    lora_dropout: float = _f(0.05, "LoRA dropout (float). Research plan: 0.05.", limit=(0.0, 0.99))
    target_modules: Optional[list] = _f(None, "LoRA target modules (list of str); None: chosen per architecture.")
    frozen_layers: int = _f(0, "With `frozen`: number of first transformer blocks kept frozen (int).", limit=(0, None))
    per_device_train_batch_size: int = _f(8, "Sequences per device per step (int). Research plan: 8.", limit=_POSITIVE)
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step (int). Research plan: 4.",
        limit=_POSITIVE)
    learning_rate: float = _f(1e-4, "Peak AdamW learning rate (float). Research plan: 1e-4.", limit=("above", 0.0))
    num_train_epochs: float = _f(3.0, "Epochs (float). Research plan: 3.", limit=("above", 0.0))
    warmup_ratio: float = _f(0.1, "Share of steps for linear warm-up (float). Research plan: ~10%.", limit=(0.0, 1.0))
    lr_scheduler_type: str = _f("linear", "`linear`, `cosine` or `constant_with_warmup` (str; transformers names).",
        limit=("linear", "cosine", "constant_with_warmup"))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (float). transformers default 1.0.", limit=("above", 0.0))
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (bool).")
    group_by_length: bool = _f(False, _GROUP_HELP)
    max_length: int = _f(512, "Maximum tokens per prompt + reply (int).", limit=(8, None))
    overlong: str = _f(
        "truncate_left",
        "Pairs longer than `max_length`: `truncate_left` drops the oldest prompt turns until they fit (counted), "
        "`drop` drops the pair (counted) (str).", limit=("truncate_left", "drop"),
    )
    max_train_samples: Optional[int] = _f(
        None, "Use only the first N training pairs, of those not kept for validation (int); None: all.", limit=_POSITIVE
    )
    max_eval_samples: Optional[int] = _f(
        None, "Validation pairs for eval loss, checkpoint choice, perplexity and samples: the last N pairs of the "
        "training file, never trained on (int); None: 5% of them. The held-out test pairs are not read.",
        limit=_POSITIVE
    )
    eval_steps: Optional[int] = _f(
        None, "Evaluate and checkpoint every N optimizer steps (int); None: once per epoch.", limit=_POSITIVE
    )
    logging_steps: int = _f(5, "Log the training loss every N optimizer steps (int).", limit=_POSITIVE)
    max_steps: int = _f(-1, "Stop after N optimizer steps (int); -1: run all epochs.")
    save_total_limit: int = _f(2, "Checkpoints kept in `output_dir/checkpoints` (int).", limit=_POSITIVE)
    resume: bool = _f(False, "Resume from the latest checkpoint in `output_dir/checkpoints` (bool).")
    keep_checkpoints: bool = _f(False, "Keep `output_dir/checkpoints` after a successful run (bool).")
    early_stopping_patience: int = _f(3, "Evaluations without eval-loss improvement before stopping (int).",
        limit=_POSITIVE)
    n_samples: int = _f(4, "Held-out prompts answered before and after training, side by side (int).", limit=(0, None))
    sample_max_new_tokens: int = _f(64, "Maximum new tokens of those sample replies (int).", limit=_POSITIVE)
    output_dir: str = _f("models/sft", "Output folder of the SFT model (str).")


@dataclass
class RewardStageConfig:
    """Stage 3: Bradley-Terry reward models (Ouyang et al. 2022) at several precisions. (Named apart from TRL's
    ``RewardConfig``.)"""

    precisions: list = _f(["bf16", "int8", "int4"], "Precisions to train under (list of `bf16`, `int8`, `int4`).")
    method: str = _f(
        "probe",
        "How each reward model is trained (str): `lora` - TRL `RewardTrainer`, LoRA on the SFT backbone plus a "
        "one-output head, Bradley-Terry loss (Ouyang et al. 2022); `probe` - the backbone frozen at the precision, "
        "each reply's states at block `probe_layer` (or the block `probe_layer_search` chooses) pooled as "
        "`probe_pooling` says, computed once per pair, and the one-output head fitted on them by "
        "L2-regularised logistic regression on chosen - rejected (a linear probe, Alain & Bengio 2016; C by 5-fold "
        "cross-validation). `probe` trains no backbone weights, so it is far cheaper than `lora` on a CPU, and gives "
        "an ordinary reward model (backbone + `score` head) that PPO loads the same way. Default `probe`: a bf16 `lora` "
        "model with these settings did not beat TF-IDF (docs/reward-models.md).", limit=REWARD_METHODS,
    )
    probe_layer: Optional[int] = _f(
        None, "With `probe`: read the state after the first N transformer blocks, through the final norm (int); "
        "the saved reward model is the SFT backbone truncated to N blocks plus the head, N/L of the compute. "
        "None: all blocks. Ignored when `probe_layer_search` is set.", limit=_POSITIVE,
    )
    probe_layer_search: list = _f(
        [], "With `probe`: the blocks N to choose `probe_layer` from (list of int; empty: no search). Features of "
        "every candidate come from one pass of the first precision in `precisions` over its training pairs; the "
        "block with the lowest 5-fold cross-validated log-loss there is used for every precision and the judge "
        "(the test pairs play no part). Linear probes often read preferences better from middle-to-late blocks "
        "than from the last (Alain & Bengio 2016); a block before the last also saves compute at every later "
        "pass.",
    )
    probe_pooling: str = _f(
        "last+mean", "With `probe`: what the head reads of each reply (str): `last` - the state at the last token "
        "(transformers' sequence-classification pooling, as a `lora` reward model reads it); `mean` - the mean "
        "of the states of the reply's tokens; `last+mean` - both, concatenated (a head of twice the hidden "
        "size). Default: the lowest 5-fold cross-validated log-loss on the quick split's training pairs "
        "(benchmarks/probe_pooling.py, results/benchmarks/probe_pooling-bf16.json).", limit=PROBE_POOLINGS,
    )
    seeds: list = _f(
        [42], "Seeds each `lora` reward model is trained with (list of int); accuracy is reported as mean +- sd "
        "across seeds, and the first seed's model is the one saved and used by PPO. A `probe` is one convex fit with "
        "the first seed; its training variance comes from the cross-fitted evaluation's fold draws.",
    )
    post_training_quantization: bool = _f(
        True, "Also load the trained bf16 model at every other precision without retraining (bool)."
    )
    crossfit_folds: int = _f(
        5, "With `probe`: folds K of the cross-fitted evaluation (int >= 2): every precision, post-training "
        "quantization and the baselines are fitted on K - 1 folds of all kept pairs that SFT did not train on and "
        "score the fold left out, on the same folds (edgerlhf.core.crossfit). 5 keeps 80% of the pairs for "
        "training, near the saved models' shares.", limit=(2, None),
    )
    crossfit_draws: int = _f(
        10, "With `probe`: random fold draws R of the cross-fitted evaluation (int >= 1); intervals are the "
        "corrected repeated k-fold t interval over the K * R folds (Bouckaert & Frank 2004 use 10 x 10).",
        limit=_POSITIVE,
    )
    crossfit_n_jobs: int = _f(
        -1, "Cross-fitted heads fitted at once, each in its own process (int; joblib's n_jobs, -1: one per core); "
        "the results do not depend on it.", limit=(-1, None),
    )
    per_device_train_batch_size: int = _f(4, "Pairs per device per step (int). Research plan: 4.", limit=_POSITIVE)
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step (int). Research plan: 4.",
        limit=_POSITIVE)
    learning_rate: float = _f(2e-4, "Peak learning rate (float). Research plan: 2e-4.", limit=("above", 0.0))
    num_train_epochs: float = _f(1.0, "Epochs (float). Research plan: 1.", limit=("above", 0.0))
    max_steps: int = _f(-1, "Stop after N optimizer steps (int); -1: run all epochs.")
    warmup_ratio: float = _f(0.1, "Share of steps for linear warm-up (float). Research plan: ~10%.", limit=(0.0, 1.0))
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule (str; transformers names).",
        limit=("linear", "cosine", "constant_with_warmup"))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (float). transformers default 1.0.", limit=("above", 0.0))
    max_length: int = _f(512, "Maximum tokens per prompt + reply; prompts are truncated from the left (int). Plan: 512.",
        limit=(8, None))
    gradient_checkpointing: bool = _f(True, "Gradient checkpointing (bool). Research plan: on.")
    group_by_length: bool = _f(False, _GROUP_HELP)
    lora_r: int = _f(16, "LoRA rank (int).", limit=_POSITIVE)
    lora_alpha: int = _f(32, "LoRA alpha (int).", limit=_POSITIVE)
    lora_dropout: float = _f(0.1, "LoRA dropout (float). Research plan: 0.1 against over-fitting.", limit=(0.0, 0.99))
    center_rewards_coefficient: Optional[float] = _f(
        None, "TRL reward centering (Eisenstein et al. 2023, Eq. 2); 0.01 is TRL's recommendation (float).",
        limit=(0.0, None)
    )
    validation_fraction: float = _f(
        0.1, "Share of training pairs held back for early stopping and temperature fitting (float).", limit=(0.01, 0.5)
    )
    judge: bool = _f(
        True,
        "Train a bf16 `judge` reward model on pairs that no proxy sees (the last `judge_fraction` of the training "
        "pairs), so every PPO experiment is judged by one model it was not trained against (bool).",
    )
    judge_fraction: float = _f(
        0.5, "Share of the training pairs reserved for the judge when `judge` is on (float, in (0, 1)).",
        limit=(0.05, 0.95),
    )
    max_train_samples: Optional[int] = _f(
        None, "Use only the first N training pairs of the proxies' share, and of the judge's (int); None: all.",
        limit=_POSITIVE
    )
    max_eval_samples: Optional[int] = _f(None, "Use only the first N held-out test pairs (int); None: all.",
        limit=_POSITIVE)
    eval_steps: Optional[int] = _f(None, "Validate and checkpoint every N optimizer steps (int); None: each epoch.",
        limit=_POSITIVE)
    logging_steps: int = _f(5, "Log the training loss every N optimizer steps (int).", limit=_POSITIVE)
    save_total_limit: int = _f(2, "Checkpoints kept per precision (int).", limit=_POSITIVE)
    resume: bool = _f(False, "Resume each precision from its latest checkpoint (bool).")
    keep_checkpoints: bool = _f(False, "Keep checkpoints after a successful run (bool).")
    early_stopping_patience: int = _f(3, "Validations without accuracy improvement before stopping (int). Plan: 3.",
        limit=_POSITIVE)
    score_batch_size: int = _f(8, "Replies per batch when scoring with a saved reward model (int).", limit=_POSITIVE)
    feature_batch_size: int = _f(
        2, "Pairs per batch when computing the frozen backbone's features for `probe` (int); prompts and replies "
        "are padded, so on a CPU small batches are fastest (docs/measurements.md).", limit=_POSITIVE,
    )
    output_dir: str = _f("models/rm", "Output folder; one sub-folder per reward model (str).")


@dataclass
class PPOStageConfig:
    """Stage 4: PPO with a KL penalty to the SFT reference (Ziegler et al. 2019; Ouyang et al. 2022)."""

    experiments: list = _f(
        ["bf16", "int8", "int4"], "Reward-model precisions to align against, one PPO run each (EXP-1/2/3) (list)."
    )
    seeds: Optional[list] = _f(
        None, "PPO training seeds (list of int); None: `run.seed` alone. Every arm runs every seed with common random "
        "numbers (seed s gives every arm the same prompt order and sampling stream, and its evaluation the same "
        "sampling seed), comparisons pair prompts and seeds, and with two or more seeds their intervals are t "
        "intervals across seeds. The first seed's policy is the one saved."
    )
    placebo: bool = _f(
        True, "Also run a placebo arm (bool): the same PPO, seed and prompts with rewards drawn at random on the bf16 "
        "proxy's scale (`edgerlhf.core.arms.placebo_scorer`), so each arm's judge change is read net of the drift "
        "any PPO run causes."
    )
    algorithms: list = _f(
        ["ppo"], "Alignment algorithms run as arms (list of `ppo`, `rloo`, `grpo`, `dpo`): `ppo` - this project's PPO "
        "against every precision in `experiments` (arms named by the precision); `rloo` / `grpo` - TRL's "
        "`RLOOTrainer` (Ahmadian et al. 2024) / `GRPOTrainer` (Shao et al. 2024) against every precision in "
        "`trl_experiments` (arms `rloo-bf16`...); `dpo` - TRL's `DPOTrainer` (Rafailov et al. 2023) on the proxies' "
        "training pairs, no reward model (arm `dpo`). Every arm trains the same policy LoRA on the same prompts and "
        "seeds and is evaluated the same way; all are read against PPO's placebo (edgerlhf.core.trl_arms)."
    )
    trl_experiments: list = _f(
        ["bf16", "int8", "int4"], "Reward-model precisions the `rloo` and `grpo` arms align against (list)."
    )
    num_generations: int = _f(
        4, "RLOO / GRPO: completions sampled per prompt (int >= 2; TRL's `num_generations`). A step samples "
        "`batch_size` completions, as PPO's rollout does, so `batch_size / num_generations` prompts. Ahmadian et al. "
        "2024: k = 4.", limit=(2, None),
    )
    dpo_beta: float = _f(
        0.1, "DPO's beta (float; TRL's `DPOConfig.beta`), the weight of its implicit KL to the SFT model. Rafailov "
        "et al. 2023: 0.1.", limit=("above", 0.0),
    )
    reward_mode: str = _f(
        "trained", "`trained` (reward model trained under that precision) or `ptq` (bf16 model quantized on load).",
        limit=("trained", "ptq")
    )
    steps: int = _f(100, "PPO iterations, each one rollout batch (int).", limit=_POSITIVE)
    batch_size: int = _f(32, "Prompts per rollout batch (int). Research plan: 32.", limit=_POSITIVE)
    micro_batch_size: int = _f(
        2, "Sequences per micro-batch: one backward pass's loss, a token mean over their reply tokens (int); "
        "`micro_batch_size * gradient_accumulation_steps` sequences make one minibatch (one optimizer step). They "
        "go through forward/backward `rows_per_pass` at a time. Research plan: 2.", limit=_POSITIVE
    )
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step (int). Research plan: 4.",
        limit=_POSITIVE)
    generation_batch_size: Optional[int] = _f(
        None, "Prompts per `generate` call (int); None: the whole batch. The old log-probs' pass over the replies "
        "runs per `generate` call, on its prompts' cache; the reference pass takes the rollout's rows sorted by "
        "length, this many at a time (None: one minibatch, `micro_batch_size * gradient_accumulation_steps`). Halved "
        "with the micro-batch on an out-of-memory back-off (bounds the KV cache).", limit=_POSITIVE
    )
    padding_free: bool = _f(
        True, "Pack the rows of each update pass into one sequence without padding (bool; TRL's `padding_free`): "
        "no compute on padding, attention over the packed length. False: pad to the pass's longest row."
    )
    rows_per_pass: Optional[int] = _f(
        1, "Rows per forward/backward pass inside an update micro-batch (int); None: the whole micro-batch in one "
        "pass. The micro-batch's loss stays its token mean (each pass weighted by its share of the reply tokens), so "
        "only memory and time change: one row per pass holds one row's activations and needs no packed attention "
        "mask (docs/measurements.md).",
        limit=_POSITIVE
    )
    logprobs_from_generation: bool = _f(
        False, "Take the old policy log-probs and values from the generation pass instead of a no-grad pass over "
        "the reply tokens (bool; that pass reuses the prompt's cached keys and values, `edgerlhf.core.rollout."
        "reply_logprobs`): one pass fewer per step; they match the recomputed ones to ~1e-6 in float32 (the "
        "generation runs with the adapter folded into the weights), so the first PPO ratio is 1 up to rounding."
    )
    ppo_epochs: int = _f(4, "Optimisation epochs per rollout batch (int). Schulman et al. 2017; TRL: 4.",
        limit=_POSITIVE)
    learning_rate: float = _f(1.41e-5, "Adam learning rate of the policy's LoRA (float). Research plan / TRL: 1.41e-5.",
        limit=("above", 0.0))
    value_learning_rate: float = _f(
        1e-4, "Adam learning rate of the value head (float); higher than the policy's because the head starts at 0.",
        limit=("above", 0.0)
    )
    max_new_tokens: int = _f(
        64, "Maximum new tokens per reply (int; `generate`'s `max_new_tokens`, TRL's `response_length`). Research "
        "plan: 64.", limit=_POSITIVE
    )
    min_new_tokens: int = _f(
        0, "Minimum new tokens per reply: EOS is suppressed before it (int; `generate`'s `min_new_tokens`); 0: none. "
        "Equal to `max_new_tokens` it forces a fixed length (benchmarks).", limit=(0, None)
    )
    max_prompt_length: int = _f(256, "Prompts longer than this are truncated from the left by whole turns (int).",
        limit=(8, None))
    temperature: float = _f(0.7, "Sampling temperature (float); every log-prob forward divides logits by it.",
        limit=("above", 0.0))
    top_k: int = _f(0, "Top-k sampling (int); 0 disables it, so PPO samples the full distribution.", limit=(0, None))
    top_p: float = _f(1.0, "Nucleus sampling (float); 1.0 disables it.", limit=("above", 0.0, 1.0))
    missing_eos_penalty: float = _f(
        0.0, "Subtracted from the score of replies that never emit EOS (float); 0: none (TRL's missing_eos_penalty).",
        limit=(0.0, None)
    )
    score_norm: bool = _f(False, "Normalise scores with running mean/std before adding them (bool).")
    reward_norm_samples: int = _f(
        0, "SFT replies used to set reward gain/bias so SFT scores have mean 0, std 1 (Ziegler et al. 2019) (int); "
        "0: off.", limit=(0, None)
    )
    init_kl_coef: float = _f(0.1, "Initial KL coefficient beta (float). Research plan: 0.1.", limit=(0.0, None))
    adaptive_kl: bool = _f(True, "Adaptive KL controller of Ziegler et al. 2019 (bool).")
    adaptive_kl_target: float = _f(
        6.0, "Target KL (nats per sequence) of the adaptive KL controller (float; TRL 0.x's `target`, not CleanRL's "
        "`target_kl`, which is `approx_kl_stop` here). Research plan: 6.", limit=("above", 0.0)
    )
    kl_horizon: int = _f(10000, "Horizon of the adaptive controller, in samples (int). Ziegler et al.: 10,000.",
        limit=_POSITIVE)
    kl_estimator: str = _f("k1", "Per-token KL estimator: `k1` (log ratio) or `k3` (Schulman 2020) (str).",
        limit=("k1", "k3"))
    gamma: float = _f(1.0, "Discount gamma (float). Research plan: 1.0.", limit=(0.0, 1.0))
    lam: float = _f(0.95, "GAE lambda (float). Research plan: 0.95 (Schulman et al. 2016).", limit=(0.0, 1.0))
    whiten_advantages: bool = _f(True, "Whiten advantages over the batch's real tokens (bool). Huang et al. 2024.")
    cliprange: float = _f(0.2, "Policy ratio clip epsilon (float). Schulman et al. 2017: 0.2.", limit=("above", 0.0))
    cliprange_value: float = _f(0.2, "Value clip range (float). Research plan: 0.2.", limit=("above", 0.0))
    vf_coef: float = _f(0.1, "Value-loss coefficient (float). Research plan: 0.1.", limit=(0.0, None))
    max_grad_norm: float = _f(0.5, "Gradient clipping norm (float). Research plan: 0.5.", limit=("above", 0.0))
    approx_kl_stop: Optional[float] = _f(
        None, "Stop a batch's PPO epochs once the mean approximate KL exceeds this (float; CleanRL's `target_kl`); "
        "None: never.", limit=("above", 0.0)
    )
    lora_r: int = _f(16, "LoRA rank of the PPO adapter (int).", limit=_POSITIVE)
    lora_alpha: int = _f(32, "LoRA alpha of the PPO adapter (int).", limit=_POSITIVE)
    target_modules: Optional[list] = _f(
        None, "Module names the PPO adapter wraps (list of str); None: every attention and MLP projection of the "
        "architecture (`q_proj` ... `down_proj` for Llama)."
    )
    policy_precision: str = _f("bf16", "Precision of the policy's frozen base: `bf16`, `int8` or `int4` (str).",
        limit=PRECISIONS)
    reward_device: str = _f("cpu", "Device of the reward model (str). Research plan: CPU to save VRAM.")
    score_batch_size: int = _f(8, "Replies per reward-model batch (int).", limit=_POSITIVE)
    n_eval_prompts: int = _f(
        128, "Held-out prompts for the before/after evaluation (int); 128 detects a mean judge change of 0.25 "
        "standard deviations (paired, 80% power).", limit=_POSITIVE,
    )
    eval_batch_size: Optional[int] = _f(
        None, "Prompts per `generate` call when sampling evaluation replies: the SFT and PPO replies to the held-out "
        "prompts and best-of-n's (int); None: `batch_size`. Generation reads every weight once per token for the "
        "whole batch, so larger batches sample faster (docs/measurements.md).", limit=_POSITIVE,
    )
    n_implicit_reward_pairs: int = _f(
        1000, "Held-out labelled pairs for the implicit-reward check (int): the share where the policy raises "
        "log pi(chosen) - log pi(rejected) over the SFT model (Rafailov et al. 2023's implicit reward). Plan: all 1,000.",
        limit=_POSITIVE,
    )
    best_of_n: int = _f(
        16, "SFT replies sampled per held-out prompt for best-of-n (int): each proxy picks its best of the first k, "
        "k = 1, 2, 4, ..., n, and every judge scores the picks (Stiennon et al. 2020; Gao et al. 2023 use n up to "
        "thousands; 16 reaches KL_bon = log 16 - 15/16 = 1.84 nats). 0 turns best-of-n off; otherwise at least 2.",
        limit=(0, None),
    )
    best_of_n_prompts: int = _f(
        384, "Held-out prompts for best-of-n (int): the first N test prompts, the PPO evaluation's among them. 384 "
        "is the size the alignment issue sets for a between-precision minimum detectable difference of 0.05 judge "
        "units at n = 16.", limit=_POSITIVE,
    )
    eval_every: int = _f(0, "Also evaluate every N steps for the over-optimisation curve (int); 0: start and end.",
        limit=(0, None))
    checkpoint_every: int = _f(10, "Save a checkpoint every N steps (int).", limit=_POSITIVE)
    resume: bool = _f(False, "Resume each experiment from its latest checkpoint (bool).")
    keep_checkpoints: bool = _f(False, "Keep checkpoints after a successful run (bool).")
    output_dir: str = _f("models/ppo", "Output folder; one sub-folder per experiment (str).")


@dataclass
class Config:
    """The whole pipeline's configuration; one section per stage."""

    profile: str = _f("full", "Name of the profile the values started from (str).")
    run: RunConfig = field(default_factory=RunConfig)
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)

    def to_dict(self) -> dict:
        """Return the configuration as a nested plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)


#: Named profiles: dotted overrides of the dataclass defaults. `full` is the research plan.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"reward.seeds": [42, 43, 44], "sft.group_by_length": True, "reward.group_by_length": True,
             # Ziegler et al.'s 10,000-sample horizon spans 1% of their 1M episodes; of this run's 100 x 32 = 3,200
             # it would let beta move 6% at most, so the controller would never act. 320: up to e^2 (docs/ppo.md)
             "ppo.kl_horizon": 320},
    "quick": {
        "model.name": "smollm2-135m-instruct",
        "data.n_train": 1632,  # every pair of the shared file not held out: 816 for the proxies, 816 for the judge
        "data.n_test": 384,
        "data.max_length": 384,
        "sft.num_train_epochs": 1.0,
        "sft.per_device_train_batch_size": 1,  # x 8 accumulation: the same batch of 8 in less memory
        "sft.gradient_accumulation_steps": 8,  # (peak RSS per micro-batch size: docs/measurements.md)
        "sft.max_length": 384,
        "sft.max_train_samples": 128,
        "sft.max_eval_samples": 32,
        "sft.eval_steps": 8,
        "sft.logging_steps": 2,
        "reward.method": "probe",
        # of SmolLM2-135M's 30 blocks; the first pass runs 24, later ones stop at the chosen block. The last block
        # is left out: 30 blocks cost 25% more than 24 at every pass, and it cross-validated worse (docs/benchmarks.md)
        "reward.probe_layer_search": [8, 12, 16, 20, 24],
        "reward.seeds": [42],  # a probe is a convex fit: seeds only move its CV folds
        "reward.max_length": 384,
        "ppo.steps": 5,
        "ppo.batch_size": 8,
        "ppo.micro_batch_size": 2,
        "ppo.gradient_accumulation_steps": 2,
        "ppo.ppo_epochs": 2,
        "ppo.learning_rate": 1e-4,
        "ppo.max_new_tokens": 32,
        "ppo.max_prompt_length": 192,
        # every algorithm once, PPO's precisions and the placebo included, in the 45-minute budget: one seed, 48
        # prompts and pairs (per arm: 126 s of PPO and its evaluation, 131-179 s for RLOO, GRPO, DPO; two seeds of
        # every arm would take about 60 minutes; the machine's speed varies: docs/research.md). The study profile
        # runs three seeds.
        "ppo.seeds": [42],
        "ppo.algorithms": ["ppo", "rloo", "grpo", "dpo"],
        "ppo.trl_experiments": ["bf16"],
        "ppo.n_eval_prompts": 48,
        "ppo.eval_batch_size": 48,
        "ppo.n_implicit_reward_pairs": 48,  # a sample: each pair costs passes of the policy and the SFT model
        "ppo.best_of_n": 4,
        "ppo.best_of_n_prompts": 64,
        "ppo.eval_every": 0,
        "ppo.checkpoint_every": 3,
    },
    "tiny": {
        "model.name": "tiny-gpt2",
        "data.n_train": 48,
        "data.n_test": 16,
        "data.max_length": 256,
        "sft.num_train_epochs": 1.0,
        "sft.per_device_train_batch_size": 4,
        "sft.gradient_accumulation_steps": 1,
        "sft.learning_rate": 1e-3,
        "sft.max_length": 256,
        "sft.max_train_samples": 16,
        "sft.max_eval_samples": 8,
        "sft.eval_steps": 2,
        "sft.logging_steps": 1,
        "sft.n_samples": 2,
        "sft.sample_max_new_tokens": 8,
        "reward.method": "probe",
        "reward.seeds": [42, 43],
        "reward.crossfit_draws": 2,
        "reward.per_device_train_batch_size": 4,
        "reward.gradient_accumulation_steps": 1,
        "reward.learning_rate": 1e-3,
        "reward.max_length": 256,
        "reward.max_train_samples": 24,
        "reward.max_eval_samples": 16,
        "reward.eval_steps": 2,
        "reward.logging_steps": 1,
        "reward.gradient_checkpointing": False,
        "ppo.steps": 2,
        "ppo.batch_size": 4,
        "ppo.micro_batch_size": 2,
        "ppo.gradient_accumulation_steps": 1,
        "ppo.ppo_epochs": 1,
        "ppo.learning_rate": 1e-3,
        "ppo.max_new_tokens": 8,
        "ppo.max_prompt_length": 128,
        "ppo.seeds": [42, 43],  # two: the end-to-end test runs the comparisons across seeds (t intervals)
        "ppo.n_eval_prompts": 4,
        "ppo.n_implicit_reward_pairs": 4,
        "ppo.best_of_n": 2,
        "ppo.best_of_n_prompts": 4,
        "ppo.eval_every": 1,
        "ppo.checkpoint_every": 1,
    },
}
#: `study`: the quick profile's data and models with the alignment evaluation at the size the alignment issue sets:
#: best-of-16 on 384 held-out prompts (a between-precision MDE of about 0.05 judge units) and every algorithm (PPO,
#: RLOO, GRPO at every precision; DPO) with 3 seeds per arm, the placebo included, evaluated on 384 prompts. It
#: reuses a quick run's stages 1-3 (`--only 04`).
PROFILES["study"] = {**PROFILES["quick"], "ppo.best_of_n": 16, "ppo.best_of_n_prompts": 384, "ppo.seeds": [42, 43, 44],
                     "ppo.steps": 20, "ppo.n_eval_prompts": 384, "ppo.n_implicit_reward_pairs": 384,
                     "ppo.trl_experiments": ["bf16", "int8", "int4"]}


#: Old field names, refused with the new name: each old one meant something else to TRL and CleanRL readers.
RENAMED: dict[str, str] = {
    "ppo.target_kl": "ppo.adaptive_kl_target (CleanRL's target_kl, an early-stopping threshold, is "
                     "ppo.approx_kl_stop)",
    "ppo.mini_batch_size": "ppo.micro_batch_size",
    "ppo.response_length": "ppo.max_new_tokens",
    "ppo.min_response_length": "ppo.min_new_tokens",
}


def _allowed(tp: Any, value: Any) -> bool:
    """True when ``value`` fits the annotation ``tp`` (int accepted for float fields)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_allowed(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is not None:
        tp = origin
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def set_value(cfg: Config, key: str, value: Any, origin: str = "override") -> None:
    """Set the dotted field ``key`` (e.g. ``"data.n_train"``) of ``cfg`` to ``value``.

    Raises:
        KeyError: unknown section or field; the message lists the valid names and ``origin``.
        TypeError: the value does not fit the field's type; the message names field and origin.
    """
    section_name, _, name = key.partition(".")
    target: Any = cfg
    if name:
        if section_name not in {f.name for f in dataclasses.fields(Config)} or section_name == "profile":
            raise KeyError(f"{origin}: unknown config section {section_name!r} in {key!r}")
        target = getattr(cfg, section_name)
    else:
        name = section_name
    hints = typing.get_type_hints(type(target))
    if key in RENAMED:
        raise KeyError(f"{origin}: config field {key!r} was renamed to {RENAMED[key]}")
    if name not in hints:
        valid = ", ".join(sorted(hints))
        raise KeyError(f"{origin}: unknown config field {key!r}; valid fields of this section: {valid}")
    hint = hints[name]
    wants_float = hint is float or float in typing.get_args(hint)
    if wants_float and isinstance(value, str) and any(r.fullmatch(value.strip()) for r in (_FLOAT, _NONFINITE)):
        value = float(value)  # YAML 1.1 reads `1e-4` (no dot) or `nan` as a string; validate() refuses non-finite
    if not _allowed(hints[name], value):
        raise TypeError(f"{origin}: field {key!r} expects {hints[name]}, got {value!r} ({type(value).__name__})")
    if wants_float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    setattr(target, name, value)


def _violation(value: Any, rule: Any) -> str | None:
    """Why ``value`` breaks ``rule`` (a field's ``limit``, see :func:`_f`), or None when it is allowed (None always is)."""
    if value is None:
        return None
    if rule and rule[0] == "above":
        high = rule[2] if len(rule) > 2 else None
        if value > rule[1] and (high is None or value <= high):
            return None
        return f"must be > {rule[1]}" if high is None else f"must be in ({rule[1]}, {high}]"
    if all(isinstance(r, (int, float)) or r is None for r in rule):
        low, high = rule
        if (low is not None and value < low) or (high is not None and value > high):
            return f"must be >= {low}" if high is None else f"must be in [{low}, {high}]"
        return None
    return None if value in rule else f"must be one of {list(rule)}"


def _fields(cfg: Config):
    """``(dotted key, annotation, value, limit)`` of every field of every section of ``cfg``."""
    for section in dataclasses.fields(Config):
        if section.name == "profile":
            continue
        obj = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            yield f"{section.name}.{f.name}", hints[f.name], getattr(obj, f.name), f.metadata["limit"]


def validate(cfg: Config, origins: dict[str, str] | None = None) -> Config:
    """Check every field's type and finiteness, every field against its ``limit`` and the cross-field rules;
    returns ``cfg``.

    Every field of every section must fit its annotation (also for a Config built or changed in code), and no
    float field may be NaN or +-inf (NaN passes any comparison-based range check). ``run.seed`` and every
    ``reward.seeds`` entry must lie in :data:`SEED_RANGE` (what ``numpy.random.seed`` accepts); ``ppo.top_p`` in
    (0, 1].
    Cross-field rules: ``sft.max_steps``/``reward.max_steps``/``reward.crossfit_n_jobs`` are -1 or >= 1;
    ``reward.precisions``, ``ppo.experiments`` and ``ppo.trl_experiments`` are non-empty lists within
    :data:`PRECISIONS`; ``ppo.algorithms`` a non-empty list of distinct :data:`ALGORITHMS`, and with TRL's arms
    ``ppo.batch_size`` a multiple of ``ppo.micro_batch_size`` (and of ``ppo.num_generations`` for RLOO / GRPO);
    ``reward.seeds`` and ``ppo.seeds`` (unless None) are non-empty lists of distinct int;
    ``reward.probe_layer_search`` holds ints >= 1; ``ppo.max_prompt_length + ppo.max_new_tokens <=
    reward.max_length`` (tokens), so every PPO reply fits the reward model; ``ppo.micro_batch_size <=
    ppo.batch_size``; ``ppo.best_of_n`` is 0 or >= 2. ``origins`` (key -> where it was set: profile, config file,
    parameter, command-line flag) is named in the message.

    Raises:
        ValueError: one message listing every offending key with its value, origin and the allowed range.
    """
    origins = origins or {}
    problems, non_finite = [], set()
    for key, hint, value, _ in _fields(cfg):
        if not _allowed(hint, value):
            problems.append(f"{key}={value!r} ({origins.get(key, 'default')}) must be of type "
                            f"{getattr(hint, '__name__', hint)}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key}={value!r} ({origins.get(key, 'default')}) must be a finite number")
            non_finite.add(key)
    if len(problems) > len(non_finite):  # a wrong type: the rules below compare values of the declared types
        raise ValueError(f"config (profile {cfg.profile!r}): " + "; ".join(problems))
    for key, _, value, rule in _fields(cfg):
        if rule is None or key in non_finite:
            continue
        why = _violation(value, rule)
        if why:
            problems.append(f"{key}={value!r} ({origins.get(key, 'default')}) {why}")
    for key in ("sft.max_steps", "reward.max_steps", "reward.crossfit_n_jobs"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != -1 and value < 1:
            problems.append(f"{key}={value!r} must be -1 ({'no limit' if name == 'max_steps' else 'every core'}) "
                            "or >= 1")
    for key in ("reward.precisions", "ppo.experiments", "ppo.trl_experiments"):
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if not value or any(v not in PRECISIONS for v in value):
            problems.append(f"{key}={value!r} must be a non-empty list within {list(PRECISIONS)}")
    search = cfg.reward.probe_layer_search
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in search):
        problems.append(f"reward.probe_layer_search={search!r} must be a list of int >= 1 (transformer blocks)")
    for key, seeds in (("reward.seeds", cfg.reward.seeds), ("ppo.seeds", cfg.ppo.seeds)):
        if key == "ppo.seeds" and seeds is None:
            continue
        if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or _violation(s, SEED_RANGE) for s in seeds):
            problems.append(f"{key}={seeds!r} must be a non-empty list of int in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        elif len(set(seeds)) < len(seeds):
            problems.append(f"{key}={seeds!r} must not repeat a seed")
    p = cfg.ppo
    if not p.algorithms or any(a not in ALGORITHMS for a in p.algorithms) or len(set(p.algorithms)) < len(p.algorithms):
        problems.append(f"ppo.algorithms={p.algorithms!r} must be a non-empty list of distinct names within "
                        f"{list(ALGORITHMS)}")
    elif set(p.algorithms) - {"ppo"} and p.batch_size % p.micro_batch_size:
        problems.append(f"ppo.batch_size={p.batch_size} must be a multiple of ppo.micro_batch_size="
                        f"{p.micro_batch_size} for the {', '.join(a for a in p.algorithms if a != 'ppo')} arms")
    elif {"rloo", "grpo"} & set(p.algorithms) and p.batch_size % p.num_generations:
        problems.append(f"ppo.batch_size={p.batch_size} must be a multiple of ppo.num_generations="
                        f"{p.num_generations} for the rloo / grpo arms")
    if p.max_prompt_length + p.max_new_tokens > cfg.reward.max_length:
        problems.append(f"ppo.max_prompt_length + ppo.max_new_tokens = {p.max_prompt_length} + "
                        f"{p.max_new_tokens} must be <= reward.max_length={cfg.reward.max_length} (tokens), so "
                        "every PPO reply fits the reward model")
    if p.min_new_tokens > p.max_new_tokens:
        problems.append(f"ppo.min_new_tokens={p.min_new_tokens} must be <= ppo.max_new_tokens="
                        f"{p.max_new_tokens}")
    if p.best_of_n == 1:
        problems.append("ppo.best_of_n=1 must be 0 (off) or >= 2: best of one reply is the SFT reply")
    if p.micro_batch_size > p.batch_size:
        problems.append(f"ppo.micro_batch_size={p.micro_batch_size} must be <= ppo.batch_size={p.batch_size}")
    if problems:
        raise ValueError(f"config (profile {cfg.profile!r}): " + "; ".join(problems))
    return cfg


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Turn ``{"data": {"n_train": 5}}`` into ``{"data.n_train": 5}`` (``profile`` stays top-level)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into dotted overrides.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON/YAML or not a mapping (message names the file).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    return flatten(tree)


def load_config(
    profile: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[dict[str, Any]] | None = None,
    cli: dict[str, Any] | None = None,
) -> Config:
    """Build a :class:`Config`: defaults, then ``profile``, file, ``overrides``, ``cli`` (later wins).

    ``overrides`` are papermill parameters: one dict, or a list of dicts applied in order
    (a notebook passes its ``overrides`` dict, then its named parameters). Entries whose
    value is ``None`` are ignored so that a notebook parameter left at ``None`` keeps the
    profile's value. ``profile`` None means the file's ``profile`` key, else :data:`DEFAULT_PROFILE`.

    Raises:
        KeyError: unknown profile or field. TypeError: a value of the wrong type.
        ValueError: a value out of its allowed range (:func:`validate`).
    """
    file_values = read_config_file(config_file) if config_file else {}
    profile = profile or file_values.pop("profile", None) or DEFAULT_PROFILE
    file_values.pop("profile", None)
    if profile not in PROFILES:
        raise KeyError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = Config(profile=profile)
    layers = [
        (f"profile {profile!r}", PROFILES[profile]),
        (f"config file {config_file}", file_values),
    ]
    for values in [overrides] if isinstance(overrides, dict) else (overrides or []):
        layers.append(("parameter", {k: v for k, v in values.items() if v is not None}))
    layers.append(("command-line flag", cli or {}))
    origins: dict[str, str] = {}
    for origin, values in layers:
        for key, value in values.items():
            set_value(cfg, key, value, origin)
            origins[key] = origin
    return validate(cfg, origins)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as JSON (``.json``) or YAML (other suffixes), atomically; returns the path."""
    path = Path(path)
    tree = cfg.to_dict()
    text = json.dumps(tree, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(tree, sort_keys=False)
    return atomic_write_text(path, text)


#: Help text of every ``--set`` flag.
SET_HELP = ("override any config field, e.g. data.n_train=100 or 'reward.precisions=[bf16]' (repeatable; the "
            "fields: python -m edgerlhf.core.config)")


def parse_cli_sets(items: list[str]) -> dict[str, Any]:
    """Parse ``["data.n_train=100", "model.name=x"]`` (``--set`` flags) into typed overrides.

    Values are read as YAML scalars/lists (``100`` -> int, ``null`` -> None, ``[a, b]`` -> list, ``.nan`` /
    ``.inf`` -> float; ``nan`` / ``inf`` stay strings that a float field reads as floats). Non-finite values are
    refused later, by :func:`validate`.

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def field_help(profile: str | None = None) -> str:
    """Every config field, one entry each: ``section.name = value  (type)`` and its help text.

    The value is the dataclass default, or with ``profile`` the value that profile gives it (marked
    ``[profile]`` where the profile changes it).

    Raises:
        KeyError: unknown profile.
    """
    if profile is not None and profile not in PROFILES:
        raise KeyError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = load_config(profile) if profile else Config()
    changed = PROFILES.get(profile, {}) if profile else {}
    lines = []
    for section in dataclasses.fields(Config):
        if section.name == "profile":
            continue
        hints = typing.get_type_hints(section.default_factory)  # type: ignore[arg-type]
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            key = f"{section.name}.{f.name}"
            value = getattr(getattr(cfg, section.name), f.name)
            kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
            mark = f"  [{profile}]" if key in changed else ""
            lines.append(f"{key} = {value!r}  ({kind}){mark}\n    {f.metadata['help']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m edgerlhf.core.config [--profile P]``: list every field with its value and help; returns 0."""
    import argparse

    parser = argparse.ArgumentParser(
        description="List every EdgeRLHF config field (the keys of --set, config files and papermill "
                    "`overrides`) with its type, value and help. Values are applied in this order, later ones "
                    "winning: dataclass defaults -> profile -> config file -> papermill parameters -> --set flags.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="show the values under this profile (default: the dataclass defaults)")
    args = parser.parse_args(argv)
    print(field_help(args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
