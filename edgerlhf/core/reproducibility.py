"""All stages (00_Setup to 04_PPO_Alignment, seeded by edgerlhf.core.stage.begin): one place that seeds every random
number generator and sets deterministic flags, and saves and restores the generators' states (PPO checkpoints)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int = 42, deterministic: bool = True) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device).

    With ``deterministic`` it also sets ``torch.backends.cudnn.deterministic = True``,
    ``torch.backends.cudnn.benchmark = False`` (research plan), asks torch for
    deterministic algorithms in warn-only mode (an op without a deterministic kernel
    warns instead of failing) and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which
    cuBLAS needs for reproducible results (PyTorch "Reproducibility" notes). Python's str hashing is fixed only
    at interpreter start (``PYTHONHASHSEED``): the runner sets it for the notebook kernels it starts.

    Args:
        seed: the seed (research plan: 42).
        deterministic: also set the deterministic flags.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states, for exact resumption, as tensors and plain
    Python values only, so a checkpoint loads with ``torch.load(..., weights_only=True)``."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by :func:`rng_state`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
