"""Cross-fitted evaluation (edgerlhf.core.crossfit) and the family-wise statistics it reports."""
import numpy as np
import pytest

from edgerlhf.core import crossfit
from edgerlhf.core.stats import holm


def test_every_pair_is_scored_exactly_once_per_draw_and_every_model_sees_the_same_folds():
    assignments = crossfit.fold_draws(23, folds=5, draws=4, seed=7)
    assert assignments.shape == (4, 23) and set(np.unique(assignments)) == set(range(5))
    assert len({tuple(row) for row in assignments}) == 4  # the draws differ
    seen = {}
    for model in ("bf16", "int4"):
        calls, scored = [], np.zeros((4, 23), int)

        def fit(train, calls=calls):
            calls.append(tuple(train))
            return len(calls) - 1

        def score(call, test, scored=scored):
            d = call // 5
            assert not set(calls[call]) & set(test)  # never scored by a model that trained on it
            scored[d, test] += 1
            return np.ones(test.size)

        crossfit.out_of_fold(fit, {model: score}, assignments)
        assert np.all(scored == 1)
        seen[model] = calls
    assert seen["bf16"] == seen["int4"] and len(seen["bf16"]) == 20


def test_fold_draws_refuse_too_few_pairs():
    with pytest.raises(ValueError, match="at least 10 pairs"):
        crossfit.fold_draws(9, folds=5)


def test_a_non_finite_margin_is_refused():
    assignments = crossfit.fold_draws(10, folds=2, draws=1)
    with pytest.raises(ValueError, match="finite"):
        crossfit.out_of_fold(lambda idx: None, {"bf16": lambda m, idx: np.full(idx.size, np.nan)}, assignments)


def test_holm_matches_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []
    with pytest.raises(ValueError):
        holm([0.1, float("nan")])


def test_phi_matches_a_hand_computed_example():
    a = [1, 1, 1, 0, 0, 0, 1, 0]
    b = [1, 1, 0, 0, 0, 1, 1, 0]
    # n11 = 3, n10 = 1, n01 = 1, n00 = 3: (3 * 3 - 1 * 1) / sqrt(4 * 4 * 4 * 4) = 0.5
    assert crossfit.phi(a, b) == pytest.approx(0.5)
    assert crossfit.phi(a, a) == pytest.approx(1.0)


def test_the_corrected_interval_matches_a_hand_computed_example():
    # mean 0.25, var 1/60, (1/4 + 1/(2 - 1)) * var = 0.0208333, se 0.144338, t_{0.975, 3} = 3.182446
    out = crossfit.corrected_interval(np.array([0.1, 0.2, 0.3, 0.4]), folds=2)
    assert out["mean"] == pytest.approx(0.25) and out["se"] == pytest.approx(0.1443376, rel=1e-6)
    assert out["ci"] == pytest.approx([0.25 - 0.4593466, 0.25 + 0.4593466], rel=1e-6)


def synthetic_pool(n=300, d=8, seed=0):
    """Pairs whose preference follows a linear signal in their features, with a noisier copy as 'int4'."""
    rng = np.random.default_rng(seed)
    diff = rng.normal(size=(n, d))
    truth = diff @ np.r_[2.0, 1.0, np.zeros(d - 2)] + rng.logistic(size=n)
    diff[truth < 0] *= -1  # orient each pair so that 'chosen' is the preferred reply
    noisy = diff + rng.normal(scale=0.5, size=diff.shape)
    chosen = ["word " * int(k) for k in rng.integers(1, 30, n)]
    rejected = ["word " * int(k) for k in rng.integers(1, 30, n)]
    return diff, noisy, chosen, rejected


@pytest.mark.parametrize("fitter", ["probe", "tf-idf"])
def test_fits_in_worker_processes_give_the_same_margins_as_one_process(fitter):
    diff, _, chosen, rejected = synthetic_pool(n=120)
    assignments = crossfit.fold_draws(len(diff), folds=5, draws=2, seed=0)
    fit = crossfit.probe_fitter(diff, {"bf16": diff}) if fitter == "probe" else crossfit.tfidf_fitter(chosen, rejected)
    one, two = (crossfit.out_of_fold(*fit, assignments, n_jobs=jobs) for jobs in (1, 2))
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    assert all(np.isfinite(v).all() for v in one.values())


def test_crossfit_n_jobs_is_minus_one_or_positive():
    from edgerlhf.core.config import load_config

    assert load_config(overrides={"reward.crossfit_n_jobs": 2}).reward.crossfit_n_jobs == 2
    with pytest.raises(ValueError, match=r"reward.crossfit_n_jobs=0 must be -1 \(every core\) or >= 1"):
        load_config(overrides={"reward.crossfit_n_jobs": 0})


def test_cross_fitted_probes_beat_the_baselines_and_are_compared_in_holm_families():
    diff, noisy, chosen, rejected = synthetic_pool()
    assignments = crossfit.fold_draws(len(diff), folds=5, draws=3, seed=0)
    margins = crossfit.length_margins(chosen, rejected, draws=3)
    margins.update(crossfit.out_of_fold(*crossfit.tfidf_fitter(chosen, rejected), assignments))
    margins.update(crossfit.out_of_fold(*crossfit.probe_fitter(diff, {"bf16": diff, "int4-ptq": noisy}), assignments))
    margins.update(crossfit.out_of_fold(*crossfit.probe_fitter(noisy, {"int4": noisy}), assignments))
    out = crossfit.assess(margins, ["shorter wins", "longer wins", "tf-idf"], assignments)
    assert out["models"]["bf16"]["accuracy"] > 0.75 > out["models"]["shorter wins"]["accuracy"]
    lo, hi = out["models"]["bf16"]["accuracy_ci95"]
    assert lo < out["models"]["bf16"]["accuracy"] < hi
    families = {}
    for c in out["comparisons"]:
        families.setdefault(c["family"], []).append(c)
    assert set(families["vs bf16"][i]["a"] for i in range(2)) == {"int4", "int4-ptq"}
    for members in families.values():
        assert all(c["family_size"] == len(members) for c in members)
        assert [c["p_holm"] for c in members] == pytest.approx(holm([c["p_value"] for c in members]))
    beat = [c for c in families[f"vs {out['length_baseline']}"] if c["a"] == "bf16"][0]
    assert beat["p_holm"] < 0.05 and "better than" in crossfit.describe(beat)
    assert out["agreement"]["bf16"]["bf16"] == {"agreement": 1.0, "phi": pytest.approx(1.0)}
    assert abs(out["agreement"]["bf16"]["shorter wins"]["phi"]) < 0.3


def test_judge_candidates_stay_out_of_the_families_and_the_frontier_reads_phi_against_every_proxy():
    assignments = crossfit.fold_draws(8, folds=2, draws=1, seed=0)
    truth = np.array([1.0, 1, 1, 1, 1, 1, -1, -1])  # every model's margin sign is right where truth > 0
    margins = {"shorter wins": np.tile(np.r_[1.0, -1, 1, -1, 1, -1, 1, -1], (1, 1)), "bf16": truth[None],
               "int4": np.r_[1.0, 1, 1, 1, 1, -1, -1, 1][None], "same errors": truth[None] * 1.0,
               "other errors": np.r_[1.0, 1, 1, 1, -1, 1, 1, -1][None]}
    out = crossfit.assess(margins, ["shorter wins"], assignments, candidates=("same errors", "other errors"))
    assert {c["a"] for c in out["comparisons"]} == {"bf16", "int4"}
    frontier = crossfit.judge_frontier(out, ["same errors", "other errors"], ["bf16", "int4"], 0.7, 0.4)
    # correct (margin > 0): bf16 and same errors [1,1,1,1,1,1,0,0], int4 [1,1,1,1,1,0,0,1], other [1,1,1,1,0,1,1,0]
    assert [f["candidate"] for f in frontier] == ["other errors", "same errors"]
    other, same = frontier
    assert same["phi"]["bf16"] == pytest.approx(1.0) and same["meets_target"] is False
    assert other["accuracy"] == pytest.approx(6 / 8)
    # other vs int4: n11 = 4, n10 = 2, n01 = 2, n00 = 0: (4*0 - 2*2) / sqrt(6*2*6*2) = -1/3
    # other vs bf16: n11 = 5, n10 = 1, n01 = 1, n00 = 1: (5*1 - 1*1) / 12 = 1/3
    assert other["phi"] == pytest.approx({"bf16": 1 / 3, "int4": -1 / 3})
    assert other["max_phi"] == pytest.approx(1 / 3) and other["meets_target"] is True
