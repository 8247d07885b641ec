"""The ircadb adapter (3D-IRCADb-01 as IRCAD distributes it): layouts zipped and unzipped, geometry, label
building, bad input.

Layouts and errors are tested on small DICOM files the tests write (a toy abdomen in the display frame,
stored as IRCAD stores it: file image_k at z = 1.6 k mm, image_0 the most inferior); geometry and organs also
on the real patient 1.1 of ``$SFDABENCH_SAMPLE_DATA`` (read once per module; its files are never copied).
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_DATA_ENV, run_cli
from helpers_ircadb import DXY, DZ, WINDOW, adapter, dicom_bytes, toy_abdomen, write_patient
from sfdabench.api import SfdaBenchError
from sfdabench.harness.plugins import get_registry
from sfdabench_datasets.preprocess import preprocess_volume, to_display_frame


# ------------------------------------------------------------------------------------------ helpers


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------ toy layouts


def test_ircadb_is_a_registered_plugin(tmp_path):
    assert "ircadb" in get_registry().names("datasets")
    out = run_cli("list", "datasets", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "  ircadb " in out.stdout and "failed plugin" not in out.stdout


@pytest.mark.parametrize("zip_patient, zip_masks", [(True, True), (False, True), (True, False), (False, False)])
def test_zipped_and_unzipped_archives_give_the_display_frame_exactly(tmp_path, zip_patient, zip_masks):
    image, label = write_patient(tmp_path / "ircadb", zip_patient=zip_patient, zip_masks=zip_masks)
    case = adapter({"root": str(tmp_path / "ircadb")}, tmp_path).load_case("1.3")
    np.testing.assert_array_equal(case.label, label)
    lo, hi = WINDOW
    np.testing.assert_allclose(case.image, np.clip((image - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert case.spacing == pytest.approx((DZ, DXY, DXY))
    written = {"PATIENT_DICOM" + ".zip" * zip_patient, "MASKS_DICOM" + ".zip" * zip_masks}
    assert {p.name for p in (tmp_path / "ircadb" / "3Dircadb1.3").iterdir()} == written    # nothing extracted


def test_case_ids_forms_and_ambiguous_floats(tmp_path):
    ds = adapter({"root": str(tmp_path)}, tmp_path, {"train": ["1.3", "3Dircadb1.10", 7], "test": ["20"]})
    assert ds.case_ids("train") == ["1.3", "1.10", "1.7"] and ds.case_ids("test") == ["1.20"]
    with pytest.raises(SfdaBenchError, match=r"1\.1 is a decimal number.*'1\.10'") as excinfo:
        adapter({"root": str(tmp_path)}, tmp_path, {"train": [1.1], "test": []}).case_ids("train")
    one_line_error(excinfo)


def test_label_map_names_structure_folders_and_enters_the_cache_key(tmp_path):
    write_patient(tmp_path / "ircadb", structures={1: "spleen_redrawn"})
    root = str(tmp_path / "ircadb")
    label_map = {"spleen": "spleen_redrawn", "right_kidney": "rightkidney", "left_kidney": "leftkidney",
                 "liver": "liver"}
    ds = adapter({"root": root, "label_map": label_map}, tmp_path)
    assert ds.load_case("1.3").label.max() == 4
    assert ds.settings()["params"]["label_map"] == label_map
    with pytest.raises(SfdaBenchError, match=r"has no spleen mask: no structure folder 'spleen/'"):
        adapter({"root": root}, tmp_path).load_case("1.3")          # the default map looks for spleen/
    with pytest.raises(SfdaBenchError, match="no structure folder for organ 'right_kidney'"):
        adapter({"root": root, "label_map": {"spleen": "spleen"}}, tmp_path)


def test_overlapping_masks_go_to_the_smaller_organ(tmp_path, caplog):
    image, label = toy_abdomen()

    def grow_liver(files):            # the liver mask also covers the top rows of the right kidney
        z = label.shape[0]
        for k in range(z):
            liver = (label[z - 1 - k] == 4) | ((label[z - 1 - k] == 2) & (np.arange(16)[:, None] < 12))
            files[f"MASKS_DICOM/liver/image_{k}"] = dicom_bytes(liver, k, mask=True)

    write_patient(tmp_path / "ircadb", edit=grow_liver)
    with caplog.at_level(logging.WARNING, logger="sfdabench"):
        case = adapter({"root": str(tmp_path / "ircadb")}, tmp_path).load_case("1.3")
    np.testing.assert_array_equal(case.label, label)                 # the kidney kept all its voxels
    assert "patient 1.3: 40 voxels lie in two organ masks" in caplog.text


# ------------------------------------------------------------------------------------- bad input


def _corrupt_member(name):
    return lambda files: files.__setitem__(name, b"\0" * 50)


@pytest.mark.parametrize("problem, zipped, edit, pattern", [
    ("corrupt CT slice", False, _corrupt_member("PATIENT_DICOM/image_4"),
     r"cannot read .*3Dircadb1\.3/PATIENT_DICOM/image_4: .*corrupt or truncated"),
    ("corrupt zipped mask", True, _corrupt_member("MASKS_DICOM/liver/image_4"),
     r"cannot read .*3Dircadb1\.3/MASKS_DICOM\.zip/MASKS_DICOM/liver/image_4: "),
    ("mask slice missing", True, lambda f: f.pop("MASKS_DICOM/rightkidney/image_11"),
     r"MASKS_DICOM\.zip: rightkidney/ holds 11 mask slices but the CT .* has 12; the masks do not belong"),
    ("mask slice extra", False, lambda f: f.__setitem__("MASKS_DICOM/liver/image_12", f["MASKS_DICOM/liver/image_0"]),
     r"MASKS_DICOM: liver/ holds 13 mask slices but the CT .* has 12"),
    ("mask off the grid", True,
     lambda f: f.__setitem__("MASKS_DICOM/spleen/image_5", dicom_bytes(np.zeros((16, 16), bool), 6, mask=True)),
     r"MASKS_DICOM/spleen/image_5: mask position \[0\.0, 0\.0, 9\.6\] != position .* not on the CT's grid"),
    ("organ missing", True, lambda f: [f.pop(n) for n in list(f) if n.startswith("MASKS_DICOM/spleen/")],
     r"3D-IRCADb-01 patient 1\.3 has no spleen mask: no structure folder 'spleen/' in .*MASKS_DICOM\.zip "
     r"\(it has: bone, leftkidney, liver, rightkidney\); remove the patient"),
    ("organ empty", True,
     lambda f: f.update({n: dicom_bytes(np.zeros((16, 16), bool), int(n.rsplit("_", 1)[1]), mask=True)
                         for n in list(f) if n.startswith("MASKS_DICOM/leftkidney/")}),
     r"patient 1\.3 has no left_kidney mask: leftkidney/ in .* has no foreground voxel"),
])
def test_bad_input_is_one_error_naming_the_file(tmp_path, problem, zipped, edit, pattern):
    write_patient(tmp_path / "ircadb", zip_patient=zipped, zip_masks=zipped, edit=edit)
    with pytest.raises(SfdaBenchError, match=pattern) as excinfo:
        adapter({"root": str(tmp_path / "ircadb")}, tmp_path).prepare()
    one_line_error(excinfo)


def test_missing_patient_names_root_layout_and_setting(tmp_path):
    write_patient(tmp_path / "ircadb")
    root = tmp_path / "ircadb"
    with pytest.raises(SfdaBenchError) as excinfo:
        adapter({"root": str(root)}, tmp_path, {"train": ["1.3"], "test": ["1.9"]}).prepare()
    message = one_line_error(excinfo)
    assert f"patient 1.9: no folder 3Dircadb1.9/ in {root} (data.ircadb.root)" in message
    assert "<root>/3Dircadb1.N/PATIENT_DICOM.zip" in message and "MASKS_DICOM.zip" in message
    (root / "3Dircadb1.3" / "PATIENT_DICOM.zip").unlink()
    with pytest.raises(SfdaBenchError, match=r"patient 1\.3: neither PATIENT_DICOM\.zip nor PATIENT_DICOM/ in"):
        adapter({"root": str(root)}, tmp_path).prepare()


@pytest.mark.parametrize("root", [None, "missing", "empty"])
def test_missing_data_says_what_where_and_how(tmp_path, root):
    root = {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path)}.get(root, root)
    with pytest.raises(SfdaBenchError) as excinfo:
        adapter({"root": root}, tmp_path).load_case("1.3")
    message = one_line_error(excinfo)
    assert message.startswith("3D-IRCADb-01 data not found")
    assert "https://www.ircad.fr/research/data-sets/liver-segmentation-3d-ircadb-01/" in message
    assert "data.ircadb.root=" in message and (("is not set" in message) if root is None else (root in message))


# ------------------------------------------------------------------------------- real patient 1.1


@pytest.fixture(scope="module")
def real_patient(tmp_path_factory):
    """Patient 1.1 as shared (PATIENT_DICOM unzipped, MASKS_DICOM.zip), read once: (data folder, adapter, raw)."""
    root = os.environ.get(SAMPLE_DATA_ENV)
    if not root or not (Path(root) / "ircadb_ct" / "3Dircadb1.1").is_dir():
        pytest.skip(f"IRCADb sample not available: set {SAMPLE_DATA_ENV} to the shared data folder")
    folder = Path(root) / "ircadb_ct"
    ds = adapter({"root": str(folder), "size": 512, "window": [-125, 275], "z_crop_to_labels": True},
                 tmp_path_factory.mktemp("ircadb"),
                 {"train": ["1.1"], "test": []})
    return folder, ds, ds.read_case("1.1")


@pytest.fixture(scope="module")
def real_display(real_patient):
    """The shared preprocessing of patient 1.1 (full 512 px, no resize): the frame every adapter delivers."""
    _, ds, raw = real_patient
    return preprocess_volume(raw, ds.labels, ds.preprocessing)


def test_real_patient_grid_hu_and_organ_voxels(real_patient):
    _, _, raw = real_patient
    assert raw.image.shape == raw.label.shape == (129, 512, 512)
    assert raw.zooms == pytest.approx((1.6, 0.57, 0.57), abs=1e-4)
    assert raw.image.min() == -1024 and np.median(raw.image[raw.label == 4]) == pytest.approx(112, abs=5)  # HU
    counts = np.bincount(raw.label.ravel(), minlength=5)
    assert (counts[1:] > 0).all()
    assert counts[1:].tolist() == [222773, 215358, 280405, 2865131]   # spleen, kidneys R/L, liver (no overlaps)


def test_real_patient_zipped_gives_the_identical_volume(real_patient, tmp_path):
    folder, _, raw = real_patient
    patient = tmp_path / "3Dircadb1.1"
    patient.mkdir()
    with zipfile.ZipFile(patient / "PATIENT_DICOM.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted((folder / "3Dircadb1.1" / "PATIENT_DICOM").iterdir()):
            zf.write(path, f"PATIENT_DICOM/{path.name}")
    (patient / "MASKS_DICOM.zip").symlink_to(folder / "3Dircadb1.1" / "MASKS_DICOM.zip")
    zipped = adapter({"root": str(tmp_path)}, tmp_path, {"train": ["1.1"], "test": []}).read_case("1.1")
    np.testing.assert_array_equal(zipped.image, raw.image)
    np.testing.assert_array_equal(zipped.label, raw.label)
    np.testing.assert_array_equal(zipped.ornt, raw.ornt)
    assert zipped.zooms == raw.zooms


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_real_patient_display_frame_anatomy(real_patient, real_display):
    """Radiological display: liver and right kidney on the image left, spleen and left kidney right, anterior
    up (spine down), slice 0 superior (lungs there; liver above the kidneys)."""
    folder, _, raw = real_patient
    label = real_display.label
    assert label.shape == (123, 512, 512)                  # GT slab: right kidney's lowest to liver's top slice
    liver, spleen = _centroid(label == 4), _centroid(label == 1)
    right, left = _centroid(label == 2), _centroid(label == 3)
    assert liver[2] < 256 < spleen[2] and right[2] < 256 < left[2]
    assert liver[1] < right[1] and liver[1] < left[1]      # kidneys behind the liver
    assert liver[0] < right[0] and spleen[0] < left[0]     # liver and spleen above the kidneys
    hu = to_display_frame(raw.image, raw.ornt)             # the whole stack, HU
    spine = np.argwhere(hu[:, :, 216:296] > 400)[:, 1]     # bone in the central columns
    assert np.median(spine) > 300
    lungs = [float((hu[k, 150:350, 100:412] < -400).mean()) for k in (0, len(hu) - 1)]
    assert lungs[0] > 0.5 > 0.1 > lungs[1]                 # air-filled lungs in the top slice, not the bottom one
    import pydicom

    top = pydicom.dcmread(folder / "3Dircadb1.1" / "PATIENT_DICOM" / "image_128").pixel_array
    np.testing.assert_array_equal(hu[0], top)              # the last file (highest z) is the superior end
