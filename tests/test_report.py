"""``sfdabench report``: a real (tiny) DFG run with the bundled LiteMedSAM becomes an HTML page that a headless
browser renders with all its images."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_PHANTOM, run_cli

#: A DFG run in ~40 s: 4-5-slice 64x64 target cases, one FA iteration, one retraining epoch, and a source model
#: just good enough (~0.9 liver Dice in-domain) for the box search to find the liver and draw a figure.
TINY_DFG = ["method=dfg", *TINY_PHANTOM, "task.source.splits.train=[0,1,2]", "task.target.params.num_slices=[4,5]",
            "source.epochs=40", "source.width=8", "source.depth=3", "source.lr=3e-3", "method.fa.iterations=1",
            "method.retrain.epochs=1", "method.retrain.steps=null", "method.figures=3"]


@pytest.fixture(scope="module")
def dfg_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    out = run_cli("run", *TINY_DFG, f"results_dir={tmp / 'res'}", cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp / "res" / "runs").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def report(dfg_run) -> Path:
    out = run_cli("report", str(dfg_run), cwd=dfg_run)
    assert out.returncode == 0, out.stderr[-3000:]
    page = Path(out.stdout.strip().splitlines()[-1])
    assert page == dfg_run / "report" / "index.html"
    return page


def test_dfg_summary_has_ceiling_and_efficiency(dfg_run):
    import json

    diagnostics = json.loads((dfg_run / "summary.json").read_text())["diagnostics"]
    assert {"target_model", "sam", "cp", "gt_box_ceiling"} <= set(diagnostics["pseudo_label_dice"])
    assert set(diagnostics["box_search_efficiency"]) >= {"liver", "mean"}
    assert diagnostics["gt_box_ceiling"]["decoder_calls"] > 0
    assert (dfg_run / "predictions.npz").is_file()


def test_report_page_holds_every_section(report):
    text = report.read_text()
    for needle in ("Protocol", "source checkpoint", "checkpoint selection", "ASD/HD95 unit", "empty-mask policy",
                   "Target-test metrics per organ", "Prediction vs ground truth", "Pseudo-label quality per phase",
                   "gt_box_ceiling", "box-search efficiency", "Box search", "Timings", "Per case",
                   "How much of target-train each class covers"):
        assert needle in text, needle
    images = re.findall(r"<img src='([^']+)'", text)
    assert any(i.startswith("overlay_") for i in images) and any(i.startswith("figures/") for i in images)
    for image in images:                                   # self-contained: every image beside the page
        assert (report.parent / image).stat().st_size > 1000, image


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_report_renders_with_its_images_in_headless_chromium(report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium; .ci/run does)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    total = re.search(r'data-images-total="(\d+)"', dom.stdout)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom.stdout)
    assert total and loaded, "the page's load handler did not run"
    assert int(total.group(1)) >= 2 and loaded.group(1) == total.group(1)
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
                   capture_output=True, timeout=180, check=True)
    from PIL import Image

    with Image.open(shot) as img:
        colours = img.convert("RGB").resize((120, 160)).getcolors(maxcolors=120 * 160)
    assert colours is not None and len(colours) > 20      # not a blank page


def test_report_without_predictions_keeps_the_other_sections(dfg_run, tmp_path):
    copy = tmp_path / dfg_run.name
    shutil.copytree(dfg_run, copy, ignore=shutil.ignore_patterns("predictions.npz", "report"))
    out = run_cli("report", str(copy), "--out", str(tmp_path / "page"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "page" / "index.html").read_text()
    assert "no overlays: the run folder has no predictions.npz" in text and "Timings" in text


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    out = run_cli("report", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "is not a finished run folder" in out.stderr


def test_box_search_figures_in_subfolders_reach_the_page_flat(dfg_run, tmp_path):
    """Runs of combined tasks (case ids '<part>/<case>') once saved figures in per-part subfolders: the page
    still shows them, under flat names, so no figure of a real-CT run is silently left out."""
    run = tmp_path / "run"
    shutil.copytree(dfg_run, run, ignore=shutil.ignore_patterns("report"))
    nested = run / "figures" / "amos"
    nested.mkdir(parents=True)
    shutil.copy2(next((run / "figures").glob("*.png")), nested / "0018_z026_liver.png")
    out = run_cli("report", str(run), "--out", str(tmp_path / "page"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "page" / "index.html").read_text()
    assert "<img src='figures/amos_0018_z026_liver.png'" in text
    assert (tmp_path / "page" / "figures" / "amos_0018_z026_liver.png").stat().st_size > 1000


def test_figure_stems_are_flat_for_combined_case_ids():
    from sfdabench_methods.dfg.pseudo_labels import figure_stem

    assert figure_stem("amos/0018", 26) == "amos_0018_z026"
    assert figure_stem("case3", 4) == "case3_z004"
