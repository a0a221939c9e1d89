"""Stage 4 (04_PPO_Alignment): PPO with a KL penalty for language models, the algorithm alone.

Read top to bottom, as CleanRL's ``ppo.py`` (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"; Ouyang et al. 2022; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"):

1. masked statistics   means, variances and whitening over real reply tokens
2. response mask       real reply tokens: up to and including the first EOS
3. rewards             per-token ``-beta * KL_t``, plus the (normalised) score at the last real token
4. advantages          GAE (gamma, lambda), whitened over real tokens
5. losses              clipped surrogate and clipped value loss
6. KL controller       beta fixed or adaptive
7. update              PPO epochs over shuffled minibatches of micro-batches
8. ppo_step            one iteration: rollout, score, rewards, GAE, update, KL control

Generation and the forward passes (old, new and reference log-probs) are in :mod:`edgerlhf.core.rollout`. One
backbone holds policy (LoRA on), reference (LoRA off) and value head (a linear layer on the last hidden state).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .memory import returning_freed_memory, trim_heap
from .rollout import decode_responses, forward_logprobs, gather_rollouts, reference_logprobs, rollout

# --------------------------------------------------------------------------------------------
# 1. masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (any shape, same shape)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``x`` over masked positions (Bessel's correction)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to mean 0, std 1 over masked positions; masked-out entries become 0.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as TRL does for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --------------------------------------------------------------------------------------------
# 2. response mask: :func:`edgerlhf.core.rollout.response_mask`, applied by the rollout (which cannot import this)
# 3. per-token KL and rewards


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) in nats for sampled tokens (Schulman 2020, "Approximating KL").

    ``k1 = log pi - log pi_ref`` (unbiased, can be negative); ``k3 = (r - 1) - log r`` with ``r = pi_ref / pi``
    (unbiased, non-negative). Shapes: any, the same for both.

    Raises:
        ValueError: unknown estimator.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a ``[B, R]`` mask (the EOS when one was emitted)."""
    return (mask.sum(dim=1) - 1).clamp(min=0).long()


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    beta: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-beta * KL_t`` with the score added at the last real token (Ziegler et al. 2019, eq. 2).

    Args:
        scores: ``[B]``. logprobs, ref_logprobs, mask: ``[B, R]``.
    Returns:
        ``(rewards [B, R], kl [B, R])``, both zero after the last real token.
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    rewards = -beta * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.device)
    return rewards, kl


def final_scores(raw_scores: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float,
                 moments: RunningMoments | None = None) -> torch.Tensor:
    """The scores added at the last real token: ``raw_scores [B]`` less ``missing_eos_penalty`` where ``ended [B]``
    is False (TRL's ``missing_eos_penalty``), then, with ``moments``, normalised by the running mean and std after
    folding this batch in (TRL's ``use_score_scaling`` with ``use_score_norm``). Returns ``FloatTensor[B]``."""
    scores = raw_scores - missing_eos_penalty * (~ended).float()
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / moments.std
    return scores


class RunningMoments:
    """Running mean and standard deviation over all values seen (Chan et al. 1979, parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of values into the running statistics."""
        x = x.detach().double()
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


# --------------------------------------------------------------------------------------------
# 4. advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over reply tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``. Positions after the last real
    token have value and reward 0, so the last real token bootstraps from 0 (the episode ends there).

    Args:
        rewards, values, mask: ``[B, R]``.
    Returns:
        ``(advantages [B, R], returns [B, R])`` with ``returns = advantages + values``.
    """
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over real tokens (1 is perfect, <= 0 is useless)."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# 5. losses


def policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float) -> dict:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7) as a loss to minimise; all inputs ``[B, R]``.

    ``L^CLIP = -E[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)]`` with ``r_t = exp(log pi - log pi_old)``.
    Also returns ``approx_kl`` (the k3 estimate of KL(pi_old || pi), CleanRL) and ``clipfrac``.
    """
    logratio = new_logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
        clipfrac = masked_mean(((ratio - 1.0).abs() > cliprange).float(), mask)
    return {"pg_loss": pg_loss, "approx_kl": approx_kl, "clipfrac": clipfrac}


def value_loss(new_values, old_values, returns, mask, cliprange_value: float) -> dict:
    """Clipped value loss (OpenAI baselines' PPO2; Huang et al. 2024, detail 11); all inputs ``[B, R]``:
    ``0.5 * E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)]``."""
    v_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return {"vf_loss": vf_loss, "vf_clipfrac": vf_clipfrac}


# --------------------------------------------------------------------------------------------
# 6. KL controller


@dataclass
class KLController:
    """KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019, section 2.2).

    Adaptive update after each batch of ``n_steps`` samples with mean sequence KL ``kl`` (nats):
    ``e = clip(kl / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    beta: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        """Update beta from the batch's mean KL (nats per sequence); returns the new beta."""
        if self.adaptive:
            error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


# --------------------------------------------------------------------------------------------
# 7. the update over one rollout batch


@dataclass
class Batch:
    """One rollout batch, everything ``[B, ...]`` on the policy's device."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    extra: dict = field(default_factory=dict)

    def lengths(self) -> tuple[list[int], list[int]]:
        """Each row's real prompt and reply lengths in tokens, read from the device once per batch."""
        if "lengths" not in self.extra:  # one device-to-host copy per batch, not one per micro-batch
            self.extra["lengths"] = (self.query_mask.sum(dim=1).tolist(), self.response_mask.sum(dim=1).long().tolist())
        return self.extra["lengths"]

    def select(self, idx: torch.Tensor) -> dict:
        """The rows ``idx`` (CPU ``LongTensor``) as the dict :func:`~edgerlhf.core.rollout.forward_logprobs` takes,
        plus the PPO targets and the rows' real lengths as lists (``query_lengths``, ``response_lengths``,
        :meth:`lengths`), so cutting a micro-batch does not wait for the device."""
        query_lengths, response_lengths = self.lengths()
        rows, on_device = idx.tolist(), idx.to(self.query.device)
        return {**{k: getattr(self, k)[on_device] for k in ("query", "query_mask", "response", "response_mask",
                                                            "logprobs", "values", "advantages", "returns")},
                "query_lengths": [query_lengths[i] for i in rows],
                "response_lengths": [response_lengths[i] for i in rows]}


#: The statistics of an update micro-batch, in the order :func:`micro_batch_backward` returns them.
UPDATE_STATS = ("pg_loss", "vf_loss", "loss", "approx_kl", "clipfrac", "vf_clipfrac", "entropy")


def data_parallel() -> tuple[int, int]:
    """``(rank, number of processes)`` of torch.distributed's default process group (the one ``accelerate launch``
    sets up); ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each of ``tensors`` over the processes, in place: one ``all_reduce`` per dtype over the tensors
    flattened together (gloo on CPUs, NCCL on GPUs)."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def micro_batch_backward(model, value_head, batch: Batch, micro: torch.Tensor, cfg, weight: float) -> torch.Tensor:
    """Forward and backward of one micro-batch, the rows ``micro`` (CPU ``LongTensor[m]``) of ``batch``: its loss
    ``pg_loss + vf_coef * vf_loss`` is a token mean over its real reply tokens, and ``weight`` (its share of the
    minibatch's rows) times its gradient is added to ``.grad``.

    The rows go through the model ``cfg.rows_per_pass`` at a time (None: all, packed by ``cfg.padding_free``), each
    pass's loss weighted by its share of the micro-batch's reply tokens, so the passes' gradients sum to the
    micro-batch's: only memory and time change. With several processes (:func:`data_parallel`) each runs every
    N-th row of the micro-batch, and :func:`ppo_update` sums their gradients and statistics. Returns
    ``FloatTensor[7]``, the :data:`UPDATE_STATS` (token means; this process's part of them).
    """
    rank, world = data_parallel()
    response_lengths = batch.lengths()[1]
    tokens = sum(response_lengths[i] for i in micro.tolist())
    mine = micro[rank::world]
    passes = [batch.select(rows) for rows in mine.split(cfg.rows_per_pass or max(len(mine), 1))] if len(mine) else []
    total = torch.zeros(len(UPDATE_STATS), device=batch.query.device)
    for mb in passes:
        share = sum(mb["response_lengths"]) / tokens
        new = forward_logprobs(model, value_head, mb, cfg.temperature, with_entropy=True,
                               padding_free=cfg.padding_free)
        mask = mb["response_mask"]
        pg = policy_loss(new["logprobs"], mb["logprobs"], mb["advantages"], mask, cfg.cliprange)
        vf = value_loss(new["values"], mb["values"], mb["returns"], mask, cfg.cliprange_value)
        loss = pg["pg_loss"] + cfg.vf_coef * vf["vf_loss"]
        (loss * share * weight).backward()
        stats = {**pg, **vf, "loss": loss, "entropy": masked_mean(new["entropy"], mask)}
        total = total + torch.stack([stats[k].detach().float() for k in UPDATE_STATS]) * share
    return total


def ppo_update(model, value_head, optimizer, batch: Batch, cfg, generator: torch.Generator) -> dict:
    """PPO epochs over shuffled minibatches of ``batch`` (Schulman et al. 2017, algorithm 1), with gradient
    accumulation.

    Each epoch shuffles the rows with ``generator``; an optimizer step takes ``micro_batch_size *
    gradient_accumulation_steps`` rows (a minibatch) in micro-batches of ``micro_batch_size``. Before every step
    the losses and the clipped gradient norm (``max_grad_norm``) must be finite; a minibatch whose mean approximate
    KL exceeds ``approx_kl_stop`` (None: never) is dropped and ends the update (TRL's ``early_stopping``). One
    host-device synchronisation per optimizer step. With several processes (:func:`data_parallel`), each holding the
    whole ``batch`` and the same ``generator`` state, each runs its share of every micro-batch's rows and the
    gradients and statistics are summed over the processes before each optimizer step (DDP's all-reduce), so every
    process takes the step one process would.

    Raises:
        FloatingPointError: a loss or the gradient norm is not finite (nothing is stepped with it).
    Returns:
        Means over micro-batches of :data:`UPDATE_STATS`, plus ``epochs``, ``optimizer_steps``, ``early_stopped``.
    """
    n = batch.query.shape[0]
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    stats: list[torch.Tensor] = []  # one [micro-batches, len(UPDATE_STATS)] block per optimizer step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    world = data_parallel()[1]
    model.eval()  # dropout off: log-probs must match the rollout's
    steps = epochs = 0
    stopped = False
    for _ in range(cfg.ppo_epochs):
        epochs += 1
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, per_step):
            optimizer.zero_grad(set_to_none=True)
            step_idx = order[start:start + per_step]
            step_stats = []
            for micro in step_idx.split(cfg.micro_batch_size):
                share = len(micro) / len(step_idx)
                step_stats.append(micro_batch_backward(model, value_head, batch, micro, cfg, share))
            block = torch.stack(step_stats)
            if world > 1:  # each process holds part of the minibatch's gradient and statistics: sum them
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                all_reduce_sum([p.grad for p in params] + [block])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            checks = torch.cat([block[:, :3].flatten(), grad_norm.reshape(1).float().to(block.device),
                                block[:, 3].mean().reshape(1)]).tolist()  # the one synchronisation
            if not all(math.isfinite(v) for v in checks[:-1]):
                raise FloatingPointError(f"non-finite PPO loss or gradient (pg, vf, total per micro-batch, then the "
                                         f"gradient norm: {checks[:-1]})")
            stats.append(block)
            if cfg.approx_kl_stop is not None and checks[-1] > cfg.approx_kl_stop:
                optimizer.zero_grad(set_to_none=True)  # the policy already moved too far: drop this step
                stopped = True
                break
            optimizer.step()
            steps += 1
        if stopped:
            break
    means = torch.cat(stats).mean(dim=0).tolist()
    return {**dict(zip(UPDATE_STATS, means)), "epochs": epochs, "optimizer_steps": steps, "early_stopped": stopped}


# --------------------------------------------------------------------------------------------
# 8. one PPO iteration


@contextmanager
def sampling_stream(rank: int, world: int):
    """With several processes, sample on a stream of this process's own (seeded by one draw from the global torch
    RNG, the same draw in every process, plus ``rank``), so the processes sample independently while their global
    RNG states stay equal (a checkpoint's RNG state then serves every process). One process: the global stream."""
    if world == 1:
        yield
        return
    seed = int(torch.randint(2**62, (1,)))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + rank)
        yield


class NonFiniteError(FloatingPointError):
    """A non-finite score, KL, reward, loss or gradient in a PPO step; ``rollout`` holds the step's tensors
    (query, response, masks, scores, log-probs, values where computed) for inspection."""

    def __init__(self, message: str, rollout: dict[str, torch.Tensor]):
        super().__init__(message)
        self.rollout = rollout


def ppo_step(model, value_head, optimizer, kl_ctl: KLController, tokenizer, queries: list[list[int]],
             prompts: list, scorer, cfg, generator: torch.Generator, moments: RunningMoments | None = None) -> dict:
    """One PPO iteration on one batch of prompts: rollout, score, rewards, GAE, update, KL control.

    Args:
        queries: token ids of the rendered prompts (one per sample).
        prompts: the same prompts as chat messages, passed to ``scorer``.
        scorer: ``scorer(prompts, replies) -> FloatTensor[B]`` (a reward model, or a scripted reward).
        cfg: a :class:`edgerlhf.core.config.PPOStageConfig`.
        moments: running statistics for score normalisation (``cfg.score_norm``); None: off.
    With several processes (:func:`data_parallel`), process ``r`` samples, scores and runs the reference on prompts
    ``r, r + N, ...`` (on its own sampling stream, :func:`sampling_stream`); every process then holds the whole batch
    (:func:`edgerlhf.core.rollout.gather_rollouts`) and :func:`ppo_update` sums their gradients.

    Raises:
        NonFiniteError: a non-finite score, KL, reward, loss or gradient (carries the rollout's tensors).
        ValueError: the tokenizer has no pad or no EOS token; fewer prompts than processes.
    Returns:
        The step's statistics (score, KL, rewards, beta, explained variance, reply length, EOS share, the
        :func:`ppo_update` means, timings in seconds) and ``"batch"``: the rollout as a :class:`Batch`.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} needs a pad and an EOS token for PPO")
    timing = {}
    rank, world = data_parallel()  # with several processes each samples, scores and runs the reference on every
    if len(queries) < world:  # world-th prompt, and every process then holds the whole batch
        raise ValueError(f"{len(queries)} prompts per PPO step (ppo.batch_size) cannot be shared among {world} "
                         "processes: use at least one per process")
    step_start = t = time.perf_counter()
    with sampling_stream(rank, world):
        ro = rollout(model, queries[rank::world], pad_id, eos_id, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                     cfg.top_p, cfg.generation_batch_size, cfg.min_new_tokens, value_head, cfg.logprobs_from_generation)
    trim_heap()  # the KV cache and decoding buffers, freed, would otherwise stay resident under the update's peak
    timing["time_generation_s"] = time.perf_counter() - t - ro["time_old_logprobs_s"]  # the reply pass: forward
    t = time.perf_counter()
    replies = decode_responses(tokenizer, ro["response"], ro["response_mask"], eos_id)
    raw_scores = scorer(prompts[rank::world], replies).float().to(ro["response_mask"].device)
    timing["time_scoring_s"] = time.perf_counter() - t
    t = time.perf_counter()
    chunk = cfg.generation_batch_size or cfg.micro_batch_size * cfg.gradient_accumulation_steps
    with returning_freed_memory():  # large freed activations go back to the OS (not during generation: slower)
        ro["ref_logprobs"] = reference_logprobs(model, ro, cfg.temperature, chunk)
    timing["time_forward_s"] = time.perf_counter() - t + ro["time_old_logprobs_s"]
    if world > 1:
        ro = gather_rollouts({**ro, "raw_scores": raw_scores, "replies": replies, "pad_id": pad_id}, world)
        raw_scores, replies = ro["raw_scores"], ro["replies"]
    mask = ro["response_mask"]
    scores = final_scores(raw_scores, ro["ended"], cfg.missing_eos_penalty, moments)
    lp = {k: ro[k] for k in ("logprobs", "values", "ref_logprobs")}
    rewards, kl = compute_rewards(scores, lp["logprobs"], lp["ref_logprobs"], mask, kl_ctl.beta, cfg.kl_estimator)
    tensors = {**{k: ro[k] for k in ("query", "query_mask", "response", "response_mask")}, "raw_scores": raw_scores,
               "scores": scores, **lp, "kl": kl, "rewards": rewards}
    for name, tensor in (("score", scores), ("KL", kl), ("reward", rewards)):
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(f"non-finite {name} in the rollout batch", tensors)
    advantages, returns = gae(rewards, lp["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    batch = Batch(query=ro["query"], query_mask=ro["query_mask"], response=ro["response"], response_mask=mask,
                  logprobs=lp["logprobs"], values=lp["values"], advantages=advantages, returns=returns,
                  extra={"replies": replies, "raw_scores": raw_scores})
    t = time.perf_counter()
    try:
        with returning_freed_memory():
            update = ppo_update(model, value_head, optimizer, batch, cfg, generator)
    except FloatingPointError as exc:  # re-raised with the rollout attached, for the failed-step save
        raise NonFiniteError(str(exc), {**tensors, "advantages": advantages, "returns": returns}) from exc
    timing["time_update_s"] = time.perf_counter() - t
    beta_used = kl_ctl.beta
    names = ("score", "score_std", "kl", "reward_total", "non_score_reward", "response_length", "eos_share",
             "generated")
    stats = torch.stack([raw_scores.mean(), raw_scores.std() if len(queries) > 1 else raw_scores.new_zeros(()),
                         kl.sum(dim=1).mean(), rewards.sum(dim=1).mean(), (-beta_used * kl).sum(dim=1).mean(),
                         mask.sum(dim=1).mean(), ro["ended"].float().mean(), mask.sum()]).tolist()  # one wait
    summary = dict(zip(names, stats))
    kl_ctl.update(summary["kl"], len(queries))
    generated = summary.pop("generated")
    return {
        **summary, "beta": beta_used, "explained_variance": explained_variance(lp["values"], returns, mask),
        "generated_tokens_per_s": generated / max(timing["time_generation_s"], 1e-9),
        **update, **timing, "time_step_s": time.perf_counter() - step_start, "batch": batch,
    }
