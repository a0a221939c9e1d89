"""Figures written by the stages (matplotlib's object API, no global pyplot state)."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG (100 dpi), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def loss_figure(log_history: list[dict], path: str | Path) -> Path:
    """Training and evaluation loss against optimizer step, from a Trainer's ``state.log_history``."""
    fig = Figure(figsize=(6, 3.5))
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
    fig = Figure(figsize=(3.2 * len(models), 3.2))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, (name, entry) in zip(axes, models.items()):
        bins = [b for b in entry["reliability"] if b["n"]]
        ax.plot([0.5, 1], [0.5, 1], ":", color="grey")
        ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=0.045, alpha=0.7)
        ax.set_title(f"{name}\nECE {entry['ece']:.3f}")
        ax.set_xlim(0.5, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    return save(fig, path)


def margin_figure(models: dict[str, dict], path: str | Path) -> Path:
    """Histogram of reward margins ``r_chosen - r_rejected`` on held-out pairs, per reward model."""
    fig = Figure(figsize=(3.2 * len(models), 3.0))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, (name, entry) in zip(axes, models.items()):
        margins = [c - r for c, r in zip(entry["scores_chosen"], entry["scores_rejected"])]
        ax.hist(margins, bins=20, color="#55a868")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("r_chosen - r_rejected")
    axes[0].set_ylabel("pairs")
    return save(fig, path)


def ppo_curves_figure(experiments: dict[str, dict], path: str | Path) -> Path:
    """Mean reward-model score and KL to the reference against PPO step, one line per experiment."""
    fig = Figure(figsize=(9, 3.2))
    ax_score, ax_kl = fig.subplots(1, 2)
    for name, e in experiments.items():
        steps = [h["step"] for h in e["history"]]
        ax_score.plot(steps, [h["score"] for h in e["history"]], "o-", label=name)
        ax_kl.plot(steps, [h["kl"] for h in e["history"]], "o-", label=name)
    ax_score.set(xlabel="PPO step", ylabel="proxy reward-model score", title="reward")
    ax_kl.set(xlabel="PPO step", ylabel="KL to SFT (nats / reply)", title="KL")
    ax_score.legend()
    return save(fig, path)


def overoptimisation_figure(experiments: dict[str, dict], path: str | Path) -> Path:
    """Proxy (training) and judge reward on held-out prompts against KL to the SFT model
    (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization")."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for name, e in experiments.items():
        kl = [c["kl"] for c in e["curve"]]
        line = ax.plot(kl, [c["proxy"] for c in e["curve"]], "o-", label=f"{name} proxy")[0]
        ax.plot(kl, [c["judge"] for c in e["curve"]], "s--", color=line.get_color(), label=f"{name} judge")
    ax.set(xlabel="KL to SFT on held-out prompts (nats / reply)", ylabel="mean score")
    ax.legend(fontsize=7)
    return save(fig, path)


def memory_figure(rows: list[dict], budget_gib: float | None, path: str | Path) -> Path:
    """Peak memory per stage (MiB): CUDA peak allocated where measured, else process peak RSS, with the budget line."""
    fig = Figure(figsize=(6, 3.2))
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
