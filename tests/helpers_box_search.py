"""Synthetic slices with a fake, box-sensitive SAM for the DFG box search, and the check of a search against the
reference implementation (``benchmarks/reference_box_search.py``). Shared by tests/test_box_search.py,
tests/test_box_search_options.py and ``benchmarks/bench_box_search.py``."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_box_search import reference_search_slice  # noqa: E402  (also makes sfdabench_methods importable)

from sfdabench.api import SamBackend, SamEmbedding  # noqa: E402
from sfdabench_methods.dfg import box_search as bs  # noqa: E402
from sfdabench_methods.dfg.box_search import BoxSearchConfig, search_slice  # noqa: E402

#: The task's organs in label order, from the organ catalogue (the box search's per-organ settings are keyed by them).
ABDOMEN = list(yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "organs" /
                                            "abdomen4.yaml").read_text())["organs"])
NUM_CLASSES = len(ABDOMEN) + 1     # background + spleen, right kidney, left kidney, liver


# ------------------------------------------------------------------------------ fake SAM and slices


class FakeSam(SamBackend):
    """Box-sensitive stand-in for SAM built from a known organ label map.

    decode(box) picks the organ with most pixels inside the box and returns it restricted to the box: a box
    that cuts the organ gives a partial mask, a tight or slightly larger box the whole organ, and a box that
    exceeds the organ's extent by more than ``slack`` pixels (on average per side) leaks into the surroundings
    in proportion. A box over background only gives an empty mask. ``boundary_noise`` (px) moves the mask's
    boundary by a pseudo-random amount that depends on the box alone, so nearby boxes disagree a little (and the
    same box always gives the same mask). Every call is recorded.
    """

    name = "fake"

    def __init__(self, organs: np.ndarray, sam_features: torch.Tensor, slack: float = 3.0, leak_rate: float = 1.0,
                 boundary_noise: float = 0.0):
        super().__init__({}, torch.device("cpu"))
        self.boundary_noise = boundary_noise
        self.organs = organs
        self.sam_features = sam_features
        self.slack = slack
        self.leak_rate = leak_rate
        self.calls: list[tuple[int, ...]] = []
        self._distance = {}
        self._depth = {}
        self._extent = {}
        for k in np.unique(organs[organs > 0]):
            self._distance[int(k)] = ndimage.distance_transform_edt(organs != k)
            self._depth[int(k)] = ndimage.distance_transform_edt(organs == k)
            rows, cols = np.nonzero(organs == k)
            self._extent[int(k)] = (cols.min(), rows.min(), cols.max(), rows.max())

    def embed(self, image: np.ndarray) -> SamEmbedding:
        return SamEmbedding(features=self.sam_features, image_size=tuple(self.organs.shape))

    def decode(self, embedding: SamEmbedding, box) -> np.ndarray:
        self.calls.append(tuple(int(v) for v in box))
        height, width = self.organs.shape
        x_min, y_min, x_max, y_max = (int(v) for v in box)
        inside = np.zeros((height, width), dtype=bool)
        inside[max(y_min, 0):min(y_max, height - 1) + 1, max(x_min, 0):min(x_max, width - 1) + 1] = True
        counts = np.bincount(self.organs[inside], minlength=int(self.organs.max()) + 1)
        counts[0] = 0
        if counts.max() == 0:
            return np.zeros((height, width), dtype=bool)
        organ = int(np.argmax(counts))
        ox_min, oy_min, ox_max, oy_max = self._extent[organ]
        excess = np.mean([max(ox_min - x_min, 0), max(oy_min - y_min, 0),
                          max(x_max - ox_max, 0), max(y_max - oy_max, 0)])
        leak = self.leak_rate * max(0.0, excess - self.slack)
        if self.boundary_noise:
            jitter = np.random.default_rng([v + 1000 for v in (x_min, y_min, x_max, y_max)]).random()
            leak += self.boundary_noise * jitter
            # the jitter may also shrink the organ: distance to the outside, inside the organ
            if jitter < 0.3:
                return (self._depth[organ] > 1.0) & inside
        return (self._distance[organ] <= leak) & inside


class SyntheticSlice:
    """Ground-truth organs, target features, target probabilities and a fake SAM for one slice."""

    def __init__(self, organs, features, probs, sam):
        self.organs = organs
        self.features = features
        self.probs = probs
        self.sam = sam
        self.image = (organs > 0) * 0.5 + 0.25 + 0.05 * np.sin(np.arange(organs.shape[1]) / 3.0)[None]
        self.embedding = sam.embed(self.image)


def _ellipse(size, centre, radii, angle):
    yy, xx = np.mgrid[:size, :size].astype(float)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    return (u / radii[1]) ** 2 + (v / radii[0]) ** 2 <= 1.0


def _signed_distance(mask):
    return ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)


def make_synthetic_slice(size: int, seed: int, *, present=(1, 2, 3, 4), under_segment=None, split_organ=None,
                         split_quantile=0.5, false_positive=None, feature_noise=None, slack=None,
                         boundary_noise=0.0) -> SyntheticSlice:
    """A slice with elliptic organs. Target features: one cluster per organ (+ noise; ``split_organ`` gets a
    second sub-cluster right of its ``split_quantile`` column, which TBS cannot cross); SAM features: one cluster per organ at 1/4 resolution (+ noise).
    Probabilities peak inside each organ eroded by ``under_segment`` px; ``false_positive`` = a class that is
    also predicted in a blob away from its organ."""
    rng = np.random.default_rng(seed)
    scale = size / 64
    organs = np.zeros((size, size), dtype=np.int64)
    for c in present:
        centre = rng.uniform(0.22, 0.78, size=2) * size
        radii = rng.uniform(6, 12, size=2) * scale
        organs[_ellipse(size, centre, radii, rng.uniform(0, math.pi)) & (organs == 0)] = c

    channels = 8
    noise = rng.uniform(0.01, 0.035) if feature_noise is None else feature_noise
    centres = rng.normal(size=(NUM_CLASSES + 1, channels))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = organs.copy()
    if split_organ is not None and (organs == split_organ).any():
        cols = np.nonzero(organs == split_organ)[1]
        split_column = np.quantile(cols, split_quantile)
        cluster[(organs == split_organ) & (np.arange(size)[None] > split_column)] = NUM_CLASSES
    background_field = ndimage.gaussian_filter(rng.normal(size=(channels, size, size)), (0, 2, 2)) * 3
    features = centres[cluster].transpose(2, 0, 1) + noise * rng.normal(size=(channels, size, size))
    features = np.where(organs[None] == 0, features + background_field, features)

    low = size // 4
    sam_centres = rng.normal(size=(NUM_CLASSES, 16))
    sam_features = sam_centres[organs[::4, ::4]].transpose(2, 0, 1) + 0.15 * rng.normal(size=(16, low, low))

    under = rng.integers(0, 4) * scale if under_segment is None else under_segment
    logits = np.zeros((NUM_CLASSES, size, size))
    for c in range(1, NUM_CLASSES):
        predicted = ndimage.binary_erosion(organs == c, iterations=int(under)) if under else organs == c
        if false_positive == c:
            predicted |= _ellipse(size, rng.uniform(0.15, 0.85, 2) * size, (4 * scale, 5 * scale), 0.0)
        if predicted.any():
            logits[c] = 1.5 * np.clip(_signed_distance(predicted), -4, 6)
        else:
            logits[c] = -6.0
        logits[c] += 0.05 * rng.normal(size=(size, size))
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=0)

    sam = FakeSam(organs, torch.from_numpy(sam_features).float(),
                  slack=rng.uniform(1, 5) * scale if slack is None else slack, boundary_noise=boundary_noise)
    return SyntheticSlice(organs, torch.from_numpy(features).float(), probs, sam)


def random_slice(size: int, seed: int) -> SyntheticSlice:
    """Varied slices for the equivalence tests: absent organs, split clusters, false positives."""
    rng = np.random.default_rng(1000 + seed)
    present = tuple(c for c in range(1, NUM_CLASSES) if rng.random() < 0.75) or (1,)
    absent = [c for c in range(1, NUM_CLASSES) if c not in present]
    # a false positive preferably for an absent organ: then SAM may find nothing under its box
    false_positive = int(rng.choice(absent)) if absent else int(rng.integers(1, NUM_CLASSES))
    return make_synthetic_slice(size, seed, present=present,
                                split_organ=int(rng.integers(1, NUM_CLASSES)) if rng.random() < 0.5 else None,
                                false_positive=false_positive if rng.random() < 0.6 else None,
                                boundary_noise=rng.uniform(0.5, 2.5) * size / 64 if rng.random() < 0.5 else 0.0)


def run(slice_: SyntheticSlice, cfg: BoxSearchConfig, decode_cache=None) -> bs.SliceResult:
    return search_slice(slice_.features, slice_.probs, slice_.sam, slice_.embedding, cfg, decode_cache)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def _assert_same_as_reference(slice_, cfg, seen):
    result = run(slice_, cfg)
    expected_label, expected_outcomes, reference_calls = reference_search_slice(
        slice_.features, slice_.probs, slice_.sam, slice_.embedding, cfg)
    np.testing.assert_array_equal(result.pseudo_label, expected_label)
    assert {c: (t.outcome, t.stage) for c, t in result.classes.items()} == expected_outcomes
    assert reference_calls == sum(len(t.steps) for t in result.classes.values())
    seen.update((t.outcome, t.stage) for t in result.classes.values())
