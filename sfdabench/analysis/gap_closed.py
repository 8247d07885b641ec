"""How much of the domain gap a method closed: ``gap_closed = (method - lower) / (upper - lower)``.

The references are the methods that declare them (``Method.reference``): ``lower``, no adaptation (the
built-in ``source_only``), and ``upper``, target-supervised (the built-in ``oracle``). Computed per seed, per
organ and for the ``mean`` row, against the reference runs of the *same task, seed and source weights* (rows
written before the weights were recorded pair by their ``source_config``; see results.source_model), then
aggregated over seeds (mean, std with ddof=1, n) like every other leaderboard number. 0 means no better than
the source model, 1 means as good as target supervision; values below 0 or above 1 are kept (they happen).

The same formula serves Dice (higher is better) and the distances ASD/HD95 (lower is better): for a distance
``(method - source) / (oracle - source) = (source - method) / (source - oracle)``, the share of the distance
reduction that the oracle achieved. The value is undefined (empty cell) when a reference is missing for that
(task, seed, source checkpoint), when a value is NaN, or when the oracle is not better than source-only by at
least :data:`MIN_GAP` (Dice) or 1% of source-only's distance; each empty value gets a reason, and the
leaderboard lists the reasons under its table.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from sfdabench.harness import metric_catalogue
from sfdabench.harness.results import source_model

_SOURCE = "_source_model"  # working column: the source model a row started from
#: Smallest upper - lower difference of a bounded metric (Dice) for which the ratio means anything.
MIN_GAP = 0.01
MIN_RELATIVE_DISTANCE_GAP = 0.01


def _reference(rows: pd.DataFrame, method: str) -> tuple[pd.DataFrame, list[str]]:
    """One run of ``method`` per (task, seed, source model): its rows indexed by that key and organ."""
    ref = rows[rows["method"] == method]
    notes = []
    runs = ref.drop_duplicates("run_id") if "run_id" in ref else ref
    for (task, seed, ckpt), group in runs.groupby(["task", "seed", _SOURCE], sort=False):
        if len(group) > 1:  # e.g. oracle init-source and init-scratch: take the first variant in name order
            chosen = sorted(group["variant"])[0]
            notes.append(f"{task} seed {seed}: several {method} variants ({', '.join(sorted(group['variant']))}); "
                         f"gap_closed uses {chosen}")
            ref = ref[~((ref["task"] == task) & (ref["seed"] == seed) & (ref[_SOURCE] == ckpt)
                        & (ref["variant"] != chosen))]
    return ref.set_index(["task", "seed", _SOURCE, "organ"]), notes


def references() -> tuple[str, str]:
    """(lower, upper): the methods that declare ``reference = "lower"`` / ``"upper"`` ("" where none does)."""
    from sfdabench.harness.plugins import get_registry

    roles = get_registry().references()
    return roles.get("lower", ""), roles.get("upper", "")


def per_seed(rows: pd.DataFrame, metrics: Sequence[str], lower: str | None = None, upper: str | None = None
             ) -> tuple[pd.DataFrame, list[str]]:
    """``rows`` (one run per key and seed) plus a ``gap_closed*`` column per metric and a ``gap_reason``
    column (why the headline metric's gap, ``metrics[0]``'s, is empty, '' where defined); and notes for the
    table. ``lower``/``upper``: the reference methods (default: the registered methods that declare those roles)."""
    if lower is None or upper is None:
        found = references()
        lower, upper = found[0] if lower is None else lower, found[1] if upper is None else upper
    out = rows.copy()
    needed = {"task", "seed", "organ", "method"}
    lacking = sorted(needed - set(rows.columns))
    if "source_weights" not in rows and "source_config" not in rows:
        lacking.append("source_weights")
    if lacking:
        for metric in metrics:
            out[metric_catalogue.gap_column(metric, metrics[0])] = np.nan
        out["gap_reason"] = f"rows lack {', '.join(lacking)}"
        return out, []
    rows = rows.assign(**{_SOURCE: source_model(rows)})
    lo_name, hi_name = lower or "(no lower reference method)", upper or "(no upper reference method)"
    lower, notes_lo = _reference(rows, lower)
    upper, notes_hi = _reference(rows, upper)
    index = pd.MultiIndex.from_frame(rows[["task", "seed", _SOURCE, "organ"]])
    reason = pd.Series("", index=rows.index, dtype=object)
    has_lo = index.isin(lower.index)
    has_hi = index.isin(upper.index)
    reason[~has_hi] = f"no {hi_name} run for this task, seed and source checkpoint"
    reason[~has_lo] = f"no {lo_name} run for this task, seed and source checkpoint"
    reason[~has_lo & ~has_hi] = f"no {lo_name} and no {hi_name} run for this task, seed and source checkpoint"
    for metric in metrics:
        lo = lower[metric].reindex(index).to_numpy(dtype=float) if metric in lower else np.full(len(rows), np.nan)
        hi = upper[metric].reindex(index).to_numpy(dtype=float) if metric in upper else np.full(len(rows), np.nan)
        value = rows[metric].to_numpy(dtype=float)
        span = hi - lo if metric_catalogue.higher_is_better(metric) else lo - hi
        bounded = metric_catalogue.bounded(metric)
        least = MIN_GAP if bounded else MIN_RELATIVE_DISTANCE_GAP * np.abs(lo)
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = np.isfinite(value) & np.isfinite(lo) & np.isfinite(hi) & (span >= least) & (span > 0)
            out[metric_catalogue.gap_column(metric, metrics[0])] = np.where(ok, (value - lo) / (hi - lo), np.nan)
        if metric == metrics[0]:
            known = has_lo & has_hi
            least_text = f"{MIN_GAP} {metric_catalogue.label(metric)}" if bounded else \
                f"{MIN_RELATIVE_DISTANCE_GAP:.0%} of {lo_name}'s {metric_catalogue.label(metric)}"
            reason[known & ~np.isfinite(value)] = "metric is NaN"
            reason[known & np.isfinite(value) & ~(span >= least)] = (
                f"{hi_name} not better than {lo_name} by {least_text}: ratio undefined")
    out["gap_reason"] = reason.to_numpy()
    return out, notes_lo + notes_hi


def reasons_by_group(rows: pd.DataFrame, key: Sequence[str]) -> pd.Series:
    """Per (key, organ): the distinct reasons why seeds have no Dice gap ('' if every seed has one)."""
    return rows.groupby(list(key) + ["organ"], sort=False, dropna=False)["gap_reason"].agg(
        lambda s: "; ".join(dict.fromkeys(v for v in s if v)))
