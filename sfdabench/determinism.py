"""Seeds and deterministic kernels: the same config, seed and thread count give bit-identical weights.

What is and is not reproducible (measured, see README "Determinism"):
- same machine, same ``num_threads``: bit-identical source weights, adapted weights and rows;
- another thread count: CPU reductions are split differently, so float sums differ in the last bits and a
  long training under domain shift can amplify them. Rows record ``train_threads`` for that reason.
Data loaders run in the main process (``num_workers=0``), so there are no worker processes to seed.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels(enabled: bool = True) -> None:
    """Deterministic algorithms where torch has them (CPU already is; this matters on CUDA).

    ``warn_only``: an op without a deterministic implementation warns instead of stopping a run; cuBLAS needs
    its workspace setting before CUDA initialises, hence the environment variable.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
