"""Stages 3 and 4 (03_Reward_Modeling, 04_PPO_Alignment): paired statistics and the words that state the result.

Every comparison in EdgeRLHF is paired: two reward models are scored on the same held-out
pairs, two policies answer the same held-out prompts. The tools:

* :func:`mcnemar_exact` - exact McNemar test on the discordant items of two classifiers
  (McNemar 1947; exact binomial form, Fagerland et al. 2013, "The McNemar test for binary
  matched-pairs data: mid-p and asymptotic are better than exact conditional" - we report the
  conservative exact p-value);
* :func:`paired_bootstrap` - percentile bootstrap interval of a paired difference of means
  (Efron & Tibshirani 1993; SciPy's ``bootstrap``, ``paired=True``), items resampled together so the
  pairing is kept;
* :func:`wilson_interval` - Wilson score interval of a proportion (Wilson 1927; Brown, Cai &
  DasGupta 2001 recommend it over the Wald interval);
* :func:`mde_mcnemar` / :func:`mde_paired_mean` - the smallest difference a two-sided test at
  ``alpha`` detects with probability ``power`` at this number of items (Connor 1987 for
  McNemar; the normal approximation for a paired mean);
* :func:`holm` - Holm's step-down adjustment of a family's p-values (Holm 1979), so that a family of
  tests keeps its family-wise error rate at ``alpha``;
* :func:`compare_classifiers` / :func:`describe_comparison` - all of that for two models, and
  one generated sentence saying what can be concluded.

Arrays are 1-D, one entry per item; "correct" arrays are booleans (or 0/1).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

ALPHA = 0.05
POWER = 0.8
N_BOOT = 2000


def normal_quantile(q: float) -> float:
    """The standard normal quantile ``Phi^-1(q)`` (``statistics.NormalDist``; the same value as SciPy's
    ``norm.ppf`` to double precision)."""
    return NormalDist().inv_cdf(q)


def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact two-sided McNemar test of two classifiers on the same items.

    ``only_a`` counts items that A gets right and B wrong, ``only_b`` the reverse. Under the null
    hypothesis (equal accuracy) ``only_a ~ Binomial(only_a + only_b, 1/2)``; the p-value is the
    exact two-sided binomial test (SciPy ``binomtest``), 1.0 when there is no discordant item.

    Args:
        correct_a, correct_b: ``bool[N]`` per-item correctness of A and B.
    Returns:
        ``{"only_a", "only_b", "discordant", "n", "p_value"}``.
    Raises:
        ValueError: the arrays differ in length or are empty.
    """
    a, b = _paired(correct_a, correct_b)
    a, b = a.astype(bool), b.astype(bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    from scipy.stats import binomtest  # imported on use: a stage process need not hold scipy.stats in memory

    p = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "discordant": discordant, "n": int(a.size), "p_value": p}


def percentile_bootstrap(data: tuple, statistic, *, paired: bool, vectorized: bool, n_boot: int = N_BOOT,
                         level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993) of ``statistic(*data)``: SciPy's
    ``scipy.stats.bootstrap(method="percentile")``, ``n_boot`` resamples drawn with
    ``numpy.random.default_rng(seed)``.

    Args:
        data: samples, ``float[N]`` each (with ``paired``, the same ``N`` items in the same order, resampled
            together).
        statistic: ``statistic(*samples, axis=-1)`` over resamples stacked on axis 0 when ``vectorized``, else
            ``statistic(*samples)`` of one resample.
    Returns:
        ``[lo, hi]``; with one item every resample is that item, so ``[s, s]`` with ``s = statistic(*data)``
        (SciPy refuses fewer than two observations).
    Raises:
        ValueError: an empty sample, or paired samples of different lengths (SciPy).
    """
    from scipy.stats import bootstrap  # imported on use, like binomtest

    if all(np.size(x) == 1 for x in data):
        point = float(statistic(*data, axis=-1) if vectorized else statistic(*data))
        return [point, point]
    res = bootstrap(data, statistic, n_resamples=n_boot, paired=paired, vectorized=vectorized,
                    confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def paired_bootstrap(values_a, values_b, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``a - b`` over items and its percentile bootstrap interval, items resampled in pairs
    (:func:`percentile_bootstrap`, ``paired=True``).

    With 0/1 correctness this is the accuracy difference of two classifiers; with per-prompt
    scores it is the mean paired change (e.g. judge score after PPO minus before).

    Args:
        values_a, values_b: ``float[N]`` per-item values of A and B (same items, same order).
        n_boot: bootstrap resamples, drawn with ``numpy.random.default_rng(seed)``.
    Returns:
        ``{"mean_difference", "ci": [lo, hi], "sd_difference", "n"}``.
    Raises:
        ValueError: the arrays differ in length or are empty.
    """
    a, b = _paired(values_a, values_b)
    a, b = a.astype(float), b.astype(float)
    diff = a - b
    ci = percentile_bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                              n_boot=n_boot, level=level, seed=seed)
    return {"mean_difference": float(diff.mean()), "ci": ci,
            "sd_difference": float(diff.std(ddof=1)) if diff.size > 1 else 0.0, "n": int(diff.size)}


def wilson_interval(successes: float, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of a proportion ``successes / n`` (Wilson 1927).

    ``successes`` may be fractional (a tie counted as half a win).

    Raises:
        ValueError: ``n`` is not positive or ``successes`` is outside ``[0, n]``.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes}, {n}")
    z = normal_quantile(1 - (1 - level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def mde_mcnemar(n: int, discordant_share: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest accuracy difference ``d`` that McNemar's test detects at ``alpha`` with ``power``.

    Connor (1987), "Sample size for testing differences in proportions for the paired-sample
    design": ``n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2`` with ``psi`` the share of
    discordant items; solved for ``d``. Returns ``nan`` when ``psi`` is 0 (the models never
    disagree, so no difference can show).
    """
    if discordant_share <= 0 or n <= 0:
        return float("nan")
    za, zb = normal_quantile(1 - alpha / 2), normal_quantile(power)
    psi = discordant_share

    def gap(d: float) -> float:
        return n * d * d - (za * math.sqrt(psi) + zb * math.sqrt(max(psi - d * d, 0.0))) ** 2

    hi = math.sqrt(psi)
    from scipy.optimize import brentq

    return float(brentq(gap, 1e-9, hi)) if gap(hi) > 0 else float(hi)


def holm(p_values) -> list[float]:
    """Holm-adjusted p-values of one family of tests (Holm 1979, "A simple sequentially rejective multiple test
    procedure"; statsmodels' ``multipletests(method="holm")``), in the order given: a test is rejected at family-wise
    level ``alpha`` when its adjusted p-value is below ``alpha``. An empty family gives ``[]``.

    Raises:
        ValueError: a p-value is not finite or outside ``[0, 1]``.
    """
    p = np.asarray(p_values, float)
    if p.size == 0:
        return []
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be finite and in [0, 1], got {p.tolist()}")
    from statsmodels.stats.multitest import multipletests  # imported on use, like scipy.stats

    return [float(x) for x in multipletests(p, method="holm")[1]]


def holm_family(tests: list[dict]) -> list[dict]:
    """The tests of one family (each a dict with ``p_value``), each with ``p_holm`` (:func:`holm` over the list) and
    ``family_size`` added, in the order given."""
    adjusted = holm([t["p_value"] for t in tests])
    return [{**t, "p_holm": p, "family_size": len(tests)} for t, p in zip(tests, adjusted)]


def t_test_p(differences) -> float:
    """Two-sided one-sample t-test of mean 0 on paired differences ``float[N]`` (``scipy.stats.ttest_1samp``). Where
    every difference is the same value (no variance) it is 1.0 for 0 and 0.0 otherwise, where SciPy gives NaN."""
    d = np.asarray(differences, float)
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"t_test_p needs finite differences, got {d.tolist()[:5]}")
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    from scipy.stats import ttest_1samp  # imported on use, like binomtest

    return float(ttest_1samp(d, 0.0).pvalue)


def mde_paired_mean(n: int, sd_difference: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest mean paired difference detectable at ``alpha`` with ``power``: ``(z_a + z_b) sd / sqrt(n)``."""
    if n <= 1:
        return float("nan")
    return float((normal_quantile(1 - alpha / 2) + normal_quantile(power)) * sd_difference / math.sqrt(n))


def compare_classifiers(correct_a, correct_b, seed: int = 0) -> dict:
    """A against B on the same items: accuracy difference (A - B) with its paired bootstrap interval,
    the exact McNemar p-value, and the minimum detectable difference at this ``n``."""
    test = mcnemar_exact(correct_a, correct_b)
    boot = paired_bootstrap(np.asarray(correct_a, float), np.asarray(correct_b, float), seed=seed)
    return {"difference": boot["mean_difference"], "ci": boot["ci"], **test,
            "mde": mde_mcnemar(test["n"], test["discordant"] / test["n"])}


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def describe_comparison(name_a: str, name_b: str, comparison: dict, alpha: float = ALPHA) -> str:
    """One sentence stating what a :func:`compare_classifiers` result allows one to conclude.

    When the comparison carries ``p_holm`` and ``family_size`` (its family's Holm-adjusted p-value,
    :func:`holm`), the verdict uses the adjusted p-value and says so. e.g. ``"int4 vs bf16: -1.2 points
    [-3.9, +1.5], McNemar p = 0.41 (35 vs 47 discordant pairs), Holm-adjusted p = 1 over 4 comparisons: no
    difference detectable at n = 1,000 (minimum detectable difference 4.1 points)"``.
    """
    c = comparison
    lo, hi = c["ci"]
    head = (f"{name_a} vs {name_b}: {_points(c['difference'])} points [{_points(lo)}, {_points(hi)}], "
            f"McNemar p = {c['p_value']:.3g} ({c['only_a']} vs {c['only_b']} discordant pairs)")
    p, after = c["p_value"], ""
    if "p_holm" in c:
        p, after = c["p_holm"], " after Holm's correction"
        head += f", Holm-adjusted p = {p:.3g} over {c['family_size']} comparison{'s' if c['family_size'] > 1 else ''}"
    if p < alpha:
        verdict = "better than" if c["difference"] > 0 else "worse than"
        return f"{head}: {name_a} is {verdict} {name_b}{after} (p < {alpha:g}, n = {c['n']:,})"
    mde = c["mde"]
    mde_text = "" if math.isnan(mde) else f" (minimum detectable difference {100 * mde:.1f} points)"
    return f"{head}: no difference detectable{after} at n = {c['n']:,}{mde_text}"


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired statistics need two non-empty 1-D arrays of equal length, got {a.shape}, {b.shape}")
    return a, b
