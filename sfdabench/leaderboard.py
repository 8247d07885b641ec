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

Rows are read by :func:`sfdabench.results.read_rows`: identifiers and text are kept as the strings written.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from sfdabench import gap_closed
from sfdabench.api import UsageError
from sfdabench.results import METRIC_COLUMNS, read_rows, source_model

log = logging.getLogger("sfdabench")

METRICS = METRIC_COLUMNS  # one list of built-in metric columns (sfdabench.results)
HIGHER_IS_BETTER = {"dice": True, "asd": False, "hd95": False}
#: Aggregation key. ``sam`` (the SAM backend a run used, empty for methods without SAM) is a method setting
#: the variant name does not carry: LiteMedSAM and MedSAM runs of one variant are separate rows, not seeds.
KEY = ["task", "method", "variant", "selection", "sam"]
#: Protocol columns compared across the whole table, within a task, and within a (task, seed).
GLOBAL_PROTOCOL = ("asd_unit", "empty_policy", "selection", "metric_version")
TASK_PROTOCOL = ("data_protocol",)
SEED_PROTOCOL = ("source_weights",)  # compared through results.source_model (legacy rows: their config)
PROTOCOL_COLUMNS = GLOBAL_PROTOCOL + TASK_PROTOCOL + SEED_PROTOCOL
DEFAULT_INPUT = Path("sfdabench-results") / "leaderboard.csv"
#: Columns without which rows cannot be aggregated (plus at least one of METRICS).
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
    rows = read_rows(path, METRICS)
    if not len(rows):
        raise UsageError(f"{path} has no rows (the file is empty or a header only); pass a leaderboard with "
                         f"rows, e.g. the results_dir/leaderboard.csv that `sfdabench run` writes")
    missing = [c for c in REQUIRED if c not in rows] + ([] if any(m in rows for m in METRICS) else
                                                         [" or ".join(METRICS)])
    if missing:
        raise UsageError(f"{path} lacks the column(s) {', '.join(missing)} that leaderboard rows need; pass a "
                         f"leaderboard CSV as `sfdabench run` writes it (columns: {', '.join(REQUIRED)}, "
                         f"{', '.join(METRICS)}, ...)")
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


def aggregate(rows: pd.DataFrame, allow_mixed: Iterable[str] = ()) -> pd.DataFrame:
    """Per (key, organ): mean, std (ddof=1), n over seeds of each metric; ranks among SFDA rows."""
    check_protocol(rows, allow_mixed)
    key = group_key(allow_mixed)
    rows = latest_run_per_seed(rows, key)
    if "finished_at" in rows:
        # Seeds in the order they finished, as in a results dir's leaderboard.csv: float sums depend on the
        # order, so rows exported per task (sorted by method) aggregate to the very same bits.
        rows = rows.sort_values("finished_at", kind="stable", na_position="first")
    metrics = [m for m in METRICS if m in rows]
    rows, gap_notes = gap_closed.per_seed(rows, metrics)
    values = metrics + [gap_closed.COLUMNS[m] for m in metrics]
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
    table = table.reset_index()
    table = _rank(table, key, metrics)
    organs = organ_order(rows)
    table["_organ"] = table["organ"].map({o: i for i, o in enumerate(organs)})
    sort = [c for c in key if c != "task"]
    table = table.sort_values(["task", "_organ"] + sort, kind="stable").drop(columns="_organ")
    table = table.reset_index(drop=True)
    table.attrs["key"] = key  # for rendering: which columns tell groups apart
    table.attrs["gap_notes"] = gap_notes
    return table


def _rank(table: pd.DataFrame, key: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    # Ranked within (task, organ) and any mixed protocol column: a voxel ASD never outranks a mm one.
    within = ["task", "organ"] + [c for c in key if c not in KEY]  # KEY's sam is a method choice: ranked across
    sfda = table["sfda"]
    for metric in metrics:
        ranks = (table[sfda].groupby(within, dropna=False)[f"{metric}_mean"]
                 .rank(method="min", ascending=not HIGHER_IS_BETTER[metric]))
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


DIGITS = {"dice": 3, "asd": 2, "hd95": 2, "gap_closed": 2, "gap_closed_asd": 2, "gap_closed_hd95": 2}


def to_markdown(summary: pd.DataFrame) -> str:
    """One table per task: Dice per organ (organs as columns), mean Dice/ASD/HD95, ranks."""
    key = list(summary.attrs.get("key", KEY))
    out = []
    for task, tab in summary.groupby("task", sort=False):
        organs = [o for o in dict.fromkeys(tab["organ"]) if o != "mean"]
        unit = "/".join(dict.fromkeys(tab["asd_unit"])) if "asd_unit" in tab else "?"
        selection = "/".join(dict.fromkeys(tab["selection"].astype(str)))
        extra = [c for c in key if c not in KEY] + (["sam"] if tab["sam"].ne("").any() else [])
        header = ["rank", "method", "variant", *extra, "seeds", *organs, "Dice (mean)", "gap closed",
                  f"ASD ({unit})", f"HD95 ({unit})", "rank ASD", "rank HD95"]
        align = ["r", "l", "l", *["l"] * len(extra), "r", *["r"] * (len(organs) + 6)]
        groups = []
        for gkey, g in tab.groupby(key, sort=False, dropna=False):
            by_organ = g.set_index("organ")
            mean = by_organ.loc["mean"] if "mean" in by_organ.index else None
            groups.append((gkey, g, by_organ, mean))
        # SFDA rows by rank, then the rest (not SFDA) at the bottom.
        groups.sort(key=lambda grp: (not grp[1]["sfda"].all(), _rank_value(grp[3], "rank_dice")))
        lines = []
        for gkey, g, by_organ, mean in groups:
            sfda = bool(g["sfda"].all())
            gkey = dict(zip(key, gkey if isinstance(gkey, tuple) else (gkey,)))
            cells = [rank_cell(mean, "rank_dice"), method_label(gkey["method"], sfda), gkey["variant"],
                     *[gkey[c] for c in extra], str(int(g["n_seeds"].max()))]
            cells += [cell(by_organ, o, "dice") for o in organs]
            cells += [cell(by_organ, "mean", "dice"), cell(by_organ, "mean", "gap_closed")]
            cells += [cell(by_organ, "mean", m) for m in ("asd", "hd95")]
            cells += [rank_cell(mean, "rank_asd"), rank_cell(mean, "rank_hd95")]
            lines.append(cells)
        out.append(f"### {task}\n\nDice per organ and mean over organs, mean ± std (ddof=1) over seeds; "
                   f"ASD/HD95 in {unit}; selection {selection}; ranks among SFDA methods only. "
                   f"Gap closed: (method - {gap_closed.LOWER}) / ({gap_closed.UPPER} - {gap_closed.LOWER}) of the "
                   f"mean Dice, per seed on the same source checkpoint, then mean ± std.\n\n"
                   + markdown_table(header, lines, align) + gap_notes(tab, key, summary.attrs.get("gap_notes", [])))
    return "\n\n".join(out) + "\n"


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
    return fmt(row[f"{metric}_mean"], row[f"{metric}_std"], DIGITS[metric])


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


def plot(summary: pd.DataFrame, path: Path, value: str = "dice") -> None:
    """Per-organ ``value`` (Dice, or gap closed) with std error bars: one bar group per method/variant, one
    panel per task. Groups without any value (no gap-closed references) are left out."""
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
        if value == "dice":
            ax.set_ylim(0, 1)
            ax.set_ylabel("Dice (mean ± std over seeds)")
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
    return aggregate(load_rows(inputs), allow_mixed)


def write_outputs(summary: pd.DataFrame, out_dir: Path, name: str = SUMMARY_NAME) -> dict[str, Path]:
    from sfdabench.results import atomic_write_text

    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("csv", "md", "png")}
    atomic_write_text(paths["csv"], summary.to_csv(index=False))
    atomic_write_text(paths["md"], to_markdown(summary))
    plot(summary, paths["png"])
    if summary["gap_closed_mean"].notna().any():
        paths["gap_png"] = out_dir / f"{name}_gap_closed.png"
        plot(summary, paths["gap_png"], value="gap_closed")
    return paths


def export_rows(rows: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """The leaderboard rows of each task as ``<out_dir>/<task>.csv`` (sorted by method, variant, seed, organ
    order), in the column order of a results dir's ``leaderboard.csv``: committed reference leaderboards."""
    from sfdabench.results import LEADERBOARD_COLUMNS, atomic_write_text

    paths = {}
    columns = [c for c in LEADERBOARD_COLUMNS if c in rows] + [c for c in rows if c not in LEADERBOARD_COLUMNS]
    for task, group in rows.groupby("task", sort=False):
        organs = {o: i for i, o in enumerate(organ_order(group))}
        group = group.assign(_o=group["organ"].map(organs)).sort_values(["method", "variant", "seed", "_o"])
        paths[f"rows:{task}"] = out_dir / f"{task}.csv"
        atomic_write_text(paths[f"rows:{task}"], group[columns].to_csv(index=False))
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
    ns = parser.parse_args(list(args))
    inputs = ns.results or [DEFAULT_INPUT]
    rows = load_rows(inputs)
    summary = aggregate(rows, parse_allow_mixed(ns.allow_mixed))
    out_dir = ns.out or Path.cwd()
    paths = write_outputs(summary, out_dir)
    if ns.export_rows:
        paths.update(export_rows(rows, out_dir))
    print(to_markdown(summary))
    log.info("leaderboard summary: %s", ", ".join(str(p) for p in paths.values()))
    return 0
