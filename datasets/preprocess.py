"""What every real-data adapter shares: checked reading, the display frame, label mapping, intensity windows,
in-plane resize, the GT z-crop, and the cache of prepared cases with its manifest.

Per case, in this order (spec 1.3, with the spacing kept as spec 11.4 recommends):

1. read image + native labels, checking what is read (shapes, affines, label values);
2. map native labels to the task's organs (``params.label_map: {organ: native value}``);
3. bring both arrays to the **display frame** (``DISPLAY_AXCODES``) from the affine: (Z, H, W) with slice 0
   the most superior, row 0 anterior and column 0 the patient's right, i.e. axial slices as a radiologist
   reads them; CT and MR then show anatomy the same way round (the spec's "flip CT only" is what this
   amounts to for CHAOS DICOM + BTCV NIfTI, but derived from each file's own orientation);
4. optionally keep only the GT organ slab (``params.z_crop_to_labels``, the paper protocol, spec 1.3 step 3);
5. resize in-plane to ``size`` x ``size`` (skimage, cubic for images, nearest for labels, no anti-aliasing;
   spacing becomes ``spacing * original size / size``, z unchanged);
6. clip to an intensity window and scale to [0, 1] (CT [-125, 275] HU, MR [0, 1200], or per-volume
   percentiles).

Prepared cases live in ``<cache_dir>/prepared/<dataset>-<hash of settings>/``: one compressed npz per case and
``manifest.json``. The manifest is the only thing a reader trusts and is written last (atomically), after the
case's npz has been renamed into place, so an interrupted preparation never leaves a case a later run uses.
A case is reused only while the size and mtime of each of its source files are unchanged.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations

from sfdabench.blocks import atomic
from sfdabench.api import HARNESS_SPLITS, Case, DatasetAdapter, SfdaBenchError, _plain
from sfdabench.harness.results import atomic_write_text, locked

log = logging.getLogger("sfdabench")

#: Bump when the shared pipeline changes what it writes (part of every cache key).
PREPROCESS_VERSION = 1

#: nibabel axis codes of the prepared (Z, H, W) arrays: each axis increases towards Inferior, Posterior, Left.
DISPLAY_AXCODES = ("I", "P", "L")

#: Fixed intensity windows of the paper protocol (spec 1.3 step 6): CT in HU, CHAOS T2-SPIR in scanner units.
DEFAULT_WINDOWS = {"ct": (-125.0, 275.0), "mr": (0.0, 1200.0)}

#: Params that only word messages or locate the data: not part of the cache key (the resolved root is).
MESSAGE_PARAMS = ("root", "root_setting", "title", "download")

#: Splits the harness evaluates; they must not share cases unless the domain block allows it.


def one_line(text: str) -> str:
    """Error messages end up on one terminal line."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn any failure while reading ``path`` (truncated gzip, bad header, corrupt DICOM, ...) into one
    SfdaBenchError that names the file."""
    try:
        yield
    except SfdaBenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - readers raise anything from EOFError to zlib.error
        raise SfdaBenchError(f"cannot read {path}: {type(exc).__name__}: {one_line(exc)} "
                             "(corrupt or truncated file? replace it with a fresh copy)") from exc


# --------------------------------------------------------------------------------------- raw volumes


@dataclass
class RawVolume:
    """One case as read from disk: arrays in the file's own axis order, native label values.

    ``ornt`` is the nibabel orientation of the array axes (from the affine or declared by config), ``zooms``
    the voxel size of each array axis in mm. ``label_source`` names the label file (or folder) in errors;
    ``label_slice_files`` (stacks of 2D label files) is aligned with array axis 0.
    """

    image: np.ndarray
    label: np.ndarray
    ornt: np.ndarray
    zooms: tuple[float, float, float]
    label_source: Path
    label_slice_files: Sequence[Path] = ()

    @classmethod
    def from_affine(cls, image: np.ndarray, label: np.ndarray, affine: np.ndarray, label_source: Path,
                    label_slice_files: Sequence[Path] = ()) -> "RawVolume":
        affine = np.asarray(affine, dtype=np.float64)
        zooms = nib.affines.voxel_sizes(affine)
        if not np.all(np.isfinite(affine)) or np.any(zooms <= 0):
            raise SfdaBenchError(f"{label_source}: degenerate affine / voxel size {zooms.tolist()}")
        return cls(image, label, orientations.io_orientation(affine), tuple(float(z) for z in zooms),
                   label_source, label_slice_files)

    def label_file_of_slice(self, index0: int) -> Path:
        return self.label_slice_files[index0] if self.label_slice_files else self.label_source


def ornt_from_axcodes(axcodes: Sequence[str]) -> np.ndarray:
    """Orientation of arrays without an affine, declared by config, e.g. ``[S, A, L]``: axis 0 increases
    towards Superior, axis 1 towards Anterior (row 0 posterior), axis 2 towards the patient's Left."""
    try:
        return orientations.axcodes2ornt(tuple(str(c).upper() for c in axcodes))
    except Exception as exc:  # noqa: BLE001
        raise SfdaBenchError(f"invalid axis codes {list(axcodes)}: {one_line(exc)}; use three of R/L, A/P, S/I, "
                             "one per array axis") from exc


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(3D array, affine) of a NIfTI file; trailing singleton dimensions are dropped."""
    with reading(path):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = img.affine
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SfdaBenchError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, affine


def read_nifti_pair(image_path: Path, label_path: Path) -> RawVolume:
    """Image + label NIfTI of one case; they must share shape and affine (the same voxel grid)."""
    image, image_affine = load_nifti(image_path)
    label, label_affine = load_nifti(label_path)
    check_same_grid(image.shape, image_affine, label.shape, label_affine, label_path, image_path)
    return RawVolume.from_affine(image, label, image_affine, label_path)


def check_same_grid(image_shape, image_affine, label_shape, label_affine, label_path: Path,
                    image_path: Path) -> None:
    if tuple(image_shape) != tuple(label_shape):
        raise SfdaBenchError(f"{label_path}: label shape {tuple(label_shape)} != image shape {tuple(image_shape)} "
                             f"of {image_path}")
    # 0.01 mm: the float32 precision of NIfTI headers, far below any voxel size
    if label_affine is not None and not np.allclose(image_affine, label_affine, rtol=0, atol=1e-2):
        raise SfdaBenchError(f"{label_path}: label affine differs from the affine of {image_path} "
                             f"(label {np.round(label_affine[:3], 3).tolist()} vs image "
                             f"{np.round(image_affine[:3], 3).tolist()}); the two files are not on the same grid")


# --------------------------------------------------------------------------------------------- labels


def normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


class LabelMapping:
    """Native label values -> task labels (``i + 1`` for ``organs[i]``, 0 background).

    ``label_map`` gives the native value of every task organ; ``unused_labels`` the other native values the
    dataset is known to have (mapped to background). Any other value in a label file is an error, so a
    wrong label map or a foreign label file cannot pass silently.
    """

    def __init__(self, dataset: str, organs: Sequence[str], label_map: Mapping[str, Any],
                 unused_labels: Sequence[Any]):
        missing = [o for o in organs if o not in label_map]
        if missing:
            raise SfdaBenchError(f"dataset {dataset}: params.label_map has no native value for organ "
                                 f"{missing[0]!r} (label_map: {dict(label_map)}); add '{missing[0]}: <value>'")
        try:
            self.to_task = {int(label_map[o]): i + 1 for i, o in enumerate(organs)}
            unused = {int(v) for v in unused_labels}
        except (TypeError, ValueError) as exc:
            raise SfdaBenchError(f"dataset {dataset}: label values must be integers: {one_line(exc)}") from None
        if len(self.to_task) != len(organs):
            raise SfdaBenchError(f"dataset {dataset}: two organs share one native label in {dict(label_map)}")
        self.dataset = dataset
        self.organs = list(organs)
        self.known = {0, *self.to_task, *unused}

    def settings(self) -> dict[str, Any]:
        return {"to_task": {str(k): v for k, v in sorted(self.to_task.items())}, "known": sorted(self.known)}

    def apply(self, raw: RawVolume) -> np.ndarray:
        """uint8 task labels of ``raw`` (same axis order); checks values and that some organ is present."""
        native = raw.label
        if not np.issubdtype(native.dtype, np.integer):
            rounded = np.rint(native)
            if not np.array_equal(rounded, native):
                bad = native[rounded != native]
                raise SfdaBenchError(f"{raw.label_source}: non-integer label values (e.g. {float(bad.flat[0])}); "
                                     "is this an image instead of a label map?")
            native = rounded
        lo, hi = (int(native.min()), int(native.max())) if native.size else (0, 0)
        if lo < 0 or hi > np.iinfo(np.uint16).max:
            values = [int(v) for v in np.unique(native)]
            self._raise_unknown(raw, native, [v for v in values if v not in self.known])
        native = native.astype(np.uint16, copy=False)
        present = [int(v) for v in np.flatnonzero(np.bincount(native.ravel(), minlength=1))]
        unknown = [v for v in present if v not in self.known]
        if unknown:
            self._raise_unknown(raw, native, unknown)
        if not any(v in self.to_task for v in present):
            raise SfdaBenchError(f"{raw.label_source}: empty case, none of the organs {self.organs} is labelled "
                                 f"(label values present: {present}); remove the case from the split or fix "
                                 "params.label_map")
        lut = np.zeros(hi + 1, np.uint8)
        for value, target in self.to_task.items():
            if value <= hi:
                lut[value] = target
        return lut[native]

    def _raise_unknown(self, raw: RawVolume, native: np.ndarray, unknown: list[int]) -> None:
        per_slice = np.isin(native, unknown).reshape(native.shape[0], -1).any(axis=1)
        where = raw.label_file_of_slice(int(np.argmax(per_slice)))
        raise SfdaBenchError(f"{where}: label values {unknown[:8]} are not in the label map of dataset "
                             f"{self.dataset} (known: {sorted(self.known)}); fix params.label_map / "
                             "params.unused_labels or the label file")


# ------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing settings of one domain (from the task's ``params``)."""

    modality: str                                   # "ct" | "mr"
    window: tuple[float, float] | None              # fixed intensity window, before scaling to [0, 1]
    percentiles: tuple[float, float] | None         # per-volume percentile window instead of a fixed one
    size: int                                       # in-plane size after resize
    z_crop_to_labels: bool                          # keep only the GT organ slab (paper protocol)
    z_step: int = 1                                 # keep every z_step-th slice (quick demos and tests only)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], dataset: str, default_modality: str | None) -> "Preprocessing":
        modality = str(params.get("modality") or default_modality or "").lower()
        if modality not in DEFAULT_WINDOWS:
            raise SfdaBenchError(f"dataset {dataset}: params.modality must be 'ct' or 'mr', got "
                                 f"{params.get('modality')!r}")
        percentiles = _pair(params.get("percentiles"), f"dataset {dataset}: params.percentiles")
        window = _pair(params.get("window"), f"dataset {dataset}: params.window")
        if percentiles is not None:
            if window is not None:
                raise SfdaBenchError(f"dataset {dataset}: set params.window or params.percentiles, not both")
            if not 0 <= percentiles[0] < percentiles[1] <= 100:
                raise SfdaBenchError(f"dataset {dataset}: params.percentiles must be 0 <= low < high <= 100")
        else:
            window = window or DEFAULT_WINDOWS[modality]
            if window[1] <= window[0]:
                raise SfdaBenchError(f"dataset {dataset}: params.window must be [low, high] with low < high")
        size = int(params.get("size", 256))
        if size < 8:
            raise SfdaBenchError(f"dataset {dataset}: params.size must be >= 8, got {size}")
        z_step = int(params.get("z_step", 1))
        if z_step < 1:
            raise SfdaBenchError(f"dataset {dataset}: params.z_step must be >= 1, got {z_step}")
        return cls(modality, window, percentiles, size, bool(params.get("z_crop_to_labels", True)), z_step)

    def intensity_window(self, image: np.ndarray) -> tuple[float, float]:
        if self.percentiles is None:
            return self.window  # type: ignore[return-value]
        lo, hi = (float(v) for v in np.percentile(image, self.percentiles))
        return lo, max(hi, lo + 1e-6)


def _pair(value: Any, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SfdaBenchError(f"{what} must be null or [low, high], got {value!r}") from None
    return lo, hi


@dataclass
class PreparedVolume:
    image: np.ndarray                    # float32 (Z, H, W) in [0, 1], display frame
    label: np.ndarray                    # uint8 (Z, H, W) task labels
    spacing: tuple[float, float, float]  # (z, y, x) mm of the arrays as stored
    info: dict[str, Any]


def to_display_frame(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt(DISPLAY_AXCODES))
    return np.ascontiguousarray(orientations.apply_orientation(array, transform))


def display_spacing(zooms: Sequence[float], ornt: np.ndarray) -> tuple[float, float, float]:
    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt(DISPLAY_AXCODES))
    out = [0.0, 0.0, 0.0]
    for in_axis, (out_axis, _) in enumerate(transform):
        out[int(out_axis)] = float(zooms[in_axis])
    return out[0], out[1], out[2]


def organ_slab(label: np.ndarray) -> tuple[int, int]:
    """First and last slice (inclusive) containing any organ."""
    slices = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
    return int(slices[0]), int(slices[-1])


def resize_inplane(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice-wise resize to (size, size): cubic spline for images, nearest for labels (spec 1.3 step 5)."""
    if image.shape[1:] == (size, size):
        return image, label
    from skimage.transform import resize

    shape = (size, size)
    image = np.stack([resize(s, shape, order=3, mode="edge", anti_aliasing=False, preserve_range=True)
                      for s in image]).astype(np.float32)
    label = np.stack([resize(s, shape, order=0, mode="edge", anti_aliasing=False, preserve_range=True)
                      for s in label]).astype(np.uint8)
    return image, label


def apply_window(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((image - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)


def preprocess_volume(raw: RawVolume, labels: LabelMapping, settings: Preprocessing) -> PreparedVolume:
    """Steps 2-6 of the module docstring."""
    task_label = labels.apply(raw)
    image = to_display_frame(raw.image.astype(np.float32, copy=False), raw.ornt)
    label = to_display_frame(task_label, raw.ornt)
    spacing = display_spacing(raw.zooms, raw.ornt)
    window = settings.intensity_window(image)          # percentiles of the whole volume, before any crop
    z0, z1 = organ_slab(label)
    info = {"original_shape": list(image.shape), "original_spacing": list(spacing), "organ_slab": [z0, z1],
            "window": list(window)}
    if settings.z_crop_to_labels:
        image, label = image[z0:z1 + 1], label[z0:z1 + 1]
    if settings.z_step > 1:  # thinner sampling: the slice distance (and so mm metrics) grows with it
        image, label = image[::settings.z_step], label[::settings.z_step]
        spacing = (spacing[0] * settings.z_step, spacing[1], spacing[2])
    height, width = image.shape[1:]
    image, label = resize_inplane(image, label, settings.size)
    spacing = (spacing[0], spacing[1] * height / settings.size, spacing[2] * width / settings.size)
    return PreparedVolume(apply_window(image, window), label, spacing, info)


# ------------------------------------------------------------------------------------------- cache


def settings_hash(settings: Mapping[str, Any]) -> str:
    from sfdabench.harness.results import stable_hash

    return stable_hash(settings)


def file_stamps(paths: Sequence[Path]) -> dict[str, list[int]]:
    """``{path: [size, mtime_ns]}``: cheap change detection for source files (no re-reading)."""
    stamps = {}
    for p in paths:
        st = p.stat()
        stamps[str(p)] = [int(st.st_size), int(st.st_mtime_ns)]
    return stamps


def content_hash(prepared: PreparedVolume) -> str:
    h = hashlib.sha1()
    for arr in (prepared.image, prepared.label):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(json.dumps([round(float(s), 6) for s in prepared.spacing]).encode())
    return h.hexdigest()[:16]


def write_npz(fh: Any, **arrays: np.ndarray) -> None:
    """A compressed npz (what ``np.savez_compressed`` writes) at zlib level 1: 4x faster than its level 6 on
    prepared volumes, for ~10% more bytes."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for key, array in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


class PreparedCache:
    """One folder of prepared cases for one (dataset, settings) pair; see the module docstring."""

    MANIFEST = "manifest.json"
    FORMAT = 1

    def __init__(self, cache_dir: Path, dataset: str, settings: Mapping[str, Any]):
        self.settings = dict(settings)
        self.key = settings_hash(self.settings)
        self.folder = Path(cache_dir) / "prepared" / f"{dataset}-{self.key}"
        self.dataset = dataset

    def lock(self):
        return locked(self.folder)

    def manifest(self) -> dict[str, Any]:
        path = self.folder / self.MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if data.get("key") == self.key and data.get("format") == self.FORMAT else {}

    def entry_if_current(self, case_id: str, stamps: Mapping[str, list[int]]) -> dict[str, Any] | None:
        """The manifest entry of a case, if it was prepared from exactly these source files."""
        entry = self.manifest().get("cases", {}).get(case_id)
        if not entry or entry.get("sources") != dict(stamps):
            return None
        npz = self.folder / entry["file"]
        return entry if npz.is_file() and npz.stat().st_size == entry.get("bytes") else None

    def store(self, case_id: str, prepared: PreparedVolume, stamps: Mapping[str, list[int]],
              seconds: float) -> dict[str, Any]:
        """Write the case's npz (temp name, then rename), then the manifest entry (atomically, last)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", case_id) + ".npz"
        atomic.write_bytes(self.folder / name, lambda fh: write_npz(
            fh, image=prepared.image, label=prepared.label, spacing=np.asarray(prepared.spacing, np.float64)),
            fsync=True)
        entry = {"file": name, "bytes": (self.folder / name).stat().st_size, "shape": list(prepared.image.shape),
                 "spacing": list(prepared.spacing), "content_sha1": content_hash(prepared), "sources": dict(stamps),
                 "prepare_seconds": round(seconds, 3), **prepared.info}
        manifest = self.manifest() or {"format": self.FORMAT, "dataset": self.dataset, "key": self.key,
                                       "settings": self.settings, "cases": {}}
        manifest["cases"][case_id] = entry
        atomic_write_text(self.folder / self.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return entry

    def load(self, case_id: str, entry: Mapping[str, Any]) -> Case:
        path = self.folder / entry["file"]
        with reading(path), np.load(path) as data:
            image, label, spacing = data["image"], data["label"], data["spacing"]
        if list(image.shape) != entry["shape"]:
            raise SfdaBenchError(f"{path}: shape {image.shape} differs from the manifest; delete {self.folder} "
                                 "to prepare it again")
        return Case(case_id=case_id, image=image, label=label, spacing=tuple(float(s) for s in spacing))


# ------------------------------------------------------------------------------------------ adapter


@dataclass
class PrepareRecord:
    """One case of a ``prepare`` call: ``status`` is ``prepared`` (just now) or ``cached``."""

    case_id: str
    status: str
    seconds: float
    shape: tuple[int, ...]


class PreparedVolumeAdapter(DatasetAdapter):
    """Base of the real-data adapters: reads a case (subclass), preprocesses and caches it (here).

    Common ``params``: ``root`` (data folder, usually ``${data.<dataset>.root}``), ``modality`` (ct|mr),
    ``label_map`` ({organ: native value}; default: the dataset's own map), ``unused_labels`` (other native
    values, mapped to background; default: the rest of the dataset's map), ``window`` ([low, high]; default
    CT [-125, 275], MR [0, 1200]) or ``percentiles`` ([0.5, 99.5]: per-volume window), ``size`` (256),
    ``z_crop_to_labels`` (true: the paper's GT organ slab), ``z_step`` (1; k keeps every k-th slice of the
    slab, z spacing x k: for quick demos and tests, never for benchmark numbers). ``root_setting``, ``title`` and ``download`` word
    the missing-data message (default setting ``data.<dataset>.root``).

    ``splits.<name>`` is a list of case ids, a dataset keyword (see ``named_cases``), or ``rest``: the cases
    of ``splits.all`` not in any other split. ``train`` and ``test`` must not share cases unless the domain
    block says ``allow_split_overlap: true``.
    """

    #: for the missing-data message
    title: ClassVar[str] = ""
    download_url: ClassVar[str] = ""
    expected_layout: ClassVar[str] = ""
    default_modality: ClassVar[str | None] = None
    #: the dataset's own label map, native value -> organ name (names as in the task organ lists)
    native_labels: ClassVar[Mapping[int, str]] = {}
    #: bump when a subclass changes what it reads (part of the cache key)
    reader_version: ClassVar[int] = 1

    def __init__(self, cfg: Mapping[str, Any], organs: Sequence[str], cache_dir: Path):
        super().__init__(cfg, organs, cache_dir)
        self.params: dict[str, Any] = dict(_plain(cfg.get("params")) or {})
        root = self.params.get("root")
        self.root = Path(str(root)).expanduser() if root not in (None, "") else None
        self.root_setting = str(self.params.get("root_setting") or f"data.{self.name}.root")
        self.title = str(self.params.get("title") or self.title or self.name)
        self.download_url = str(self.params.get("download") or self.download_url)
        self.preprocessing = Preprocessing.from_params(self.params, self.name, self.default_modality)
        default_map = {name: value for value, name in self.native_labels.items()}
        label_map = self.params.get("label_map") or {o: default_map[o] for o in self.organs if o in default_map}
        unused = self.params.get("unused_labels")
        if unused is None:   # every other value of the dataset's own map is a known, unused label
            mapped = {str(v) for v in label_map.values()}
            unused = [v for v in self.native_labels if str(v) not in mapped]
        self.labels = LabelMapping(self.name, self.organs, label_map, unused)
        self._cache: PreparedCache | None = None
        self._ready: dict[str, dict[str, Any]] = {}       # case id -> manifest entry, checked this session

    # ---------------------------------------------------------------- what a dataset implements

    def layout_found(self, root: Path) -> bool:
        """True if ``root`` looks like this dataset (before any case is looked up)."""
        return root.is_dir()

    @abc.abstractmethod
    def case_files(self, case_id: str) -> list[Path]:
        """Every source file of a case (for change detection); raises SfdaBenchError naming what is absent."""

    @abc.abstractmethod
    def read_case(self, case_id: str) -> RawVolume:
        """Read and check one case."""

    # ---------------------------------------------------------------- data root

    def missing_data(self, what: str) -> SfdaBenchError:
        return SfdaBenchError(
            f"{self.title} data not found: {what}; expected {self.expected_layout}; download it from "
            f"{self.download_url} and add {self.root_setting}=/path/to/it to the sfdabench command")

    def checked_root(self) -> Path:
        if self.root is None:
            raise self.missing_data(f"{self.root_setting} is not set")
        if not self.root.is_dir():
            raise self.missing_data(f"no folder {self.root} ({self.root_setting})")
        if not self.layout_found(self.root):
            raise self.missing_data(f"{self.root} ({self.root_setting}) does not hold this dataset")
        return self.root

    # ---------------------------------------------------------------- splits (resolved by DatasetAdapter)

    def all_split_ids(self) -> list[str]:
        ids: list[str] = []
        for split in HARNESS_SPLITS:
            if split in (self.cfg.get("splits") or {}):
                ids += [c for c in self.case_ids(split) if c not in ids]
        return ids

    # ---------------------------------------------------------------- preparation and loading

    def settings(self) -> dict[str, Any]:
        """Everything that shapes a prepared case (the cache key)."""
        params = {k: v for k, v in self.params.items() if k not in MESSAGE_PARAMS}
        return {"dataset": self.name, "preprocess_version": PREPROCESS_VERSION,
                "reader_version": self.reader_version, "root": str(self.checked_root().resolve()),
                "organs": self.organs, "labels": self.labels.settings(),
                "preprocessing": dataclasses.asdict(self.preprocessing), "params": params}

    @property
    def cache(self) -> PreparedCache:
        if self._cache is None:
            self._cache = PreparedCache(self.cache_dir, self.name, self.settings())
        return self._cache

    def prepare(self, case_ids: Sequence[str] | None = None) -> list[PrepareRecord]:
        """Prepare (or find current in the cache) these cases; default: every case of the task's splits."""
        ids = list(case_ids) if case_ids is not None else self.all_split_ids()
        cache = self.cache
        records: list[PrepareRecord] = []
        with cache.lock():
            todo = []
            for cid in ids:
                stamps = file_stamps(self.case_files(cid))
                entry = cache.entry_if_current(cid, stamps)
                if entry is None:
                    todo.append((cid, stamps))
                else:
                    self._ready[cid] = entry
                    records.append(PrepareRecord(cid, "cached", 0.0, tuple(entry["shape"])))
            if todo:
                log.info("preparing %d of %d %s cases into %s (not in the cache, or inputs changed)", len(todo),
                         len(ids), self.name, cache.folder)
            for cid, stamps in todo:
                start = time.perf_counter()
                prepared = preprocess_volume(self.read_case(cid), self.labels, self.preprocessing)
                if file_stamps(self.case_files(cid)) != stamps:
                    raise SfdaBenchError(f"{self.name} case {cid}: source files changed while being read; "
                                         "prepare again")
                self._ready[cid] = cache.store(cid, prepared, stamps, time.perf_counter() - start)
                seconds = time.perf_counter() - start
                log.info("prepared %s case %s in %.2f s: %s", self.name, cid, seconds, tuple(prepared.image.shape))
                records.append(PrepareRecord(cid, "prepared", seconds, tuple(prepared.image.shape)))
        order = {cid: i for i, cid in enumerate(ids)}
        return sorted(records, key=lambda r: order[r.case_id])

    def load_case(self, case_id: str) -> Case:
        case_id = self.normalise_case_id(case_id)
        if case_id not in self._ready:
            # first use: check/prepare every case of the task at once (one log block, one lock)
            wanted = self.all_split_ids()
            self.prepare(wanted if case_id in wanted else [case_id])
        return self.cache.load(case_id, self._ready[case_id])

    def fingerprint(self, case_ids: Sequence[str]) -> str:
        """Changes with the prepared content and settings, not with where the data lives."""
        missing = [c for c in case_ids if c not in self._ready]
        if missing:
            self.prepare(missing)
        settings = {k: v for k, v in self.cache.settings.items() if k != "root"}
        return json.dumps({"dataset": self.name, "settings": settings,
                           "cases": {c: self._ready[c]["content_sha1"] for c in case_ids}},
                          sort_keys=True, default=str)


def numbered(text: str) -> int | None:
    """The last integer in a file name (slice numbers of CHAOS PNGs, case numbers of BTCV files)."""
    found = re.findall(r"\d+", text)
    return int(found[-1]) if found else None
