"""Stages 1-4 and the report: Figures written by the stages (matplotlib's object API, no global pyplot state).

Every figure has a title, axis labels with units, a legend where several things are drawn, and plain tick labels
(no offset notation: :func:`save` turns it off on every axis). Noisy per-step curves are drawn as a centred rolling
mean with the raw points faint; evaluation curves of fewer than :data:`MIN_LINE_POINTS` points are drawn as points
only, since a line through two points suggests a trend nobody measured.

matplotlib is imported when the first figure is made (:func:`new_figure`), not with this module, so that a stage
process does not hold it while it trains (``tests/test_packaging.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Fewer evaluation points than this are drawn as markers only, without a connecting line.
MIN_LINE_POINTS = 5
#: Healthy ranges of PPO diagnostics, shaded on their panels: (low, high, legend label).
HEALTHY = {"approx_kl": (0.0, 0.02, "healthy: < 0.02"), "clipfrac": (0.0, 0.2, "healthy: < 0.2"),
           "explained_variance": (0.0, 1.0, "healthy: > 0, best near 1")}


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib ``Figure`` of ``figsize`` inches with constrained layout (object API: no pyplot state, no
    display backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def no_offset(fig: Figure) -> None:
    """Turn off matplotlib's offset notation (tick labels like ``+1e-1``) on every axis of ``fig``."""
    from matplotlib.ticker import ScalarFormatter

    for ax in fig.axes:
        for a in (ax, *ax.child_axes):
            for axis in (a.xaxis, a.yaxis):
                if isinstance(axis.get_major_formatter(), ScalarFormatter):
                    axis.get_major_formatter().set_useOffset(False)


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG (100 dpi) atomically (:func:`edgerlhf.core.files.atomic_path`), creating the folder,
    without offset notation on any axis; returns the path."""
    no_offset(fig)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)


def smoothing_window(n: int) -> int:
    """Points in the centred rolling mean of a per-step curve of ``n`` points: about a tenth, odd, at least 3;
    0 (no smoothing) below 10 points."""
    return 0 if n < 10 else max(3, n // 10) | 1


def loss_figure(log_history: list[dict], path: str | Path) -> Path:
    """Training and evaluation loss against optimizer step, from a Trainer's ``state.log_history``.

    Both are the completion-only loss of TRL's ``SFTTrainer``: the mean negative log-likelihood per token of the
    chosen replies (prompt tokens not counted), on the training pairs and on the validation pairs. exp(loss) is a
    perplexity (right axis); the stage's perplexity table covers the same validation reply tokens but pools them
    all, while the eval loss is the mean of per-batch means, so exp(eval loss) and that perplexity differ."""
    import numpy as np

    fig = new_figure((6.5, 4.2))
    ax = fig.subplots()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if train:
        ax.plot(*zip(*train), ".-", label="train: training pairs' chosen replies (mean per logging window)")
    if evaluation:
        ax.plot(*zip(*evaluation), "o" if len(evaluation) < MIN_LINE_POINTS else "o-", ms=6,
                label=f"eval: validation pairs' chosen replies ({len(evaluation)} evaluations)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per reply token)")
    right = ax.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.maximum(p, 1e-300))))
    right.set_ylabel("perplexity = exp(loss)")
    ax.legend(fontsize=7)
    fig.suptitle("SFT loss per token of the chosen replies (prompt tokens not counted)", fontsize=10)
    ax.set_title("the stage's perplexity pools these validation reply tokens; exp(eval loss) averages per eval "
                 "batch, so the two differ", fontsize=7)
    return save(fig, path)


def reliability_figure(models: dict[str, dict], path: str | Path) -> Path:
    """Reliability diagram per reward model: accuracy in each confidence bin, one bar per bin across its width,
    against the diagonal of perfect calibration (Guo et al. 2017)."""
    fig = new_figure((3.2 * len(models) + 0.3, 3.6))
    axes = fig.subplots(1, len(models), squeeze=False, sharey=True)[0]
    for ax, (name, entry) in zip(axes, models.items()):
        bins = [b for b in entry["reliability"] if b["n"]]
        ax.plot([0.5, 1], [0.5, 1], ":", color="grey", label="perfect calibration")
        edges = [(b.get("lo", b["confidence"] - 0.025), b.get("hi", b["confidence"] + 0.025)) for b in bins]
        ax.bar([lo for lo, _ in edges], [b["accuracy"] for b in bins], width=[hi - lo for lo, hi in edges],
               align="edge", edgecolor="white", alpha=0.7, label="accuracy in bin")
        for (lo, hi), b in zip(edges, bins):  # pairs per bin: a bin of 3 pairs says little
            ax.annotate(str(b["n"]), ((lo + hi) / 2, b["accuracy"]), ha="center", va="bottom", fontsize=7)
        learned = "" if entry.get("learned", True) else " (not learned)"
        ax.set_title(f"{name}{learned}\nECE {entry['ece']:.3f}, n = {sum(b['n'] for b in bins)}", fontsize=9)
        ax.set(xlim=(0.5, 1), ylim=(0, 1.08), xlabel="confidence max(p, 1 − p) (probability)",
               ylabel="accuracy (share of pairs right)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability on the held-out pairs (number on a bar: pairs in that bin)", fontsize=10)
    return save(fig, path)


def accuracy_figure(table: list[dict], path: str | Path) -> Path:
    """Held-out accuracy with its 95% interval per reward model and baseline (rows of the stage-3 table),
    chance (0.5) and the best baseline marked; models that did not beat the length baseline are hatched."""
    from matplotlib.patches import Patch

    fig = new_figure((max(5.0, 0.7 * len(table) + 1.5), 4.0))
    ax = fig.subplots()
    names = [row["model"] for row in table]
    acc = [row["accuracy"] for row in table]
    err = [[a - row["accuracy_ci95"][0] for a, row in zip(acc, table)],
           [row["accuracy_ci95"][1] - a for a, row in zip(acc, table)]]
    colours = ["#bbbbbb" if row["mode"] == "baseline" else "#4c72b0" for row in table]
    bars = ax.bar(names, acc, yerr=err, capsize=3, color=colours)
    for bar, row in zip(bars, table):
        if row["learned"] is False:
            bar.set_hatch("//")
    best = max(row["accuracy"] for row in table if row["mode"] == "baseline")
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
    ax.axhline(best, color="#c44e52", lw=0.8, ls="--", label=f"best baseline {best:.3f}")
    ax.set_ylim(0.3, 1.0)
    ax.set(xlabel="reward model or baseline", ylabel="held-out accuracy (share of pairs, 95% CI)")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    extra = [Patch(color="#4c72b0", label="reward model"), Patch(color="#bbbbbb", label="baseline")]
    if any(row["learned"] is False for row in table):
        extra.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="not learned"))
    ax.legend(handles=ax.get_legend_handles_labels()[0] + extra, fontsize=7)
    fig.suptitle("Reward-model accuracy on the held-out pairs", fontsize=10)
    return save(fig, path)


def margin_figure(models: dict[str, dict], path: str | Path) -> Path:
    """Histogram of reward margins ``r_chosen - r_rejected`` on held-out pairs, per reward model, with the same
    bins and x range on every panel; the share of pairs with a positive margin (ranked right) is written in."""
    import numpy as np

    margins = {name: np.subtract(e["scores_chosen"], e["scores_rejected"]) for name, e in models.items()}
    pooled = np.concatenate([m for m in margins.values()] + [np.zeros(1)])  # the range includes 0
    lo, hi = float(pooled.min()), float(pooled.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    fig = new_figure((3.4 * len(models) + 0.3, 3.4))
    axes = fig.subplots(1, len(models), squeeze=False, sharex=True)[0]
    for ax, (name, m) in zip(axes, margins.items()):
        ax.hist(m, bins=bins, color="#55a868")
        ax.axvline(0, color="black", lw=0.8)
        ax.text(0.03, 0.97, f"margin > 0: {np.mean(m > 0):.0%}\nof {len(m)} pairs", transform=ax.transAxes,
                va="top", fontsize=7, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax.set_title(name, fontsize=9)
        ax.set(xlabel="r(chosen) − r(rejected) (score units)", ylabel="pairs")
    fig.suptitle("Reward margins on the held-out pairs (same bins on every panel; right of 0: ranked right)",
                 fontsize=10)
    return save(fig, path)


#: The panels of :func:`ppo_curves_figure`: (history key, title, y label with unit, drawn as change from step 1).
PPO_CURVES = (("score", "proxy score", "change since step 1 (reward-model score)", True),
              ("kl", "KL to the SFT model", "nats per reply", False),
              ("beta", "KL coefficient β (axis from 0)", "β (dimensionless)", False),
              ("approx_kl", "approximate KL(old ‖ new)", "nats per token", False),
              ("clipfrac", "clip fraction", "share of reply tokens clipped", False),
              ("entropy", "policy entropy", "nats per token", False),
              ("explained_variance", "value-head explained variance", "1 − Var(return − value) / Var(return)",
               False),
              ("response_length", "reply length", "tokens per reply", False))


def ppo_curves_figure(experiments: dict[str, dict], path: str | Path, kl_target: float | None = None) -> Path:
    """A grid of the per-step PPO diagnostics (CleanRL's set), one colour per experiment; the proxy score is
    drawn as its change from the first step, so experiments with different reward models share an axis.

    Every step samples different prompts, so the curves zigzag: from 10 steps on, a centred rolling mean is drawn
    in full colour over the raw points drawn faint. Healthy ranges are shaded (:data:`HEALTHY`); the adaptive KL
    controller's target (``kl_target``, else an experiment's ``adaptive_kl_target``) is a line on the KL panel, or
    a note where it lies far above the measured KL. β's axis starts at 0: its drift is tiny."""
    import pandas as pd

    fig = new_figure((13, 6.4))
    axes = fig.subplots(2, 4, sharex=True).ravel()
    window, lines = 0, {}
    for ax, (key, title, unit, relative) in zip(axes, PPO_CURVES):
        for i, (name, e) in enumerate(experiments.items()):
            points = [(h["step"], h[key]) for h in e["history"] if h.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            values = [v - values[0] for v in values] if relative else values
            w = 0 if key == "beta" else smoothing_window(len(values))
            window = max(window, w)
            if w:
                ax.plot(steps, values, "o", ms=2.5, alpha=0.3, color=f"C{i}")
                smooth = pd.Series(values).rolling(w, center=True, min_periods=1).mean()  # centred: no lag
                lines[name] = ax.plot(steps, smooth, "-", color=f"C{i}")[0]
            else:
                lines[name] = ax.plot(steps, values, "o-", ms=3, color=f"C{i}")[0]
        if key in HEALTHY:
            low, high, label = HEALTHY[key]
            ax.axhspan(low, high, color="#55a868", alpha=0.12, lw=0, label=label)
        if key == "beta" and ax.lines:
            ax.set_ylim(0, 1.25 * max(max(line.get_ydata()) for line in ax.lines) or 1.0)
        if key == "kl":
            target = kl_target or next((e["adaptive_kl_target"] for e in experiments.values()
                                        if e.get("adaptive_kl_target")), None)
            top = max((max(line.get_ydata()) for line in ax.lines), default=0.0)
            if target and target <= 3 * top:
                ax.axhline(target, color="#c44e52", ls="--", lw=1, label=f"adaptive-KL target {target:g}")
            elif target:  # a line there would flatten the curve: the target is named in the legend instead
                ax.plot([], [], " ", label=f"adaptive-KL target {target:g}:\nfar above this range")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelbottom=True)
    fig.legend(list(lines.values()), list(lines), loc="outside lower center", ncols=max(len(lines), 1), fontsize=8,
               title="reward-model precision (experiment)", title_fontsize=8)
    how = (f"lines: centred rolling mean over {window} steps, faint points: each step" if window
           else "one point per step")
    fig.suptitle(f"PPO diagnostics per step ({how}; every step samples different prompts)", fontsize=10)
    return save(fig, path)


def overoptimisation_figure(experiments: dict[str, dict], path: str | Path) -> Path:
    """Change of the proxy (training) and every judge's reward on held-out prompts since step 0, against KL to the
    SFT model (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization"). Changes, not raw
    scores, so experiments whose reward models have different scales share the axis. Fewer than
    :data:`MIN_LINE_POINTS` evaluations are drawn as points only."""
    fig = new_figure((7, 5.4))
    ax = fig.subplots()
    few = 0
    for i, (name, e) in enumerate(experiments.items()):
        curve, first = e["curve"], e["curve"][0]
        line = "" if len(curve) < MIN_LINE_POINTS else "-"
        few = max(few, len(curve)) if not line else few
        kl = [c["kl"] for c in curve]
        ax.plot(kl, [c["proxy"] - first["proxy"] for c in curve], "o" + line, color=f"C{i}", label=f"{name}: proxy")
        for judge, marker in zip(e["judges"], "s^dv"):
            ax.plot(kl, [c[judge] - first[judge] for c in curve], marker + ("--" if line else ""), color=f"C{i}",
                    mfc="none", label=f"{name}: {judge}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="KL(policy ‖ SFT) on held-out prompts (nats per reply)",
           ylabel="mean score change since step 0 (reward-model score)")
    if few:
        ax.set_title(f"points only: {few} evaluations per experiment (step 0 and the end); ppo.eval_every adds more",
                     fontsize=7)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=max(1, len(experiments)),
               fontsize=7)  # below the axes: a legend inside would hide points
    fig.suptitle("Over-optimisation: proxy (filled) and judges (open) against KL to the SFT model", fontsize=10)
    return save(fig, path)


def algorithms_figure(experiments: dict[str, dict], net: dict[str, dict], path: str | Path) -> Path:
    """Algorithms x precisions (stage 4's arms, :func:`edgerlhf.core.arms.parse_arm`): each judge's score net of the
    placebo policy (per prompt, with its 95% interval, :func:`edgerlhf.core.arms.net_of_placebo`) against sqrt(KL to
    the SFT model) after training (first seed; nats per reply, clipped at 0), one panel per judge; marker: algorithm,
    colour: reward-model precision (grey: none, DPO)."""
    import numpy as np

    from .arms import parse_arm

    judges = [j for j in next(iter(net.values())) if j not in ("length_change", "length_vs_placebo")]
    fig = new_figure((4.6 * len(judges), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(judges), squeeze=False)[0])
    markers, colours = {"ppo": "o", "rloo": "s", "grpo": "^", "dpo": "D"}, {"bf16": "C0", "int8": "C1", "int4": "C2"}
    for ax, judge in zip(axes, judges):
        for name, x in net.items():
            algorithm, precision = parse_arm(name)
            d = float(np.sqrt(max(experiments[name]["after"]["kl_mean"], 0.0)))
            m, (lo, hi) = x[judge]["mean_difference"], x[judge]["ci"]
            ax.errorbar([d], [m], yerr=[[m - lo], [hi - m]], fmt=markers.get(algorithm, "x"), capsize=3,
                        color=colours.get(precision, "grey"), label=name)
        ax.axhline(0, color="black", lw=0.6)
        ax.set(xlabel="√KL to the SFT model after training (√(nats per reply))",
               ylabel=f"{judge}: arm − placebo (judge score)", title=judge)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(net), 6), fontsize=7,
               title="arm (marker: algorithm, colour: reward-model precision)", title_fontsize=7)
    fig.suptitle("Judge score net of the placebo policy against KL, per algorithm and reward-model precision "
                 "(95% intervals)", fontsize=10)
    return save(fig, path)


def best_of_n_figure(bon: dict, path: str | Path) -> Path:
    """Best-of-n (:func:`edgerlhf.core.best_of_n.curves`): each judge's gain over the mean SFT reply against
    sqrt(KL_bon), one line per proxy with its 95% bootstrap band over prompts and Gao et al.'s fit
    ``d (alpha - beta d)`` dashed; one panel per judge."""
    import numpy as np

    judges = list(bon["judge_mean"])
    fig = new_figure((4.6 * len(judges), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(judges), squeeze=False)[0])
    d = np.asarray(bon["sqrt_kl"])
    grid = np.linspace(0, d.max(), 50)
    line = "-" if len(d) >= 3 else ""
    for ax, judge in zip(axes, judges):
        for i, (name, proxy) in enumerate(bon["proxies"].items()):
            gains = [pt["judges"][judge]["gain"] for pt in proxy["points"]]
            mean = [g["mean_difference"] for g in gains]
            ax.plot(d, mean, "o" + line, color=f"C{i}", label=name, ms=4)
            ax.fill_between(d, [g["ci"][0] for g in gains], [g["ci"][1] for g in gains], color=f"C{i}", alpha=0.12)
            fit = proxy["fits"].get(judge)
            if fit:
                ax.plot(grid, grid * (fit["alpha"] - fit["beta"] * grid), "--", color=f"C{i}", lw=0.8)
        ax.axhline(0, color="black", lw=0.6)
        top = ax.secondary_xaxis("top", functions=(lambda x: x ** 2, lambda k: np.sqrt(np.clip(k, 0, None))))
        top.set_xlabel("KL_bon (nats)", fontsize=8)
        ax.set(xlabel="sqrt(KL_bon) (sqrt nats)", ylabel=f"{judge} gain over the mean SFT reply (score)",
               title=f"judged by {judge}")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(bon["proxies"]),
               fontsize=8)
    fig.suptitle(f"Best-of-n, n = {bon['n']}, {bon['n_prompts']} held-out prompts: each proxy picks, the judges "
                 "score (bands: 95% CI; dashed: Gao et al. fit)", fontsize=9)
    return save(fig, path)


def memory_figure(rows: list[dict], budget_gib: float | None, path: str | Path) -> Path:
    """Peak memory per stage (MiB): CUDA peak allocated where measured, else process peak RSS, with the budget line."""
    fig = new_figure((6, 3.4))
    ax = fig.subplots()
    on_cuda = any(r["cuda_peak_allocated_mib"] is not None for r in rows)
    key = "cuda_peak_allocated_mib" if on_cuda else "cpu_peak_rss_mib"
    ax.bar([r["stage"] for r in rows], [r[key] or 0 for r in rows], color="#4c72b0")
    if budget_gib:
        ax.axhline(budget_gib * 1024, color="#c44e52", ls="--", label=f"budget {budget_gib:g} GiB")
        ax.legend()
    ax.set_xlabel("stage")
    ax.set_ylabel("CUDA peak allocated (MiB)" if on_cuda else "process peak RSS (MiB)")
    ax.set_title("peak memory per stage" + ("" if on_cuda else " (CPU run: RSS, no device cap)"))
    return save(fig, path)


def show_stage_memory(run_dir: str | Path, budget_gib: float | None):
    """Display, in a notebook, the peak memory of every stage recorded so far in ``run_dir``
    (:func:`edgerlhf.core.records.stage_memory`, MiB) as a table and as a bar chart against ``budget_gib``
    (saved to ``figures/memory.png``); the one cell every notebook ends with. Returns the table (a DataFrame)."""
    import pandas as pd
    from IPython.display import Image, display

    from .records import stage_memory

    rows = stage_memory(run_dir)
    table = pd.DataFrame(rows).set_index("stage").round(1)
    display(table)
    display(Image(filename=str(memory_figure(rows, budget_gib, Path(run_dir) / "figures" / "memory.png"))))
    return table
