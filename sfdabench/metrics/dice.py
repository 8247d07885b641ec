"""Dice similarity coefficient, ``2|A ∩ B| / (|A| + |B|)`` (= ``medpy.metric.binary.dc``).

Empty masks (the benchmark's policy, see :mod:`sfdabench.metrics`):

* both empty -> NaN: the organ is absent from this case, which is not scored (left out of means and
  counted in the summary). medpy's ``dc`` returns 1.0 here, a by-product of catching a division by
  zero; we deliberately do not inherit it, so an absent organ never inflates a mean.
* exactly one empty -> 0.0 (the formula's value: no overlap). ``empty_policy`` does not change Dice.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from sfdabench.api import Metric
from sfdabench.metrics.surface import check_inputs, metric_options


class Dice(Metric):
    """Dice similarity coefficient of one organ, in [0, 1]; NaN if the organ is absent from both masks."""

    name = "dice"
    description = "Dice similarity coefficient 2|A∩B|/(|A|+|B|) (medpy dc); NaN if both masks are empty"
    higher_is_better = True
    bounded = True
    digits = 3
    label = "Dice"

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        super().__init__(cfg)
        metric_options(self.cfg)  # the metric config is shared: reject a typo in it whichever metric runs

    def __call__(self, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
        p, g, _ = check_inputs(pred, gt, spacing)  # spacing is unused but validated like the others
        total = np.count_nonzero(p) + np.count_nonzero(g)
        if total == 0:
            return math.nan
        return 2.0 * np.count_nonzero(p & g) / total
