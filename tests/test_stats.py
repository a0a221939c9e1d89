"""Paired statistics on hand-computed examples."""
import math

import json

import numpy as np
import pytest

from edgerlhf.core.baselines import DEFAULT_CS, TfidfReward, fit_pairwise_logistic, length_scores
from edgerlhf.core.stats import (
    compare_classifiers, describe_comparison, mcnemar_exact, mde_mcnemar, mde_paired_mean, paired_bootstrap,
    percentile_bootstrap, wilson_interval,
)


def test_mcnemar_exact_hand_computed():
    # 8 items only A gets right, 2 only B, 5 both, 5 neither:
    # p = 2 * P(X <= 2 | n = 10, 1/2) = 2 * (1 + 10 + 45) / 1024
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5, bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 5, bool)
    out = mcnemar_exact(a, b)
    assert (out["only_a"], out["only_b"], out["discordant"], out["n"]) == (8, 2, 10, 20)
    assert out["p_value"] == pytest.approx(112 / 1024)
    assert mcnemar_exact(b, a)["p_value"] == pytest.approx(112 / 1024)  # two-sided
    assert mcnemar_exact(a, a)["p_value"] == 1.0  # no discordant item
    with pytest.raises(ValueError, match="equal length"):
        mcnemar_exact(a, b[:3])


def test_wilson_interval_hand_computed():
    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z sqrt(0.016 + z^2/400) / (1 + z^2/10)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0) and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_paired_bootstrap_keeps_the_pairing():
    # b = a - 1 exactly: every resample has difference 1, so the interval is a point
    a = np.arange(50, dtype=float)
    out = paired_bootstrap(a, a - 1)
    assert out["mean_difference"] == 1.0 and out["ci"] == [1.0, 1.0] and out["sd_difference"] == 0.0
    # unpaired resampling would give a wide interval here; paired, it brackets the mean
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    out = paired_bootstrap(x + 0.3 + rng.normal(0, 0.1, 400), x)
    assert out["ci"][0] < 0.3 < out["ci"][1] and out["ci"][1] - out["ci"][0] < 0.05


def test_bootstraps_of_one_item_are_a_point_and_paired_samples_are_resampled_together():
    # SciPy's bootstrap refuses one observation; every resample of one item is that item
    assert paired_bootstrap([2.0], [0.5])["ci"] == [1.5, 1.5]
    assert percentile_bootstrap(([3.0],), np.mean, paired=False, vectorized=True) == [3.0, 3.0]
    # resampled together, x - y is always 1 here; resampled apart it would spread over [-8, 10]
    x = np.arange(10.0)
    lo, hi = percentile_bootstrap((x + 1, x), lambda a, b, axis=-1: np.mean(a - b, axis=axis), paired=True,
                                  vectorized=True, n_boot=500)
    assert lo == hi == pytest.approx(1.0)


def test_minimum_detectable_differences():
    # Connor (1987): n d^2 = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 at the returned d
    d = mde_mcnemar(1000, 0.15)
    za, zb = 1.959964, 0.841621
    assert 1000 * d * d == pytest.approx((za * math.sqrt(0.15) + zb * math.sqrt(0.15 - d * d)) ** 2, rel=1e-6)
    assert 0.030 < d < (za + zb) * math.sqrt(0.15 / 1000)  # just under the normal approximation (0.0343)
    assert mde_mcnemar(4000, 0.15) < d  # more items, smaller detectable difference
    assert math.isnan(mde_mcnemar(100, 0.0))
    assert mde_paired_mean(100, 1.0) == pytest.approx((za + zb) / 10, rel=1e-5)


def test_compare_and_describe_in_words():
    a = np.array([1] * 30 + [0] * 5 + [1] * 50 + [0] * 15, bool)  # A right on 80 of 100
    b = np.array([0] * 30 + [1] * 5 + [1] * 50 + [0] * 15, bool)  # B right on 55
    c = compare_classifiers(a, b)
    assert c["difference"] == pytest.approx(0.25) and c["ci"][0] > 0 and c["p_value"] < 1e-4
    text = describe_comparison("bf16", "shorter wins", c)
    assert text.startswith("bf16 vs shorter wins: +25.0 points [") and "bf16 is better than shorter wins" in text
    same = compare_classifiers(a, a[::-1].copy())
    words = describe_comparison("int4", "bf16", same)
    assert "no difference detectable at n = 100" in words and "minimum detectable difference" in words


def test_length_rules_and_tfidf_baseline():
    c, r = length_scores(["a", "abc"], ["ab", "a"], "shorter")
    assert list(c > r) == [True, False]
    c, r = length_scores(["a", "abc"], ["ab", "a"], "longer")
    assert list(c > r) == [False, True]
    with pytest.raises(ValueError):
        length_scores(["a"], ["b"], "middle")
    # a word that always marks the chosen reply is learned by the bag-of-words model
    chosen = [f"thanks for asking about item {i}" for i in range(40)]
    rejected = [f"go away about item {i}" for i in range(40)]
    model = TfidfReward(seed=0).fit(chosen, rejected)
    assert np.all(model.score(["thanks for asking about item 99"]) > model.score(["go away about item 99"]))


def test_a_saved_tfidf_reward_model_scores_as_the_fitted_one_and_bad_files_are_refused(tmp_path):
    chosen = [f"thanks for asking about item {i}" for i in range(40)]
    rejected = [f"go away about item {i}" for i in range(40)]
    model = TfidfReward(seed=0).fit(chosen, rejected)
    model.save(tmp_path)
    replies = ["thanks, go away", "item 7 thanks for asking", "nothing known here"]
    assert np.array_equal(TfidfReward.load(tmp_path).score(replies), model.score(replies))
    assert not list(tmp_path.glob("*.pkl"))
    meta = json.loads((tmp_path / "tfidf.json").read_text())
    (tmp_path / "tfidf.json").write_text(json.dumps({**meta, "vocabulary": meta["vocabulary"][:-1]}))
    with pytest.raises(ValueError, match=r"tfidf\.safetensors: 'idf' must be"):
        TfidfReward.load(tmp_path)
    (tmp_path / "tfidf.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tfidf\.json: missing"):
        TfidfReward.load(tmp_path)


def test_pairwise_logistic_recovers_a_direction():
    rng = np.random.default_rng(0)
    w = np.array([2.0, -1.0, 0.0])
    diff = rng.normal(size=(400, 3)) * [1.0, 10.0, 1.0]  # unequal scales: weights are for the raw features
    chosen_first = rng.random(400) < 1 / (1 + np.exp(-diff @ w))
    diff = np.where(chosen_first[:, None], diff, -diff)  # rows as chosen - rejected
    fit = fit_pairwise_logistic(diff, seed=1)
    est = fit["weight"] / np.linalg.norm(fit["weight"])
    assert est @ (w / np.linalg.norm(w)) > 0.95
    assert [c for c, _ in fit["cv_curve"]] == sorted(DEFAULT_CS)  # the loss kept falling: every C was tried
    noise = rng.normal(size=(100, 50))  # nothing to learn: the weakest fit is best and the walk stops early
    curve = fit_pairwise_logistic(noise, seed=1)["cv_curve"]
    losses = [loss for _, loss in curve]
    assert len(curve) < len(DEFAULT_CS) and losses.index(min(losses)) == len(curve) - 3
    with pytest.raises(ValueError, match="at least 10 pairs"):
        fit_pairwise_logistic(diff[:5])


def test_t_test_p_matches_scipy_and_handles_differences_without_variance():
    from scipy.stats import ttest_1samp

    from edgerlhf.core.stats import t_test_p

    d = np.array([0.3, -0.1, 0.5, 0.2, 0.0, 0.4])
    assert t_test_p(d) == pytest.approx(ttest_1samp(d, 0.0).pvalue)
    assert t_test_p(np.zeros(5)) == 1.0 and t_test_p(np.full(5, 0.2)) == 0.0  # SciPy gives NaN for both
    with pytest.raises(ValueError):
        t_test_p([0.1, float("nan")])
