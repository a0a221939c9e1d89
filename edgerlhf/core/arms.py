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

from .stats import holm, mde_paired_mean, paired_bootstrap, percentile_bootstrap, t_test_p

PLACEBO = "placebo"


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


def net_of_placebo(arms: dict[str, dict], judges: list[str], seed: int = 0) -> dict:
    """Each arm against the placebo, per judge, paired per prompt: the judge's score of the arm's reply − of the
    placebo policy's reply, with its paired bootstrap interval, t-test p-value Holm-corrected over the arms (one
    family per judge) and minimum detectable difference; the same difference controlled for length
    (:func:`length_controlled` on the difference in reply tokens); and the arm's length change from the SFT replies.

    Args:
        arms: ``{name: {"before": {...}, "after": {"<judge>_scores": float[P], "tokens": int[P]}}}`` with a
            :data:`PLACEBO` entry; the SFT replies' ``tokens`` are under ``"before"``.
    Returns:
        ``{arm: {judge: {...difference, "p_value", "p_holm", "family_size", "mde", "length_controlled"},
        "length_change": paired_bootstrap of (arm − SFT) tokens, "length_vs_placebo": (arm − placebo) tokens}}``.
    Raises:
        KeyError: no placebo arm.
    """
    placebo = arms[PLACEBO]["after"]
    names = [a for a in arms if a != PLACEBO]
    out = {a: {"length_change": paired_bootstrap(arms[a]["after"]["tokens"], arms[a]["before"]["tokens"], seed=seed),
               "length_vs_placebo": paired_bootstrap(arms[a]["after"]["tokens"], placebo["tokens"], seed=seed)}
           for a in names}
    for j in judges:
        tests = []
        for a in names:
            after = np.asarray(arms[a]["after"][f"{j}_scores"], float)
            base = np.asarray(placebo[f"{j}_scores"], float)
            diff = paired_bootstrap(after, base, seed=seed)
            length = np.asarray(arms[a]["after"]["tokens"], float) - np.asarray(placebo["tokens"], float)
            tests.append({**diff, "p_value": t_test_p(after - base),
                          "mde": mde_paired_mean(diff["n"], diff["sd_difference"]),
                          "length_controlled": length_controlled(after - base, length, seed)})
        for a, t, p in zip(names, tests, holm([t["p_value"] for t in tests])):
            out[a][j] = {**t, "p_holm": p, "family_size": len(tests)}
    return out
