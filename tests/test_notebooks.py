"""Integration: every notebook runs through papermill with the tiny profile."""
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from edgerlhf.core.paths import REPO_ROOT
from edgerlhf.run import NOTEBOOKS, main, select

pytestmark = pytest.mark.slow  # every notebook through papermill


def test_committed_notebooks_are_clean_and_parameterised():
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO_ROOT / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell is not tagged"
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
        # cell ids from the file itself: nbformat.read fills in a missing one, with a warning in papermill's log
        ids = [c.get("id") for c in json.loads((REPO_ROOT / name).read_text())["cells"]]
        assert None not in ids and len(set(ids)) == len(ids), f"{name}: a cell id is missing or repeated"


def noisy_cells(path: Path) -> list[tuple[int, list[str]]]:
    """(cell index, first lines) of each cell whose saved stderr carries a warning or more than 3 non-blank lines
    other than progress bars (each bar is kept as its last line, one per loop, e.g. per PPO arm; library warnings
    and load reports belong in the run's logs)."""
    noisy = []
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stderr")
        lines = [line for line in text.splitlines() if line.strip()]
        other = [line for line in lines if not re.search(r"\d+%\|.*\| *\d+/\d+", line)]
        if re.search(r"warn|error|traceback|load report", text, re.IGNORECASE) or len(other) > 3:
            noisy.append((i, lines[:6]))
    return noisy


def test_noisy_cells_are_found(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x") for _ in range(3)]
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text="PPO steps: 100%|##| 5/5\n" * 4)]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stderr", text="x.py:3: FutureWarning: old\n")]
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stderr", text="a\nb\nc\nd\n")]
    nbformat.write(nb, tmp_path / "n.ipynb")
    assert [i for i, _ in noisy_cells(tmp_path / "n.ipynb")] == [1, 2]


def test_select():
    assert select("00,1") == NOTEBOOKS[:2]
    assert select(None) == NOTEBOOKS
    with pytest.raises(ValueError, match="no notebook"):
        select("09")


def test_all_notebooks_run_twice_with_tiny_profile_and_reproduce(tmp_path):
    # The README's reproducibility check, as CI runs it: notebooks 00 -> 04 twice, records compared; with TRL's arms
    # beside PPO's, as the quick profile runs them
    out = subprocess.run([sys.executable, "-m", "edgerlhf.reproduce", "--profile", "tiny", "--root", str(tmp_path),
                          "--set", "ppo.algorithms=[ppo,rloo,grpo,dpo]", "--set", "ppo.trl_experiments=[bf16]"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "REPRODUCED" in out.stdout
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["reproduced"] and Path(comparison["run_a"]).parent.parent.parent == tmp_path / "a"
    run_dir = Path(comparison["run_a"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    seeds = {json.loads(p.read_text())["python_hash_seed"] for p in (run_dir / "records").glob("*.json")}
    assert manifest["python_hash_seed"] is not None and seeds == {manifest["python_hash_seed"]}  # kernels' hashing
    assert [n["notebook"] for n in manifest["notebooks"]] == NOTEBOOKS
    assert all((run_dir / "notebooks" / n).exists() for n in NOTEBOOKS)
    for name in NOTEBOOKS:  # quiet outputs: no warnings, no redraw floods; the stages' logs hold the rest
        assert noisy_cells(run_dir / "notebooks" / name) == [], name
    assert {p.name for p in (run_dir / "logs").glob("*.log")} == {"setup.log", "data.log", "sft.log", "reward.log",
                                                                  "ppo.log"}
    for entry in manifest["notebooks"]:  # each executed notebook also as HTML, its figures embedded
        html = Path(entry["html"]).read_text()
        assert entry["html"] == str(run_dir / "notebooks" / entry["notebook"].replace(".ipynb", ".html"))
        assert "<html" in html and ("data:image/png;base64" in html or entry["notebook"] == "00_Setup.ipynb")
    ppo = json.loads((run_dir / "records" / "ppo.json").read_text())["results"]
    arms = ["bf16", "int8", "int4", "rloo-bf16", "grpo-bf16", "dpo"]
    assert [row["reward_precision"] for row in ppo["table"]] == arms + ["placebo"]
    assert set(ppo["net_of_placebo"]) == set(arms)
    assert [row["algorithm"] for row in ppo["table"]] == ["ppo"] * 3 + ["rloo", "grpo", "dpo", "ppo"]
    for arm in ppo["experiments"].values():  # every arm ran every seed; comparisons are t intervals across them
        assert arm["seed"] == 42 and [r["seed"] for r in arm["seed_runs"]] == [43] and len(arm["after_by_seed"]) == 2
    assert {j["interval"] for a in ppo["net_of_placebo"].values() for j in a.values() if "interval" in j} == {
        "t across 2 seeds"}
    assert list(ppo["best_of_n"]["proxies"]) == ["bf16", "int8", "int8-ptq", "int4", "int4-ptq"]
    native = json.loads((run_dir / "records" / "ppo.json").read_text())["hardware"]["cpu_bf16_native"]
    assert ppo["best_of_n"]["sampling_dtype"] == ("bfloat16" if native else "float32")  # as the reward models
    assert (tmp_path / "a" / "data" / "prefs" / "train_prefs.jsonl").exists()
    # a whole run ends with its report, built from the run's real records
    report = (run_dir / "REPORT.md").read_text()
    assert "## PPO alignment" in report and "| int4 |" in report and "## Memory against" in report
    assert "### Best-of-n" in report and "| placebo |" in report and "| rloo-bf16 |" in report and "| dpo |" in report
    # the run is the current one: a notebook opened by hand afterwards (run_dir=None) joins it
    from edgerlhf.core.records import current_run

    assert current_run(tmp_path / "a" / "results") == run_dir


def test_a_failing_notebook_stops_the_run_and_names_itself(tmp_path, capsys):
    status = main(["--profile", "tiny", "--only", "01", "--root", str(tmp_path), "--no-progress",
                   "--set", "data.path=missing.jsonl"])
    assert status == 1
    err = capsys.readouterr().err
    assert "01_Data_Preparation.ipynb failed at cell" in err and "FileNotFoundError" in err
    manifest = json.loads(next(tmp_path.glob("results/runs/*/manifest.json")).read_text())
    assert manifest["status"] == "failed" and manifest["notebooks"][0]["status"] == "failed"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_the_tiny_pipeline_runs_on_a_cuda_device(tmp_path):
    # notebooks 00 -> 04 for real on the GPU, under the 8 GiB cap; every stage's record names the CUDA device
    status = main(["--profile", "tiny", "--root", str(tmp_path), "--no-progress", "--set", "run.device=cuda"])
    assert status == 0
    run_dir = next(tmp_path.glob("results/runs/*"))
    for stage in ("setup", "data", "sft", "reward", "ppo"):
        record = json.loads((run_dir / "records" / f"{stage}.json").read_text())
        assert record["hardware"]["device"].startswith("cuda"), stage
    ppo = json.loads((run_dir / "records" / "ppo.json").read_text())
    experiments = ppo["results"]["experiments"].values()
    assert all(step["peak_cuda_allocated_mib"] for e in experiments for step in e["history"])
