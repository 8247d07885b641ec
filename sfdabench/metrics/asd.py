"""Average symmetric surface distance (ASD / ASSD).

``d(A -> B)`` are the distances from each border voxel of A to the nearest border voxel of B
(:func:`sfdabench.metrics.surface.surface_distances`: medpy's border and distance, connectivity 1).
Two definitions are in use, chosen by the config key ``asd_reduction``:

* ``union`` (default): the mean of *all* surface distances in both directions,
  ``mean(concat(d(pred -> gt), d(gt -> pred)))`` = ``medpy.metric.binary.assd`` of medpy 0.5.2.
* ``directed_mean``: the mean of the two directed means, ``(mean(d(pred -> gt)) + mean(d(gt -> pred))) / 2``
  = DeepMind ``surface-distance``'s average surface distance averaged over both directions, which the
  DFG / ProtoContra code reports (spec 6.3), and medpy's ``assd`` up to 0.4.
The two agree only when both borders have the same number of voxels. The reduction is part of every
result row's ``metric_version``.

Unit (config ``asd_unit``): "mm" (default) uses the case's (z, y, x) spacing; "voxel" uses spacing 1.

Empty masks (config ``empty_policy``, see :mod:`sfdabench.metrics`): both empty -> NaN (organ absent,
not scored; medpy would raise). Exactly one empty -> the length of the volume's diagonal in the
metric's unit under "diagonal" (default: a worst-case penalty, so a missed organ is never rewarded),
NaN under "nan".
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sfdabench.metrics.surface import SurfaceDistanceMetric

REDUCTIONS = ("union", "directed_mean")


class ASD(SurfaceDistanceMetric):
    """Average symmetric surface distance (medpy 0.5.2 assd; or the papers' mean of directed means)."""

    name = "asd"
    description = ("average symmetric surface distance: mean of all border distances in both directions "
                   "(medpy 0.5.2 assd; asd_reduction=directed_mean for the papers'); unit mm or voxel")
    higher_is_better = False
    label = "ASD"

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        super().__init__(cfg)
        self.reduction = str(self.cfg.get("asd_reduction", "union"))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"asd_reduction must be one of {REDUCTIONS}, got {self.reduction!r}")

    def reduce(self, d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray) -> float:
        if self.reduction == "union":
            return float(np.concatenate([d_pred_to_gt, d_gt_to_pred]).mean())
        return float((d_pred_to_gt.mean() + d_gt_to_pred.mean()) / 2.0)
