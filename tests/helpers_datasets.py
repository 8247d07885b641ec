"""A labelled toy abdomen in the display frame, written out as NIfTI files (any orientation) and in the BTCV,
CHAOS and AMOS raw layouts, and the real-data adapters built on such files. Shared by tests/test_datasets_real.py,
tests/test_prepare.py and the dataset contract tests (tests/test_plugin_contracts.py)."""
from __future__ import annotations

from pathlib import Path

import json

import nibabel as nib
import numpy as np

from sfdabench.harness.plugins import get_registry

ORGANS = ["spleen", "right_kidney", "left_kidney", "liver"]           # the task order: labels 1..4
SPACING = (6.0, 1.5, 1.25)                                            # display frame (z, y, x) mm
CHAOS_GREY = {1: 252, 2: 126, 3: 189, 4: 63}                          # task label -> CHAOS PNG grey level


def adapter(name: str, params: dict, tmp_path: Path, splits: dict | None = None, **domain):
    cfg = {"dataset": name, "params": {"size": 24, **params}, "splits": splits or {}, **domain}
    return get_registry().get("datasets", name)(cfg, ORGANS, tmp_path / "cache")


def toy_abdomen(z: int = 12, h: int = 24, w: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """(image, task labels) in the display frame: slice 0 superior, row 0 anterior, column 0 patient right.
    Liver image-left and anterior, spleen image-right, kidneys posterior; two empty slices at each end."""
    label = np.zeros((z, h, w), np.uint8)
    organs = slice(2, z - 2)
    label[organs, 3:11, 2:11] = 4          # liver
    label[organs, 5:11, 15:22] = 1         # spleen
    label[organs, 14:20, 3:8] = 2          # right kidney (patient right = image left)
    label[organs, 14:20, 16:21] = 3        # left kidney
    label[z - 3, 14:20, 3:8] = 0           # asymmetric along z, so a z flip would show
    contrast = np.array([0, 900, 700, 650, 400], np.float32)
    image = contrast[label] + 10.0 * np.arange(z, dtype=np.float32)[:, None, None] \
        + 2.0 * np.arange(w, dtype=np.float32)[None, None, :]      # left-right ramp, so a mirror would show
    return image, label


def file_axes(display: np.ndarray, axcodes: tuple[str, str, str]) -> np.ndarray:
    """The display-frame array as stored in a file whose array axes point towards ``axcodes``."""
    ornt = nib.orientations
    transform = ornt.ornt_transform(ornt.axcodes2ornt(("I", "P", "L")), ornt.axcodes2ornt(axcodes))
    return ornt.apply_orientation(display, transform)


def affine_for(axcodes: tuple[str, str, str], display_spacing=SPACING) -> np.ndarray:
    """RAS affine of a file with these axis codes (zooms taken from the display spacing of the same axis)."""
    world = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    display_axis = {"I": 0, "S": 0, "P": 1, "A": 1, "L": 2, "R": 2}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i, code in enumerate(axcodes):
        axis, sign = world[code]
        affine[axis, i] = sign * display_spacing[display_axis[code]]
    affine[:3, 3] = [12.5, -30.0, 40.0]
    return affine


def write_nifti(path: Path, display: np.ndarray, axcodes=("R", "A", "S"), dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(file_axes(display, axcodes).astype(dtype), affine_for(axcodes)), str(path))


def write_btcv(root: Path, case: int, flat: bool = False, axcodes=("L", "P", "S")) -> tuple:
    image, label = toy_abdomen()
    native = np.array([0, 1, 2, 3, 6], np.int16)[label]
    native[0, 0:4, 0:4] = 7                                          # stomach: known, not a task organ
    image_dir, label_dir = (root, root) if flat else (root / "img", root / "label")
    write_nifti(image_dir / f"img{case:04d}.nii.gz", image - 1000.0, axcodes)     # HU-like
    write_nifti(label_dir / f"label{case:04d}.nii.gz", native, axcodes, np.int16)
    return image - 1000.0, label


def dicom_slice(sop_class: str, modality: str, shape: tuple):
    """A minimal single-frame greyscale DICOM dataset (file meta, UIDs, size) that the caller completes with
    pixel format, geometry and PixelData."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    return ds


def write_chaos_case(root: Path, case_id: int, flip_columns: bool = False, size: int = 24) -> tuple:
    """CHAOS raw layout: DICOM slices with scrambled file names, PNG masks named by unpadded slice number
    (so lexicographic order is wrong), instance numbers counting from the most inferior slice."""
    import pydicom
    from PIL import Image
    from pydicom.uid import MRImageStorage

    image, label = toy_abdomen(h=size, w=size)
    z = image.shape[0]
    dicom_dir = root / "MR" / str(case_id) / "T2SPIR" / "DICOM_anon"
    ground_dir = dicom_dir.parent / "Ground"
    dicom_dir.mkdir(parents=True)
    ground_dir.mkdir(parents=True)
    dz, dy, dx = SPACING
    grey = np.zeros(5, np.uint8)
    for task_label, value in CHAOS_GREY.items():
        grey[task_label] = value
    rng = np.random.default_rng(case_id)
    for k in range(z):                                   # k = display slice (0 = most superior)
        pixels, mask = image[k], grey[label[k]]
        row_cos = [1.0, 0.0, 0.0]                        # columns towards the patient's left (LPS +x)
        x0 = 0.0
        if flip_columns:                                 # columns towards the right: mirrored pixels
            pixels, mask, row_cos, x0 = pixels[:, ::-1], mask[:, ::-1], [-1.0, 0.0, 0.0], (size - 1) * dx
        instance = z - k                                 # 1 = most inferior
        ds = dicom_slice(MRImageStorage, "MR", pixels.shape)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing = [dy, dx]
        ds.ImageOrientationPatient = row_cos + [0.0, 1.0, 0.0]      # rows towards posterior
        ds.ImagePositionPatient = [x0, 0.0, 100.0 - k * dz]          # superior first in display order
        ds.InstanceNumber = instance
        ds.PixelData = np.ascontiguousarray(pixels).astype(np.uint16).tobytes()
        name = f"{rng.integers(1e9):09d}.dcm"                        # no relation to slice order
        ds.save_as(str(dicom_dir / name), enforce_file_format=True)
        Image.fromarray(np.ascontiguousarray(mask)).save(ground_dir / f"IMG-0002-{instance}.png")
    assert pydicom.dcmread(next(dicom_dir.glob("*.dcm"))).InstanceNumber
    return image, label


def write_amos(root: Path, case: int, folder: str = "Tr") -> tuple:
    image, label = toy_abdomen()
    native = np.array([0, 1, 2, 3, 6], np.uint8)[label]
    write_nifti(root / f"images{folder}" / f"amos_{case:04d}.nii.gz", image, ("R", "A", "S"))
    write_nifti(root / f"labels{folder}" / f"amos_{case:04d}.nii.gz", native, ("R", "A", "S"), np.uint8)
    names = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
             "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
             "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
             "15": "prostate/uterus"}
    (root / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": names}))
    return image, label
