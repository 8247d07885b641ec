"""Plugins: a third-party package adds a method with no change to core code; broken plugins are reported."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import importlib.metadata as md
import pandas as pd
import pytest

from conftest import REPO, TINY_PHANTOM, run_cli
from sfdabench.api import SfdaBenchError
from sfdabench.harness.plugins import Registry


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory) -> Path:
    """Install tests/plugin_example into a private folder (not into the test environment)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO / "tests" / "plugin_example")], check=True,
                   capture_output=True, text=True)
    return target


@pytest.fixture(scope="module")
def plugin_cache(tmp_path_factory) -> Path:
    """One source-model cache for the example plugin's runs (same task, seed and source settings)."""
    return tmp_path_factory.mktemp("cache")


def test_third_party_method_is_listed_and_runs(example_plugin, plugin_cache, tmp_path):
    env = {"PYTHONPATH": str(example_plugin)}
    out = run_cli("list", "methods", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "example_bnstats" in ln)
    assert "sfdabench-example-plugin 0.0.1" in line and "BatchNorm" in line
    assert "[ablation grids: default (2 variants)]" in line

    results = tmp_path / "res"
    out = run_cli("run", "method=example_bnstats", f"results_dir={results}", f"cache_dir={plugin_cache}",
                  *TINY_PHANTOM, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    board = pd.read_csv(results / "leaderboard.csv")
    assert set(board["method"]) == {"example_bnstats"}


def test_a_third_party_method_declares_an_ablation_grid_and_ablate_runs_it(example_plugin, plugin_cache, tmp_path):
    """The harness knows no method: any method with an ``ablation`` gets ``sfdabench ablate method=<m>``."""
    env = {"PYTHONPATH": str(example_plugin)}
    results = tmp_path / "res"
    args = ["ablate", "method=example_bnstats", "task=phantom_mri2ct", "seeds=[0]", f"results_dir={results}",
            f"cache_dir={plugin_cache}", *TINY_PHANTOM]
    out = run_cli(*args, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    board = pd.read_csv(results / "leaderboard.csv")
    assert set(board["method"]) == {"example_bnstats"} and sorted(board["variant"].unique()) == ["keep", "reset"]
    table = pd.read_csv(results / "ablations" / "example_bnstats" / "phantom_mri2ct" / "ablation.csv")
    assert list(dict.fromkeys(table["variant"])) == ["reset", "keep"] and list(table["reset"].unique()) == [True, False]
    assert "### example_bnstats ablation on phantom_mri2ct" in out.stdout
    assert "| variant | running statistics | seeds |" in out.stdout and "| keep | kept | 1 |" in out.stdout
    # the grid's setting cannot be overridden (it would mislabel the rows), and a method without a grid is named
    refused = run_cli(*args, "method.reset=false", cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "method.reset is set by the ablation grid" in refused.stderr
    none = run_cli("ablate", "method=source_only", "task=phantom_mri2ct", cwd=tmp_path, env=env)
    assert none.returncode == 2
    assert "method 'source_only' declares no ablation grid" in none.stderr and "example_bnstats" in none.stderr


def _broken_site(tmp_path: Path) -> Path:
    """A fake installed distribution whose plugin module raises on import."""
    site = tmp_path / "broken_site"
    dist = site / "broken_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sfdabench]\nbroken = broken_plugin_mod\n")
    (site / "broken_plugin_mod.py").write_text("raise ImportError('needs libfoo, which is missing')\n")
    return site


def test_a_third_party_metric_flows_into_rows_tables_ranks_compare_and_report(example_plugin, plugin_cache, tmp_path):
    """A metric plugin's column reaches the rows, the summary (ranked by its own direction: lower is better),
    the Markdown table, compare and the run report, with no change to sfdabench."""
    env = {"PYTHONPATH": str(example_plugin)}
    results = tmp_path / "res"
    out = run_cli("run", "-m", "method=source_only,example_bnstats", "metrics.names=[dice,asd,hd95,abs_volume_error]",
                  f"results_dir={results}", f"cache_dir={plugin_cache}", *TINY_PHANTOM, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = pd.read_csv(results / "leaderboard.csv")
    assert list(rows.columns[rows.columns.get_loc("organ") + 1:][:3]) == ["dice", "asd", "hd95"]  # schema order
    assert rows["abs_volume_error"].notna().all()
    out = run_cli("leaderboard", str(results), "--out", str(tmp_path / "board"), cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "board" / "leaderboard_summary.csv")
    mean = summary[summary.organ == "mean"].set_index("method")
    best = mean["abs_volume_error_mean"].idxmin()
    assert mean["abs_volume_error_mean"].nunique() == 2 and mean.loc[best, "rank_abs_volume_error"] == 1
    assert "rank |dV|/V" in (tmp_path / "board" / "leaderboard_summary.md").read_text()
    out = run_cli("compare", str(results), str(results), "--metric", "abs_volume_error", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "abs_volume_error (lower is better)" in out.stdout and "Δ abs_volume_error" in out.stdout
    out = run_cli("compare", str(results), str(results), "--metric", "abs_volume_error", cwd=tmp_path)
    assert out.returncode == 2 and "invalid choice: 'abs_volume_error'" in out.stderr  # plugin not installed
    run_dir = next((results / "runs").glob("*__example_bnstats__*"))
    out = run_cli("report", str(run_dir), "--out", str(tmp_path / "page"), cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    page = (tmp_path / "page" / "index.html").read_text()
    metrics_table = page.split("Target-test metrics per organ", 1)[1].split("</table>", 1)[0]
    per_case_table = page.split("<h2>Per case</h2>", 1)[1]
    assert "abs_volume_error" in metrics_table and "abs_volume_error" in per_case_table
    assert "ASD and HD95 in voxel" in page or "ASD and HD95 in mm" in page


def test_a_third_party_package_adds_a_subcommand(example_plugin, tmp_path):
    env = {"PYTHONPATH": str(example_plugin)}
    out = run_cli("--help", cwd=tmp_path, env=env)
    assert out.returncode == 0 and "example-methods [--sfda]" in out.stdout and "  run [overrides]" in out.stdout
    out = run_cli("example-methods", "--sfda", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "dfg" in out.stdout.split() and "oracle" not in out.stdout.split()
    assert "example_bnstats" in out.stdout.split()
    out = run_cli("example-methods", "--bogus", cwd=tmp_path, env=env)
    assert out.returncode == 2 and out.stderr.strip() == "sfdabench: error: example-methods takes only --sfda, got --bogus"
    out = run_cli("example-methods", cwd=tmp_path)  # not installed: not a command
    assert out.returncode == 2 and "unknown command 'example-methods'" in out.stderr


def test_broken_plugin_is_reported_and_the_rest_works(tmp_path):
    env = {"PYTHONPATH": str(_broken_site(tmp_path)), "SFDABENCH_STRICT_PLUGINS": "0"}  # CI sets it to 1
    out = run_cli("list", "methods", cwd=tmp_path, env=env)
    assert out.returncode == 0
    assert "source_only" in out.stdout
    assert "failed plugin: broken (broken-plugin 1.0): ImportError: needs libfoo, which is missing" in out.stdout

    out = run_cli("list", cwd=tmp_path, env={**env, "SFDABENCH_STRICT_PLUGINS": "1"})
    assert out.returncode == 1
    assert "plugin 'broken' (broken-plugin 1.0) failed to load" in out.stderr and "Traceback" not in out.stderr


def test_duplicate_names_are_refused(tmp_path, monkeypatch):
    """A third-party plugin that registers a name a built-in already uses is refused with both names."""
    (tmp_path / "copycat_plugin.py").write_text(textwrap.dedent("""
        from sfdabench import hookimpl
        from sfdabench_methods.source_only import SourceOnly

        class Copycat(SourceOnly):
            pass

        @hookimpl
        def sfdabench_methods():
            return [Copycat]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [md.EntryPoint(name="source_only", value="sfdabench_methods.source_only", group="sfdabench"),
           md.EntryPoint(name="copycat", value="copycat_plugin", group="sfdabench")]
    with pytest.raises(SfdaBenchError, match="'source_only' is registered twice"):
        Registry(entry_points=eps)


def test_registry_in_process_strict_mode():
    ep = md.EntryPoint(name="ghost", value="no_such_module_xyz", group="sfdabench")
    reg = Registry(entry_points=[ep], strict=False)
    assert [f.plugin for f in reg.failures] == ["ghost"]
    with pytest.raises(SfdaBenchError, match="plugin 'ghost'"):
        Registry(entry_points=[ep], strict=True)
