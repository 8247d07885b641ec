"""DFG box search (spec 4), connectivity post-processing (spec 5) and the search figures.

The synthetic slices and the fake SAM are in ``helpers_box_search`` (also used by test_box_search_options.py and
``benchmarks/bench_box_search.py``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers_box_search import ABDOMEN, _assert_same_as_reference, dice, make_synthetic_slice, random_slice, run
from sfdabench.api import SamBackend, SamEmbedding
from sfdabench_methods.dfg import box_search as bs
from sfdabench_methods.dfg.box_search import BoxSearchConfig, search_slice
from sfdabench_methods.dfg.postprocess import connectivity_postprocess


def config(size: int, **overrides) -> BoxSearchConfig:
    return BoxSearchConfig.from_cfg(overrides, (size, size), organs=ABDOMEN)


# --------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_spec_values_at_256():
    cfg = BoxSearchConfig.from_cfg({}, (256, 256), organs=ABDOMEN)
    assert (cfg.existence_pixels, cfg.tbs_min_area, cfg.box_margin, cfg.affinity_radius) == (200, 50, 3, 4)
    assert (cfg.tbs_tol_1step, cfg.tbs_tol_2step) == (15, 35)
    assert (cfg.mbs_tol_1step, cfg.mbs_tol_2step, cfg.mbs_tol_3step) == (15, 30, 45)
    assert (cfg.stage3_growth, cfg.stage3_repeats, cfg.max_steps) == (2, 6, (25, 20, 20, 35))
    assert (cfg.search, cfg.stage3, cfg.tbs_cos_threshold, cfg.mbs_cap) == ("dbs", True, 0.99, 0.35)
    assert len(bs.neighbour_offsets(cfg.affinity_radius)) == 44      # 22 forward offsets, both directions


def test_thresholds_scale_with_resolution():
    half = BoxSearchConfig.from_cfg({}, (128, 128), organs=ABDOMEN)
    # pixel counts x 1/4 (half-up rounding), lengths x 1/2
    assert (half.existence_pixels, half.tbs_min_area) == (50, 13)
    assert (half.tbs_tol_1step, half.tbs_tol_2step) == (4, 9)
    assert (half.mbs_tol_1step, half.mbs_tol_2step, half.mbs_tol_3step) == (4, 8, 11)
    assert (half.box_margin, half.affinity_radius, half.stage3_growth) == (2, 2, 1)
    # resolution-free settings never change
    assert (half.tbs_cos_threshold, half.existence_prob, half.seed_delta, half.max_steps) == \
        (0.99, 0.8, 0.005, (25, 20, 20, 35))
    quarter = BoxSearchConfig.from_cfg({}, 64, organs=ABDOMEN)
    assert quarter.affinity_radius == 2           # at least 2: radius 1 has no neighbours
    assert min(quarter.tbs_tol_1step, quarter.box_margin, quarter.stage3_growth) >= 1
    unscaled = BoxSearchConfig.from_cfg({"scale_to_resolution": False, "box_margin": 5}, (128, 128),
                                        organs=ABDOMEN)
    assert (unscaled.existence_pixels, unscaled.box_margin, unscaled.image_size) == (200, 5, (128, 128))
    assert BoxSearchConfig.from_cfg({"reference_size": 128}, (128, 128), organs=ABDOMEN).existence_pixels == 200


def test_config_rejects_typos_and_mismatched_slices():
    with pytest.raises(ValueError, match="unknown box-search settings"):
        BoxSearchConfig.from_cfg({"serach": "tbs"}, 128, organs=ABDOMEN)
    with pytest.raises(ValueError, match="box search"):
        BoxSearchConfig.from_cfg({"search": "bogus"}, 128, organs=ABDOMEN)
    slice_ = make_synthetic_slice(64, 0)
    with pytest.raises(ValueError, match="scaled for"):
        run(slice_, config(128))
    # a plain mapping is scaled to the slice on the fly
    plain = search_slice(slice_.features, slice_.probs, slice_.sam, slice_.embedding, {"search": "tbs"},
                         organs=ABDOMEN)
    np.testing.assert_array_equal(plain.pseudo_label,
                                  run(slice_, config(64, search="tbs")).pseudo_label)


# ------------------------------------------------------------------------------- vectorised parts


def _naive_affinity_growth(region, features, offsets, threshold):
    unit = features / np.maximum(np.linalg.norm(features, axis=0), 1e-12)
    height, width = region.shape
    grown = region.copy()
    for y, x in zip(*np.nonzero(region)):
        for dy, dx in offsets:
            ny, nx = y + dy, x + dx
            if 0 <= ny < height and 0 <= nx < width and unit[:, y, x] @ unit[:, ny, nx] > threshold:
                grown[ny, nx] = True
    return grown


def _naive_growth_within(region, allowed, offsets):
    height, width = region.shape
    grown = region.copy()
    for y, x in zip(*np.nonzero(region)):
        for dy, dx in offsets:
            ny, nx = y + dy, x + dx
            if 0 <= ny < height and 0 <= nx < width and allowed[ny, nx]:
                grown[ny, nx] = True
    return grown


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [2, 4])
def test_vectorised_growth_equals_per_pixel_growth(seed, radius):
    rng = np.random.default_rng(seed)
    height, width = 19, 23                              # non-square: catches swapped axes
    features = rng.normal(size=(4, height, width)) + np.array([2.0, 0, 0, 0])[:, None, None]
    region = rng.random((height, width)) < 0.15
    offsets = bs.neighbour_offsets(radius)
    threshold = 0.8
    accepts = bs.target_affinities(torch.from_numpy(features), offsets) > threshold
    assert accepts.shape == (len(offsets), height, width)
    np.testing.assert_array_equal(bs.grow_by_affinity(region, accepts, offsets),
                                  _naive_affinity_growth(region, features, offsets, threshold))
    allowed = rng.random((height, width)) < 0.5
    np.testing.assert_array_equal(bs.grow_within(region, allowed, offsets),
                                  _naive_growth_within(region, allowed, offsets))


def test_affinities_are_cosines_and_exclude_out_of_image_neighbours():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(5, 7, 9))
    offsets = bs.neighbour_offsets(3)
    cos = bs.target_affinities(torch.from_numpy(features), offsets)
    unit = features / np.linalg.norm(features, axis=0)
    for k, (dy, dx) in enumerate(offsets):
        for y in range(7):
            for x in range(9):
                ny, nx = y - dy, x - dx
                if 0 <= ny < 7 and 0 <= nx < 9:
                    assert cos[k, y, x] == pytest.approx(unit[:, y, x] @ unit[:, ny, nx], abs=1e-12)
                else:
                    assert cos[k, y, x] == -math.inf


def test_largest_contour_keeps_the_largest_region_filled():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False                      # a hole: filled
    mask[15:18, 15:18] = True                   # a smaller region: dropped
    out = bs.largest_contour(mask)
    expected = np.zeros_like(mask)
    expected[2:12, 2:12] = True
    np.testing.assert_array_equal(out, expected)
    assert bs.largest_contour(np.zeros((5, 5), dtype=bool)) is None


# ----------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("search", bs.SEARCH_VARIANTS)
@pytest.mark.parametrize("stage3", [True, False])
def test_every_variant_gives_sensible_masks(size, search, stage3):
    slice_ = make_synthetic_slice(size, 11, under_segment=2 * size // 64, slack=2.0 * size / 64)
    result = run(slice_, config(size, search=search, stage3=stage3))
    assert result.pseudo_label.shape == (size, size) and result.pseudo_label.dtype == np.uint8
    assert set(result.classes) == {1, 2, 3, 4}
    for c, trace in result.classes.items():
        organ = slice_.organs == c
        assert trace.outcome == "sam", (c, trace.reason)
        assert trace.stage in {"naive", "tbs", "mbs", "stage3", "mbs-fallback"}
        assert trace.stage == search or search in ("mbs", "dbs")
        assert dice(trace.mask, organ) > 0.85, (c, trace.stage)
        assert dice(result.pseudo_label == c, organ) > 0.85
        assert len(trace.steps) >= 1 and trace.decoder_calls + trace.cache_hits == len(trace.steps)
        if not stage3:
            assert all(step.phase != "stage3" for step in trace.steps)


def test_dbs_recovers_an_under_segmented_organ_better_than_the_fallback():
    # One organ whose target features split in two clusters (TBS alone stalls at the split) and whose
    # prediction is eroded by 8 px: MBS must carry the box over the whole organ.
    slice_ = make_synthetic_slice(128, 5, present=(1,), under_segment=8, split_organ=1, split_quantile=0.8,
                                  feature_noise=0.01, slack=4.0)
    organ = slice_.organs == 1
    fallback = slice_.probs.argmax(0).numpy() == 1
    dbs = run(slice_, config(128)).classes[1]
    tbs = run(slice_, config(128, search="tbs")).classes[1]
    assert dbs.outcome == "sam" and dbs.stage in ("mbs", "stage3")
    assert dice(fallback, organ) < 0.8
    assert dice(dbs.mask, organ) > 0.95 > dice(fallback, organ) + 0.15
    assert dice(dbs.mask, organ) > dice(tbs.mask, organ)     # the split stops TBS, not DBS
    assert dbs.mbs_threshold is not None and 0 < dbs.mbs_threshold <= 0.35
    assert {step.phase for step in dbs.steps} >= {"tbs", "mbs"}


def test_absent_class_keeps_the_target_prediction():
    slice_ = make_synthetic_slice(64, 2, present=(1, 2, 4))
    result = run(slice_, config(64))
    trace = result.classes[3]
    assert trace.outcome == "absent" and trace.stage is None and trace.steps == []
    assert not trace.mask.any() and not (result.pseudo_label == 3).any()


def test_class_with_nothing_for_sam_falls_back_to_the_prediction():
    # Class 3 is predicted confidently in a blob where there is no organ at all: SAM returns nothing.
    slice_ = make_synthetic_slice(64, 4, present=(1, 2), false_positive=3)
    for search in ("naive", "dbs"):
        trace = run(slice_, config(64, search=search)).classes[3]
        assert trace.outcome == "fallback", trace.reason
        np.testing.assert_array_equal(trace.mask, slice_.probs.argmax(0).numpy() == 3)


class _SquareSam(SamBackend):
    """Returns the same square for every box."""

    name = "square"

    def decode(self, embedding, box):
        mask = np.zeros((32, 32), dtype=bool)
        mask[8:20, 8:20] = True
        return mask

    def embed(self, image):
        return SamEmbedding(features=torch.zeros(2, 8, 8), image_size=(32, 32))


def test_merge_rule_sam_beats_fallback_and_ties_go_to_the_lower_class():
    probs = torch.full((4, 32, 32), 0.01)
    probs[0] = 0.97
    probs[1, 8:20, 8:20], probs[0, 8:20, 8:20] = 0.97, 0.01      # classes 1 and 2: SAM gives the same square
    probs[2, 9:19, 9:19], probs[1, 9:19, 9:19] = 0.98, 0.0
    probs[3, 18:26, 18:26], probs[0, 18:26, 18:26] = 0.4, 0.58   # class 3: below existence, fallback mask
    probs[3, 22:26, 22:26], probs[0, 22:26, 22:26] = 0.97, 0.01
    sam = _SquareSam({}, torch.device("cpu"))
    cfg = BoxSearchConfig.from_cfg({"search": "naive", "existence_pixels": 20, "reference_size": 32}, 32,
                                   organs=ABDOMEN)
    result = search_slice(torch.ones(3, 32, 32), probs, sam, sam.embed(None), cfg)
    assert [result.classes[c].outcome for c in (1, 2, 3)] == ["sam", "sam", "absent"]
    label = result.pseudo_label
    assert (label[8:20, 8:20] == 1).all()               # SAM tie between classes 1 and 2: class 1 wins
    assert (label[22:26, 22:26] == 3).all()            # fallback beats background
    assert (label == 2).sum() == 0
    assert label[0, 0] == 0 and label[30, 30] == 0


def test_the_decoder_is_never_called_twice_for_the_same_box_on_a_slice():
    hits = 0
    for seed in range(4):
        slice_ = random_slice(64, seed)
        cache: dict = {}
        result = run(slice_, config(64), cache)
        calls = slice_.sam.calls
        assert len(calls) == len(set(calls)) == result.decoder_calls == len(cache)
        hits += result.cache_hits
        # a second search of the same slice with the same memo costs no decoder call at all
        again = run(slice_, config(64), cache)
        assert again.decoder_calls == 0 and len(slice_.sam.calls) == len(calls)
        np.testing.assert_array_equal(again.pseudo_label, result.pseudo_label)
    assert hits > 0                      # the memo was actually used (repeated boxes within a search)


# ----------------------------------------------------------------------------- vs the reference


# Default settings, stage 3 off, and step limits short enough that TBS/MBS run out of steps.
REFERENCE_SETTINGS = ({}, {"stage3": False}, {"max_steps": (4, 3, 5, 2)})
REFERENCE_SEEDS = (0, 1, 2, 3, 10, 12)     # 10 and 12 reach SAM-finds-nothing and MBS-finds-nothing paths
# What the random slices must exercise per variant: (outcome, stage) pairs.
EXPECTED_PATHS = {
    "naive": {("sam", "naive"), ("absent", None), ("fallback", None)},
    "tbs": {("sam", "tbs"), ("absent", None), ("fallback", None)},
    "mbs": {("sam", "mbs"), ("sam", "stage3"), ("absent", None)},
    "dbs": {("sam", "mbs"), ("sam", "stage3"), ("sam", "mbs-fallback"), ("absent", None), ("fallback", None)},
}


@pytest.mark.parametrize("search", bs.SEARCH_VARIANTS)
def test_search_equals_the_reference_implementation(search):
    seen: set = set()
    for settings in REFERENCE_SETTINGS:
        for seed in REFERENCE_SEEDS:
            _assert_same_as_reference(random_slice(64, seed), config(64, search=search, **settings), seen)
    _assert_same_as_reference(random_slice(128, 100), config(128, search=search), seen)
    assert EXPECTED_PATHS[search] <= seen, seen


# ------------------------------------------------------------------------------------------- CP


def test_cp_keeps_the_largest_6_connected_component_per_class():
    volume = np.zeros((3, 10, 10), dtype=np.uint8)
    volume[0, 0:4, 0:4] = 1                  # class 1, big component (16 voxels)...
    volume[1, 0:2, 0:2] = 1                  # ...that continues through a face into the next slice
    volume[2, 4:6, 4:6] = 1                  # class 1, touches the big one only along a 3D diagonal (edge)
    volume[0, 4, 4] = 1                      # class 1, touches (0,3,3) only at a corner in-plane
    volume[1, 6:9, 6:9] = 2                  # class 2, largest (9)
    volume[2, 0:2, 8:10] = 2                 # class 2, smaller (4)
    volume[0, 9, 0] = 3                      # class 3, single component: kept
    out = connectivity_postprocess(volume, 4)
    expected = np.zeros_like(volume)
    expected[0, 0:4, 0:4] = 1
    expected[1, 0:2, 0:2] = 1
    expected[1, 6:9, 6:9] = 2
    expected[0, 9, 0] = 3
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8 and volume[0, 4, 4] == 1          # the input is not modified


def test_cp_requires_a_volume():
    with pytest.raises(ValueError):
        connectivity_postprocess(np.zeros((4, 4), dtype=np.uint8), 2)


# --------------------------------------------------------------------------------------- figures


def test_search_figure_is_written(tmp_path):
    from sfdabench_methods.dfg.figures import save_search_figure

    slice_ = make_synthetic_slice(64, 5, present=(1, 2), split_organ=1)
    result = run(slice_, config(64))
    path = save_search_figure(tmp_path / "fig" / "slice0_spleen.png", slice_.image, result, 1, "spleen")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    absent = save_search_figure(tmp_path / "absent.png", slice_.image, result, 3, "left_kidney")
    assert absent.stat().st_size > 0
