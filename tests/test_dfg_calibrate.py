"""DFG's source-side calibration of the MBS distance cap (methods/dfg/calibrate.py) and where its value lives."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from sfdabench.harness.config import compose_run_config
from sfdabench_methods.dfg.box_search import centroid_distance
from sfdabench_methods.dfg.calibrate import allowed_region_dice, best_cap, main, outside_share


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=0, keepdims=True)


def _two_tissues(distance: float) -> tuple[np.ndarray, np.ndarray]:
    """An organ (a square) and its surroundings whose features sit ``distance`` (cosine) from the organ's."""
    organ = np.zeros((20, 20), bool)
    organ[5:12, 5:12] = True
    angle = np.arccos(1 - distance)
    features = np.empty((2, 20, 20))
    features[0], features[1] = np.cos(angle), np.sin(angle)
    features[0][organ], features[1][organ] = 1.0, 0.0
    # a little spread inside the organ, so the multiplier term is not zero
    rng = np.random.default_rng(0)
    features[1][organ] += rng.uniform(0, 0.2, organ.sum())
    return _unit(features), organ


def test_allowed_region_stops_at_a_cap_below_the_surroundings_distance():
    features, organ = _two_tissues(distance=0.3)
    distance = centroid_distance(features, organ)     # the distance map MBS thresholds
    # a huge multiplier: the cap decides. Below 0.3 the surroundings are excluded, above they flood in.
    assert allowed_region_dice(distance, organ, multiplier=1e4, cap=0.2) == pytest.approx(1.0)
    flooded = allowed_region_dice(distance, organ, multiplier=1e4, cap=0.5)
    assert flooded == pytest.approx(2 * organ.sum() / (organ.size + organ.sum()))
    # the multiplier bounds it too: 2.5 x the small in-organ spread keeps the surroundings out
    assert allowed_region_dice(distance, organ, multiplier=2.5, cap=1.0) > 0.8 > flooded


def test_outside_share_counts_the_surroundings_under_the_threshold():
    features, organ = _two_tissues(distance=0.3)
    distance = centroid_distance(features, organ)
    assert outside_share(distance, organ, multiplier=1e4, cap=0.2) == 0.0      # the surroundings sit at 0.3
    assert outside_share(distance, organ, multiplier=1e4, cap=0.5) == 1.0
    near = distance.copy()
    near[0, :10] = 0.0                                                          # 10 of the 351 outside pixels
    assert outside_share(near, organ, multiplier=1e4, cap=0.2) == pytest.approx(10 / (~organ).sum())


def test_best_cap_is_the_largest_within_the_tie_tolerance_of_the_best_search_dice():
    table = pd.DataFrame([
        {"cap": 0.15, "measure": "search", "mean": 0.910}, {"cap": 0.2, "measure": "search", "mean": 0.906},
        {"cap": 0.25, "measure": "search", "mean": 0.890}, {"cap": 0.35, "measure": "region", "mean": 0.99}])
    assert best_cap(table) == 0.2                     # 0.004 below the best: a tie; 0.25 is 0.02 below
    assert best_cap(table, tolerance=0.0) == 0.15


def test_dfg_keeps_the_spec_cap_on_every_shipped_task():
    # the calibration is a diagnostic: on the phantom it lowered DFG's test Dice (README), so no task changes it
    for task in ("phantom_mri2ct", "phantom_ct2mri", "mri2ct"):
        cfg = OmegaConf.to_container(compose_run_config(["method=dfg", f"task={task}"]), resolve=True)
        assert cfg["method"]["search"]["mbs_cap"] == 0.35


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["task=phantom_mri2ct", "every=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "every must be >= 1" in err


@pytest.mark.slow
def test_calibration_writes_every_measure_per_cap(tmp_path, capsys):
    from conftest import TINY_PHANTOM

    overrides = [o for o in TINY_PHANTOM if not o.startswith("num_threads")]
    assert main(["task=phantom_mri2ct", "every=8", "caps=[0.2,0.35]", "num_threads=1", *overrides,
                 f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}"]) == 0
    table = pd.read_csv(tmp_path / "calibration" / "phantom_mri2ct_mbs_cap.csv")
    assert sorted(map(tuple, table[["cap", "measure"]].values.tolist())) == [
        (0.2, "outside"), (0.2, "region"), (0.2, "search"), (0.35, "outside"), (0.35, "region"), (0.35, "search")]
    assert table["mean"].between(0, 1).all()
    outside = table[table.measure == "outside"].set_index("cap")["mean"]
    assert outside[0.2] <= outside[0.35]                      # a looser cap lets more of the slice in
    assert "calibrated mbs_cap for phantom_mri2ct" in capsys.readouterr().out
