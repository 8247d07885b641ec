"""Leaderboard writes: atomic, safe with concurrent writers, idempotent per run id, lossless."""
from __future__ import annotations

import csv
import io
import multiprocessing as mp

import pandas as pd
import pytest

from sfdabench.api import UsageError
from sfdabench.harness.results import LEADERBOARD_COLUMNS, append_rows, config_hash, read_rows

#: Identifiers pandas' type guessing used to change (hashes that look like numbers, leading zeros, NA words).
TRICKY = ["5549378735e3", "000123456789", "0a2bce19c4b9", "1e5", "nan", "NaN", "inf", "-0", "NA", "null", "None",
          "", " 7 ", "1.50", "True", "12"]


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


def test_a_run_id_names_what_a_run_computes_not_where_its_data_lie(monkeypatch):
    """Two spellings (or machines) of the sample data's folder give one run id; a setting of the data does not."""
    from omegaconf import OmegaConf

    from sfdabench.harness.config import compose_config

    def run_id(root: str, *overrides: str) -> str:
        monkeypatch.setenv("SFDABENCH_SAMPLE_DATA", root)
        cfg = compose_config(["task=sample_mri2ct", "method=source_only", "seed=1", *overrides])
        return config_hash(OmegaConf.to_container(cfg, resolve=True))

    here = run_id("/work/shared/data")
    assert run_id("../shared/data") == here == run_id("/elsewhere/data", "data.amos.root=/x")
    assert run_id("/work/shared/data", "task.size=96") != here
    nested = {"task": {"source": {"params": {"root": "/a", "window": [0, 1]}}}}
    moved = {"task": {"source": {"params": {"root": "/b", "window": [0, 1]}}}}
    assert config_hash(nested) == config_hash(moved)
    assert config_hash(nested) != config_hash({"task": {"source": {"params": {"root": "/a", "window": [0, 2]}}}})


def _records(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_appending_keeps_the_bytes_of_earlier_rows(tmp_path):
    path = tmp_path / "leaderboard.csv"
    for i, value in enumerate(TRICKY):
        before = path.read_bytes() if path.exists() else b""
        append_rows(path, pd.DataFrame({"organ": ["liver", "mean"], "dice": [0.5, 0.25], "run_id": f"r{i}",
                                        "git_rev": value, "source_weights": value, "config_hash": value}))
        assert path.read_bytes().startswith(before)                # earlier rows (and header) untouched
    rows = read_rows(path)
    for col in ("git_rev", "source_weights", "config_hash"):
        assert list(rows[col][::2]) == TRICKY and rows[col].map(type).eq(str).all()
    # Writing a run again replaces its rows; every other row keeps its exact text, in order.
    old = path.read_text().splitlines(keepends=True)
    append_rows(path, pd.DataFrame({"organ": ["liver", "mean"], "dice": [0.75, 0.5], "run_id": "r3",
                                    "git_rev": "0007", "source_weights": "1e5", "config_hash": "x"}))
    new = path.read_text().splitlines(keepends=True)
    assert new[:-2] == [line for line in old if ",r3," not in line]
    assert [r["git_rev"] for r in _records("".join(new))][-2:] == ["0007", "0007"]


def test_a_new_column_keeps_every_old_value(tmp_path):
    """A legacy file (source_ckpt, no source_weights/train_threads) gets the current schema on the next append:
    the header is renamed and extended, old rows get empty new cells and keep every value as written."""
    path = tmp_path / "leaderboard.csv"
    legacy = ("task,method,seed,organ,dice,source_ckpt,run_id,git_rev,note\r\n"
              't,m,0,liver,0.1000,5549378735e3,000123,0012345678,"a, ""quoted""\nnote"\r\n')
    path.write_bytes(legacy.encode())
    append_rows(path, pd.DataFrame({"task": "t", "method": "m", "seed": 1, "organ": ["liver"], "dice": [0.2],
                                    "source_weights": "abc", "source_config": "0e1", "train_threads": 1,
                                    "run_id": "new", "git_rev": "1"}))
    header, *_ = path.read_text().splitlines()
    assert header.split(",") == [c for c in LEADERBOARD_COLUMNS if c in header.split(",")] + ["note"]
    old, added = _records(path.read_text())
    assert {k: old[k] for k in ("dice", "source_config", "run_id", "git_rev", "note", "seed")} == {
        "dice": "0.1000", "source_config": "5549378735e3", "run_id": "000123", "git_rev": "0012345678",
        "note": 'a, "quoted"\nnote', "seed": "0"}
    assert old["source_weights"] == old["train_threads"] == "" and "source_ckpt" not in old
    assert (added["source_config"], added["source_weights"], added["note"]) == ("0e1", "abc", "")
    # The same columns again: now the file is appended to, byte for byte.
    before = path.read_bytes()
    append_rows(path, pd.DataFrame({"organ": ["liver"], "dice": [0.3], "run_id": "third"}))
    assert path.read_bytes().startswith(before)


def test_read_rows_keeps_text_and_converts_only_numeric_columns(tmp_path):
    path = tmp_path / "per_case.csv"
    path.write_text("run_id,case,organ,dice,gt_voxels,seed,sfda,source_ckpt,train_threads,extra\n"
                    "007,000123,liver,0.5,12,0,False,5549378735e3,,1e5\n"
                    "1e5,NA,null,,3,1,,,2,\n")
    rows = read_rows(path)
    assert list(rows.run_id) == ["007", "1e5"] and list(rows.case) == ["000123", "NA"]
    assert list(rows.organ) == ["liver", "null"] and list(rows.extra) == ["1e5", ""]
    assert list(rows.source_config) == ["5549378735e3", ""] and list(rows.source_weights) == ["", ""]
    assert rows.dice.iloc[0] == 0.5 and pd.isna(rows.dice.iloc[1]) and list(rows.gt_voxels) == [12, 3]
    assert list(rows.sfda) == [False, True] and list(rows.seed) == [0, 1]
    assert rows.train_threads.isna().iloc[0] and rows.train_threads.iloc[1] == 2   # a gap stays a gap, 2 stays 2
    assert rows[["seed", "train_threads"]].to_csv(index=False, header=False) == "0,\n1,2\n"   # not 2.0
    path.write_text("a,b\n1,2,3\n")
    with pytest.raises(UsageError, match=r"a row has 3 fields, the header 2: '1,2,3'; fix or remove that row"):
        read_rows(path)
    path.write_text("a,a\n1,2\n")
    with pytest.raises(UsageError, match="column a appears twice in the header"):
        read_rows(path)
    path.write_text("")
    assert read_rows(path).empty
