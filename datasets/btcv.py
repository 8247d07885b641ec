"""BTCV / Synapse "Multi-Atlas Labeling Beyond the Cranial Vault" (MICCAI 2015), abdomen CT training set.

The 30 labelled volumes ``img0001-0010, 0021-0040`` are the CT domain of the DFG/ProtoContra protocol.
Layout as downloaded (``RawData/Training``), or flat::

    <root>/img/img0001.nii.gz    <root>/label/label0001.nii.gz
    <root>/img0001.nii.gz        <root>/label0001.nii.gz

Native labels (13 organs): 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver,
7 stomach, 8 aorta, 9 inferior vena cava, 10 portal and splenic vein, 11 pancreas, 12 right adrenal gland,
13 left adrenal gland. Case ids are the four-digit numbers (``0002``; ``2`` is accepted).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sfdabench.api import SfdaBenchError
from sfdabench.hookspecs import hookimpl
from sfdabench_datasets.preprocess import PreparedVolumeAdapter, RawVolume, read_nifti_pair


class BtcvDataset(PreparedVolumeAdapter):
    """BTCV / Synapse multi-organ abdomen CT (raw NIfTI training set, 13 labels; the DFG CT domain)."""

    name = "btcv"
    title = "BTCV (Synapse multi-atlas abdomen CT)"
    download_url = "https://www.synapse.org/#!Synapse:syn3193805"
    expected_layout = "<root>/img/img0001.nii.gz + <root>/label/label0001.nii.gz (or both flat in <root>)"
    default_modality = "ct"
    native_labels = {1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus",
                     6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_vein",
                     11: "pancreas", 12: "right_adrenal_gland", 13: "left_adrenal_gland"}

    def layout_found(self, root: Path) -> bool:
        return any((root / "img").glob("img*.nii*")) or any(root.glob("img*.nii*"))

    def normalise_case_id(self, case_id: Any) -> str:
        text = str(case_id)
        for prefix in ("img", "label"):
            text = text.removeprefix(prefix)
        return f"{int(text):04d}" if text.isdigit() else text

    def paths(self, case_id: str) -> tuple[Path, Path]:
        root = self.checked_root()
        for image_dir, label_dir in ((root / "img", root / "label"), (root, root)):
            for ext in (".nii.gz", ".nii"):
                image = image_dir / f"img{case_id}{ext}"
                if image.is_file():
                    return image, label_dir / f"label{case_id}{ext}"
        return root / "img" / f"img{case_id}.nii.gz", root / "label" / f"label{case_id}.nii.gz"

    def case_files(self, case_id: str) -> list[Path]:
        image, label = self.paths(case_id)
        for path in (image, label):
            if not path.is_file():
                raise SfdaBenchError(f"BTCV case {case_id}: {path} not found (the case is listed in the task's "
                                     "splits; the labelled BTCV cases are 0001-0010 and 0021-0040)")
        return [image, label]

    def read_case(self, case_id: str) -> RawVolume:
        return read_nifti_pair(*self.paths(case_id))


@hookimpl
def sfdabench_datasets() -> list[type]:
    return [BtcvDataset]
