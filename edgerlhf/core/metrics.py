"""Stage 3 (03_Reward_Modeling): reward-model metrics on held-out preference pairs.

All functions take the two reward vectors ``r_chosen`` and ``r_rejected`` (``float[N]``,
one entry per pair) and use the Bradley-Terry preference probability
``p = sigmoid(r_chosen - r_rejected)`` (Bradley & Terry 1952; Ouyang et al. 2022).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit  # the logistic sigmoid 1 / (1 + exp(-x)), no overflow warning at x << 0
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from .stats import compare_classifiers, describe_comparison, holm, percentile_bootstrap


def pairwise_accuracy(r_chosen, r_rejected) -> dict:
    """Strict pairwise accuracy (RewardBench / TRL rule): a pair is correct only if ``r_chosen > r_rejected``.

    Returns ``{"accuracy", "ties", "n"}``; ties count as wrong and are reported.
    """
    delta = np.asarray(r_chosen, float) - np.asarray(r_rejected, float)
    return {"accuracy": float(np.mean(delta > 0)), "ties": int(np.sum(delta == 0)), "n": int(delta.size)}


def bootstrap_ci(r_chosen, r_rejected, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the strict accuracy (Efron & Tibshirani 1993).

    Pairs are resampled with replacement ``n_boot`` times with ``numpy.random.default_rng(seed)``
    (:func:`edgerlhf.core.stats.percentile_bootstrap`, SciPy's ``bootstrap``).

    Raises:
        ValueError: no pairs.
    """
    correct = (np.asarray(r_chosen, float) > np.asarray(r_rejected, float)).astype(float)
    lo, hi = percentile_bootstrap((correct,), np.mean, paired=False, vectorized=True, n_boot=n_boot, level=level,
                                  seed=seed)
    return lo, hi


def auc_roc(r_chosen, r_rejected) -> float:
    """AUC-ROC of the preference probability, with each pair once in each order.

    Order (chosen, rejected) has label 1 and score ``sigmoid(r_c - r_r)``; order
    (rejected, chosen) has label 0 and score ``sigmoid(r_r - r_c)`` (scikit-learn's ``roc_auc_score``).
    """
    delta = np.asarray(r_chosen, float) - np.asarray(r_rejected, float)
    scores = np.concatenate([expit(delta), expit(-delta)])
    labels = np.concatenate([np.ones_like(delta), np.zeros_like(delta)])
    return float(roc_auc_score(labels, scores))


def calibration(delta, n_bins: int = 10, temperature: float = 1.0) -> dict:
    """Expected calibration error of the Bradley-Terry probability (Guo et al. 2017).

    With ``p = sigmoid(delta / T)`` each pair's confidence is ``max(p, 1 - p)`` and it is
    correct when ``delta > 0``; confidences fall in ``n_bins`` equal-width bins over [0.5, 1]
    (the range of ``max(p, 1-p)``) and ``ECE = sum_b (n_b / N) * |acc_b - conf_b|``.
    A tie (``delta == 0``) has confidence 0.5 and counts as wrong.

    Returns ``{"ece", "nll", "brier", "bins": [{"lo", "hi", "n", "accuracy", "confidence"}]}``;
    NLL and Brier score are of the probability that the chosen reply is preferred.
    """
    delta = np.asarray(delta, float) / temperature
    p = expit(delta)
    confidence = np.maximum(p, 1 - p)
    correct = (delta > 0).astype(float)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += mask.mean() * abs(acc - conf)
        else:
            acc = conf = float("nan")
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(mask.sum()),
                     "accuracy": acc, "confidence": conf})
    eps = 1e-12
    nll = float(-np.mean(np.log(np.clip(p, eps, 1.0))))
    brier = float(np.mean((1.0 - p) ** 2))
    return {"ece": float(ece), "nll": nll, "brier": brier, "bins": bins}


def fit_temperature(delta, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature ``T`` minimising the NLL of ``sigmoid(delta / T)`` (temperature scaling, Guo et al. 2017).

    Fitted by bounded scalar minimisation (SciPy) on the given validation deltas.
    """
    delta = np.asarray(delta, float)

    def nll(t: float) -> float:
        return float(np.mean(np.logaddexp(0.0, -delta / t)))  # -log sigmoid(delta / t), stable

    return float(minimize_scalar(nll, bounds=bounds, method="bounded").x)


def reward_stats(r_chosen, r_rejected) -> dict:
    """Mean and standard deviation of rewards on chosen and rejected replies, and of the margin."""
    c, r = np.asarray(r_chosen, float), np.asarray(r_rejected, float)
    return {"chosen_mean": float(c.mean()), "chosen_std": float(c.std()), "rejected_mean": float(r.mean()),
            "rejected_std": float(r.std()), "margin_mean": float((c - r).mean()), "margin_std": float((c - r).std())}


def agreement(scores_a, scores_b, delta_a, delta_b) -> dict:
    """Agreement of two reward models: Spearman correlation of their scores (all replies) and
    the share of pairs both rank the same way (sign of the margin)."""
    rho = spearmanr(np.asarray(scores_a, float), np.asarray(scores_b, float)).statistic
    same = np.mean(np.sign(np.asarray(delta_a, float)) == np.sign(np.asarray(delta_b, float)))
    return {"spearman": float(rho), "same_ranking": float(same)}


def evaluate_pairs(r_chosen, r_rejected, validation_delta=None, seed: int = 0) -> dict:
    """All pairwise metrics of one reward model on held-out pairs.

    The temperature for ``ece_temperature_scaled`` is fitted on ``validation_delta`` (margins
    ``r_chosen - r_rejected`` on a validation slice disjoint from these pairs); without it no
    temperature is fitted and the scaled fields are None.
    """
    c, r = np.asarray(r_chosen, float), np.asarray(r_rejected, float)
    delta = c - r
    lo, hi = bootstrap_ci(c, r, seed=seed)
    cal = calibration(delta)
    temperature = fit_temperature(validation_delta) if validation_delta is not None and len(validation_delta) else None
    scaled = calibration(delta, temperature=temperature)["ece"] if temperature else None
    return {
        **pairwise_accuracy(c, r), "accuracy_ci95": [lo, hi], "auc_roc": auc_roc(c, r),
        "ece": cal["ece"], "nll": cal["nll"], "brier": cal["brier"], "reliability": cal["bins"],
        "temperature": temperature, "ece_temperature_scaled": scaled,
        **reward_stats(c, r),
    }


def correct(scores_chosen, scores_rejected) -> np.ndarray:
    """``bool[N]``: pair ``i`` is ranked right (strictly; a tie counts as wrong)."""
    return np.asarray(scores_chosen, float) > np.asarray(scores_rejected, float)


def auc_of_margins(delta: np.ndarray, axis: int = -1) -> np.ndarray:
    """:func:`auc_roc` of the margins ``delta = r_chosen - r_rejected`` along ``axis`` (any leading shape), as the
    Mann-Whitney U of the positives' average ranks over ``n * n`` (Hanley & McNeil 1982), equal to scikit-learn's
    ``roc_auc_score`` to rounding; many resamples at once for :func:`auc_ci`."""
    from scipy.stats import rankdata

    delta = np.moveaxis(np.asarray(delta, float), axis, -1)
    n = delta.shape[-1]
    ranks = rankdata(np.concatenate([expit(delta), expit(-delta)], axis=-1), axis=-1)  # ties: average ranks
    return (ranks[..., :n].sum(axis=-1) - n * (n + 1) / 2) / (n * n)


def auc_ci(r_chosen, r_rejected, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of :func:`auc_roc`, pairs resampled (2,000 resamples, vectorized)."""
    delta = np.asarray(r_chosen, float) - np.asarray(r_rejected, float)
    return percentile_bootstrap((delta,), auc_of_margins, paired=False, vectorized=True, seed=seed)


def assess(models: dict[str, dict], baselines: dict[str, dict], reference: str | None = "bf16",
           seed: int = 0, alpha: float = 0.05) -> dict:
    """Paired comparisons of every reward model on the same held-out pairs, and the words that state them.

    Each entry of ``models`` and ``baselines`` has ``scores_chosen`` / ``scores_rejected`` (``float[N]``,
    the same N pairs in the same order). Adds to every model entry (in place):

    * ``vs_length``: :func:`edgerlhf.core.stats.compare_classifiers` against the better length rule on
      these pairs (``shorter wins`` or ``longer wins``, whichever scores higher: the conservative choice);
    * ``vs_best_baseline``: against the baseline with the highest accuracy (TF-IDF or a length rule);
    * ``vs_reference``: against ``models[reference]`` (None for the reference itself);
    * ``learned``: it beats the length baseline, McNemar ``p < alpha`` after Holm's correction;
    * ``auc_roc_ci95``: bootstrap interval of its AUC-ROC.

    Each of the three kinds of comparison is one family: its McNemar p-values get Holm's adjustment
    (:func:`edgerlhf.core.stats.holm`) as ``p_holm``, with the ``family_size``, and the verdicts use it.

    Returns ``{"length_baseline", "best_baseline", "conclusions": [sentences]}``.
    """
    accuracy = {name: float(correct(b["scores_chosen"], b["scores_rejected"]).mean()) for name, b in baselines.items()}
    length = max((n for n in accuracy if n.endswith(" wins")), key=accuracy.get)
    best = max(accuracy, key=accuracy.get)
    hits = {name: correct(b["scores_chosen"], b["scores_rejected"]) for name, b in baselines.items()}
    mine = {name: correct(e["scores_chosen"], e["scores_rejected"]) for name, e in models.items()}
    for name, entry in models.items():
        entry["vs_length"] = compare_classifiers(mine[name], hits[length], seed)
        entry["vs_best_baseline"] = compare_classifiers(mine[name], hits[best], seed)
        entry["auc_roc_ci95"] = auc_ci(entry["scores_chosen"], entry["scores_rejected"], seed)
        entry["vs_reference"] = compare_classifiers(mine[name], mine[reference], seed) \
            if reference in models and name != reference else None
    for key in ("vs_length", "vs_best_baseline", "vs_reference"):
        family = [e[key] for e in models.values() if e[key] is not None]
        for c, p in zip(family, holm([c["p_value"] for c in family])):
            c.update(p_holm=p, family_size=len(family))
    conclusions = []
    for name, entry in models.items():
        entry["learned"] = entry["vs_length"]["p_holm"] < alpha and entry["vs_length"]["difference"] > 0
        verdict = "learned more than length" if entry["learned"] else (
            "NOT LEARNED: it does not beat the length baseline, so nothing built on it measures alignment")
        conclusions.append(f"{name}: {verdict}. " + describe_comparison(name, length, entry["vs_length"], alpha))
        if best != length:
            conclusions.append(describe_comparison(name, best, entry["vs_best_baseline"], alpha))
        if entry["vs_reference"] is not None:
            conclusions.append(describe_comparison(name, reference, entry["vs_reference"], alpha))
    return {"length_baseline": length, "best_baseline": best, "baseline_accuracy": accuracy,
            "conclusions": conclusions}
