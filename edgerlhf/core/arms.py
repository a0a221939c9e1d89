"""Stage 4 (04_PPO_Alignment): PPO arms read against each other, a placebo arm and length control.

A judge's change after PPO mixes three things: what the reward model taught, drift that any PPO run causes (the
KL penalty, sampling, LoRA updates on noise), and length. The **placebo arm** runs the same PPO with a reward that
carries no preference signal, so an arm's effect *net of placebo* (its judge score minus the placebo policy's, per
prompt) removes the drift; the **length-controlled** effect removes the part that a change in reply length predicts.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from .stats import ALPHA, POWER, holm_family, mde_paired_mean, paired_bootstrap, percentile_bootstrap, t_test_p

PLACEBO = "placebo"


def arm_names(p) -> list[str]:
    """Stage 4's arms in run order from its ``ppo`` section: PPO's, named by precision (``ppo.experiments``); then
    ``<algorithm>-<precision>`` for RLOO and GRPO (``ppo.trl_experiments``); ``dpo``; the :data:`PLACEBO` last
    (``ppo.placebo``; it runs PPO, with or without PPO's other arms)."""
    names = list(p.experiments) if "ppo" in p.algorithms else []
    for algorithm in ("rloo", "grpo"):
        if algorithm in p.algorithms:
            names += [f"{algorithm}-{precision}" for precision in p.trl_experiments]
    return names + (["dpo"] if "dpo" in p.algorithms else []) + ([PLACEBO] if p.placebo else [])


def parse_arm(arm: str) -> tuple[str, str | None]:
    """``(algorithm, reward-model precision)`` of an arm named by :func:`arm_names`: ``int8`` -> ``("ppo", "int8")``,
    ``rloo-bf16`` -> ``("rloo", "bf16")``, ``dpo`` -> ``("dpo", None)``, :data:`PLACEBO` -> ``("ppo", None)``."""
    if arm in (PLACEBO, "dpo"):
        return ("ppo" if arm == PLACEBO else "dpo"), None
    algorithm, _, precision = arm.rpartition("-")
    return algorithm or "ppo", precision


def arms_by_algorithm(names) -> dict[str, dict[str, str]]:
    """``{algorithm: {reward-model precision: arm}}`` over ``names`` (:func:`parse_arm`), in their order, for the arms
    trained on a reward model: the :data:`PLACEBO` and ``dpo`` have no precision and are left out."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        algorithm, precision = parse_arm(name)
        if precision is not None:
            out.setdefault(algorithm, {})[precision] = name
    return out


def placebo_scorer(mean: float, sd: float, seed: int):
    """The placebo arm's reward: ``scorer(prompts, replies) -> FloatTensor[B]`` of independent draws
    ``mean + sd * z``, ``z ~ N(0, 1)``, from ``numpy.random.default_rng([seed, crc32(replies)])``: the same scale as
    the proxy it stands in for (``mean``, ``sd``: the proxy's scores of SFT replies), no information about any reply
    (a reply's reward does not depend on its text in expectation), and the same draws for the same batch, so a
    resumed run repeats them.

    Raises:
        ValueError: ``sd`` is negative or a value is not finite.
    """
    if not (np.isfinite(mean) and np.isfinite(sd)) or sd < 0:
        raise ValueError(f"placebo_scorer needs a finite mean and sd >= 0, got {mean}, {sd}")

    def scorer(prompts, replies):
        key = zlib.crc32("\x1e".join(replies).encode())
        z = np.random.default_rng([seed, key]).standard_normal(len(replies))
        return torch.tensor(mean + sd * z, dtype=torch.float32)
    return scorer


def length_controlled(score_diff, length_diff, seed: int = 0) -> dict:
    """The score difference at zero length difference: the intercept ``a`` of the least-squares line
    ``score_diff = a + b * length_diff`` over prompts, with a percentile bootstrap interval (prompts resampled).
    ``score_diff``: ``float[P]`` (e.g. arm − placebo judge score); ``length_diff``: ``float[P]`` in tokens.
    Where every length difference is equal the slope is undefined: ``a`` is then the mean and ``b`` None.

    Returns ``{"intercept", "ci", "slope" (score per token), "n"}``. Raises ValueError for unequal lengths.
    """
    y, x = np.asarray(score_diff, float), np.asarray(length_diff, float)
    if y.shape != x.shape or y.ndim != 1:
        raise ValueError(f"length_controlled needs two float[P] of equal length, got {y.shape} and {x.shape}")
    if np.ptp(x) == 0:
        return {"intercept": float(y.mean()), "ci": paired_bootstrap(y, np.zeros_like(y), seed=seed)["ci"],
                "slope": None, "n": int(y.size)}

    def intercept(ys, xs):
        return np.polyfit(xs, ys, 1)[1] if np.ptp(xs) > 0 else np.mean(ys)
    slope, a = np.polyfit(x, y, 1)
    ci = percentile_bootstrap((y, x), intercept, paired=True, vectorized=False, n_boot=2000, seed=seed)
    return {"intercept": float(a), "ci": ci, "slope": float(slope), "n": int(y.size)}


def length_controlled_by_seed(score_by_seed: list, length_by_seed: list, seed: int = 0, level: float = 0.95) -> dict:
    """:func:`length_controlled` over prompts and seeds, ``score_by_seed[s]`` and ``length_by_seed[s]`` being
    ``float[P]`` under seed ``s``. One seed: :func:`length_controlled`. ``R >= 2`` seeds: each seed's intercept
    ``a_s`` carries the training variance, as in :func:`seed_paired`: their mean with the t interval across seeds
    (``R - 1`` degrees of freedom); the slope is the pooled fit's.

    Returns ``{"intercept", "ci", "slope", "n", "interval", "per_seed"}``. Raises ValueError for lists of
    different lengths, empty ones, or a seed's arrays of unequal length.
    """
    if len(score_by_seed) != len(length_by_seed) or not score_by_seed:
        raise ValueError(f"length_controlled_by_seed needs one score and one length array per seed, got "
                         f"{len(score_by_seed)} and {len(length_by_seed)}")
    each = [length_controlled(y, x, seed) for y, x in zip(score_by_seed, length_by_seed)]
    if len(each) == 1:
        return {**each[0], "interval": "bootstrap over prompts", "per_seed": [each[0]["intercept"]]}
    a = np.array([e["intercept"] for e in each])
    pooled = length_controlled(np.concatenate([np.asarray(y, float) for y in score_by_seed]),
                               np.concatenate([np.asarray(x, float) for x in length_by_seed]), seed)
    return {"intercept": float(a.mean()), "ci": t_interval(a, level)[0], "slope": pooled["slope"], "n": pooled["n"],
            "interval": f"t across {len(a)} seeds", "per_seed": a.tolist()}


def t_interval(values, level: float = 0.95) -> tuple[list[float], float]:
    """The t interval of the mean of ``values`` (``float[R]``, R >= 2; ``R - 1`` degrees of freedom) and the
    standard error of that mean: ``([low, high], se)``."""
    from scipy.stats import t  # imported on use, like the other scipy.stats users

    values = np.asarray(values, float)
    se = float(values.std(ddof=1)) / np.sqrt(len(values))
    half = float(t.ppf(1 - (1 - level) / 2, len(values) - 1)) * se
    return [float(values.mean() - half), float(values.mean() + half)], se


def seed_paired(a_by_seed: list, b_by_seed: list, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``a - b`` over prompts and seeds, with common random numbers: ``a_by_seed[s]`` and ``b_by_seed[s]``
    are ``float[P]`` on the same prompts under the same seed ``s``.

    One seed: the paired bootstrap interval over prompts (:func:`edgerlhf.core.stats.paired_bootstrap`), the t-test
    over prompts and the normal-approximation MDE. ``R >= 2`` seeds: the per-seed means ``m_s`` carry the training
    variance, so the interval is the t interval across seeds (``R - 1`` degrees of freedom), the p-value the
    one-sample t-test of the ``m_s`` and the MDE ``(t_{1-alpha/2} + t_{power}) sd(m) / sqrt(R)``.

    Returns ``{"mean_difference", "ci", "sd_difference", "n" (prompts x seeds), "p_value", "mde", "seeds",
    "interval", "per_seed"}``. Raises ValueError for lists of different lengths or empty ones.
    """
    if len(a_by_seed) != len(b_by_seed) or not a_by_seed:
        raise ValueError(f"seed_paired needs one run of each side per seed, got {len(a_by_seed)} and {len(b_by_seed)}")
    diffs = [np.asarray(a, float) - np.asarray(b, float) for a, b in zip(a_by_seed, b_by_seed)]
    means = np.array([d.mean() for d in diffs])
    if len(diffs) == 1:
        out = paired_bootstrap(a_by_seed[0], b_by_seed[0], level=level, seed=seed)
        return {**out, "p_value": t_test_p(diffs[0]), "mde": mde_paired_mean(out["n"], out["sd_difference"]),
                "seeds": 1, "interval": "paired bootstrap over prompts", "per_seed": means.tolist()}
    from scipy.stats import t  # imported on use, like the other scipy.stats users

    r = len(means)
    ci, se = t_interval(means, level)
    return {"mean_difference": float(means.mean()), "ci": ci, "sd_difference": float(means.std(ddof=1)), "n": int(sum(d.size for d in diffs)), "p_value": t_test_p(means),
            "mde": float((t.ppf(1 - ALPHA / 2, r - 1) + t.ppf(POWER, r - 1)) * se), "seeds": r,
            "interval": f"t across {r} seeds", "per_seed": means.tolist()}


def runs(arm: dict) -> list[dict]:
    """An arm's evaluations after PPO, one per seed (``after_by_seed``; a one-seed arm has only ``after``)."""
    return arm.get("after_by_seed") or [arm["after"]]


def compare_arms(arms: dict[str, dict], names: list[str], reference: str, judges: list[str], seed: int = 0) -> dict:
    """Each of ``names`` against ``reference`` after PPO, per judge: :func:`seed_paired` on the judge's scores, its
    p-value Holm-corrected over ``names`` (one family per judge), and the difference controlled for length
    (:func:`length_controlled_by_seed` on the difference in reply tokens: per seed, then across seeds).

    Returns ``{name: {judge: {...seed_paired, "p_holm", "family_size", "length_controlled"}}}``.
    Raises KeyError: ``reference`` is not an arm.
    """
    ref = runs(arms[reference])
    out = {a: {} for a in names}
    for j in judges:
        tests = []
        for a in names:
            mine = runs(arms[a])
            diff = seed_paired([r[f"{j}_scores"] for r in mine], [r[f"{j}_scores"] for r in ref], seed)
            score = [np.asarray(x[f"{j}_scores"], float) - np.asarray(y[f"{j}_scores"], float)
                     for x, y in zip(mine, ref)]
            length = [np.asarray(x["tokens"], float) - np.asarray(y["tokens"], float) for x, y in zip(mine, ref)]
            tests.append({**diff, "length_controlled": length_controlled_by_seed(score, length, seed)})
        for a, test in zip(names, holm_family(tests)):
            out[a][j] = test
    return out


def net_of_placebo(arms: dict[str, dict], judges: list[str], seed: int = 0) -> dict:
    """Each arm against the :data:`PLACEBO` arm (:func:`compare_arms`), with its reply-length change from the SFT
    replies and from the placebo's replies (tokens, :func:`seed_paired`).

    Args:
        arms: ``{name: {"before": {"tokens": int[P]}, "after": {"<judge>_scores": float[P], "tokens": int[P]},
            "after_by_seed": [the same per seed] (optional)}}`` with a :data:`PLACEBO` entry.
    Returns:
        ``{arm: {judge: {...}, "length_change": ..., "length_vs_placebo": ...}}``.
    Raises:
        KeyError: no placebo arm.
    """
    placebo = runs(arms[PLACEBO])
    names = [a for a in arms if a != PLACEBO]
    out = compare_arms(arms, names, PLACEBO, judges, seed)
    for a in names:
        mine = runs(arms[a])
        out[a]["length_change"] = seed_paired([r["tokens"] for r in mine], [arms[a]["before"]["tokens"]] * len(mine),
                                              seed)
        out[a]["length_vs_placebo"] = seed_paired([r["tokens"] for r in mine], [r["tokens"] for r in placebo], seed)
    return out


#: KL to the SFT model, in nats per reply, that the alignment issue asks of "a policy that moves" (full profile).
MOVED_KL = 1.0


def policy_movement(arms: dict[str, dict], steps: int, batch_size: int, adaptive: bool, horizon: int) -> dict:
    """How far PPO moved each arm's policy, and whether the adaptive KL controller could act.

    Per arm (its first seed): ``kl`` the mean KL to the SFT model over the held-out prompts after training
    (nats per reply, the evaluation's ``kl_mean``), ``beta_first`` / ``beta_last`` the KL coefficient at the
    first and last step. ``samples`` = ``steps * batch_size``; ``max_beta_change``: the largest relative change
    Ziegler et al. (2019)'s controller can make in this run, ``(1 + 0.2 * batch_size / horizon) ** steps - 1``
    (its error is clipped to ±0.2), 0 without it. ``moved``: every arm reached :data:`MOVED_KL`.
    """
    per_arm = {name: {"kl": float(a["after"]["kl_mean"]), "beta_first": float(a["history"][0]["beta"]),
                      "beta_last": float(a["history"][-1]["beta"])} for name, a in arms.items()}
    bound = (1 + 0.2 * batch_size / horizon) ** steps - 1 if adaptive else 0.0
    return {"arms": per_arm, "moved": all(x["kl"] >= MOVED_KL for x in per_arm.values()),
            "samples": steps * batch_size, "steps": steps, "batch_size": batch_size, "adaptive": adaptive,
            "horizon": horizon, "max_beta_change": bound}


def movement_sentence(m: dict) -> str:
    """:func:`policy_movement` in words: the KL each arm reached against :data:`MOVED_KL` and, where short of it,
    what held it back (the run's samples, and how far the controller could move beta)."""
    kls = ", ".join(f"{name} {x['kl']:.2f}" for name, x in m["arms"].items())
    betas = ", ".join(f"{name} {x['beta_first']:.4g} -> {x['beta_last']:.4g}" for name, x in m["arms"].items())
    text = f"KL to the SFT model after PPO (nats per reply, held-out prompts): {kls}"
    if m["moved"]:
        return text + f"; every policy moved at least {MOVED_KL:g} nat"
    text += (f"; not every policy reached the {MOVED_KL:g} nat a policy that moves reaches: this run drew "
             f"{m['samples']} samples "
             f"({m['steps']} steps of {m['batch_size']} prompts)")
    if not m["adaptive"]:
        return text + f", with a fixed KL coefficient ({betas})"
    return text + (f"; the adaptive KL controller (horizon {m['horizon']:,} samples) could change beta by at most "
                   f"{m['max_beta_change']:.1%} in this run, and moved it {betas}")
