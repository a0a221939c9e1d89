"""Stage 4 (04_PPO_Alignment): best-of-n sampling against each reward model, the comparison of precisions that
needs no training.

For each held-out prompt, ``n`` SFT replies are sampled once and shared by every proxy; each proxy picks the reply it
scores highest among the first ``k`` (k = 1, 2, 4, ..., n), and every judge scores the picks. A proxy's gain at ``k``
is, per prompt, the judge's score of its pick minus the judge's mean score of all ``n`` replies (the expected score of
one SFT reply); precisions are compared per prompt on the same replies. The policy this defines is ``k`` samples and
an argmax, so its KL to the SFT model is known in closed form (:func:`kl_bon`) and its curve against KL is the one
Gao et al. (2023, "Scaling Laws for Reward Model Overoptimization") fit with :func:`fit_gao`.
"""
from __future__ import annotations

import math

import numpy as np

from .arms import seed_paired
from .stats import ALPHA, holm_family, paired_bootstrap

#: Gao et al. 2023's functional forms of the gold reward against ``d = sqrt(KL)``: ``R(d) = d (alpha - beta f(d))``
#: with ``f(d) = d`` for best-of-n and ``f(d) = log d`` for RL (their eq. 1 and 2).
FORMS = ("bon", "rl")


def k_values(n: int) -> list[int]:
    """The ``k`` of the curve: ``1, 2, 4, ...`` up to ``n``, and ``n`` itself. Raises ValueError for ``n < 1``."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1 replies per prompt, got {n}")
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)]
    return ks if ks[-1] == n else ks + [n]


def kl_bon(k: int) -> float:
    """KL (nats) from the SFT policy to best-of-``k`` sampling: ``log k - (k - 1) / k`` (Stiennon et al. 2020,
    "Learning to summarize from human feedback", App. G.3; Gao et al. 2023, sec. 2.2). It is exact when the ``k``
    replies are distinct and an upper bound otherwise (Beirami et al. 2024, "Theoretical guarantees on the best-of-n
    alignment policy"). Raises ValueError for ``k < 1``."""
    if k < 1:
        raise ValueError(f"best-of-k needs k >= 1, got {k}")
    return math.log(k) - (k - 1) / k


def best_of_k(proxy_scores: np.ndarray, k: int) -> np.ndarray:
    """Index of each prompt's pick: the argmax of the proxy's scores over its first ``k`` replies (the first one on
    a tie). ``proxy_scores``: ``float[P, n]``; returns ``int[P]``.

    Raises:
        ValueError: ``k`` outside ``[1, n]`` or a non-finite score (an argmax over NaN picks arbitrarily).
    """
    scores = np.asarray(proxy_scores, float)
    if scores.ndim != 2 or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"best_of_k needs scores of shape [prompts, n] and 1 <= k <= n, got {scores.shape} and k={k}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("best_of_k: the proxy scores hold NaN or inf")
    return np.argmax(scores[:, :k], axis=1)


def _design(d: np.ndarray, form: str) -> np.ndarray:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    f = d if form == "bon" else np.log(np.where(d > 0, d, 1.0))  # d log d -> 0 as d -> 0
    return np.stack([d, -d * f], axis=-1)


def fit_gao(d, reward, form: str = "bon") -> tuple[float, float]:
    """Least-squares ``alpha, beta`` of ``R(d) = d (alpha - beta d)`` (``form="bon"``) or ``d (alpha - beta log d)``
    (``"rl"``), Gao et al. 2023 eq. 1-2, with ``d = sqrt(KL)`` in sqrt-nats and ``R`` the gold (judge) reward's gain
    over the initial policy. Both forms are linear in ``alpha, beta`` (``numpy.linalg.lstsq``). ``d``, ``reward``:
    ``float[K]``.

    Raises:
        ValueError: unknown form, lengths differ, or fewer than two points with ``d > 0``.
    """
    d, reward = np.asarray(d, float), np.asarray(reward, float)
    if d.shape != reward.shape or np.sum(d > 0) < 2:
        raise ValueError(f"fit_gao needs d and reward of equal length with at least two d > 0, got {d} and {reward}")
    (alpha, beta), *_ = np.linalg.lstsq(_design(d, form), reward, rcond=None)
    return float(alpha), float(beta)


def bootstrap_fit(gains: np.ndarray, d, form: str = "bon", n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`fit_gao` on the mean gain per point, with percentile intervals from resampling prompts
    (``numpy.random.default_rng(seed)``). ``gains``: ``float[P, K]`` per-prompt gains at each of the ``K`` values
    of ``d``. Returns ``{"form", "alpha", "beta", "alpha_ci95", "beta_ci95", "n_prompts"}``."""
    gains, d = np.asarray(gains, float), np.asarray(d, float)
    alpha, beta = fit_gao(d, gains.mean(axis=0), form)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(gains), size=(n_boot, len(gains)))
    design = _design(d, form)
    coef = np.linalg.lstsq(design, gains[draws].mean(axis=1).T, rcond=None)[0]  # [2, n_boot]
    lo, hi = np.percentile(coef, [2.5, 97.5], axis=1)
    return {"form": form, "alpha": alpha, "beta": beta, "alpha_ci95": [float(lo[0]), float(hi[0])],
            "beta_ci95": [float(lo[1]), float(hi[1])], "n_prompts": int(len(gains))}


def curves(proxy_scores: dict[str, np.ndarray], judge_scores: dict[str, np.ndarray], tokens: np.ndarray,
           reference: str = "bf16", seed: int = 0) -> dict:
    """Best-of-k curves of every proxy under every judge, with the fits and the paired comparisons.

    Args:
        proxy_scores: ``{proxy: float[P, n]}``, each proxy's score of reply ``j`` to prompt ``i``.
        judge_scores: ``{judge: float[P, n]}``, the same replies scored by each judge.
        tokens: ``int[P, n]``, each reply's length in tokens.
        reference: the proxy the others are compared with (skipped when absent).
    Returns:
        ``{"n", "n_prompts", "ks", "kl_bon", "sqrt_kl", "judge_mean", "proxies", "gains_at_n", "vs_reference"}``:
        per proxy, ``points`` (per ``k``: mean proxy score and length of the picks, per judge the gain over the
        mean reply with its paired bootstrap interval) and ``fits`` (per judge, :func:`bootstrap_fit` with
        ``form="bon"``, where ``n >= 4`` gives two points with ``d > 0``); ``gains_at_n`` and ``vs_reference``, per
        judge, the tests at ``k = n`` (each proxy's gain; each proxy's pick minus the reference's), each family
        Holm-corrected (:func:`edgerlhf.core.arms.seed_paired` with one seed: paired bootstrap interval, t-test, minimum
        detectable difference at 80% power).

    Raises:
        ValueError: arrays of different shapes, fewer than 2 replies per prompt, or non-finite scores.
    """
    tokens = np.asarray(tokens)
    shape = tokens.shape
    arrays = {**{f"proxy {k}": v for k, v in proxy_scores.items()},
              **{f"judge {k}": v for k, v in judge_scores.items()}}
    for name, values in arrays.items():
        if np.shape(values) != shape:
            raise ValueError(f"best-of-n: {name} scores have shape {np.shape(values)}, the replies {shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"best-of-n: {name} scores hold NaN or inf")
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"best-of-n needs at least 2 replies per prompt, got shape {shape}")
    n_prompts, n = shape
    ks = k_values(n)
    d = np.sqrt([kl_bon(k) for k in ks])
    rows = np.arange(n_prompts)
    judge_mean = {j: np.asarray(v, float).mean(axis=1) for j, v in judge_scores.items()}
    out = {"n": n, "n_prompts": n_prompts, "ks": ks, "kl_bon": [kl_bon(k) for k in ks], "sqrt_kl": d.tolist(),
           "judge_mean": {j: float(v.mean()) for j, v in judge_mean.items()}, "proxies": {}}
    picked_at_n = {}
    for name, scores in proxy_scores.items():
        scores = np.asarray(scores, float)
        points, gains = [], {j: [] for j in judge_scores}
        for k in ks:
            pick = best_of_k(scores, k)
            point = {"k": k, "kl_bon": kl_bon(k), "proxy_mean": float(scores[rows, pick].mean()),
                     "tokens_mean": float(tokens[rows, pick].mean()), "judges": {}}
            for j, values in judge_scores.items():
                chosen = np.asarray(values, float)[rows, pick]
                gains[j].append(chosen - judge_mean[j])
                point["judges"][j] = {"score_mean": float(chosen.mean()),
                                      "gain": paired_bootstrap(chosen, judge_mean[j], seed=seed)}
            points.append(point)
        picked_at_n[name] = {j: np.asarray(v, float)[rows, best_of_k(scores, n)] for j, v in judge_scores.items()}
        fits = {j: bootstrap_fit(np.stack(g, axis=1), d, "bon", seed=seed) for j, g in gains.items()} if np.sum(
            d > 0) >= 2 else {}
        out["proxies"][name] = {"points": points, "fits": fits}
    out["gains_at_n"], out["vs_reference"] = {}, {}
    for j in judge_scores:
        out["gains_at_n"][j] = holm_family([{"proxy": name, **seed_paired([picked_at_n[name][j]], [judge_mean[j]],
                                                                          seed)} for name in proxy_scores])
        if reference in proxy_scores:
            out["vs_reference"][j] = holm_family([
                {"proxy": name, "reference": reference,
                 **seed_paired([picked_at_n[name][j]], [picked_at_n[reference][j]], seed)}
                for name in proxy_scores if name != reference])
    return out


def describe(bon: dict, unlearned: tuple[str, ...] = (), alpha: float = ALPHA) -> list[str]:
    """The best-of-n results in words, generated from :func:`curves`' output: per judge, each proxy's gain at
    ``k = n`` and each precision's difference from the reference, each with its interval and its Holm-corrected
    verdict (a difference is called detectable only when its Holm-adjusted p-value is below ``alpha``). The
    sentences of a judge in ``unlearned`` (one that did not beat the length baseline) open by saying its scores
    measure nothing about alignment."""
    n, out = bon["n"], []
    for j, gains in bon["gains_at_n"].items():
        if j in unlearned:
            out.append(f"{j} did not beat the length baseline in stage 3: its gains below say nothing about "
                       "alignment quality.")
        parts = [f"{g['proxy']} {g['mean_difference']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
                 + ("" if g["p_holm"] < alpha else " (not detectable)") for g in gains]
        out.append(f"Best-of-{n} (KL {bon['kl_bon'][-1]:.2f} nats), {j} gain over the mean SFT reply on "
                   f"{bon['n_prompts']} held-out prompts, after Holm's correction over {len(gains)} proxies: "
                   + "; ".join(parts) + ".")
        diffs = bon["vs_reference"].get(j, [])
        if diffs:
            found = [x for x in diffs if x["p_holm"] < alpha]
            parts = [f"{x['proxy']} − {x['reference']} {x['mean_difference']:+.3f} [{x['ci'][0]:+.3f}, "
                     f"{x['ci'][1]:+.3f}] (p_Holm {x['p_holm']:.2g}, MDE {x['mde']:.3f})" for x in diffs]
            verdict = ("; detectable: " + ", ".join(f"{x['proxy']} {'higher' if x['mean_difference'] > 0 else 'lower'}"
                                                     for x in found)) if found else "; no difference is detectable"
            out.append(f"Between precisions at k = {n} under {j}, paired on the same replies, after Holm's correction "
                       f"over {len(diffs)} comparisons: " + "; ".join(parts) + verdict + ".")
    return out
