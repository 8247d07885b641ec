"""CHAOS 2019, MR T2-SPIR, from the raw release: one DICOM series + one PNG mask per slice and case.

Layout (``root`` is the folder holding ``MR/``, or ``MR/`` itself)::

    MR/<id>/T2SPIR/DICOM_anon/*.dcm      one slice per file (IMG-0002-00001.dcm, ...)
    MR/<id>/T2SPIR/Ground/*.png          one mask per slice, grey levels 63 liver, 126 right kidney,
                                         189 left kidney, 252 spleen; the file name ends in the slice number

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the cross
product of the ImageOrientationPatient cosines), never by file name. A mask belongs to the DICOM slice whose
InstanceNumber equals the mask file's slice number; every slice needs exactly one mask. The affine comes from
the DICOM geometry (orientation cosines, PixelSpacing, slice positions), so the volume is reoriented to the
display frame like any NIfTI.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sfdabench.api import SfdaBenchError
from sfdabench.hookspecs import hookimpl
from sfdabench_datasets.dicom import DicomSlice, read_dicom_series
from sfdabench_datasets.preprocess import PreparedVolumeAdapter, RawVolume, numbered, reading

def read_masks(slices: list[DicomSlice], mask_files: list[Path]) -> tuple[np.ndarray, list[Path]]:
    """Masks stacked in the order of ``slices``, matched by InstanceNumber == the file name's slice number."""
    by_number: dict[int, Path] = {}
    for path in mask_files:
        number = numbered(path.stem)
        if number is None:
            raise SfdaBenchError(f"{path}: mask file name carries no slice number")
        if number in by_number:
            raise SfdaBenchError(f"{path}: slice number {number} also used by {by_number[number]}")
        by_number[number] = path
    instances = {s.instance: s for s in slices}
    if len(instances) != len(slices):
        raise SfdaBenchError(f"{slices[0].path.parent}: DICOM InstanceNumbers repeat; cannot match masks to slices")
    for number, path in by_number.items():
        if number not in instances:
            raise SfdaBenchError(f"{path}: no DICOM slice with InstanceNumber {number} in {slices[0].path.parent}")
    from PIL import Image

    masks, files = [], []
    for s in slices:
        path = by_number.get(s.instance)
        if path is None:
            raise SfdaBenchError(f"{s.path}: no mask for this slice (InstanceNumber {s.instance}) in "
                                 f"{mask_files[0].parent if mask_files else 'Ground/'}")
        with reading(path), Image.open(path) as png:
            mask = np.asarray(png)
        if mask.ndim == 3:          # RGB(A) export of a grey mask: channels must agree
            if not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, min(3, mask.shape[2]))):
                raise SfdaBenchError(f"{path}: colour mask; expected grey levels 0/63/126/189/252")
            mask = mask[..., 0]
        if mask.shape != s.pixels.shape:
            raise SfdaBenchError(f"{path}: mask size {mask.shape} != DICOM slice size {s.pixels.shape} of {s.path}")
        masks.append(mask)
        files.append(path)
    return np.stack(masks), files


class ChaosDataset(PreparedVolumeAdapter):
    """CHAOS 2019 MR T2-SPIR, raw DICOM series + PNG masks (the DFG/ProtoContra MR domain)."""

    name = "chaos"
    title = "CHAOS (MR T2-SPIR)"
    download_url = "https://chaos.grand-challenge.org"
    expected_layout = "<root>/MR/<id>/T2SPIR/DICOM_anon/*.dcm + <root>/MR/<id>/T2SPIR/Ground/*.png"
    default_modality = "mr"
    native_labels = {63: "liver", 126: "right_kidney", 189: "left_kidney", 252: "spleen"}

    def mr_folder(self) -> Path:
        root = self.checked_root()
        return root / "MR" if (root / "MR").is_dir() else root

    def layout_found(self, root: Path) -> bool:
        mr = root / "MR" if (root / "MR").is_dir() else root
        return any(mr.glob("*/T2SPIR/DICOM_anon"))

    def normalise_case_id(self, case_id: Any) -> str:
        return str(int(case_id)) if str(case_id).isdigit() else str(case_id)

    def _folders(self, case_id: str) -> tuple[Path, Path]:
        series = self.mr_folder() / case_id / "T2SPIR"
        return series / "DICOM_anon", series / "Ground"

    def case_files(self, case_id: str) -> list[Path]:
        dicom_dir, ground_dir = self._folders(case_id)
        for folder in (dicom_dir, ground_dir):
            if not folder.is_dir():
                raise SfdaBenchError(f"CHAOS case {case_id}: {folder} not found (the case is listed in the task's "
                                     "splits; CHAOS MR ids are 1-39)")
        dicoms, masks = sorted(dicom_dir.glob("*.dcm")), sorted(ground_dir.glob("*.png"))
        if not dicoms or not masks:
            raise SfdaBenchError(f"CHAOS case {case_id}: no {'*.dcm' if not dicoms else '*.png'} files in "
                                 f"{dicom_dir if not dicoms else ground_dir}")
        return dicoms + masks

    def read_case(self, case_id: str) -> RawVolume:
        dicom_dir, ground_dir = self._folders(case_id)
        slices, affine = read_dicom_series(sorted(dicom_dir.glob("*.dcm")))
        label, mask_files = read_masks(slices, sorted(ground_dir.glob("*.png")))
        image = np.stack([s.pixels for s in slices])
        return RawVolume.from_affine(image, label, affine, ground_dir, mask_files)


@hookimpl
def sfdabench_datasets() -> list[type]:
    return [ChaosDataset]
