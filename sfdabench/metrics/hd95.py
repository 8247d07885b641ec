"""95th-percentile Hausdorff distance (HD95) = ``medpy.metric.binary.hd95``.

``HD95 = percentile(concatenate((d(pred -> gt), d(gt -> pred))), 95)`` with numpy's default (linear)
interpolation, where ``d(A -> B)`` are the distances from each border voxel of A to the nearest border
voxel of B (:func:`sfdabench.metrics.surface.surface_distances`, medpy's definition, connectivity 1).
Computing HD95 right after ASD on the same masks reuses the distances (memo in ``surface``).

Unit (config ``asd_unit``, shared with ASD): "mm" (default) uses the case's (z, y, x) spacing; "voxel"
uses spacing 1.

Empty masks (config ``empty_policy``, see :mod:`sfdabench.metrics`): both empty -> NaN (organ absent,
not scored; medpy would raise). Exactly one empty -> the length of the volume's diagonal in the
metric's unit under "diagonal" (default: a worst-case penalty, so a missed organ is never rewarded),
NaN under "nan".
"""
from __future__ import annotations

import numpy as np

from sfdabench.metrics.surface import SurfaceDistanceMetric


class HD95(SurfaceDistanceMetric):
    """95th percentile of the symmetric (pooled) border distances (medpy hd95)."""

    name = "hd95"
    description = "95th-percentile Hausdorff distance of the pooled border distances (medpy hd95); unit mm or voxel"
    higher_is_better = False
    label = "HD95"

    def reduce(self, d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray) -> float:
        return float(np.percentile(np.concatenate((d_pred_to_gt, d_gt_to_pred)), 95))
