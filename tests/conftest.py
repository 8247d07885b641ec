"""Shared fixtures. Tests run the real CLI in subprocesses (as a user would) with tiny settings."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# What test modules share lives in conftest.py (fixtures) and tests/helpers_*.py (plain helpers; importable as
# conftest is: pytest puts tests/ on sys.path). Their asserts get pytest's detailed failure messages too.
pytest.register_assert_rewrite("helpers_box_search", "helpers_datasets", "helpers_ircadb", "helpers_leaderboard",
                               "helpers_methods")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA_ENV = "SFDABENCH_SAMPLE_DATA"

# One ONNX export of the SAM backends for every test and CLI subprocess (each test has its own results dir, and
# an export costs ~10 s); keyed inside by weights, torch and code version, so it is never stale.
os.environ.setdefault("SFDABENCH_SAM_EXPORT_DIR", str(Path(tempfile.gettempdir()) / "sfdabench-tests-sam-onnx"))

#: Overrides that make a phantom run take seconds: tiny U-Net (preset=test), few small cases.
TINY_PHANTOM = [
    "preset=test", "device=cpu", "num_threads=2",
    "task.source.params.size=64", "task.target.params.size=64",
    "task.source.splits.train=[0,1]", "task.source.splits.test=[8]",
    "task.target.splits.train=[100,101]", "task.target.splits.test=[106]",
]


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m sfdabench ARGS`` and return the completed process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sfdabench", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def sample_data() -> Path:
    """The real CHAOS/AMOS sample volumes (``$SFDABENCH_SAMPLE_DATA``, set by .ci/run)."""
    root = os.environ.get(SAMPLE_DATA_ENV)
    if not root or not Path(root).is_dir():
        pytest.skip(f"real sample data not available: set {SAMPLE_DATA_ENV} to the shared data folder")
    return Path(root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend on the shared CI cores (100x slower under load). Modules of
    such tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def source_model():
    """The suite's one tiny trained source model: a width-4 U-Net trained briefly on the synthetic source
    cases (``helpers_methods``), once per session, at one thread (the same weights whichever test asks first).
    Tests adapt a ``copy.deepcopy`` of it."""
    import torch

    from helpers_methods import synthetic_cases
    from sfdabench.api import SliceDataset
    from sfdabench.blocks.nets import build_segmenter
    from sfdabench.blocks.training import train_supervised

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_segmenter({"width": 4, "depth": 2}, 5)
        cfg = {"epochs": 80, "batch_size": 6, "lr": 1e-2, "loss": "ce+dice", "augment": {"enabled": False}}
        train_supervised(model, SliceDataset(synthetic_cases(4, 0), labels=True), cfg, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    return model
