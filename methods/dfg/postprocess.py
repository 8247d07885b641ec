"""DFG connectivity post-processing (CP, spec 5) of a pseudo-label volume."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def connectivity_postprocess(label_volume: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep, per foreground class, only the largest 3D connected component; the rest becomes background.

    ``label_volume``: uint8 (Z, H, W) pseudo-labels of one case, slices in order. Components use SciPy's
    default structuring element (6-connectivity: face neighbours only), as the original code does; of
    equally large components the first in scan order is kept. Returns a new uint8 volume.
    """
    volume = np.asarray(label_volume)
    if volume.ndim != 3:
        raise ValueError(f"connectivity post-processing needs a (Z, H, W) volume, got shape {volume.shape}")
    result = volume.astype(np.uint8, copy=True)
    for c in range(1, num_classes):
        components, count = ndimage.label(volume == c)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0                                    # label 0 is "not this class"
        largest = int(np.argmax(sizes))
        result[(components != 0) & (components != largest)] = 0
    return result
