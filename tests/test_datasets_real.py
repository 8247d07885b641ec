"""Real-data adapters (chaos, btcv, amos, nifti_folder): layouts, orientation, labels, preprocessing, bad input.

Raw layouts are tested on small files the tests write (a labelled toy abdomen in the display frame, written
out in other orientations and formats, must come back exactly); the NIfTI/npz readers also on the real
CHAOS/AMOS sample of ``$SFDABENCH_SAMPLE_DATA``.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers_datasets import (ORGANS, SPACING, adapter, affine_for, file_axes, toy_abdomen, write_amos,
                             write_btcv, write_chaos_case, write_nifti)
from sfdabench.api import SfdaBenchError
from sfdabench.harness.plugins import get_registry

BTCV_LABEL = {1: 1, 2: 2, 3: 3, 4: 6}                                 # task label -> BTCV / AMOS value


# ------------------------------------------------------------------------------------------ helpers


def expected(image: np.ndarray, label: np.ndarray, window, crop: bool = True):
    z0, z1 = 2, image.shape[0] - 3
    if crop:
        image, label = image[z0:z1 + 1], label[z0:z1 + 1]
    lo, hi = window
    return np.clip((image - lo) / (hi - lo), 0, 1), label


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------- registry


def test_adapters_are_registered_plugins():
    names = get_registry().names("datasets")
    assert {"chaos", "btcv", "amos", "ircadb", "nifti_folder"} <= set(names)


# ------------------------------------------------------------------------------------ raw layouts


@pytest.mark.parametrize("flip_columns", [False, True])
def test_chaos_dicom_png_slices_matched_by_position_and_instance(tmp_path, flip_columns):
    image, label = write_chaos_case(tmp_path / "chaos", 2, flip_columns=flip_columns)
    names = sorted(p.name for p in (tmp_path / "chaos/MR/2/T2SPIR/Ground").iterdir())
    assert names[:3] == ["IMG-0002-1.png", "IMG-0002-10.png", "IMG-0002-11.png"]   # lexicographic != slice order
    ds = adapter("chaos", {"root": str(tmp_path / "chaos"), "window": [0, 1200]}, tmp_path,
                 {"train": [2], "test": []})
    case = ds.load_case("2")
    want_image, want_label = expected(image, label, (0, 1200))
    np.testing.assert_array_equal(case.label, want_label)
    np.testing.assert_allclose(case.image, want_image, atol=1e-6)
    assert case.spacing == pytest.approx(SPACING)


def test_chaos_accepts_root_at_mr_folder_and_int_ids(tmp_path):
    write_chaos_case(tmp_path / "chaos", 5)
    ds = adapter("chaos", {"root": str(tmp_path / "chaos" / "MR")}, tmp_path, {"train": [5], "test": []})
    assert ds.case_ids("train") == ["5"]
    assert ds.load_case("5").label.max() == 4


@pytest.mark.parametrize("flat", [False, True])
def test_btcv_layouts_and_label_map(tmp_path, flat):
    image, label = write_btcv(tmp_path / "btcv", 2, flat=flat)
    ds = adapter("btcv", {"root": str(tmp_path / "btcv")}, tmp_path, {"train": ["0002"], "test": []})
    assert ds.case_ids("train") == ["0002"]
    case = ds.load_case("0002")
    want_image, want_label = expected(image, label, (-125, 275))
    np.testing.assert_array_equal(case.label, want_label)        # stomach (7) became background
    np.testing.assert_allclose(case.image, want_image, atol=1e-6)


def test_amos_modality_by_id_keyword_splits_and_dataset_json(tmp_path):
    root = tmp_path / "amos"
    image, label = write_amos(root, 1)
    write_amos(root, 540)
    write_amos(root, 8, folder="Va")
    ct = adapter("amos", {"root": str(root), "modality": "ct"}, tmp_path, {"train": "imagesTr", "test": "imagesVa"})
    assert ct.case_ids("train") == ["amos_0001"] and ct.case_ids("test") == ["amos_0008"]
    mr = adapter("amos", {"root": str(root), "modality": "mr"}, tmp_path, {"train": "imagesTr", "test": []})
    assert mr.case_ids("train") == ["amos_0540"]
    np.testing.assert_array_equal(ct.load_case("amos_0001").label, expected(image, label, (0, 1))[1])
    with pytest.raises(SfdaBenchError, match="amos_0540 is MR"):
        ct.load_case("540")
    threshold = adapter("amos", {"root": str(root), "modality": "ct", "ct_max_id": 600}, tmp_path,
                        {"train": "imagesTr", "test": []})
    assert threshold.case_ids("train") == ["amos_0001", "amos_0540"]
    shifted = adapter("amos", {"root": str(root), "modality": "ct",
                               "label_map": {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 7},
                               "unused_labels": [4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15]},
                      tmp_path, {"train": [1], "test": []})
    with pytest.raises(SfdaBenchError, match=r"dataset.json: label 7 is 'stomach'"):
        shifted.load_case("amos_0001")


def test_amos_splits_overlap_is_an_error(tmp_path):
    write_amos(tmp_path / "amos", 540)
    mr = adapter("amos", {"root": str(tmp_path / "amos"), "modality": "mr"}, tmp_path,
                 {"train": "imagesTr", "test": [540]})
    with pytest.raises(SfdaBenchError, match=r"share cases \['amos_0540'\]"):
        mr.case_ids("train")


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "I"), ("L", "A", "S"), ("S", "A", "L"),
                                     ("P", "R", "I")])
def test_nifti_folder_any_orientation_comes_back_in_display_frame(tmp_path, axcodes):
    image, label = toy_abdomen()
    write_nifti(tmp_path / "data" / "image_7.nii.gz", image, axcodes)
    write_nifti(tmp_path / "data" / "label_7.nii.gz", label + (label > 0) * 10, axcodes, np.uint8)
    ds = adapter("nifti_folder", {"root": str(tmp_path / "data"), "modality": "mr", "window": [0, 1200],
                                  "label_map": {"spleen": 11, "right_kidney": 12, "left_kidney": 13, "liver": 14}},
                 tmp_path, {"train": [7], "test": []})
    case = ds.load_case("7")
    want_image, want_label = expected(image, label, (0, 1200))
    np.testing.assert_array_equal(case.label, want_label)
    np.testing.assert_allclose(case.image, want_image, atol=1e-6)
    assert case.spacing == pytest.approx(SPACING)


def test_nifti_folder_npz_mode_with_declared_axes(tmp_path):
    image, label = toy_abdomen()
    axcodes = ("S", "A", "L")                       # like the AMOS npz sample: row 0 posterior
    native = np.array([0, 1, 2, 3, 6], np.uint8)[label]
    spacing_xyz = [SPACING[2], SPACING[1], SPACING[0]]
    np.savez(tmp_path / "ct_9_img.npz", imgs=file_axes(image, axcodes), spacing=spacing_xyz)
    np.savez(tmp_path / "ct_9_gts.npz", gts=file_axes(native, axcodes))
    ds = adapter("nifti_folder", {"root": str(tmp_path), "modality": "ct", "window": [0, 1200],
                                  "image_pattern": "ct_{id}_img.npz", "label_pattern": "ct_{id}_gts.npz",
                                  "npz": {"axcodes": list(axcodes)},
                                  "label_map": {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6}},
                 tmp_path, {"train": [9], "test": []})
    case = ds.load_case("9")
    np.testing.assert_array_equal(case.label, expected(image, label, (0, 1200))[1])
    assert case.spacing == pytest.approx(SPACING)


# --------------------------------------------------------------------------------- preprocessing


def test_resize_spacing_full_volume_and_percentile_window(tmp_path):
    image, label = toy_abdomen()
    write_nifti(tmp_path / "image_1.nii.gz", image)
    write_nifti(tmp_path / "label_1.nii.gz", label, dtype=np.uint8)
    params = {"root": str(tmp_path), "modality": "mr", "size": 12, "z_crop_to_labels": False,
              "percentiles": [1, 99], "label_map": {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 4}}
    case = adapter("nifti_folder", params, tmp_path, {"train": [1], "test": []}).load_case("1")
    assert case.image.shape == (12, 12, 12) and case.label.dtype == np.uint8 and case.image.dtype == np.float32
    assert case.spacing == pytest.approx((SPACING[0], SPACING[1] * 2, SPACING[2] * 2))     # spacing x 24 / 12
    assert case.image.min() == 0.0 and case.image.max() == 1.0
    np.testing.assert_array_equal(np.unique(case.label), [0, 1, 2, 3, 4])
    assert not case.label[0].any() and case.label[2].any()      # full volume: the empty end slices stay


def test_splits_rest_and_duplicates(tmp_path):
    write_btcv(tmp_path / "btcv", 1)
    ds = adapter("btcv", {"root": str(tmp_path / "btcv")}, tmp_path,
                 {"all": [1, 2, 3, 4], "test": [2, 4], "train": "rest"})
    assert ds.case_ids("train") == ["0001", "0003"] and ds.case_ids("test") == ["0002", "0004"]
    dup = adapter("btcv", {"root": str(tmp_path / "btcv")}, tmp_path, {"train": [1, "0001"], "test": []})
    with pytest.raises(SfdaBenchError, match="twice"):
        dup.case_ids("train")


# ------------------------------------------------------------------------------------- bad input


def _nifti_pair(tmp_path: Path, case: int = 1, label_fn=None, shape_change=False, affine_change=False):
    image, label = toy_abdomen()
    write_nifti(tmp_path / f"image_{case}.nii.gz", image)
    label = label_fn(label) if label_fn else label
    if shape_change:
        label = label[:, :-2]
    path = tmp_path / f"label_{case}.nii.gz"
    affine = affine_for(("R", "A", "S"))
    if affine_change:
        affine[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(file_axes(label, ("R", "A", "S")).astype(np.uint8), affine), str(path))
    return tmp_path / f"image_{case}.nii.gz", path


def _folder_adapter(tmp_path, splits=None):
    return adapter("nifti_folder", {"root": str(tmp_path), "modality": "mr",
                                    "label_map": {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 4}},
                   tmp_path, splits or {"train": [1], "test": []})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("problem, pattern, culprit", [
    ("truncated image", r"cannot read .*image_1\.nii\.gz", "image_1.nii.gz"),
    ("garbage label", r"cannot read .*label_1\.nii\.gz", "label_1.nii.gz"),
    ("shape mismatch", r"label shape \(\d+, \d+, \d+\) != image shape", "label_1.nii.gz"),
    ("affine mismatch", r"label affine differs", "label_1.nii.gz"),
    ("label outside map", r"label values \[9\] are not in the label map", "label_1.nii.gz"),
    ("empty case", r"empty case, none of the organs", "label_1.nii.gz"),
    ("absent case", r"nifti_folder case 3: .* not found", "image_3.nii.gz"),
])
def test_bad_nifti_input_is_one_error_naming_the_file(tmp_path, problem, pattern, culprit):
    image_path, label_path = _nifti_pair(
        tmp_path,
        label_fn={"label outside map": lambda lab: np.where(lab == 3, 9, lab),
                  "empty case": lambda lab: np.zeros_like(lab)}.get(problem),
        shape_change=problem == "shape mismatch", affine_change=problem == "affine mismatch")
    if problem == "truncated image":
        _truncate(image_path)
    if problem == "garbage label":
        label_path.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    ds = _folder_adapter(tmp_path, {"train": [3 if problem == "absent case" else 1], "test": []})
    with pytest.raises(SfdaBenchError, match=pattern) as excinfo:
        ds.prepare()
    assert culprit in one_line_error(excinfo)


@pytest.mark.parametrize("problem, pattern", [
    ("corrupt dicom", r"cannot read .*\.dcm"),
    ("truncated dicom", r"cannot read .*\.dcm"),
    ("missing mask", r"\.dcm: no mask for this slice \(InstanceNumber 7\)"),
    ("extra mask", r"IMG-0002-99\.png: no DICOM slice with InstanceNumber 99"),
    ("grey level outside map", r"IMG-0002-\d+\.png: label values \[100\] are not in the label map"),
    ("missing slice", r"slice gap 12\.00 mm .* \(missing slice\?\)"),
])
def test_bad_chaos_input_is_one_error_naming_the_file(tmp_path, problem, pattern):
    from PIL import Image

    root = tmp_path / "chaos"
    write_chaos_case(root, 2)
    dicom_dir, ground_dir = root / "MR/2/T2SPIR/DICOM_anon", root / "MR/2/T2SPIR/Ground"
    dicoms = sorted(dicom_dir.glob("*.dcm"))
    if problem == "corrupt dicom":
        dicoms[3].write_bytes(b"\0" * 50)
    elif problem == "truncated dicom":
        _truncate(dicoms[3])
    elif problem == "missing mask":
        (ground_dir / "IMG-0002-7.png").unlink()
    elif problem == "extra mask":
        Image.fromarray(np.zeros((24, 24), np.uint8)).save(ground_dir / "IMG-0002-99.png")
    elif problem == "grey level outside map":
        mask = np.array(Image.open(ground_dir / "IMG-0002-6.png"))
        mask[mask == 63] = 100
        Image.fromarray(mask).save(ground_dir / "IMG-0002-6.png")
    elif problem == "missing slice":
        import pydicom

        for path in dicoms:         # drop the slice with InstanceNumber 6 (and its mask), mid-series
            if pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber == 6:
                path.unlink()
        (ground_dir / "IMG-0002-6.png").unlink()
    ds = adapter("chaos", {"root": str(root)}, tmp_path, {"train": [2], "test": []})
    with pytest.raises(SfdaBenchError, match=pattern) as excinfo:
        ds.prepare()
    one_line_error(excinfo)


@pytest.mark.parametrize("name, params, url", [
    ("chaos", {}, "https://chaos.grand-challenge.org"),
    ("btcv", {}, "https://www.synapse.org/#!Synapse:syn3193805"),
    ("amos", {"modality": "ct"}, "https://amos22.grand-challenge.org"),
])
@pytest.mark.parametrize("root", [None, "missing", "empty"])
def test_missing_data_says_what_where_and_how(tmp_path, name, params, url, root):
    if root == "missing":
        root = str(tmp_path / "nowhere")
    elif root == "empty":
        root = str(tmp_path)
    ds = adapter(name, {"root": root, **params}, tmp_path, {"train": [1], "test": [2]})
    with pytest.raises(SfdaBenchError) as excinfo:
        ds.load_case("1")
    message = one_line_error(excinfo)
    assert "data not found" in message and url in message and f"data.{name}.root=" in message
    assert ("is not set" in message) if root is None else (root in message)


def test_absent_case_of_a_present_dataset_names_the_folder(tmp_path):
    write_chaos_case(tmp_path / "chaos", 2)
    ds = adapter("chaos", {"root": str(tmp_path / "chaos")}, tmp_path, {"train": [2], "test": [31]})
    with pytest.raises(SfdaBenchError, match=r"CHAOS case 31: .*MR/31/T2SPIR/DICOM_anon not found") as excinfo:
        ds.load_case("2")
    one_line_error(excinfo)


def test_label_map_must_cover_every_task_organ(tmp_path):
    with pytest.raises(SfdaBenchError, match="no native value for organ 'liver'"):
        adapter("nifti_folder", {"root": str(tmp_path), "modality": "ct",
                                 "label_map": {"spleen": 1, "right_kidney": 2, "left_kidney": 3}}, tmp_path)


# ------------------------------------------------------------------------------- real sample data


@pytest.fixture(scope="module")
def real_cases(tmp_path_factory):
    """One CHAOS MR case (NIfTI) and the AMOS CT case (npz) of the sample, prepared as sample_chaos2amos does."""
    import os

    root = os.environ.get("SFDABENCH_SAMPLE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("real sample data not available: set SFDABENCH_SAMPLE_DATA to the shared data folder")
    cache = tmp_path_factory.mktemp("real")
    chaos = get_registry().get("datasets", "nifti_folder")(
        {"dataset": "nifti_folder", "splits": {"train": [1], "test": []},
         "params": {"root": root, "image_pattern": "chaos_mr/image_{id}.nii.gz",
                    "label_pattern": "chaos_mr/label_{id}.nii.gz", "modality": "mr", "window": [0, 1200],
                    "label_map": {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}}}, ORGANS, cache)
    amos = get_registry().get("datasets", "nifti_folder")(
        {"dataset": "nifti_folder", "splits": {"train": ["0018"], "test": []},
         "params": {"root": root, "image_pattern": "amos_ct/CT_AMOS_amos_{id}_img.npz",
                    "label_pattern": "amos_ct/CT_AMOS_amos_{id}_gts.npz", "modality": "ct", "window": [0, 255],
                    "npz": {"axcodes": ["S", "A", "L"]},
                    "label_map": {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6},
                    "unused_labels": [4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]}}, ORGANS, cache)
    return Path(root), chaos.load_case("1"), amos.load_case("0018")


def test_real_sample_volumes_load_with_spacing_and_labels(real_cases):
    _, mr, ct = real_cases
    for case in (mr, ct):
        assert case.image.shape[1:] == (256, 256) and case.image.dtype == np.float32
        assert 0.0 <= case.image.min() and case.image.max() <= 1.0
        np.testing.assert_array_equal(np.unique(case.label), [0, 1, 2, 3, 4])
        assert case.label[0].any() and case.label[-1].any()               # GT z-crop: organ slab only
    assert mr.spacing == pytest.approx((7.7, 1.25, 1.25), abs=1e-4)        # 256 px: in-plane unchanged
    assert ct.spacing == pytest.approx((5.0, 0.846 * 2, 0.846 * 2), abs=1e-4)  # 512 -> 256 px
    assert ct.image.shape[0] < 63                                          # cropped from 63 slices


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_real_mr_and_ct_show_anatomy_the_same_way_round(real_cases):
    """Radiological display in both modalities: liver on the image left, spleen right, anterior up (liver in
    front of the kidneys), superior first (liver dome above the kidneys)."""
    _, mr, ct = real_cases
    for case in (mr, ct):
        z, row, col = _centroid(case.label == 4)                 # liver
        spleen, kidneys = _centroid(case.label == 1), _centroid((case.label == 2) | (case.label == 3))
        assert col < 128 < spleen[2], case.case_id
        assert row < kidneys[1], case.case_id
        assert _centroid(case.label == 2)[2] < 128 < _centroid(case.label == 3)[2], case.case_id
        assert z < kidneys[0], case.case_id


def test_real_orientation_agrees_with_the_independent_tiny_slices(real_cases):
    """tiny/ holds slices re-oriented to radiological display by hand (common map 1 liver .. 4 spleen)."""
    root, mr, ct = real_cases
    to_task = np.array([0, 4, 2, 3, 1], np.uint8)
    tiny = np.load(root / "tiny" / "chaos_mr_t2spir_tiny.npz")
    for label, case_id in zip(tiny["label"], tiny["case_id"]):
        if str(case_id) == "chaos_T2SPIR_1":
            assert any(np.array_equal(to_task[label], s) for s in mr.label)
    tiny = np.load(root / "tiny" / "amos_ct_0018_tiny.npz")
    for label in tiny["label"]:
        mapped = to_task[label]
        assert max(_dice(mapped, s) for s in ct.label) > 0.9      # 2x downsampled by other means


def _dice(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean Dice over the organs with >= 200 pixels in the reference (organ edges differ with the resampling)."""
    scores = [2 * np.sum((reference == k) & (other == k)) / (np.sum(reference == k) + np.sum(other == k))
              for k in (1, 2, 3, 4) if np.sum(reference == k) >= 200]
    return float(np.mean(scores))
