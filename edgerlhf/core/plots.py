"""Stages 1-4 and the report: Figures written by the stages (matplotlib's object API, no global pyplot state).

matplotlib is imported when the first figure is made (:func:`new_figure`), not with this module, so that a stage
process does not hold it while it trains (``tests/test_packaging.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib ``Figure`` of ``figsize`` inches (object API: no pyplot state, no display backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG (100 dpi) atomically (:func:`edgerlhf.core.files.atomic_path`), creating the folder;
    returns the path."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)


def loss_figure(log_history: list[dict], path: str | Path) -> Path:
    """Training and evaluation loss against optimizer step, from a Trainer's ``state.log_history``."""
    fig = new_figure((6, 3.5))
    ax = fig.subplots()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    for points, label, style in ((train, "train", "-"), (evaluation, "eval", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    return save(fig, path)


def reliability_figure(models: dict[str, dict], path: str | Path) -> Path:
    """Reliability diagram per reward model: accuracy against confidence in each bin (Guo et al. 2017)."""
    fig = new_figure((3.2 * len(models), 3.2))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, (name, entry) in zip(axes, models.items()):
        bins = [b for b in entry["reliability"] if b["n"]]
        ax.plot([0.5, 1], [0.5, 1], ":", color="grey")
        ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=0.045, alpha=0.7)
        for b in bins:  # pairs per bin: a bin of 3 pairs says little
            ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), ha="center", va="bottom", fontsize=7)
        learned = "" if entry.get("learned", True) else " (not learned)"
        ax.set_title(f"{name}{learned}\nECE {entry['ece']:.3f}, n = {sum(b['n'] for b in bins)}", fontsize=9)
        ax.set_xlim(0.5, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    return save(fig, path)


def accuracy_figure(table: list[dict], path: str | Path) -> Path:
    """Held-out accuracy with its 95% interval per reward model and baseline (rows of the stage-3 table),
    chance (0.5) and the best baseline marked; models that did not beat the length baseline are hatched."""
    fig = new_figure((max(5.0, 0.7 * len(table) + 1.5), 3.6))
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
    ax.set_ylabel("held-out accuracy (95% CI)")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=7)
    return save(fig, path)


def margin_figure(models: dict[str, dict], path: str | Path) -> Path:
    """Histogram of reward margins ``r_chosen - r_rejected`` on held-out pairs, per reward model."""
    fig = new_figure((3.2 * len(models), 3.0))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, (name, entry) in zip(axes, models.items()):
        margins = [c - r for c, r in zip(entry["scores_chosen"], entry["scores_rejected"])]
        ax.hist(margins, bins=20, color="#55a868")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("r_chosen - r_rejected")
    axes[0].set_ylabel("pairs")
    return save(fig, path)


PPO_CURVES = (("score", "proxy score change from step 1", True), ("kl", "KL to SFT (nats / reply)", False),
              ("beta", "KL coefficient beta", False), ("approx_kl", "approximate KL (old || new)", False),
              ("clipfrac", "clip fraction", False), ("entropy", "entropy (nats / token)", False),
              ("explained_variance", "explained variance", False), ("response_length", "reply length (tokens)", False))


def ppo_curves_figure(experiments: dict[str, dict], path: str | Path) -> Path:
    """A grid of the per-step PPO diagnostics (CleanRL's set), one line per experiment; the proxy score is
    drawn as its change from the first step, so experiments with different reward models share an axis."""
    fig = new_figure((12, 5.5))
    axes = fig.subplots(2, 4).ravel()
    for ax, (key, label, relative) in zip(axes, PPO_CURVES):
        for name, e in experiments.items():
            points = [(h["step"], h[key]) for h in e["history"] if h.get(key) is not None]
            if points:
                steps, values = zip(*points)
                values = [v - values[0] for v in values] if relative else values
                ax.plot(steps, values, "o-", ms=3, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
    axes[0].legend(fontsize=7)
    return save(fig, path)


def overoptimisation_figure(experiments: dict[str, dict], path: str | Path) -> Path:
    """Change of the proxy (training) and every judge's reward on held-out prompts since step 0, against KL to the
    SFT model (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization"). Changes, not raw
    scores, so experiments whose reward models have different scales share the axis."""
    fig = new_figure((5, 3.5))
    ax = fig.subplots()
    for name, e in experiments.items():
        kl = [c["kl"] for c in e["curve"]]
        first = e["curve"][0]
        line = ax.plot(kl, [c["proxy"] - first["proxy"] for c in e["curve"]], "o-", label=f"{name} proxy")[0]
        for judge, style in zip(e["judges"], ("s--", "^:", "d-.")):
            ax.plot(kl, [c[judge] - first[judge] for c in e["curve"]], style, color=line.get_color(),
                    label=f"{name} {judge}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="KL to SFT on held-out prompts (nats / reply)", ylabel="mean score change since step 0",
           title="proxy and judges against KL")
    ax.legend(fontsize=7)
    return save(fig, path)


def memory_figure(rows: list[dict], budget_gib: float | None, path: str | Path) -> Path:
    """Peak memory per stage (MiB): CUDA peak allocated where measured, else process peak RSS, with the budget line."""
    fig = new_figure((6, 3.2))
    ax = fig.subplots()
    on_cuda = any(r["cuda_peak_allocated_mib"] is not None for r in rows)
    key = "cuda_peak_allocated_mib" if on_cuda else "cpu_peak_rss_mib"
    ax.bar([r["stage"] for r in rows], [r[key] or 0 for r in rows], color="#4c72b0")
    if budget_gib:
        ax.axhline(budget_gib * 1024, color="#c44e52", ls="--", label=f"budget {budget_gib:g} GiB")
        ax.legend()
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
