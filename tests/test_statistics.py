"""Intervals, paired tests and significance ranks (sfdabench.analysis.statistics) and how the leaderboard uses them."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from helpers_leaderboard import write_run
from sfdabench.analysis import leaderboard as lb, statistics as st
from sfdabench.cli import main


def test_t_interval_matches_scipy_and_needs_two_values():
    x = [0.61, 0.70, 0.66, 0.58, 0.73]
    low, high = st.t_interval(x)
    ref = scipy_stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=scipy_stats.sem(x))
    assert (low, high) == pytest.approx(ref, abs=1e-12)
    assert all(math.isnan(v) for v in st.t_interval([0.5]))
    assert st.t_interval([0.5, np.nan, 0.7]) == pytest.approx(st.t_interval([0.5, 0.7]))


def test_holm_adjusts_in_order_and_ignores_nan():
    adjusted = st.holm([0.01, 0.04, np.nan, 0.03])
    assert adjusted[[0, 1, 3]] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[2])


def test_crossed_bootstrap_is_deterministic_and_covers_the_mean():
    rng = np.random.default_rng(1)
    diff = 0.1 + rng.normal(0, 0.05, size=(5, 12))
    a, b = st.crossed_bootstrap_interval(diff), st.crossed_bootstrap_interval(diff)
    assert a == b                                           # fixed generator: the same table every time
    assert a[0] < diff.mean() < a[1] and a[0] > 0           # a clear positive effect excludes 0
    assert st.crossed_bootstrap_interval(np.full((3, 4), 0.2)) == pytest.approx((0.2, 0.2))
    with_gap = diff.copy()
    with_gap[0, 0] = np.nan                                 # a missing pair is left out, not counted as 0
    assert np.isfinite(st.crossed_bootstrap_interval(with_gap)).all()


def frame(values: np.ndarray, source: str = "w") -> pd.DataFrame:
    """(seeds x cases) values as the per-case frame paired_difference takes."""
    return pd.DataFrame([{"seed": s, "source": f"{source}{s}", "case": f"c{c}", "dice": values[s, c]}
                         for s in range(values.shape[0]) for c in range(values.shape[1])])


def test_paired_difference_over_cases_uses_wilcoxon_of_seed_averaged_cases():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.3, 0.6, size=(5, 12))
    better = ref + 0.1 + rng.normal(0, 0.01, size=ref.shape)
    d = st.paired_difference(frame(better), frame(ref), "dice", by_case=True)
    assert d.test == "wilcoxon-cases" and d.n == 60
    assert d.mean == pytest.approx((better - ref).mean())
    assert d.p == pytest.approx(scipy_stats.wilcoxon((better - ref).mean(axis=0)).pvalue)
    assert d.p < 0.001 and 0.09 < d.ci_low < d.mean < d.ci_high < 0.11
    same = st.paired_difference(frame(ref), frame(ref), "dice", by_case=True)
    assert same.mean == 0 and same.p == 1.0


def test_paired_difference_pairs_only_the_same_source_model():
    ref = np.full((2, 3), 0.5)
    other = frame(ref + 0.2, source="other")                 # other source weights: nothing is paired
    assert st.paired_difference(other, frame(ref), "dice", by_case=True) == st.NOTHING


def test_paired_difference_over_seeds_is_a_paired_t_test():
    ref = pd.DataFrame({"seed": range(5), "source": [f"w{s}" for s in range(5)], "dice": [.4, .5, .45, .6, .5]})
    m = ref.assign(dice=ref["dice"] + [0.10, 0.12, 0.08, 0.11, 0.09])
    d = st.paired_difference(m, ref, "dice", by_case=False)
    assert d.test == "t-seeds" and d.n == 5
    assert d.p == pytest.approx(scipy_stats.ttest_rel(m["dice"], ref["dice"]).pvalue)
    assert (d.ci_low, d.ci_high) == pytest.approx(st.t_interval(m["dice"] - ref["dice"]))


def test_significance_ranks_tie_what_the_data_cannot_separate():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.4, 0.6, size=(5, 12))
    noise = lambda: rng.normal(0, 0.005, size=base.shape)  # noqa: E731
    a = frame(base + 0.20 + noise())
    a_twin = frame(base + 0.20 + noise())                   # as good as a: must share its rank
    b = frame(base + 0.10 + noise())
    c = frame(base + noise())
    wins, ranks = st.significance_ranks([c, a, b, a_twin], "dice", higher_is_better=True, by_case=True)
    assert wins == [0, 2, 1, 2] and ranks == [4, 1, 3, 1]
    # lower is better (a distance): the order flips
    wins, ranks = st.significance_ranks([c, a, b], "dice", higher_is_better=False, by_case=True)
    assert ranks == [1, 3, 2]


# ------------------------------------------------------------------------ in the leaderboard


@pytest.fixture
def five_seeds(tmp_path):
    """source_only, a clearly better method, one indistinguishable from source_only; 5 seeds x 12 cases."""
    res = tmp_path / "res"
    rng = np.random.default_rng(7)
    for seed in range(5):
        base = rng.uniform(0.3, 0.6, size=12)
        for method, shift in (("source_only", 0.0), ("good", 0.2), ("same", 0.0)):
            jitter = rng.normal(0, 0.01, size=(2, 12))
            write_run(res, method=method, seed=seed, dice={"spleen": list(np.clip(base + shift + jitter[0], 0, 1)),
                                                          "liver": list(np.clip(base + shift + jitter[1], 0, 1))})
        write_run(res, method="oracle", seed=seed, sfda=False, dice={"spleen": [0.95] * 12, "liver": [0.97] * 12})
    return res


def test_leaderboard_reports_intervals_paired_differences_and_rank_groups(five_seeds, tmp_path):
    summary = lb.summarize([five_seeds])
    mean = summary[summary.organ == "mean"].set_index("method")
    good, same = mean.loc["good"], mean.loc["same"]
    assert good.dice_ci_low < good.dice_mean < good.dice_ci_high
    assert good.dice_diff_test == "wilcoxon-cases" and good.dice_diff_n == 60 and good.dice_diff_p < 0.001
    assert good.dice_diff_ci_low > 0.15
    assert same.dice_diff_p > 0.05 and same.dice_diff_ci_low < 0 < same.dice_diff_ci_high
    assert pd.isna(mean.loc["source_only"].dice_diff_mean)           # no difference to itself
    # good beats both; source_only and same cannot be separated: they share a rank
    assert good.sig_rank_dice == 1 and same.sig_rank_dice == mean.loc["source_only"].sig_rank_dice == 2
    assert pd.isna(mean.loc["oracle"].sig_rank_dice)                  # not SFDA: never ranked
    text = lb.to_markdown(summary)
    assert "| 1 | good | default | 5 | 12 |" in text and "| 2 | same | default | 5 | 12 |" in text
    assert f"{good.dice_diff_mean:+.3f} [{good.dice_diff_ci_low:+.3f}, {good.dice_diff_ci_high:+.3f}], p<0.001" in text
    assert "Holm-corrected" in text


def test_exported_cases_give_the_same_summary(five_seeds, tmp_path):
    """`--export-rows` writes <task>_cases.csv beside <task>.csv, so committed reference leaderboards keep their
    paired tests: the exported files summarise to the same table as the results dir."""
    out = tmp_path / "ref"
    assert main(["leaderboard", str(five_seeds), "--out", str(out), "--export-rows"]) == 0
    assert (out / "phantom_mri2ct_cases.csv").is_file()
    first = lb.summarize([five_seeds])
    again = lb.summarize([out / "phantom_mri2ct.csv"])
    cols = [c for c in first if c.startswith(("dice_", "sig_"))]
    pd.testing.assert_frame_equal(first[cols], again[cols])
    (out / "phantom_mri2ct_cases.csv").unlink()                      # without cases: the seeds-only fallback
    fallback = lb.summarize([out / "phantom_mri2ct.csv"])
    assert set(fallback.loc[fallback.dice_diff_n > 0, "dice_diff_test"]) == {"t-seeds"}


def test_cost_table_separates_source_training_and_survives_export(tmp_path):
    import json

    res = tmp_path / "res"
    for seed in (0, 1):
        for method, timings in (("source_only", {"source_model": 300.0 + seed, "load_data": 2.0, "evaluate": 3.0}),
                                ("m", {"source_model": 0.1, "load_data": 2.0, "adapt": 50.0 + seed,
                                       "adapt/retrain": 40.0 + seed, "evaluate": 3.0})):
            run_id = write_run(res, method=method, seed=seed, dice={"liver": [0.5]})
            summary = next((res / "runs").glob(f"*__{run_id}")) / "summary.json"
            summary.write_text(json.dumps({**json.loads(summary.read_text()), "timings": timings}))
    out = tmp_path / "ref"
    assert main(["leaderboard", str(res), "--out", str(out), "--export-rows"]) == 0
    table = pd.read_csv(out / "leaderboard_summary_costs.csv").set_index("method")
    assert table.loc["(source model)", "seconds"] == pytest.approx(300.5)      # once per (task, seed)
    assert table.loc["m", "seconds"] == pytest.approx(55.5)                   # load + adapt + evaluate
    assert table.loc["m", "phase:adapt/retrain"] == pytest.approx(40.5)
    assert table.loc["source_only", "seconds"] == pytest.approx(5.0)          # its source training not counted
    assert "| m | default | 2 | 56 | retrain 40 |" in (out / "leaderboard_summary_costs.md").read_text()
    again = tmp_path / "again"                                                # from the exported files alone
    assert main(["leaderboard", str(out / "phantom_mri2ct.csv"), "--out", str(again)]) == 0
    assert (again / "leaderboard_summary_costs.csv").read_text() == (out / "leaderboard_summary_costs.csv").read_text()


@pytest.mark.parametrize("diff", [
    [0.11, -0.02, 0.05, 0.3, 0.07, -0.01, 0.2, 0.04, 0.09, 0.12, -0.05, 0.06],   # no ties: scipy's exact test
    [0.1, 0.1, -0.1, 0.2, 0.2, 0.3, -0.2, 0.1, 0.05, 0.05, 0.4, 0.1],             # ties: scipy's permutation test
    [0.0, 0.1, 0.2, -0.05, 0.3],                                                 # a zero is dropped
])
def test_signed_rank_p_equals_scipy(diff):
    d = np.asarray(diff)
    ref = scipy_stats.wilcoxon(d[d != 0], method="exact" if len(set(np.abs(d))) == len(d) else "auto").pvalue
    assert st.signed_rank_p(diff) == pytest.approx(ref, rel=1e-9)


def test_signed_rank_p_uses_the_normal_approximation_beyond_the_exact_range():
    d = np.random.default_rng(0).normal(0.05, 0.1, size=30)
    assert st.signed_rank_p(d) == pytest.approx(scipy_stats.wilcoxon(d, method="approx").pvalue)
