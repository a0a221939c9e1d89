import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgerlhf.core.config import load_config
from edgerlhf.core.files import atomic_write_text
from edgerlhf.core.memory import apply_vram_budget, measure
from edgerlhf.core.records import create_run_dir, load_records, make_record, read_record, write_record
from edgerlhf.core.reproducibility import seed_everything


def test_record_has_the_plan_shape_and_never_overwrites(tmp_path):
    run_dir = create_run_dir(tmp_path / "results", "tiny")
    cfg = load_config("tiny").to_dict()
    rec = make_record("data", run_dir, cfg, {"n": 1}, measurement={"wall_time_s": 2.5, "cpu_peak_rss_mib": 10.0})
    for key in ("experiment_id", "date", "model_config", "training_config", "results", "hardware", "software",
                "data", "seed", "wall_time_s", "peak_memory"):
        assert key in rec
    assert rec["wall_time_s"] == 2.5 and rec["peak_memory"] == {"cpu_peak_rss_mib": 10.0}
    assert rec["software"]["torch"] == torch.__version__
    first = write_record(rec, run_dir)
    second = write_record({**rec, "results": {"n": 2}}, run_dir)
    assert first.name == "data.json" and second.name == "data.2.json"
    assert read_record(first)["results"] == {"n": 1}  # the first record is untouched
    table = load_records(run_dir)
    assert list(table["results.n"]) == [1, 2]
    assert "hardware.device" in table.columns


def test_run_dirs_are_unique(tmp_path):
    a = create_run_dir(tmp_path, "tiny")
    b = create_run_dir(tmp_path, "tiny")
    assert a != b and a.exists() and b.exists()


def test_read_record_errors_name_the_file(tmp_path):
    bad = tmp_path / "records" / "x.json"
    bad.parent.mkdir()
    bad.write_text("{\n oops")
    with pytest.raises(ValueError, match="x.json: line 2"):
        read_record(bad)
    bad.write_text(json.dumps({"stage": "x"}))
    with pytest.raises(ValueError, match="no field 'results'"):
        read_record(bad)


def test_atomic_write_leaves_no_temp_and_respects_overwrite(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "one")
    with pytest.raises(FileExistsError):
        atomic_write_text(path, "two", overwrite=False)
    assert path.read_text() == "one"
    atomic_write_text(path, "three")
    assert path.read_text() == "three"
    assert os.listdir(tmp_path) == ["a.txt"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's 0600


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    from edgerlhf.core.files import atomic_path
    from edgerlhf.core.plots import save
    from matplotlib.figure import Figure

    path = atomic_write_text(tmp_path / "fig.png", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["fig.png"]
    fig = Figure()
    fig.subplots().plot([0, 1])
    save(fig, path)
    assert path.read_bytes()[:4] == b"\x89PNG" and os.listdir(tmp_path) == ["fig.png"]


@pytest.mark.parametrize("atomic", [True, False])
def test_swap_in_dir_never_loses_the_last_good_folder(tmp_path, monkeypatch, atomic):
    from edgerlhf.core import files

    if not atomic:  # a platform without renameat2(RENAME_EXCHANGE): two renames
        monkeypatch.setattr(files, "exchange", lambda a, b: False)
    target = tmp_path / "model"

    def staged(text):
        folder = tmp_path / ".staging"
        folder.mkdir()
        (folder / "w").write_text(text)
        return folder

    files.swap_in_dir(staged("one"), target)
    files.swap_in_dir(staged("two"), target)
    assert (target / "w").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["model"]
    # a swap interrupted between its two renames: only .old-model is left, then the next swap comes
    target.rename(tmp_path / ".old-model")
    staging = staged("three")
    real_rename = Path.rename
    calls = []

    def rename(self, dest):
        calls.append((Path(self).name, Path(dest).name))
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    files.swap_in_dir(staging, target)
    assert calls[0] == (".old-model", "model")  # the last good folder is restored first
    assert (target / "w").read_text() == "three" and sorted(os.listdir(tmp_path)) == ["model"]


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(123)
    a = draw()
    seed_everything(123)
    assert draw() == a
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled()


_MEASURE_SCRIPT = """
import json, torch
from edgerlhf.core.memory import measure
with measure("cpu") as small:
    torch.ones(10)
with measure("cpu") as large:
    x = torch.ones(64 * 2**20)  # 256 MiB of float32
    x += 1
del x
with measure("cpu") as outer:
    with measure("cpu") as inner:
        x = torch.ones(64 * 2**20)
        x += 1
    del x
    with measure("cpu") as second:  # an equal-looking sibling must not confuse the bookkeeping
        pass
print(json.dumps({"small": small, "large": large, "outer": outer, "inner": inner, "second": second}))
"""


def test_measure_sees_large_allocations_also_when_nested():
    # A fresh process: in a long pytest process, memory freed by earlier tests can stay
    # resident and absorb the allocation, so the test would depend on test order.
    out = subprocess.run([sys.executable, "-c", _MEASURE_SCRIPT], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = stats["small"], stats["large"]
    assert large["cpu_peak_rss_mib"] - small["cpu_peak_rss_mib"] > 200
    assert large["cpu_peak_increase_mib"] > 200
    assert large["wall_time_s"] > 0 and large["cuda_peak_allocated_mib"] is None
    # nested blocks: an inner block's reset does not hide its peak from the enclosing block
    outer, inner, second = stats["outer"], stats["inner"], stats["second"]
    assert outer["cpu_peak_rss_mib"] >= inner["cpu_peak_rss_mib"]
    if second["cpu_peak_scope"] == "block":  # the kernel reset the peak: the sibling's is its own
        assert inner["cpu_peak_rss_mib"] > second["cpu_peak_rss_mib"] + 200
    else:  # no reset: every peak is the process's, so it cannot be below an earlier one
        assert second["cpu_peak_rss_mib"] >= inner["cpu_peak_rss_mib"]


def test_vram_budget_is_recorded_as_not_applied_on_cpu():
    assert apply_vram_budget(8, "cpu") == {"budget_gib": 8, "applied": False, "fraction": None,
                                           "device_total_mib": None}
    with pytest.raises(ValueError):
        apply_vram_budget(0, "cpu")


def test_oom_backoff_halves_micro_batch_and_keeps_the_effective_batch():
    from edgerlhf.core.memory import halve_on_oom

    calls = []

    def step(micro_batch, accumulation):
        calls.append((micro_batch, accumulation))
        if micro_batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return micro_batch * accumulation

    result, backoffs = halve_on_oom(step, 8, 4, log=lambda msg: None)
    assert calls == [(8, 4), (4, 8), (2, 16)] and result == 32
    assert [b["micro_batch"] for b in backoffs] == [8, 4] and "simulated" in backoffs[0]["error"]
    with pytest.raises(torch.OutOfMemoryError):
        halve_on_oom(step, 8, 4, max_backoffs=1, log=lambda msg: None)
    with pytest.raises(torch.OutOfMemoryError):  # 3 cannot be halved without changing the effective batch
        halve_on_oom(step, 3, 1, log=lambda msg: None)


def test_vram_budget_sets_the_fraction_of_a_mocked_card(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: type("Props", (), {"total_memory": 24 * 2**30})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, dev: calls.append((f, str(dev))))
    out = apply_vram_budget(8, "cuda:0")  # a 24 GiB card behaves like an 8 GiB one
    assert calls == [(pytest.approx(1 / 3), "cuda:0")]
    assert out == {"budget_gib": 8, "applied": True, "fraction": pytest.approx(1 / 3), "device_total_mib": 24576}
    calls.clear()
    assert apply_vram_budget(12, "cuda:0")["fraction"] == pytest.approx(0.5)
    assert apply_vram_budget(None, "cuda:0")["applied"] is False and calls == [(pytest.approx(0.5), "cuda:0")]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: type("Props", (), {"total_memory": 6 * 2**30})())
    assert apply_vram_budget(8, "cuda:0")["fraction"] == 1.0  # a smaller card is not capped above its size


def test_vram_budget_accepts_a_cuda_device_without_an_index(monkeypatch):
    # torch.device("cuda") (what "auto" resolves to) has no index; set_per_process_memory_fraction needs one
    from torch.cuda._utils import _get_device_index

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: type("Props", (), {"total_memory": 16 * 2**30})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, dev: calls.append((f, _get_device_index(dev))))  # raises for a bare "cuda"
    out = apply_vram_budget(8, torch.device("cuda"))
    assert calls == [(0.5, 0)] and out["applied"] is True


def test_measure_reads_the_peaks_of_a_mocked_cuda_device_in_mib(monkeypatch):
    # the CUDA branch of measure(), on a CPU-only machine: a bare "cuda" device (what "auto" resolves to), peaks
    # reset on entry, read in MiB on exit, and an inner block's peak folded into the enclosing one
    seen, counters = [], {"allocated": 0, "reserved": 0}

    def device_call(name, value=None):
        def call(dev=None):
            seen.append((name, str(dev)))
            if name == "reset":
                counters.update(allocated=0, reserved=0)
            return value if value is None else counters[value]
        return call

    monkeypatch.setattr(torch.cuda, "synchronize", device_call("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", device_call("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", device_call("allocated", "allocated"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", device_call("reserved", "reserved"))
    with measure(torch.device("cuda")) as outer:
        counters.update(allocated=300 * 2**20, reserved=512 * 2**20)
        with measure("cuda") as inner:
            counters.update(allocated=700 * 2**20, reserved=1024 * 2**20)
        counters.update(allocated=100 * 2**20, reserved=128 * 2**20)  # the inner reset hid the earlier peak
    assert inner["cuda_peak_allocated_mib"] == 700 and inner["cuda_peak_reserved_mib"] == 1024
    assert outer["cuda_peak_allocated_mib"] == 700 and outer["cuda_peak_reserved_mib"] == 1024
    assert outer["device"] == "cuda" and {d for _, d in seen} == {"cuda"}
    assert ("reset", "cuda") in seen and ("synchronize", "cuda") in seen


def test_a_driver_that_torch_cannot_use_is_named_in_the_recommendation():
    from edgerlhf.core.hardware import recommend

    cpu_build = {"vram_total_mib": None, "driver_version": "575.51.03", "cuda_version": None}
    out = recommend(cpu_build)
    assert out["profile"] == "quick"
    assert "NVIDIA driver (575.51.03) is present but this torch cannot use CUDA (its build: CPU only" in out["reason"]
    assert "EDGERLHF_TORCH" in out["reason"]
    assert "its build: CUDA 13.0" in recommend({**cpu_build, "cuda_version": "13.0"})["reason"]
    assert recommend({**cpu_build, "driver_version": None})["reason"] == "no CUDA device: CPU-sized profile"
    assert recommend({**cpu_build, "vram_total_mib": 8192})["profile"] == "full"


def test_notebooks_run_by_hand_share_the_current_run(tmp_path):
    # 00_Setup starts a run and makes it current; stages 01-04 with run_dir=None join it, as under papermill
    import shutil

    from edgerlhf.core import stage
    from edgerlhf.core.config import load_config
    from edgerlhf.core.records import CURRENT_RUN, current_run

    def cfg(**over):
        return load_config("tiny", overrides={"run.root": str(tmp_path), **over})

    results = tmp_path / "results"
    try:
        assert current_run(results) is None
        assert stage.begin(cfg()).run_dir == current_run(results)  # no current run yet: a new one, made current
        first = stage.begin(cfg(), starts_run=True).run_dir  # 00_Setup
        assert current_run(results) == first and stage.begin(cfg()).run_dir == first
        second = stage.begin(cfg(), starts_run=True).run_dir
        assert second != first and stage.begin(cfg()).run_dir == second
        elsewhere = tmp_path / "elsewhere"
        assert stage.begin(cfg(**{"run.run_dir": str(elsewhere)})).run_dir == elsewhere  # explicit wins ...
        assert current_run(results) == second  # ... and does not move the pointer
        shutil.rmtree(second)
        with pytest.raises(ValueError, match="which does not exist; run 00_Setup.ipynb"):
            stage.begin(cfg())
        (results / CURRENT_RUN).write_text("{not json")
        with pytest.raises(ValueError, match="not a run pointer"):
            stage.begin(cfg())
    finally:
        stage._BEGUN.clear()
