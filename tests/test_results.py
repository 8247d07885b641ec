"""Leaderboard writes: atomic, safe with concurrent writers, idempotent per run id."""
from __future__ import annotations

import multiprocessing as mp

import pandas as pd

from sfdabench.results import append_rows, config_hash


def _writer(path, worker, runs):
    for r in range(runs):
        rows = pd.DataFrame({"organ": ["liver", "mean"], "dice": [0.5, 0.5], "run_id": f"w{worker}r{r}",
                             "method": "m", "seed": worker})
        append_rows(path, rows)


def test_parallel_writers_lose_no_row(tmp_path):
    path = tmp_path / "leaderboard.csv"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    board = pd.read_csv(path)
    assert len(board) == 4 * 6 * 2
    assert board["run_id"].nunique() == 24
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_rewriting_a_run_replaces_its_rows(tmp_path):
    path = tmp_path / "leaderboard.csv"
    append_rows(path, pd.DataFrame({"organ": ["mean"], "dice": [0.1], "run_id": "abc"}))
    append_rows(path, pd.DataFrame({"organ": ["mean"], "dice": [0.2], "run_id": "def"}))
    append_rows(path, pd.DataFrame({"organ": ["mean"], "dice": [0.3], "run_id": "abc"}))
    board = pd.read_csv(path).set_index("run_id")
    assert board.loc["abc", "dice"] == 0.3 and len(board) == 2


def test_config_hash_ignores_output_locations():
    a = {"seed": 0, "method": {"name": "x"}, "results_dir": "/a", "cache_dir": "/a/c"}
    b = {"seed": 0, "method": {"name": "x"}, "results_dir": "/b", "cache_dir": "/b/c"}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "seed": 1})
