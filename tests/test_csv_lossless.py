"""Identifiers survive every CSV round trip: write (several appends, a run written again), aggregate, export,
compare, read back. pandas' type guessing used to turn ``5549378735e3`` into ``5549378735000.0``, drop the
leading zeros of ``000123456789`` and read ``NA``/``null``/empty as NaN; about 1% of 12-hex hashes look
numeric, so this is checked over generated values, not a few examples."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfdabench.analysis import compare, leaderboard as lb
from sfdabench.harness.results import append_rows, read_rows

TRICKY = ["5549378735e3", "000123456789", "0a2bce19c4b9", "1e5", "1E5", "nan", "NaN", "-nan", "inf", "-Infinity",
          "NA", "N/A", "null", "NULL", "None", "", " ", "0", "-0", "007", "1.50", "0x1F", "True", "false", "#N/A"]
#: Id-like strings: the known troublemakers, numbers of every shape, hex hashes, and short free text (commas,
#: quotes, spaces).
IDS = st.one_of(
    st.sampled_from(TRICKY),
    st.from_regex(r"0[0-9]{1,11}", fullmatch=True),
    st.from_regex(r"-?[0-9]{1,10}(\.[0-9]{0,4})?([eE][-+]?[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"[0-9a-f]{12}", fullmatch=True),
    st.text(alphabet="0123456789abcXYZ .,;:\"'-+_eE", max_size=8),
)
#: Tasks and run ids also name files and folders (``<task>.csv``, ``runs/...__<run_id>``): no path separator.
NAMES = IDS.filter(lambda s: "/" not in s and s not in (".", ".."))
#: Columns that carry identifiers or text (everything but metrics, seed and counts).
ID_COLUMNS = ["task", "method", "variant", "sam", "asd_unit", "empty_policy", "selection", "source_weights",
              "source_config", "data_protocol", "config_hash", "run_id", "git_rev", "sfdabench_version",
              "metric_version", "finished_at", "note"]


@st.composite
def boards(draw):
    """Runs of distinct (task, method, variant, seed) with id-like values, and one run id to write again."""
    n = draw(st.integers(1, 5))
    # a run folder is named <...>__<run_id> (protocol.run_name): a run id cannot hold "__" or touch an "_"
    run_ids = draw(st.lists(NAMES.filter(lambda s: "__" not in s and not s.startswith("_") and not s.endswith("_")),
                            min_size=n, max_size=n, unique=True))
    tasks = draw(st.lists(NAMES, min_size=1, max_size=2, unique=True))
    methods = draw(st.lists(IDS, min_size=1, max_size=3, unique=True))
    organs = draw(st.lists(IDS.filter(lambda s: s != "mean"), min_size=1, max_size=2, unique=True))
    shared = {c: draw(IDS) for c in ("asd_unit", "empty_policy", "selection", "metric_version", "data_protocol",
                                     "sam", "sfdabench_version")}   # one protocol per table
    keys = draw(st.lists(st.tuples(st.sampled_from(tasks), st.sampled_from(methods), IDS, st.integers(0, 2)),
                         min_size=n, max_size=n, unique=True))
    runs = []
    for i, (run_id, (task, method, variant, seed)) in enumerate(zip(run_ids, keys)):
        cases = draw(st.lists(IDS, min_size=1, max_size=3, unique=True))
        runs.append({**shared, "task": task, "method": method, "variant": variant, "seed": seed, "run_id": run_id,
                     "config_hash": run_id, "git_rev": draw(IDS), "note": draw(IDS),
                     "finished_at": f"2026-01-{i + 1:02d}T00:00:00+00:00", "organs": organs, "cases": cases,
                     "dice": draw(st.lists(st.floats(0, 1), min_size=len(organs), max_size=len(organs)))})
    # one source model per (task, seed), as the protocol guarantees
    sources = {(r["task"], r["seed"]): (draw(IDS), draw(IDS)) for r in runs}
    for r in runs:
        r["source_weights"], r["source_config"] = sources[(r["task"], r["seed"])]
    return runs, draw(st.sampled_from(run_ids))


def rows_of(run: dict) -> pd.DataFrame:
    organs = [*run["organs"], "mean"]
    dice = [*run["dice"], sum(run["dice"]) / len(run["dice"])]
    ids = {k: run[k] for k in ID_COLUMNS}
    return pd.DataFrame({"organ": organs, "dice": dice, "asd": 1.0, "hd95": 2.0, "sfda": True, "n_cases": 1,
                         "train_threads": 1, "seed": run["seed"], **ids})


def write_per_case(results: Path, run: dict) -> None:
    """A run folder with per_case.csv, as protocol.execute writes it (pandas to_csv)."""
    folder = results / "runs" / f"t__m__v__seed{run['seed']}__{run['run_id']}"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"run_id": run["run_id"], "case": case, "organ": organ, "dice": d, "asd": 1.0, "hd95": 2.0}
                  for case in run["cases"] for organ, d in zip(run["organs"], run["dice"])]
                 ).to_csv(folder / "per_case.csv", index=False)


def _check_ids(rows: pd.DataFrame, runs: list[dict], columns=ID_COLUMNS) -> None:
    by_run = {r["run_id"]: r for r in runs}
    assert set(rows["run_id"]) == set(by_run)
    for _, row in rows.iterrows():
        run = by_run[row["run_id"]]
        for col in columns:
            assert row[col] == run[col], (col, row[col], run[col])
        assert row["organ"] in [*run["organs"], "mean"]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boards())
def test_identifiers_survive_write_append_aggregate_export_compare(board):
    runs, again = board
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "res"
        path = results / "leaderboard.csv"
        for run in runs:
            before = path.read_bytes() if path.exists() else b""
            append_rows(path, rows_of(run))
            write_per_case(results, run)
            assert path.read_bytes().startswith(before)  # an append never changes the bytes of earlier rows
        # Writing a run again replaces its rows and leaves every other row's text as it was.
        before = path.read_text().splitlines(keepends=True)
        rewritten = next(r for r in runs if r["run_id"] == again)
        rewritten["dice"] = [1 - d for d in rewritten["dice"]]
        append_rows(path, rows_of(rewritten))
        after = path.read_text().splitlines(keepends=True)
        n_new = len(rewritten["organs"]) + 1
        assert len(after) == len(before)
        kept = [line for line, row in zip(before[1:], read_rows_lines(before)) if row != again]
        assert after[0] == before[0] and after[1:-n_new] == kept

        # read back
        rows = read_rows(path)
        _check_ids(rows, runs)
        assert len(rows) == sum(len(r["organs"]) + 1 for r in runs)

        # aggregate: every group keeps its names
        summary = lb.aggregate(lb.load_rows([path]))
        expected = {(r["task"], r["method"], r["variant"], o) for r in runs for o in [*r["organs"], "mean"]}
        assert set(zip(summary.task, summary.method, summary.variant, summary.organ)) == expected

        # export per task, read back
        exported = lb.export_rows(lb.load_rows([path]), Path(tmp) / "export")
        for task in {r["task"] for r in runs}:
            back = read_rows(exported[f"rows:{task}"])
            _check_ids(back, [r for r in runs if r["task"] == task])

        # compare the results dir with itself: every row aligns, case ids pair up
        side = compare.load_side("A", results)
        _check_ids(side.rows, runs)
        assert set(side.per_case["case"]) == {c for r in runs for c in r["cases"]}
        table = compare.compare(side, compare.load_side("B", results))
        assert set(zip(table.task, table.method, table.variant, table.organ)) == expected
        assert not table.regressed.any()
        for r in runs:   # the Wilcoxon pairs are exactly the cases of the group's runs: a mangled id pairs wrongly
            key = (r["task"], r["method"], r["variant"])
            group = [q for q in runs if (q["task"], q["method"], q["variant"]) == key]
            sel = table[(table.task == r["task"]) & (table.method == r["method"]) & (table.variant == r["variant"])
                        & (table.organ == r["organs"][0])]
            assert sel["n_pairs"].item() == sum(len(q["cases"]) for q in group)

def read_rows_lines(lines: list[str]) -> list[str]:
    """The run id of each data line (no quoted newlines in these ids: one record per line)."""
    import csv

    header, *records = list(csv.reader(lines))
    at = header.index("run_id")
    return [rec[at] for rec in records]
