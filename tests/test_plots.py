"""The figures tell the truth: every one is a saved PNG with a title, labelled axes and plain tick labels (no
offset notation); compared panels share their x range; few evaluation points are not joined into a trend; noisy
per-step curves are smoothed over faint raw points; healthy ranges and the KL target are drawn."""
from __future__ import annotations

import numpy as np
import pytest

from edgerlhf import data_preparation, report
from edgerlhf.core import plots
from edgerlhf.core.metrics import evaluate_pairs
from synthetic_run import _ppo_results


@pytest.fixture
def figures(monkeypatch):
    """The Figures the plot functions save, in order (each still saved to its PNG by the real ``save``)."""
    made, real = [], plots.save

    def keep(fig, path):
        made.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "save", keep)
    monkeypatch.setattr(data_preparation, "save", keep)
    return made


def check_truthful(fig, path) -> None:
    """A PNG was written; the figure has a title; every axis has x and y labels and no offset in its ticks."""
    assert path.read_bytes()[:4] == b"\x89PNG"
    titled = fig.get_suptitle() or (len(fig.axes) == 1 and fig.axes[0].get_title())
    assert titled, "figure without a title"
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel(), f"axis {ax.get_title()!r} lacks a label"
        for a in (ax, *ax.child_axes):
            for axis in (a.xaxis, a.yaxis):
                assert axis.get_major_formatter().get_offset() == "", f"offset notation on {ax.get_title()!r}"


def history(steps: int, seed: int = 0) -> list[dict]:
    """Per-step PPO statistics shaped like a quick run's; β drifts by ~1e-5 per step (the drift that offset
    notation once showed as '1e-5+1e-1') and the reply length by 1e-4 tokens (which offset notation would show)."""
    rng = np.random.default_rng(seed)
    return [{"step": s, "score": -0.33 + rng.normal(0, 0.08), "kl": 0.05 * s + abs(rng.normal(0, 0.05)),
             "beta": 0.1 - 1.6e-5 * s, "approx_kl": abs(rng.normal(0.003, 0.002)),
             "clipfrac": abs(rng.normal(0.03, 0.02)), "entropy": 2.1 + rng.normal(0, 0.15),
             "explained_variance": 1 - np.exp(-s / 8) + rng.normal(0, 0.1), "response_length": 32 + 1e-4 * s}
            for s in range(1, steps + 1)]


def curve(points: int) -> list[dict]:
    return [{"step": 5 * i, "kl": 0.04 * i, "proxy": 0.2 + 0.01 * i, "judge": 0.1 + 0.002 * i, "judge-tfidf": 0.2}
            for i in range(points)]


def experiments(steps: int, points: int, **extra) -> dict[str, dict]:
    return {p: {"history": history(steps, i), "curve": curve(points), "judges": {"judge": {}, "judge-tfidf": {}},
                **extra} for i, p in enumerate(("bf16", "int8"))}


def reward_models() -> dict[str, dict]:
    """Two reward models on 200 held-out pairs, with different margin scales."""
    rng = np.random.default_rng(0)
    rejected = rng.normal(0, 1, 200)
    out = {}
    for name, scale in (("bf16", 1.0), ("int4", 3.0)):
        chosen = (rejected + rng.normal(0.4, 1.0, 200)) * scale
        out[name] = {"scores_chosen": chosen.tolist(), "scores_rejected": (rejected * scale).tolist(),
                     **evaluate_pairs(chosen, rejected * scale)}
    return out


def test_loss_figure_draws_few_evaluations_as_points_and_says_what_the_loss_is(tmp_path, figures):
    logs = [{"step": s, "loss": 2.9 - 0.03 * s} for s in range(2, 17, 2)]
    path = plots.loss_figure(logs + [{"step": 8, "eval_loss": 2.42}, {"step": 16, "eval_loss": 2.37}],
                             tmp_path / "few.png")
    check_truthful(figures[-1], path)
    ax = figures[-1].axes[0]
    evaluation = next(line for line in ax.lines if line.get_label().startswith("eval"))
    assert evaluation.get_linestyle() == "None" and evaluation.get_marker() == "o"
    assert "per token" in figures[-1].get_suptitle() and "perplexity" in ax.get_title()
    assert ax.child_axes[0].get_ylabel() == "perplexity = exp(loss)"
    plots.loss_figure(logs + [{"step": s, "eval_loss": 2.4} for s in range(3, 18, 3)], tmp_path / "many.png")
    evaluation = next(line for line in figures[-1].axes[0].lines if line.get_label().startswith("eval"))
    assert evaluation.get_linestyle() == "-"


def test_reliability_bars_span_their_bins_without_overlap_and_the_diagonal_is_named(tmp_path, figures):
    path = plots.reliability_figure(reward_models(), tmp_path / "rel.png")
    check_truthful(figures[-1], path)
    for ax in figures[-1].axes:
        bars = sorted(ax.patches, key=lambda p: p.get_x())
        assert bars and all(a.get_x() + a.get_width() <= b.get_x() + 1e-9 for a, b in zip(bars, bars[1:]))
        assert all(abs(b.get_width() - 0.05) < 1e-9 for b in bars)  # the width of one of 10 bins over [0.5, 1]
    assert "perfect calibration" in [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]


def test_margin_panels_share_bins_and_x_range(tmp_path, figures):
    path = plots.margin_figure(reward_models(), tmp_path / "margins.png")
    check_truthful(figures[-1], path)
    axes = figures[-1].axes
    assert axes[0].get_xlim() == axes[1].get_xlim()
    edges = [[p.get_x() for p in ax.patches] for ax in axes]
    assert edges[0] == edges[1] and len(edges[0]) == 30


def test_accuracy_and_memory_figures_are_titled_and_labelled(tmp_path, figures):
    table = [{"model": "shorter wins", "mode": "baseline", "accuracy": 0.55, "accuracy_ci95": [0.5, 0.6],
              "learned": None},
             {"model": "bf16", "mode": "trained", "accuracy": 0.66, "accuracy_ci95": [0.61, 0.7], "learned": True},
             {"model": "int4", "mode": "trained", "accuracy": 0.52, "accuracy_ci95": [0.47, 0.57], "learned": False}]
    path = plots.accuracy_figure(table, tmp_path / "a.png")
    check_truthful(figures[-1], path)
    assert "not learned" in [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    rows = [{"stage": s, "cpu_peak_rss_mib": m, "cuda_peak_allocated_mib": None}
            for s, m in (("sft", 3000.5), ("ppo", 3000.7))]
    path = plots.memory_figure(rows, 8.0, tmp_path / "m.png")
    check_truthful(figures[-1], path)


def panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title))


def test_ppo_curves_smooth_long_runs_shade_healthy_ranges_and_keep_beta_in_proportion(tmp_path, figures):
    path = plots.ppo_curves_figure(experiments(60, 2), tmp_path / "curves.png", kl_target=2.0)
    fig = figures[-1]
    check_truthful(fig, path)
    assert "rolling mean" in fig.get_suptitle()
    entropy = panel(fig, "policy entropy")
    assert sorted(line.get_alpha() or 1.0 for line in entropy.lines) == [0.3, 0.3, 1.0, 1.0]  # raw faint, mean full
    for title in ("approximate KL", "clip fraction", "value-head explained variance"):
        assert any("healthy" in t.get_text() for t in panel(fig, title).get_legend().get_texts())
    assert panel(fig, "KL coefficient").get_ylim()[0] == 0  # a drift of 1e-3 of β does not fill the panel
    kl = panel(fig, "KL to the SFT model")
    assert any(line.get_ydata()[0] == 2.0 for line in kl.lines if line.get_linestyle() == "--")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["bf16", "int8"]


def test_ppo_curves_of_a_short_run_are_unsmoothed_and_a_far_kl_target_is_named_not_drawn(tmp_path, figures):
    path = plots.ppo_curves_figure(experiments(5, 2, adaptive_kl_target=6.0), tmp_path / "curves.png")
    fig = figures[-1]
    check_truthful(fig, path)
    assert all((line.get_alpha() or 1.0) == 1.0 for line in panel(fig, "policy entropy").lines)
    kl = panel(fig, "KL to the SFT model")
    assert kl.get_ylim()[1] < 6.0
    assert any("adaptive-KL target 6" in t.get_text() for t in kl.get_legend().get_texts())


def test_overoptimisation_joins_points_only_from_five_evaluations(tmp_path, figures):
    path = plots.overoptimisation_figure(experiments(5, 2), tmp_path / "few.png")
    check_truthful(figures[-1], path)
    ax = figures[-1].axes[0]
    assert all(line.get_linestyle() == "None" for line in ax.lines if line.get_label().startswith(("bf16", "int8")))
    assert "points only" in ax.get_title()
    plots.overoptimisation_figure(experiments(5, 5), tmp_path / "many.png")
    ax = figures[-1].axes[0]
    assert all(line.get_linestyle() != "None" for line in ax.lines if line.get_label().startswith(("bf16", "int8")))


def test_report_draws_the_recorded_kl_target(tmp_path, figures):
    records = {"ppo": {"results": _ppo_results(tmp_path / "data"),
                       "training_config": {"adaptive_kl": True, "adaptive_kl_target": 6.0}}}
    report.section_ppo(records, tmp_path / "figures")
    kl = panel(figures[0], "KL to the SFT model")
    assert any("adaptive-KL target 6" in t.get_text() for t in kl.get_legend().get_texts())


def test_length_figure_shows_the_per_pair_difference(tmp_path, figures):
    lengths = {"prompt": [100, 120, 80, 150], "chosen": [20, 30, 40, 50], "rejected": [25, 40, 40, 45]}
    path = data_preparation.length_figure(lengths, tmp_path / "lengths.png")
    fig = figures[-1]
    check_truthful(fig, path)
    diff = panel(fig, "chosen − rejected")
    assert any(list(line.get_xdata()) == [0, 0] for line in diff.lines)  # the line at 0
    assert "chosen shorter: 50%" in diff.texts[0].get_text()
    assert sum(p.get_height() for p in diff.patches) == 4
    assert all(p.get_x() + p.get_width() <= -0.5 or p.get_x() >= -0.5 for p in diff.patches)  # no bar spans 0
    assert panel(fig, "chosen").get_xlim() == panel(fig, "rejected").get_xlim()
    with pytest.raises(ValueError, match="one length per pair"):
        data_preparation.length_figure({**lengths, "rejected": [1]}, tmp_path / "bad.png")


def test_best_of_n_figure_has_a_panel_per_judge_a_line_and_band_per_proxy_and_the_fit(tmp_path, figures):
    from synthetic_run import _best_of_n

    bon = _best_of_n()
    path = plots.best_of_n_figure(bon, tmp_path / "bon.png")
    (fig,) = figures
    check_truthful(fig, path)
    assert [ax.get_title() for ax in fig.axes] == ["judged by judge", "judged by judge-tfidf"]
    ax = fig.axes[0]
    assert len(ax.collections) == 2  # a 95% band per proxy
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 2  # a fit per proxy
    marks = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [m.get_label() for m in marks] == ["bf16", "int8"]
    assert np.allclose(marks[0].get_xdata(), bon["sqrt_kl"])


def test_algorithms_figure_puts_each_arm_at_its_sqrt_kl_with_its_interval(tmp_path, figures):
    kl = {"bf16": 0.25, "int4": 0.36, "rloo-bf16": 0.04, "grpo-bf16": -0.01, "dpo": 1.0}
    experiments = {name: {"after": {"kl_mean": v}} for name, v in kl.items()}
    net = {name: {"judge": {"mean_difference": 0.1 * i, "ci": [0.1 * i - 0.05, 0.1 * i + 0.1]},
                  "judge-tfidf": {"mean_difference": -0.1, "ci": [-0.2, 0.0]},
                  "length_change": {}, "length_vs_placebo": {}} for i, name in enumerate(kl)}
    path = plots.algorithms_figure(experiments, net, tmp_path / "algorithms.png")
    (fig,) = figures
    check_truthful(fig, path)
    assert [ax.get_title() for ax in fig.axes] == ["judge", "judge-tfidf"]
    points = [c for c in fig.axes[0].containers]  # one error bar per arm, in the arms' order
    assert len(points) == len(kl)
    for (name, v), bar in zip(kl.items(), points):
        x, y = bar.lines[0].get_data()
        assert x[0] == pytest.approx(max(v, 0.0) ** 0.5) and y[0] == pytest.approx(net[name]["judge"]["mean_difference"])
    markers = [bar.lines[0].get_marker() for bar in points]
    assert markers == ["o", "o", "s", "^", "D"]  # PPO, PPO, RLOO, GRPO, DPO
