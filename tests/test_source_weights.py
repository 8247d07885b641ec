"""Source models named by content, bit-identical reruns, group-readable files, export/import of weights."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_PHANTOM, run_cli
from sfdabench.blocks import atomic
from sfdabench.harness.results import read_rows

#: Columns that legitimately differ between two runs of one config: wall-clock facts.
WALL_CLOCK = ["runtime_s", "finished_at"]


def _run(results, *extra, cwd, method="pseudo_label"):
    out = run_cli("run", f"method={method}", f"results_dir={results}", *TINY_PHANTOM, *extra, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return read_rows(results / "leaderboard.csv")


def _checkpoint(results):
    (path,) = (results / "cache" / "source").glob("*.pt")
    return path


def test_same_config_seed_and_threads_give_identical_weights_and_rows(tmp_path):
    # pseudo_label trains on the target too, so this covers source training and a target-side training loop.
    a = _run(tmp_path / "a", cwd=tmp_path)
    b = _run(tmp_path / "b", cwd=tmp_path)
    assert _checkpoint(tmp_path / "a").read_bytes() == _checkpoint(tmp_path / "b").read_bytes()
    pd.testing.assert_frame_equal(a.drop(columns=WALL_CLOCK), b.drop(columns=WALL_CLOCK))
    assert a["source_weights"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert (a["train_threads"] == 2).all()  # TINY_PHANTOM pins num_threads=2
    (ra,) = (tmp_path / "a" / "runs").iterdir()
    (rb,) = (tmp_path / "b" / "runs").iterdir()
    pa, pb = np.load(ra / "predictions.npz"), np.load(rb / "predictions.npz")
    assert all(np.array_equal(pa[k], pb[k]) for k in pa.files)


def test_source_weights_is_the_sha256_of_the_checkpoint_file(tmp_path):
    import hashlib

    rows = _run(tmp_path / "r", cwd=tmp_path, method="source_only")
    digest = hashlib.sha256(_checkpoint(tmp_path / "r").read_bytes()).hexdigest()
    assert set(rows["source_weights"]) == {digest[:16]}
    assert set(rows["source_config"]) == {_checkpoint(tmp_path / "r").stem.rsplit("-", 1)[-1]}
    # The tiny test source model is far below source_min_dice: every row says so, and why.
    assert (rows["source_dice"] < 0.5).all()
    assert rows["source_flag"].str.startswith("in-domain mean Dice").all()
    assert rows["source_flag"].str.contains("spleen").all()


def test_weak_source_flag_names_mean_and_organs():
    from sfdabench.harness.protocol import weak_source_flag

    dice = {"spleen": 0.95, "liver": 0.7, "mean": 0.825}
    assert weak_source_flag(dice, ["spleen", "liver"], {"mean": 0.9, "organ": 0.8}) == \
        "in-domain mean Dice 0.825 < 0.90; liver 0.700 < 0.80"
    assert weak_source_flag(dice, ["spleen", "liver"], {"mean": 0.8, "organ": 0.6}) == ""
    assert weak_source_flag(dice, ["spleen", "liver"], None) == ""


def test_written_files_follow_the_umask(tmp_path):
    """A results dir shared by a group: every file the run writes is group-readable under umask 002."""
    script = ("import os, sys; os.umask(0o002); from sfdabench.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    results = tmp_path / "res"
    out = subprocess.run([sys.executable, "-c", script, "run", "method=source_only", f"results_dir={results}",
                          *TINY_PHANTOM], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    files = [p for p in results.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert len(files) >= 6
    modes = {str(p.relative_to(results)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert all(mode == 0o664 for mode in modes.values()), modes


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_open_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic.write_bytes(tmp_path / "a.bin", lambda fh: fh.write(b"x"))
        with open(tmp_path / "b.bin", "wb") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == stat.S_IMODE((tmp_path / "b.bin").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~mask


def test_export_import_runs_on_the_very_same_weights(tmp_path):
    first = _run(tmp_path / "alice", cwd=tmp_path, method="source_only")
    shared = tmp_path / "shared.pt"
    out = run_cli("source", "export", str(shared), f"results_dir={tmp_path / 'alice'}", *TINY_PHANTOM, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert first["source_weights"].iloc[0] in out.stdout

    # Bob trains with another thread count: without the import his weights would differ in the last bits.
    bob = [f"results_dir={tmp_path / 'bob'}", *TINY_PHANTOM, "num_threads=1"]
    out = run_cli("source", "import", str(shared), *bob, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    out = run_cli("run", "method=source_only", *bob, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "source model: cached" in out.stderr  # no training: the imported weights were used
    second = read_rows(tmp_path / "bob" / "leaderboard.csv")
    assert set(second["source_weights"]) == set(first["source_weights"])
    assert set(second["train_threads"]) == {2}  # how the weights were made, not how bob ran
    cols = ["organ", "dice", "asd", "hd95"]
    pd.testing.assert_frame_equal(first[cols], second[cols])

    out = run_cli("source", "show", *bob, cwd=tmp_path)
    assert out.returncode == 0 and first["source_weights"].iloc[0] in out.stdout


@pytest.mark.parametrize("extra, expected", [
    (["seed=3"], "not of task phantom_mri2ct seed 3; pass task=phantom_mri2ct seed=0"),
    (["source.width=8"], "does not fit the source architecture"),
])
def test_import_refuses_weights_of_another_seed_or_architecture(tmp_path, extra, expected):
    meta = {"key": "k", "task": "phantom_mri2ct", "seed": 0}
    from sfdabench.blocks.nets import build_segmenter
    from omegaconf import OmegaConf
    from sfdabench.harness.config import compose_run_config

    cfg = compose_run_config([*TINY_PHANTOM, f"results_dir={tmp_path}"])
    model = build_segmenter(OmegaConf.to_container(cfg["source"], resolve=True), 5)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp_path / "w.pt")
    out = run_cli("source", "import", str(tmp_path / "w.pt"), f"results_dir={tmp_path / 'r'}", *TINY_PHANTOM,
                  *extra, cwd=tmp_path)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if " INFO]" not in line]
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert not (tmp_path / "r" / "cache" / "source").exists() or not list((tmp_path / "r" / "cache" / "source").glob("*.pt"))


def test_garbage_checkpoint_is_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    out = run_cli("source", "import", str(tmp_path / "junk.pt"), f"results_dir={tmp_path / 'r'}", *TINY_PHANTOM,
                  cwd=tmp_path)
    assert out.returncode == 1 and "is not a readable torch file" in out.stderr and "Traceback" not in out.stderr
