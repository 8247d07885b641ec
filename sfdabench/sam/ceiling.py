"""The ceiling of box prompting: SAM prompted with the *ground-truth* box of every organ on every slice.

No box search can give better pseudo-labels with a given SAM backend than the box drawn tightly around the
true organ (plus the searcher's own margin): this is the reference against which DFG's "box-search
efficiency" is measured (pseudo-label Dice of the search / pseudo-label Dice of the ceiling). It reads target
labels, so it is a diagnostic: the harness computes it from labels a method never sees
(:meth:`sfdabench.api.Context.box_prompt_ceiling`), and a method that trains on it declares
``uses_target_labels`` and is never ranked as SFDA.

Per slice and organ present in the ground truth: one box (``box_around`` the organ's pixels with ``margin``),
one decoder call, the largest filled contour of SAM's mask (as every SAM-guided method here post-processes
SAM's masks). Classes are merged by the caller's scores, as a box-prompting method merges its own classes:
background scores ``scores[0]`` everywhere, a class's SAM mask ``scores[1]``; argmax, ties to the lower class
index (DFG: 0.5 and 2, its merge minus the fallback, which needs a prediction). A slice without any organ is
not embedded.
"""
from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

from sfdabench.api import SamBackend
from sfdabench.sam.masks import box_around, largest_contour

def _boxes_true_classes(label: np.ndarray, num_classes: int) -> dict[int, np.ndarray]:
    """Every organ present in the ground truth, prompted as its true class."""
    return {c: label == c for c in range(1, num_classes) if np.any(label == c)}


def _boxes_kept_classes(label: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[int, np.ndarray]:
    """Every class a model predicts on the slice, prompted with the ground-truth organ its region overlaps
    most (labelled as the *predicted* class, so a twin-organ swap stays a swap); a region on background only
    gets no box (a false positive no box can fix)."""
    out = {}
    for c in range(1, num_classes):
        region = predicted == c
        if not region.any():
            continue
        overlap = np.bincount(label[region].astype(np.int64), minlength=num_classes)[1:num_classes]
        if overlap.max() > 0:
            out[c] = label == int(overlap.argmax()) + 1
    return out


def gt_box_slice(sam: SamBackend, image: np.ndarray, label: np.ndarray, num_classes: int, margin: int,
                 scores: tuple[float, float], predicted: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """One slice: merged uint8 pseudo-label from ground-truth boxes, and per prompted class ``sam`` or
    ``empty`` (SAM returned nothing for the box). ``predicted``: keep that label map's classes (see
    :func:`_boxes_kept_classes`) instead of the ground truth's."""
    regions = (_boxes_true_classes(label, num_classes) if predicted is None
               else _boxes_kept_classes(label, predicted, num_classes))
    if not regions:
        return np.zeros(label.shape, dtype=np.uint8), {}
    embedding = sam.embed(image)
    score_map = np.zeros((num_classes, *label.shape), dtype=np.float32)
    score_map[0] = scores[0]
    outcomes = {}
    for c, organ in regions.items():
        mask = largest_contour(np.asarray(sam.decode(embedding, box_around(organ, margin))))
        if mask is not None and mask.any():
            score_map[c][mask] = scores[1]
            outcomes[c] = "sam"
        else:
            outcomes[c] = "empty"
    return score_map.argmax(axis=0).astype(np.uint8), outcomes


def gt_box_pseudo_labels(sam: SamBackend, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                         organs: Sequence[str], margin: int, scores: tuple[float, float],
                         progress: Callable | None = None, classes: Sequence[np.ndarray] | None = None
                         ) -> tuple[list[np.ndarray], dict]:
    """Ground-truth-box pseudo-label volumes (one per case, like ``images``) and statistics. ``scores``:
    (background, SAM mask) of the merge. ``classes``: label volumes whose class identity and presence to keep
    (the class-keeping ceiling)."""
    num_classes = len(organs) + 1
    out = [np.zeros(lab.shape, dtype=np.uint8) for lab in labels]
    outcomes = {organ: collections.Counter() for organ in organs}
    work = [(ci, z) for ci, lab in enumerate(labels) for z in range(lab.shape[0])]
    desc = "box-prompt ceiling" + (" (class-keeping)" if classes is not None else "")
    for ci, z in (progress(work, desc=desc) if progress else work):
        predicted = None if classes is None else classes[ci][z]
        out[ci][z], result = gt_box_slice(sam, images[ci][z], labels[ci][z], num_classes, margin, scores, predicted)
        for c, outcome in result.items():
            outcomes[organs[c - 1]][outcome] += 1
    stats = {"box_margin": int(margin), "scores": [float(v) for v in scores], "slices": len(work),
             "decoder_calls": int(sum(sum(c.values()) for c in outcomes.values())),
             "outcomes": {o: dict(c) for o, c in outcomes.items()}}
    return out, stats
