"""``sfdabench compare A B [--metric dice] [--max-regression 0.01] [--out report.md]``: what changed from A to B.

A and B are leaderboard CSVs (or results dirs). Each side is aggregated over seeds as by ``sfdabench
leaderboard`` and the sides are aligned by (task, method, variant, organ). The report gives, per aligned row,
the chosen metric on both sides, the deltas (B - A) of the Dice/ASD/HD95 means over the seeds both sides have
(a group with other seeds on one side is compared over the common ones, and the report says so), the rank
change, and a paired
Wilcoxon signed-rank test over matched per-case values: the runs' ``per_case.csv`` files are found through
the results dir that holds each CSV (``runs/*__<run_id>/``) and matched by (task, method, variant, seed,
case, organ); the ``mean`` organ pairs each case's mean over organs. Rows on one side only and protocol
differences between the sides are listed separately. Seeds are paired with their source model: when A and B
started a (task, seed) from different source weights (``source_weights``), or when one side did not record its
weights (rows older than that column), the report and stderr say so, since the deltas there then mix the
method change with a change of source model.

Exit code 0, or 1 when an aligned row regressed by more than ``--max-regression`` on ``--metric`` (Dice: a
decrease; ASD/HD95: an increase), so CI can gate on it; 2 when no row aligns (e.g. other tasks): a gate that
compared nothing must not pass.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from sfdabench.analysis import leaderboard as lb
from sfdabench.harness import metric_catalogue
from sfdabench.api import UsageError
from sfdabench.harness.results import source_model

log = logging.getLogger("sfdabench")
ALIGN = ["task", "method", "variant", "organ"]
CASE_KEY = ["task", "method", "variant", "seed", "case", "organ"]


@dataclass
class Side:
    label: str
    path: Path
    rows: pd.DataFrame          # leaderboard rows (one run per seed)
    summary: pd.DataFrame       # aggregated over seeds
    per_case: pd.DataFrame      # matched per-case values (may be empty)
    missing_runs: list[str]     # run ids without a per_case.csv next to the CSV


def load_side(label: str, path: str | Path, allow_mixed: Sequence[str] = ()) -> Side:
    csv = lb.resolve_input(path)
    rows = lb.load_rows([csv])
    summary = lb.aggregate(rows, allow_mixed)
    rows = lb.latest_run_per_seed(rows, lb.group_key(allow_mixed), warn=False)  # as aggregated
    dup = summary.duplicated(ALIGN, keep=False)
    if dup.any():
        first = summary[dup].iloc[0]
        raise UsageError(f"{label} ({csv}) has several groups (SAM backends or mixed protocols) for {first.task} "
                         f"{first.method}/{first.variant}; compare one at a time")
    per_case, missing = per_case_values(rows, csv.parent)
    return Side(label, csv, rows, summary, per_case, missing)


def common_seeds(a: Side, b: Side, allow_mixed: Sequence[str] = ()) -> tuple[Side, Side, list[str]]:
    """Restrict the (task, method, variant) groups present on both sides to the seeds both sides have, and
    re-aggregate: a mean over seeds 0-2 against a mean over seed 0 alone would show a "change" that is only
    seed variance. Returns the restricted sides and one note per group whose seed sets differed."""
    group = ["task", "method", "variant"]
    seeds_a = a.rows[group + ["seed"]].drop_duplicates()
    seeds_b = b.rows[group + ["seed"]].drop_duplicates()
    both = seeds_a[group].drop_duplicates().merge(seeds_b[group].drop_duplicates())
    common = seeds_a.merge(seeds_b)
    notes = []
    for g in both.itertuples(index=False):
        pick = lambda f: sorted(f[(f.task == g.task) & (f.method == g.method) & (f.variant == g.variant)]["seed"])
        sa, sb, sc = pick(seeds_a), pick(seeds_b), pick(common)
        if sa != sb:
            fmt = lambda seeds: ",".join(map(str, seeds)) or "none"
            notes.append(f"{g.task} {g.method}/{g.variant}: seeds {fmt(sa)} (A) vs {fmt(sb)} (B); "
                         + (f"compared over seeds {fmt(sc)}" if sc else "no common seed: not compared"))

    def restrict(side: Side) -> Side:
        keys = side.rows[group + ["seed"]]
        in_both = keys[group].merge(both, how="left", indicator=True)["_merge"].eq("both").to_numpy()
        matched = keys.merge(common, how="left", indicator=True)["_merge"].eq("both").to_numpy()
        rows = side.rows[~in_both | matched]
        if len(rows) == len(side.rows):
            return side
        per_case = side.per_case.merge(rows[["task", "method", "variant", "seed"]].drop_duplicates())
        return Side(side.label, side.path, rows, lb.aggregate(rows, allow_mixed), per_case, side.missing_runs)

    return restrict(a), restrict(b), notes


def per_case_values(rows: pd.DataFrame, results_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Per-case metrics of the leaderboard's runs (leaderboard.per_case_values: the run folders'
    ``per_case.csv``, with each case's mean over organs as organ ``mean``), keyed by :data:`CASE_KEY`."""
    cases, missing = lb.per_case_values(rows, results_dir)
    if not len(cases):
        return pd.DataFrame(columns=CASE_KEY + list(metric_catalogue.names())), missing
    runs = rows.drop_duplicates("run_id")[["run_id", "task", "method", "variant", "seed"]].astype({"run_id": str})
    cases = cases.merge(runs, on="run_id")
    return cases[CASE_KEY + metric_catalogue.columns(cases)], missing


def wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Two-sided paired Wilcoxon signed-rank p-value over pairs where both values exist, and the pair count."""
    from scipy.stats import wilcoxon as _wilcoxon

    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    n = int(ok.sum())
    if n < 2:
        return math.nan, n
    if np.allclose(a, b, rtol=0, atol=1e-12):
        return 1.0, n  # identical paired values: no evidence of a difference (scipy would warn and give nan)
    return float(_wilcoxon(b, a).pvalue), n


def protocol_differences(a: Side, b: Side) -> list[str]:
    """Protocol facts of aligned (task, method, variant) groups that differ between the sides."""
    lines = []
    cols = [c for c in lb.GLOBAL_PROTOCOL + lb.TASK_PROTOCOL + ("sam",) if c in a.rows and c in b.rows]
    groups = a.rows[["task", "method", "variant"]].drop_duplicates().merge(
        b.rows[["task", "method", "variant"]].drop_duplicates())
    for g in groups.itertuples(index=False):
        ga = a.rows[(a.rows.task == g.task) & (a.rows.method == g.method) & (a.rows.variant == g.variant)]
        gb = b.rows[(b.rows.task == g.task) & (b.rows.method == g.method) & (b.rows.variant == g.variant)]
        for col in cols:
            va, vb = sorted(set(ga[col])), sorted(set(gb[col]))
            if va != vb:
                lines.append(f"{g.task} {g.method}/{g.variant}: {col} {'/'.join(va)!r} (A) vs {'/'.join(vb)!r} (B)")
    return lines


def source_differences(a: Side, b: Side) -> list[str]:
    """Per (task, seed) compared on both sides: a line when A and B started from different source weights, and
    per task a line for the seeds where that cannot be checked (a side's rows did not record their weights).
    Equal configs do not count as equal weights: one config gave other weights under another thread count."""
    group = ["task", "method", "variant"]
    both = a.rows[group].drop_duplicates().merge(b.rows[group].drop_duplicates())

    def models(side: Side) -> pd.Series:
        rows = side.rows.merge(both)  # only the groups that are compared
        if "seed" not in rows or not len(rows):
            return pd.Series(dtype=object)
        rows = rows.assign(_model=source_model(rows))
        return rows.groupby(["task", "seed"], sort=False)["_model"].agg(lambda v: tuple(sorted(set(v))))

    def recorded(ids: tuple) -> bool:
        return all(i and not i.startswith("config:") for i in ids)

    def shown(ids: tuple) -> str:
        return "/".join(i or "(none)" for i in ids)

    ma, mb = models(a), models(b)
    lines, unknown = [], {}
    for task, seed in ma.index:
        if (task, seed) not in mb.index:
            continue
        va, vb = ma[(task, seed)], mb[(task, seed)]
        if recorded(va) and recorded(vb):
            if va != vb:
                lines.append(f"{task} seed {seed}: A and B used different source weights ({shown(va)} (A) vs "
                             f"{shown(vb)} (B)): deltas there mix the method change with another source model")
        elif not recorded(va) and not recorded(vb) and va != vb:
            lines.append(f"{task} seed {seed}: A and B used different source configs ({shown(va)} (A) vs "
                         f"{shown(vb)} (B)), so different source weights")
        else:
            sides = "/".join(n for n, v in (("A", va), ("B", vb)) if not recorded(v))
            unknown.setdefault((task, sides), []).append(seed)
    for (task, sides), seeds in unknown.items():
        lines.append(f"{task} seed {', '.join(map(str, seeds))}: source weights not recorded in {sides} (rows "
                     f"without source_weights): whether A and B used the same source weights is unknown")
    return lines


def compare(a: Side, b: Side, metric: str = "dice", max_regression: float = 0.01) -> pd.DataFrame:
    """Aligned rows with deltas (B - A), rank change, Wilcoxon p over matched cases, regression flag."""
    metrics = metric_catalogue.of_summary(a.summary)
    if metric not in metrics:
        raise UsageError(f"--metric {metric}: leaderboard A has no {metric} column; it has {', '.join(metrics)}")
    cols = ALIGN + ["sfda"] + [f"{m}_mean" for m in metrics] + [f"rank_{metric}", "n_seeds"]
    table = a.summary[cols].merge(b.summary[cols], on=ALIGN, suffixes=("_a", "_b"))
    # Rows of one method/variant together (the summaries are sorted by organ; a stable sort keeps that order).
    table = table.sort_values(["task", "method", "variant"], kind="stable").reset_index(drop=True)
    for m in metrics:
        if f"{m}_mean_a" in table and f"{m}_mean_b" in table:
            table[f"delta_{m}"] = table[f"{m}_mean_b"] - table[f"{m}_mean_a"]
    # Paired test on the chosen metric over cases present on both sides (same seed, case, organ).
    pairs = a.per_case.merge(b.per_case, on=CASE_KEY, suffixes=("_a", "_b"))
    pvals, counts = [], []
    for row in table.itertuples(index=False):
        sel = pairs[(pairs.task == row.task) & (pairs.method == row.method) & (pairs.variant == row.variant)
                    & (pairs.organ == row.organ)]
        p, n = (wilcoxon(sel[f"{metric}_a"].to_numpy(float), sel[f"{metric}_b"].to_numpy(float))
                if len(sel) and f"{metric}_a" in sel else (math.nan, 0))
        pvals.append(p)
        counts.append(n)
    table["wilcoxon_p"], table["n_pairs"] = pvals, counts
    sign = 1.0 if metric_catalogue.higher_is_better(metric) else -1.0
    gain = sign * table[f"delta_{metric}"]   # > 0: better on the chosen metric
    table["regressed"] = gain < -max_regression
    table["improved"] = gain > max_regression
    return table


def one_sided(a: Side, b: Side) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(task, method, variant, organs) present only in A, only in B."""
    def only(x: Side, y: Side) -> pd.DataFrame:
        keys = x.summary[ALIGN].merge(y.summary[ALIGN], how="left", indicator=True)
        rest = keys[keys["_merge"] == "left_only"]
        return (rest.groupby(["task", "method", "variant"], sort=False)["organ"]
                .agg(lambda s: ", ".join(s)).reset_index())
    return only(a, b), only(b, a)


def report(a: Side, b: Side, table: pd.DataFrame, metric: str, max_regression: float,
           seed_notes: Sequence[str] = ()) -> str:
    better = "higher" if metric_catalogue.higher_is_better(metric) else "lower"
    metrics = [m for m in metric_catalogue.of_summary(a.summary) if f"delta_{m}" in table]
    n_reg = int(table["regressed"].sum())
    lines = ["# sfdabench compare", "",
             f"- A: `{a.path}` ({a.rows['run_id'].nunique() if 'run_id' in a.rows else '?'} runs)",
             f"- B: `{b.path}` ({b.rows['run_id'].nunique() if 'run_id' in b.rows else '?'} runs)",
             f"- metric: {metric} ({better} is better); regression: worse by more than {max_regression:g}; "
             f"deltas are B - A of the means over the seeds both sides have; p: paired two-sided Wilcoxon "
             f"signed-rank test over "
             f"matched (seed, case) values of {metric}", ""]
    digits = metric_catalogue.digits(metric)
    header = ["task", "method", "variant", "organ", f"{metric} A", f"{metric} B", *[f"Δ {m}" for m in metrics],
              f"rank ({metric}) A→B", "p (n pairs)", "status"]
    rows = []
    for r in table.itertuples(index=False):
        d = r._asdict()
        status = "REGRESSION" if d["regressed"] else ("improved" if d["improved"] else "")
        if pd.isna(d[f"delta_{metric}"]):
            status = "n/a"
        rows.append([r.task, lb.method_label(r.method, bool(d["sfda_a"]) and bool(d["sfda_b"])), r.variant, r.organ,
                     lb.fmt(d[f"{metric}_mean_a"], digits=digits), lb.fmt(d[f"{metric}_mean_b"], digits=digits),
                     *[_delta(d.get(f"delta_{m}"), metric_catalogue.digits(m)) for m in metrics],
                     f"{_rank(d[f'rank_{metric}_a'])}→{_rank(d[f'rank_{metric}_b'])}",
                     "-" if pd.isna(d["wilcoxon_p"]) else f"{d['wilcoxon_p']:.3g} ({d['n_pairs']})", status])
    lines.append(lb.markdown_table(header, rows, ["l"] * 4 + ["r"] * (len(metrics) + 4) + ["l"]) if rows
                 else "(no aligned rows)")
    only_a, only_b = one_sided(a, b)
    for name, only in (("A", only_a), ("B", only_b)):
        if len(only):
            lines += ["", f"## Only in {name}", ""]
            lines += [f"- {r.task} {r.method}/{r.variant}: {r.organ}" for r in only.itertuples(index=False)]
    if seed_notes:
        lines += ["", "## Seeds (only the seeds on both sides are compared)", ""]
        lines += [f"- {n}" for n in seed_notes]
    sources = source_differences(a, b)
    if sources:
        lines += ["", "## Source weights (every seed of A and B should start from the same source model)", ""]
        lines += [f"- {s}" for s in sources]
    diffs = protocol_differences(a, b)
    if diffs:
        lines += ["", "## Protocol differences (deltas across these rows compare different protocols)", ""]
        lines += [f"- {d}" for d in diffs]
    for side in (a, b):
        if side.missing_runs:
            lines += ["", f"Note: no per_case.csv for {len(side.missing_runs)} run(s) of {side.label} under "
                          f"{side.path.parent / 'runs'}; Wilcoxon tests use the runs found."]
    lines += ["", f"**{len(table)} aligned rows, {n_reg} regression(s) on {metric} beyond {max_regression:g}"
                  + (" -> exit code 1**" if n_reg else "**")]
    return "\n".join(lines) + "\n"


def no_alignment(a: Side, b: Side) -> str:
    """Why no row of A aligns with a row of B, and what to pass instead (one line)."""
    def names(side: Side) -> str:
        return ", ".join(dict.fromkeys(side.rows["task"].astype(str))) or "none"

    group = ["task", "method", "variant"]
    shared = a.rows[group].drop_duplicates().merge(b.rows[group].drop_duplicates())
    why = ("no (task, method, variant) is on both sides" if not len(shared)
           else "the (task, method, variant) groups on both sides have no seed in common")
    return (f"no row of A ({a.path}) aligns with B ({b.path}): {why} (tasks: {names(a)} in A, {names(b)} in B); "
            f"compare leaderboards of the same task, methods and seeds")


def _delta(v, digits: int) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{v:+.{digits}f}"


def _rank(v) -> str:
    return "-" if v is None or pd.isna(v) else str(int(v))


def cmd_compare(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sfdabench compare",
                                     description="Compare two leaderboards (B against A); exit 1 on regression.")
    parser.add_argument("a", help="baseline leaderboard CSV or results dir")
    parser.add_argument("b", help="new leaderboard CSV or results dir")
    parser.add_argument("--metric", choices=metric_catalogue.names(), default=None,
                        help="the metric the regression check and the tests use (default: the headline metric, "
                             "the rows' first metric column)")
    parser.add_argument("--max-regression", type=float, default=0.01,
                        help="largest tolerated worsening of a mean (default 0.01)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--allow-mixed", action="append", metavar="COL[,COL]",
                        help="aggregate each side despite differing protocol columns")
    ns = parser.parse_args(list(args))
    allow = lb.parse_allow_mixed(ns.allow_mixed)
    a, b = load_side("A", ns.a, allow), load_side("B", ns.b, allow)
    if ns.metric is None:
        ns.metric = (metric_catalogue.of_summary(a.summary) or ["dice"])[0]
    for side in (a, b):
        if f"{ns.metric}_mean" not in side.summary:
            raise UsageError(f"{side.path} has no {ns.metric} column")
    whole = (a, b)  # before common_seeds: to say why nothing aligns
    a, b, seed_notes = common_seeds(a, b, allow)
    table = compare(a, b, ns.metric, ns.max_regression)
    if not len(table):
        raise UsageError(no_alignment(*whole))
    text = report(a, b, table, ns.metric, ns.max_regression, seed_notes)
    print(text)
    for line in source_differences(a, b):
        log.warning("compare: %s", line)
    if ns.out:
        from sfdabench.harness.results import atomic_write_text

        atomic_write_text(ns.out, text)
    return 1 if table["regressed"].any() else 0
