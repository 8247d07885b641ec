"""Unit tests of the entropy / BatchNorm / pseudo-label baselines (adabn, tent, adami, dpl, pseudo_label,
sam_refine) and of their shared helpers in ``sfdabench.blocks.self_training``. Tiny networks, a few slices."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers_methods import ORGANS, ThresholdSam, make_context, synthetic_cases
from sfdabench.api import SamBackend, SamEmbedding, TargetImages
from sfdabench.blocks.nets import build_segmenter
from sfdabench.blocks.self_training import (IGNORE, bn_layers, masked_cross_entropy, mean_target_prediction,
                                     softmax_entropy)
from sfdabench.blocks.training import predict_target
from sfdabench_methods.adabn import AdaBN
from sfdabench_methods.adami import class_proportions, fixed_prior, proportion_kl, weighted_entropy
from sfdabench_methods.dpl import (denoised_pseudo_labels, mc_dropout_mode, mc_pseudo_labels,
                                   prototype_agreement, prototype_sums, with_dropout)
from sfdabench_methods.pseudo_label import entropy_filtered_pseudo_labels
from sfdabench_methods.sam_refine import refine_slice, sam_pseudo_labels
from sfdabench_methods.tent import Tent

K = len(ORGANS) + 1


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture
def net():
    torch.manual_seed(0)
    return build_segmenter({"width": 4, "depth": 2}, K)


@pytest.fixture
def target():
    return synthetic_cases(2, 21, slices=2)           # 4 slices of 48 x 48


class BrightnessSegmenter(nn.Module):
    """A fixed 'source model': class k where the image is near the synthetic organ brightness 0.5 + 0.1 k."""

    def __init__(self, width: float = 0.002):
        super().__init__()
        self.centres = torch.tensor([0.1, 0.6, 0.7, 0.8, 0.9])
        self.width = width                                   # larger: softer, less confident predictions

    def forward(self, x):
        v = x[:, :1]
        logits = -((v - self.centres.view(1, -1, 1, 1)) ** 2) / self.width
        return x, logits


def split(model: nn.Module):
    """(BatchNorm affine parameters, other parameters, buffers) by name."""
    bn = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
          for p in ("weight", "bias")}
    params = dict(model.named_parameters())
    return ({k: v for k, v in params.items() if k in bn}, {k: v for k, v in params.items() if k not in bn},
            dict(model.named_buffers()))


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# -------------------------------------------------------------------------------------------- AdaBN


def test_adabn_sets_running_statistics_to_the_target_statistics_and_changes_nothing_else(tmp_path, net, target):
    before = copy.deepcopy(net.state_dict())
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    model = AdaBN({"name": "adabn", "epochs": 1, "batch_size": 4}).adapt(net, TargetImages(target), ctx)
    after = model.state_dict()
    bn_params, other, buffers = split(model)
    assert not changed({k: before[k] for k in [*bn_params, *other]}, after)    # no parameter moved
    stats = {k for k in buffers if k.endswith(("running_mean", "running_var"))}
    assert changed(before, after) - {k for k in after if k.endswith("num_batches_tracked")} == stats
    # One batch of all 4 slices: the first BN's statistics are exactly those of the first conv's output.
    images = torch.stack([TargetImages(target)[i]["image"] for i in range(4)])
    with torch.no_grad():
        h = model.inc[0](images)
    bn = model.inc[1]
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.transpose(0, 1).flatten(1).var(dim=1, unbiased=True), rtol=1e-4)
    assert bn.momentum == 0.1                               # restored after the cumulative average


# --------------------------------------------------------------------------------------------- Tent


def tent_cfg(**changes):
    cfg = {"name": "tent", "iterations": 6, "batch_size": 4, "optimizer": "adam", "lr": 1e-2,
           "betas": [0.9, 0.999], "momentum": 0.9, "weight_decay": 0.0, "eval_statistics": "source"}
    return {**cfg, **changes}


def test_tent_changes_only_batchnorm_affine_parameters(tmp_path, net, target):
    bn_before, other_before, buffers_before = (copy.deepcopy(d) for d in split(net))
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    model = Tent(tent_cfg()).adapt(net, TargetImages(target), ctx)
    bn_after, other_after, buffers_after = split(model)
    assert changed(bn_before, bn_after) == set(bn_before)          # every gamma and beta moved
    assert not changed(other_before, other_after)                   # convs and classifier frozen
    assert not changed(buffers_before, buffers_after)               # source statistics kept (not tracked)
    assert all(p.requires_grad for p in model.parameters())         # restored for whoever trains next
    assert all(m.track_running_stats for m in bn_layers(model))
    entropy = ctx.diagnostics["tent_entropy"]
    assert entropy["last"] < entropy["first"]                       # the same 4 slices each step: it must fall


def test_tent_target_statistics_are_reestimated_after_adaptation(tmp_path, net, target):
    _, other_before, buffers_before = (copy.deepcopy(d) for d in split(net))
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    model = Tent(tent_cfg(eval_statistics="target", iterations=2)).adapt(net, TargetImages(target), ctx)
    _, other_after, buffers_after = split(model)
    assert not changed(other_before, other_after)
    assert {k for k in changed(buffers_before, buffers_after) if "running" in k}


def test_softmax_entropy():
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0]]).T.reshape(1, 2, 1, 2)   # uniform, then certain
    assert torch.allclose(softmax_entropy(logits), torch.tensor([[[math.log(2), 0.0]]]), atol=1e-6)


# -------------------------------------------------------------------------------------------- AdaMI


def test_adami_kl_is_zero_at_the_prior_and_positive_elsewhere():
    prior = torch.tensor([0.7, 0.1, 0.05, 0.05, 0.1])
    assert float(proportion_kl(prior[None], prior)) == pytest.approx(0.0, abs=1e-7)
    other = torch.tensor([[0.9, 0.025, 0.025, 0.025, 0.025]])
    assert float(proportion_kl(other, prior)) == pytest.approx(float((other * (other / prior).log()).sum()), rel=1e-5)
    assert float(proportion_kl(other, prior)) > 0
    # two images whose proportions average to the prior: KL 0 over the batch, > 0 per image (kl_over)
    a = torch.tensor([0.9, 0.05, 0.0, 0.0, 0.05])
    probs = torch.stack([a, 2 * prior - a]).view(2, 5, 1, 1).expand(2, 5, 2, 3)
    assert torch.allclose(class_proportions(probs, "batch"), prior[None])
    assert float(proportion_kl(class_proportions(probs, "batch"), prior)) == pytest.approx(0.0, abs=1e-6)
    assert float(proportion_kl(class_proportions(probs, "image"), prior)) > 0.01
    assert class_proportions(probs, "image").shape == (2, 5)


def test_adami_prior_from_source_predictions_is_the_mean_softmax(tmp_path, net, target):
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    prior = mean_target_prediction(net, TargetImages(target), ctx, batch_size=3)
    assert prior.shape == (K,) and bool((prior >= 0).all()) and float(prior.sum()) == pytest.approx(1.0, abs=1e-6)
    probs = predict_target(net, TargetImages(target), ctx, want=("probs",))["probs"]
    expected = np.concatenate(probs).mean(axis=(0, 2, 3))
    assert np.allclose(prior.numpy(), expected, atol=1e-6)
    assert torch.allclose(fixed_prior([2, 1, 1, 0, 0], K), torch.tensor([0.5, 0.25, 0.25, 0, 0]))
    with pytest.raises(ValueError, match="non-negative numbers"):
        fixed_prior([1, 1], K)


def test_adami_weighted_entropy_with_equal_weights_is_the_mean_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, K, 3, 3)
    value = weighted_entropy(logits.softmax(1), torch.ones(K))
    assert float(value) == pytest.approx(float(softmax_entropy(logits).mean()), rel=1e-5)


def test_class_shares_count_all_or_only_the_kept_pixels():
    from sfdabench.blocks.self_training import class_shares
    labels = [np.array([[0, 0, 1], [2, 0, 1]]), np.array([[1, 1]])]
    keep = [np.array([[True, False, True], [True, True, False]]), np.array([[False, False]])]
    assert class_shares(labels, ["bg", "a", "b"]) == pytest.approx({"bg": 3 / 8, "a": 4 / 8, "b": 1 / 8})
    assert class_shares(labels, ["bg", "a", "b"], keep) == pytest.approx({"bg": 0.5, "a": 0.25, "b": 0.25})
    assert all(v != v for v in class_shares(labels, ["bg", "a", "b"], [k & False for k in keep]).values())


# ---------------------------------------------------------------------------------------------- DPL


def test_dpl_denoising_keeps_pixels_near_their_own_prototype():
    # 2-d features, 1 x 6 pixels; class 0 around (0, 0), class 1 around (10, 0); class 2 has no certain pixel.
    feats = torch.tensor([[0.0, 0.5, 10.0, 9.0, 1.0, 10.0],
                          [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]).view(1, 2, 1, 6)
    labels = torch.tensor([[[0, 0, 1, 1, 1, 2]]])
    certain = torch.tensor([[[True, True, True, True, False, False]]])
    probs = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    sums, weights, rest_sums, rest_weights = prototype_sums(feats, probs, labels, certain)
    assert weights.tolist() == [2.0, 2.0, 0.0]
    prototypes = sums / weights.clamp(min=1e-12)[:, None]
    assert torch.allclose(prototypes[:2].float(), torch.tensor([[0.25, 0.0], [9.5, 0.5]]))
    # DPL's "rest" prototype of class k: certain pixels not labelled k, weighted by 1 - p_k
    assert rest_weights.tolist() == [2.0, 2.0, 4.0]
    rest = rest_sums / rest_weights.clamp(min=1e-12)[:, None]
    assert torch.allclose(rest.float(), torch.tensor([[9.5, 0.5], [0.25, 0.0], [4.875, 0.25]]))
    nearest = prototype_agreement(feats, labels, prototypes, weights > 0)[0, 0].tolist()
    one_vs_rest = prototype_agreement(feats, labels, prototypes, weights > 0, rest)[0, 0].tolist()
    # pixel 4 is labelled 1 but sits at the class-0 prototype: dropped; pixel 5's class has no prototype
    assert nearest == one_vs_rest == [True, True, True, True, False, False]


def test_dpl_one_vs_rest_is_milder_than_nearest_for_an_organ_between_two_others():
    # class 1's pixel at x=4 is nearer class 2's prototype (x=5) than its own (x=0), but nearer its own
    # prototype than the mean of everything else (x~6.7): DPL keeps it, the nearest-prototype rule does not.
    feats = torch.tensor([[0.0, 4.0, 5.0, 15.0]]).view(1, 1, 1, 4)
    labels = torch.tensor([[[1, 1, 2, 0]]])
    prototypes = torch.tensor([[15.0], [0.0], [5.0]], dtype=torch.float64)
    rest = torch.tensor([[2.5], [10.0], [7.5]], dtype=torch.float64)
    has = torch.tensor([True, True, True])
    assert prototype_agreement(feats, labels, prototypes, has)[0, 0].tolist() == [True, False, True, True]
    assert prototype_agreement(feats, labels, prototypes, has, rest)[0, 0].tolist() == [True, True, True, True]


def test_dpl_mc_pseudo_labels_threshold_and_uncertainty():
    mean = torch.tensor([[0.2, 0.8], [0.3, 0.1], [0.5, 0.1]]).view(1, 3, 1, 2)   # (B, K, H, W)
    std = torch.tensor([[0.01, 0.2], [0.01, 0.0], [0.3, 0.0]]).view(1, 3, 1, 2)
    labels, certain = mc_pseudo_labels(mean, std, 0.75, 0.05, "background")
    # pixel 0: class 2 wins with p 0.5 <= 0.75 -> background (its std 0.01: certain); pixel 1: background, std 0.2
    assert labels.tolist() == [[[0, 0]]] and certain.tolist() == [[[True, False]]]
    labels, certain = mc_pseudo_labels(mean, std, 0.75, 0.05, "ignore")
    # ignore: pixel 0 keeps its argmax (class 2) for scoring but is never trained on
    assert labels.tolist() == [[[2, 0]]] and certain.tolist() == [[[False, False]]]
    with pytest.raises(ValueError, match="low_confidence"):
        mc_pseudo_labels(mean, std, 0.75, 0.05, "drop")


@pytest.mark.parametrize("at, layer", [("classifier_input", nn.Dropout), ("decoder_blocks", nn.Dropout2d)])
def test_dpl_mc_dropout_passes_differ_but_eval_passes_do_not(net, at, layer):
    x = torch.rand(2, 3, 24, 24)
    model = with_dropout(net, 0.3, at)
    assert set(model.state_dict()) == set(net.state_dict())
    assert any(type(m) is layer for m in model.modules())
    with torch.no_grad():
        model.eval(), net.eval()
        assert torch.equal(model(x)[1], model(x)[1])
        assert torch.allclose(model(x)[1], net(x)[1])              # dropout off: the source model exactly
        mc_dropout_mode(model)
        assert not any(m.training for m in bn_layers(model))        # BN keeps its running statistics
        assert not torch.equal(model(x)[1], model(x)[1])
        if at == "classifier_input":                                # prototypes use pre-dropout features
            assert torch.equal(model(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="dropout_at"):
        with_dropout(net, 0.3, "encoder")


def test_dpl_pseudo_labels_are_reproducible_and_leave_the_global_rng_alone(tmp_path, net, target):
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    cfg = {"mc_passes": 4, "uncertainty_temperature": 2.0, "uncertainty_threshold": 0.05,
           "foreground_threshold": 0.75, "predict_batch_size": 3}
    model = with_dropout(net, 0.3)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    runs = [denoised_pseudo_labels(model, TargetImages(target), cfg, ctx, torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    (labels, keep, stats), (labels2, keep2, _) = runs
    assert all(np.array_equal(a, b) for a, b in zip(labels + keep, labels2 + keep2))
    assert 0 < stats["certain"] <= 1
    assert sum(k.sum() for k in keep) <= stats["certain"] * sum(k.size for k in keep) + 1e-6
    names = {"background", *ctx.organs}
    assert set(stats["certain_by_class"]) == set(stats["prototype_agrees_by_class"]) == names
    assert sum(v for v in stats["trained_pixel_share"].values() if v == v) == pytest.approx(1.0)


# -------------------------------------------------------------------------------------- pseudo_label


def test_entropy_filter_keeps_the_lowest_entropy_fraction_per_class(tmp_path, target):
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    net = BrightnessSegmenter(width=0.05)                    # soft: every pixel has its own entropy
    percentiles = [50.0, 80.0, 30.0, 90.0, 60.0]
    labels, keep = entropy_filtered_pseudo_labels(net, TargetImages(target), ctx, percentiles=percentiles,
                                                  bins=65536, batch_size=3)
    probs = np.concatenate(predict_target(net, TargetImages(target), ctx, want=("probs",))["probs"])
    entropy = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(axis=1)
    labels, keep = np.concatenate(labels), np.concatenate(keep)
    assert np.array_equal(labels, probs.argmax(axis=1))
    checked = 0
    for k, p in enumerate(percentiles):
        in_k = labels == k
        if in_k.sum() < 20:
            continue
        checked += 1
        kept, dropped = entropy[in_k & keep], entropy[in_k & ~keep]
        share = math.ceil(p / 100 * in_k.sum() - 1e-9)
        assert share <= len(kept) <= share + 0.01 * in_k.sum()        # at least the share; more only by ties
        assert kept.max() <= dropped.min() + math.log(K) / 65536       # ... within one histogram bin
        assert kept.max() < np.percentile(entropy[in_k], p + 2)        # the kept ones are the most confident
    assert checked >= 2


def test_masked_cross_entropy_leaves_ignored_pixels_out():
    torch.manual_seed(0)
    logits = torch.randn(2, K, 4, 4)
    target = torch.randint(0, K, (2, 4, 4))
    target[0, :2] = IGNORE
    kept = target != IGNORE
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[kept], target[kept])
    assert float(masked_cross_entropy(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    assert float(masked_cross_entropy(logits, torch.full_like(target, IGNORE))) == 0.0


# --------------------------------------------------------------------------------------- sam_refine


class ScriptedSam(SamBackend):
    """Returns the given masks in call order and records embeds and boxes."""

    name = "scripted"

    def __init__(self, masks):
        super().__init__({}, torch.device("cpu"))
        self.masks, self.boxes, self.embeds = list(masks), [], 0

    def embed(self, image):
        self.embeds += 1
        return SamEmbedding(torch.zeros(1, 1, 1), image.shape)

    def decode(self, embedding, box):
        self.boxes.append(tuple(box))
        return self.masks.pop(0)


def test_sam_refine_prompts_once_per_present_class_and_merges_like_dfg():
    size = 12
    probs = np.zeros((K, size, size), np.float32)
    probs[0] = 1.0

    def put(c, rows, cols, p):
        probs[:, rows, cols] = (1 - p) / (K - 1)
        probs[c, rows, cols] = p

    put(1, slice(1, 4), slice(1, 4), 0.9)         # present: 9 px > 0.5
    put(2, slice(6, 9), slice(1, 4), 0.9)         # present, but SAM returns nothing -> fallback argmax
    put(3, slice(10, 11), slice(10, 12), 0.9)     # 2 px only: absent -> fallback argmax
    put(4, slice(1, 4), slice(6, 9), 0.9)         # present; its SAM mask overlaps class 1's
    sam1 = np.zeros((size, size), bool)
    sam1[0:5, 0:8] = True
    sam4 = np.zeros((size, size), bool)
    sam4[0:5, 4:10] = True
    sam = ScriptedSam([sam1, np.zeros((size, size), bool), sam4])
    label, outcomes = refine_slice(probs, sam, lambda: sam.embed(np.zeros((size, size))), threshold=0.5,
                                   min_pixels=4, margin=1, use_largest_contour=False)
    assert sam.embeds == 1 and len(sam.boxes) == 3
    assert sam.boxes == [(0, 0, 4, 4), (0, 5, 4, 9), (5, 0, 9, 4)]       # (x0, y0, x1, y1), margin 1
    assert outcomes == {1: "sam", 2: "fallback", 3: "absent", 4: "sam"}
    expected = np.zeros((size, size), np.uint8)
    expected[6:9, 1:4] = 2                        # fallback: the source argmax (score 1 > background 0.5)
    expected[10, 10:12] = 3
    expected[0:5, 4:10] = 4
    expected[0:5, 0:8] = 1                        # SAM masks overlap: the lower class index wins (2 = 2)
    assert np.array_equal(label, expected)

    empty = ScriptedSam([])
    background = np.zeros((K, size, size), np.float32)
    background[0] = 1.0
    label, _ = refine_slice(background, empty, lambda: empty.embed(np.zeros((size, size))), threshold=0.5,
                            min_pixels=4, margin=1, use_largest_contour=False)
    assert empty.embeds == 0 and not empty.boxes and not label.any()   # nothing present: SAM never runs


def test_sam_refine_calls_the_backend_once_per_slice_and_present_class(tmp_path, target):
    ctx, sam = make_context(tmp_path, [c.label for c in target], sam=ThresholdSam())
    model = BrightnessSegmenter()
    # largest_contour: a few noisy pixels of the neighbouring kidney are predicted as the other kidney; a box
    # around all of them would span both kidneys (the failure of Fig. 1b)
    cfg = {"threshold": 0.5, "min_pixels": 200, "largest_contour": True, "box_margin": 3, "reference_size": 256,
           "predict_batch_size": 3}
    raw, refined, stats = sam_pseudo_labels(model, TargetImages(target), cfg, ctx)
    probs = np.concatenate(predict_target(model, TargetImages(target), ctx, want=("probs",))["probs"])
    min_pixels = round(200 * 48 * 48 / 256**2)
    present = int(((probs[:, 1:] > 0.5).sum(axis=(2, 3)) >= min_pixels).sum())
    assert present == 16                          # 4 organs on each of the 4 slices
    assert sam.calls == stats["decoder_calls"] == present
    assert stats["min_pixels"] == min_pixels
    gt = np.concatenate([c.label for c in target])
    refined = np.concatenate(refined)
    assert (refined == gt).mean() > 0.95          # the fake SAM recovers the bright blobs
