"""Failed and interrupted runs leave a true trace: stage records with status "failed", runner manifests
written first and on every way out, abandoned runs marked failed, run folders never written into twice."""
import json
import os
import subprocess
import sys

import pytest

from edgerlhf import run as runner
from edgerlhf.core.config import load_config
from edgerlhf.core.records import newest_records
from edgerlhf.core.stage import begin, recorded


def cfg_for(tmp_path, **over):
    return load_config("tiny", overrides={"run.root": str(tmp_path), "run.run_dir": str(tmp_path / "run"), **over})


def test_a_stage_that_raises_writes_a_failed_record_with_the_step(tmp_path):
    @recorded("sft")
    def stage(cfg):
        ctx = begin(cfg)
        ctx.step = "train"
        raise RuntimeError("loss is nan")

    with pytest.raises(RuntimeError, match="loss is nan"):  # the error itself propagates unchanged
        stage(cfg_for(tmp_path))
    record = newest_records(tmp_path / "run")["sft"]
    assert record["status"] == "failed" and record["results"]["step"] == "train"
    assert record["results"]["error"] == "RuntimeError: loss is nan"
    assert record["wall_time_s"] is not None and record["peak_memory"]["cpu_peak_rss_mib"] > 0


def test_an_interrupted_stage_is_recorded_and_a_config_error_writes_nothing(tmp_path):
    @recorded("ppo")
    def interrupted(cfg):
        begin(cfg)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted(cfg_for(tmp_path))
    assert newest_records(tmp_path / "run")["ppo"]["results"]["error"].startswith("KeyboardInterrupt")

    @recorded("data")
    def refuses(cfg):
        raise ValueError("bad config")  # before begin(): no run folder, no record

    with pytest.raises(ValueError):
        refuses(cfg_for(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


class FakeDeadKernel(RuntimeError):
    """Stands in for nbclient's DeadKernelError (the OOM killer took the kernel)."""


def test_manifest_is_written_first_and_on_a_dead_kernel(tmp_path, monkeypatch):
    import papermill as pm

    seen = []

    def execute(source, output, **kwargs):
        seen.append(json.loads((tmp_path / "r" / "manifest.json").read_text()))  # already on disk
        raise FakeDeadKernel("Kernel died")

    monkeypatch.setattr(pm, "execute_notebook", execute)
    with pytest.raises(runner.NotebookFailed, match="00_Setup.ipynb failed: FakeDeadKernel: Kernel died"):
        runner.run_notebooks("tiny", only="00", root=tmp_path, run_dir=tmp_path / "r", progress=False)
    assert seen[0]["status"] == "running" and seen[0]["pid"] == os.getpid()
    assert seen[0]["notebooks"][0]["status"] == "running"
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["notebooks"][0]["status"] == "failed"
    assert "Kernel died" in manifest["notebooks"][0]["error"]


def test_keyboard_interrupt_is_recorded_and_re_raised(tmp_path, monkeypatch):
    import papermill as pm

    def execute(source, output, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pm, "execute_notebook", execute)
    with pytest.raises(KeyboardInterrupt):
        runner.run_notebooks("tiny", only="00", root=tmp_path, run_dir=tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["status"] == "failed"


def test_an_existing_run_folder_is_never_written_into(tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setattr(pm, "execute_notebook", lambda *a, **k: pytest.fail("must not run"))
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text('{"status": "ok"}')
    with pytest.raises(FileExistsError, match="is not empty"):
        runner.run_notebooks("tiny", only="00", root=tmp_path, run_dir=done, progress=False)
    assert (done / "manifest.json").read_text() == '{"status": "ok"}'
    assert runner.main(["--profile", "tiny", "--only", "00", "--root", str(tmp_path), "--run-dir", str(done),
                        "--no-progress"]) == 1


def test_a_runner_killed_outright_is_marked_failed_by_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    runs = tmp_path / "results" / "runs"
    for name, pid in (("killed", int(dead.stdout)), ("alive", os.getpid())):
        (runs / name).mkdir(parents=True)
        (runs / name / "manifest.json").write_text(json.dumps(
            {"status": "running", "pid": pid, "host": runner.socket.gethostname(),
             "notebooks": [{"notebook": "00_Setup.ipynb", "status": "running"}]}))
    assert runner.mark_abandoned(tmp_path / "results") == [runs / "killed" / "manifest.json"]
    killed = json.loads((runs / "killed" / "manifest.json").read_text())
    assert killed["status"] == "failed" and "interrupted" in killed["error"]
    assert killed["notebooks"][0]["status"] == "failed"
    assert json.loads((runs / "alive" / "manifest.json").read_text())["status"] == "running"
