"""AMOS 2022 (abdominal multi-organ segmentation, CT and MR), in its released layout::

    <root>/dataset.json
    <root>/imagesTr/amos_0001.nii.gz   <root>/labelsTr/amos_0001.nii.gz     (200 CT + 40 MR)
    <root>/imagesVa/amos_0008.nii.gz   <root>/labelsVa/amos_0008.nii.gz     (100 CT + 20 MR)

The modality is in the case number (AMOS convention): ids up to 500 are CT, above 500 MR
(``params.ct_max_id``). One domain is one modality (``params.modality``); a split may list ids or name a
folder (``imagesTr`` / ``imagesVa``: every labelled case of the domain's modality in it). Native labels
(15): 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta,
9 postcava (IVC), 10 pancreas, 11 right adrenal gland, 12 left adrenal gland, 13 duodenum, 14 bladder,
15 prostate/uterus. When ``dataset.json`` is present, its label names are checked against the label map.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from sfdabench.api import SfdaBenchError
from sfdabench.hookspecs import hookimpl
from sfdabench_datasets.preprocess import (PreparedVolumeAdapter, RawVolume, normalise_name, numbered,
                                           read_nifti_pair, reading)

#: image folder -> label folder of the labelled AMOS partitions
LABELLED_FOLDERS = {"imagesTr": "labelsTr", "imagesVa": "labelsVa"}


class AmosDataset(PreparedVolumeAdapter):
    """AMOS 2022 abdomen CT or MR (one modality per domain; 15 labels)."""

    name = "amos"
    title = "AMOS 2022"
    download_url = "https://amos22.grand-challenge.org (files: https://zenodo.org/records/7262581)"
    expected_layout = "<root>/imagesTr/amos_XXXX.nii.gz + <root>/labelsTr/amos_XXXX.nii.gz (+ imagesVa/labelsVa)"
    native_labels = {1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
                     7: "stomach", 8: "aorta", 9: "postcava", 10: "pancreas", 11: "right_adrenal_gland",
                     12: "left_adrenal_gland", 13: "duodenum", 14: "bladder", 15: "prostate_uterus"}

    def __init__(self, cfg: Mapping[str, Any], organs: Sequence[str], cache_dir: Any):
        super().__init__(cfg, organs, cache_dir)
        self.modality = self.preprocessing.modality
        self.ct_max_id = int(self.params.get("ct_max_id", 500))
        self._dataset_json_checked = False

    def layout_found(self, root: Path) -> bool:
        return any((root / folder).is_dir() for folder in LABELLED_FOLDERS)

    def normalise_case_id(self, case_id: Any) -> str:
        number = numbered(str(case_id))
        return f"amos_{number:04d}" if number is not None else str(case_id)

    def case_modality(self, case_id: str) -> str:
        number = numbered(case_id)
        return "ct" if number is not None and number <= self.ct_max_id else "mr"

    def named_cases(self, keyword: str) -> list[str] | None:
        if keyword not in LABELLED_FOLDERS:
            return None
        root = self.checked_root()
        ids = [p.name.split(".")[0] for p in sorted((root / keyword).glob("amos_*.nii*"))]
        return [c for c in ids if self.case_modality(c) == self.modality
                and any((root / LABELLED_FOLDERS[keyword]).glob(f"{c}.nii*"))]

    def paths(self, case_id: str) -> tuple[Path, Path]:
        root = self.checked_root()
        for image_dir, label_dir in LABELLED_FOLDERS.items():
            for ext in (".nii.gz", ".nii"):
                if (root / image_dir / f"{case_id}{ext}").is_file():
                    return root / image_dir / f"{case_id}{ext}", root / label_dir / f"{case_id}{ext}"
        return root / "imagesTr" / f"{case_id}.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz"

    def case_files(self, case_id: str) -> list[Path]:
        if self.case_modality(case_id) != self.modality:
            raise SfdaBenchError(f"AMOS case {case_id} is {self.case_modality(case_id).upper()} (ids <= "
                                 f"{self.ct_max_id} are CT, above MR) but this domain is "
                                 f"{self.modality.upper()}; fix the task's splits")
        image, label = self.paths(case_id)
        if not image.is_file():
            raise SfdaBenchError(f"AMOS case {case_id}: {image} not found (nor in imagesVa); the case is listed "
                                 "in the task's splits")
        if not label.is_file():
            raise SfdaBenchError(f"AMOS case {case_id}: label {label} not found (unlabelled test case?)")
        return [image, label]

    def read_case(self, case_id: str) -> RawVolume:
        self._check_dataset_json()
        return read_nifti_pair(*self.paths(case_id))

    def _check_dataset_json(self) -> None:
        """The label map must agree with the names in ``dataset.json`` (catches a wrong or shifted map)."""
        if self._dataset_json_checked:
            return
        path = self.checked_root() / "dataset.json"
        if path.is_file():
            with reading(path):
                names = json.loads(path.read_text()).get("labels") or {}
            known = {normalise_name(n) for n in self.native_labels.values()}   # organ names AMOS uses
            for value, task_label in self.labels.to_task.items():
                organ, name = normalise_name(self.organs[task_label - 1]), names.get(str(value))
                if name is not None and organ in known and normalise_name(name) != organ:
                    raise SfdaBenchError(f"{path}: label {value} is '{name}', but params.label_map maps {organ} "
                                         f"to {value}; fix params.label_map")
        self._dataset_json_checked = True


@hookimpl
def sfdabench_datasets() -> list[type]:
    return [AmosDataset]
