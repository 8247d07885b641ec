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
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

from sfdabench.blocks import atomic

LEADERBOARD_COLUMNS = [
    "task", "method", "variant", "seed", "organ", "dice", "asd", "hd95", "asd_unit", "empty_policy", "selection",
    "source_weights", "source_config", "train_threads", "source_dice", "source_flag", "sfda", "sam",
    "data_protocol", "n_cases", "config_hash", "run_id", "git_rev", "sfdabench_version", "metric_version",
    "runtime_s", "finished_at",
]
#: ``source_weights``: SHA-256 (first 16 hex) of the cached source checkpoint file: the weights every method of
#: a (task, seed) must share. ``source_config``: the hash of the source config that names the cache entry (it
#: was called ``source_ckpt`` before; it names a recipe, not weights). ``train_threads``: torch CPU threads of
#: the source training (results move across thread counts, see README "Determinism"). ``source_dice`` /
#: ``source_flag``: the source model's in-domain mean Dice, and why it is below ``source_min_dice`` (or "").


def stable_hash(obj: Any, n: int = 12) -> str:
    """The one content hash of settings (run ids, source-model cache keys, prepared-data cache): SHA-1 of the
    JSON with sorted keys, first ``n`` hex digits. OmegaConf containers hash as their plain values."""
    from sfdabench.api import _plain

    return hashlib.sha1(json.dumps(_plain(obj), sort_keys=True, default=str).encode()).hexdigest()[:n]


#: Top-level config keys that say where a run's inputs and outputs live, or how it is shown and threaded, not
#: what it computes (``data``: the dataset roots of run.yaml).
NOT_IN_RUN_ID = ("results_dir", "cache_dir", "progress", "hydra", "num_threads", "data")
#: Keys left out at any depth: dataset locations (``task.source.params.root``, ...).
LOCATION_KEYS = ("root",)


def config_hash(resolved: Mapping[str, Any]) -> str:
    """The run id: a stable hash of the resolved config without its locations (:data:`NOT_IN_RUN_ID`, and every
    :data:`LOCATION_KEYS` key at any depth). The data a run reads are named by the task's dataset settings and
    case ids, not by where they lie, as for the source-model and prepared-data keys; with the roots in the hash
    the same run had another id on each machine (or spelling of ``SFDABENCH_SAMPLE_DATA``), so a sweep could
    not resume, nor its finished runs be recognised, on another machine."""
    def what_it_computes(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: what_it_computes(v) for k, v in node.items() if k not in LOCATION_KEYS}
        if isinstance(node, (list, tuple)):
            return [what_it_computes(v) for v in node]
        return node

    from sfdabench.api import _plain

    return stable_hash(what_it_computes({k: v for k, v in _plain(resolved).items() if k not in NOT_IN_RUN_ID}))


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


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it (vendor, model name, family/model/stepping), or the platform's guess.

    Two CPUs with the same SIMD level (torch's cpu_capability) can still train other weights at one thread:
    BLAS picks kernels and blockings by vendor and cache sizes, so the float summation order differs."""
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        return (f"{info.get('vendor_id', '?')} {info.get('model name', '?')} family {info.get('cpu family', '?')} "
                f"model {info.get('model', '?')} stepping {info.get('stepping', '?')}")
    except OSError:
        return platform.processor() or platform.machine()


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
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # SIMD code path: floats differ across them
        "cpu_model": cpu_model(),
        "plugins": dict(plugins),
    }


def save_predictions(path: Path, volumes: Mapping[str, Any]) -> None:
    """Predicted label volumes by case id, as a compressed npz written atomically."""
    import numpy as np

    atomic.write_bytes(path, lambda handle: np.savez_compressed(
        handle, **{str(k): np.asarray(v, dtype=np.uint8) for k, v in volumes.items()}))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def atomic_write_text(path: Path, text: str) -> None:
    atomic.write_bytes(path, lambda handle: handle.write(text.encode()), fsync=True)


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


#: Leaderboard / per_case columns read as numbers. Every other column (identifiers, protocol text, columns this
#: version does not know) is kept as the exact string written: pandas' type guessing turned a hash such as
#: ``5549378735e3`` into ``5549378735000.0`` and dropped leading zeros of ``000123456789``.
#: Besides these, every registered metric's column is numeric (sfdabench.harness.metric_catalogue).
INTEGER_COLUMNS = ("seed", "n_cases", "train_threads", "gt_voxels", "pred_voxels")
NUMERIC_COLUMNS = INTEGER_COLUMNS + ("runtime_s", "source_dice")
#: Columns renamed on reading (old name -> current name).
LEGACY_COLUMNS = {"source_ckpt": "source_config"}
_FALSE = ("false", "0", "no")


def _read_records(path: Path) -> tuple[list[str], str, list[tuple[list[str], str]]]:
    """Header fields, header text and (fields, exact text) of every record of a CSV file, nothing converted.
    Blank lines are skipped; the text of a record spans several lines when a quoted field holds a newline."""
    import csv

    with open(path, encoding="utf-8-sig", newline="") as fh:  # newline="": keep each record's own line end
        consumed: list[str] = []

        def lines():
            for line in fh:
                consumed.append(line)
                yield line

        header: list[str] | None = None
        head_text, records = "", []
        for fields in csv.reader(lines()):
            text = "".join(consumed)
            consumed.clear()
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header, head_text = fields, text
            else:
                records.append((fields, text))
    return header or [], head_text, records


def _csv_line(fields) -> str:
    """One CSV record as pandas' ``to_csv`` writes it (csv module, minimal quoting, ``\\n``)."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(list(fields))
    return buf.getvalue()


def _current_names(header: list[str]) -> list[str]:
    """Legacy column names replaced by their current names (unless the file already has the current one)."""
    return [LEGACY_COLUMNS[c] if c in LEGACY_COLUMNS and LEGACY_COLUMNS[c] not in header else c for c in header]


def read_rows(path: str | Path, numeric: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """A leaderboard or per_case CSV, read losslessly: every cell is first read as the exact string written
    (no NaN guessing), then only :data:`NUMERIC_COLUMNS`, the registered metrics' columns (and ``numeric``) become
    numbers and ``sfda`` a bool (only an explicit false is not SFDA). Legacy ``source_ckpt`` is read as
    ``source_config``; a leaderboard without ``source_weights`` (rows written before weights were recorded)
    gets it empty. The only reader of these files: results, leaderboard, compare, ablate and report use it."""
    from sfdabench.api import UsageError

    path = Path(path)
    header, _, records = _read_records(path)
    names = _current_names(header)
    if len(set(names)) < len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise UsageError(f"{path}: column {', '.join(dup)} appears twice in the header; keep one of them")
    width = len(names)
    for fields, text in records:
        if len(fields) > width:
            raise UsageError(f"{path}: a row has {len(fields)} fields, the header {width}: {text.strip()[:80]!r}; "
                             "fix or remove that row")
    data = [fields + [""] * (width - len(fields)) for fields, _ in records]  # short rows: empty cells
    rows = (pd.DataFrame(data, columns=names, dtype=str) if data
            else pd.DataFrame({c: pd.Series(dtype=str) for c in names}))
    for old, new in LEGACY_COLUMNS.items():
        if old in rows and new in rows:  # both names (a hand-merged file): the current one wins where filled
            rows[new] = rows[new].where(rows[new] != "", rows[old])
            rows = rows.drop(columns=old)
    if "source_config" in rows and "source_weights" not in rows:
        rows.insert(rows.columns.get_loc("source_config"), "source_weights", "")  # not recorded
    from sfdabench.harness import metric_catalogue

    for col in dict.fromkeys([*NUMERIC_COLUMNS, *metric_catalogue.names(), *numeric]):
        if col in rows:
            values = pd.to_numeric(rows[col].str.strip(), errors="coerce")
            whole = values.dropna()
            if col in INTEGER_COLUMNS and col != "seed" and values.isna().any() and (whole == whole.round()).all():
                values = values.astype("Int64")  # gaps (legacy rows) must not turn 1 into 1.0 on export
            rows[col] = values
    if "sfda" in rows:
        rows["sfda"] = rows["sfda"].map(lambda v: v.strip().lower() not in _FALSE).astype(bool)
    return rows


def source_model(rows: pd.DataFrame) -> pd.Series:
    """Identity of the source model each row started from: ``source_weights`` (the checkpoint file's hash),
    or for legacy rows that did not record it ``config:<source_config>`` (a recipe: the same config gave other
    weights under another thread count, so a weights hash and a config key never count as equal)."""
    empty = pd.Series("", index=rows.index, dtype=object)
    weights = rows["source_weights"].fillna("").astype(str) if "source_weights" in rows else empty
    config = rows["source_config"].fillna("").astype(str) if "source_config" in rows else empty
    legacy = ("config:" + config).where(config != "", "")
    return weights.where(weights != "", legacy)


def append_rows(leaderboard: Path, rows: pd.DataFrame) -> None:
    """Add ``rows`` to the leaderboard CSV atomically, replacing earlier rows of the same run ids.

    Earlier rows are never parsed into numbers and printed again: they are kept as the exact text they were
    written as, so when the new rows bring no new column every kept row's bytes are unchanged. A new column
    (or a legacy file's first row of the current schema) rewrites the header in the documented column order;
    old rows then get empty cells for it and keep the exact string of every value."""
    rows = rows.rename(columns={old: new for old, new in LEGACY_COLUMNS.items() if new not in rows})
    replaced = {str(v) for v in rows["run_id"]} if "run_id" in rows else set()
    with locked(leaderboard):
        header, head_text, records = _read_records(leaderboard) if leaderboard.exists() else ([], "", [])
        names = _current_names(header)
        if replaced and "run_id" in names:
            at = names.index("run_id")
            records = [r for r in records if (r[0][at] if at < len(r[0]) else "") not in replaced]
        added = [c for c in rows.columns if c not in names]
        if header and not added:  # same columns: header and kept rows verbatim, new rows in the file's order
            columns = names
            head = head_text if names == header else _csv_line(names)
            body = [text for _, text in records]
            if body and not body[-1].endswith(("\n", "\r")):
                body[-1] += "\n"
        else:
            known = set(names) | set(added)
            columns = [c for c in LEADERBOARD_COLUMNS if c in known]
            columns += [c for c in [*names, *added] if c not in columns]
            head = _csv_line(columns)
            body = [_csv_line(dict(zip(names, fields)).get(c, "") for c in columns) for fields, _ in records]
        if not head.endswith(("\n", "\r")):
            head += "\n"
        new = rows.reindex(columns=columns).to_csv(index=False, header=False, lineterminator="\n")
        atomic_write_text(leaderboard, head + "".join(body) + new)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
