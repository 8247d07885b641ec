"""``sfdabench leaderboard [RESULTS...]``: aggregate leaderboard rows over seeds, rank, write CSV/Markdown/PNG.

Rows of one (task, method, variant, selection, sam) and organ are aggregated over seeds: mean, std (ddof=1) and
n for Dice, ASD and HD95. Ranks are per (task, organ) among SFDA rows only: Dice descending (the ranking),
ASD and HD95 ascending (extra columns). Rows with ``sfda = False`` (the target-supervised oracle) are kept,
marked and never ranked.

Rows are only comparable under one protocol, so merging is refused (one line, exit code 2) when
  - ``asd_unit``, ``empty_policy``, ``selection`` or ``metric_version`` differ anywhere in the table,
  - ``data_protocol`` differs within a task (tasks legitimately differ: the phantom is not CHAOS),
  - ``source_weights`` differs within a (task, seed): every method of a seed must start from the same source
    weights (they legitimately differ between seeds). Rows written before the weights were recorded (empty
    ``source_weights``) are compared by their ``source_config`` instead, and never count as equal to a row that
    has a weights hash: one config gave other weights under another thread count,
unless ``--allow-mixed COL[,COL]`` is given. Allowed mixed protocol columns (other than ``source_weights``)
join the aggregation key, so rows of different protocols are shown side by side, never averaged together.

Rows are read by :func:`sfdabench.harness.results.read_rows`: identifiers and text are kept as the strings written.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from sfdabench.analysis import gap_closed, statistics
from sfdabench.api import UsageError
from sfdabench.harness import metric_catalogue
from sfdabench.harness.results import read_rows, source_model

log = logging.getLogger("sfdabench")

#: Aggregation key. ``sam`` (the SAM backend a run used, empty for methods without SAM) is a method setting
#: the variant name does not carry: LiteMedSAM and MedSAM runs of one variant are separate rows, not seeds.
KEY = ["task", "method", "variant", "selection", "sam"]
#: Protocol columns compared across the whole table, within a task, and within a (task, seed).
GLOBAL_PROTOCOL = ("asd_unit", "empty_policy", "selection", "metric_version")
TASK_PROTOCOL = ("data_protocol",)
SEED_PROTOCOL = ("source_weights",)  # compared through results.source_model (legacy rows: their config)
PROTOCOL_COLUMNS = GLOBAL_PROTOCOL + TASK_PROTOCOL + SEED_PROTOCOL
DEFAULT_INPUT = Path("sfdabench-results") / "leaderboard.csv"
#: Columns without which rows cannot be aggregated (plus at least one registered metric's).
REQUIRED = ("task", "method", "organ")
SUMMARY_NAME = "leaderboard_summary"


class ProtocolMismatch(UsageError):
    """Rows of different protocols would be merged (exit code 2)."""


# ------------------------------------------------------------------------------------------ loading


def resolve_input(path: str | Path) -> Path:
    """A leaderboard CSV, or a results dir holding ``leaderboard.csv``."""
    path = Path(path)
    if path.is_dir():
        path = path / "leaderboard.csv"
    if not path.is_file():
        raise UsageError(f"no leaderboard at {path}; pass a leaderboard CSV or a results dir "
                         f"(default {DEFAULT_INPUT})")
    return path


def read_leaderboard(path: str | Path) -> pd.DataFrame:
    """One leaderboard CSV, read losslessly (results.read_rows); missing columns of old files filled in."""
    path = resolve_input(path)
    rows = read_rows(path)
    if not len(rows):
        raise UsageError(f"{path} has no rows (the file is empty or a header only); pass a leaderboard with "
                         f"rows, e.g. the results_dir/leaderboard.csv that `sfdabench run` writes")
    missing = [c for c in REQUIRED if c not in rows] + ([] if metric_catalogue.columns(rows) else
                                                         [" or ".join(metric_catalogue.names())])
    if missing:
        raise UsageError(f"{path} lacks the column(s) {', '.join(missing)} that leaderboard rows need; pass a "
                         f"leaderboard CSV as `sfdabench run` writes it (columns: {', '.join(REQUIRED)}, "
                         f"{', '.join(metric_catalogue.names())}, ...)")
    for col in KEY:  # old or hand-made files may lack key columns
        if col not in rows:
            rows[col] = "default" if col == "variant" else ""
    if "sfda" not in rows:
        rows["sfda"] = True
    return rows


def load_rows(inputs: Sequence[str | Path]) -> pd.DataFrame:
    """Rows of every input; a run present in several inputs (same run id and organ) counts once."""
    frames = [read_leaderboard(p) for p in inputs]
    rows = pd.concat(frames, ignore_index=True)
    if "run_id" in rows:
        rows = rows.drop_duplicates(["run_id", "organ"], keep="last").reset_index(drop=True)
    return rows


def run_folders(results_dir: str | Path) -> dict[str, Path]:
    """Run folders of a results dir by run id (folder names end in ``__<run_id>``, see protocol.run_name)."""
    runs = Path(results_dir) / "runs"
    if not runs.is_dir():
        return {}
    return {d.name.rsplit("__", 1)[-1]: d for d in runs.iterdir() if d.is_dir()}


CASES_SUFFIX = "_cases"  # <task>_cases.csv: the per-case rows exported beside <task>.csv


def per_case_values(rows: pd.DataFrame, results_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Per-case metrics of the rows' runs, from ``results_dir/runs/*__<run_id>/per_case.csv``: columns
    ``run_id, case, organ`` and the metrics, plus an organ ``mean`` per case (its mean over organs, as a row's
    ``mean`` averages organs). Also the run ids without a per_case.csv."""
    runs = rows.drop_duplicates("run_id") if "run_id" in rows else rows.iloc[:0]
    folders = run_folders(results_dir)
    frames, missing = [], []
    for run_id in runs["run_id"].astype(str) if len(runs) else []:
        path = folders.get(run_id, Path("/nonexistent")) / "per_case.csv"
        if not path.is_file():
            missing.append(run_id)
            continue
        frames.append(read_rows(path).assign(run_id=run_id))
    return with_case_means(pd.concat(frames, ignore_index=True) if frames else None), missing


def with_case_means(cases: pd.DataFrame | None) -> pd.DataFrame:
    """``cases`` (per-case rows of organs) with each (run, case)'s mean over organs as organ ``mean``."""
    if cases is None or not len(cases):
        return pd.DataFrame(columns=["run_id", "case", "organ", *metric_catalogue.names()])
    metrics = metric_catalogue.columns(cases)
    cases = cases[cases["organ"] != "mean"]
    overall = (cases.groupby(["run_id", "case"], sort=False)[metrics].mean().reset_index()
               .assign(organ="mean"))
    return pd.concat([cases, overall], ignore_index=True)


def exported_cases_path(rows_csv: Path) -> Path:
    return rows_csv.with_name(rows_csv.stem + CASES_SUFFIX + ".csv")


def load_cases(inputs: Sequence[str | Path], rows: pd.DataFrame) -> pd.DataFrame:
    """Per-case values of the runs in ``rows``: from the run folders of each input's results dir, or from the
    ``<name>_cases.csv`` exported beside an input CSV (committed reference leaderboards)."""
    frames = []
    for path in inputs:
        csv = resolve_input(path)
        exported = exported_cases_path(csv)
        if exported.is_file():
            frames.append(with_case_means(read_rows(exported)))
        found, _ = per_case_values(rows, csv.parent)
        frames.append(found)
    cases = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else \
        with_case_means(None)
    return cases.drop_duplicates(["run_id", "case", "organ"], keep="last").reset_index(drop=True)


TIMINGS_SUFFIX = "_timings"  # <task>_timings.csv: the runs' phase timings exported beside <task>.csv


def run_timings(rows: pd.DataFrame, results_dir: Path) -> pd.DataFrame:
    """Phase timings (``run_id, phase, seconds``) of the rows' runs, from each run folder's summary.json."""
    import json

    folders = run_folders(results_dir)
    records = []
    for run_id in dict.fromkeys(rows["run_id"].astype(str)) if "run_id" in rows else []:
        path = folders.get(run_id, Path("/nonexistent")) / "summary.json"
        if path.is_file():
            timings = json.loads(path.read_text()).get("timings") or {}
            records += [{"run_id": run_id, "phase": k, "seconds": float(v)} for k, v in timings.items()]
    return pd.DataFrame(records, columns=["run_id", "phase", "seconds"])


def load_timings(inputs: Sequence[str | Path], rows: pd.DataFrame) -> pd.DataFrame:
    """Phase timings of the runs in ``rows``: from run folders, or the exported ``<name>_timings.csv``."""
    frames = []
    for path in inputs:
        csv = resolve_input(path)
        exported = csv.with_name(csv.stem + TIMINGS_SUFFIX + ".csv")
        if exported.is_file():
            frames.append(read_rows(exported, ["seconds"])[["run_id", "phase", "seconds"]])
        frames.append(run_timings(rows, csv.parent))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["run_id", "phase", "seconds"])
    return pd.concat(frames, ignore_index=True).drop_duplicates(["run_id", "phase"], keep="last")


def costs(rows: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    """Cost per (task, method, variant): runs, mean seconds per run without source-model training, and the
    mean seconds of each phase (``phase:<name>`` columns). The source model is trained once per (task, seed)
    by whichever run needs it first and cached for the others, so its training is a row of its own
    (method ``(source model)``): per (task, seed) the longest ``source_model`` phase."""
    if not len(timings) or "run_id" not in rows:
        return pd.DataFrame()
    runs = rows.drop_duplicates("run_id")[["task", "method", "variant", "seed", "run_id"]]
    t = timings.merge(runs, on="run_id")
    wide = t.pivot_table(index=["task", "method", "variant", "seed", "run_id"], columns="phase", values="seconds",
                         aggfunc="sum").reset_index()
    phases = [c for c in wide.columns if c not in ("task", "method", "variant", "seed", "run_id")]
    source = wide.groupby(["task", "seed"])["source_model"].max() if "source_model" in wide else None
    top = [p for p in phases if "/" not in p and p != "source_model"]
    wide["seconds"] = wide[top].sum(axis=1, min_count=1)
    table = wide.groupby(["task", "method", "variant"], sort=True).agg(
        runs=("run_id", "nunique"), seconds=("seconds", "mean"),
        **{f"phase:{p}": (p, "mean") for p in phases if p != "source_model"}).reset_index()
    if source is not None:
        src = source.groupby("task").agg(["mean", "count"]).reset_index()
        src = pd.DataFrame({"task": src["task"], "method": "(source model)", "variant": "training",
                            "runs": src["count"], "seconds": src["mean"]})
        table = pd.concat([src, table], ignore_index=True)
    return table


def costs_markdown(table: pd.DataFrame) -> str:
    """Per task: seconds per run and where they go, and the cost of one seed of every listed method."""
    out = []
    for task, tab in table.groupby("task", sort=False):
        lines = []
        for _, r in tab.iterrows():
            subs = sorted(((c.split(":", 1)[1].split("/", 1)[1], r[c]) for c in tab.columns
                           if c.startswith("phase:adapt/") and pd.notna(r[c])), key=lambda kv: -kv[1])
            lines.append([r["method"], r["variant"], str(int(r["runs"])), f"{r['seconds']:.0f}",
                          ", ".join(f"{k} {v:.0f}" for k, v in subs)])
        per_seed = tab["seconds"].sum()
        out.append(f"### {task}\n\nSeconds per run (mean over its runs; the source model's training is its own row: "
                   f"it runs once per task and seed and is cached for every method). One seed of every row: "
                   f"{per_seed:.0f} s ({per_seed / 3600:.2f} h of one core).\n\n"
                   + markdown_table(["method", "variant", "runs", "seconds per run", "adapt phases (s)"], lines,
                                    ["l", "l", "r", "r", "l"]))
    return "\n\n".join(out) + "\n"


# -------------------------------------------------------------------------------------- protocol


def _who(rows: pd.DataFrame, limit: int = 3) -> str:
    names = list(dict.fromkeys(rows["method"].astype(str) + "/" + rows["variant"].astype(str)))
    more = f", +{len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _differences(rows: pd.DataFrame, col: str, where: str = "") -> str | None:
    values = list(dict.fromkeys(rows[col]))
    if len(values) < 2:
        return None
    parts = ", ".join(f"{v!r} ({_who(rows[rows[col] == v])})" for v in values)
    return f"{col} differs{where}: {parts}"


def protocol_problems(rows: pd.DataFrame, allow_mixed: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(column, description) of every protocol difference that is not allowed."""
    allow = set(allow_mixed)
    problems: list[tuple[str, str]] = []
    for col in GLOBAL_PROTOCOL:
        if col in rows and col not in allow and (msg := _differences(rows, col)):
            problems.append((col, msg))
    for col in TASK_PROTOCOL:
        if col in rows and col not in allow:
            for task, group in rows.groupby("task", sort=False):
                if msg := _differences(group, col, f" within task {task}"):
                    problems.append((col, msg))
    for col in SEED_PROTOCOL:
        has_source = "source_weights" in rows or "source_config" in rows
        if has_source and col not in allow and "seed" in rows:
            by_model = rows.assign(**{col: source_model(rows)})  # weights, or the config of legacy rows
            for (task, seed), group in by_model.groupby(["task", "seed"], sort=False):
                if msg := _differences(group, col, f" within task {task} seed {seed}"):
                    problems.append((col, msg))
    return problems


def check_protocol(rows: pd.DataFrame, allow_mixed: Iterable[str] = ()) -> None:
    """Raise ``ProtocolMismatch`` (one line naming columns, values and the flag to pass) on differences."""
    problems = protocol_problems(rows, allow_mixed)
    if problems:
        cols = ",".join(dict.fromkeys(c for c, _ in problems))
        raise ProtocolMismatch("refusing to merge rows of different protocols: " + "; ".join(m for _, m in problems)
                               + f"; pass --allow-mixed {cols} to report them side by side")


def parse_allow_mixed(values: Sequence[str] | None) -> list[str]:
    cols = [c.strip() for v in (values or []) for c in v.split(",") if c.strip()]
    unknown = [c for c in cols if c not in PROTOCOL_COLUMNS]
    if unknown:
        raise UsageError(f"--allow-mixed: unknown column {', '.join(unknown)}; "
                         f"protocol columns: {', '.join(PROTOCOL_COLUMNS)}")
    return cols


def group_key(allow_mixed: Iterable[str] = ()) -> list[str]:
    """Aggregation key: allowed mixed protocol columns split groups (source_weights varies per seed: it cannot)."""
    extra = [c for c in PROTOCOL_COLUMNS if c in set(allow_mixed) and c not in KEY and c not in SEED_PROTOCOL]
    return KEY + extra


# ------------------------------------------------------------------------------------- aggregation


def latest_run_per_seed(rows: pd.DataFrame, key: Sequence[str], warn: bool = True) -> pd.DataFrame:
    """Keep one run per (key, seed). Two run ids there mean two configs with the same variant name (e.g.
    another budget or device setting): averaging both as if they were seeds would be wrong, so the latest
    finished one is kept, with a warning."""
    if "run_id" not in rows or "seed" not in rows:
        return rows
    runs = rows.drop_duplicates("run_id")
    order = runs.sort_values("finished_at", na_position="first") if "finished_at" in runs else runs
    keep = order.groupby(list(key) + ["seed"], sort=False, dropna=False)["run_id"].agg(list)
    for idx, ids in keep.items():
        if len(ids) > 1 and warn:
            log.warning("leaderboard: %d runs for %s (run ids %s); keeping the latest, %s", len(ids),
                        " ".join(map(str, idx)), ", ".join(ids), ids[-1])
    return rows[rows["run_id"].isin({ids[-1] for ids in keep})]


def organ_order(rows: pd.DataFrame) -> list[str]:
    organs = [o for o in dict.fromkeys(rows["organ"].astype(str)) if o != "mean"]
    return organs + (["mean"] if (rows["organ"] == "mean").any() else [])


def aggregate(rows: pd.DataFrame, allow_mixed: Iterable[str] = (), cases: pd.DataFrame | None = None
              ) -> pd.DataFrame:
    """Per (key, organ): mean, std (ddof=1), n and a 95% t interval over seeds of each metric; ranks among SFDA
    rows by mean; the paired difference to the lower reference method (``Method.reference``) and significance
    ranks (sfdabench.analysis.statistics), over the per-case values in ``cases`` where every run has them, else over seeds."""
    check_protocol(rows, allow_mixed)
    key = group_key(allow_mixed)
    rows = latest_run_per_seed(rows, key)
    if "finished_at" in rows:
        # Seeds in the order they finished, as in a results dir's leaderboard.csv: float sums depend on the
        # order, so rows exported per task (sorted by method) aggregate to the very same bits.
        rows = rows.sort_values("finished_at", kind="stable", na_position="first")
    metrics = metric_catalogue.columns(rows)
    lower, upper = gap_closed.references()
    rows, gap_notes = gap_closed.per_seed(rows, metrics, lower, upper)
    values = metrics + [metric_catalogue.gap_column(m, metrics[0]) for m in metrics]
    grouped = rows.groupby(key + ["organ"], sort=False, dropna=False)
    table = grouped[values].agg(["mean", "std", "count"])  # pandas std: ddof=1 (sample std over seeds)
    table.columns = [f"{m}_{stat}" for m in values for stat in ("mean", "std", "n")]
    table["gap_reason"] = gap_closed.reasons_by_group(rows, key)
    table["n_seeds"] = grouped["seed"].nunique() if "seed" in rows else grouped.size()
    table["seeds"] = grouped["seed"].agg(lambda s: ",".join(map(str, sorted(set(s))))) if "seed" in rows else ""
    table["sfda"] = grouped["sfda"].all()
    for col in ("asd_unit", "empty_policy", "metric_version", "data_protocol"):
        if col in rows and col not in key:
            table[col] = grouped[col].agg(lambda s: "/".join(dict.fromkeys(v for v in s if v)))
    if "n_cases" in rows:
        table["n_cases"] = grouped["n_cases"].agg(lambda s: "/".join(map(str, sorted(set(s.dropna().astype(int))))))
    table = table.reset_index()
    table = _rank(table, key, metrics)
    table = _uncertainty(table, rows, with_case_means(None) if cases is None else cases, key, metrics, lower)
    organs = organ_order(rows)
    table["_organ"] = table["organ"].map({o: i for i, o in enumerate(organs)})
    sort = [c for c in key if c != "task"]
    table = table.sort_values(["task", "_organ"] + sort, kind="stable").drop(columns="_organ")
    table = table.reset_index(drop=True)
    table.attrs["key"] = key  # for rendering: which columns tell groups apart
    table.attrs["gap_notes"] = gap_notes
    table.attrs["references"] = (lower, upper)
    return table


def _uncertainty(table: pd.DataFrame, rows: pd.DataFrame, cases: pd.DataFrame, key: Sequence[str],
                 metrics: Sequence[str], reference: str) -> pd.DataFrame:
    """Add per metric: ``<m>_ci_low/high`` (t over seeds), ``<m>_diff_*`` (paired difference to the
    ``reference`` method, the lower reference: mean, ci_low, ci_high, p, n pairs, test) and ``sig_wins_<m>``/``sig_rank_<m>``
    (significance ranking among SFDA groups of a task and organ)."""
    rows = rows.assign(source=source_model(rows) if "seed" in rows else "")
    if "seed" not in rows:
        rows = rows.assign(seed=0)
    runs = rows.drop_duplicates("run_id") if "run_id" in rows else rows.iloc[:0]
    cases = cases[["run_id", "case", "organ", *[m for m in metrics if m in cases]]]
    cases = cases[cases["run_id"].isin(set(runs["run_id"]))] if len(runs) else cases.iloc[:0]
    cases = cases.merge(runs[[*key, "seed", "source", "run_id"]], on="run_id")
    has_cases = set(cases["run_id"])
    within = ["task", "organ"] + [c for c in key if c not in KEY]
    group_cols = list(key) + ["organ"]
    index = {k: i for i, k in enumerate(table[group_cols].itertuples(index=False, name=None))}
    out = {f"{m}_{c}": [np.nan] * len(table) for m in metrics
           for c in ("ci_low", "ci_high", "diff_mean", "diff_ci_low", "diff_ci_high", "diff_p")}
    out.update({f"{m}_diff_n": [0] * len(table) for m in metrics})
    out.update({f"{m}_diff_test": [""] * len(table) for m in metrics})
    out.update({f"sig_{w}_{m}": [pd.NA] * len(table) for m in metrics for w in ("wins", "rank")})
    for _, part in rows.groupby(within, sort=False, dropna=False):
        groups = {g: grp for g, grp in part.groupby(group_cols, sort=False, dropna=False)}
        by_case = {g: set(grp["run_id"]) <= has_cases if "run_id" in grp else False for g, grp in groups.items()}
        values = {g: (cases.merge(grp[[*group_cols, "run_id"]].drop_duplicates(), on=[*group_cols, "run_id"])
                      if by_case[g] else grp) for g, grp in groups.items()}
        ref = sorted((g for g in groups if g[list(key).index("method")] == reference),
                     key=lambda g: str(g[list(key).index("variant")]))
        sfda = [g for g in groups if bool(groups[g]["sfda"].all())] if "sfda" in part else list(groups)
        for metric in metrics:
            for g, grp in groups.items():
                low, high = statistics.t_interval(grp[metric].to_numpy(dtype=float))
                out[f"{metric}_ci_low"][index[g]], out[f"{metric}_ci_high"][index[g]] = low, high
                if ref and g != ref[0]:
                    both = by_case[g] and by_case[ref[0]]
                    d = statistics.paired_difference(values[g] if both else grp,
                                                     values[ref[0]] if both else groups[ref[0]], metric,
                                                     by_case=both)
                    for name, v in (("mean", d.mean), ("ci_low", d.ci_low), ("ci_high", d.ci_high), ("p", d.p),
                                    ("n", d.n), ("test", d.test)):
                        out[f"{metric}_diff_{name}"][index[g]] = v
            if len(sfda) >= 1:
                all_cases = all(by_case[g] for g in sfda)
                wins, ranks = statistics.significance_ranks([values[g] if all_cases else groups[g] for g in sfda],
                                                            metric, metric_catalogue.higher_is_better(metric),
                                                            by_case=all_cases)
                for g, w, r in zip(sfda, wins, ranks):
                    out[f"sig_wins_{metric}"][index[g]], out[f"sig_rank_{metric}"][index[g]] = w, r
    for col, vals in out.items():
        table[col] = pd.array(vals, dtype="Int64") if col.startswith("sig_") or col.endswith("_diff_n") else vals
    table.attrs["reference"] = reference
    return table


def _rank(table: pd.DataFrame, key: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    # Ranked within (task, organ) and any mixed protocol column: a voxel ASD never outranks a mm one.
    within = ["task", "organ"] + [c for c in key if c not in KEY]  # KEY's sam is a method choice: ranked across
    sfda = table["sfda"]
    for metric in metrics:
        ranks = (table[sfda].groupby(within, dropna=False)[f"{metric}_mean"]
                 .rank(method="min", ascending=not metric_catalogue.higher_is_better(metric)))
        table[f"rank_{metric}"] = ranks.reindex(table.index).astype("Int64")
    return table


# -------------------------------------------------------------------------------------- rendering


def fmt(mean: float, std: float = math.nan, digits: int = 3) -> str:
    """``0.812 ± 0.014``; the mean alone when there is no spread estimate (one seed)."""
    if mean is None or pd.isna(mean):
        return "n/a"
    if std is None or pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    align = align or ["l"] * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def method_label(method: str, sfda: bool) -> str:
    return method if sfda else f"{method} (not SFDA)"


def to_markdown(summary: pd.DataFrame) -> str:
    """One table per task: the headline metric (the rows' first metric column: Dice) per organ (organs as
    columns), its mean with an interval and the paired difference to the reference, the gap closed, then the
    other metrics (ASD/HD95, any plugin's) with their significance ranks; rows by significance rank of the
    headline metric (ties: the data cannot separate them)."""
    metrics = metric_catalogue.of_summary(summary)
    head, others = metrics[0], metrics[1:]
    name = metric_catalogue.label(head)
    spatial = [metric_catalogue.label(m) for m in others if metric_catalogue.spatial(m)]
    key = list(summary.attrs.get("key", KEY))
    lower, upper = summary.attrs.get("references") or gap_closed.references()
    reference = summary.attrs.get("reference", lower)
    out = []
    for task, tab in summary.groupby("task", sort=False):
        organs = [o for o in dict.fromkeys(tab["organ"]) if o != "mean"]
        unit = "/".join(dict.fromkeys(tab["asd_unit"])) if "asd_unit" in tab else "?"
        selection = "/".join(dict.fromkeys(tab["selection"].astype(str)))
        extra = [c for c in key if c not in KEY] + (["sam"] if tab["sam"].ne("").any() else [])
        header = ["rank", "method", "variant", *extra, "seeds", "cases", *organs, f"{name} (mean) [95% CI]",
                  f"Δ {name} vs {reference} [95% CI], p", "gap closed",
                  *[metric_catalogue.label(m) + (f" ({unit})" if metric_catalogue.spatial(m) else "") for m in others],
                  *[f"rank {metric_catalogue.label(m)}" for m in others]]
        align = ["r", "l", "l", *["l"] * len(extra), "r", "r", *["r"] * (len(organs) + 3 + 2 * len(others))]
        groups = []
        for gkey, g in tab.groupby(key, sort=False, dropna=False):
            by_organ = g.set_index("organ")
            mean = by_organ.loc["mean"] if "mean" in by_organ.index else None
            groups.append((gkey, g, by_organ, mean))
        # SFDA rows by significance rank, then by the headline mean (best first); the rest (not SFDA) at the bottom.
        best_first = -1.0 if metric_catalogue.higher_is_better(head) else 1.0
        groups.sort(key=lambda grp: (not grp[1]["sfda"].all(), _rank_value(grp[3], f"sig_rank_{head}"),
                                     best_first * _value(grp[3], f"{head}_mean", best_first * math.inf)))
        lines = []
        for gkey, g, by_organ, mean in groups:
            sfda = bool(g["sfda"].all())
            gkey = dict(zip(key, gkey if isinstance(gkey, tuple) else (gkey,)))
            cells = [rank_cell(mean, f"sig_rank_{head}"), method_label(gkey["method"], sfda), gkey["variant"],
                     *[gkey[c] for c in extra], str(int(g["n_seeds"].max())),
                     str(mean["n_cases"]) if mean is not None and "n_cases" in mean else "?"]
            cells += [cell(by_organ, o, head) for o in organs]
            cells += [interval_cell(mean, head), difference_cell(mean, head),
                      cell(by_organ, "mean", metric_catalogue.gap_column(head, head))]
            cells += [cell(by_organ, "mean", m) for m in others]
            cells += [rank_cell(mean, f"sig_rank_{m}") for m in others]
            lines.append(cells)
        out.append(f"### {task}\n\n{name} per organ: mean ± std (ddof=1) over seeds. {name} (mean): mean over organs, "
                   f"mean and 95% t interval over seeds. Δ: paired difference to {reference} on the same seeds, "
                   f"source weights and cases: mean, 95% crossed bootstrap interval (seeds and cases resampled), "
                   f"p of a two-sided Wilcoxon signed-rank test over cases (t-test over seeds where per-case "
                   f"values are missing). Rank: significance rank among SFDA methods (MSD-challenge manner: the "
                   f"number of methods a method beats in pairwise tests, Holm-corrected, at 0.05); equal ranks are "
                   f"methods the data cannot separate. {'/'.join(spatial) or 'Distances'} in {unit} (mean ± std over seeds); "
                   f"selection {selection}. Gap closed: (method - {lower}) / ({upper} - "
                   f"{lower}) of the mean {name}, per seed on the same source checkpoint, then mean ± std."
                   "\n\n" + markdown_table(header, lines, align)
                   + gap_notes(tab, key, summary.attrs.get("gap_notes", [])))
    return "\n\n".join(out) + "\n"


def _value(row, col: str, missing: float = -math.inf) -> float:
    if row is None or col not in row or pd.isna(row[col]):
        return missing
    return float(row[col])


def interval_cell(row, metric: str) -> str:
    """``0.812 [0.790, 0.834]``; the mean alone without an interval (one seed)."""
    if row is None or pd.isna(row.get(f"{metric}_mean", math.nan)):
        return "n/a"
    d = metric_catalogue.display_digits(metric)
    low, high = row.get(f"{metric}_ci_low", math.nan), row.get(f"{metric}_ci_high", math.nan)
    if pd.isna(low) or pd.isna(high):
        return f"{row[f'{metric}_mean']:.{d}f}"
    return f"{row[f'{metric}_mean']:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def p_text(p: float) -> str:
    return "" if pd.isna(p) else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def difference_cell(row, metric: str) -> str:
    """``+0.120 [+0.080, +0.160], p=0.001``; empty for the reference itself or without a paired run."""
    if row is None or pd.isna(row.get(f"{metric}_diff_mean", math.nan)):
        return ""
    d = metric_catalogue.display_digits(metric)
    text = f"{row[f'{metric}_diff_mean']:+.{d}f}"
    low, high = row.get(f"{metric}_diff_ci_low", math.nan), row.get(f"{metric}_diff_ci_high", math.nan)
    if not (pd.isna(low) or pd.isna(high)):
        text += f" [{low:+.{d}f}, {high:+.{d}f}]"
    p = p_text(row.get(f"{metric}_diff_p", math.nan))
    return text + (f", {p}" if p else "")


def gap_notes(tab: pd.DataFrame, key: Sequence[str], notes: Sequence[str] = ()) -> str:
    """Why gap-closed cells of a task's table are empty (or partial), one bullet per method and reason."""
    lines = []
    mean = tab[tab["organ"] == "mean"] if (tab["organ"] == "mean").any() else tab
    for _, row in mean.iterrows():
        reason = row.get("gap_reason", "")
        if isinstance(reason, str) and reason:
            n = int(row.get("gap_closed_n", 0) or 0)
            state = "empty" if n == 0 else f"over {n} of {int(row['n_seeds'])} seeds"
            lines.append(f"- gap closed {state} for {row['method']}/{row['variant']}: {reason}")
    task = str(tab["task"].iloc[0]) if len(tab) else ""
    lines += [f"- {n}" for n in notes if n.startswith(task + " ")]
    return ("\n\n" + "\n".join(lines)) if lines else ""


def _rank_value(row, col: str) -> float:
    if row is None or col not in row or pd.isna(row[col]):
        return math.inf
    return float(row[col])


def cell(by_organ: pd.DataFrame, organ: str, metric: str) -> str:
    if organ not in by_organ.index or f"{metric}_mean" not in by_organ:
        return "n/a"
    row = by_organ.loc[organ]
    if metric.startswith("gap_closed") and pd.isna(row[f"{metric}_mean"]):
        return ""  # no reference runs: left empty, the notes under the table say why
    return fmt(row[f"{metric}_mean"], row[f"{metric}_std"], metric_catalogue.display_digits(metric))


def rank_cell(row, col: str) -> str:
    if row is None or col not in row or pd.isna(row[col]):
        return "-"
    return str(int(row[col]))


def _ranked_groups(tab: pd.DataFrame) -> list[tuple[str, str, str, bool]]:
    """(method, variant, sam, sfda) of a task's groups: SFDA ones by Dice rank, then the others."""
    mean = tab[tab.organ == "mean"] if (tab.organ == "mean").any() else tab
    order = mean.assign(_r=mean["rank_dice"].astype(float).fillna(np.inf), _o=~mean["sfda"])
    order = order.sort_values(["_o", "_r"], kind="stable")
    return list(dict.fromkeys(zip(order["method"], order["variant"], order["sam"], order["sfda"].astype(bool))))


def plot(summary: pd.DataFrame, path: Path, value: str | None = None) -> None:
    """Per-organ ``value`` (default: the headline metric, Dice; or gap closed) with std error bars: one bar group
    per method/variant, one panel per task. Groups without any value (no gap-closed references) are left out."""
    if value is None:
        value = metric_catalogue.of_summary(summary)[0]
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    summary = summary[summary.groupby(["task", "method", "variant", "sam"], dropna=False)[f"{value}_mean"]
                      .transform(lambda v: v.notna().any())]
    tasks = list(dict.fromkeys(summary["task"]))
    sizes = [summary[summary.task == t].groupby(["method", "variant", "sam"]).ngroups for t in tasks]
    fig, axes = plt.subplots(max(len(tasks), 1), 1, figsize=(max(6.0, 1.6 * max(sizes, default=1)),
                                                            3.6 * max(len(tasks), 1)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        tab = summary[summary.task == task]
        organs = list(dict.fromkeys(tab["organ"]))
        labels = _ranked_groups(tab)
        width = 0.8 / max(len(organs), 1)
        x = np.arange(len(labels))
        for k, organ in enumerate(organs):
            sub = tab[tab.organ == organ].set_index(["method", "variant", "sam"])
            sub = sub[~sub.index.duplicated()]  # allowed mixed protocols: the first of each label
            means = [sub[f"{value}_mean"].get((m, v, sam), np.nan) for m, v, sam, _ in labels]
            stds = [sub[f"{value}_std"].get((m, v, sam), np.nan) for m, v, sam, _ in labels]
            bars = ax.bar(x + (k - (len(organs) - 1) / 2) * width, means, width, yerr=np.nan_to_num(stds),
                          capsize=2, label=organ)
            for bar, (_, _, _, sfda) in zip(bars, labels):
                if not sfda:
                    bar.set_hatch("//")  # not SFDA (oracle): visibly set apart
        ax.set_xticks(x, [f"{method_label(m, s)}\n{v}" + (f"\n{sam}" if sam else "") for m, v, sam, s in labels],
                      fontsize=8)
        if value in metric_catalogue.names():
            if metric_catalogue.bounded(value):
                ax.set_ylim(0, 1)
            ax.set_ylabel(f"{metric_catalogue.label(value)} (mean ± std over seeds)")
        else:  # 0 = source-only, 1 = oracle; values outside happen and are shown
            for level in (0.0, 1.0):
                ax.axhline(level, color="0.4", linewidth=0.8, linestyle="--")
            ax.set_ylabel(f"{value.replace('_', ' ')} (mean ± std over seeds)")
        ax.set_title(task)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- CLI


def summarize(inputs: Sequence[str | Path], allow_mixed: Sequence[str] = ()) -> pd.DataFrame:
    rows = load_rows(inputs)
    return aggregate(rows, allow_mixed, load_cases(inputs, rows))


def write_outputs(summary: pd.DataFrame, out_dir: Path, name: str = SUMMARY_NAME,
                  cost_table: pd.DataFrame | None = None) -> dict[str, Path]:
    from sfdabench.harness.results import atomic_write_text

    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("csv", "md", "png")}
    if cost_table is not None and len(cost_table):
        paths["costs_csv"], paths["costs_md"] = out_dir / f"{name}_costs.csv", out_dir / f"{name}_costs.md"
        atomic_write_text(paths["costs_csv"], cost_table.to_csv(index=False))
        atomic_write_text(paths["costs_md"], costs_markdown(cost_table))
    atomic_write_text(paths["csv"], summary.to_csv(index=False))
    atomic_write_text(paths["md"], to_markdown(summary))
    plot(summary, paths["png"])
    if summary["gap_closed_mean"].notna().any():
        paths["gap_png"] = out_dir / f"{name}_gap_closed.png"
        plot(summary, paths["gap_png"], value="gap_closed")
    return paths


def export_rows(rows: pd.DataFrame, out_dir: Path, cases: pd.DataFrame | None = None,
                timings: pd.DataFrame | None = None) -> dict[str, Path]:
    """The leaderboard rows of each task as ``<out_dir>/<task>.csv`` (sorted by method, variant, seed, organ
    order), in the column order of a results dir's ``leaderboard.csv``: committed reference leaderboards. With
    ``cases``, also their per-case rows as ``<task>_cases.csv`` (organs only: the per-case ``mean`` is
    recomputed on reading), which the paired tests need."""
    from sfdabench.harness.results import LEADERBOARD_COLUMNS, atomic_write_text

    paths = {}
    columns = [c for c in LEADERBOARD_COLUMNS if c in rows] + [c for c in rows if c not in LEADERBOARD_COLUMNS]
    for task, group in rows.groupby("task", sort=False):
        organs = {o: i for i, o in enumerate(organ_order(group))}
        group = group.assign(_o=group["organ"].map(organs)).sort_values(["method", "variant", "seed", "_o"])
        paths[f"rows:{task}"] = out_dir / f"{task}.csv"
        atomic_write_text(paths[f"rows:{task}"], group[columns].to_csv(index=False))
        if cases is not None and "run_id" in group:
            runs = group.drop_duplicates("run_id")[["task", "method", "variant", "seed", "run_id"]]
            own = cases.drop(columns=[c for c in ("task", "method", "variant", "seed") if c in cases])
            mine = own[own["organ"] != "mean"].merge(runs, on="run_id")
            if len(mine):
                mine = mine.assign(_o=mine["organ"].map(organs)).sort_values(
                    ["method", "variant", "seed", "case", "_o"], kind="stable")
                first = ["task", "method", "variant", "seed", "run_id", "case", "organ"]
                cols = first + [c for c in mine if c not in first and c != "_o"]
                paths[f"cases:{task}"] = exported_cases_path(out_dir / f"{task}.csv")
                atomic_write_text(paths[f"cases:{task}"], mine[cols].to_csv(index=False))
        if timings is not None and len(timings) and "run_id" in group:
            runs = group.drop_duplicates("run_id")[["task", "method", "variant", "seed", "run_id"]]
            mine = timings.merge(runs, on="run_id").sort_values(["method", "variant", "seed", "phase"])
            if len(mine):
                paths[f"timings:{task}"] = out_dir / f"{task}{TIMINGS_SUFFIX}.csv"
                atomic_write_text(paths[f"timings:{task}"],
                                  mine[["task", "method", "variant", "seed", "run_id", "phase", "seconds"]]
                                  .to_csv(index=False))
    return paths


def cmd_leaderboard(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sfdabench leaderboard",
                                     description="Aggregate leaderboard rows over seeds and rank methods.")
    parser.add_argument("results", nargs="*", help=f"leaderboard CSVs or results dirs (default {DEFAULT_INPUT})")
    parser.add_argument("--out", type=Path,
                        help="output dir (default: the current directory; never beside the inputs, which may be "
                             "committed reference files)")
    parser.add_argument("--allow-mixed", action="append", metavar="COL[,COL]",
                        help=f"aggregate despite differing protocol columns ({', '.join(PROTOCOL_COLUMNS)})")
    parser.add_argument("--export-rows", action="store_true",
                        help="also write the input rows of each task to OUT/<task>.csv (reference leaderboards)")
    parser.add_argument("--name", default=SUMMARY_NAME,
                        help=f"file stem of the summaries in OUT (default {SUMMARY_NAME}; another one keeps two "
                             f"reference leaderboards side by side in one folder)")
    ns = parser.parse_args(list(args))
    if not ns.name or "/" in ns.name or ns.name.startswith("."):
        raise UsageError(f"--name {ns.name!r} must be a plain file stem such as sample_mri2ct_summary")
    inputs = ns.results or [DEFAULT_INPUT]
    rows = load_rows(inputs)
    cases = load_cases(inputs, rows)
    timings = load_timings(inputs, rows)
    summary = aggregate(rows, parse_allow_mixed(ns.allow_mixed), cases)
    out_dir = ns.out or Path.cwd()
    kept = latest_run_per_seed(rows, group_key(parse_allow_mixed(ns.allow_mixed)), warn=False)
    paths = write_outputs(summary, out_dir, ns.name, cost_table=costs(kept, timings))
    if ns.export_rows:
        paths.update(export_rows(rows, out_dir, cases, timings))
    print(to_markdown(summary))
    log.info("leaderboard summary: %s", ", ".join(str(p) for p in paths.values()))
    return 0
