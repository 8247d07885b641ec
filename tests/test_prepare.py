"""The prepared-case cache and ``sfdabench prepare``: reuse, invalidation, crash safety, one-line errors."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_DATA_ENV, run_cli
from helpers_datasets import adapter, toy_abdomen, write_btcv, write_nifti
from sfdabench.api import SfdaBenchError


@pytest.fixture
def btcv_root(tmp_path) -> Path:
    root = tmp_path / "btcv"
    write_btcv(root, 1)
    write_btcv(root, 2)
    return root


def btcv(root: Path, tmp_path: Path, **params):
    return adapter("btcv", {"root": str(root), **params}, tmp_path, {"train": [1], "test": [2]})


def test_prepare_writes_npz_and_manifest_then_reuses_them(btcv_root, tmp_path):
    first = btcv(btcv_root, tmp_path)
    assert [(r.case_id, r.status) for r in first.prepare()] == [("0001", "prepared"), ("0002", "prepared")]
    folder = first.cache.folder
    assert folder.parent == tmp_path / "cache" / "prepared" and folder.name.startswith("btcv-")
    assert sorted(p.name for p in folder.iterdir()) == ["0001.npz", "0002.npz", "manifest.json"]  # no temp files
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["preprocessing"]["window"] == [-125.0, 275.0]
    entry = manifest["cases"]["0002"]
    assert entry["shape"] == [8, 24, 24] and entry["spacing"] == pytest.approx([6.0, 1.5, 1.25])
    assert sorted(Path(p).name for p in entry["sources"]) == ["img0002.nii.gz", "label0002.nii.gz"]
    assert entry["organ_slab"] == [2, 9] and entry["original_shape"] == [12, 24, 24]

    again = btcv(btcv_root, tmp_path)
    assert [r.status for r in again.prepare()] == ["cached", "cached"]
    a, b = first.load_case("0002"), again.load_case("0002")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.spacing == b.spacing


def test_changed_input_file_prepares_that_case_again(btcv_root, tmp_path):
    btcv(btcv_root, tmp_path).prepare()
    image, label = toy_abdomen()
    changed = np.array([0, 1, 2, 3, 6], np.int16)[label]
    changed[5, 0:2, 0:2] = 6                                   # one more liver voxel, same file size or not
    write_nifti(btcv_root / "label" / "label0002.nii.gz", changed, ("L", "P", "S"), np.int16)
    ds = btcv(btcv_root, tmp_path)
    assert [(r.case_id, r.status) for r in ds.prepare()] == [("0001", "cached"), ("0002", "prepared")]
    assert ds.load_case("0002").label[3, 0, 0] == 4            # display slice 5 is z 3 after the crop
    os.utime(btcv_root / "img" / "img0001.nii.gz", ns=(1, 1))  # touched: same bytes, new mtime
    assert [r.status for r in btcv(btcv_root, tmp_path).prepare()] == ["prepared", "cached"]


def test_changed_setting_gets_a_new_cache(btcv_root, tmp_path):
    default = btcv(btcv_root, tmp_path)
    default.prepare()
    for params in ({"window": [-100, 200]}, {"size": 16}, {"z_crop_to_labels": False},
                   {"label_map": {"spleen": 1, "right_kidney": 3, "left_kidney": 2, "liver": 6}}):
        other = btcv(btcv_root, tmp_path, **params)
        assert other.cache.folder != default.cache.folder, params
        assert [r.status for r in other.prepare()] == ["prepared", "prepared"], params
    assert [r.status for r in btcv(btcv_root, tmp_path).prepare()] == ["cached", "cached"]   # old cache kept


def test_run_prepares_on_first_load_with_a_log_line(btcv_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sfdabench"):
        btcv(btcv_root, tmp_path).load_case("0001")
    assert "preparing 2 of 2 btcv cases" in caplog.text          # the whole task at once
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sfdabench"):
        btcv(btcv_root, tmp_path).load_case("0002")
    assert "preparing" not in caplog.text


def test_interrupted_preparation_leaves_nothing_trusted(btcv_root, tmp_path, monkeypatch):
    import sfdabench_datasets.preprocess as preprocess

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(preprocess, "atomic_write_text", crash)        # dies after the npz, before the manifest
    ds = btcv(btcv_root, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ds.prepare()
    assert not (ds.cache.folder / "manifest.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(preprocess, "write_npz", crash)                # dies while writing the npz
    with pytest.raises(KeyboardInterrupt):
        btcv(btcv_root, tmp_path).prepare()
    assert not [p for p in ds.cache.folder.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert [r.status for r in btcv(btcv_root, tmp_path).prepare()] == ["prepared", "prepared"]
    (ds.cache.folder / "manifest.json").write_text("{ truncated")     # unreadable manifest: trust nothing
    assert [r.status for r in btcv(btcv_root, tmp_path).prepare()] == ["prepared", "prepared"]


def test_fingerprint_follows_content_not_location(btcv_root, tmp_path):
    fp = btcv(btcv_root, tmp_path).fingerprint(["0001", "0002"])
    moved = tmp_path / "elsewhere"
    shutil.copytree(btcv_root, moved)
    assert btcv(moved, tmp_path).fingerprint(["0001", "0002"]) == fp
    assert btcv(moved, tmp_path, window=[-100, 200]).fingerprint(["0001", "0002"]) != fp
    image, _ = toy_abdomen()
    write_nifti(moved / "img" / "img0001.nii.gz", image - 900.0, ("L", "P", "S"))
    assert btcv(moved, tmp_path).fingerprint(["0001", "0002"]) != fp


# ---------------------------------------------------------------------------------------------- CLI

SMALL_SAMPLE = ["task.source.splits.all=[1,2]", "task.source.splits.test=[2]"]


def test_cli_prepare_sample_task_then_reuse(sample_data, tmp_path):
    cache = tmp_path / "cache"
    out = run_cli("prepare", "task=sample_chaos2amos", f"cache_dir={cache}", *SMALL_SAMPLE, cwd=tmp_path,
                  env={SAMPLE_DATA_ENV: str(sample_data)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "demo only: target train == target test" in out.stdout
    lines = out.stdout.splitlines()
    for case, shape in (("1", "24x256x256"), ("2", "27x256x256"), ("0018", "37x256x256")):
        assert any(line.split()[:2] == [case, "prepared"] and line.endswith(shape) for line in lines), case
    assert "total: 3 prepared, 0 already cached" in out.stdout
    assert "preparing 2 of 2 nifti_folder cases" in out.stderr                 # the log line
    assert len(list((cache / "prepared").glob("nifti_folder-*/manifest.json"))) == 2

    out = run_cli("prepare", "task=sample_chaos2amos", f"cache_dir={cache}", *SMALL_SAMPLE, cwd=tmp_path,
                  env={SAMPLE_DATA_ENV: str(sample_data)})
    assert out.returncode == 0 and "total: 0 prepared, 3 already cached" in out.stdout, out.stderr[-2000:]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and " INFO] " not in line and "WARNING" not in line]


def test_cli_missing_data_is_one_line(tmp_path):
    out = run_cli("prepare", "task=mri2ct", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert out.returncode == 1
    (line,) = _error_lines(out.stderr)
    assert line.startswith("sfdabench: error: CHAOS (MR T2-SPIR) data not found: data.chaos.root is not set")
    assert "https://chaos.grand-challenge.org" in line and "data.chaos.root=" in line and "Traceback" not in out.stderr


def test_cli_bad_input_is_one_line_naming_the_file(tmp_path):
    image, label = toy_abdomen()
    for case in (1, 2):
        write_nifti(tmp_path / "data" / "chaos_mr" / f"image_{case}.nii.gz", image, ("L", "A", "S"))
        write_nifti(tmp_path / "data" / "chaos_mr" / f"label_{case}.nii.gz", label, ("L", "A", "S"), np.uint8)
    bad = tmp_path / "data" / "chaos_mr" / "image_1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])
    out = run_cli("prepare", "task=sample_chaos2amos", f"data.sample.root={tmp_path / 'data'}",
                  f"cache_dir={tmp_path / 'cache'}", *SMALL_SAMPLE, cwd=tmp_path)
    assert out.returncode == 1
    (line,) = _error_lines(out.stderr)
    assert f"cannot read {bad}" in line


def test_cli_prepare_usage_errors(tmp_path):
    out = run_cli("prepare", "-m", "task=sample_chaos2amos", cwd=tmp_path)
    assert out.returncode == 2 and "prepare takes no -m" in out.stderr
    out = run_cli("prepare", "task=nope", cwd=tmp_path)
    assert out.returncode == 2 and "unknown task 'nope'" in out.stderr


def test_cli_prepare_phantom_has_nothing_to_prepare(tmp_path):
    out = run_cli("prepare", "task=phantom_mri2ct", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert out.returncode == 0 and "nothing to prepare" in out.stdout


def test_real_task_configs_compose_with_documented_splits():
    from sfdabench.harness.prepare import compose_run_config

    mri2ct = compose_run_config(["task=mri2ct"])
    assert mri2ct.task.data_protocol.startswith("gt-z-crop (paper protocol)")
    assert list(mri2ct.task.source.splits.test) == [2, 8, 31, 34]
    assert list(mri2ct.task.target.splits.test) == [2, 9, 28, 32, 34, 36]
    full = compose_run_config(["task=ct2mri", "task.z_extent=full"])
    assert full.task.data_protocol.startswith("full volume")
    assert full.task.source.params.z_crop_to_labels is False and full.task.target.params.z_crop_to_labels is False
    for name in ("amos_mri2ct", "amos_ct2mri", "sample_chaos2amos"):
        cfg = compose_run_config([f"task={name}"])
        assert cfg.task.source.params.z_crop_to_labels is True
    from sfdabench.harness.plugins import get_registry

    ds = get_registry().get("datasets", "btcv")(mri2ct.task.target, list(mri2ct.task.organs), Path("/tmp"))
    assert len(ds.case_ids("train")) == 24 and "0009" in ds.case_ids("test")
    proto = compose_run_config(["task=mri2ct", "task.target.splits.test=[2,10,24,35,36,40]"])
    ds = get_registry().get("datasets", "btcv")(proto.task.target, list(proto.task.organs), Path("/tmp"))
    assert len(ds.case_ids("train")) == 24 and "0009" in ds.case_ids("train") and "0024" not in ds.case_ids("train")
    with pytest.raises(SfdaBenchError, match="share cases"):
        bad = compose_run_config(["task=mri2ct", "task.target.splits.train=[1,2]"])
        get_registry().get("datasets", "btcv")(bad.task.target, list(bad.task.organs), Path("/tmp")).case_ids("test")
