"""3D-IRCADb-01 (IRCAD, Strasbourg): 20 contrast CTs with expert masks, in the layout IRCAD distributes::

    <root>/3Dircadb1.<N>/PATIENT_DICOM.zip      PATIENT_DICOM/image_0 .. image_<Z-1>: the CT, one DICOM file per
                                                slice, no file extension; HU via RescaleSlope/Intercept
    <root>/3Dircadb1.<N>/MASKS_DICOM.zip        MASKS_DICOM/<structure>/image_0 ..: one binary DICOM slice per CT
                                                slice and structure (liver, rightkidney, leftkidney, spleen,
                                                artery, bone, lungs, tumours, ...); foreground = pixel value > 0
    (+ LABELLED_DICOM.zip, MESHES_VTK.zip: not read)

Either archive may also be unzipped in place (``PATIENT_DICOM/``, ``MASKS_DICOM/``); an unzipped folder is
read in preference to its zip. Zips are read member by member in memory, never extracted to disk.

Case ids are ``"1.<N>"`` (the suffix of the patient folder, as IRCAD names patients: ``"1.1"`` ..
``"1.20"``); ``"3Dircadb1.<N>"`` and the bare patient number ``<N>`` (int or digits) are accepted too. A
float such as ``1.1`` is refused: YAML reads ``1.10`` as ``1.1``, so the float cannot say which patient.

Organs come from the structure folders: ``params.label_map`` is ``{organ: structure folder name}`` (default
``DEFAULT_STRUCTURES``). The adapter builds the label volume itself (task label ``i + 1`` for
``organs[i]``). Where two organ masks claim a voxel, the smaller organ (fewer voxels in this patient) keeps
it and the overlap is logged: a thin organ drawn against a big one keeps its border, and the result does not
depend on the task's organ order (patient 1.1 has no overlap among its four organs). A patient without a
structure folder for a task organ (IRCAD has kidney and spleen masks for only some patients), or whose
folder has no foreground voxel, is an error naming the patient and organ: an unlabelled organ must not be
scored as absent.

Geometry, as measured on patient 1.1 (129 slices of 512 x 512, 0.57 mm, 1.6 mm apart): the headers carry
only ImageOrientationPatient [1, 0, 0, 0, 1, 0], PixelSpacing, and ImagePositionPatient [0, 0, 1.6 k] for
file ``image_k`` (x, y always 0; no SliceLocation), with InstanceNumber k. The anatomy agrees with these tags
read as DICOM LPS: z grows towards the head (lungs masks in files 84-128, liver 27-124, spleen 72-117, left
kidney 41-102, right kidney 2-48 (a low-lying right kidney, seen on a coronal overlay): image_0 is the most
inferior slice), rows grow towards posterior (spine and table at the bottom of the stored slice) and columns
towards the patient's left (liver at low columns). Pixels are int16 with slope 1, intercept 0, and already HU
(air -1024, liver median 112, kidneys 205: contrast enhanced).
So the slices are stacked by ImagePositionPatient along the slice normal like any DICOM series
(``sfdabench_datasets.dicom``), and the affine brings the volume to the display frame (slice 0 superior,
anterior up, patient right on the image left) in the shared preprocessing. Each mask file ``image_k`` has the
position and InstanceNumber of CT file ``image_k``; the adapter matches masks to slices by file name and
checks size and, where the mask says it, position and InstanceNumber.
"""
from __future__ import annotations

import io
import logging
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Mapping, Sequence

import numpy as np

from sfdabench.api import SfdaBenchError, _plain
from sfdabench.hookspecs import hookimpl
from sfdabench_datasets.dicom import DicomSlice, sort_series
from sfdabench_datasets.preprocess import PreparedVolumeAdapter, RawVolume, reading

log = logging.getLogger("sfdabench")

#: patient folders are <root>/3Dircadb<case id>, e.g. 3Dircadb1.1
FOLDER_PREFIX = "3Dircadb"

#: task organ -> IRCAD structure folder in MASKS_DICOM
DEFAULT_STRUCTURES = {"liver": "liver", "right_kidney": "rightkidney", "left_kidney": "leftkidney",
                      "spleen": "spleen"}

#: mm: headers store positions as decimal strings; a mask further off than this is not on the CT's grid
POSITION_TOLERANCE = 1e-2


class DicomArchive:
    """The files of ``PATIENT_DICOM`` or ``MASKS_DICOM`` of one patient: the unzipped folder if there is one,
    else the zip. Files are named by their path inside the archive folder (``image_3``, ``liver/image_3``);
    ``path()`` gives the name for messages (a zip member reads ``.../MASKS_DICOM.zip/MASKS_DICOM/liver/image_3``)."""

    def __init__(self, patient_dir: Path, name: str):
        self.name = name
        self.folder, self.zip_path = patient_dir / name, patient_dir / f"{name}.zip"
        self.zipped = not self.folder.is_dir() and self.zip_path.is_file()
        self.found = self.folder.is_dir() or self.zipped
        self.location = self.zip_path if self.zipped else self.folder
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}          # file name inside the archive folder -> zip member
        self._files: list[str] | None = None

    def __enter__(self) -> "DicomArchive":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def files(self) -> list[str]:
        """Every file of the archive folder (no directories, no hidden or macOS resource files)."""
        if self._files is None:
            if self.zipped:
                with reading(self.zip_path):
                    self._zip = zipfile.ZipFile(self.zip_path)
                    infos = self._zip.infolist()
                prefix = f"{self.name}/"
                for info in infos:
                    if info.is_dir() or info.filename.startswith("__MACOSX/"):
                        continue
                    # IRCAD's zips hold the folder itself (MASKS_DICOM/liver/image_0); a zip of its contents
                    # (liver/image_0) reads the same
                    name = info.filename[len(prefix):] if info.filename.startswith(prefix) else info.filename
                    if not name.rsplit("/", 1)[-1].startswith("."):
                        self._members[name] = info.filename
                names = list(self._members)
            else:
                names = [p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*")
                         if p.is_file() and not p.name.startswith(".")]
            self._files = sorted(names, key=_natural)
        return self._files

    def path(self, name: str) -> Path:
        return self.zip_path / self._members[name] if self.zipped else self.folder / name

    def open(self, name: str) -> BinaryIO | None:
        """The file's bytes in memory for a zip member; None for a plain file (pydicom reads its path)."""
        if not self.zipped:
            return None
        assert self._zip is not None, "files() first"
        with reading(self.path(name)):              # a bad CRC or truncated member names the member
            return io.BytesIO(self._zip.read(self._members[name]))

    def source_files(self) -> list[Path]:
        """What change detection stamps: the zip, or every file of the folder."""
        return [self.zip_path] if self.zipped else [self.folder / n for n in self.files()]


def _natural(name: str) -> tuple:
    """image_2 before image_10 (only for tidy messages: slices are ordered by position)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def read_mask(path: Path, source: BinaryIO | None, ct: DicomSlice) -> np.ndarray:
    """One binary mask slice (pixel value > 0), checked to lie on the grid of its CT slice ``ct``."""
    import pydicom

    with reading(path):
        ds = pydicom.dcmread(source if source is not None else str(path))
        mask = ds.pixel_array > 0
        position = [float(v) for v in ds.ImagePositionPatient] if "ImagePositionPatient" in ds else None
        instance = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    if mask.shape != ct.pixels.shape:
        raise SfdaBenchError(f"{path}: mask size {mask.shape} != CT slice size {ct.pixels.shape} of {ct.path}")
    # file names pair a mask with its slice; the header, where it says anything, must agree
    if position is not None and not np.allclose(position, ct.position, rtol=0, atol=POSITION_TOLERANCE):
        raise SfdaBenchError(f"{path}: mask position {position} != position {ct.position.tolist()} of CT slice "
                             f"{ct.path}; the masks are not on the CT's grid")
    if instance is not None and instance != ct.instance:
        raise SfdaBenchError(f"{path}: mask InstanceNumber {instance} != InstanceNumber {ct.instance} of CT slice "
                             f"{ct.path}; the masks are not on the CT's grid")
    return mask


class IrcadbDataset(PreparedVolumeAdapter):
    """3D-IRCADb-01 abdominal CT, IRCAD's DICOM zips (per-structure expert masks; 20 patients)."""

    name = "ircadb"
    title = "3D-IRCADb-01"
    download_url = "https://www.ircad.fr/research/data-sets/liver-segmentation-3d-ircadb-01/"
    expected_layout = ("<root>/3Dircadb1.N/PATIENT_DICOM.zip (or unzipped PATIENT_DICOM/image_K) + "
                       "<root>/3Dircadb1.N/MASKS_DICOM.zip (or unzipped MASKS_DICOM/<structure>/image_K)")
    default_modality = "ct"
    default_structures: ClassVar[Mapping[str, str]] = DEFAULT_STRUCTURES

    def __init__(self, cfg: Mapping[str, Any], organs: Sequence[str], cache_dir: Any):
        params = dict(_plain(cfg.get("params")) or {})
        self.structures = self._structure_map(params.get("label_map"), list(organs))
        if params.get("unused_labels") is not None:
            raise SfdaBenchError("dataset ircadb: params.unused_labels does not apply (masks are per-structure "
                                 "folders; structures not in params.label_map are simply not read); remove it")
        # read_case builds a label volume that already holds task labels (organs[i] -> i + 1), so the shared
        # LabelMapping is the identity; the folder names go back into params, and so into the cache key
        params["label_map"] = {organ: i + 1 for i, organ in enumerate(organs)}
        super().__init__({**cfg, "params": params}, organs, cache_dir)
        self.params["label_map"] = dict(self.structures)

    def _structure_map(self, label_map: Any, organs: list[str]) -> dict[str, str]:
        """``{organ: structure folder}`` for every task organ, in task order."""
        given = label_map if label_map else self.default_structures
        if not isinstance(given, Mapping):
            raise SfdaBenchError(f"dataset ircadb: params.label_map must map organ -> structure folder name "
                                 f"(e.g. {{liver: liver}}), got {label_map!r}")
        missing = [o for o in organs if o not in given]
        if missing:
            raise SfdaBenchError(f"dataset ircadb: params.label_map has no structure folder for organ "
                                 f"{missing[0]!r} (label_map: {dict(given)}); add '{missing[0]}: <folder in "
                                 "MASKS_DICOM>'")
        structures = {o: given[o] for o in organs}
        bad = [o for o, s in structures.items() if not isinstance(s, str) or not s or "/" in s]
        if bad:
            raise SfdaBenchError(f"dataset ircadb: params.label_map.{bad[0]} must be the name of a folder in "
                                 f"MASKS_DICOM (e.g. liver, rightkidney), got {structures[bad[0]]!r}")
        if len(set(structures.values())) != len(structures):
            raise SfdaBenchError(f"dataset ircadb: two organs share one structure folder in {structures}")
        return structures

    # ---------------------------------------------------------------- layout and case ids

    def layout_found(self, root: Path) -> bool:
        return any(p.is_dir() for p in root.glob(f"{FOLDER_PREFIX}1.*"))

    def normalise_case_id(self, case_id: Any) -> str:
        if isinstance(case_id, float):
            raise SfdaBenchError(f"dataset ircadb: case id {case_id!r} is a decimal number, which cannot tell "
                                 "patient 1.1 from 1.10; quote it ('1.10') or give the patient number (10)")
        text = str(case_id).strip()
        match = re.fullmatch(rf"(?:{FOLDER_PREFIX})?1\.(\d+)", text) or re.fullmatch(r"(\d+)", text)
        return f"1.{int(match.group(1))}" if match else text

    def patient_dir(self, case_id: str) -> Path:
        root = self.checked_root()
        folder = root / f"{FOLDER_PREFIX}{case_id}"
        if not folder.is_dir():
            raise SfdaBenchError(f"{self.title} patient {case_id}: no folder {folder.name}/ in {root} "
                                 f"({self.root_setting}); expected {self.expected_layout}; the patient is listed "
                                 f"in the task's splits (fix them or {self.root_setting})")
        return folder

    def _archives(self, case_id: str) -> tuple[DicomArchive, DicomArchive]:
        folder = self.patient_dir(case_id)
        archives = DicomArchive(folder, "PATIENT_DICOM"), DicomArchive(folder, "MASKS_DICOM")
        for archive in archives:
            if not archive.found:
                raise SfdaBenchError(f"{self.title} patient {case_id}: neither {archive.name}.zip nor "
                                     f"{archive.name}/ in {folder}; expected {self.expected_layout}")
        return archives

    def case_files(self, case_id: str) -> list[Path]:
        images, masks = self._archives(case_id)
        with images, masks:
            return images.source_files() + masks.source_files()

    # ---------------------------------------------------------------- reading

    def read_case(self, case_id: str) -> RawVolume:
        images, masks = self._archives(case_id)
        with images, masks:
            names = [n for n in images.files() if "/" not in n]     # the CT slices sit at the archive's top
            if not names:
                raise SfdaBenchError(f"{self.title} patient {case_id}: no CT slice files in {images.location}")
            slices = [DicomSlice(images.path(n), images.open(n)) for n in names]
            name_of = {id(s): n for s, n in zip(slices, names)}
            slices, affine = sort_series(slices)
            organ_masks = {organ: self._read_organ(case_id, organ, masks, slices, [name_of[id(s)] for s in slices])
                           for organ in self.organs}
        image = np.stack([s.pixels for s in slices])
        return RawVolume.from_affine(image, self._label_volume(case_id, organ_masks), affine, masks.location)

    def _read_organ(self, case_id: str, organ: str, masks: DicomArchive, slices: list[DicomSlice],
                    names: list[str]) -> np.ndarray:
        """The organ's (Z, H, W) mask stacked in the order of ``slices`` (CT file ``names``)."""
        structure = self.structures[organ]
        files = {n.split("/", 1)[1]: n for n in masks.files() if n.startswith(f"{structure}/")}
        if not files:
            present = sorted({n.split("/", 1)[0] for n in masks.files() if "/" in n})
            raise SfdaBenchError(f"{self.title} patient {case_id} has no {organ} mask: no structure folder "
                                 f"'{structure}/' in {masks.location} (it has: {', '.join(present) or 'none'}); "
                                 f"remove the patient from the task's splits or fix params.label_map.{organ}")
        if len(files) != len(slices):
            raise SfdaBenchError(f"{masks.location}: {structure}/ holds {len(files)} mask slices but the CT "
                                 f"({slices[0].path.parent}) has {len(slices)}; the masks do not belong to this "
                                 "CT (incomplete or foreign archive?)")
        stack = []
        for ct, name in zip(slices, names):
            if name not in files:
                raise SfdaBenchError(f"{ct.path}: no mask {structure}/{name} in {masks.location}")
            stack.append(read_mask(masks.path(files[name]), masks.open(files[name]), ct))
        mask = np.stack(stack)
        if not mask.any():
            raise SfdaBenchError(f"{self.title} patient {case_id} has no {organ} mask: {structure}/ in "
                                 f"{masks.location} has no foreground voxel; remove the patient from the task's "
                                 "splits")
        return mask

    def _label_volume(self, case_id: str, organ_masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """Task labels from the organ masks; a voxel two masks claim goes to the smaller organ."""
        sizes = {organ: int(m.sum()) for organ, m in organ_masks.items()}
        first = next(iter(organ_masks.values()))
        label = np.zeros(first.shape, np.uint8)
        claims = np.zeros(first.shape, np.uint8)
        # largest first, so that smaller organs overwrite: order-free, unlike "first/last in the task list"
        for organ in sorted(organ_masks, key=lambda o: (-sizes[o], self.organs.index(o))):
            label[organ_masks[organ]] = self.organs.index(organ) + 1
            claims += organ_masks[organ]
        overlap = int(np.count_nonzero(claims > 1))
        if overlap:
            log.warning("%s patient %s: %d voxels lie in two organ masks; each went to the smaller organ",
                        self.title, case_id, overlap)
        return label


@hookimpl
def sfdabench_datasets() -> list[type]:
    return [IrcadbDataset]
