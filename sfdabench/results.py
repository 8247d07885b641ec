"""Run folders, environment records and the leaderboard CSV.

A run folder ``<results_dir>/runs/<run_id>/`` holds ``config.yaml`` (resolved), ``environment.json``,
``per_case.csv``, ``summary.json`` and, last, ``done``. Leaderboard rows (one per organ plus ``mean``) are
written under an exclusive file lock by rewriting the CSV to a temporary file and renaming it, so
concurrent writers lose nothing and a reader never sees half a file. Rows carry the ``run_id``: writing a
run again replaces its rows instead of counting it twice. Rows are written only after evaluation has
finished, so an interrupted run leaves no row.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

LEADERBOARD_COLUMNS = [
    "task", "method", "variant", "seed", "organ", "dice", "asd", "hd95", "asd_unit", "empty_policy", "selection",
    "source_ckpt", "sfda", "sam", "data_protocol", "n_cases", "config_hash", "run_id", "git_rev",
    "sfdabench_version", "metric_version", "runtime_s", "finished_at",
]


def config_hash(resolved: Mapping[str, Any]) -> str:
    """Stable hash of a resolved config (keys sorted), ignoring where results go and CPU thread count."""
    cfg = {k: v for k, v in resolved.items() if k not in ("results_dir", "cache_dir", "progress", "hydra", "num_threads")}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_revision() -> str:
    """Revision of the sfdabench source tree (``+dirty`` if modified), or ``unknown`` when not in git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def environment_record(plugins: Mapping[str, str], device: str) -> dict[str, Any]:
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "medpy": version("medpy"),
        "sfdabench": version("sfdabench"),
        "git_rev": git_revision(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "plugins": dict(plugins),
    }


def save_predictions(path: Path, volumes: Mapping[str, Any]) -> None:
    """Predicted label volumes by case id, as a compressed npz written atomically."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".predictions-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **{str(k): np.asarray(v, dtype=np.uint8) for k, v in volumes.items()})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``<path>.lock`` (POSIX advisory lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def append_rows(leaderboard: Path, rows: pd.DataFrame) -> None:
    """Add ``rows`` to the leaderboard CSV atomically, replacing earlier rows of the same run ids."""
    with locked(leaderboard):
        frames = []
        if leaderboard.exists() and leaderboard.stat().st_size:
            old = pd.read_csv(leaderboard, dtype={"run_id": str, "config_hash": str})
            frames.append(old[~old["run_id"].isin(set(rows["run_id"]))])
        frames.append(rows)
        table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else rows
        columns = [c for c in LEADERBOARD_COLUMNS if c in table.columns]
        columns += [c for c in table.columns if c not in columns]
        atomic_write_text(leaderboard, table[columns].to_csv(index=False))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
