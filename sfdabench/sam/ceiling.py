"""The ceiling of box prompting: SAM prompted with the *ground-truth* box of every organ on every slice.

No box search can give better pseudo-labels with a given SAM backend than the box drawn tightly around the
true organ (plus the searcher's own margin): this is the reference against which DFG's "box-search
efficiency" is measured (pseudo-label Dice of the search / pseudo-label Dice of the ceiling). It reads target
labels, so it is a diagnostic: the harness computes it from labels a method never sees
(:meth:`sfdabench.api.Context.compare_with_box_ceiling`), and the ``box_ceiling`` method, which trains on it,
declares ``uses_target_labels`` and is never ranked as SFDA.

Per slice and organ present in the ground truth: one box (``box_around`` the organ's pixels with ``margin``),
one decoder call, the largest filled contour of SAM's mask (as every SAM-guided method here post-processes
SAM's masks). Classes are merged with DFG's rule (spec 4.4) minus the fallback, which needs a prediction:
background scores 0.5, a class's SAM mask 2; argmax, ties to the lower class index. A slice without any
organ is not embedded.
"""
from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

from sfdabench.api import SamBackend
from sfdabench.sam.masks import box_around, largest_contour

SCORE_BACKGROUND, SCORE_SAM = 0.5, 2.0       # DFG's merge scores (spec 4.4)


def gt_box_slice(sam: SamBackend, image: np.ndarray, label: np.ndarray, num_classes: int, margin: int
                 ) -> tuple[np.ndarray, dict[int, str]]:
    """One slice: merged uint8 pseudo-label from ground-truth boxes, and per present class ``sam`` or
    ``empty`` (SAM returned nothing for the true box)."""
    present = [c for c in range(1, num_classes) if np.any(label == c)]
    if not present:
        return np.zeros(label.shape, dtype=np.uint8), {}
    embedding = sam.embed(image)
    scores = np.zeros((num_classes, *label.shape), dtype=np.float32)
    scores[0] = SCORE_BACKGROUND
    outcomes = {}
    for c in present:
        mask = largest_contour(np.asarray(sam.decode(embedding, box_around(label == c, margin))))
        if mask is not None and mask.any():
            scores[c][mask] = SCORE_SAM
            outcomes[c] = "sam"
        else:
            outcomes[c] = "empty"
    return scores.argmax(axis=0).astype(np.uint8), outcomes


def gt_box_pseudo_labels(sam: SamBackend, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                         organs: Sequence[str], margin: int, progress: Callable | None = None
                         ) -> tuple[list[np.ndarray], dict]:
    """Ground-truth-box pseudo-label volumes (one per case, like ``images``) and statistics."""
    num_classes = len(organs) + 1
    out = [np.zeros(lab.shape, dtype=np.uint8) for lab in labels]
    outcomes = {organ: collections.Counter() for organ in organs}
    work = [(ci, z) for ci, lab in enumerate(labels) for z in range(lab.shape[0])]
    for ci, z in (progress(work, desc="box-prompt ceiling") if progress else work):
        out[ci][z], result = gt_box_slice(sam, images[ci][z], labels[ci][z], num_classes, margin)
        for c, outcome in result.items():
            outcomes[organs[c - 1]][outcome] += 1
    stats = {"box_margin": int(margin), "slices": len(work),
             "decoder_calls": int(sum(sum(c.values()) for c in outcomes.values())),
             "outcomes": {o: dict(c) for o, c in outcomes.items()}}
    return out, stats
