"""Contract tests generated from the registry for every kind of plugin but methods (those are in
test_method_contract.py): each registered metric, dataset adapter and SAM backend, built-in or third-party,
gets these for free, the DomainBed / timm way.

- metrics: direction (a perfect match scores better than a poor one, the way ``higher_is_better`` says),
  range (``bounded``), empty masks (both empty is NaN: an absent organ is not scored; one empty is a number
  no better than a perfect match), parity (the harness's scoring gives exactly what the metric gives);
- datasets: case ids, shapes, spacings and label values of a small example of each adapter (the examples
  below write tiny files in its raw layout; a registered adapter without one fails, so none is skipped silently);
- SAM backends: embedding and mask shapes at the slice's resolution, determinism, a box around a bright
  disk gives that disk, and a fingerprint for the embedding cache.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_datasets import ORGANS, adapter, toy_abdomen, write_amos, write_btcv, write_chaos_case, write_nifti
from helpers_ircadb import WINDOW, write_patient
from sfdabench.api import Case, SamEmbedding, SfdaBenchError
from sfdabench.harness.config import compose_run_config
from sfdabench.harness.evaluation import score_volumes
from sfdabench.harness.plugins import get_registry
from sfdabench.harness.protocol import build_metrics

REGISTRY = get_registry()
SPACING = (5.0, 1.5, 1.25)


# ----------------------------------------------------------------------------------------- metrics


def metric(name: str):
    """The metric as a run builds it: the default metrics config (ASD unit, empty policy) with this name."""
    cfg = compose_run_config(["metrics.names=[" + name + "]"]).metrics
    return build_metrics(cfg, REGISTRY)[name]


def blob(shape=(6, 32, 32), centre=(3, 16, 16), radius=(2, 8, 7)) -> np.ndarray:
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    return sum(((a - c) / r) ** 2 for a, c, r in zip((zz, yy, xx), centre, radius)) <= 1


@pytest.mark.parametrize("name", REGISTRY.names("metrics"))
def test_metric_contract(name):
    m = metric(name)
    gt = blob()
    perfect = float(m(gt, gt, SPACING))
    poor = float(m(blob(centre=(3, 19, 12)), gt, SPACING))          # shifted: overlaps, but badly
    assert math.isfinite(perfect) and math.isfinite(poor), (perfect, poor)
    assert (perfect > poor) if m.higher_is_better else (perfect < poor), \
        f"{name}: higher_is_better={m.higher_is_better}, but perfect={perfect} and poor={poor}"
    if m.bounded:
        assert 0.0 <= poor <= 1.0 and 0.0 <= perfect <= 1.0
    assert isinstance(m.unit, str) and (m.unit != "") == bool(m.spatial), (m.unit, m.spatial)

    empty = np.zeros_like(gt)
    assert math.isnan(m(empty, empty, SPACING)), f"{name}: an organ absent from both masks must be NaN (not scored)"
    for pred, truth in ((empty, gt), (gt, empty)):
        value = float(m(pred, truth, SPACING))
        assert math.isnan(value) or ((value <= perfect) if m.higher_is_better else (value >= perfect)), value


@pytest.mark.parametrize("name", REGISTRY.names("metrics"))
def test_metric_parity_with_the_harness_scoring(name):
    m = metric(name)
    gt = np.zeros((6, 32, 32), np.uint8)
    gt[blob()] = 1
    gt[blob(centre=(3, 8, 24), radius=(2, 4, 4))] = 2
    pred = np.zeros_like(gt)
    pred[blob(centre=(3, 17, 15))] = 1                       # organ 2 missed: the one-empty policy
    pred[0, 0:3, 0:3] = 3                                    # organ 3 predicted, absent from GT
    table = score_volumes([pred], [Case("c", np.zeros(gt.shape, np.float32), gt, SPACING)], ORGANS, {name: m})
    for k, organ in enumerate(ORGANS, start=1):
        want = float(m(pred == k, gt == k, SPACING))
        got = float(table.loc[table.organ == organ, name].iloc[0])
        assert (math.isnan(want) and math.isnan(got)) or got == want, (organ, got, want)


# ---------------------------------------------------------------------------------------- datasets


def _nifti_folder(tmp_path: Path):
    image, label = toy_abdomen()
    for case in (1, 2):
        write_nifti(tmp_path / "data" / f"image_{case}.nii.gz", image, ("L", "P", "S"))
        write_nifti(tmp_path / "data" / f"label_{case}.nii.gz", label, ("L", "P", "S"), np.uint8)
    return adapter("nifti_folder", {"root": str(tmp_path / "data"), "modality": "mr", "window": [0, 1200],
                                    "label_map": {o: k for k, o in enumerate(ORGANS, start=1)}},
                   tmp_path, {"train": [1], "test": [2]})


def _btcv(tmp_path: Path):
    for case in (1, 2):
        write_btcv(tmp_path / "btcv", case)
    return adapter("btcv", {"root": str(tmp_path / "btcv")}, tmp_path, {"train": [1], "test": [2]})


def _chaos(tmp_path: Path):
    for case in (1, 2):
        write_chaos_case(tmp_path / "chaos", case)
    return adapter("chaos", {"root": str(tmp_path / "chaos"), "window": [0, 1200]}, tmp_path,
                   {"train": [1], "test": [2]})


def _amos(tmp_path: Path):
    write_amos(tmp_path / "amos", 1)
    write_amos(tmp_path / "amos", 8, folder="Va")
    return adapter("amos", {"root": str(tmp_path / "amos"), "modality": "ct"}, tmp_path,
                   {"train": "imagesTr", "test": "imagesVa"})


def _ircadb(tmp_path: Path):
    for n in (1, 2):
        write_patient(tmp_path / "ircadb", n=n, zip_patient=n == 1)
    return adapter("ircadb", {"root": str(tmp_path / "ircadb"), "window": list(WINDOW)}, tmp_path,
                   {"train": ["1.1"], "test": ["1.2"]})


def _phantom(tmp_path: Path):
    return adapter("phantom", {"modality": "ct", "num_slices": 4, "size": 32}, tmp_path,
                   {"train": [100], "test": [101]})


def _combined(tmp_path: Path):
    parts = {"mr": {"dataset": "phantom", "params": {"modality": "mr", "size": 32, "num_slices": 3}},
             "ct": {"dataset": "btcv", "params": {"root": str(tmp_path / "btcv"), "size": 32}}}
    write_btcv(tmp_path / "btcv", 1)
    return adapter("combined", {"parts": parts}, tmp_path, {"train": ["mr/phantom-mr-0001"], "test": ["ct/1"]})


#: A small example of each built-in adapter in its own raw layout (name -> builder of the adapter).
DATASET_EXAMPLES = {"nifti_folder": _nifti_folder, "btcv": _btcv, "chaos": _chaos, "amos": _amos,
                    "ircadb": _ircadb, "phantom": _phantom, "combined": _combined}


@pytest.mark.parametrize("name", REGISTRY.names("datasets"))
def test_dataset_contract(name, tmp_path):
    if name not in DATASET_EXAMPLES:
        pytest.fail(f"dataset adapter '{name}' has no example in tests/test_plugin_contracts.py DATASET_EXAMPLES")
    ds = DATASET_EXAMPLES[name](tmp_path)
    train, test = ds.case_ids("train"), ds.case_ids("test")
    assert train and test and not set(train) & set(test)
    assert all(isinstance(c, str) for c in train + test) and ds.case_ids("train") == train   # stable
    for case_id in train + test:
        case = ds.load_case(case_id)
        assert case.case_id == case_id
        size = 32 if name in ("phantom", "combined") else 24            # the examples' params.size
        assert case.image.dtype == np.float32 and case.image.ndim == 3 and case.image.shape[1:] == (size, size)
        assert case.label.dtype == np.uint8 and case.label.shape == case.image.shape
        assert 0.0 <= case.image.min() and case.image.max() <= 1.0 and case.image.max() > case.image.min()
        assert set(np.unique(case.label)) <= set(range(len(ORGANS) + 1)) and case.label.max() > 0
        assert len(case.spacing) == 3 and all(float(s) > 0 for s in case.spacing)
    assert isinstance(ds.fingerprint(train), str) and ds.fingerprint(train) != ds.fingerprint(test)
    with pytest.raises(SfdaBenchError, match="no split 'val'"):
        ds.case_ids("val")


# ------------------------------------------------------------------------------------ SAM backends


def sam_backend(name: str):
    """The backend as a run builds it from configs/sam/<name>.yaml; skipped where it needs a checkpoint file
    that is not configured here (MedSAM, SAM: no weights offline)."""
    cfg = compose_run_config([f"sam={name}"]).sam
    try:
        return REGISTRY.get("sam", name)(cfg, torch.device("cpu"))
    except SfdaBenchError as exc:
        if cfg.get("checkpoint") is None and "checkpoint" in str(exc):
            pytest.skip(f"sam={name} needs sam.checkpoint (weights not available offline): {exc}")
        raise


@pytest.mark.parametrize("name", REGISTRY.names("sam"))
def test_sam_backend_contract(name, tmp_path):
    sam = sam_backend(name)
    sam.cache_dir = tmp_path                            # as the harness sets it (exported engines live there)
    h, w = 96, 112
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 40) ** 2 + (xx - 60) ** 2 <= 18 ** 2
    image = np.where(disk, 0.85, 0.15).astype(np.float32)
    emb = sam.embed(image)
    assert isinstance(emb, SamEmbedding) and tuple(emb.image_size) == (h, w)
    features = sam.features(emb)
    assert isinstance(features, torch.Tensor) and features.ndim == 3 and torch.isfinite(features).all()
    ys, xs = np.nonzero(disk)
    box = [int(xs.min()) - 2, int(ys.min()) - 2, int(xs.max()) + 2, int(ys.max()) + 2]
    mask = sam.decode(emb, box)
    assert mask.dtype == bool and mask.shape == (h, w)
    assert 2 * (mask & disk).sum() / (mask.sum() + disk.sum()) > 0.9    # a box around a bright disk: the disk
    np.testing.assert_array_equal(sam.decode(sam.embed(image), box), mask)                  # deterministic
    assert isinstance(sam.fingerprint(), str) and sam.fingerprint()
