"""Stage 0 (00_Setup), stage 4 and every record: Detect the compute device and recommend a profile and batch settings
for it."""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import psutil
import torch

from .memory import MIB

GIB = 1024**3


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``"auto"`` into a CUDA device when a GPU is visible, else ``cpu``; a CUDA device always comes back
    with its index (``cuda:N``).

    ``"cuda"`` without an index names no card, and several CUDA calls refuse it
    (``torch.cuda.set_per_process_memory_fraction``: "Expected a torch.device with a specified index"), so it
    becomes this process's card: ``LOCAL_RANK`` under ``accelerate launch``/``torchrun`` (one card per
    process), else ``torch.cuda.current_device()``.

    Raises:
        RuntimeError: a CUDA device was asked for but none is available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device (torch {torch.__version__})")
    if dev.index is None:
        local_rank = os.environ.get("LOCAL_RANK")
        dev = torch.device("cuda", int(local_rank) if local_rank is not None else torch.cuda.current_device())
    return dev


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_bf16_native() -> bool:
    """True when this CPU multiplies bf16 in hardware (Intel AMX tiles or AVX512-BF16, as torch detects them)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def hardware_report(device: str = "auto", disk_path: str | os.PathLike = ".") -> dict:
    """Describe the machine: device, GPU name, VRAM (MiB), driver, CUDA, CPU (and whether it multiplies bf16
    natively: AMX or AVX512-BF16), RAM (MiB), free disk (MiB).

    GPU fields are None on a CPU-only machine.
    """
    dev = resolve_device(device)
    report = {
        "device": str(dev),
        "gpu_name": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "vram_total_mib": None,
        "cuda_version": torch.version.cuda,
        "driver_version": _nvidia_driver(),  # also when torch cannot use CUDA: recommend() says so
        "bf16_supported": False,
        "cpu": _cpu_name(),
        "cpu_bf16_native": cpu_bf16_native(),
        "cpu_count": os.cpu_count(),
        "ram_total_mib": round(psutil.virtual_memory().total / MIB),
        "disk_free_mib": round(shutil.disk_usage(disk_path).free / MIB),
        "platform": platform.platform(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        report.update(
            gpu_name=props.name,
            vram_total_mib=round(props.total_memory / MIB),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return report


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``/proc/driver/nvidia/version`` (None if absent)."""
    path = Path("/proc/driver/nvidia/version")
    if not path.exists():
        return None
    first = path.read_text(errors="replace").splitlines()[0]
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else first.strip()


def recommend(report: dict) -> dict:
    """Recommend a profile and batch settings for the memory in ``report``.

    Rules: a GPU with at least 7.5 GiB (an "8 GB" card shows ~7.6-8.0 GiB) gets the
    ``full`` profile with the research plan's batches; a smaller GPU gets ``full`` with
    halved micro-batches and doubled accumulation (same effective batch); a CPU gets
    ``quick``, and when an NVIDIA driver is present (``driver_version``) the reason says that torch cannot
    use it and how to install a CUDA build, rather than recommending the CPU profile silently.
    Returns ``{"profile", "reason", "overrides"}``.
    """
    vram = report.get("vram_total_mib")
    if vram is None and report.get("driver_version"):
        build = f"CUDA {report['cuda_version']}" if report.get("cuda_version") else "CPU only"
        return {"profile": "quick", "overrides": {}, "reason": (
            f"an NVIDIA driver ({report['driver_version']}) is present but this torch cannot use CUDA (its build: "
            f"{build}; a CUDA 13 build needs driver >= 580). Install a CUDA build that matches the driver "
            "(README, 'Choosing the torch build': EDGERLHF_TORCH=... bash scripts/setup.sh) to use the GPU; "
            "until then the CPU-sized profile")}
    if vram is None:
        return {"profile": "quick", "reason": "no CUDA device: CPU-sized profile", "overrides": {}}
    if vram >= 7.5 * 1024:
        return {"profile": "full", "reason": f"GPU with {vram} MiB >= 7.5 GiB", "overrides": {}}
    return {
        "profile": "full",
        "reason": f"GPU with {vram} MiB < 7.5 GiB: micro-batches halved, accumulation doubled",
        "overrides": {
            "sft.per_device_train_batch_size": 4,
            "sft.gradient_accumulation_steps": 8,
            "reward.per_device_train_batch_size": 2,
            "reward.gradient_accumulation_steps": 8,
            "ppo.micro_batch_size": 1,
            "ppo.gradient_accumulation_steps": 8,
        },
    }
