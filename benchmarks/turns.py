"""Turn-taking between two benchmark processes, so that their timed steps alternate on one machine.

A VM's speed drifts by 10-20% within minutes (``results/benchmarks/*-forced64-amd-prefix*.json``: the same code
took 51.1 and 57.4 s per step a quarter of an hour apart), so two implementations timed one after the other can
differ by the drift alone. With turns, step i of one runs right before step i of the other and the two can be
compared pair by pair (``benchmarks/paired_ppo_steps.py``). Standard library only: the TRL 0.11.4 script, in a venv
of its own, imports it too.
"""
from __future__ import annotations

import time
from pathlib import Path


class Turns:
    """Wait for this process's turn and hand it on, through token files in a shared folder.

    ``Turns(folder, me, other)``: :meth:`wait` blocks until the file ``folder/me`` exists and removes it;
    :meth:`pass_on` creates ``folder/other``. With ``folder`` None both do nothing (a benchmark run alone).
    """

    def __init__(self, folder: str | None, me: str, other: str, poll_s: float = 0.05):
        self.folder = Path(folder) if folder else None
        self.me, self.other, self.poll_s = me, other, poll_s

    def wait(self, timeout_s: float = 3600.0) -> None:
        """Block until it is this process's turn (polling every ``poll_s`` seconds, no CPU to speak of).

        Raises:
            TimeoutError: no turn came within ``timeout_s`` seconds (the other process died).
        """
        if self.folder is None:
            return
        token, deadline = self.folder / self.me, time.monotonic() + timeout_s
        while not token.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no turn for {self.me!r} in {self.folder} after {timeout_s:.0f} s")
            time.sleep(self.poll_s)
        token.unlink()

    def pass_on(self) -> None:
        """Give the turn to the other process."""
        if self.folder is not None:
            (self.folder / self.other).touch()
