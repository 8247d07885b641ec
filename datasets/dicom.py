"""DICOM series shared by the raw-DICOM adapters (chaos, ircadb): one slice per file, read with its geometry.

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the cross
product of the ImageOrientationPatient cosines), never by file name or InstanceNumber; the gaps must be even.
The RAS affine of the stacked (slice, row, column) array comes from the orientation cosines, PixelSpacing and
the slice positions, so the shared preprocessing brings it to the display frame like any NIfTI.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from sfdabench.api import SfdaBenchError
from sfdabench_datasets.preprocess import reading

#: relative tolerance on slice gaps: a larger deviation means a missing or misplaced slice
SLICE_GAP_TOLERANCE = 0.1


class DicomSlice:
    """Header facts of one DICOM file plus its pixels (modality LUT applied)."""

    def __init__(self, path: Path, source: BinaryIO | None = None):
        """``path`` names the file in messages; ``source`` (e.g. a zip member in memory) is read instead of
        ``path`` when given."""
        import pydicom

        with reading(path):
            ds = pydicom.dcmread(source if source is not None else str(path))
            missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                                   "InstanceNumber", "PixelData") if k not in ds]
            if missing:
                raise SfdaBenchError(f"{path}: DICOM file without {', '.join(missing)}; not an image slice of a "
                                     "series (corrupt file?)")
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            self.pixels = ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
            self.position = np.array([float(v) for v in ds.ImagePositionPatient])
            self.cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
            self.pixel_spacing = np.array([float(v) for v in ds.PixelSpacing])       # (row step, column step)
            self.instance = int(ds.InstanceNumber)
        if self.pixels.ndim != 2:
            raise SfdaBenchError(f"{path}: expected a 2D slice, got pixel array {self.pixels.shape}")
        self.path = path


def read_dicom_series(files: list[Path]) -> tuple[list[DicomSlice], np.ndarray]:
    """Slices sorted along the slice normal, and the RAS affine of the stacked (slice, row, column) array."""
    return sort_series([DicomSlice(f) for f in files])


def sort_series(slices: list[DicomSlice]) -> tuple[list[DicomSlice], np.ndarray]:
    """``read_dicom_series`` for slices already read (from a zip, say)."""
    slices = list(slices)
    first = slices[0]
    if len(slices) < 2:
        raise SfdaBenchError(f"{first.path}: a series of one slice has no slice spacing")
    for s in slices[1:]:
        if not np.allclose(s.cosines, first.cosines, atol=1e-4) or s.pixels.shape != first.pixels.shape \
                or not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise SfdaBenchError(f"{s.path}: orientation, size or pixel spacing differs from {first.path}; "
                                 "the folder mixes series")
    row_cos, col_cos = first.cosines[:3], first.cosines[3:]     # directions of increasing column / row index
    normal = np.cross(row_cos, col_cos)
    slices.sort(key=lambda s: float(s.position @ normal))
    along = np.array([s.position @ normal for s in slices])
    gaps = np.diff(along)
    if np.min(gaps) < 1e-3:
        i = int(np.argmin(gaps))
        raise SfdaBenchError(f"{slices[i + 1].path}: same slice position as {slices[i].path}; duplicate slice")
    bad = np.flatnonzero(np.abs(gaps - np.median(gaps)) > SLICE_GAP_TOLERANCE * np.median(gaps))
    if bad.size:
        i = int(bad[0])
        raise SfdaBenchError(f"{slices[i + 1].path}: slice gap {gaps[i]:.2f} mm after {slices[i].path} differs "
                             f"from the series' {np.median(gaps):.2f} mm (missing slice?)")
    step = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    lps = np.eye(4)
    lps[:3, 0] = step                                           # array axis 0: slice
    lps[:3, 1] = col_cos * first.pixel_spacing[0]               # array axis 1: row index
    lps[:3, 2] = row_cos * first.pixel_spacing[1]               # array axis 2: column index
    lps[:3, 3] = slices[0].position
    return slices, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps        # DICOM LPS -> nibabel RAS
