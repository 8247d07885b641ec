"""Box-prompt and mask primitives shared by every SAM-guided method (DFG, sam_refine, ...).

Boxes are ``(x_min, y_min, x_max, y_max)`` inclusive pixel indices of the slice (the SamBackend convention).
"""
from __future__ import annotations

import cv2
import numpy as np

Box = tuple[int, int, int, int]


def round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (12.5 -> 12); half-up is the rule one would do by hand.
    return int(np.floor(x + 0.5))


def scale_pixels(value: float, size: tuple[int, int], reference_size: float, kind: str) -> int:
    """A pixel setting written for ``reference_size``-px slices, for slices of ``size`` (H, W): a pixel count
    (``kind="area"``) scales with H*W / reference_size**2, a length (``"length"``) with H / reference_size;
    rounded half-up, at least 1. The one scaling rule of DFG's box search, sam_refine and box_ceiling."""
    scale = {"area": size[0] * size[1] / float(reference_size) ** 2, "length": size[0] / float(reference_size)}
    if kind not in scale:
        raise ValueError(f"kind must be 'area' or 'length', got {kind!r}")
    return max(1, round_half_up(float(value) * scale[kind]))


def largest_contour(mask: np.ndarray) -> np.ndarray | None:
    """The largest external contour of a binary mask (by contour area), filled; None if there is none."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)     # first of equal areas: deterministic
    filled = np.zeros(np.shape(mask), dtype=np.uint8)
    cv2.drawContours(filled, [largest], -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def box_around(mask: np.ndarray, margin: int) -> Box:
    """Bounding box of a non-empty mask, expanded by ``margin`` on each side and clipped to the image."""
    height, width = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (max(int(cols[0]) - margin, 0), max(int(rows[0]) - margin, 0),
            min(int(cols[-1]) + margin, width - 1), min(int(rows[-1]) + margin, height - 1))
