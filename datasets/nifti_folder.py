"""Any folder of image/label volume pairs, named by file patterns, with the label map in config.

Two file formats, chosen by extension:

- NIfTI (``.nii``, ``.nii.gz``): orientation and spacing from the affine; image and label must share the grid.
- npz arrays (``.npz``), e.g. the CVPR-BiomedSegFM conversion of AMOS (``imgs`` / ``gts`` / ``spacing``):
  no affine, so the orientation of the array axes is declared in config (``npz.axcodes``, nibabel codes of
  the direction each axis increases towards) and the spacing read from a key (``npz.spacing_order``: ``xyz``
  when stored as (x, y, z) for (z, y, x) arrays).

Example (the CHAOS MR sample: ``image_<id>.nii.gz`` / ``label_<id>.nii.gz``, labels 1 liver .. 4 spleen)::

    dataset: nifti_folder
    params:
      root: ${data.sample.root}
      image_pattern: chaos_mr/image_{id}.nii.gz
      label_pattern: chaos_mr/label_{id}.nii.gz
      modality: mr
      label_map: {liver: 1, right_kidney: 2, left_kidney: 3, spleen: 4}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sfdabench.api import SfdaBenchError
from sfdabench.hookspecs import hookimpl
from sfdabench_datasets.preprocess import (PreparedVolumeAdapter, RawVolume, check_same_grid, ornt_from_axcodes,
                                           read_nifti_pair, reading)

NPZ_DEFAULTS = {"image_key": "imgs", "label_key": "gts", "spacing_key": "spacing", "spacing_order": "xyz",
                "axcodes": None}


class NiftiFolderDataset(PreparedVolumeAdapter):
    """A folder of image/label NIfTI (or npz) pairs named by patterns; label map and modality in config.

    ``params``: ``image_pattern`` / ``label_pattern`` (paths relative to ``root`` with ``{id}`` for the case
    id; default ``image_{id}.nii.gz`` / ``label_{id}.nii.gz``), ``modality`` (required), ``label_map``
    (required), ``unused_labels``, and for npz files ``npz: {image_key, label_key, spacing_key,
    spacing_order, axcodes}`` (axcodes required). Plus the common params of PreparedVolumeAdapter.
    """

    name = "nifti_folder"
    description = "Any folder of image/label NIfTI or npz volume pairs (file patterns and label map in config)"
    title = "NIfTI folder"
    download_url = "wherever the task's description says"

    def __init__(self, cfg: Mapping[str, Any], organs: Sequence[str], cache_dir: Any):
        params = dict(cfg.get("params") or {})
        if not params.get("label_map"):
            raise SfdaBenchError("dataset nifti_folder: params.label_map ({organ: native label value}) is required")
        super().__init__(cfg, organs, cache_dir)
        self.image_pattern = str(self.params.get("image_pattern", "image_{id}.nii.gz"))
        self.label_pattern = str(self.params.get("label_pattern", "label_{id}.nii.gz"))
        for pattern in (self.image_pattern, self.label_pattern):
            if "{id}" not in pattern:
                raise SfdaBenchError(f"dataset nifti_folder: file pattern {pattern!r} has no '{{id}}' placeholder")
        self.expected_layout = f"<root>/{self.image_pattern} + <root>/{self.label_pattern}"
        self.is_npz = self.image_pattern.endswith(".npz")
        self.npz = {**NPZ_DEFAULTS, **dict(self.params.get("npz") or {})}
        if self.is_npz:
            if not self.npz["axcodes"]:
                raise SfdaBenchError("dataset nifti_folder: npz files carry no orientation; set params.npz.axcodes, "
                                     "e.g. [S, A, L] for (z, y, x) arrays whose row 0 is posterior")
            self.npz_ornt = ornt_from_axcodes(self.npz["axcodes"])
            if self.npz["spacing_order"] not in ("xyz", "zyx"):
                raise SfdaBenchError("dataset nifti_folder: params.npz.spacing_order must be 'xyz' or 'zyx'")

    def paths(self, case_id: str) -> tuple[Path, Path]:
        root = self.checked_root()
        return root / self.image_pattern.format(id=case_id), root / self.label_pattern.format(id=case_id)

    def case_files(self, case_id: str) -> list[Path]:
        image, label = self.paths(case_id)
        for path in (image, label):
            if not path.is_file():
                raise SfdaBenchError(f"{self.name} case {case_id}: {path} not found (the case is listed in the "
                                     f"task's splits; check the id and params.image_pattern/label_pattern)")
        return [image] if image == label else [image, label]

    def read_case(self, case_id: str) -> RawVolume:
        image_path, label_path = self.paths(case_id)
        if not self.is_npz:
            return read_nifti_pair(image_path, label_path)
        image, spacing = self._npz_arrays(image_path, self.npz["image_key"], self.npz["spacing_key"])
        label, label_spacing = self._npz_arrays(label_path, self.npz["label_key"], self.npz["spacing_key"])
        spacing = spacing if spacing is not None else label_spacing
        if spacing is None:
            raise SfdaBenchError(f"{image_path}: no spacing key '{self.npz['spacing_key']}' in the image or label file")
        if image.ndim != 3 or spacing.shape != (3,):
            raise SfdaBenchError(f"{image_path}: expected a 3D array and 3 spacings, got {image.shape} and "
                                 f"{spacing.shape}")
        check_same_grid(image.shape, None, label.shape, None, label_path, image_path)
        zooms = spacing[::-1] if self.npz["spacing_order"] == "xyz" else spacing    # per array axis
        if np.any(zooms <= 0):
            raise SfdaBenchError(f"{image_path}: invalid spacing {spacing.tolist()}")
        return RawVolume(image, label, self.npz_ornt, tuple(float(z) for z in zooms), label_path)

    @staticmethod
    def _npz_arrays(path: Path, key: str, spacing_key: str) -> tuple[np.ndarray, np.ndarray | None]:
        with reading(path), np.load(path) as data:
            if key not in data.files:
                raise SfdaBenchError(f"{path}: no array '{key}' (has: {data.files}); set params.npz keys")
            array = data[key]
            spacing = np.asarray(data[spacing_key], dtype=np.float64).ravel() if spacing_key in data.files else None
        return array, spacing


@hookimpl
def sfdabench_datasets() -> list[type]:
    return [NiftiFolderDataset]
