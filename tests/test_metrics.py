import warnings

import numpy as np
import pytest

from edgerlhf.core.metrics import (
    agreement, auc_roc, bootstrap_ci, calibration, evaluate_pairs, fit_temperature, pairwise_accuracy,
)


def test_accuracy_perfect_inverted_tied():
    c, r = np.array([2.0, 1.0, 3.0]), np.array([1.0, 0.0, 2.5])
    assert pairwise_accuracy(c, r) == {"accuracy": 1.0, "ties": 0, "n": 3}
    assert pairwise_accuracy(r, c)["accuracy"] == 0.0
    tied = pairwise_accuracy(c, c)
    assert tied["accuracy"] == 0.0 and tied["ties"] == 3  # ties count as wrong
    assert auc_roc(c, r) == 1.0 and auc_roc(r, c) == 0.0 and auc_roc(c, c) == 0.5


def test_the_vectorized_auc_is_scikit_learns_with_ties_and_saturated_margins():
    from sklearn.metrics import roc_auc_score

    from edgerlhf.core.metrics import auc_of_margins

    rng = np.random.default_rng(0)
    for scale in (1.0, 60.0):  # 60: expit saturates to exactly 0 and 1, so margins tie there
        c, r = (rng.normal(size=50) * scale).round(1), rng.normal(size=50).round(1)
        assert auc_of_margins(c - r) == pytest.approx(auc_roc(c, r), abs=1e-12)
        many = np.stack([c - r, r - c, np.zeros(50)])  # several resamples at once, along the last axis
        assert auc_of_margins(many) == pytest.approx([auc_roc(c, r), auc_roc(r, c), 0.5], abs=1e-12)
    delta = np.array([2.0, -1.0, 0.5])
    scores = np.concatenate([1 / (1 + np.exp(-delta)), 1 / (1 + np.exp(delta))])
    assert auc_of_margins(delta) == pytest.approx(roc_auc_score([1, 1, 1, 0, 0, 0], scores))


def test_auc_hand_computed():
    # deltas 2, -1, 0.5: positives sigmoid(d), negatives sigmoid(-d); 6 of 9 (pos, neg) pairs ordered right
    assert auc_roc([2.0, -1.0, 0.5], [0.0, 0.0, 0.0]) == pytest.approx(6 / 9)


def test_random_scores_are_near_chance():
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=4000), rng.normal(size=4000)
    assert abs(pairwise_accuracy(c, r)["accuracy"] - 0.5) < 0.03
    assert abs(auc_roc(c, r) - 0.5) < 0.03


def test_ece_hand_computed_and_calibrated_toy():
    # two pairs with |delta| = 2: confidence sigmoid(2) = 0.881 each, one right one wrong -> ECE = 0.881 - 0.5
    out = calibration([2.0, -2.0])
    assert out["ece"] == pytest.approx(1 / (1 + np.exp(-2)) - 0.5)
    assert sum(b["n"] for b in out["bins"]) == 2
    # perfectly calibrated by construction: a pair with confidence p is right with probability p
    rng = np.random.default_rng(1)
    d = np.abs(rng.normal(0, 2, size=200_000))
    right = rng.random(d.size) < 1 / (1 + np.exp(-d))
    assert calibration(np.where(right, d, -d))["ece"] < 0.01


def test_temperature_fixes_overconfidence():
    rng = np.random.default_rng(2)
    d = np.abs(rng.normal(0, 1, size=20_000))
    right = rng.random(d.size) < 1 / (1 + np.exp(-d))
    overconfident = 4 * np.where(right, d, -d)
    t = fit_temperature(overconfident)
    assert 3.5 < t < 4.5
    assert calibration(overconfident, temperature=t)["ece"] < 0.02 < calibration(overconfident)["ece"]


def test_bootstrap_ci_brackets_accuracy():
    c = np.r_[np.ones(70), np.zeros(30)]
    lo, hi = bootstrap_ci(c, np.full(100, 0.5))
    assert lo < 0.7 < hi and hi - lo < 0.25


def test_extreme_margins_give_probabilities_without_overflow_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp(1000) overflowed in the hand-written sigmoid
        out = calibration(np.array([-1000.0, 1000.0, 0.5]))
        assert auc_roc([1000.0, -1000.0], [0.0, 0.0]) == 0.5
    assert out["bins"][-1]["n"] == 2 and out["nll"] == pytest.approx((27.631021 + 0 + 0.474077) / 3, rel=1e-6)


def test_agreement_and_evaluate_pairs():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert agreement(a, 2 * a, [1, -1], [2, -3]) == {"spearman": pytest.approx(1.0), "same_ranking": 1.0}
    out = evaluate_pairs([1.0, 2.0, 0.0], [0.0, 0.0, 1.0], validation_delta=np.array([1.0, -1.0, 2.0]))
    assert out["accuracy"] == pytest.approx(2 / 3) and out["temperature"] > 0 and len(out["reliability"]) == 10
    assert evaluate_pairs([1.0], [0.0])["temperature"] is None
