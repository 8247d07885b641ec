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


def flush_denormals() -> bool:
    """Flush denormal floats to zero on the CPU (torch.set_flush_denormal; no effect on CUDA).

    Why: some inputs drive activations and gradients into the denormal range, where x86 arithmetic is many
    times slower. Measured on the phantom (one thread, batch 16, a source model on its target images):
    phantom_ct2mri's MR-like target took 1.7-2.9 s a training step without and 0.8-1.2 s with flushing;
    phantom_mri2ct's CT-like target 0.8-1.1 s either way. Deterministic like everything else (the same
    config, seed and thread count still give identical weights). Numerically almost neutral, measured on
    seed 0 (source model + source_only/adabn): phantom_mri2ct's source weights are bit-identical with and
    without flushing; phantom_ct2mri's differ (another weights hash: flushed denormal weights) while every
    target Dice agreed to all printed digits. Returns False where the CPU does not support it.
    """
    return bool(torch.set_flush_denormal(True))
