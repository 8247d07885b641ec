"""Options of the DFG box search beyond the paper: max_steps by organ, tolerance and step scaling, the twin
guard, and their variant names in the ablation grid. Defaults are covered by tests/test_box_search.py."""
from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage
from torch import nn

from conftest import REPO
from helpers_box_search import (ABDOMEN, NUM_CLASSES, FakeSam, SyntheticSlice, _assert_same_as_reference, _ellipse,
                                _signed_distance, dice, random_slice, run)

from sfdabench.analysis import ablate
from sfdabench.api import Case, Context, TargetImages, UsageError
from sfdabench_methods.dfg import box_search as bs
from sfdabench_methods.dfg.box_search import BoxSearchConfig
from sfdabench_methods.dfg.method import DFG
from sfdabench_methods.dfg.pseudo_labels import _count, refine_pseudo_labels

ORGANS = ABDOMEN


def config(size: int, organs=ABDOMEN, **overrides) -> BoxSearchConfig:
    return BoxSearchConfig.from_cfg(overrides, (size, size), organs=organs)


# ---------------------------------------------------------------------------------------- scaling


def test_length_tolerance_scaling_scales_only_the_change_tolerances():
    area, length = config(128), config(128, tolerance_scaling="length")
    assert (area.tbs_tol_1step, area.tbs_tol_2step) == (4, 9)
    assert (area.mbs_tol_1step, area.mbs_tol_2step, area.mbs_tol_3step) == (4, 8, 11)
    assert (length.tbs_tol_1step, length.tbs_tol_2step) == (8, 18)          # 7.5, 17.5 half-up
    assert (length.mbs_tol_1step, length.mbs_tol_2step, length.mbs_tol_3step) == (8, 15, 23)
    # areas stay areas, lengths and step limits stay as they are
    assert (length.existence_pixels, length.tbs_min_area) == (area.existence_pixels, area.tbs_min_area) == (50, 13)
    assert (length.box_margin, length.affinity_radius, length.max_steps) == (2, 2, (25, 20, 20, 35))
    # at the reference size both rules give the spec's values
    assert config(256, tolerance_scaling="length").mbs_tol_3step == config(256).mbs_tol_3step == 45
    with pytest.raises(ValueError, match="tolerance_scaling='perimeter' unknown"):
        config(128, tolerance_scaling="perimeter")


def test_a_growth_step_reaches_radius_minus_one_pixels():
    # the premise of steps_scaling=reach
    for radius in (2, 3, 4, 5):
        assert max(max(abs(dy), abs(dx)) for dy, dx in bs.neighbour_offsets(radius)) == radius - 1
        region = np.zeros((21, 21), dtype=bool)
        region[10, 10] = True
        grown = bs.grow_within(region, np.ones_like(region), bs.neighbour_offsets(radius))
        assert np.nonzero(grown.any(axis=0))[0].max() == 10 + radius - 1


def test_reach_steps_scaling_restores_the_spec_reach():
    half = config(128, steps_scaling="reach")
    assert half.affinity_radius == 2 and half.max_steps == (38, 30, 30, 53)  # x 1.5 = 3 px at 256 / 1 px at 128
    assert (half.tbs_tol_1step, half.mbs_tol_3step) == (4, 11)              # nothing else changes
    assert config(128).max_steps == (25, 20, 20, 35)                        # fixed: the default
    assert config(64, steps_scaling="reach").max_steps == (19, 15, 15, 26)   # x 0.75: 0.75 px per 1 px step
    # no-ops: the reference size and unscaled configs
    assert config(256, steps_scaling="reach").max_steps == (25, 20, 20, 35)
    assert config(128, steps_scaling="reach", scale_to_resolution=False).max_steps == (25, 20, 20, 35)
    assert config(128, steps_scaling="reach", max_steps=[1, 2]).max_steps == (2, 3)   # at least 1, half-up
    with pytest.raises(ValueError, match="steps_scaling='far' unknown"):
        config(128, steps_scaling="far")


@pytest.mark.parametrize("search", ["tbs", "dbs"])
def test_scaled_options_agree_with_the_reference_implementation(search):
    # the options only change config values, which the reference reads from the same config
    seen: set = set()
    for seed in (0, 3):
        _assert_same_as_reference(random_slice(64, seed), config(64, search=search, tolerance_scaling="length",
                                                                 steps_scaling="reach"), seen)
    assert any(outcome == "sam" for outcome, _ in seen), seen


# ------------------------------------------------------------------------------------ max_steps


def test_max_steps_by_organ_name_in_label_order():
    steps = {"liver": 35, "left_kidney": 21, "spleen": 25, "right_kidney": 20}
    assert config(256, ORGANS, max_steps=steps).max_steps == (25, 20, 21, 35)
    assert config(256, ["liver", "spleen"], max_steps={"spleen": 3, "liver": 9}).max_steps == (9, 3)
    assert config(256, ORGANS, max_steps=[4, 3, 5, 2]).max_steps == (4, 3, 5, 2)   # a list: class order
    cfg = config(256, ORGANS, max_steps=steps)
    assert [cfg.max_steps_for(c) for c in (1, 2, 3, 4)] == [25, 20, 21, 35]
    # the shipped configs fit each other: dfg.yaml's mapping in abdomen4's organ order is the spec's list
    dfg = OmegaConf.load(REPO / "configs" / "method" / "dfg.yaml")
    organs = OmegaConf.load(REPO / "configs" / "organs" / "abdomen4.yaml").organs
    assert OmegaConf.is_dict(dfg.search.max_steps)
    assert BoxSearchConfig.from_cfg(dfg.search, 256, organs=organs).max_steps == (25, 20, 20, 35)


def test_max_steps_by_organ_name_errors_name_the_organ_and_the_fix():
    four = dict(zip(ORGANS, (25, 20, 20, 35)))
    with pytest.raises(ValueError, match=r"max_steps is given per organ .* pass organs="):
        config(256, None, max_steps=four)
    with pytest.raises(ValueError, match=re.escape("max_steps has no entry for organ 'pancreas'; add "
                                                   "+method.search.max_steps.pancreas=<steps>")):
        config(256, ORGANS + ["pancreas"], max_steps=four)
    with pytest.raises(ValueError, match=re.escape("max_steps has an entry for 'liver', which is not an organ of "
                                                   "this task (spleen, right_kidney, left_kidney); remove it with "
                                                   "~method.search.max_steps.liver")):
        config(256, ORGANS[:3], max_steps=four)


# ----------------------------------------------------------------------------------- twin guard


def slice_from(organs: np.ndarray, predicted: dict[int, np.ndarray], seed: int = 0) -> SyntheticSlice:
    """A slice with given organs (what SAM sees) and given target predictions per class (which may be wrong):
    target features cluster by true organ, probabilities peak inside each predicted region."""
    rng = np.random.default_rng(seed)
    size = organs.shape[0]
    centres = rng.normal(size=(NUM_CLASSES, 8))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    background = ndimage.gaussian_filter(rng.normal(size=(8, size, size)), (0, 2, 2)) * 3
    features = centres[organs].transpose(2, 0, 1) + 0.01 * rng.normal(size=(8, size, size))
    features = np.where(organs[None] == 0, features + background, features)
    sam_features = rng.normal(size=(NUM_CLASSES, 16))[organs[::4, ::4]].transpose(2, 0, 1)
    sam_features = sam_features + 0.15 * rng.normal(size=sam_features.shape)
    logits = np.zeros((NUM_CLASSES, size, size))
    for c in range(1, NUM_CLASSES):
        mask = predicted.get(c)
        logits[c] = 1.5 * np.clip(_signed_distance(mask), -4, 6) if mask is not None and mask.any() else -6.0
        logits[c] += 0.05 * rng.normal(size=(size, size))
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=0)
    sam = FakeSam(organs, torch.from_numpy(sam_features).float(), slack=2.0)
    return SyntheticSlice(organs, torch.from_numpy(features).float(), probs, sam)


def swapped_kidney_slice() -> SyntheticSlice:
    """Organs where they belong (column 0 = patient right), but the right kidney predicted on the left kidney
    (plus a small blob on the right kidney); spleen and liver predicted correctly, left kidney not at all."""
    organs = np.zeros((64, 64), dtype=np.int64)
    for c, centre, radii in ((1, (15, 47), (7, 6)), (4, (15, 15), (8, 10)), (2, (45, 15), (8, 6)),
                             (3, (45, 47), (8, 7))):
        organs[_ellipse(64, centre, radii, 0.3)] = c
    blob = _ellipse(64, (45, 15), (3, 3), 0.0)
    return slice_from(organs, {1: organs == 1, 4: organs == 4, 2: (organs == 3) | blob})


def test_side_guard_refuses_a_mask_on_the_twin_organ():
    slice_ = swapped_kidney_slice()
    sides = {"spleen": "left", "right_kidney": "right", "left_kidney": "left", "liver": "right"}
    paper = run(slice_, config(64, ORGANS, sides=sides))
    assert paper.classes[2].outcome == "sam" and paper.classes[2].guard is None
    assert dice(paper.classes[2].mask, slice_.organs == 3) > 0.9           # SAM found the left kidney
    guarded = run(slice_, config(64, ORGANS, twin_guard="side", sides=sides))
    trace = guarded.classes[2]
    assert trace.outcome == "fallback" and trace.guard == "side" and trace.stage is None
    assert trace.reason.startswith("twin guard (side): ") and "patient's left half" in trace.reason
    assert trace.refused_step is not None and trace.selected_step is None
    predicted = slice_.probs.argmax(0).numpy() == 2
    expected = predicted & (np.arange(64)[None] <= 31)                    # the prediction on the right half
    assert expected.any() and not np.array_equal(expected, predicted)
    np.testing.assert_array_equal(trace.mask, expected)
    assert not (guarded.pseudo_label[slice_.organs == 3] == 2).any()
    # organs on their own side keep their SAM masks; the result is otherwise the paper's
    for c in (1, 4):
        assert guarded.classes[c].outcome == "sam" and guarded.classes[c].guard is None
        np.testing.assert_array_equal(guarded.classes[c].mask, paper.classes[c].mask)
    # an organ without a side is never side-guarded
    unsided = run(slice_, config(64, ORGANS, twin_guard="side", sides={**sides, "right_kidney": None}))
    assert unsided.classes[2].outcome == "sam"


def test_side_guard_needs_sides():
    with pytest.raises(ValueError, match="twin_guard=side needs the patient's side"):
        config(64, ORGANS, twin_guard="side")
    with pytest.raises(ValueError, match="twin_guard=side needs the patient's side"):
        config(64, ORGANS, twin_guard="side", sides={"pancreas": "left"})      # not a task organ: ignored
    with pytest.raises(ValueError, match=r"sides.liver='up' is not a side"):
        config(64, ORGANS, sides={"liver": "up"})
    assert config(64, ORGANS, sides={"liver": "right", "aorta": None}).sides == (None, None, None, "right")
    # unused without the side guard (organ names unknown: max_steps then in class order)
    assert config(64, None, sides={"liver": "right"}, max_steps=[25, 20, 20, 35]).sides is None


def shared_organ_slice() -> SyntheticSlice:
    """One organ predicted half as class 1 and half as class 2: SAM gives both classes the whole organ."""
    organs = np.zeros((64, 64), dtype=np.int64)
    organs[_ellipse(64, (28, 30), (9, 13), 0.0)] = 1
    organs[_ellipse(64, (55, 50), (6, 6), 0.0)] = 4
    columns = np.arange(64)[None]
    return slice_from(organs, {1: (organs == 1) & (columns < 28), 2: (organs == 1) & (columns > 32),
                               4: organs == 4})


def test_seed_guard_refuses_a_mask_over_another_class_seed():
    slice_ = shared_organ_slice()
    paper = run(slice_, config(64))
    assert paper.classes[1].outcome == "sam" and dice(paper.classes[1].mask, slice_.organs == 1) > 0.9
    assert paper.classes[2].outcome == "sam" and dice(paper.classes[2].mask, slice_.organs == 1) > 0.9
    guarded = run(slice_, config(64, twin_guard="seed"))
    trace = guarded.classes[1]
    assert trace.outcome == "fallback" and trace.guard == "seed"
    assert trace.reason.startswith("twin guard (seed): ") and "of class 2" in trace.reason
    seeds = {}
    for c in (2, 4):
        prob = slice_.probs[c].double().numpy()
        seeds[c] = bs.largest_contour(prob > prob.max() - 0.005)
    assert (paper.classes[1].mask & seeds[2]).any()                       # the refused mask did cover it
    prediction = slice_.probs.argmax(0).numpy()
    np.testing.assert_array_equal(trace.mask, (prediction == 1) & ~seeds[2] & ~seeds[4])
    assert trace.mask.any()
    assert guarded.classes[2].guard == "seed"                             # and symmetrically for class 2
    assert guarded.classes[4].outcome == "sam" and guarded.classes[4].guard is None
    # absent classes have no seed: a slice without class 2 guards nothing
    alone = slice_from(slice_.organs, {1: slice_.organs == 1, 4: slice_.organs == 4})
    assert run(alone, config(64, twin_guard="seed")).classes[1].outcome == "sam"


def test_guarded_classes_are_counted_apart_from_fallbacks():
    result = run(swapped_kidney_slice(), config(64, ORGANS, twin_guard="side",
                                                sides={"right_kidney": "right", "spleen": "left"}))
    outcomes = {o: collections.Counter() for o in ORGANS}
    totals = collections.Counter()
    _count(result, ORGANS, outcomes, totals)
    assert outcomes["right_kidney"] == {"guarded": 1}
    assert outcomes["left_kidney"] == {"absent": 1}
    for organ in ("spleen", "liver"):
        assert sum(outcomes[organ].values()) == 1 and all(k.startswith("sam:") for k in outcomes[organ])
    assert totals["decoder_calls"] == result.decoder_calls > 0


class _FixedModel(nn.Module):
    """Returns one slice's features and probabilities (as logits) for every input."""

    def __init__(self, slice_: SyntheticSlice):
        super().__init__()
        self.features, self.logits = slice_.features, slice_.probs.clamp_min(1e-12).log()

    def forward(self, x):
        n = x.shape[0]
        return self.features.expand(n, -1, -1, -1), self.logits.expand(n, -1, -1, -1)


def test_refine_pseudo_labels_reads_organ_keyed_settings_and_records_them(tmp_path):
    slice_ = swapped_kidney_slice()
    context = Context(device=torch.device("cpu"), seed=0, cache_dir=tmp_path / "cache", run_dir=tmp_path / "run",
                      organs=ORGANS, sam_factory=lambda: slice_.sam, progress=False)
    cases = [Case("c0", slice_.image[None].astype(np.float32), None, (1.0, 1.0, 1.0))]
    search = {"max_steps": {"liver": 35, "spleen": 25, "left_kidney": 20, "right_kidney": 20},
              "steps_scaling": "reach", "tolerance_scaling": "length", "twin_guard": "side",
              "sides": {"spleen": "left", "right_kidney": "right", "left_kidney": "left", "liver": "right"}}
    labels = refine_pseudo_labels(_FixedModel(slice_), TargetImages(cases), search, context)
    stats = labels.stats
    assert stats["scaled_settings"]["max_steps"] == {"spleen": 19, "right_kidney": 15, "left_kidney": 15,
                                                     "liver": 26}                      # x 0.75 at 64 px
    assert stats["scaled_settings"]["tbs_tol_1step"] == 4                             # 15 x 64/256 (area: 1)
    assert (stats["tolerance_scaling"], stats["steps_scaling"], stats["twin_guard"]) == ("length", "reach", "side")
    assert stats["outcomes"]["right_kidney"] == {"guarded": 1}
    assert not (labels.refined[0][0][slice_.organs == 3] == 2).any()


# ------------------------------------------------------------------------------- variant names


NEW_VARIANTS = ["fa+dbs+cp+ltol", "fa+dbs+cp+reach", "fa+dbs+cp+ltol+reach", "fa+dbs+cp+guard-side",
                "fa+dbs+cp+guard-seed", "nofa+tbs+nocp+ltol+reach+guard-seed", "fa+mbs+nos3+cp+reach",
                "fa+naive+cp+guard-side", "fa+dbs+cp+cover-pred50", "fa+dbs+cp+reach+cover-region80+guard-side",
                "fa+tbs+cp+cover-pred100", "fa-srcprior+dbs+cp", "fa-srcprior-only", "fa+dbs+cp+grow1",
                "fa+mbs+cp+ltol+grow0.5+cover-pred50+guard-side"]


@pytest.mark.parametrize("name", ["fa+dbs+cp", "fa-only", "fa+dbs+nos3+cp", *NEW_VARIANTS])
def test_variant_names_round_trip(name):
    base = OmegaConf.load(REPO / "configs" / "method" / "dfg.yaml")
    cfg = OmegaConf.merge(base, DFG.ablation.settings(name))
    assert DFG(cfg).variant() == name
    assert cfg.fa.get("prior", "uniform") == ("source_prediction" if "-srcprior" in name else "uniform")
    columns = DFG.ablation.columns(name)
    if name.endswith("-only"):
        assert (columns["tolerances"], columns["steps"], columns["coverage"], columns["guard"]) == ("-",) * 4
    else:
        assert columns["tolerances"] == ("length" if "+ltol" in name else "area")
        assert columns["steps"] == ("reach" if "+reach" in name else "fixed")
        assert columns["guard"] == (name.split("+guard-")[1] if "+guard-" in name else "none")
        assert cfg.search.tolerance_scaling == columns["tolerances"] and cfg.search.twin_guard == columns["guard"]
        cover = re.search(r"\+cover-(pred|region)(\d+)", name)
        assert columns["coverage"] == (f"{cover[1]} {int(cover[2]) / 100:g}" if cover else "off")
        assert cfg.search.min_coverage == (int(cover[2]) / 100 if cover else 0.0)


def test_default_settings_add_no_token_and_bad_names_are_refused():
    base = OmegaConf.load(REPO / "configs" / "method" / "dfg.yaml")
    assert DFG(base).variant() == "fa+dbs+cp"
    naive = OmegaConf.merge(base, {"search": {"search": "naive", "tolerance_scaling": "length"}})
    assert DFG(naive).variant() == "fa+naive+cp"                  # naive uses no tolerance: nothing to name
    with pytest.raises(ValueError, match="twin_guard='sid' unknown"):
        DFG(OmegaConf.merge(base, {"search": {"twin_guard": "sid"}})).variant()
    with pytest.raises(ValueError, match="min_coverage=0.555 cannot be named"):
        DFG(OmegaConf.merge(base, {"search": {"min_coverage": 0.555}})).variant()
    for bad in ("fa+dbs+cp+reach+ltol", "fa+dbs+ltol+cp", "fa+naive+cp+ltol", "fa+dbs+cp+guard-both",
                "fa+dbs+cp+guard-side+ltol", "fa-only+reach", "fa+naive+cp+cover-pred50", "fa+dbs+cp+cover-pred0",
                "fa+dbs+cp+cover-pred101", "fa+dbs+cp+guard-side+cover-pred50", "fa+dbs+cp+cover-all50",
                "fa+dbs+cp+grow0", "fa+dbs+cp+grow1.0", "fa+naive+cp+grow1", "fa+dbs+cp+cover-pred50+grow1"):
        with pytest.raises(UsageError, match="unknown DFG variant"):
            DFG.ablation.settings(bad)


def test_ablate_takes_the_search_option_grid():
    grid = ["fa+dbs+cp", "fa+dbs+cp+ltol", "fa+dbs+cp+reach", "fa+dbs+cp+ltol+reach", "fa+dbs+cp+grow1",
            "fa+dbs+cp+cover-pred50", "fa+dbs+cp+cover-region80", "fa+dbs+cp+guard-side", "fa+dbs+cp+guard-seed"]
    variants = ablate.parse_args(["method=dfg", "task=phantom_mri2ct", f"variants=[{','.join(grid)}]"]).variants
    assert variants == grid
    assert ablate.parse_args(["method=dfg", "task=phantom_mri2ct", "variants=search_options"]).variants == grid
    for key in ("method.search.tolerance_scaling=length", "method.search.steps_scaling=reach",
                "method.search.twin_guard=side", "method.search.min_coverage=0.5", "method.search.mbs_max_growth=1"):
        with pytest.raises(UsageError, match="set by the ablation grid"):
            ablate.parse_args(["method=dfg", "task=phantom_mri2ct", key])


# ------------------------------------------------------------------------------ coverage before stability


class SubstructureSam(FakeSam):
    """FakeSam that, for any box inside ``lock`` (x_min, y_min, x_max, y_max), returns one small fixed mask:
    SAM locked onto a substructure of a large organ, the same answer for every slightly larger box."""

    def __init__(self, organs, sam_features, lock, substructure):
        super().__init__(organs, sam_features, slack=2.0)
        self.lock, self.substructure = lock, substructure

    def decode(self, embedding, box):
        x_min, y_min, x_max, y_max = (int(v) for v in box)
        lx0, ly0, lx1, ly1 = self.lock
        if x_min >= lx0 and y_min >= ly0 and x_max <= lx1 and y_max <= ly1:
            self.calls.append(tuple(int(v) for v in box))
            return self.substructure.copy()
        return super().decode(embedding, box)


def substructure_slice() -> SyntheticSlice:
    organs = np.zeros((64, 64), dtype=np.int64)
    organs[_ellipse(64, (32, 30), (16, 20), 0.0)] = 4                    # a large liver
    organs[_ellipse(64, (50, 54), (5, 5), 0.0)] = 1
    base = slice_from(organs, {4: organs == 4, 1: organs == 1})
    # the liver's probability peaks sharply at one point, so its seed region is a few pixels
    yy, xx = np.mgrid[:64, :64]
    logits = base.probs.clamp_min(1e-12).log()
    flatter = -0.7 * 1.5 * np.clip(_signed_distance(organs == 4), -4, 6)      # plateau p ~0.94 instead of ~1
    bump = 3.0 * np.exp(-((yy - 32) ** 2 + (xx - 30) ** 2) / 8.0)
    logits[4] += torch.from_numpy(flatter + bump).float()
    base.probs = torch.softmax(logits, dim=0)
    prob = base.probs[4].double().numpy()
    seed = bs.largest_contour(prob > prob.max() - 0.005)
    rows, cols = np.nonzero(seed)
    cy, cx = int(rows.mean()), int(cols.mean())
    substructure = _ellipse(64, (cy, cx), (3, 3), 0.0) & (organs == 4)
    lock = (cx - 9, cy - 9, cx + 9, cy + 9)                               # boxes up to ~18 px keep the lock
    sam = SubstructureSam(organs, base.sam.sam_features, lock, substructure)
    return SyntheticSlice(organs, base.features, base.probs, sam)


def test_the_paper_search_keeps_a_substructure_mask_as_stable():
    slice_ = substructure_slice()
    trace = run(slice_, config(64)).classes[4]
    assert trace.outcome == "sam"
    np.testing.assert_array_equal(trace.mask, slice_.sam.substructure)   # 28 px of a ~1000-px organ
    assert dice(trace.mask, slice_.organs == 4) < 0.1


def test_prediction_coverage_keeps_growing_until_the_mask_covers_the_organ():
    slice_ = substructure_slice()
    paper = run(slice_, config(64))
    result = run(slice_, config(64, min_coverage=0.5, coverage_of="prediction"))
    trace = result.classes[4]
    assert trace.outcome == "sam" and dice(trace.mask, slice_.organs == 4) > 0.9, (trace.stage, trace.reason)
    assert dice(paper.classes[4].mask, slice_.organs == 4) < 0.1                   # the paper kept the lock
    assert trace.steps[0].mask_area == int(slice_.sam.substructure.sum())          # and so did this step 0
    np.testing.assert_array_equal(result.classes[1].mask, paper.classes[1].mask)   # the small organ: unaffected


def test_region_coverage_needs_a_high_fraction_because_the_region_grows_with_the_box():
    # MBS grows its region a pixel a step around the locked mask, so a lenient fraction is met while the box is
    # still inside the lock; a strict one escapes it (partly, within max_steps)
    slice_ = substructure_slice()
    lenient = run(slice_, config(64, min_coverage=0.5)).classes[4]
    strict = run(slice_, config(64, min_coverage=0.8)).classes[4]
    assert dice(lenient.mask, slice_.organs == 4) < 0.1
    assert dice(strict.mask, slice_.organs == 4) > 0.5


def test_min_coverage_is_validated():
    with pytest.raises(ValueError, match=r"min_coverage must be a fraction in \[0, 1\], got 1.5"):
        config(64, min_coverage=1.5)
    with pytest.raises(ValueError, match="coverage_of='box' unknown"):
        config(64, coverage_of="box")


# ------------------------------------------------------------------------------- MBS growth budget


def test_growth_budget_lowers_the_mbs_threshold_only_where_features_do_not_separate():
    # the same slice with well-separated SAM features (the budget never binds: identical search) ...
    slice_ = random_slice(64, 3)
    paper = run(slice_, config(64, search="mbs"))
    budget = run(slice_, config(64, search="mbs", mbs_max_growth=1000.0))
    for k, trace in paper.classes.items():
        assert budget.classes[k].mbs_threshold == trace.mbs_threshold
        np.testing.assert_array_equal(budget.classes[k].mask, trace.mask)
    # ... and a tight budget: at most |mask| pixels outside the start mask stay below the threshold
    tight = run(slice_, config(64, search="mbs", mbs_max_growth=0.5))
    lowered = [k for k, t in tight.classes.items()
               if t.mbs_threshold is not None and t.mbs_threshold < paper.classes[k].mbs_threshold]
    assert lowered, {k: (t.mbs_threshold, paper.classes[k].mbs_threshold) for k, t in tight.classes.items()}


@pytest.mark.parametrize("search", ["mbs", "dbs"])
def test_growth_budget_agrees_with_the_reference_implementation(search):
    seen: set = set()
    for seed in (0, 3):
        _assert_same_as_reference(random_slice(64, seed), config(64, search=search, mbs_max_growth=0.5), seen)
    assert any(outcome == "sam" for outcome, _ in seen), seen


def test_growth_budget_is_validated():
    with pytest.raises(ValueError, match=r"mbs_max_growth must be >= 0 \(0 = off\), got -1"):
        config(64, mbs_max_growth=-1)
