"""PPO arms read against each other: the placebo reward, effects net of placebo, length control
(edgerlhf.core.arms)."""
import numpy as np
import pytest

from edgerlhf.core.arms import PLACEBO, length_controlled, length_controlled_by_seed, net_of_placebo, placebo_scorer
from edgerlhf.core.hh_rlhf import Pair, parse_pair, read_rows


def test_the_placebo_reward_carries_no_preference_signal_on_the_shared_pairs(hh_file):
    pairs = [p for line, row in read_rows(hh_file) if isinstance(p := parse_pair(row, line), Pair)]
    assert len(pairs) > 2000
    scorer = placebo_scorer(mean=-1.3, sd=0.8, seed=42)
    rewards, labels, wins = [], [], []
    for start in range(0, len(pairs), 4):  # rollout-sized batches: 4 pairs, chosen and rejected replies mixed
        batch = pairs[start:start + 4]
        replies = [p.chosen for p in batch] + [p.rejected for p in batch]
        r = scorer([p.messages() for p in batch] * 2, replies).numpy()
        rewards += r.tolist()
        labels += [1] * len(batch) + [0] * len(batch)
        wins += (r[:len(batch)] > r[len(batch):]).tolist()
    n = len(labels)
    correlation = np.corrcoef(rewards, labels)[0, 1]
    assert abs(correlation) < 3 / np.sqrt(n)  # ~0: three standard errors of r under independence
    assert abs(np.mean(wins) - 0.5) < 3 * 0.5 / np.sqrt(len(wins))  # chosen above rejected as often as a coin
    assert np.mean(rewards) == pytest.approx(-1.3, abs=0.05) and np.std(rewards) == pytest.approx(0.8, abs=0.05)
    # a real reward model's scale, the same draws for the same batch (a resumed run repeats them)
    first = pairs[:4]
    again = scorer([p.messages() for p in first] * 2, [p.chosen for p in first] + [p.rejected for p in first])
    assert again.tolist() == pytest.approx(rewards[:8])
    with pytest.raises(ValueError):
        placebo_scorer(0.0, float("nan"), 0)


def test_length_control_removes_what_the_length_difference_predicts():
    rng = np.random.default_rng(0)
    length = rng.normal(3, 4, size=300)
    only_length = 0.1 * length + rng.normal(0, 0.2, size=300)
    out = length_controlled(only_length, length, seed=0)
    assert np.mean(only_length) > 0.2 and out["ci"][0] < 0 < out["ci"][1]  # the raw gain is length
    assert out["slope"] == pytest.approx(0.1, abs=0.02)
    real = 0.5 + 0.1 * length + rng.normal(0, 0.2, size=300)
    kept = length_controlled(real, length, seed=0)
    assert kept["ci"][0] < 0.5 < kept["ci"][1] and kept["ci"][0] > 0.3
    flat = length_controlled([0.1, 0.3, 0.2], [5, 5, 5])
    assert flat["slope"] is None and flat["intercept"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        length_controlled([1.0, 2.0], [1.0])


def test_length_control_over_two_seeds_is_the_t_interval_of_the_per_seed_intercepts():
    # exact lines: seed 1's intercept is 0.1, seed 2's 0.3, the slope 0.05 in both
    length = np.array([-4.0, -1.0, 0.0, 2.0, 5.0])
    out = length_controlled_by_seed([0.1 + 0.05 * length, 0.3 + 0.05 * length], [length, length])
    half = 12.706204736 * np.std([0.1, 0.3], ddof=1) / np.sqrt(2)  # t_{0.975, 1 df}
    assert out["intercept"] == pytest.approx(0.2) and out["per_seed"] == pytest.approx([0.1, 0.3])
    assert out["ci"] == pytest.approx([0.2 - half, 0.2 + half]) and out["interval"] == "t across 2 seeds"
    assert out["slope"] == pytest.approx(0.05) and out["n"] == 10
    one = length_controlled_by_seed([0.1 + 0.05 * length], [length])
    assert one["intercept"] == pytest.approx(0.1) and one["interval"] == "bootstrap over prompts"
    with pytest.raises(ValueError):
        length_controlled_by_seed([length], [length, length])


def _arm(judge, tokens, before_tokens):
    return {"before": {"tokens": before_tokens}, "after": {"judge_scores": judge, "tokens": tokens}}


def test_arms_are_read_against_the_placebo_with_holm_over_the_arms():
    rng = np.random.default_rng(1)
    base = rng.normal(size=80)
    tokens = rng.integers(10, 30, size=80)
    arms = {"bf16": _arm(base + 0.5 + rng.normal(0, 0.3, 80), tokens + 2, tokens),
            "int4": _arm(base + rng.normal(0, 0.3, 80), tokens, tokens),
            PLACEBO: _arm(base, tokens, tokens)}
    net = net_of_placebo(arms, ["judge"], seed=0)
    assert set(net) == {"bf16", "int4"}
    assert net["bf16"]["judge"]["p_holm"] < 0.001 and net["bf16"]["judge"]["mean_difference"] > 0.4
    assert net["int4"]["judge"]["p_holm"] >= net["int4"]["judge"]["p_value"]
    assert net["bf16"]["judge"]["family_size"] == 2
    assert net["bf16"]["length_change"]["mean_difference"] == 2 and net["int4"]["length_vs_placebo"]["ci"] == [0, 0]
    assert net["bf16"]["judge"]["length_controlled"]["slope"] is None  # every bf16 reply is 2 tokens longer
    with pytest.raises(KeyError):
        net_of_placebo({"bf16": arms["bf16"]}, ["judge"])


def test_with_several_seeds_intervals_are_t_intervals_across_the_seeds_paired_by_seed():
    from scipy.stats import t

    from edgerlhf.core.arms import seed_paired

    rng = np.random.default_rng(2)
    prompts = rng.normal(size=(3, 50))  # per seed: the same prompts, common random numbers
    a = [p + 0.2 + shift for p, shift in zip(prompts, (0.05, -0.05, 0.1))]
    out = seed_paired(a, list(prompts))
    means = np.array([0.25, 0.15, 0.3])
    assert out["per_seed"] == pytest.approx(means) and out["seeds"] == 3 and out["n"] == 150
    half = t.ppf(0.975, 2) * means.std(ddof=1) / np.sqrt(3)
    assert out["ci"] == pytest.approx([means.mean() - half, means.mean() + half])
    assert out["interval"] == "t across 3 seeds" and out["mde"] > half
    one = seed_paired(a[:1], list(prompts[:1]))
    assert one["seeds"] == 1 and one["interval"] == "paired bootstrap over prompts" and one["n"] == 50
    with pytest.raises(ValueError):
        seed_paired(a, list(prompts[:2]))


def test_arms_with_seeds_are_compared_seed_by_seed():
    rng = np.random.default_rng(3)
    base = [rng.normal(size=40) for _ in range(3)]
    tokens = rng.integers(10, 30, size=40)

    def arm(shift):
        runs = [{"judge_scores": b + shift + rng.normal(0, 0.1, 40), "tokens": tokens} for b in base]
        return {"before": {"tokens": tokens}, "after": runs[0], "after_by_seed": runs}
    net = net_of_placebo({"bf16": arm(0.5), "int8": arm(0.4), PLACEBO: arm(0.0)}, ["judge"])
    assert net["bf16"]["judge"]["seeds"] == 3 and net["bf16"]["judge"]["ci"][0] > 0.3
    assert net["int8"]["length_vs_placebo"]["mean_difference"] == 0


def test_policy_movement_says_whether_every_arm_reached_one_nat_and_what_the_controller_could_do():
    from edgerlhf.core.arms import movement_sentence, policy_movement

    def arm(kl, betas):
        return {"after": {"kl_mean": kl}, "history": [{"beta": b} for b in betas]}

    arms = {"bf16": arm(0.43, [0.1, 0.09992]), "placebo": arm(1.5, [0.1, 0.09995])}
    m = policy_movement(arms, steps=5, batch_size=8, adaptive=True, horizon=10_000)
    assert not m["moved"] and m["samples"] == 40
    assert m["max_beta_change"] == pytest.approx(1.00016 ** 5 - 1)  # (1 + 0.2 * 8 / 10,000) ** 5 - 1
    assert m["arms"]["bf16"] == {"kl": 0.43, "beta_first": 0.1, "beta_last": 0.09992}
    words = movement_sentence(m)
    assert "bf16 0.43, placebo 1.50" in words and "40 samples (5 steps of 8 prompts)" in words
    assert "at most 0.1% in this run" in words and "bf16 0.1 -> 0.09992" in words
    fixed = policy_movement(arms, steps=5, batch_size=8, adaptive=False, horizon=10_000)
    assert fixed["max_beta_change"] == 0 and "fixed KL coefficient" in movement_sentence(fixed)
    moved = policy_movement({"bf16": arm(1.2, [0.1, 0.08])}, steps=100, batch_size=32, adaptive=True, horizon=320)
    assert moved["moved"] and movement_sentence(moved).endswith("every policy moved at least 1 nat")
    assert moved["max_beta_change"] == pytest.approx(1.02 ** 100 - 1)


def test_the_answer_says_how_far_the_policies_moved_when_not_every_one_reached_one_nat():
    from edgerlhf.ppo_alignment import answer

    judges = {"judge": {"learned": True}}
    one = {"moved": False, "arms": {"bf16": {"kl": 0.042}}}
    two = {"moved": False, "arms": {"bf16": {"kl": 0.042}, "int4": {"kl": 0.3}}}
    assert "from the SFT model (0.04 nats per reply)" in answer(None, None, {}, judges, 1, one)
    assert "from the SFT model (0.04 to 0.30 nats per reply)" in answer(None, None, {}, judges, 1, two)
    assert "did not move" not in answer(None, None, {}, judges, 1, {**two, "moved": True})


def test_the_answer_crosses_precision_with_algorithm_from_each_algorithms_bf16_comparisons():
    from edgerlhf.ppo_alignment import precision_by_algorithm

    def versus(mean, p_holm):
        return {j: {"mean_difference": mean, "ci": [mean - 0.1, mean + 0.1], "p_holm": p_holm, "mde": 0.2}
                for j in ("judge", "judge-tfidf")}
    experiments = {"bf16": {}, "int4": {"vs_bf16_after": versus(-0.3, 0.01)}, "rloo-bf16": {},
                   "rloo-int4": {"vs_bf16_after": versus(0.05, 0.6)}, "grpo-bf16": {}, "dpo": {}, PLACEBO: {}}
    phrases, mdes = precision_by_algorithm(experiments)
    assert phrases[0].startswith("under PPO, each precision's judge scores minus bf16's after training: int4 judge "
                                 "-0.300 [-0.400, -0.200], judge-tfidf -0.300")
    assert phrases[0].endswith("every judge finds int4 below bf16")
    assert phrases[1].startswith("under RLOO") and phrases[1].endswith("no precision difference from bf16 found by "
                                                                       "every judge")
    assert phrases[2] == "precision was not varied under GRPO (bf16) in this run"
    assert mdes == [0.2] * 4


def test_arms_are_grouped_by_algorithm_and_reward_precision():
    from edgerlhf.core.arms import arms_by_algorithm

    names = ["bf16", "int4", "rloo-bf16", "grpo-int8", "dpo", PLACEBO]
    assert arms_by_algorithm(names) == {"ppo": {"bf16": "bf16", "int4": "int4"}, "rloo": {"bf16": "rloo-bf16"},
                                        "grpo": {"int8": "grpo-int8"}}
