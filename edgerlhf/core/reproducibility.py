"""One place that seeds every random number generator and sets deterministic flags."""
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
    cuBLAS needs for reproducible results (PyTorch "Reproducibility" notes).

    Args:
        seed: the seed (research plan: 42).
        deterministic: also set the deterministic flags.
    """
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
