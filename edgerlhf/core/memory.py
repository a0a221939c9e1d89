"""All stages (00_Setup to 04_PPO_Alignment): memory: the VRAM budget, a context manager that measures peaks and
wall time, and glibc heap tuning (returning freed memory to the OS) for PPO's passes on a CPU."""
from __future__ import annotations

import ctypes
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import torch

MIB = 1024**2
GIB = 1024**3
logger = logging.getLogger(__name__)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def apply_vram_budget(gib: float | None = 8.0, device: torch.device | str | None = None) -> dict:
    """Cap this process's CUDA memory at ``gib`` GiB so any card behaves like an 8 GB one.

    Uses ``torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)``; the
    caching allocator then raises ``torch.OutOfMemoryError`` past the cap. Returns a dict
    for the run record: ``{"budget_gib", "applied", "fraction", "device_total_mib"}``.
    On CPU (or with ``gib=None``) nothing is capped and ``applied`` is False.

    Raises:
        ValueError: ``gib`` is not positive.
    """
    if gib is not None and gib <= 0:
        raise ValueError(f"vram budget must be positive GiB, got {gib}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if gib is None or dev.type != "cuda":
        return {"budget_gib": gib, "applied": False, "fraction": None, "device_total_mib": None}
    if dev.index is None:  # torch.device("cuda") names no card, and the per-process cap needs one
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    return {"budget_gib": gib, "applied": True, "fraction": fraction, "device_total_mib": round(total / MIB)}


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; False where not possible."""
    if not _CLEAR_REFS.exists():
        return False
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    # Some sandboxed kernels accept the write and ignore it: trust the reset only if it took.
    return _rss_peak_mib() <= psutil.Process().memory_info().rss / MIB + 64


def _rss_peak_mib() -> float:
    """Peak resident set size of this process in MiB (VmHWM; psutil's RSS where /proc is absent)."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return psutil.Process().memory_info().rss / MIB


_ACTIVE: list[dict] = []  # measurements in progress, outermost first


def _fold_peaks(on_cuda: bool, dev: torch.device) -> None:
    """Before a reset, carry the current peaks into every enclosing measurement."""
    rss = _rss_peak_mib()
    cuda = (torch.cuda.max_memory_allocated(dev) / MIB, torch.cuda.max_memory_reserved(dev) / MIB) if on_cuda else None
    for outer in _ACTIVE:
        outer["_rss"] = max(outer["_rss"], rss)
        if cuda:
            outer["_alloc"], outer["_reserved"] = max(outer["_alloc"], cuda[0]), max(outer["_reserved"], cuda[1])


@contextmanager
def measure(device: torch.device | str | None = None) -> Iterator[dict]:
    """Measure wall time and peak memory of the ``with`` block; yields a dict filled on exit.

    Keys (MiB or seconds): ``wall_time_s``, ``cpu_peak_rss_mib`` (process peak resident
    memory inside the block when ``cpu_peak_scope == "block"``, else since process start),
    ``cpu_rss_start_mib`` and ``cpu_peak_increase_mib`` (the peak above the memory the process
    already held on entry: what the block itself needed),
    ``cuda_peak_allocated_mib`` and ``cuda_peak_reserved_mib`` (None without CUDA), and
    ``device``. Peaks are reset on entry; measurements may be nested (an inner block's
    reset does not hide its peak from the enclosing block).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stats: dict = {"device": str(dev), "_rss": 0.0, "_alloc": 0.0, "_reserved": 0.0}
    on_cuda = dev.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(dev)
    _fold_peaks(on_cuda, dev)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    scope = "block" if _reset_rss_peak() else "process"
    rss_start = psutil.Process().memory_info().rss / MIB
    _ACTIVE.append(stats)
    start = time.perf_counter()
    try:
        yield stats
    finally:
        if on_cuda:
            torch.cuda.synchronize(dev)
        del _ACTIVE[next(i for i, active in enumerate(_ACTIVE) if active is stats)]  # by identity
        stats["wall_time_s"] = time.perf_counter() - start
        stats["cpu_peak_rss_mib"] = max(_rss_peak_mib(), stats.pop("_rss"))
        stats["cpu_peak_scope"] = scope
        stats["cpu_rss_start_mib"] = rss_start
        stats["cpu_peak_increase_mib"] = stats["cpu_peak_rss_mib"] - rss_start
        alloc, reserved = stats.pop("_alloc"), stats.pop("_reserved")
        stats["cuda_peak_allocated_mib"] = max(torch.cuda.max_memory_allocated(dev) / MIB, alloc) if on_cuda else None
        stats["cuda_peak_reserved_mib"] = max(torch.cuda.max_memory_reserved(dev) / MIB, reserved) if on_cuda else None
        for outer in _ACTIVE:  # an enclosing block's peak includes this one's
            outer["_rss"] = max(outer["_rss"], stats["cpu_peak_rss_mib"])
            if on_cuda:
                outer["_alloc"] = max(outer["_alloc"], stats["cuda_peak_allocated_mib"])
                outer["_reserved"] = max(outer["_reserved"], stats["cuda_peak_reserved_mib"])



def free_memory() -> None:
    """Collect garbage, return cached CUDA blocks to the driver, and return the C heap's free pages to the
    operating system (glibc ``malloc_trim(0)``; absent elsewhere, e.g. musl or macOS, where it is skipped).

    Without the trim, a process keeps the pages of a freed peak resident (docs/measurements.md).
    """
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> bool:
    """Return the free pages of the C heap to the operating system (glibc ``malloc_trim(0)``, which also releases
    free pages between live blocks, not only at the heap's top); no garbage collection. Tensors of a few MiB freed
    after a phase (PPO's KV cache, activations) otherwise stay resident as heap fragments under the next phase's
    peak. Returns False where glibc's ``malloc_trim`` is absent (musl, macOS, Windows), nothing done.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc():
    """The C library when it is glibc (has ``mallopt`` and ``malloc_trim``), else None (musl, macOS, Windows)."""
    libc = ctypes.CDLL(None) if os.name == "posix" else None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


#: glibc ``mallopt`` parameters (malloc.h), and the ceiling of glibc's own dynamic mmap threshold (64-bit).
_M_TOP_PAD, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX = -2, -3, 32 * MIB


@contextmanager
def returning_freed_memory(mmap_threshold_mib: float = 1.0, top_pad_mib: float = 64.0) -> Iterator[bool]:
    """Inside the block, glibc's allocator gives the memory of freed large tensors back to the operating system.

    Allocations of at least ``mmap_threshold_mib`` are served by ``mmap`` and unmapped when freed; by default
    glibc raises that threshold up to 32 MiB as mapped blocks are freed, after which activations and logits come
    from the heap and stay resident as fragments between passes; on exit the heap's free pages go back too
    (:func:`trim_heap`). ``top_pad_mib`` of slack at the heap's top keeps
    it from being trimmed and regrown at every allocation. On exit the threshold is 32 MiB (where glibc's own
    would have settled), so many mid-sized allocations, such as generation's growing KV cache, come from the heap
    again: mapping each of them costs page faults. Used around PPO's forward and update passes
    (:func:`edgerlhf.core.ppo.ppo_step`) and the folded adapter's weight copies
    (:func:`edgerlhf.core.rollout.merged_adapter`); process-wide while the block runs.

    A trade of speed for memory: lower peak RSS on a CPU, slower passes (more page faults; docs/measurements.md).
    Yields True when set; False where glibc's ``mallopt`` is absent (musl, macOS, Windows), nothing changed.
    """
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(_M_TOP_PAD, int(top_pad_mib * MIB))
    libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_mib * MIB))
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        trim_heap()


def available_device_mib(device: torch.device | str, budget_gib: float | None) -> float | None:
    """Device memory this process may still plan with, in MiB, measured now: the smaller of the cap
    (``budget_gib``; None: no cap) and what the card has (``torch.cuda.mem_get_info``'s free memory plus what
    this process's caching allocator already reserves, since the planner counts this process's own weights).
    Memory other processes hold is thus left out. None on a CPU, where nothing is planned.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    free, _ = torch.cuda.mem_get_info(dev)
    card = (free + torch.cuda.memory_reserved(dev)) / MIB
    return card if budget_gib is None else min(card, budget_gib * GIB / MIB)


def halve_on_oom(run, micro_batch: int, accumulation: int, max_backoffs: int = 3, log=None):
    """Call ``run(micro_batch, accumulation)``; on ``torch.OutOfMemoryError`` halve the micro-batch,
    double the accumulation (the effective batch ``micro_batch * accumulation`` is unchanged), free
    memory and call again, at most ``max_backoffs`` times.

    Returns:
        ``(result, backoffs)``; ``backoffs`` lists ``{"micro_batch", "accumulation", "error"}`` of every
        failed attempt, for the run record. Each back-off is reported through ``log(message)`` (None:
        this module's logger, at WARNING).
    Raises:
        torch.OutOfMemoryError: still out of memory after ``max_backoffs`` back-offs, or the micro-batch
            cannot be halved exactly (odd, or 1) - the effective batch is never changed silently.
    """
    backoffs: list[dict] = []
    while True:
        try:
            return run(micro_batch, accumulation), backoffs
        except torch.OutOfMemoryError as exc:
            if len(backoffs) >= max_backoffs or micro_batch % 2:
                raise
            backoffs.append({"micro_batch": micro_batch, "accumulation": accumulation, "error": str(exc)[:300]})
            free_memory()
            micro_batch, accumulation = micro_batch // 2, accumulation * 2
            (log or logger.warning)(f"out of memory: retrying with micro-batch {micro_batch} x accumulation "
                                    f"{accumulation}")
