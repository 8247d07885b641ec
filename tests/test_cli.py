"""The CLI as a user meets it: list, bad names, and a complete tiny run on the phantom task."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import TINY_PHANTOM, run_cli
from sfdabench.harness.results import LEADERBOARD_COLUMNS


def test_list_shows_builtins_with_distribution(tmp_path):
    out = run_cli("list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("source_only", "oracle", "phantom_mri2ct", "phantom_ct2mri", "phantom", "dice", "asd", "hd95",
                 "litemedsam", "medsam", "sam"):
        assert f"  {name} " in out.stdout, name
    assert "sfdabench 0.1.0" in out.stdout
    assert "failed plugin" not in out.stdout


@pytest.mark.parametrize("args, expected", [
    (["run", "method=no_such_method"], "unknown method 'no_such_method'; available:"),
    (["run", "task=no_such_task"], "unknown task 'no_such_task'; available:"),
    (["run", "-m", "method=source_only,nope"], "unknown method 'nope'"),
    (["run", "sam=nope"], "unknown sam 'nope'"),
    (["list", "gadgets"], "unknown list kind 'gadgets'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_names_exit_2_with_one_line(tmp_path, args, expected):
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_bad_device_is_one_line(tmp_path):
    out = run_cli("run", "device=tpu", *TINY_PHANTOM[:1], cwd=tmp_path)
    assert out.returncode == 2  # a usage error, found before Hydra starts
    assert "unknown device 'tpu'" in out.stderr and "Traceback" not in out.stderr


def test_tiny_phantom_run_end_to_end(tmp_path):
    results = tmp_path / "res"
    out = run_cli("run", "method=source_only", f"results_dir={results}", *TINY_PHANTOM, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phantom_mri2ct | source_only" in out.stdout and "spleen" in out.stdout and "mean" in out.stdout
    (run_dir,) = (results / "runs").iterdir()
    for name in ("config.yaml", "environment.json", "per_case.csv", "summary.json", "done"):
        assert (run_dir / name).exists(), name
    env = json.loads((run_dir / "environment.json").read_text())
    assert {"python", "torch", "numpy", "medpy", "git_rev", "plugins"} <= set(env)
    # label-free class shares of target-train, before and after adaptation (source_only: the same model)
    shares = json.loads((run_dir / "summary.json").read_text())["diagnostics"]["prediction_share"]
    assert shares["source_model"] == shares["adapted"]
    assert list(shares["adapted"])[0] == "background" and sum(shares["adapted"].values()) == pytest.approx(1.0)
    board = pd.read_csv(results / "leaderboard.csv")
    assert set(LEADERBOARD_COLUMNS) <= set(board.columns)
    assert list(board["organ"]) == ["spleen", "right_kidney", "left_kidney", "liver", "mean"]
    assert (board["asd_unit"] == "mm").all() and (board["selection"] == "last").all() and board["sfda"].all()
    assert board["dice"].between(0, 1).all()
    # Nothing written into the working directory, and Hydra writes no folder of its own under results_dir.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"] and not (results / "hydra").exists()

    # A second method reuses the same cached source checkpoint; the oracle is marked as not SFDA.
    out = run_cli("run", "method=oracle", f"results_dir={results}", *TINY_PHANTOM, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NOT SFDA" in out.stdout
    board = pd.read_csv(results / "leaderboard.csv")
    assert board.groupby("method")["source_weights"].first().nunique() == 1
    assert not board.loc[board.method == "oracle", "sfda"].any()
    assert "source model: cached" in out.stderr

    # Re-running a finished run does not count it twice.
    out = run_cli("run", "method=source_only", f"results_dir={results}", *TINY_PHANTOM, cwd=tmp_path)
    assert out.returncode == 0 and "already done" in out.stderr
    assert len(pd.read_csv(results / "leaderboard.csv")) == 10


def test_multirun_sweep(tmp_path):
    results = tmp_path / "res"
    out = run_cli("run", "method=source_only", "seed=0,1", f"results_dir={results}", *TINY_PHANTOM, "-m",
                  cwd=tmp_path)  # Hydra's flags may follow the overrides
    assert out.returncode == 0 and len(list(results.glob("sweeps/*/multirun.yaml"))) == 1, out.stderr[-3000:]
    board = pd.read_csv(results / "leaderboard.csv")
    assert sorted(board["seed"].unique()) == [0, 1]
    assert board["source_weights"].nunique() == 2  # one source model per seed
