"""What the harness knows about a metric, read from the metric's class (``sfdabench.api.Metric``) through the
registry: its direction (``higher_is_better``), its display precision (``digits``) and whether its values lie
in [0, 1] (``bounded``: gap-closed then asks for an absolute least gap, a distance a relative one).

Rows, tables, ranks, compare, gap-closed and the report take their metric columns from here, so a metric
plugin's column flows through every table with its own direction. A CSV column is a metric column when a
registered metric has its name; the table order is the order of the columns in the rows (the run's
``metrics.names``), so the headline metric is the first one.
"""
from __future__ import annotations

from typing import Iterable

from sfdabench.api import UsageError


def _classes() -> dict:
    from sfdabench.harness.plugins import get_registry

    return {name: entry.obj for name, entry in get_registry().entries["metrics"].items()}


def names() -> tuple[str, ...]:
    """Every registered metric name (the CSV columns read as numbers)."""
    return tuple(_classes())


def columns(table: Iterable[str]) -> list[str]:
    """The metric columns of a table (a DataFrame or a list of column names), in the table's order."""
    known = _classes()
    return [c for c in table if c in known]


def of_summary(summary) -> list[str]:
    """The metrics of an aggregated table (its ``<metric>_mean`` columns), in its order: the first one is the
    headline metric."""
    known = _classes()
    return [c[:-len("_mean")] for c in summary.columns if c.endswith("_mean") and c[:-len("_mean")] in known]


def _cls(metric: str):
    known = _classes()
    if metric not in known:
        raise UsageError(f"unknown metric '{metric}'; registered: {', '.join(known) or '(none)'} "
                         f"(install the plugin that provides it, see `sfdabench list metrics`)")
    return known[metric]


def higher_is_better(metric: str) -> bool:
    return bool(_cls(metric).higher_is_better)


def digits(metric: str) -> int:
    return int(getattr(_cls(metric), "digits", 3))


def label(metric: str) -> str:
    """The metric's name in table headers (``Dice``, ``HD95``)."""
    return str(getattr(_cls(metric), "label", "") or metric)


def spatial(metric: str) -> bool:
    """Values in the run's distance unit (the rows' ``asd_unit``: mm or voxel)."""
    return bool(getattr(_cls(metric), "spatial", False))


def gap_column(metric: str, headline: str) -> str:
    """The gap-closed column of ``metric``: ``gap_closed`` for the headline metric, else ``gap_closed_<m>``."""
    return "gap_closed" if metric == headline else f"gap_closed_{metric}"


def display_digits(column: str) -> int:
    """Decimals of a table column: a metric's own ``digits``, 2 for gap-closed ratios."""
    return 2 if column.startswith("gap_closed") else digits(column)


def bounded(metric: str) -> bool:
    """Values in [0, 1] (an overlap score), not a distance."""
    return bool(getattr(_cls(metric), "bounded", False))
