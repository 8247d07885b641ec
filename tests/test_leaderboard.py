"""Leaderboards, comparisons, ablation tables and sweeps that resume after a kill.

Most tests build synthetic results dirs (leaderboard rows + run folders with per_case.csv / summary.json,
exactly as protocol.execute writes them); three use tiny real phantom runs: the SIGKILL resume of a sweep,
a SLURM job pickled and run in a fresh interpreter, and a 2-variant x 1-seed ablation.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from conftest import REPO, TINY_PHANTOM, run_cli
from helpers_leaderboard import write_run
from sfdabench.analysis import ablate, compare, leaderboard as lb
from sfdabench.api import UsageError
from sfdabench.cli import main
from sfdabench.harness.results import append_rows, read_rows

ORGANS = ["spleen", "liver"]


# ------------------------------------------------------------------------------- synthetic results


@pytest.fixture
def board(tmp_path) -> Path:
    """m1 (3 seeds), m2 (2 seeds), the oracle (not SFDA), one case per run (so run values = case values)."""
    res = tmp_path / "res"
    for seed, (liver, spleen) in enumerate([(0.8, 0.6), (0.9, 0.6), (1.0, 0.6)]):
        write_run(res, method="m1", seed=seed, dice={"spleen": [spleen], "liver": [liver]})
    for seed, (liver, spleen) in enumerate([(0.5, 0.9), (0.7, 1.0)]):
        write_run(res, method="m2", seed=seed, dice={"spleen": [spleen], "liver": [liver]})
    for seed in range(3):
        write_run(res, method="oracle", seed=seed, sfda=False, dice={"spleen": [1.0], "liver": [1.0]})
    return res


def row(summary: pd.DataFrame, method: str, organ: str) -> pd.Series:
    (idx,) = summary.index[(summary.method == method) & (summary.organ == organ)]
    return summary.loc[idx]


# -------------------------------------------------------------------------------------- leaderboard


def test_aggregation_mean_std_n_and_ranks(board):
    summary = lb.summarize([board])
    m1_liver = row(summary, "m1", "liver")
    assert m1_liver.dice_mean == pytest.approx(0.9) and m1_liver.dice_std == pytest.approx(0.1)  # ddof=1
    assert m1_liver.dice_n == 3 and m1_liver.n_seeds == 3 and m1_liver.seeds == "0,1,2"
    assert row(summary, "m1", "spleen").dice_std == pytest.approx(0.0)
    m1_mean, m2_mean = row(summary, "m1", "mean"), row(summary, "m2", "mean")
    assert m1_mean.dice_mean == pytest.approx(0.75) and m1_mean.dice_std == pytest.approx(0.05)
    assert m2_mean.dice_mean == pytest.approx(0.775) and m2_mean.dice_n == 2
    assert m2_mean.asd_mean == pytest.approx(10 * (1 - 0.775))
    # Ranks per (task, organ) among SFDA rows: Dice descending, ASD/HD95 ascending; the oracle is unranked.
    assert (m2_mean.rank_dice, m1_mean.rank_dice) == (1, 2)
    assert (m2_mean.rank_asd, m1_mean.rank_asd, m2_mean.rank_hd95) == (1, 2, 1)
    assert (row(summary, "m1", "liver").rank_dice, row(summary, "m2", "liver").rank_dice) == (1, 2)
    oracle = row(summary, "oracle", "mean")
    assert not oracle.sfda and pd.isna(oracle.rank_dice) and pd.isna(oracle.rank_asd)
    assert list(dict.fromkeys(summary.organ)) == ["spleen", "liver", "mean"]


def test_leaderboard_command_writes_csv_markdown_png(board, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = sorted(p.name for p in board.iterdir())
    out = run_cli("leaderboard", str(board), cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    for ext in ("csv", "md", "png"):  # default output dir: the current directory ...
        assert (cwd / f"leaderboard_summary.{ext}").stat().st_size > 0
    assert sorted(p.name for p in board.iterdir()) == before  # ... never beside the input (committed files)
    md = (cwd / "leaderboard_summary.md").read_text()
    assert md in out.stdout
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| rank | method | variant | seeds | cases | spleen | liver | Dice (mean) [95% CI] | "
                               "Δ Dice vs source_only [95% CI], p | gap closed | ASD (mm)")
    # one case, 2-3 seeds: m2's 0.775 and m1's 0.750 cannot be told apart, so they share rank 1 (by mean first)
    assert lines[2].startswith("| 1 | m2 | default | 2 | 1 | 0.950 ± 0.071 | 0.600 ± 0.141 | 0.775 [-0.178, 1.728]")
    assert lines[3].startswith("| 1 | m1 | default | 3 | 1 | 0.600 ± 0.000 | 0.900 ± 0.100 | 0.750 [0.626, 0.874]")
    assert lines[4].startswith("| - | oracle (not SFDA) |")
    csv = pd.read_csv(cwd / "leaderboard_summary.csv")
    assert {"dice_mean", "dice_std", "dice_n", "asd_mean", "hd95_std", "rank_dice", "rank_asd", "rank_hd95",
            "sfda", "dice_ci_low", "dice_ci_high", "dice_diff_p", "sig_rank_dice", "n_cases"} <= set(csv.columns)
    # --out elsewhere, several inputs (a run in both counts once)
    out = run_cli("leaderboard", str(board / "leaderboard.csv"), str(board), "--out", str(tmp_path / "o"),
                  cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "o" / "leaderboard_summary.png").exists()
    assert pd.read_csv(tmp_path / "o" / "leaderboard_summary.csv").equals(csv)


def test_missing_input_is_one_line(tmp_path):
    out = run_cli("leaderboard", cwd=tmp_path)  # default ./sfdabench-results/leaderboard.csv
    assert out.returncode == 2 and "no leaderboard at sfdabench-results/leaderboard.csv" in out.stderr
    assert "Traceback" not in out.stderr


def test_protocol_mismatch_is_refused_unless_allowed(board, tmp_path):
    write_run(board, method="m3", seed=0, asd_unit="voxel", dice={"spleen": [0.5], "liver": [0.5]})
    out = run_cli("leaderboard", str(board), cwd=tmp_path)
    assert out.returncode == 2
    (line,) = [ln for ln in out.stderr.splitlines() if "plugin" not in ln]
    assert "asd_unit differs" in line and "'mm' (m1/default" in line and "'voxel' (m3/default)" in line
    assert line.endswith("pass --allow-mixed asd_unit to report them side by side")

    out = run_cli("leaderboard", str(board), "--allow-mixed", "asd_unit", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = pd.read_csv(tmp_path / "leaderboard_summary.csv")
    assert set(summary.loc[summary.method == "m3", "asd_unit"]) == {"voxel"}
    # Ranked within its own unit: alone among voxel rows, m3 is first there; the mm ranking is unchanged.
    assert summary.query("method == 'm3' and organ == 'mean'").rank_asd.item() == 1
    assert summary.query("method == 'm2' and organ == 'mean'").rank_asd.item() == 1
    assert "| asd_unit |" in (tmp_path / "leaderboard_summary.md").read_text()


def test_source_weights_must_match_per_task_and_seed(board):
    rows = lb.load_rows([board])
    lb.check_protocol(rows)  # source_weights differs between seeds: legitimate
    write_run(board, method="m4", seed=1, source_weights="other", dice={"spleen": [0.5], "liver": [0.5]})
    with pytest.raises(UsageError, match=r"source_weights differs within task phantom_mri2ct seed 1: 'src1' "
                                         r"\(m1/default, m2/default, oracle/default\), 'other' \(m4/default\); "
                                         r"pass --allow-mixed source_weights"):
        lb.summarize([board])
    assert len(lb.summarize([board], ["source_weights"]).query("method == 'm4'")) == 3
    # data_protocol is compared within a task only: another task may have another data protocol.
    write_run(board, task="mri2ct", method="m1", data_protocol="gt-z-crop", dice={"spleen": [0.5], "liver": [0.5]})
    assert set(lb.summarize([board], ["source_weights"]).task) == {"phantom_mri2ct", "mri2ct"}
    with pytest.raises(UsageError, match="unknown column sam"):
        lb.parse_allow_mixed(["asd_unit,sam"])


def test_two_runs_of_one_seed_keep_the_latest(tmp_path):
    res = tmp_path / "res"
    write_run(res, method="m", seed=0, run_id="old", finished_at="2025-01-01", dice={"liver": [0.1]})
    write_run(res, method="m", seed=0, run_id="new", finished_at="2025-02-01", dice={"liver": [0.7]})
    summary = lb.summarize([res])
    assert row(summary, "m", "liver").dice_mean == pytest.approx(0.7) and row(summary, "m", "liver").dice_n == 1


def test_sam_backends_are_separate_rows_ranked_together(tmp_path):
    res = tmp_path / "res"
    for seed in range(2):
        write_run(res, method="dfg", variant="fa+dbs+cp", sam="litemedsam", seed=seed,
                  dice={"liver": [0.7 + seed / 10]})
        write_run(res, method="dfg", variant="fa+dbs+cp", sam="medsam", seed=seed, dice={"liver": [0.9]})
        write_run(res, method="source_only", seed=seed, dice={"liver": [0.5]})
    summary = lb.summarize([res]).query("organ == 'mean'").set_index("sam")
    assert summary.loc["litemedsam", "dice_mean"] == pytest.approx(0.75) and summary.loc["litemedsam", "dice_n"] == 2
    assert sorted(summary.rank_dice) == [1, 2, 3] and summary.loc["medsam", "rank_dice"] == 1
    md = lb.to_markdown(lb.summarize([res]))
    assert "| seeds |" in md and "| sam |" in md and "| 1 | dfg | fa+dbs+cp | medsam | 2 |" in md


def test_concurrent_writers_while_leaderboard_reads(tmp_path):
    """Readers (the leaderboard command's loader) never see a partial file or a partial run."""
    path = tmp_path / "leaderboard.csv"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 6)) for w in range(3)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs) or reads == 0:
        if path.exists():
            rows = lb.load_rows([path])
            assert rows.groupby("run_id").size().eq(3).all()  # 2 organs + mean of every run, never fewer
            lb.aggregate(rows)
            reads += 1
        time.sleep(0.02)  # leave the writers some CPU
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert lb.load_rows([path])["run_id"].nunique() == 18 and reads > 0


def _writer(path, worker, runs):
    for r in range(runs):
        append_rows(path, pd.DataFrame({"task": "t", "method": f"w{worker}", "variant": "default", "seed": r,
                                        "organ": ["spleen", "liver", "mean"], "dice": [0.5, 0.6, 0.55],
                                        "source_weights": f"s{r}", "run_id": f"w{worker}r{r}", "sfda": True}))


# ------------------------------------------------------------------------------------------ compare


def test_compare_reports_one_sided_rows_and_protocol_differences(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, method="shared", dice={"liver": [0.8, 0.7]})
    write_run(a, method="gone", dice={"liver": [0.5, 0.5]})
    write_run(b, method="shared", metric_version="2;asd=union", dice={"liver": [0.8, 0.7]})
    write_run(b, method="new", metric_version="2;asd=union", dice={"liver": [0.5, 0.5]})
    sa, sb = compare.load_side("A", a), compare.load_side("B", b)
    table = compare.compare(sa, sb)
    assert sorted(set(table.method)) == ["shared"] and not table.regressed.any()
    only_a, only_b = compare.one_sided(sa, sb)
    assert list(only_a.method) == ["gone"] and list(only_b.method) == ["new"]
    assert only_a.organ.item() == "liver, mean"
    text = compare.report(sa, sb, table, "dice", 0.01)
    assert "## Only in A\n\n- phantom_mri2ct gone/default: liver, mean" in text
    assert "## Only in B\n\n- phantom_mri2ct new/default: liver, mean" in text
    assert "shared/default: metric_version '1;asd=union' (A) vs '2;asd=union' (B)" in text


def test_wilcoxon_over_matched_cases(tmp_path):
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a", tmp_path / "b"
    base = {s: {o: rng.uniform(0.5, 0.8, 6) for o in ORGANS} for s in range(2)}
    gain = {s: {o: rng.uniform(-0.01, 0.05, 6) for o in ORGANS} for s in range(2)}
    for s in range(2):
        write_run(a, method="m", seed=s, dice={o: list(base[s][o]) for o in ORGANS})
        write_run(b, method="m", seed=s, dice={o: list(base[s][o] + gain[s][o]) for o in ORGANS})
    # a third seed only in B: it has no partner and must not enter the test
    write_run(b, method="m", seed=2, dice={o: [0.9] * 6 for o in ORGANS})
    table = compare.compare(compare.load_side("A", a), compare.load_side("B", b)).set_index("organ")
    va = np.concatenate([base[s]["liver"] for s in range(2)])
    vb = np.concatenate([base[s]["liver"] + gain[s]["liver"] for s in range(2)])
    assert table.loc["liver", "n_pairs"] == 12
    assert table.loc["liver", "wilcoxon_p"] == pytest.approx(wilcoxon(vb, va).pvalue)
    # the mean organ pairs each case's mean over organs
    ma = np.concatenate([(base[s]["spleen"] + base[s]["liver"]) / 2 for s in range(2)])
    mb = np.concatenate([(base[s]["spleen"] + gain[s]["spleen"] + base[s]["liver"] + gain[s]["liver"]) / 2
                         for s in range(2)])
    assert table.loc["mean", "wilcoxon_p"] == pytest.approx(wilcoxon(mb, ma).pvalue)
    # identical sides: p = 1, no regression
    same = compare.compare(compare.load_side("A", a), compare.load_side("A", a))
    assert (same.wilcoxon_p == 1.0).all() and not same.regressed.any()
    assert math.isnan(compare.wilcoxon(np.array([0.5]), np.array([0.6]))[0])


def test_compare_exit_codes_for_ci(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, method="m", dice={"liver": [0.80, 0.82, 0.84]})
    write_run(b, method="m", dice={"liver": [0.77, 0.79, 0.81]})   # Dice -0.03, ASD +0.3
    assert compare.load_side("A", a).per_case.shape[0] == 6
    out = run_cli("compare", str(a / "leaderboard.csv"), str(b), "--out", str(tmp_path / "report.md"), cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "REGRESSION" in out.stdout and "-> exit code 1" in out.stdout
    assert (tmp_path / "report.md").read_text() in out.stdout
    # the other cases in-process (same entry point, without a Python start-up each)
    assert main(["compare", str(a), str(b), "--max-regression", "0.05"]) == 0
    assert main(["compare", str(b), str(a)]) == 0                                   # an improvement
    # ASD: lower is better, so an increase is the regression
    assert main(["compare", str(a), str(b), "--metric", "asd", "--max-regression", "0.2"]) == 1
    assert main(["compare", str(b), str(a), "--metric", "asd", "--max-regression", "0.2"]) == 0
    assert main(["compare", str(a), str(tmp_path / "nothing")]) == 2                # a usage error


# -------------------------------------------------------------------------------------------- ablate


def test_ablation_grid_names_are_dfg_variant_names():
    from omegaconf import OmegaConf

    from sfdabench_methods.dfg.method import DFG

    grid = DFG.ablation.grids["default"]
    assert len(grid) == 17 and grid[0] == "fa-only" and len(set(grid)) == 17
    assert {"fa+dbs+cp", "nofa+naive+nocp", "fa+tbs+cp", "nofa+mbs+cp"} <= set(grid)
    base = OmegaConf.load(REPO / "configs" / "method" / "dfg.yaml")
    for name in grid + ["fa+dbs+nos3+cp", "nofa-only"]:
        cfg = OmegaConf.merge(base, {"search": {"stage3": True}}, DFG.ablation.settings(name))
        assert DFG(cfg).variant() == name
    with pytest.raises(UsageError, match=re.escape("unknown DFG variant 'fa+naive+nos3+cp'")):
        DFG.ablation.settings("fa+naive+nos3+cp")   # stage 3 exists for mbs/dbs only
    request = ablate.parse_args(
        ["method=dfg", "task=phantom_ct2mri", "seeds=[3,4]", "variants=[fa+dbs+cp,fa-only]", "preset=test"])
    assert (request.seeds, request.variants, request.table_only, request.overrides) == (
        [3, 4], ["fa+dbs+cp", "fa-only"], False, ["task=phantom_ct2mri", "preset=test"])
    for bad in (["method.cp=false"], ["seed=1"], ["method=tent"], ["task=phantom_mri2ct,phantom_ct2mri"]):
        with pytest.raises(UsageError):
            ablate.parse_args(bad if bad[0].startswith("method=") else ["method=dfg", *bad])


def test_ablation_table_from_runs_and_pseudo_label_dice(tmp_path):
    res = tmp_path / "res"
    expected = []
    for variant, level in (("fa+dbs+cp", 0.8), ("fa-only", 0.6)):
        for seed in (0, 1):
            pl = None if variant == "fa-only" else {
                "target_model": {"spleen": 0.5, "liver": 0.6, "mean": 0.55 + 0.05 * seed},
                "sam": {"spleen": 0.7, "liver": 0.8, "mean": 0.75}, "cp": {"spleen": 0.72, "liver": 0.8, "mean": 0.76},
                "gt_box_ceiling": {"spleen": 0.875, "liver": 0.9, "mean": 0.9}}
            efficiency = None if pl is None else {k: pl["sam"][k] / pl["gt_box_ceiling"][k] for k in pl["sam"]}
            run_id = write_run(res, method="dfg", variant=variant, seed=seed, pseudo_label_dice=pl,
                               efficiency=efficiency, dice={"spleen": [level + 0.1 * seed], "liver": [level]})
            expected.append({"variant": variant, "seed": seed, "run_id": run_id})
    expected.append({"variant": "nofa+naive+cp", "seed": 0, "run_id": "never-ran"})
    text, missing = ablate.write_table(pd.DataFrame(expected), res, "phantom_mri2ct", [0, 1], "dfg")
    assert missing == ["nofa+naive+cp seed 0"] and "Missing runs (1): nofa+naive+cp seed 0" in text
    table = pd.read_csv(res / "ablations" / "dfg" / "phantom_mri2ct" / "ablation.csv")
    dbs = table[(table.variant == "fa+dbs+cp") & (table.organ == "spleen")].iloc[0]
    assert dbs.dice_mean == pytest.approx(0.85) and dbs.dice_std == pytest.approx(0.1 / math.sqrt(2))
    assert dbs.pl_sam_mean == pytest.approx(0.7) and dbs.pl_target_model_n == 2
    assert bool(dbs.fa) and dbs.search == "dbs" and str(dbs.cp) == "True"
    assert dbs.pl_gt_box_ceiling_mean == pytest.approx(0.875) and dbs.pl_efficiency_mean == pytest.approx(0.8)
    assert "| PL before SAM | PL after SAM | PL after CP | PL ceiling (GT boxes) | box-search efficiency |" in text
    assert "| fa+dbs+cp | yes | dbs | yes | 2 | 0.850 ± 0.071 | 0.800 ± 0.000 | 0.825 ± 0.035 | 0.575 ± 0.035 | " \
           "0.750 ± 0.000 | 0.760 ± 0.000 | 0.900 ± 0.000 | 0.833 ± 0.000 |" in text
    assert ("| fa-only | yes | (stop after FA) | - | 2 | 0.650 ± 0.071 | 0.600 ± 0.000 | 0.625 ± 0.035 | - | - | - "
            "| - | - |" in text)
    assert (res / "ablations" / "dfg" / "phantom_mri2ct" / "ablation.md").read_text() == text


def test_ablation_table_shows_search_options_only_when_a_row_sets_one(tmp_path):
    res = tmp_path / "res"
    expected = [{"variant": v, "seed": 0, "run_id": write_run(res, method="dfg", variant=v, seed=0,
                                                               dice={"spleen": [0.5 + i / 10]})}
                for i, v in enumerate(("fa+dbs+cp", "fa+dbs+cp+ltol", "fa+dbs+cp+guard-side"))]
    text, missing = ablate.write_table(pd.DataFrame(expected), res, "phantom_mri2ct", [0], "dfg")
    assert not missing
    assert "| variant | FA | search | CP | tolerances | twin guard | seeds |" in text    # steps all default
    assert "| fa+dbs+cp+ltol | yes | dbs | yes | length | none | 1 |" in text
    assert "| fa+dbs+cp+guard-side | yes | dbs | yes | area | side | 1 |" in text


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One source-checkpoint cache for the real runs below (same task, seed and source settings)."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_ablate_runs_the_grid_as_protocol_runs(tmp_path, shared_cache):
    results = tmp_path / "res"
    args = ["ablate", "method=dfg", "task=phantom_mri2ct", "seeds=[0]", "variants=[fa-only,nofa-only]", "method.fa.iterations=1",
            f"results_dir={results}", f"cache_dir={shared_cache}", *TINY_PHANTOM]
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    board = read_rows(results / "leaderboard.csv")
    assert sorted(board.variant.unique()) == ["fa-only", "nofa-only"] and set(board.method) == {"dfg"}
    assert len(list((results / "runs").glob("*/done"))) == 2
    table = pd.read_csv(results / "ablations" / "dfg" / "phantom_mri2ct" / "ablation.csv")
    assert list(dict.fromkeys(table.variant)) == ["fa-only", "nofa-only"] and (table.n_seeds == 1).all()
    assert "| fa-only | yes | (stop after FA) | - | 1 |" in out.stdout
    # Relaunching finds every run done: nothing runs again, the same table comes out.
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and "0 run(s) to do" in again.stderr
    assert len(pd.read_csv(results / "leaderboard.csv")) == len(board)


# --------------------------------------------------------------------------------- sweeps and resume


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_without_loss_or_double_count(tmp_path):
    results = tmp_path / "res"
    args = [sys.executable, "-m", "sfdabench", "run", "-m", "method=source_only", "seed=0,1,2",
            f"results_dir={results}", *TINY_PHANTOM]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:  # kill once a run is done and the next one is under way
            runs = list((results / "runs").glob("*")) if (results / "runs").exists() else []
            done = [r for r in runs if (r / "done").exists()]
            unfinished = [r for r in runs if not (r / "done").exists()]
            if done and unfinished:
                break
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the sweep's own process group only
        proc.wait()
    # The state the kill left (read again: the process is gone now).
    done = [r for r in (results / "runs").iterdir() if (r / "done").exists()]
    unfinished = [r for r in (results / "runs").iterdir() if not (r / "done").exists()]
    assert done and unfinished
    done_stamps = {r: (r / "done").stat().st_mtime_ns for r in done}
    board = read_rows(results / "leaderboard.csv")  # run ids as written (a hash may look numeric)
    assert set(board.run_id) >= {r.name.rsplit("__", 1)[-1] for r in done}

    # Relaunch the same sweep (with the joblib launcher, two runs at a time).
    out = run_cli("run", "-m", "method=source_only", "seed=0,1,2", f"results_dir={results}", *TINY_PHANTOM,
                  "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("already done") == len(done)
    runs = sorted((results / "runs").iterdir())
    assert len(runs) == 3 and all((r / "done").exists() for r in runs)
    assert {r: (r / "done").stat().st_mtime_ns for r in done} == done_stamps   # finished runs were not redone
    assert all((r / "done").exists() for r in unfinished)                      # the interrupted one was redone
    board = read_rows(results / "leaderboard.csv")
    assert len(board) == 3 * 5 and board.groupby("run_id").size().eq(5).all()   # nothing lost or counted twice
    assert sorted(board.seed.unique()) == [0, 1, 2]
    assert set(board.run_id) == {r.name.rsplit("__", 1)[-1] for r in runs}


def test_joblib_launcher_composes():
    cfg = _compose_with_hydra(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_module

    from sfdabench.harness.config import hydra_searchpath_override

    with initialize_config_module("sfdabench_configs", version_base=None):
        return compose("run", overrides=hydra_searchpath_override(overrides), return_hydra_config=True)


def test_slurm_launcher_config_composes():
    cfg = _compose_with_hydra(["hydra/launcher=sfdabench_slurm", "hydra.launcher.partition=gpu", "method=dfg"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == ("gpu", 1, 8, 32)
    assert launcher.timeout_min == 240 and launcher.max_num_timeout == 0
    assert launcher.submitit_folder.startswith("sfdabench-results/")  # under results_dir
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "sfdabench_slurm" and cfg.method.name == "dfg"


@pytest.mark.slow
def test_slurm_job_pickles_and_runs_in_a_fresh_interpreter(tmp_path, shared_cache):
    """The SLURM launcher as submitit ships it: the launcher (config, Hydra context, task function) and the
    job's arguments cloudpickled into a DelayedSubmission, then loaded and run by a new Python process with
    the environment SLURM gives a job. Only sbatch itself is left out."""
    import cloudpickle
    import submitit
    from hydra import compose, initialize_config_module
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.singleton import Singleton
    from hydra.types import HydraContext

    from sfdabench.harness.config import hydra_searchpath_override
    from sfdabench.harness.launch import _job

    results = tmp_path / "res"
    job_overrides = ["method=source_only", "seed=0", f"results_dir={results}", f"cache_dir={shared_cache}",
                     *TINY_PHANTOM]
    with initialize_config_module("sfdabench_configs", version_base=None):
        cfg = compose("run", overrides=hydra_searchpath_override(["hydra/launcher=sfdabench_slurm", *job_overrides]),
                      return_hydra_config=True)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(cfg))
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=_job, config=cfg)
        assert type(launcher).__name__ == "SlurmLauncher"
        # the arguments BaseSubmititLauncher.launch hands to executor.map_array for job 0
        delayed = submitit.helpers.DelayedSubmission(launcher, job_overrides, "hydra.sweep.dir", 0, "job_id_for_0",
                                                     Singleton.get_state())
        (tmp_path / "job.pkl").write_bytes(cloudpickle.dumps(delayed))
    slurm_env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4242",
                 "SLURM_ARRAY_TASK_ID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
                 "SLURM_JOB_NODELIST": "node1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    code = ("import pickle, sys; job = pickle.load(open(sys.argv[1], 'rb')); ret = job.result(); "
            "print('JOB', ret.status.name)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.pkl")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env={**os.environ, **slurm_env})
    assert out.returncode == 0 and "JOB COMPLETED" in out.stdout, out.stderr[-3000:]
    (run_dir,) = (results / "runs").iterdir()
    assert (run_dir / "done").exists() and len(pd.read_csv(results / "leaderboard.csv")) == 5
    # plain pickle of the task function works too (it is a module-level function)
    assert pickle.loads(pickle.dumps(_job)) is _job


# ------------------------------------------------------------------------------------------ gap closed


def test_gap_closed_per_seed_against_references_of_the_same_seed(tmp_path):
    res = tmp_path / "res"
    for seed in (0, 1):
        write_run(res, method="source_only", seed=seed, dice={"spleen": [0.4], "liver": [0.5]})
        write_run(res, method="oracle", variant="init-source", seed=seed, sfda=False,
                  dice={"spleen": [0.8], "liver": [0.9]})
    write_run(res, method="m", seed=0, dice={"spleen": [0.6], "liver": [0.7]})      # gaps 0.5, 0.5
    write_run(res, method="m", seed=1, dice={"spleen": [0.4], "liver": [0.8]})      # gaps 0.0, 0.75
    write_run(res, method="m", seed=2, dice={"spleen": [0.9], "liver": [0.9]})      # no references for seed 2
    summary = lb.summarize([res])
    liver, spleen, mean = (row(summary, "m", o) for o in ("liver", "spleen", "mean"))
    assert math.isclose(liver["gap_closed_mean"], 0.625) and math.isclose(liver["gap_closed_std"], np.std([0.5, 0.75], ddof=1))
    assert liver["gap_closed_n"] == 2 and liver["dice_n"] == 3
    assert math.isclose(spleen["gap_closed_mean"], 0.25)
    # mean row: (mean Dice of m - mean of source_only) / (mean of oracle - mean of source_only), per seed
    assert math.isclose(mean["gap_closed_mean"], np.mean([(0.65 - 0.45) / 0.4, (0.6 - 0.45) / 0.4]))
    # distances (ASD = 10 (1 - Dice) here): the same share of the distance reduction
    assert math.isclose(liver["gap_closed_asd_mean"], 0.625) and math.isclose(liver["gap_closed_hd95_mean"], 0.625)
    assert liver["gap_reason"] == "no source_only and no oracle run for this task, seed and source checkpoint"
    assert row(summary, "source_only", "liver")["gap_closed_mean"] == 0
    assert row(summary, "oracle", "liver")["gap_closed_mean"] == 1
    text = lb.to_markdown(summary)
    assert "| gap closed |" in text.replace("Dice (mean) | gap closed", "| gap closed")
    assert "gap closed over 2 of 3 seeds for m/default: no source_only and no oracle run" in text
    paths = lb.write_outputs(summary, tmp_path / "out")
    assert paths["gap_png"].stat().st_size > 1000


def test_gap_closed_is_empty_with_a_reason_when_references_are_missing(board):
    summary = lb.summarize([board])
    assert summary["gap_closed_mean"].isna().all()
    assert (summary["gap_reason"].str.contains("no source_only run")).all()
    text = lb.to_markdown(summary)
    assert "gap closed empty for m1/default: no source_only run" in text
    csv_cell = summary.to_csv(index=False).splitlines()[1].split(",")
    assert "" in csv_cell                                          # an empty CSV cell, not a made-up number


def test_gap_closed_undefined_when_the_oracle_is_no_better(tmp_path):
    res = tmp_path / "res"
    write_run(res, method="source_only", dice={"spleen": [0.8], "liver": [0.5]})
    write_run(res, method="oracle", sfda=False, dice={"spleen": [0.805], "liver": [0.9]})
    write_run(res, method="m", dice={"spleen": [0.9], "liver": [0.7]})
    summary = lb.summarize([res])
    assert pd.isna(row(summary, "m", "spleen")["gap_closed_mean"])
    assert "not better than source_only" in row(summary, "m", "spleen")["gap_reason"]
    assert math.isclose(row(summary, "m", "liver")["gap_closed_mean"], 0.5)


def test_export_rows_writes_one_reference_csv_per_task(board, tmp_path):
    write_run(board, method="m1", task="phantom_ct2mri", dice={"spleen": [0.5], "liver": [0.4]})
    assert main(["leaderboard", str(board), "--out", str(tmp_path / "ref"), "--export-rows"]) == 0
    mri2ct = pd.read_csv(tmp_path / "ref" / "phantom_mri2ct.csv")
    ct2mri = pd.read_csv(tmp_path / "ref" / "phantom_ct2mri.csv")
    assert set(mri2ct.task) == {"phantom_mri2ct"} and set(ct2mri.task) == {"phantom_ct2mri"}
    assert len(mri2ct) == 8 * 3 and len(ct2mri) == 3             # every run x (2 organs + mean)
    assert list(mri2ct.columns[:5]) == ["task", "method", "variant", "seed", "organ"]
    # the exported files are leaderboards themselves: aggregating them gives the same summary
    again = lb.summarize([tmp_path / "ref" / "phantom_mri2ct.csv", tmp_path / "ref" / "phantom_ct2mri.csv"])
    first = lb.summarize([board])
    cols = ["task", "method", "variant", "organ", "dice_mean", "dice_std", "dice_n"]
    pd.testing.assert_frame_equal(again[cols].sort_values(cols[:4]).reset_index(drop=True),
                                  first[cols].sort_values(cols[:4]).reset_index(drop=True))


def test_summary_name_keeps_two_leaderboards_in_one_folder(board, tmp_path, capsys):
    out = tmp_path / "ref"
    assert main(["leaderboard", str(board), "--out", str(out)]) == 0
    assert main(["leaderboard", str(board), "--out", str(out), "--name", "sample_summary"]) == 0
    assert (out / "leaderboard_summary.md").read_text() == (out / "sample_summary.md").read_text()
    assert (out / "sample_summary.csv").is_file() and (out / "sample_summary.png").is_file()
    capsys.readouterr()
    assert main(["leaderboard", str(board), "--out", str(out), "--name", "../x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--name '../x' must be a plain file stem" in err and err.count("\n") == 0


def test_compare_uses_the_seeds_both_sides_have(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, method="m", seed=0, dice={"liver": [0.8, 0.8]})
    write_run(a, method="q", seed=0, dice={"liver": [0.7, 0.7]})
    for seed, value in enumerate([0.8, 0.5, 0.5]):       # seeds 1 and 2 are worse: seed variance, not a change
        write_run(b, method="m", seed=seed, dice={"liver": [value, value]})
    write_run(b, method="q", seed=3, dice={"liver": [0.1, 0.1]})
    out = tmp_path / "report.md"
    assert main(["compare", str(a), str(b), "--max-regression", "0.01", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| phantom_mri2ct | m | default | liver | 0.800 | 0.800 | +0.000 |" in text
    assert "- phantom_mri2ct m/default: seeds 0 (A) vs 0,1,2 (B); compared over seeds 0" in text
    assert "- phantom_mri2ct q/default: seeds 0 (A) vs 3 (B); no common seed: not compared" in text
    assert "| q |" not in text


# ------------------------------------------------------------------- source weights, legacy rows, bad input


@pytest.mark.parametrize("folder, tasks, summary", [
    ("leaderboard", ("phantom_mri2ct", "phantom_ct2mri"), "leaderboard_summary"),
    ("leaderboard", ("sample_mri2ct",), "sample_mri2ct_summary"),
    ("leaderboard/archive/sample-1000steps-3d40965", ("sample_mri2ct",), "sample_mri2ct_summary"),
    ("leaderboard/archive/sample-2000steps-82864f5", ("sample_mri2ct",), "sample_mri2ct_summary"),
    ("leaderboard/archive/128px-4cases-58b5811", ("phantom_mri2ct", "phantom_ct2mri"), "leaderboard_summary"),
    ("leaderboard/archive/epoch-budgets-1839641", ("phantom_mri2ct", "phantom_ct2mri"), "leaderboard_summary")])
def test_committed_reference_rows_reproduce_the_committed_summary(tmp_path, folder, tasks, summary):
    """The reference rows aggregate to the committed summary bytes, and exporting them gives them back byte
    for byte: the current ones (every row names its source weights, one source model per task and seed) and
    the superseded legacy ones (no source weights recorded)."""
    ref = REPO / folder
    inputs = [ref / f"{task}.csv" for task in tasks]
    rows = lb.load_rows(inputs)
    assert rows.source_config.str.fullmatch("[0-9a-f]{12}").all()
    if "epoch-budgets" in folder:
        assert set(rows.source_weights) == {""}
    else:
        assert rows.source_weights.str.fullmatch("[0-9a-f]{16}").all()
        assert (rows.groupby(["task", "seed"]).source_weights.nunique() == 1).all()
    assert lb.summarize(inputs).to_csv(index=False) == (ref / f"{summary}.csv").read_text()
    cases, timings = lb.load_cases(inputs, rows), lb.load_timings(inputs, rows)
    paths = lb.export_rows(rows, tmp_path, cases, timings)
    for path in inputs:
        assert paths[f"rows:{path.stem}"].read_bytes() == path.read_bytes()
        for kind in ("cases", "timings"):        # the per-case values and timings round-trip too, where present
            exported = path.with_name(f"{path.stem}_{kind}.csv")
            assert (paths[f"{kind}:{path.stem}"].read_bytes() == exported.read_bytes()) if exported.is_file() \
                else f"{kind}:{path.stem}" not in paths


def test_legacy_rows_pair_by_source_config_and_never_match_recorded_weights(tmp_path):
    legacy = tmp_path / "legacy.csv"   # as written before source_weights existed: source_ckpt, no weights
    pd.DataFrame({"task": "t", "method": ["source_only"] * 2 + ["oracle"] * 2 + ["m"] * 2, "variant": "default",
                  "seed": 0, "organ": ["liver", "mean"] * 3, "dice": [0.4, 0.4, 0.8, 0.8, 0.6, 0.6],
                  "source_ckpt": "000123456789", "sfda": [True, True, False, False, True, True],
                  "run_id": list("aabbcc")}).to_csv(legacy, index=False)
    rows = lb.load_rows([legacy])
    assert set(rows.source_config) == {"000123456789"} and set(rows.source_weights) == {""}
    assert row(lb.summarize([legacy]), "m", "liver").gap_closed_mean == pytest.approx(0.5)
    # Same config, but weights recorded: one config gave other weights under another thread count, so these
    # rows are not provably from the same source model.
    new = tmp_path / "new.csv"
    append_rows(new, pd.DataFrame({"task": "t", "method": "m2", "variant": "default", "seed": 0,
                                   "organ": ["liver", "mean"], "dice": 0.7, "source_weights": "5549378735e3",
                                   "source_config": "000123456789", "run_id": "d"}))
    with pytest.raises(UsageError, match=r"source_weights differs within task t seed 0: 'config:000123456789' "
                                         r"\(source_only/default, oracle/default, m/default\), '5549378735e3' "
                                         r"\(m2/default\); pass --allow-mixed source_weights"):
        lb.summarize([legacy, new])


def test_gap_closed_pairs_references_by_source_weights(tmp_path):
    res = tmp_path / "res"
    write_run(res, method="source_only", dice={"liver": [0.4]})
    write_run(res, method="oracle", sfda=False, dice={"liver": [0.8]})
    write_run(res, method="m", dice={"liver": [0.6]})
    write_run(res, method="q", source_weights="other", dice={"liver": [0.6]})   # same seed, other weights
    summary = lb.summarize([res], ["source_weights"])
    assert row(summary, "m", "liver").gap_closed_mean == pytest.approx(0.5)
    assert pd.isna(row(summary, "q", "liver").gap_closed_mean)
    assert row(summary, "q", "liver").gap_reason == ("no source_only and no oracle run for this task, seed and "
                                                      "source checkpoint")


def test_compare_says_when_source_weights_differ(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, method="m", dice={"liver": [0.8, 0.7]})                          # weights src0
    write_run(b, method="m", source_weights="f00d", dice={"liver": [0.8, 0.7]})
    out = run_cli("compare", str(a), str(b), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    said = "phantom_mri2ct seed 0: A and B used different source weights (src0 (A) vs f00d (B))"
    assert f"- {said}" in out.stdout and said in out.stderr
    # the same weights: nothing said; a side that did not record its weights: it cannot be checked
    write_run(b, method="m", dice={"liver": [0.8, 0.7]})                          # same run id: replaced
    assert compare.source_differences(compare.load_side("A", a), compare.load_side("B", b)) == []
    write_run(a, method="m", source_weights="", dice={"liver": [0.8, 0.7]})
    (line,) = compare.source_differences(compare.load_side("A", a), compare.load_side("B", b))
    assert line.startswith("phantom_mri2ct seed 0: source weights not recorded in A") and "unknown" in line


def _error_case(kind: str, tmp: Path) -> list[str]:
    if kind == "leaderboard-empty":
        (tmp / "empty.csv").write_text("")
        return ["leaderboard", str(tmp / "empty.csv")]
    if kind == "leaderboard-header-only":
        (tmp / "empty.csv").write_text("task,method,variant,seed,organ,dice\n")
        return ["leaderboard", str(tmp / "empty.csv")]
    write_run(tmp / "b", method="m", dice={"liver": [0.8, 0.7]})
    if kind == "compare-cols-missing":
        pd.DataFrame({"task": ["phantom_mri2ct"], "dice": [0.5]}).to_csv(tmp / "cols-missing.csv", index=False)
        return ["compare", str(tmp / "cols-missing.csv"), str(tmp / "b")]
    write_run(tmp / "a", task="phantom_ct2mri", method="m", dice={"liver": [0.8, 0.7]})
    return ["compare", str(tmp / "a"), str(tmp / "b")]


@pytest.mark.parametrize("kind, message", [
    ("leaderboard-empty", "has no rows (the file is empty or a header only); pass a leaderboard with rows"),
    ("leaderboard-header-only", "has no rows (the file is empty or a header only); pass a leaderboard with rows"),
    ("compare-cols-missing", "lacks the column(s) method, organ that leaderboard rows need; pass a leaderboard CSV"),
    ("compare-no-aligned-row", "aligns with B (" ),
])
def test_bad_leaderboard_input_is_one_line(tmp_path, kind, message):
    work = tmp_path / "work"
    work.mkdir()
    out = run_cli(*_error_case(kind, tmp_path), cwd=work)
    assert out.returncode == 2, (out.stdout[-1000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr and out.stdout == ""
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("sfdabench: error: ")]
    assert len(errors) == 1 and out.stderr.rstrip().endswith(errors[0]) and message in errors[0]
    assert list(work.iterdir()) == []                                    # nothing written
    if kind == "compare-no-aligned-row":
        assert "tasks: phantom_ct2mri in A, phantom_mri2ct in B" in errors[0]


def test_compare_without_a_common_seed_is_an_error(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, method="m", seed=0, dice={"liver": [0.8, 0.7]})
    write_run(b, method="m", seed=1, dice={"liver": [0.8, 0.7]})
    assert main(["compare", str(a), str(b)]) == 2
    with pytest.raises(UsageError, match="groups on both sides have no seed in common"):
        compare.cmd_compare([str(a), str(b)])
