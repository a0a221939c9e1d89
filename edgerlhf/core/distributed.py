"""Stages 2-4 under ``accelerate launch``: which of several processes writes, and what the record says about
them.

A stage launched as ``accelerate launch --multi_gpu --num_processes N -m edgerlhf.sft_finetuning`` runs once per
process; the library trainers (TRL's ``SFTTrainer`` and ``RewardTrainer``) shard the batches across the processes and
average the gradients (DDP: NCCL on GPUs, gloo on CPUs), and PPO shares its rollouts and sums its gradients itself
(:func:`edgerlhf.core.ppo.ppo_step`, :func:`edgerlhf.core.ppo.ppo_update`). Everything that writes a file (models, figures,
``evaluation.json``, the run record, the current-run pointer) runs on the main process only, through
:func:`main_process_writes`; the other processes wait and receive its result. With one process (a notebook,
``python -m``) every function here is a plain call.

The process group is accelerate's (``accelerate.PartialState``), the same one the trainers use.
"""
from __future__ import annotations

from typing import Any, Callable

from accelerate import PartialState


def process_state() -> PartialState:
    """accelerate's process state (a singleton; it joins the process group ``accelerate launch`` set up). Without
    CUDA it is asked for CPU processes (gloo): a plain ``PartialState()`` there sees one process until a trainer
    sets the group up, so each process would think it writes alone."""
    import torch

    return PartialState(cpu=not torch.cuda.is_available())


def process_info() -> dict:
    """``{"num_processes", "process_index", "local_process_index", "distributed_type", "backend"}`` of this
    process, for the run record (``backend`` None with one process)."""
    state = process_state()
    return {"num_processes": state.num_processes, "process_index": state.process_index,
            "local_process_index": state.local_process_index, "distributed_type": str(state.distributed_type),
            "backend": state.backend if state.num_processes > 1 else None}


def is_main_process() -> bool:
    """True on the process that writes (rank 0), and always with one process."""
    return process_state().is_main_process


def main_process_writes(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call ``fn(*args, **kwargs)`` on the main process only, then wait for every process; every process
    returns the main process's result (broadcast with ``accelerate.utils.broadcast_object_list``, so it must
    pickle).

    Raises:
        Exception: whatever ``fn`` raised on the main process, raised on every process (the original on the
            main process, a copy on the others), so no process waits for a result that will not come.
    """
    state = process_state()
    if state.num_processes == 1:
        return fn(*args, **kwargs)
    from accelerate.utils import broadcast_object_list

    failure = None
    box = [None]
    if state.is_main_process:
        try:
            box = [("ok", fn(*args, **kwargs))]
        except Exception as exc:  # re-raised below, on every process
            failure, box = exc, [("error", exc)]
    state.wait_for_everyone()
    outcome, value = broadcast_object_list(box, from_process=0)[0]
    if outcome == "error":
        raise failure if failure is not None else value
    return value
