"""Nothing silently mixed or lost (issue 34): one run at a time, stage outputs replaced as a set, provenance by
hash, and failures written where they belong. Each fault leaves the previous good outputs byte-identical and a
record of the failure, or refuses before writing anything."""
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgerlhf import data_preparation as dp
from edgerlhf import reward_modeling as reward
from edgerlhf import run as runner
from edgerlhf.core.files import sha256_file
from edgerlhf.core.lock import HOLDER_FILE, TOKEN_ENV, ProjectBusyError, ProjectLock
from edgerlhf.core.provenance import ProvenanceError, sft_identity
from edgerlhf.core.records import create_run_dir, current_run, newest_records, point_current_run
from edgerlhf.core.stage import begin, recorded
from edgerlhf.ppo_alignment import run_alignment

HOLD = ("import sys, time\nfrom edgerlhf.core.lock import ProjectLock\n"
        "lock = ProjectLock(sys.argv[1], 'a test holder', sys.argv[2] if len(sys.argv) > 2 else None)\n"
        "lock.acquire()\nlock.update('run-A')\nprint('held', flush=True)\ntime.sleep(600)\n")


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def holder(tmp_path, request):
    """Start a process holding ``tmp_path/results``'s lock (as run ``run-A``, running the stage named by the test's
    ``holder_stage`` mark, if any); yields it, killed at the end."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    mark = request.node.get_closest_marker("holder_stage")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "results"), *(mark.args if mark else ())],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture(autouse=True)
def outside_any_hold(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@recorded("data")
def joins(cfg):
    """A stage that only begins: returns its run folder."""
    return begin(cfg).run_dir


# one run at a time ------------------------------------------------------------------------------------------------

def test_a_second_run_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(ProjectBusyError, match=rf"in use by run run-A \(pid {holder.pid} on .+, started 20.+, running "
                                               r"a test holder\); one run at a time"):
        ProjectLock(tmp_path / "results", "second").acquire()


def test_a_stage_on_its_own_is_refused_while_a_run_holds_the_project(tmp_path, holder, tiny_cfg):
    with pytest.raises(ProjectBusyError, match="run-A"):
        dp.prepare(tiny_cfg())
    assert not (tmp_path / "results" / "runs").exists() and not (tmp_path / "data").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    holder.kill()
    holder.wait()
    lock = ProjectLock(tmp_path / "results", "the next run")
    with caplog.at_level(logging.WARNING, logger="edgerlhf.core.lock"):
        lock.acquire()
    assert lock.held and f"taking over the project lock left by run run-A (pid {holder.pid}" in caplog.text
    lock.release()
    assert not (tmp_path / "results" / HOLDER_FILE).exists()


@pytest.mark.holder_stage("data")
def test_a_stage_killed_holding_the_lock_gets_a_failed_record_from_the_next_run(tmp_path, holder, tiny_cfg):
    killed = tmp_path / "results" / "runs" / "run-A"
    killed.mkdir(parents=True)
    holder.kill()
    holder.wait()
    joins(tiny_cfg())
    record = newest_records(killed)["data"]
    assert record["status"] == "failed" and record["results"]["error"].startswith(
        f"interrupted: process {holder.pid} on ")
    assert record["recorded_by"] == "the next run, on taking over the project lock"


def test_inside_a_hold_stages_and_child_processes_do_not_wait(tmp_path, tiny_cfg):
    with ProjectLock(tmp_path / "results", "the runner") as lock:
        assert lock.held and os.environ[TOKEN_ENV] == lock.token
        assert joins(tiny_cfg()).is_dir()  # a stage in the holding process
        child = subprocess.run([sys.executable, "-c", "import sys\nfrom edgerlhf.core.lock import ProjectLock\n"
                                "lock = ProjectLock(sys.argv[1], 'kernel')\nlock.acquire()\nprint(lock.held)",
                                str(tmp_path / "results")], capture_output=True, text=True, check=True)
        assert child.stdout.strip() == "False"  # a kernel the runner started works inside the runner's hold
        assert lock.held  # the nested stage left the runner's hold alone
    assert TOKEN_ENV not in os.environ and not (tmp_path / "results" / HOLDER_FILE).exists()


@pytest.mark.slow
def test_two_runs_started_together_leave_one_running_and_one_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    procs = [subprocess.Popen([sys.executable, "-m", "edgerlhf.run", "--profile", "tiny", "--only", "00,01", "--root",
                               str(tmp_path), "--no-progress", "--set", f"run.seed={seed}"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for seed in (42, 43)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outputs
    refused = outputs[[p.returncode for p in procs].index(1)]
    assert "edgerlhf.run: " in refused and "is in use by " in refused and "one run at a time" in refused
    runs = list((tmp_path / "results" / "runs").iterdir())
    assert len(runs) == 1 and {r["status"] for r in newest_records(runs[0]).values()} == {"ok"}
    assert json.loads((runs[0] / "manifest.json").read_text())["status"] == "ok"


# failures go where they belong ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", ["manifest ok", "manifest failed", "report", "runner dead", "manifest damaged"])
def test_a_stage_never_writes_into_a_finished_run(tmp_path, tiny_cfg, ending):
    results = tmp_path / "results"
    finished = create_run_dir(results, "tiny")
    manifest = {"status": "running" if ending == "runner dead" else ending.split()[-1], "pid": 2 ** 22 + 1,
                "host": os.uname().nodename}
    text = "{\x01" if ending == "manifest damaged" else json.dumps(manifest)
    (finished / ("REPORT.md" if ending == "report" else "manifest.json")).write_text(text)
    point_current_run(results, finished)
    before = snapshot(finished)
    run_dir = joins(tiny_cfg())
    assert run_dir != finished and current_run(results) == run_dir and snapshot(finished) == before


def test_a_stage_given_a_finished_run_folder_refuses_it(tmp_path, tiny_cfg):
    finished = create_run_dir(tmp_path / "results", "tiny")
    (finished / "manifest.json").write_text(json.dumps({"status": "ok"}))
    before = snapshot(finished)
    with pytest.raises(FileExistsError, match="is a finished run .* never written into"):
        joins(tiny_cfg(**{"run.run_dir": str(finished)}))
    assert snapshot(finished) == before


def test_a_failed_data_rerun_after_a_finished_run_goes_to_a_run_of_its_own(tmp_path, tiny_cfg):
    results = tmp_path / "results"
    finished = create_run_dir(results, "tiny")
    (finished / "manifest.json").write_text(json.dumps({"status": "ok"}))
    point_current_run(results, finished)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": 1}\n')
    with pytest.raises(Exception, match="bad.jsonl:1"):
        dp.prepare(tiny_cfg(**{"data.path": str(bad), "data.out_dir": str(tmp_path / "data" / "prefs")}))
    assert not (finished / "records").exists()
    failed = newest_records(current_run(results))["data"]
    assert failed["status"] == "failed" and failed["results"]["step"] == "read source"


def test_a_damaged_manifest_in_an_old_run_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    import papermill as pm

    old = tmp_path / "results" / "runs" / "old"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text('{"status": "running", \x01}')
    monkeypatch.setattr(pm, "execute_notebook", lambda source, output, **kw: Path(output).write_text("{}"))
    monkeypatch.setattr(runner, "export_html", lambda notebook: notebook.with_suffix(".html"))
    with caplog.at_level(logging.WARNING):
        run_dir = runner.run_notebooks("tiny", only="00", root=tmp_path, progress=False)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "ok"
    assert f"{old / 'manifest.json'}: damaged run manifest, skipped" in caplog.text


def test_a_run_that_cannot_start_leaves_no_folder_and_is_not_current(tmp_path, monkeypatch):
    previous = create_run_dir(tmp_path / "results", "tiny")
    point_current_run(tmp_path / "results", previous)

    def disk_full(run_dir, manifest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "write_manifest", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runner.run_notebooks("tiny", only="00", root=tmp_path, progress=False)
    assert list((tmp_path / "results" / "runs").iterdir()) == [previous]
    assert current_run(tmp_path / "results") == previous
    assert runner.main(["--profile", "tiny", "--only", "00", "--root", str(tmp_path), "--no-progress"]) == 1


def bad_data_flags(tmp_path: Path, tiny_cfg) -> list[str]:
    """Flags of a data stage on a file whose first row is malformed (it fails at step ``read source``)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": 1}\n')
    return ["--profile", "tiny", "--set", f"run.root={tmp_path}", "--set", f"data.path={bad}",
            "--set", f"model.models_dir={tiny_cfg().model.models_dir}", "--set", f"data.out_dir={tmp_path / 'data'}"]


def test_a_stage_cli_prints_one_line_naming_the_step_and_the_record(tmp_path, tiny_cfg, capsys):
    assert dp.main(bad_data_flags(tmp_path, tiny_cfg)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    record = newest_records(current_run(tmp_path / "results"))["data"]
    assert err.startswith("edgerlhf.data_preparation: stage data failed at step 'read source': DataFormatError: ")
    assert err.endswith(f"(traceback in {current_run(tmp_path / 'results') / 'records' / 'data.json'})")
    assert record["results"]["traceback"][0].startswith("Traceback")
    assert dp.main(["--profile", "tiny", "--set", "run.seed=-1"]) == 1  # refused before anything: no record
    assert capsys.readouterr().err.startswith("edgerlhf.data_preparation: ValueError: config (profile 'tiny'): run.seed")


def test_a_failed_record_that_cannot_be_written_is_said_beside_the_error(tmp_path, tiny_cfg, capsys, monkeypatch):
    import edgerlhf.core.stage as stage

    def disk_full(record, run_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stage, "write_record", disk_full)
    assert dp.main(bad_data_flags(tmp_path, tiny_cfg)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "failed at step 'read source': DataFormatError: " in err
    assert err.endswith("(its failed record could not be written: OSError: [Errno 28] No space left on device)")


# stage outputs replaced as a set ----------------------------------------------------------------------------------

def test_data_stage_disk_full_keeps_the_previous_set(tmp_path, tiny_cfg, monkeypatch):
    cfg = {"data.out_dir": str(tmp_path / "data" / "prefs")}
    dp.prepare(tiny_cfg(**cfg))
    before = snapshot(tmp_path / "data" / "prefs")
    real = dp.atomic_write_text

    def full_at_the_test_file(path, text, *args):
        if Path(path).name == "test_prefs.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text, *args)

    monkeypatch.setattr(dp, "atomic_write_text", full_at_the_test_file)
    with pytest.raises(OSError, match="No space left"):
        dp.prepare(tiny_cfg(**cfg, **{"run.seed": 7}))  # another split: every file would change
    assert snapshot(tmp_path / "data" / "prefs") == before
    failed = newest_records(current_run(tmp_path / "results"))["data"]
    assert failed["status"] == "failed" and failed["results"]["step"].startswith("write: staging set beside ")


def test_data_stage_with_an_unwritable_run_folder_changes_nothing(tmp_path, tiny_cfg):
    cfg = {"data.out_dir": str(tmp_path / "data" / "prefs")}
    dp.prepare(tiny_cfg(**cfg))
    before = snapshot(tmp_path / "data" / "prefs")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    (run_dir / "figures").write_text("a file where the figures folder should be")
    with pytest.raises(OSError, match=r"elsewhere/figures is not writable"):
        dp.prepare(tiny_cfg(**cfg, **{"run.seed": 7, "run.run_dir": str(run_dir)}))
    assert snapshot(tmp_path / "data" / "prefs") == before


@pytest.mark.slow  # stage 3 end to end, twice
def test_stage3_interrupted_between_two_models_keeps_the_previous_set_whole(tmp_path, tiny_cfg, tiny_sft, monkeypatch):
    def cfg(**over):
        return tiny_cfg(**{"sft.output_dir": str(tiny_sft), "reward.method": "probe",
                           "reward.precisions": ["bf16", "int8"], **over})
    reward.run_reward(cfg())
    rm_dir = tmp_path / "models" / "rm"
    before = snapshot(rm_dir)
    real, saved = reward.save_probe, []

    def interrupted_after_the_first(*args, **kwargs):
        if saved:
            raise KeyboardInterrupt
        saved.append(real(*args, **kwargs))

    monkeypatch.setattr(reward, "save_probe", interrupted_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        reward.run_reward(cfg(**{"reward.seeds": [7]}))
    assert saved and snapshot(rm_dir) == before
    failed = newest_records(current_run(tmp_path / "results"))["reward"]
    assert failed["status"] == "failed" and failed["results"]["step"].startswith("models: ")
    evaluation = json.loads((rm_dir / "evaluation.json").read_text())
    assert {e["weights_sha256"] for e in evaluation["models"].values()} >= {
        hashlib.sha256((rm_dir / "bf16" / "head.safetensors").read_bytes()).hexdigest()}
    # a mixed set, made by hand, is refused by stage 4 before it loads anything
    shutil.copy(rm_dir / "int8" / "head.safetensors", rm_dir / "bf16" / "head.safetensors")
    with pytest.raises(ProvenanceError, match=r"rm/bf16: weights sha256 .* are not the .*evaluation.json evaluated "
                                              r"for 'bf16'.*mixed"):
        run_alignment(cfg())
    assert newest_records(current_run(tmp_path / "results"))["ppo"]["results"]["step"] == "provenance"


# provenance by hash ------------------------------------------------------------------------------------------------

@pytest.mark.slow  # stages 3 and 4 end to end
def test_stage4_refuses_data_that_the_models_did_not_see(tmp_path, tiny_cfg, tiny_sft, tiny_data):
    data = tmp_path / "data" / "prefs"
    shutil.copytree(tiny_data, data)  # the same bytes the SFT model saw
    cfg = {"sft.output_dir": str(tiny_sft), "reward.method": "probe", "reward.precisions": ["bf16"],
           "data.out_dir": str(data)}
    reward.run_reward(tiny_cfg(**cfg))
    lines = (data / "test_prefs.jsonl").read_text().splitlines(keepends=True)
    (data / "test_prefs.jsonl").write_text("".join(lines[:-1]))  # edited by hand: no longer the card's file
    with pytest.raises(ValueError, match=r"test_prefs.jsonl \(sha256 .*\) is not the file .*data_card.json lists"):
        run_alignment(tiny_cfg(**cfg))
    dp.prepare(tiny_cfg(**{**cfg, "run.seed": 7}))  # a new, whole data set the models were not trained on
    with pytest.raises(ProvenanceError, match=r"SFT model .* was trained on a train_prefs.jsonl with sha256"):
        run_alignment(tiny_cfg(**cfg))


def test_sft_weights_changed_after_saving_are_refused(tmp_path, tiny_sft):
    model = tmp_path / "model"
    shutil.copytree(tiny_sft / "model", model)
    assert sft_identity(model)["sft_weights_sha256"]
    with open(model / "merged" / "model.safetensors", "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ProvenanceError, match=r"merged: weights sha256 .* differ from .*sft_info.json recorded"):
        sft_identity(model)
