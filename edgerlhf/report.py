"""After a whole run (the runner, or `python -m edgerlhf.report`): build ``RUN_DIR/REPORT.md`` and its figures from a
run's records alone.

    python -m edgerlhf.report results/runs/<run_id>

Every number in the report is read from ``RUN_DIR/records/*.json`` (and the runner's
``manifest.json`` for notebook wall times); nothing is typed in. Figures are redrawn from
the records into ``RUN_DIR/report_figures/`` so the report folder can be copied as a whole.
A stage whose newest record failed is reported as failed (its step and error), and a field a
section needs that a record lacks is named in the report ("not recorded"), never a crash.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core import crossfit, plots
from .core.arms import runs
from .core.files import atomic_write_text
from .core.records import STAGE_ORDER, current_run, memory_rows, newest_records, record_paths

STAGES = dict(zip(STAGE_ORDER, ("00_Setup", "01_Data_Preparation", "02_SFT_Finetuning", "03_Reward_Modeling",
                                "04_PPO_Alignment")))  # stage -> its notebook
MIB_PER_GIB = 1024
NOT_RECORDED = "not recorded"
ORIGIN_NOTE = {"gguf": "; dequantized from a Q4_1 GGUF file, so even its full-precision weights carry 4-bit "
                       "rounding: the int4 comparison measures re-quantization of an already 4-bit model"}


class MissingRecordError(FileNotFoundError):
    """A stage's record is absent from the run folder; the message names the file and the notebook."""


class MissingField(KeyError):
    """A field a report section reads is absent from a record; the message names the record file and the field."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Fields(dict):
    """A record, or a dict inside one, whose missing key raises :class:`MissingField` with its file and path."""

    def __init__(self, items: dict, file: str, path: str):
        super().__init__(items)
        self.file, self.path = file, path

    def __missing__(self, key):
        raise MissingField(f"`{self.file}` does not record `{self.path + '.' if self.path else ''}{key}`")


def _fields(value, file: str, path: str = ""):
    """``value`` (a record read from ``file``, or a part of it at ``path``) with every dict a :class:`_Fields`."""
    if isinstance(value, dict):
        return _Fields({k: _fields(v, file, f"{path}.{k}" if path else k) for k, v in value.items()}, file, path)
    if isinstance(value, list):
        return [_fields(v, file, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _record_files(run_dir: Path) -> dict[str, list[Path]]:
    """Every record file of each stage in ``run_dir/records``, oldest first (the last one is the newest)."""
    files: dict[str, list[Path]] = {}
    for path in record_paths([run_dir]):
        files.setdefault(path.stem.partition(".")[0], []).append(path)
    return files


def _section(title: str, build, record: dict | None = None, files: list[Path] = ()) -> str:
    """A report section: ``build()``; or, where the stage's newest ``record`` (from ``files``) did not end ``ok``,
    its status, step and error; or, where a field the section reads is not recorded, which one."""
    if record is not None and record.get("status") != "ok":
        r = record.get("results") or {}
        earlier = ", ".join(f"`{f.name}`" for f in files[:-1])
        return (f"## {title}\n\n**{record.get('status') or 'status not recorded'}**: the newest record of this stage, "
                f"`records/{files[-1].name}` ({record.get('date') or 'date not recorded'}), ended at step "
                f"`{r.get('step') or NOT_RECORDED}` with: {r.get('error') or 'error not recorded'}. No results are "
                "shown for it." + (f" Earlier records of this stage in this run: {earlier}." if earlier else ""))
    try:
        return build()
    except MissingField as exc:  # said in the report, not hidden: the section names the field it lacks
        return f"## {title}\n\nNot shown: {exc} (a record written by another version of the stage?)."


def latest_records(run_dir: str | Path) -> dict[str, dict]:
    """The newest record of every stage in ``run_dir/records`` (``sft.2.json`` wins over ``sft.json``).

    Raises:
        MissingRecordError: a stage of :data:`STAGES` has no record.
        ValueError: a record file is not valid JSON (from :func:`edgerlhf.core.records.read_record`).
    """
    run_dir = Path(run_dir)
    found = newest_records(run_dir)
    for stage, notebook in STAGES.items():
        if stage not in found:
            raise MissingRecordError(f"{run_dir / 'records' / (stage + '.json')}: no record of stage {stage!r}; "
                                     f"run {notebook}.ipynb into this run folder first")
    return found


def _n(x, digits: int = 3) -> str:
    """A number for a table cell (``-`` for None or NaN)."""
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"


def _table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; cells already formatted as strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _peak(memory: dict | None) -> str:
    """``CUDA allocated / reserved`` when measured on a GPU, else the process peak RSS (MiB)."""
    if not memory:
        return "-"
    if memory.get("cuda_peak_allocated_mib") is not None:
        return f"{memory['cuda_peak_allocated_mib']:,.0f} / {memory['cuda_peak_reserved_mib']:,.0f} (CUDA)"
    return f"{memory['cpu_peak_rss_mib']:,.0f} (RSS)"


def _clip(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _get(d: dict, key: str, fmt=str) -> str:
    """``fmt(d[key])`` for a table cell, or ``not recorded`` where ``d`` has no ``key``."""
    return fmt(d[key]) if key in d else NOT_RECORDED


def section_run(records: dict, manifest: dict | None) -> str:
    setup = records["setup"]
    hw, sw = setup.get("hardware") or {}, setup.get("software") or {}
    base = (setup.get("results") or {}).get("base_model") or {}
    device = hw.get("gpu_name") or (f"CPU only ({_get(hw, 'cpu')}, {_get(hw, 'cpu_count')} cores)" if hw
                                    else NOT_RECORDED)
    source = _get(base, "source")
    if base.get("location") not in (None, base.get("source")):
        source += f" (`{base['location']}`)"
    rows = [["run", _get(setup, "run_id")], ["profile", _get(setup, "profile")], ["seed", _get(setup, "seed")],
            ["git commit", (manifest or {}).get("git_commit") or "-"], ["device", device],
            ["VRAM (MiB)", _get(hw, "vram_total_mib", _n)], ["RAM (MiB)", _get(hw, "ram_total_mib", _n)],
            ["GPU supports bf16", _get(hw, "bf16_supported", _n)],
            ["CPU multiplies bf16 natively (AMX or AVX512-BF16)", _get(hw, "cpu_bf16_native", _n)],
            ["platform", _get(hw, "platform")],
            ["base model", _get(base, "name") + ORIGIN_NOTE.get(base.get("init"), "")], ["base model source", source],
            ["base model architecture", _get(base, "architecture")],
            ["base model parameters", _get(base, "parameters", _n)], ["base model dtype", _get(base, "dtype")]]
    rows += [[name, version or "not installed"] for name, version in sw.items()] or [["software", NOT_RECORDED]]
    return "## Hardware and software\n\n" + _table(["", "value"], rows)


def section_time(records: dict, manifest: dict | None) -> str:
    notebook_s = {n["notebook"][:2]: n.get("seconds") for n in (manifest or {}).get("notebooks", [])}
    rows = [[STAGES[s], _get(records[s], "wall_time_s", lambda x: _n(x, 1)), _n(notebook_s.get(STAGES[s][:2]), 1)]
            for s in STAGES]
    total = [sum(r.get("wall_time_s") or 0 for r in records.values()), sum(v or 0 for v in notebook_s.values())]
    rows.append(["**total**", _n(total[0], 1), _n(total[1], 1) if notebook_s else "-"])
    return ("## Wall time\n\nStage time is measured inside the stage (record `wall_time_s`); notebook time "
            "includes kernel start and plotting (runner manifest).\n\n"
            + _table(["stage", "stage (s)", "notebook (s)"], rows))


def section_data(records: dict) -> str:
    r = records["data"]["results"]
    lines = [(f"## Data\n\nSource: `{r['source']['location']}` (sha256 `{r['source_sha256'][:12]}…`), "
             f"{_n(r['rows_read'])} rows read, {_n(r['kept'])} kept; train {_n(r['counts']['train'])} / "
             f"test {_n(r['counts']['test'])} pairs (template `{r['template']}`, max length "
             f"{r['max_length']} tokens).\n"),
             _table(["drop reason", "rows"], [[k, _n(v)] for k, v in r["dropped"].items()]), "",
             "Token lengths (mean / median / p95 / max):\n"]
    rows = [[split, part, " / ".join(_n(stats[k], 1) for k in ("mean", "median", "p95", "max"))]
            for split, parts in r["token_lengths"].items() for part, stats in parts.items()]
    lines.append(_table(["split", "part", "tokens"], rows))
    lines.append("\nFiles: " + ", ".join(f"`{name}` sha256 `{digest[:12]}…`" for name, digest in r["files"].items()))
    return "\n".join(lines)


def section_sft(records: dict, figures: Path) -> str:
    r = records["sft"]["results"]
    fig = plots.loss_figure(r["log_history"], figures / "sft_loss.png")
    rows = [["strategy", r["strategy"]], ["dtype that ran", r["dtype"]],
            ["trainable parameters", f"{_n(r['parameters']['trainable'])} of {_n(r['parameters']['total'])}"],
            ["optimizer steps", _n(r["global_step"])], ["training tokens", _n(r["tokens_seen"])],
            ["throughput (tokens/s)", _n(r["tokens_per_second"], 1)],
            ["held-out perplexity before → after", (f"{_n(r['perplexity_before'], 2)} → {_n(r['perplexity_after'], 2)}"
                                                   f" ({_n(r['eval_tokens'])} tokens)")],
            ["peak memory (MiB)", _peak(records["sft"]["peak_memory"])]]
    samples = [[_clip(s["prompt"], 120), _clip(s["before"]), _clip(s["after"])] for s in r["samples"][:3]]
    return ("## Supervised fine-tuning\n\n" + _table(["", "value"], rows)
            + f"\n\n![SFT loss]({fig.parent.name}/{fig.name})\n\nHeld-out prompts, greedy replies before and after:\n\n"
            + _table(["prompt", "before SFT", "after SFT"], samples))


def _ci(ci, digits: int = 3, sign: bool = False) -> str:
    """``[lo, hi]`` for a table cell (``-`` for None)."""
    if not ci:
        return "-"
    fmt = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    return "[" + ", ".join(fmt.format(x) for x in ci) + "]"


def section_reward(records: dict, figures: Path) -> str:
    r = records["reward"]["results"]
    models = r["models"]
    accuracy = plots.accuracy_figure(r["table"], figures / "rm_accuracy.png")
    rel = plots.reliability_figure(models, figures / "rm_reliability.png")
    margins = plots.margin_figure(models, figures / "rm_margins.png")
    rows, judges = [], [name for name in models if name.startswith("judge")]
    for row in r["table"]:
        seeds = "-" if row.get("n_seeds") is None else (
            f"{_n(row['seed_accuracy_mean'])} ± {_n(row['seed_accuracy_sd'])} ({row['n_seeds']})"
            if row.get("seed_accuracy_sd") is not None else f"{_n(row['seed_accuracy_mean'])} (1)")
        learned = "-" if row["learned"] is None else ("yes" if row["learned"] else "**not learned**")
        vs_len = "-" if row.get("vs_length_points") is None else (
            f"{row['vs_length_points']:+.1f} {_ci(row['vs_length_ci95'], 1, True)}, "
            f"p_Holm = {row['vs_length_p_holm']:.2g}")
        vs_bf16 = "-" if row.get("vs_bf16_points") is None else (
            f"{row['vs_bf16_points']:+.1f} {_ci(row['vs_bf16_ci95'], 1, True)}, p_Holm = {row['vs_bf16_p_holm']:.2g} "
            f"(MDE {_n(row['vs_bf16_mde_points'], 1)})")
        entry = models.get(row["model"], {})
        rows.append([row["model"], row["mode"], row.get("dtype") or "-",
                     f"{_n(row['accuracy'])} {_ci(row['accuracy_ci95'])}", seeds, learned, vs_len, vs_bf16,
                     " ".join([_n(row["auc_roc"])] + ([_ci(row["auc_roc_ci95"])] if row.get("auc_roc_ci95") else [])),
                     _n(row.get("ece")),
                     *(f"{_n(row.get(f'agreement_with_{j}'))} (phi {_n(row.get(f'phi_with_{j}'), 2)})"
                       for j in judges),
                     _n(row.get("trainable_parameters")),
                     _n(row.get("weights_mib"), 1), _peak(entry.get("peak_memory_training")),
                     _n(row.get("pairs_per_second"), 2), _n(row.get("train_time_s"), 1)])
    d = r["data"]
    n = next(iter(models.values()))["n"]
    method = r.get("method", "lora")
    if method == "probe":
        read = {"last": "its state at the last token", "mean": "the mean of its states over the reply's tokens",
                "last+mean": "its state at the last token and the mean of its states over the reply's tokens"}
        layer = next(iter(models.values())).get("probe_layer")
        how = (f"a linear probe: the SFT backbone frozen at each precision, {read[r.get('probe_pooling', 'last')]} "
               f"(after block {layer if layer else 'the last'}, through the final norm) computed once per reply, and "
               "the one-output head fitted by logistic regression on chosen − rejected")
    else:
        how = "LoRA on the SFT backbone plus a one-output head (TRL RewardTrainer)"
    judge = (f", the judges ({', '.join(judges)}) on {_n(d['judge_train']['kept'])} other pairs"
             if "judge_train" in d else "")
    crossfit_text = section_crossfit(r) + "\n\n### The saved models (used by stage 4)\n\n" if r.get("crossfit") else ""
    return (f"## Reward models\n\nMethod: {how}.\n\n{crossfit_text}Proxies trained on {_n(d['train']['kept'])} pairs "
            f"(validation {_n(d['validation']['kept'])}){judge}; all evaluated on the same {_n(n)} held-out pairs. "
            "Accuracy is strict (ties count as wrong) with a 95% bootstrap interval; differences are in points, paired "
            "on the same pairs (bootstrap interval, exact McNemar p adjusted by Holm's method within each column's "
            "family, minimum detectable difference at 80% power); a model that does not beat the length baseline "
            "(Holm-adjusted p < 0.05) is **not learned**. `-ptq` rows are the bf16 model "
            "quantized after training. On a CPU \"bf16\" runs in float32 (the dtype column).\n\n"
            + _table(["model", "mode", "dtype that ran", "accuracy [95% CI]", "seeds: mean ± sd (n)", "learned",
                      "vs length (points)", "vs bf16 (points)", "AUC-ROC [95% CI]", "ECE",
                      *(f"agrees with {j} (phi)" for j in judges),
                      "trainable params", "weights (MiB)", "peak training (MiB)", "pairs/s", "train time (s)"], rows)
            + "\n\n**What can be concluded:**\n\n" + "\n".join(f"- {c}" for c in r["conclusions"])
            + f"\n\n![accuracy]({accuracy.parent.name}/{accuracy.name})\n\nReliability diagrams (pairs per bin on "
            "each bar; ECE of a model that did not learn only says it is unsure):\n\n"
            f"![reliability]({rel.parent.name}/{rel.name})\n\n![margins]({margins.parent.name}/{margins.name})")


def _vs(row: dict, key: str) -> str:
    """A cross-fitted comparison cell: points, corrected interval, Holm-adjusted p (``-`` where none)."""
    if row.get(f"{key}_points") is None:
        return "-"
    return (f"{row[f'{key}_points']:+.1f} {_ci(row[f'{key}_ci95'], 1, True)}, p_Holm = {row[f'{key}_p_holm']:.2g} "
            f"(MDE {_n(row[f'{key}_mde_points'], 1)})")


def section_crossfit(r: dict) -> str:
    """The cross-fitted evaluation of stage 3 (``results["crossfit"]``): the table and its generated words."""
    cf = r["crossfit"]
    proxies = [p for p in ("bf16", "int8", "int4") if p in cf["models"]]
    table = crossfit.table(cf, proxies)
    families = list(dict.fromkeys(c["family"] for c in cf["comparisons"]))
    keys = [crossfit.column_key(f) for f in families]
    rows = [[row["model"], f"{_n(row['accuracy'])} {_ci(row['accuracy_ci95'])}", _n(row["accuracy_draw_sd"]),
             f"{_n(row['auc_roc'])} {_ci(row['auc_roc_ci95'])}", *(_vs(row, k) for k in keys),
             *(_n(row[f"phi_vs_{p}"], 2) for p in proxies)] for row in table]
    pool = cf["pool"]
    return (f"### Cross-fitted evaluation (every precision on the same folds)\n\n{_n(pool['pairs'])} pairs (every kept "
            f"pair but the {_n(pool['left_out_sft_trained'])} whose replies SFT trained on), {cf['folds']} folds × "
            f"{cf['draws']} random fold draws: each model is fitted on {cf['folds'] - 1} folds and scores the one "
            "left out, so every pair is scored once per draw by a model that never saw it, and all models see the "
            "same folds. Intervals are the corrected repeated k-fold t interval (Bouckaert & Frank 2004), which "
            "counts the variance from which pairs a model was trained on; 'draw sd' is the sd of accuracy across "
            "fold draws. Each column of comparisons is one family with Holm's correction; MDE is the minimum "
            "detectable difference at 80% power. phi is the correlation of two models' per-pair correctness (pooled "
            "decisions). The `judge` recipe is bf16's (a head on the same features), so cross-fitted it is the "
            f"bf16 row. Took {_n(cf['wall_time_s'], 0)} s.\n\n"
            + _table(["model", "accuracy [95% CI]", "draw sd", "AUC-ROC [95% CI]", *families,
                      *(f"phi vs {p}" for p in proxies)], rows)
            + "\n\n**What can be concluded (cross-fitted):**\n\n" + "\n".join(f"- {c}" for c in cf["conclusions"])
            + (section_frontier(cf["judge_frontier"]) if cf.get("judge_frontier") else ""))


def section_frontier(frontier: list[dict]) -> str:
    """The judge candidates' accuracy against their independence from the proxies (cross-fitted)."""
    proxies = list(frontier[0]["phi"])
    rows = [[f["candidate"], f"{_n(f['accuracy'])} {_ci(f['accuracy_ci95'])}", *(_n(f["phi"][p], 2) for p in proxies),
             _n(f["max_phi"], 2), "yes" if f["meets_target"] else "no"] for f in frontier]
    met = [f["candidate"] for f in frontier if f["meets_target"]]
    best, freest = max(frontier, key=lambda f: f["accuracy"]), min(frontier, key=lambda f: f["max_phi"])
    return ("\n\n### Judge candidates: accuracy against independence from the proxies\n\nA judge can only see a "
            "policy exploit the proxies' errors if it does not make the same errors: the target is cross-fitted "
            "accuracy ≥ 0.65 with phi ≤ 0.3 against every proxy. "
            + (f"Met by: {', '.join(met)}. " if met else "No candidate meets it. ")
            + f"Most accurate: {best['candidate']} ({_n(best['accuracy'])}, largest phi {_n(best['max_phi'], 2)}); "
            f"least correlated with the proxies: {freest['candidate']} ({_n(freest['accuracy'])}, largest phi "
            f"{_n(freest['max_phi'], 2)}). Stage 4 scores every experiment with the saved `judge` (the bf16 row's "
            "recipe) and `judge-tfidf` (the tf-idf row's) and states a direction only where both find it."
            + "\n\n" + _table(["candidate", "accuracy [95% CI]", *(f"phi vs {p}" for p in proxies), "largest phi",
                                "meets target"], rows))


def section_ppo(records: dict, figures: Path) -> str:
    r = records["ppo"]["results"]
    experiments, judges = r["experiments"], r["judges"]
    training = records["ppo"].get("training_config") or {}
    curves = plots.ppo_curves_figure(experiments, figures / "ppo_curves.png",
                                     training.get("adaptive_kl_target") if training.get("adaptive_kl") else None)
    overopt = plots.overoptimisation_figure(experiments, figures / "ppo_overopt.png")
    keys = [j.replace("-", "_") for j in judges]
    net = r.get("net_of_placebo") is not None
    by_algorithm = (plots.algorithms_figure(experiments, r["net_of_placebo"], figures / "ppo_algorithms.png")
                    if net else None)

    def vs_placebo(t: dict, k: str) -> list[str]:
        if not net:
            return []
        if t[f"{k}_net_placebo"] is None:
            return ["-"]
        return [f"{t[f'{k}_net_placebo']:+.3f} {_ci(t[f'{k}_net_placebo_ci95'], 3, True)}, p_Holm = "
                f"{t[f'{k}_net_placebo_p_holm']:.2g}; length-controlled {t[f'{k}_net_length_controlled']:+.3f} "
                f"{_ci(t[f'{k}_net_length_controlled_ci95'], 3, True)}"]
    rows = [[t["reward_precision"], f"{t['proxy']}" + ("" if t["proxy_learned"] is not False else " (**not learned**)"),
             *(c for k in keys for c in [f"{t[f'{k}_change']:+.3f} {_ci(t[f'{k}_change_ci95'], 3, True)} (MDE "
                                         f"{_n(t[f'{k}_change_mde'])}; wins {_n(t[f'{k}_win_rate'], 2)})",
                                         *vs_placebo(t, k)]),
             f"{t['length_change_tokens']:+.1f} {_ci(t['length_change_tokens_ci95'], 1, True)}",
             f"{_n(t['implicit_share'], 2)} {_ci(t['implicit_share_ci95'], 2)}",
             f"{_n(t['proxy_before'])} → {_n(t['proxy_after'])}, {t['proxy_after'] - t['proxy_before']:+.3f} "
             f"{_ci(t['proxy_change_ci95'], 3, True)}", _n(t["kl"]), _n(t["wall_time_s"], 1),
             _peak(experiments[t["reward_precision"]]["peak_memory"])] for t in r["table"]]
    samples = []
    for name, e in experiments.items():
        samples += [[name, _clip(s["prompt"], 120), _clip(s["sft"]), _clip(s["ppo"])] for s in e["samples"][:2]]
    described = []
    for name, j in judges.items():
        lo, hi = j["accuracy_ci95"]
        agree = ", ".join(f"{k} {_n((v or {}).get('agreement'))} (phi {_n((v or {}).get('phi'), 2)})"
                          for k, v in j["agreement_with_proxies"].items())
        described.append(f"- `{name}` ({j['method']}): held-out accuracy {_n(j['accuracy'])} [{_n(lo)}, {_n(hi)}], "
                         f"{'beats' if j['learned'] else '**does not beat**'} the length baseline; agreement with "
                         f"each proxy on the test pairs (phi of their correctness): {agree}")
    bon = section_best_of_n(r["best_of_n"], figures) if r.get("best_of_n") else ""
    first = next(iter(experiments.values()))
    n_seeds = len(runs(first))
    seeds = (f" Each arm ran {n_seeds} seeds under common random numbers: the arm − placebo columns pool prompts and "
             f"seeds, with the t interval across the {n_seeds} seeds' mean differences (for the length-controlled "
             f"difference, across the seeds' intercepts; {n_seeds - 1} degree"
             f"{'s' if n_seeds > 2 else ''} of freedom) and its t-test; the other columns are the first seed's run "
             f"(seed {first.get('seed')}), and the time is the sum over seeds." if n_seeds > 1 else "")
    others = sorted({e.get("algorithm", "ppo") for e in experiments.values()} - {"ppo"})
    algorithms = (f" Arms other than PPO ({', '.join(others)}) train the same policy LoRA on the same prompts and "
                  "seeds with TRL's trainers: `rloo-<precision>` and `grpo-<precision>` against that reward model, "
                  "`dpo` on the proxies' labelled training pairs (no reward model; the bf16 proxy scores it); their "
                  "arm − placebo columns read them against PPO's placebo arm." if others else "")
    return ("## PPO alignment\n\n" + (f"**The answer at this scale.** {r['answer']}\n\n" if r.get("answer") else "")
            + "**Judges** (every experiment; trained on pairs no proxy saw):\n\n"
            + "\n".join(described) + "\n\n" + bon + ("### PPO\n\n" if bon else "")
            + f"On {r['n_eval_prompts']} held-out prompts, the SFT replies are "
            "sampled once and shared; a judge's change = its score of the PPO reply − of the SFT reply, per prompt, "
            "with a paired bootstrap interval, the minimum detectable change (MDE, 80% power) and the win rate (ties "
            "count half). The placebo arm runs the same PPO on random rewards; arm − placebo is the judge's score of the "
            "arm's reply − of the placebo policy's, per prompt (Holm's correction over the arms, t-test), and "
            "length-controlled is that difference at equal reply length (least-squares intercept on the difference in "
            "tokens, bootstrap interval over prompts). Only comparisons get a verdict, and a direction only where "
            "every judge finds it. The implicit-reward column "
            f"needs no judge: the share of {r['n_implicit_reward_pairs']} held-out labelled pairs on which the policy "
            "raises log π(chosen) − log π(rejected) over the SFT model (Wilson interval). KL to the SFT model in "
            f"nats per reply.{seeds}{algorithms}\n\n"
            + _table(["arm", "proxy", *(c for j in judges for c in [f"{j} change [95% CI]", *(
                          [f"{j}: arm − placebo [95% CI]"] if net else [])]), "reply length change (tokens)",
                      "implicit reward: share [95% CI]", "proxy before → after, change [95% CI]", "KL", "time (s)",
                      "peak memory (MiB)"], rows)
            + "\n\n**What can be concluded:**\n\n" + "\n".join(f"- {c}" for c in r["conclusions"])
            + f"\n\n![PPO curves]({curves.parent.name}/{curves.name})\n\n"
            f"![over-optimisation]({overopt.parent.name}/{overopt.name})\n\n"
            + (f"![algorithms and precisions]({by_algorithm.parent.name}/{by_algorithm.name})\n\n" if by_algorithm
               else "") + _rl_fits(experiments)
            + "Sample replies on held-out prompts:\n\n"
            + _table(["reward model", "prompt", "SFT", "PPO"], samples))


def _rl_fits(experiments: dict) -> str:
    """Gao et al.'s RL fit per arm and judge (``rl_fit`` in the record), or why there is none."""
    lines = [f"{name}: " + "; ".join(f"{j} α {f['alpha']:.3f}, β {f['beta']:.3f} ({f['points']} points)"
                                     for j, f in e["rl_fit"].items() if f)
             for name, e in experiments.items() if any((e.get("rl_fit") or {}).values())]
    if not lines:
        return ("Gao et al.'s RL form d(α − β log d), d = √KL, is not fitted: it needs at least three evaluations "
                "with KL > 0 per arm (`ppo.eval_every` adds them).\n\n")
    return "Gao et al.'s RL form d(α − β log d), d = √KL, judge change since step 0:\n\n" + "".join(
        f"- {line}\n" for line in lines) + "\n"


def section_best_of_n(bon: dict, figures: Path) -> str:
    """The best-of-n part of the PPO section (:func:`edgerlhf.core.best_of_n.curves` as the stage recorded it)."""
    fig = plots.best_of_n_figure(bon, figures / "best_of_n.png")
    judges, n = list(bon["judge_mean"]), bon["n"]
    gains = {j: {g["proxy"]: g for g in bon["gains_at_n"][j]} for j in judges}
    rows = []
    for name, proxy in bon["proxies"].items():
        first, last = proxy["points"][0], proxy["points"][-1]
        row = [name, f"{_n(first['proxy_mean'])} → {_n(last['proxy_mean'])}",
               f"{_n(first['tokens_mean'], 1)} → {_n(last['tokens_mean'], 1)}"]
        for j in judges:
            g = gains[j][name]
            fit = proxy["fits"].get(j)
            row += [f"{g['mean_difference']:+.3f} {_ci(g['ci'], 3, True)}, p_Holm = {g['p_holm']:.2g}",
                    f"α {_n(fit['alpha'])} {_ci(fit['alpha_ci95'])}, β {_n(fit['beta'])} {_ci(fit['beta_ci95'])}"
                    if fit else "-"]
        rows.append(row)
    return (f"### Best-of-n\n\n{bon['n']} SFT replies to each of {bon['n_prompts']} held-out prompts, sampled once "
            "and shared; each proxy picks its best of the first k (k = " + ", ".join(map(str, bon["ks"]))
            + f"; KL_bon = log k − (k − 1)/k, {bon['kl_bon'][-1]:.2f} nats at k = {n}), every judge scores the pick. "
            "Gain = the judge's score of the pick − its mean score of all n replies, per prompt (paired bootstrap "
            "interval; Holm's correction over the proxies, t-test p-values). Fit: Gao et al. (2023)'s "
            "R(d) = d(α − βd), d = √KL_bon, with bootstrap intervals over prompts."
            + (f" Time: {bon['sampling_s']:,.0f} s sampling"
               + (f" (the SFT model in {bon['sampling_dtype']})" if bon.get("sampling_dtype") else "")
               + f", {bon['scoring_s']:,.0f} s scoring."
               if "sampling_s" in bon else "") + "\n\n"
            + _table(["proxy", f"proxy score of the pick, k = 1 → {n}", f"reply tokens, k = 1 → {n}",
                      *(c for j in judges for c in (f"{j} gain at k = {n} [95% CI]", f"{j} fit"))], rows)
            + "\n\n" + "\n".join(f"- {w}" for w in bon["words"])
            + f"\n\n![best-of-n]({fig.parent.name}/{fig.name})\n\n")


def section_memory(records: dict, figures: Path) -> str:
    rows = memory_rows(records)
    budget = next((r["budget_gib"] for r in rows if r["budget_gib"]), None)
    fig = plots.memory_figure(rows, budget, figures / "memory.png")
    table = _table(["stage", "device", "peak RSS (MiB)", "CUDA peak allocated (MiB)", "CUDA peak reserved (MiB)",
                    "budget (GiB)", "cap applied"],
                   [[r["stage"], r["device"], _n(r["cpu_peak_rss_mib"], 0), _n(r["cuda_peak_allocated_mib"], 0),
                     _n(r["cuda_peak_reserved_mib"], 0), _n(r["budget_gib"], 1), _n(r["budget_applied"])]
                    for r in rows])
    plan = records["setup"]["results"].get("memory_plan")
    planned = "(not recorded by this run's 00_Setup)"
    if plan:
        planned = _table(["profile", "stage", "estimate on a bf16 GPU (MiB)", "fits the budget", "advice"],
                         [[p["profile"], p["stage"], _n(p["estimate_mib"], 0), _n(p["fits"]), p["advice"] or "-"]
                          for p in plan])
    note = ("On a CPU the cap cannot apply and the device figures are empty; the process peak RSS includes the "
            "Python process and every model the stage holds." if all(r["cuda_peak_allocated_mib"] is None for r in rows)
            else "CUDA figures are measured under the per-process cap.")
    return (f"## Memory against the {_n(budget, 0)} GiB budget\n\n{note}\n\n{table}\n\n![memory]({fig.parent.name}/"
            f"{fig.name})\n\nPlanner estimates recorded by 00_Setup (`edgerlhf.core.planner.estimate`):\n\n{planned}")


def provenance_links(records: dict) -> list[dict]:
    """The chain of inputs between the stages' records, by sha256: ``[{"link", "expected", "found", "holds"}]``,
    ``holds`` None where a record does not carry the hash (written before provenance was recorded)."""
    def get(stage: str, *path: str):
        value = records.get(stage)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    train, test = "train_prefs.jsonl", "test_prefs.jsonl"
    data = {name: get("data", "results", "files", name) for name in (train, test)}
    rm_digests = get("reward", "data", "reward_models_sha256")
    links = [("SFT trained on stage 1's training file", data[train], get("sft", "data", "train_sha256")),
             ("reward models trained on stage 1's training file", data[train],
              get("reward", "data", f"{train}_sha256")),
             ("reward models evaluated on stage 1's test file", data[test], get("reward", "data", f"{test}_sha256")),
             ("reward models built on this SFT model", get("sft", "results", "weights_sha256"),
              get("reward", "data", "sft_weights_sha256")),
             ("PPO on stage 1's files", data, {name: get("ppo", "data", f"{name}_sha256") for name in (train, test)}),
             ("PPO's policy is this SFT model", get("sft", "results", "weights_sha256"),
              get("ppo", "data", "sft_weights_sha256")),
             ("PPO's reward models are the ones stage 3 evaluated", rm_digests,
              get("ppo", "data", "reward_models_sha256"))]

    def known(v):
        return v is not None and not (isinstance(v, dict) and (not v or None in v.values()))
    return [{"link": name, "expected": a, "found": b, "holds": (a == b) if known(a) and known(b) else None}
            for name, a, b in links]


def section_provenance(records: dict) -> str:
    """Whether the stages of this run read each other's outputs (:func:`provenance_links`), in words and a table."""
    links = provenance_links(records)
    broken = [x["link"] for x in links if x["holds"] is False]
    unknown = [x["link"] for x in links if x["holds"] is None]

    def short(v):
        if isinstance(v, dict):
            return ", ".join(f"{k}: {short(x)}" for k, x in v.items()) or NOT_RECORDED
        return f"`{v[:12]}`" if isinstance(v, str) else NOT_RECORDED
    words = ("**Inconsistent**, these links do not hold: " + "; ".join(broken) + ". A later stage read other files "
             "than the earlier stages of this run made." if broken else
             "Every link holds: each stage read the files the stage before it made in this run."
             if not unknown else f"The links that can be checked hold; {len(unknown)} cannot be checked (a record "
             "without the hash): " + "; ".join(unknown) + ".")
    rows = [[x["link"], short(x["expected"]), short(x["found"]),
             {True: "yes", False: "**no**", None: NOT_RECORDED}[x["holds"]]] for x in links]
    return ("## Provenance\n\nThe sha256 of what each stage read, from its record, against what the earlier stage "
            "wrote (first 12 hex digits). " + words + "\n\n" + _table(["link", "made", "read", "holds"], rows))


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/REPORT.md`` and ``run_dir/report_figures/*.png`` from the records; returns the report path.

    A stage whose newest record did not end ``ok`` gets its status, step and error instead of its results; a
    field that a record lacks is named in the report (``not recorded``) instead of raising.

    Raises:
        MissingRecordError: a stage's record is missing (the message names the file and the notebook).
        ValueError: a record or ``manifest.json`` is not valid JSON (the message names the file).
        OSError: the report or a figure cannot be written.
    """
    run_dir = Path(run_dir)
    files = _record_files(run_dir)
    records = {stage: _fields(record, f"records/{files[stage][-1].name}")
               for stage, record in latest_records(run_dir).items()}
    manifest_path = run_dir / "manifest.json"
    try:
        manifest = _fields(json.loads(manifest_path.read_text()), "manifest.json") if manifest_path.exists() else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path}: line {exc.lineno}: not valid JSON: {exc.msg}") from exc
    figures = run_dir / "report_figures"

    def stage_section(stage: str, title: str, build) -> str:
        return _section(title, build, records[stage], files[stage])

    parts = [(f"# EdgeRLHF run report: {records['setup'].get('run_id') or run_dir.name}\n\nBuilt by "
              "`python -m edgerlhf.report` from the records in `records/`; every number below is read from them."),
             stage_section("setup", "Hardware and software", lambda: section_run(records, manifest)),
             _section("Wall time", lambda: section_time(records, manifest)),
             stage_section("data", "Data", lambda: section_data(records)),
             stage_section("sft", "Supervised fine-tuning", lambda: section_sft(records, figures)),
             stage_section("reward", "Reward models", lambda: section_reward(records, figures)),
             stage_section("ppo", "PPO alignment", lambda: section_ppo(records, figures)),
             _section("Provenance", lambda: section_provenance(records)),
             _section("Memory", lambda: section_memory(records, figures))]
    return atomic_write_text(run_dir / "REPORT.md", "\n\n".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m edgerlhf.report [RUN_DIR]`` (default: the current run, the one the
    notebooks last ran in); returns 0, or 1 with a one-line message that says what was being done
    (``edgerlhf.report: building the report of RUN_DIR: ...``) on a missing record, invalid JSON or an
    unwritable folder. Any other error propagates with that same context added as a note."""
    parser = argparse.ArgumentParser(description="Build RUN_DIR/REPORT.md from a run's records.")
    parser.add_argument("run_dir", nargs="?", default=None,
                        help="a run folder, e.g. results/runs/<run_id> (default: the current run, "
                             "results/current_run.json)")
    args = parser.parse_args(argv)
    doing = "finding the current run (results/current_run.json)"
    try:
        run_dir = args.run_dir or current_run("results")
        if run_dir is None:
            raise ValueError("no RUN_DIR given and no current run (results/current_run.json): run the notebooks "
                             "first, or name a run folder")
        doing = f"building the report of {run_dir}"
        path = build_report(run_dir)
    except (ValueError, OSError) as exc:  # MissingRecordError is an OSError
        print(f"edgerlhf.report: {doing}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an unexpected error keeps its traceback, which then says what was being done
        exc.add_note(f"edgerlhf.report: {doing}")
        raise
    print(f"edgerlhf.report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
