"""The runner and every stage run on its own: One run at a time per project folder: a lock on
``results/.edgerlhf.lock`` (``filelock``, an OS-level lock that ends with its process) held by the runner and by every
stage run on its own.

The holder writes who it is (run id, pid, host, start time, what it runs) to ``results/.edgerlhf.lock.json`` and
puts a token in the environment variable :data:`TOKEN_ENV`, which the processes it starts inherit: the notebook
kernels the runner starts under papermill, and stage functions called inside a holding process, work inside its
hold instead of waiting for it. A holder file left behind means its process died without releasing (SIGKILL, the
OOM killer); the next holder takes over and warns.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import uuid
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from .files import atomic_write_text

LOCK_FILE = ".edgerlhf.lock"
HOLDER_FILE = ".edgerlhf.lock.json"
#: Environment variable naming the hold a process works inside (set by the holder, inherited by its children).
TOKEN_ENV = "EDGERLHF_LOCK_TOKEN"

log = logging.getLogger(__name__)


class ProjectBusyError(RuntimeError):
    """Another run holds the project folder; the message names it (run id, pid, host, start time)."""


def read_holder(results_dir: str | Path) -> dict | None:
    """The holder record under ``results_dir`` (None when there is none, or it is not readable JSON)."""
    path = Path(results_dir) / HOLDER_FILE
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"damaged": str(path)}
    return holder if isinstance(holder, dict) else {"damaged": str(path)}


def pid_alive(pid) -> bool:
    """True when a process ``pid`` exists on this machine (``psutil.pid_exists``); False for a non-positive or
    non-int pid."""
    return isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and psutil.pid_exists(pid)


def describe(holder: dict | None) -> str:
    """``run R (pid P on H, started T, running W)`` for a holder record."""
    if not holder:
        return "an unknown process (no holder record)"
    if "damaged" in holder:
        return f"an unknown process (holder record {holder['damaged']} is damaged)"
    name = f"run {holder['run_id']}" if holder.get("run_id") else "a run still starting"
    return (f"{name} (pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, running "
            f"{holder.get('what')})")


class ProjectLock:
    """The project folder's lock. ``acquire`` refuses at once when another process holds it; inside a hold
    (:data:`TOKEN_ENV` names the current holder) it is a no-op, so the runner's notebooks and nested stage calls
    do not wait for their own runner.

    Args:
        results_dir: the project's ``results/`` folder (created if missing).
        what: what the holder runs (``"edgerlhf.run --profile quick"``, ``"stage data"``), for the message
            another run gets.
        stage: the stage the holder runs on its own (None for the runner), so that a later holder can record
            its failure if it dies holding the lock (:attr:`abandoned`).
    """

    def __init__(self, results_dir: str | Path, what: str, stage: str | None = None):
        self.results_dir = Path(results_dir)
        self.what, self.stage = what, stage
        self.lock: FileLock | None = None
        self.token: str | None = None
        self.outer_token: str | None = None
        #: The holder record a dead process left, when :meth:`acquire` took its lock over (else None).
        self.abandoned: dict | None = None

    @property
    def held(self) -> bool:
        """True when this object took the lock (False inside another holder's hold or before ``acquire``)."""
        return self.lock is not None and self.lock.is_locked

    def acquire(self) -> None:
        """Take the lock, or join the hold this process works inside.

        Raises:
            ProjectBusyError: another process holds it; nothing is written.
        """
        self.results_dir.mkdir(parents=True, exist_ok=True)
        holder = read_holder(self.results_dir)
        inherited = os.environ.get(TOKEN_ENV)
        if inherited and holder and holder.get("token") == inherited and pid_alive(holder.get("pid")):
            return  # inside the runner's (or an enclosing stage's) hold
        lock = FileLock(self.results_dir / LOCK_FILE)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            raise ProjectBusyError(
                f"{self.results_dir.parent} is in use by {describe(read_holder(self.results_dir))}; one run at a "
                "time per project folder: wait for it to end, or use another --root") from None
        if holder:  # the lock was free, yet a holder record is left: its process died holding it
            log.warning("taking over the project lock left by %s, which ended without releasing it", describe(holder))
            self.abandoned = holder
        self.lock, self.token, self.outer_token = lock, uuid.uuid4().hex, inherited
        self.update()
        os.environ[TOKEN_ENV] = self.token

    def update(self, run_id: str | None = None) -> None:
        """(Re)write the holder record; ``run_id`` once the run folder is known. A no-op when not held."""
        if not self.held:
            return
        old = read_holder(self.results_dir) or {}
        started = old.get("started") if old.get("token") == self.token else None
        holder = {"run_id": run_id or (old.get("run_id") if old.get("token") == self.token else None),
                  "pid": os.getpid(), "host": socket.gethostname(),
                  "started": started or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "what": self.what, "stage": self.stage, "token": self.token}
        atomic_write_text(self.results_dir / HOLDER_FILE, json.dumps(holder, indent=2) + "\n")

    def release(self) -> None:
        """Remove the holder record and release the lock (a no-op when not held)."""
        if not self.held:
            return
        (self.results_dir / HOLDER_FILE).unlink(missing_ok=True)
        if self.outer_token is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = self.outer_token
        self.lock.release()
        self.lock = None

    def __enter__(self) -> "ProjectLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
