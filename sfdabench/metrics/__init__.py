"""Built-in volume metrics: Dice, ASD and HD95 (a pluggy plugin module, entry point ``builtin_metrics``).

Each metric is a :class:`sfdabench.api.Metric` in its own module (:mod:`.dice`, :mod:`.asd`,
:mod:`.hd95`) and equals medpy 0.5.2 on non-empty masks (ASD: ``asd_reduction`` chooses medpy 0.5.2's union mean or the papers' mean of directed means, see
:mod:`.asd`). The surface distances are computed once per (pred, gt, spacing) on a crop around the
masks (:mod:`.surface`), tens of times faster than medpy on abdominal volumes.

Config (the metric ``cfg`` mapping):

* ``asd_unit``: "mm" (default: distances in mm from the case's (z, y, x) spacing) or "voxel" (spacing
  forced to 1 on every axis, the paper protocol). Applies to ASD and HD95; Dice has no unit.
* ``empty_policy``: "diagonal" (default) or "nan"; see below.

Empty-mask policy (one organ of one case; ``pred`` = prediction, ``gt`` = ground truth):

=================  ==========  ====================================================================
case               Dice        ASD / HD95
=================  ==========  ====================================================================
both empty         NaN         NaN
exactly one empty  0.0         "diagonal": length of the volume's diagonal in the metric's unit,
                               ``sqrt(sum((shape_i * spacing_i) ** 2))``; "nan": NaN
=================  ==========  ====================================================================

Why: both empty means the organ is absent from the case, so there is nothing to score; NaN values are
left out of means and counted in the run summary. We deliberately do not inherit medpy's accidental
behaviour there (``dc`` returns 1.0 from a caught ZeroDivisionError; ``assd``/``hd95`` raise). With
exactly one mask empty the distances are undefined; the diagonal is a worst-case penalty (no two voxels
are farther apart), so missing an organ, or hallucinating one, never scores better than a poor
segmentation, whereas NaN would silently drop the failure from the mean. ``empty_policy_tag`` gives a
short description of the policy in force for result rows.
"""
from __future__ import annotations

from typing import Any, Mapping

from sfdabench.hookspecs import hookimpl
from sfdabench.metrics.asd import ASD
from sfdabench.metrics.dice import Dice
from sfdabench.metrics.hd95 import HD95
from sfdabench.metrics.surface import metric_options

__all__ = ["ASD", "Dice", "HD95", "empty_policy_tag", "sfdabench_metrics"]


def empty_policy_tag(cfg: Mapping[str, Any] | None = None) -> str:
    """Short description of the empty-mask policy of a metric config, for result rows.

    >>> empty_policy_tag({})
    'both_empty=nan;one_empty=dice0,dist=diagonal'
    >>> empty_policy_tag({"empty_policy": "nan"})
    'both_empty=nan;one_empty=dice0,dist=nan'
    """
    _, policy = metric_options(cfg)
    return f"both_empty=nan;one_empty=dice0,dist={policy}"


@hookimpl
def sfdabench_metrics() -> list[type]:
    return [Dice, ASD, HD95]
