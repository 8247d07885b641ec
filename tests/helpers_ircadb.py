"""Small 3D-IRCADb-01 patients the tests write: a toy abdomen in the display frame, stored as IRCAD stores it
(file image_k at z = 1.6 k mm, image_0 the most inferior; PATIENT_DICOM and MASKS_DICOM zipped or not). Shared
by tests/test_datasets_ircadb.py and the dataset contract tests (tests/test_plugin_contracts.py)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from sfdabench.harness.plugins import get_registry

from helpers_datasets import dicom_slice

ORGANS = ["spleen", "right_kidney", "left_kidney", "liver"]           # the task order: labels 1..4
STRUCTURES = {1: "spleen", 2: "rightkidney", 3: "leftkidney", 4: "liver"}   # task label -> IRCAD folder
DZ, DXY = 1.6, 0.57
WINDOW = (-1024.0, 1024.0)                                             # the toy's whole HU range


# ------------------------------------------------------------------------------------------ helpers


def adapter(params: dict, tmp_path: Path, splits: dict | None = None):
    cfg = {"dataset": "ircadb", "params": {"size": 16, "window": list(WINDOW), "z_crop_to_labels": False,
                                           **params},
           "splits": splits or {"train": ["1.3"], "test": []}}
    return get_registry().get("datasets", "ircadb")(cfg, ORGANS, tmp_path / "cache")


def toy_abdomen(z: int = 12, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, task labels) in the display frame: slice 0 superior, row 0 anterior, column 0 patient right.
    Liver superior, anterior, image left; spleen image right; kidneys posterior and lower."""
    label = np.zeros((z, size, size), np.uint8)
    label[0:7, 2:8, 1:8] = 4               # liver
    label[2:6, 4:9, 10:15] = 1             # spleen
    label[6:11, 10:14, 2:6] = 2            # right kidney (patient right = image left)
    label[4:10, 10:14, 10:14] = 3          # left kidney
    contrast = np.array([-100, 120, 200, 210, 60], np.float32)
    image = contrast[label] + 7.0 * np.arange(z, dtype=np.float32)[:, None, None] \
        + 3.0 * np.arange(size, dtype=np.float32)[None, None, :]       # ramps: a z or left-right flip would show
    return image, label


def dicom_bytes(pixels: np.ndarray, k: int, mask: bool) -> bytes:
    """One slice as IRCAD writes it: IOP [1,0,0,0,1,0], IPP [0, 0, 1.6 k], InstanceNumber k; CT int16 with
    RescaleIntercept -1024 (so HU need the modality LUT), masks uint8 0/255."""
    from pydicom.uid import CTImageStorage

    ds = dicom_slice(CTImageStorage, "CT", pixels.shape)
    ds.PixelSpacing = [DXY, DXY]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, round(DZ * k, 4)]
    ds.InstanceNumber = k
    if mask:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        data = np.where(pixels, 255, 0).astype(np.uint8)
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        data = np.rint(pixels + 1024).astype(np.int16)
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_patient(root: Path, n: int = 3, zip_patient: bool = True, zip_masks: bool = True,
                  structures: dict | None = None, edit=None) -> tuple[np.ndarray, np.ndarray]:
    """``root/3Dircadb1.<n>/`` with PATIENT_DICOM and MASKS_DICOM (zipped or not) of the toy abdomen, plus a
    bone structure that no task organ uses. ``structures``: task label -> folder name (None: leave out);
    ``edit(files)`` may change the ``{archive path: bytes}`` before they are written."""
    image, label = toy_abdomen()
    z = image.shape[0]
    files: dict[str, bytes] = {}
    folders = {**STRUCTURES, **(structures or {})}
    for k in range(z):                                  # file k = display slice z - 1 - k (image_0 inferior)
        d = z - 1 - k
        files[f"PATIENT_DICOM/image_{k}"] = dicom_bytes(image[d], k, mask=False)
        for task_label, folder in folders.items():
            if folder is not None:
                files[f"MASKS_DICOM/{folder}/image_{k}"] = dicom_bytes(label[d] == task_label, k, mask=True)
        files[f"MASKS_DICOM/bone/image_{k}"] = dicom_bytes(np.zeros_like(label[d], bool), k, mask=True)
    if edit:
        edit(files)
    patient = root / f"3Dircadb1.{n}"
    patient.mkdir(parents=True)
    for archive, zipped in (("PATIENT_DICOM", zip_patient), ("MASKS_DICOM", zip_masks)):
        members = {name: data for name, data in files.items() if name.startswith(archive + "/")}
        if zipped:
            with zipfile.ZipFile(patient / f"{archive}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        else:
            for name, data in members.items():
                (patient / name).parent.mkdir(parents=True, exist_ok=True)
                (patient / name).write_bytes(data)
    return image, label
