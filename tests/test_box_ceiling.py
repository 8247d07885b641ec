"""The ceiling of box prompting: ground-truth boxes sent to SAM, DFG's box-search efficiency against it, and
the ``box_ceiling`` diagnostic method (uses target labels: never SFDA)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from conftest import run_cli
from helpers_methods import ORGANS, ThresholdSam, dfg_cfg, make_context, method_config, synthetic_cases
from sfdabench.api import SfdaBenchError, TargetImages
from sfdabench.harness.evaluation import dice_per_organ
from sfdabench.harness.plugins import get_registry
from sfdabench.sam.ceiling import gt_box_pseudo_labels, gt_box_slice
from sfdabench_methods.dfg.method import DFG

DFG_MERGE = (0.5, 2.0)      # (background, SAM mask) scores of DFG's class merge


def test_gt_boxes_give_near_perfect_pseudo_labels_with_a_box_faithful_sam():
    cases = synthetic_cases(2, 3)
    sam = ThresholdSam()
    volumes, stats = gt_box_pseudo_labels(sam, [c.image for c in cases], [c.label for c in cases], ORGANS, 2,
                                          DFG_MERGE)
    dice = dice_per_organ(volumes, [c.label for c in cases], ORGANS)
    assert min(dice[o] for o in ORGANS) > 0.95, dice
    slices = sum(c.num_slices for c in cases)
    assert stats["decoder_calls"] == sam.calls == slices * len(ORGANS)   # one call per organ and slice
    assert stats["outcomes"]["liver"] == {"sam": slices}


def test_slice_without_organs_is_not_embedded_and_merge_prefers_lower_class():
    class CountingSam(ThresholdSam):
        embeds = 0

        def embed(self, image):
            self.embeds += 1
            return super().embed(image)

        def decode(self, embedding, box):          # every box: the whole image
            return np.ones(embedding.image_size, bool)

    sam = CountingSam()
    image = np.zeros((8, 8), np.float32)
    empty, outcomes = gt_box_slice(sam, image, np.zeros((8, 8), np.uint8), 5, 1, DFG_MERGE)
    assert sam.embeds == 0 and outcomes == {} and not empty.any()
    label = np.zeros((8, 8), np.uint8)
    label[1:3, 1:3], label[5:7, 5:7] = 2, 4
    merged, outcomes = gt_box_slice(sam, image, label, 5, 1, DFG_MERGE)
    assert outcomes == {2: "sam", 4: "sam"} and (merged == 2).all()   # overlap: the lower class wins (spec 4.4)


def test_dfg_records_ceiling_and_efficiency(tmp_path, source_model):
    target = synthetic_cases(1, 5)
    ctx, _ = make_context(tmp_path, [c.label for c in target], images=[c.image for c in target])
    DFG(dfg_cfg(**{"fa.enabled": False})).adapt(copy.deepcopy(source_model), TargetImages(target), ctx)
    pl = ctx.diagnostics["pseudo_label_dice"]
    efficiency = ctx.diagnostics["box_search_efficiency"]
    assert set(efficiency) == set(ORGANS) | {"mean"}
    for key, value in efficiency.items():
        assert math.isclose(value, pl["sam"][key] / pl["gt_box_ceiling"][key]), key
    assert ctx.diagnostics["gt_box_ceiling"]["stage"] == "sam"
    # The class-keeping ceiling keeps the FA model's classes: it bounds the search alone, so it is never
    # above the ceiling that gets every class right, and the search's efficiency against it is the larger.
    keeping = pl["class_keeping_ceiling"]
    assert keeping["mean"] <= pl["gt_box_ceiling"]["mean"] + 1e-9
    kept = ctx.diagnostics["box_search_efficiency_class_keeping"]
    assert math.isclose(kept["mean"], pl["sam"]["mean"] / keeping["mean"])
    assert ctx.diagnostics["class_keeping_ceiling"]["classes_from"] == "target_model"
    # Confusion per stage: rows are fractions of each ground-truth class.
    for stage in ("target_model", "sam"):
        for row in ctx.diagnostics["pseudo_label_confusion"][stage].values():
            assert math.isclose(sum(row.values()), 1.0) or all(v != v for v in row.values())
    assert ctx.diagnostics["gt_box_ceiling"]["box_margin"] >= 1

    ctx_off, _ = make_context(tmp_path / "off", [c.label for c in target], images=[c.image for c in target])
    DFG(dfg_cfg(**{"fa.enabled": False, "box_ceiling": False})).adapt(
        copy.deepcopy(source_model), TargetImages(target), ctx_off)
    assert "box_search_efficiency" not in ctx_off.diagnostics


def test_box_ceiling_method_is_a_labelled_diagnostic(tmp_path):
    cls = get_registry().get("methods", "box_ceiling")
    assert cls.uses_target_labels and cls.uses_sam
    out = run_cli("list", "methods", cwd=tmp_path)
    line = next(line for line in out.stdout.splitlines() if line.strip().startswith("box_ceiling "))
    assert "not SFDA" in line


def test_box_ceiling_method_cannot_run_without_labels(tmp_path, source_model):
    target = synthetic_cases(1, 6)
    ctx, _ = make_context(tmp_path, [c.label for c in target])      # labels not allowed: an SFDA context
    cls = get_registry().get("methods", "box_ceiling")
    with pytest.raises(SfdaBenchError, match="not available to source-free methods"):
        cls(method_config("box_ceiling")).adapt(copy.deepcopy(source_model), TargetImages(target), ctx)


def test_class_keeping_ceiling_keeps_a_twin_swap_and_skips_background_regions():
    """A model that calls the right kidney "left kidney" keeps that error in the class-keeping ceiling (the
    box is right, the class is the model's), while the ground-truth ceiling fixes it for free."""
    sam = ThresholdSam()
    image = np.zeros((16, 16), np.float32)
    label = np.zeros((16, 16), np.uint8)
    label[2:6, 2:6] = 2                      # right kidney (class 2)
    image[label > 0] = 1.0
    predicted = np.zeros_like(label)
    predicted[3:5, 3:5] = 3                  # predicted as left kidney (class 3), inside the right kidney
    predicted[10:12, 10:12] = 1              # spleen predicted on background: no box can fix it
    kept, outcomes = gt_box_slice(sam, image, label, 5, 1, DFG_MERGE, predicted=predicted)
    assert outcomes == {3: "sam"}
    assert (kept[label == 2] == 3).mean() > 0.9 and not (kept == 2).any()
    truth, _ = gt_box_slice(sam, image, label, 5, 1, DFG_MERGE)
    assert (truth[label == 2] == 2).mean() > 0.9


def test_label_confusion_shows_twin_swaps_and_misses():
    from sfdabench.harness.evaluation import confusion_highlights, label_confusion

    gt = np.zeros((1, 8, 8), np.uint8)
    gt[0, :2, :2], gt[0, 4:6, 4:6], gt[0, 6:, :2] = 2, 4, 1
    pred = np.zeros_like(gt)
    pred[0, :2, :2] = 3                      # right kidney -> left kidney
    pred[0, 4:6, 4:6] = 4                    # liver right; spleen missed (-> background)
    conf = label_confusion([pred], [gt], ORGANS)
    assert conf["right_kidney"]["left_kidney"] == 1.0 and conf["liver"]["liver"] == 1.0
    assert conf["spleen"]["background"] == 1.0
    assert all(v != v for v in conf["left_kidney"].values())      # absent from the ground truth: NaN row
    assert confusion_highlights(conf) == ["spleen->background 1.00", "right_kidney->left_kidney 1.00"]


def test_quality_by_slice_group_pools_the_pixels_of_each_group():
    from sfdabench.harness.evaluation import quality_by_slice_group

    rng = np.random.default_rng(0)
    organs = ["a", "b"]
    labels = [rng.integers(0, 3, (4, 6, 6)).astype(np.uint8) for _ in range(2)]
    preds = [rng.integers(0, 3, (4, 6, 6)).astype(np.uint8) for _ in range(2)]
    groups = {"a": [["x", "y", "x", "x"], ["y", "y", "x", "y"]]}          # organ b not grouped: not scored
    out = quality_by_slice_group(preds, labels, organs, groups)
    assert set(out) == {"a"} and set(out["a"]) == {"x", "y"}
    for name in ("x", "y"):
        pick = [(p[z], g[z]) for p, g, names in zip(preds, labels, groups["a"]) for z, n in enumerate(names)
                if n == name]
        a = np.stack([p for p, _ in pick]) == 1
        b = np.stack([g for _, g in pick]) == 1
        tp = np.count_nonzero(a & b)
        assert out["a"][name]["slices"] == len(pick) == (4 if name == "x" else 4)
        assert out["a"][name]["recall"] == pytest.approx(tp / b.sum())
        assert out["a"][name]["precision"] == pytest.approx(tp / a.sum())
        assert out["a"][name]["dice"] == pytest.approx(2 * tp / (a.sum() + b.sum()))
    empty = quality_by_slice_group([np.zeros((1, 2, 2), np.uint8)], [np.zeros((1, 2, 2), np.uint8)], organs,
                                   {"b": [["z"]]})["b"]["z"]
    assert np.isnan(empty["recall"]) and np.isnan(empty["precision"]) and np.isnan(empty["dice"])


def test_pseudo_label_dice_is_the_dice_metric_averaged_over_volumes():
    """The diagnostic's Dice is the rows' Dice: per volume 2|A∩B|/(|A|+|B|), an organ absent from both volumes
    left out of its mean (NaN when absent everywhere), one empty side scoring 0."""
    rng = np.random.default_rng(0)
    pred = [rng.integers(0, 3, (3, 8, 8)).astype(np.uint8) for _ in range(2)]
    gt = [rng.integers(0, 3, (3, 8, 8)).astype(np.uint8) for _ in range(2)]
    pred[1][pred[1] == 2], gt[1][gt[1] == 2] = 0, 0          # organ 2 absent from both volumes of case 1
    pred[0][pred[0] == 1] = 0                                  # organ 1 missed in case 0: Dice 0 there
    organs = ["a", "b", "c"]
    got = dice_per_organ(pred, gt, organs)

    def plain(p, g):
        return 2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum())

    assert got["a"] == pytest.approx(np.mean([0.0, plain(pred[1] == 1, gt[1] == 1)]), abs=0)
    assert got["b"] == pytest.approx(plain(pred[0] == 2, gt[0] == 2), abs=0)
    assert np.isnan(got["c"])
    assert got["mean"] == pytest.approx(np.mean([got["a"], got["b"]]), abs=0)
