"""A real, if small, MR -> CT adaptation in CI time: a source model trained on four CHAOS MR volumes, then
``source_only`` and ``dfg`` (with the bundled LiteMedSAM) adapted to the AMOS CT volume amos_0018, scored in mm.

Small on purpose (128x128 slices, every 4th CT slice, a narrow U-Net, few iterations): it proves that the
real-data path (prepare -> source model -> SAM box search -> retraining -> metrics in mm) runs end to end.
Its numbers are not benchmark numbers: the sample's one CT volume is target train *and* test (the task's
data_protocol says "demo only")."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli

REAL_MINI = ["task=sample_chaos2amos", "preset=test", "device=cpu", "num_threads=2",
             "task.source.splits.all=[1,2,3,5,10]", "task.source.splits.test=[2]",
             "task.source.params.size=128", "task.target.params.size=128", "task.target.params.z_step=4",
             "source.epochs=15", "source.width=8", "source.depth=3", "source.lr=3e-3"]


@pytest.mark.slow
def test_real_mini_run_source_only_and_dfg(sample_data, tmp_path):
    results = tmp_path / "res"
    for method in (["method=source_only"], ["method=dfg", "method.fa.iterations=2", "method.retrain.epochs=2", "method.retrain.steps=null"]):
        out = run_cli("run", *method, *REAL_MINI, f"results_dir={results}", cwd=tmp_path, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "ASD/HD95 in mm" in out.stdout
    board = pd.read_csv(results / "leaderboard.csv")
    assert set(board.method) == {"source_only", "dfg"} and (board.asd_unit == "mm").all()
    assert board.source_weights.nunique() == 1                       # both started from the same checkpoint
    assert board.data_protocol.str.contains("demo only").all() and board.data_protocol.str.contains("z step 4").all()
    assert set(board.organ) == {"spleen", "right_kidney", "left_kidney", "liver", "mean"}
    (dfg_run,) = (results / "runs").glob("*__dfg__*")
    summary = json.loads((dfg_run / "summary.json").read_text())
    # the CT's real spacing: 0.846 mm x 512 / 128 in-plane, 5 mm x 4 between the kept slices
    per_case = pd.read_csv(dfg_run / "per_case.csv")
    assert len(per_case) == 4 and per_case.hd95.notna().all()
    config = (dfg_run / "config.yaml").read_text()
    assert "z_step: 4" in config
    pl = summary["diagnostics"]["pseudo_label_dice"]
    assert {"target_model", "sam", "cp", "gt_box_ceiling"} <= set(pl)
    assert pl["gt_box_ceiling"]["liver"] > 0.8                   # LiteMedSAM with true boxes on real CT
    assert summary["diagnostics"]["box_search"]["slices"] >= 5


def test_z_step_keeps_every_kth_slice_and_scales_the_spacing(sample_data, tmp_path):
    from omegaconf import OmegaConf

    from sfdabench.harness.plugins import get_registry
    from sfdabench.harness.prepare import compose_run_config

    cases = {}
    for step in (1, 4):
        cfg = compose_run_config(["task=sample_chaos2amos", f"task.target.params.z_step={step}",
                                  "task.target.params.size=64", f"cache_dir={tmp_path / 'cache'}"])
        OmegaConf.resolve(cfg)
        adapter = get_registry().get("datasets", "nifti_folder")(cfg.task.target, list(cfg.task.organs),
                                                                  Path(cfg.cache_dir))
        cases[step] = adapter.load_case("0018")
    full, thin = cases[1], cases[4]
    assert thin.num_slices == (full.num_slices + 3) // 4
    assert (thin.image == full.image[::4]).all() and (thin.label == full.label[::4]).all()
    assert thin.spacing[0] == pytest.approx(4 * full.spacing[0]) and thin.spacing[1:] == full.spacing[1:]
