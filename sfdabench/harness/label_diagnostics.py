"""Measurements against target-train ground truth that the method never sees: one service of the harness.

The harness builds one :class:`TargetLabelDiagnostics` per run from the labelled target-train cases (none when
the target has no labels) and lends it to the method's :class:`~sfdabench.api.Context`. A method hands its
pseudo-labels in (``context.pseudo_label_quality``, ``pseudo_label_quality_by_group``, ``box_prompt_ceiling``)
and gets back nothing a decision could use; the numbers go into the run summary. Every measurement is here, in
one place: pseudo-label Dice per organ, the confusion between classes (which class went where: twin-organ
swaps, missed organs), recall and precision per group of slices the method names, and the box-prompt
ceilings (SAM prompted with ground-truth boxes).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from sfdabench.api import Case, SamBackend
from sfdabench.harness.evaluation import dice_per_organ, label_confusion, quality_by_slice_group


#: The pseudo-label stages this service records itself (``Context.box_prompt_ceiling``), with their labels;
#: a method's own stages are labelled by its ``stage_labels``.
CEILING_STAGES = {"gt_box_ceiling": "PL ceiling (GT boxes)", "class_keeping_ceiling": "PL ceiling (class-keeping)"}


class TargetLabelDiagnostics:
    """Scores pseudo-label volumes (one (Z, H, W) array per case, in ``TargetImages`` order) against the
    ground truth of ``cases``. ``box_prompts=False`` leaves the box-prompt ceilings out (they cost one SAM
    decoder call per organ and slice)."""

    def __init__(self, cases: Sequence[Case], organs: Sequence[str], progress: Callable | None = None,
                 box_prompts: bool = True):
        if any(c.label is None for c in cases):
            raise ValueError("target-label diagnostics need labelled cases; build none for an unlabelled target")
        self.box_prompts = box_prompts
        self.images = [c.image for c in cases]
        self.labels = [c.label for c in cases]
        self.organs = list(organs)
        self.progress = progress

    @classmethod
    def of(cls, cases: Sequence[Case], organs: Sequence[str], progress: Callable | None = None,
           box_prompts: bool = True) -> "TargetLabelDiagnostics | None":
        """The service for ``cases``, or None when a case has no label (nothing to measure against)."""
        return cls(cases, organs, progress, box_prompts) if all(c.label is not None for c in cases) else None

    def dice(self, volumes: Sequence[np.ndarray]) -> dict[str, float]:
        """Dice per organ and ``mean`` (see :func:`sfdabench.harness.evaluation.dice_per_organ`)."""
        return dice_per_organ(volumes, self.labels, self.organs)

    def confusion(self, volumes: Sequence[np.ndarray]) -> dict:
        """Voxel counts ground truth class -> pseudo-label class (see
        :func:`sfdabench.harness.evaluation.label_confusion`)."""
        return label_confusion(volumes, self.labels, self.organs)

    def by_group(self, volumes: Sequence[np.ndarray], groups: Mapping[str, Sequence[Sequence[str]]]) -> dict:
        """Recall, precision and Dice per organ and group of slices (``groups[organ][case][z]``)."""
        return quality_by_slice_group(volumes, self.labels, self.organs, groups)

    def box_prompt_ceiling(self, sam: SamBackend, margin: int, scores: tuple[float, float],
                           classes: Sequence[np.ndarray] | None = None) -> tuple[dict[str, float], dict]:
        """Dice per organ of SAM's labels for ground-truth boxes (``margin`` pixels wider), merged with the
        caller's ``scores`` (background, mask); and the prompting statistics. ``classes``: keep those label
        volumes' class identity and presence (the class-keeping ceiling, see :mod:`sfdabench.sam.ceiling`)."""
        from sfdabench.sam.ceiling import gt_box_pseudo_labels

        volumes, stats = gt_box_pseudo_labels(sam, self.images, self.labels, self.organs, margin, scores,
                                              self.progress, classes=classes)
        return self.dice(volumes), stats
