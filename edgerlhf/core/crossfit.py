"""Cross-fitted evaluation: every pair scored out of fold, on fold draws shared by every model.

The pairs are split into ``K`` folds, ``R`` times over (scikit-learn's shuffled ``KFold``, one
``random_state`` per draw). In each draw every model is fitted on ``K - 1`` folds and scores the
one left out, so each pair gets exactly one out-of-fold margin per draw and model, and all models
see the same folds: their differences are paired on the same pairs *and* the same training sets.

Intervals are the corrected repeated k-fold t interval (Bouckaert & Frank 2004, "Evaluating the
replicability of significance tests for comparing learning algorithms", after Nadeau & Bengio 2003,
"Inference for the generalization error"): with ``s`` the ``K * R`` per-fold statistics,
``mean +- t_{KR-1} * sqrt((1 / (K R) + n_test / n_train) * var(s))``, where the ``n_test / n_train =
1 / (K - 1)`` term stands for the variance that comes from which pairs the model was trained on.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import matthews_corrcoef
from sklearn.model_selection import KFold

from .metrics import auc_roc
from .stats import ALPHA, POWER, mcnemar_exact, normal_quantile


def fold_draws(n: int, folds: int = 5, draws: int = 10, seed: int = 0) -> np.ndarray:
    """The fold of every pair in every draw: ``int[draws, n]``, values in ``[0, folds)``.

    Draw ``d`` is scikit-learn's ``KFold(folds, shuffle=True, random_state=seed + d)``.

    Raises:
        ValueError: fewer than 2 folds, fewer than 1 draw, or fewer pairs than ``2 * folds``.
    """
    if folds < 2 or draws < 1 or n < 2 * folds:
        raise ValueError(f"cross-fitting needs folds >= 2, draws >= 1 and at least {2 * folds} pairs; "
                         f"got folds={folds}, draws={draws}, n={n}")
    out = np.empty((draws, n), dtype=np.int64)
    for d in range(draws):
        for k, (_, test) in enumerate(KFold(folds, shuffle=True, random_state=seed + d).split(np.arange(n))):
            out[d, test] = k
    return out


def out_of_fold(fit, scorers: dict, assignments: np.ndarray, n_jobs: int = 1) -> dict[str, np.ndarray]:
    """Out-of-fold margins of the models one fit serves: ``{name: float[draws, n]}``.

    For each draw and fold ``k``, ``model = fit(train_idx)`` on the pairs outside fold ``k``, and each
    ``scorers[name](model, test_idx)`` gives margins (``r_chosen - r_rejected``, ``float[len(test_idx)]``) of
    the pairs in it: several scorers share a fit (a bf16 head also scores int8/int4 features, ``-ptq``).
    ``n_jobs`` fits run at once in worker processes (``joblib.Parallel``; -1: one per core); each fit is
    deterministic, so the margins do not depend on it.

    Raises:
        ValueError: a scorer returned a non-finite margin or the wrong number of them.
    """
    from joblib import Parallel, delayed

    draws, n = assignments.shape
    out = {name: np.full((draws, n), np.nan) for name in scorers}
    folds = [(d, k) for d in range(draws) for k in np.unique(assignments[d])]
    models = Parallel(n_jobs=n_jobs)(delayed(fit)(np.flatnonzero(assignments[d] != k)) for d, k in folds)
    for (d, k), model in zip(folds, models):
        test = np.flatnonzero(assignments[d] == k)
        for name, score in scorers.items():
            margins = np.asarray(score(model, test), float)
            if margins.shape != test.shape or not np.all(np.isfinite(margins)):
                raise ValueError(f"{name}, draw {d}, fold {k}: expected {test.size} finite margins, "
                                 f"got {margins[:5]}...")
            out[name][d, test] = margins
    return out


def per_fold(values: np.ndarray, assignments: np.ndarray, statistic=np.mean) -> np.ndarray:
    """``statistic`` of ``values[d, fold k]`` for every draw ``d`` and fold ``k``: ``float[draws * folds]``."""
    return np.array([statistic(values[d, assignments[d] == k])
                     for d in range(assignments.shape[0]) for k in np.unique(assignments[d])], float)


def corrected_interval(fold_values: np.ndarray, folds: int, level: float = 0.95) -> dict:
    """Mean of per-fold statistics with the corrected repeated k-fold t interval and p-value (module doc).

    Args:
        fold_values: ``float[draws * folds]``, one statistic per fold of every draw.
        folds: ``K``; ``n_test / n_train`` is taken as ``1 / (K - 1)``.
    Returns:
        ``{"mean", "ci": [lo, hi], "se", "p_value"}``; ``p_value`` tests a mean of 0 (two-sided).
    """
    from scipy.stats import t  # imported on use: a stage process need not hold scipy.stats

    s = np.asarray(fold_values, float)
    m, df = float(s.mean()), s.size - 1
    se = math.sqrt((1 / s.size + 1 / (folds - 1)) * float(s.var(ddof=1)))
    half = float(t.ppf(1 - (1 - level) / 2, df)) * se
    p = 1.0 if se == 0 and m == 0 else (0.0 if se == 0 else float(2 * t.sf(abs(m) / se, df)))
    return {"mean": m, "ci": [m - half, m + half], "se": se, "p_value": p}


def summarize(margins: np.ndarray, assignments: np.ndarray) -> dict:
    """Cross-fitted quality of one model from its out-of-fold margins (``float[draws, n]``).

    Returns ``{"accuracy", "accuracy_ci95", "accuracy_draw_sd", "auc_roc", "auc_roc_ci95", "n", "draws",
    "folds"}``: accuracy (strict: a tie is wrong) and AUC-ROC as means over the folds of every draw with
    corrected intervals (:func:`corrected_interval`), and the sd of the whole-pool accuracy across draws
    (how much the training sets alone move it).
    """
    folds = len(np.unique(assignments[0]))
    correct = (margins > 0).astype(float)
    acc = corrected_interval(per_fold(correct, assignments), folds)
    auc = corrected_interval(per_fold(margins, assignments, lambda m: auc_roc(m, np.zeros_like(m))), folds)
    draw_acc = correct.mean(axis=1)
    return {"accuracy": acc["mean"], "accuracy_ci95": acc["ci"],
            "accuracy_draw_sd": float(draw_acc.std(ddof=1)) if draw_acc.size > 1 else 0.0,
            "auc_roc": auc["mean"], "auc_roc_ci95": auc["ci"], "n": int(margins.shape[1]),
            "draws": int(margins.shape[0]), "folds": folds}


def pooled_correct(margins: np.ndarray) -> np.ndarray:
    """``bool[n]``: the pooled out-of-fold decision is right, i.e. the pair's margin averaged over draws is > 0."""
    return margins.mean(axis=0) > 0


def compare(margins_a: np.ndarray, margins_b: np.ndarray, assignments: np.ndarray, alpha: float = ALPHA,
            power: float = POWER) -> dict:
    """A against B on the same pairs and folds: accuracy difference ``A - B``.

    Returns ``{"difference", "ci", "se", "p_value", "mde", "only_a", "only_b", "discordant", "mcnemar_p", "n"}``:
    the difference of per-fold accuracies with its corrected interval and t-test p-value (the verdict's
    test), the minimum detectable difference ``(z_{1-alpha/2} + z_power) * se``, and the exact McNemar test
    on the pooled out-of-fold decisions (:func:`pooled_correct`) beside it.
    """
    folds = len(np.unique(assignments[0]))
    diff = (margins_a > 0).astype(float) - (margins_b > 0).astype(float)
    c = corrected_interval(per_fold(diff, assignments), folds)
    test = mcnemar_exact(pooled_correct(margins_a), pooled_correct(margins_b))
    return {"difference": c["mean"], "ci": c["ci"], "se": c["se"], "p_value": c["p_value"],
            "mde": (normal_quantile(1 - alpha / 2) + normal_quantile(power)) * c["se"], "only_a": test["only_a"],
            "only_b": test["only_b"],
            "discordant": test["discordant"], "mcnemar_p": test["p_value"], "n": test["n"]}


def phi(correct_a, correct_b) -> float:
    """Phi coefficient of two models' per-pair correctness (``bool[n]`` each): the Pearson correlation of two
    binary variables, computed as scikit-learn's ``matthews_corrcoef`` (the same quantity); 0 for
    independent errors, 1 for the same errors. 0.0 where either is constant (scikit-learn's convention)."""
    return float(matthews_corrcoef(np.asarray(correct_a, bool), np.asarray(correct_b, bool)))


def probe_fitter(train_diff: np.ndarray, score_diffs: dict[str, np.ndarray], seed: int = 0):
    """``(fit, scorers)`` for :func:`out_of_fold` of probe reward models: the linear Bradley-Terry head
    (:func:`edgerlhf.core.baselines.fit_pairwise_logistic`, C chosen by cross-validation inside the training
    folds, so nested) fitted on ``train_diff`` (``float[n, D]``, features of chosen - rejected) and applied to
    each of ``score_diffs`` (``{name: float[n, D]}``): the training features for the model trained at that
    precision, another precision's for post-training quantization (a bf16 head on int8/int4 features)."""
    from .baselines import fit_pairwise_logistic

    def scorer(diff):
        return lambda weight, idx: diff[idx] @ weight

    return (lambda idx: fit_pairwise_logistic(train_diff[idx], seed=seed)["weight"],
            {name: scorer(diff) for name, diff in score_diffs.items()})


def tfidf_fitter(chosen: list[str], rejected: list[str], seed: int = 0, name: str = "tf-idf"):
    """``(fit, scorers)`` for :func:`out_of_fold` of the TF-IDF baseline (:class:`edgerlhf.core.baselines.TfidfReward`,
    vocabulary and head from the training folds' replies only)."""
    from .baselines import TfidfReward

    c, r = np.asarray(chosen, object), np.asarray(rejected, object)
    return (lambda idx: TfidfReward(seed).fit(list(c[idx]), list(r[idx])),
            {name: lambda model, idx: model.score(list(c[idx])) - model.score(list(r[idx]))})


def length_margins(chosen: list[str], rejected: list[str], draws: int) -> dict[str, np.ndarray]:
    """Margins of the two length rules (:func:`edgerlhf.core.baselines.length_scores`; nothing is fitted, so
    every draw is the same): ``{"shorter wins": float[draws, n], "longer wins": ...}``."""
    from .baselines import length_scores

    out = {}
    for prefer in ("shorter", "longer"):
        c, r = length_scores(chosen, rejected, prefer)
        out[f"{prefer} wins"] = np.tile(c - r, (draws, 1))
    return out


def assess(margins: dict[str, np.ndarray], baselines: list[str], assignments: np.ndarray, reference: str = "bf16",
           alpha: float = ALPHA, candidates: tuple[str, ...] = ()) -> dict:
    """Cross-fitted quality of every model and its paired comparisons, in families with Holm's correction.

    Args:
        margins: ``{name: float[draws, n]}`` out-of-fold margins of reward models and baselines on the
            same pairs and folds (``assignments``, ``int[draws, n]``).
        baselines: the names in ``margins`` that are baselines (the length rules end in ``" wins"``).
        candidates: names in ``margins`` summarized and in ``agreement`` but in no family (judge candidates).
    Returns:
        ``{"models": {name: summarize(...)}, "length_baseline", "best_baseline", "comparisons": [...],
        "agreement": {a: {b: {"agreement", "phi"}}}, "candidates": [...], "conclusions": [sentences]}``. The families, each
        corrected by Holm's method (:func:`edgerlhf.core.stats.holm`): every reward model against the
        better length rule; against the best baseline (when that is not the length rule); and every other
        model against ``reference``. ``agreement`` is the share of pairs two models rank the same way and the
        phi correlation of their correctness, both on the pooled decisions (:func:`pooled_correct`).
    """
    from .stats import holm

    summary = {name: summarize(m, assignments) for name, m in margins.items()}
    models = [name for name in margins if name not in baselines and name not in candidates]
    length = max((b for b in baselines if b.endswith(" wins")), key=lambda b: summary[b]["accuracy"])
    best = max(baselines, key=lambda b: summary[b]["accuracy"])
    families = {f"vs {length}": [(m, length) for m in models]}
    if best != length:
        families[f"vs {best}"] = [(m, best) for m in models]
    if reference in models:
        families[f"vs {reference}"] = [(m, reference) for m in models if m != reference]
    comparisons = []
    for family, pairs in families.items():
        results = [compare(margins[a], margins[b], assignments, alpha) for a, b in pairs]
        for (a, b), c, p in zip(pairs, results, holm([c["p_value"] for c in results])):
            comparisons.append({"family": family, "a": a, "b": b, **c, "p_holm": p, "family_size": len(pairs)})
    decided = {name: pooled_correct(m) for name, m in margins.items()}
    agreement = {a: {b: {"agreement": float(np.mean(np.sign(margins[a].mean(0)) == np.sign(margins[b].mean(0)))),
                         "phi": phi(decided[a], decided[b])} for b in margins} for a in margins}
    return {"models": summary, "length_baseline": length, "best_baseline": best, "comparisons": comparisons,
            "agreement": agreement, "candidates": list(candidates),
            "conclusions": [describe(c, alpha) for c in comparisons]}


def judge_frontier(crossfit: dict, candidates: list[str], proxies: list[str], accuracy_target: float = 0.65,
                   phi_target: float = 0.3) -> list[dict]:
    """Judge candidates on the accuracy-independence frontier, from :func:`assess`'s result: per candidate, its
    cross-fitted accuracy (and interval) and the phi correlation of its correctness with each proxy (pooled
    decisions); ``meets_target`` where accuracy >= ``accuracy_target`` and every phi <= ``phi_target`` (a judge
    whose errors are not the proxies', so it can see a policy exploit them). Rows sorted by the largest phi."""
    rows = []
    for name in candidates:
        m, phis = crossfit["models"][name], {p: crossfit["agreement"][name][p]["phi"] for p in proxies}
        rows.append({"candidate": name, "accuracy": m["accuracy"], "accuracy_ci95": m["accuracy_ci95"],
                     "phi": phis, "max_phi": max(phis.values()),
                     "meets_target": m["accuracy"] >= accuracy_target and max(phis.values()) <= phi_target})
    return sorted(rows, key=lambda row: row["max_phi"])


def describe(c: dict, alpha: float = ALPHA) -> str:
    """One sentence stating what a comparison of :func:`assess` allows one to conclude, after Holm's correction.

    e.g. ``"int4 - bf16: -0.8 points [-2.1, +0.5]; corrected t-test p = 0.21, Holm-adjusted p = 0.63 over 4
    comparisons; McNemar on pooled decisions 41 vs 56, p = 0.15: no difference detectable after Holm's
    correction (minimum detectable difference 1.9 points)"``.
    """
    lo, hi = c["ci"]
    head = (f"{c['a']} - {c['b']}: {100 * c['difference']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]; "
            f"corrected t-test p = {c['p_value']:.3g}, Holm-adjusted p = {c['p_holm']:.3g} over {c['family_size']} "
            f"comparison{'s' if c['family_size'] > 1 else ''}; McNemar on pooled decisions {c['only_a']} vs "
            f"{c['only_b']}, p = {c['mcnemar_p']:.3g}")
    if c["p_holm"] < alpha:
        better = "better" if c["difference"] > 0 else "worse"
        return f"{head}: {c['a']} is {better} than {c['b']} after Holm's correction"
    return (f"{head}: no difference detectable after Holm's correction (minimum detectable difference "
            f"{100 * c['mde']:.1f} points)")


def column_key(family: str) -> str:
    """The prefix of a family's columns in :func:`table`: ``"vs tf-idf"`` -> ``"vs_tf_idf"``."""
    return family.replace(" ", "_").replace("-", "_")


def table(crossfit: dict, proxies: list[str]) -> list[dict]:
    """One row per model of the cross-fitted evaluation (:func:`assess`'s result; judge candidates are
    :func:`judge_frontier`'s): accuracy and AUC-ROC with
    their corrected intervals, the sd of accuracy across fold draws, each family's comparison (points, interval,
    Holm-adjusted p, minimum detectable difference) and the phi correlation of its correctness with each proxy."""
    by = {(c["a"], c["family"]): c for c in crossfit["comparisons"]}
    rows = []
    for name, m in crossfit["models"].items():
        if name in crossfit.get("candidates", ()):
            continue
        row = {"model": name, "accuracy": m["accuracy"], "accuracy_ci95": m["accuracy_ci95"],
               "accuracy_draw_sd": m["accuracy_draw_sd"], "auc_roc": m["auc_roc"], "auc_roc_ci95": m["auc_roc_ci95"]}
        for family in dict.fromkeys(c["family"] for c in crossfit["comparisons"]):
            c, key = by.get((name, family)), column_key(family)
            row.update({f"{key}_points": 100 * c["difference"] if c else None,
                        f"{key}_ci95": [100 * x for x in c["ci"]] if c else None,
                        f"{key}_p_holm": c["p_holm"] if c else None,
                        f"{key}_mde_points": 100 * c["mde"] if c else None})
        row.update({f"phi_vs_{p}": crossfit["agreement"][name][p]["phi"] for p in proxies})
        rows.append(row)
    return rows
