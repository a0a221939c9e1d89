"""Best-of-n: KL_bon, the picks, Gao et al.'s fits and the paired comparisons (edgerlhf.core.best_of_n)."""
import math

import numpy as np
import pytest

from edgerlhf.core.best_of_n import best_of_k, bootstrap_fit, curves, describe, fit_gao, k_values, kl_bon


def test_kl_bon_is_log_k_minus_k_minus_one_over_k():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bon(16) == pytest.approx(math.log(16) - 15 / 16)
    values = [kl_bon(k) for k in range(1, 65)]
    assert all(b > a for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        kl_bon(0)


def test_kl_bon_matches_the_exact_kl_of_best_of_k_over_distinct_replies():
    # best-of-k over m equally likely distinct replies ranked by the proxy: P(rank i is picked) = (i^k - (i-1)^k)/m^k
    m, k = 100_000, 4
    i = np.arange(1, m + 1, dtype=float)
    p = ((i / m) ** k - ((i - 1) / m) ** k)
    exact = float(np.sum(p * np.log(p * m)))
    assert exact == pytest.approx(kl_bon(k), abs=1e-3)


def test_k_values_double_up_to_n_and_end_at_n():
    assert k_values(16) == [1, 2, 4, 8, 16]
    assert k_values(2) == [1, 2]
    assert k_values(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        k_values(0)


def test_each_k_picks_the_argmax_of_the_first_k_replies():
    scores = np.random.default_rng(0).normal(size=(50, 8))
    for k in k_values(8):
        pick = best_of_k(scores, k)
        for row, j in zip(scores, pick):
            assert j < k and row[j] == max(row[:k])
    tied = np.array([[1.0, 3.0, 3.0, 0.0]])
    assert best_of_k(tied, 4).tolist() == [1]  # the first of equal scores
    with pytest.raises(ValueError):
        best_of_k(scores, 9)
    with pytest.raises(ValueError):
        best_of_k(np.array([[1.0, np.nan]]), 2)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.3, 0.4), ("rl", 0.8, 0.25)])
def test_fits_recover_known_alpha_and_beta(form, alpha, beta):
    d = np.sqrt([kl_bon(k) for k in k_values(64)])
    f = d if form == "bon" else np.log(np.where(d > 0, d, 1.0))
    truth = d * (alpha - beta * f)
    assert fit_gao(d, truth, form) == pytest.approx((alpha, beta), abs=1e-9)
    rng = np.random.default_rng(1)
    gains = truth + rng.normal(0, 0.3, size=(400, len(d)))  # 400 prompts with noise
    fit = bootstrap_fit(gains, d, form, n_boot=400, seed=0)
    assert fit["alpha_ci95"][0] < alpha < fit["alpha_ci95"][1]
    assert fit["beta_ci95"][0] < beta < fit["beta_ci95"][1]
    assert abs(fit["alpha"] - alpha) < 0.15 and abs(fit["beta"] - beta) < 0.15
    with pytest.raises(ValueError):
        fit_gao(d[:2], truth[:2], form)  # one point with d > 0 cannot fix two parameters
    with pytest.raises(ValueError):
        fit_gao(d, truth, "linear")


def _world(prompts=200, n=8, seed=0):
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=(prompts, n))
    return quality, rng.integers(5, 40, size=(prompts, n))


def test_curves_gain_grows_with_k_for_a_proxy_that_tracks_the_judge_and_not_for_noise():
    quality, tokens = _world()
    rng = np.random.default_rng(1)
    proxies = {"bf16": quality + 0.3 * rng.normal(size=quality.shape), "int4": rng.normal(size=quality.shape)}
    out = curves(proxies, {"judge": quality}, tokens, seed=0)
    assert out["ks"] == [1, 2, 4, 8] and out["kl_bon"][0] == 0.0
    gains = [pt["judges"]["judge"]["gain"]["mean_difference"] for pt in out["proxies"]["bf16"]["points"]]
    assert all(b > a for a, b in zip(gains, gains[1:])) and gains[-1] > 0.8
    noise = out["proxies"]["int4"]["points"][-1]["judges"]["judge"]["gain"]
    assert noise["ci"][0] < 0 < noise["ci"][1]
    (diff,) = out["vs_reference"]["judge"]
    assert diff["proxy"] == "int4" and diff["mean_difference"] < 0 and diff["p_holm"] < 0.05
    assert diff["family_size"] == 1 and diff["mde"] > 0
    assert out["proxies"]["bf16"]["fits"]["judge"]["alpha"] > 0
    tokens_at_k = [pt["tokens_mean"] for pt in out["proxies"]["bf16"]["points"]]
    assert all(5 <= t <= 40 for t in tokens_at_k)


def test_identical_proxies_do_not_differ_and_the_family_is_holm_corrected():
    quality, tokens = _world(prompts=60, n=4)
    out = curves({"bf16": quality, "int8": quality.copy(), "int4": -quality}, {"judge": quality, "other": -quality},
                 tokens, seed=0)
    same, flipped = out["vs_reference"]["judge"]
    assert same["mean_difference"] == 0 and same["p_value"] == 1.0 and same["family_size"] == 2
    assert flipped["p_holm"] >= flipped["p_value"]
    assert [g["family_size"] for g in out["gains_at_n"]["other"]] == [3, 3, 3]
    words = describe(out)
    assert any("after Holm's correction over 2 comparisons" in w for w in words)
    assert any("after Holm's correction over 3 proxies" in w for w in words)


def test_curves_refuse_mismatched_shapes_too_few_replies_and_non_finite_scores():
    quality, tokens = _world(prompts=10, n=4)
    with pytest.raises(ValueError, match="shape"):
        curves({"bf16": quality[:, :3]}, {"judge": quality}, tokens)
    with pytest.raises(ValueError, match="at least 2"):
        curves({"bf16": quality[:, :1]}, {"judge": quality[:, :1]}, tokens[:, :1])
    bad = quality.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="judge judge scores hold NaN"):
        curves({"bf16": quality}, {"judge": bad}, tokens)


def test_a_post_training_quantized_proxy_is_the_bf16_folder_loaded_at_its_precision(tmp_path):
    from edgerlhf.ppo_alignment import proxy_location

    assert proxy_location(tmp_path, "int8") == (tmp_path / "int8", "int8")
    assert proxy_location(tmp_path, "int4-ptq") == (tmp_path / "bf16", "int4")
    assert proxy_location(tmp_path, "bf16") == (tmp_path / "bf16", "bf16")


def test_the_rl_fit_of_a_ppo_curve_needs_three_evaluations_with_positive_kl():
    from edgerlhf.ppo_alignment import rl_fits

    alpha, beta = 0.9, 0.3
    kls = [0.0, 0.5, 1.0, 2.0, 4.0]
    curve = [{"kl": kl, "judge": 1.0 + np.sqrt(kl) * (alpha - beta * np.log(np.sqrt(kl)) if kl else 0.0)} for kl in kls]
    fit = rl_fits(curve, ["judge"])["judge"]
    assert (fit["alpha"], fit["beta"]) == pytest.approx((alpha, beta)) and fit["points"] == 4
    assert rl_fits(curve[:3], ["judge"]) == {"judge": None}
    assert rl_fits([{**c, "kl": -0.1} for c in curve], ["judge"]) == {"judge": None}  # k1 can be negative
