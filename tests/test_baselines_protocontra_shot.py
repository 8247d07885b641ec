"""ProtoContra and SHOT: loss-level units and the documented switches, on tiny synthetic data (CPU, seconds).

The registry contract tests (shape, parameters change, determinism) cover both methods' default configs.
"""
from __future__ import annotations

import copy
import math

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import REPO
from helpers_methods import ORGANS, make_context, synthetic_cases
from sfdabench.api import TargetImages
from sfdabench.blocks.losses import bidirectional_transport_loss
from sfdabench.blocks.nets import build_segmenter
from sfdabench_methods.protocontra import (NegativeBank, ProtoContra, contrastive_loss, prototype_feature_alignment,
                                           pseudo_label_ce, reliability_masks, stepped_lr, update_class_prior)
from sfdabench_methods.shot import SHOT, cluster_centroids, information_maximisation, nearest_centroid

K = len(ORGANS) + 1


def method_cfg(name: str, **changes):
    cfg = OmegaConf.load(REPO / "configs" / "method" / f"{name}.yaml")
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def tiny_model(seed: int = 0):
    """An untrained width-4 U-Net: these tests check mechanics, not adaptation quality (no slow source training)."""
    torch.manual_seed(seed)
    return build_segmenter({"width": 4, "depth": 2}, K)


@pytest.fixture(scope="module")
def target():
    return synthetic_cases(1, 5, slices=2)


# ------------------------------------------------------------------------------------------------ PFA


def test_ema_prior_update_is_the_mean_transport_assignment():
    torch.manual_seed(0)
    features, prototypes = torch.randn(2, 3, 4, 4), torch.randn(K, 3)
    logits = torch.einsum("kc,bchw->bkhw", prototypes, features)       # what the bias-free classifier gives
    prior = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])
    _, assignment = bidirectional_transport_loss(features, prototypes, tau=0.1, rho=0.5, log_prior=prior.log())
    updated = update_class_prior(prior, logits, tau=0.1, beta=0.001)
    assert torch.allclose(updated, 0.999 * prior + 0.001 * assignment.mean(1), atol=1e-7)
    assert float(updated.sum()) == pytest.approx(1.0, abs=1e-6)


def test_step_schedules_follow_the_released_counter_or_dfgs():
    # released ProtoContra: the first decay follows iteration 5 (iterations 0-5 at the full rate)
    pfa = [stepped_lr(1.0, 0.8, 1, 5, it) for it in (0, 5, 6, 10, 11)]
    assert pfa == pytest.approx([1.0, 1.0, 0.8, 0.8, 0.64])
    cl = [stepped_lr(1.0, 0.95, 2, 5, it) for it in (0, 6, 11, 16, 21)]
    assert cl == pytest.approx([1.0, 1.0, 0.95, 0.95, 0.9025])
    # DFG's fork steps before iteration 0 as well
    pfa = [stepped_lr(1.0, 0.8, 1, 5, it, "dfg") for it in (0, 4, 5, 10)]
    assert pfa == pytest.approx([0.8, 0.8, 0.64, 0.512])
    with pytest.raises(ValueError, match="lr_counter"):
        stepped_lr(1.0, 0.8, 1, 5, 0, "torch")


@pytest.mark.parametrize("behaviour, classifier_changes", [("intent", False), ("released", True)])
def test_pfa_trains_the_classifier_only_as_released(tmp_path, target, behaviour, classifier_changes):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    cfg = method_cfg("protocontra", **{"pfa.iterations": 2, "pfa.batch_size": 2}).pfa
    losses, prior = prototype_feature_alignment(model, TargetImages(target), cfg, ctx,
                                                freeze_classifier=behaviour == "intent")
    after = model.state_dict()
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert float(prior.sum()) == pytest.approx(1.0, abs=1e-6) and not torch.equal(prior, torch.full((K,), 0.2))
    assert (not torch.equal(before["classifier.weight"], after["classifier.weight"])) == classifier_changes
    assert not torch.equal(before["inc.0.weight"], after["inc.0.weight"])
    assert model.classifier.weight.requires_grad          # trainable again afterwards


# ------------------------------------------------------------------------------------------------- CL


def test_reliability_masks_follow_the_class_percentiles():
    values = torch.arange(100, dtype=torch.float32)
    entropy = torch.stack([values, values, torch.full((100,), 0.01)])[None]          # (1, 3, 100)
    pseudo = torch.tensor([0, 1, 2])[None, :, None].expand(1, 3, 100)
    reliable, unreliable = reliability_masks(entropy, pseudo, 3, alpha=20.0)
    # background: alpha / 4 = 5 -> 85th / 95th percentiles; foreground: 70th / 80th
    assert reliable[0, 0].sum() == 85 and unreliable[0, 0].sum() == 5
    assert reliable[0, 1].sum() == 70 and unreliable[0, 1].sum() == 20
    # summed entropy 1 <= 5: class 2 is neither reliable nor unreliable
    assert not reliable[0, 2].any() and not unreliable[0, 2].any()


def test_negative_bank_is_a_bounded_fifo_of_low_ranked_unreliable_pixels():
    bank = NegativeBank([5, 3], 2, torch.device("cpu"))
    bank.push(1, torch.arange(8.0).view(4, 2))
    bank.push(1, torch.arange(8.0, 16.0).view(4, 2))
    assert torch.equal(bank.queues[1], torch.arange(10.0, 16.0).view(3, 2))          # the newest 3

    # 4 classes, one pixel per ranking; ranks [2, 4): the two least likely classes
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]).T[None, :, :, None]
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]).T[None, :, :, None]  # (1, 2, 3, 1)
    unreliable = torch.tensor([True, True, False])[None, :, None]
    bank = NegativeBank([10] * 4, 2, torch.device("cpu"))
    bank.push_unreliable(features, probs, unreliable, (2, 4))
    assert torch.equal(bank.queues[0], torch.tensor([[0.0, 1.0]]))                   # pixel 1 ranks class 0 last
    assert bank.queues[1].shape[0] == 1 and bank.queues[2].shape[0] == 1
    assert torch.equal(bank.queues[3], torch.tensor([[1.0, 0.0]]))
    assert not any((q == 5.0).any() for q in bank.queues)                           # reliable pixel: never


def _cl_batch(pseudo: torch.Tensor, seed: int = 0):
    """Teacher probabilities confident on ``pseudo``, random features, every pixel reliable, filled banks
    whose features differ per class (so a mis-paired bank changes the loss)."""
    g = torch.Generator().manual_seed(seed)
    probs = F.one_hot(pseudo, K).permute(0, 3, 1, 2).float() * 0.75 + 0.05
    teacher = torch.randn(pseudo.shape[0], 8, *pseudo.shape[1:], generator=g)
    student = (teacher + 0.1 * torch.randn(teacher.shape, generator=g)).requires_grad_(True)
    bank = NegativeBank([100] * K, 8, torch.device("cpu"))
    for k in range(K):
        bank.push(k, torch.randn(50, 8, generator=g) + 3 * F.one_hot(torch.tensor(k), 8))
    return student, teacher, probs, torch.ones_like(pseudo, dtype=torch.bool), bank


def _contrast(student, teacher, probs, reliable, bank, released=False):
    return contrastive_loss(student, teacher, probs, reliable, bank, torch.Generator().manual_seed(1), anchors=16,
                            anchor_min_prob=0.3, negatives=32, temperature=0.1, released=released)


def test_contrastive_loss_is_zero_with_fewer_than_two_valid_classes():
    batch = _cl_batch(torch.zeros(2, 6, 6, dtype=torch.long))
    loss, valid = _contrast(*batch)
    assert valid == 1 and float(loss.detach()) == 0.0
    loss.backward()                                       # still a graph: the optimiser step can run
    assert torch.count_nonzero(batch[0].grad) == 0


def test_contrastive_loss_is_finite_and_positive_with_several_classes():
    pseudo = torch.arange(K).repeat_interleave(8).view(1, 5, 8)
    student, *rest = _cl_batch(pseudo)
    loss, valid = _contrast(student, *rest)
    assert valid == K and math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.count_nonzero(student.grad) > 0


def test_released_pairing_differs_from_intent_only_when_a_class_is_absent():
    all_present = torch.arange(K).repeat_interleave(8).view(1, 5, 8)
    intent, _ = _contrast(*_cl_batch(all_present), released=False)
    released, _ = _contrast(*_cl_batch(all_present), released=True)
    intent, released = intent.detach(), released.detach()
    assert float(intent) == float(released)
    one_absent = all_present.masked_fill(all_present == 2, 3)                      # class 2 missing
    intent, valid = _contrast(*_cl_batch(one_absent), released=False)
    released, _ = _contrast(*_cl_batch(one_absent), released=True)
    intent, released = intent.detach(), released.detach()
    assert valid == K - 1 and math.isfinite(float(released)) and float(intent) != float(released)


def test_pseudo_label_ce_drops_high_entropy_pixels_and_reweights():
    torch.manual_seed(0)
    logits, pseudo = torch.randn(1, 2, 2, 5), torch.tensor([[[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]])
    entropy = torch.arange(10.0).view(1, 2, 5)
    plain = F.cross_entropy(logits, pseudo)
    assert float(pseudo_label_ce(logits, pseudo, entropy, 100.0)) == pytest.approx(float(plain))
    kept = entropy.remainder(5) <= 3.2                     # the 80th percentile of 0..4 is 3.2: drop 4 and 9
    expected = 10 / 8 * F.cross_entropy(logits, pseudo.masked_fill(~kept, -1), ignore_index=-1)
    assert float(pseudo_label_ce(logits, pseudo, entropy, 80.0)) == pytest.approx(float(expected))


def test_protocontra_variants(tmp_path, target):
    small = {"pfa.iterations": 2, "pfa.batch_size": 2, "cl.steps": 1, "cl.batch_size": 2}
    assert ProtoContra(method_cfg("protocontra")).variant() == "intent"
    method = ProtoContra(method_cfg("protocontra", behaviour="released", **{"cl.pseudo_label_ce": True}, **small))
    assert method.variant() == "released+plce"
    ctx, _ = make_context(tmp_path / "a", [c.label for c in target])
    model = method.adapt(tiny_model(), TargetImages(target), ctx)
    assert {"pfa", "cl"} <= set(ctx.diagnostics) and math.isfinite(ctx.diagnostics["cl"]["loss_last"])
    _, logits = model.eval()(torch.rand(1, 3, 48, 48))
    assert logits.shape == (1, K, 48, 48)

    method = ProtoContra(method_cfg("protocontra", stop_after_pfa=True, **small))
    assert method.variant() == "intent+pfa-only"
    ctx, _ = make_context(tmp_path / "b", [c.label for c in target])
    method.adapt(tiny_model(), TargetImages(target), ctx)
    assert "pfa" in ctx.diagnostics and "cl" not in ctx.diagnostics
    with pytest.raises(ValueError, match="behaviour"):
        ProtoContra(method_cfg("protocontra", behaviour="paper")).variant()


# ----------------------------------------------------------------------------------------------- SHOT


def test_information_maximisation_matches_the_formula():
    eps = 1e-5
    probs = torch.tensor([[0.5, 0.9], [0.5, 0.1]])                                # (K=2, 2 pixels)
    logits = probs.log().view(1, 2, 1, 2)
    h = [-sum(p * math.log(p + eps) for p in probs[:, i].tolist()) for i in range(2)]
    mean = [0.7, 0.3]
    # uniform prior: SHOT's diversity -H(mean), shifted by log K
    entropy, diversity = information_maximisation(logits, torch.full((2,), -math.log(2)), eps)
    assert float(entropy) == pytest.approx(sum(h) / 2, rel=1e-5)
    assert float(diversity) == pytest.approx(sum(m * math.log(m + eps) for m in mean) + math.log(2), rel=1e-5)
    # a class-ratio prior: KL(mean || prior), zero when the batch matches it
    prior = torch.tensor([0.7, 0.3])
    _, at_prior = information_maximisation(logits, prior.log(), eps)
    assert float(at_prior) == pytest.approx(0.0, abs=1e-4)
    _, off_prior = information_maximisation(logits, torch.tensor([0.9, 0.1]).log(), eps)
    assert float(off_prior) == pytest.approx(0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1), rel=1e-3)
    _, none = information_maximisation(logits, None, eps)
    assert float(none) == 0.0


def test_shot_diversity_prior_is_the_source_models_mean_prediction(tmp_path, target):
    from sfdabench.blocks.self_training import mean_target_prediction
    from sfdabench_methods.shot import diversity_log_prior
    model = tiny_model()
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    log_prior = diversity_log_prior("source_prediction", model, TargetImages(target), ctx, 4)
    expected = mean_target_prediction(model, TargetImages(target), ctx, 4)
    assert torch.allclose(log_prior.exp(), expected.clamp_min(1e-6), atol=1e-6)
    assert set(ctx.diagnostics["shot_prior"]) == {"background", *ctx.organs}
    assert torch.allclose(diversity_log_prior("uniform", model, TargetImages(target), ctx, 4).exp(),
                          torch.full((ctx.num_classes,), 1 / ctx.num_classes))
    assert diversity_log_prior("none", model, TargetImages(target), ctx, 4) is None
    with pytest.raises(ValueError, match="diversity='flat' unknown"):
        diversity_log_prior("flat", model, TargetImages(target), ctx, 4)


def test_clustering_recovers_separable_clusters():
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(3).repeat(40)                                             # 120 samples, 3 clusters
    features = 5 * F.one_hot(truth, 8).float() + 0.3 * torch.randn(120, 8, generator=g)
    # A poor classifier: 30% of samples argmax the wrong class; class 3 is never predicted.
    wrong = torch.rand(120, generator=g) < 0.3
    predicted = torch.where(wrong, (truth + 1) % 3, truth)
    probs = F.one_hot(predicted, 4).float() * 0.5 + torch.tensor([0.5 / 3] * 3 + [0.0])
    centroids, labelset = cluster_centroids(features, probs, rounds=1)
    assert labelset.tolist() == [0, 1, 2] and centroids.shape == (3, 9)
    labels = nearest_centroid(features.T.reshape(1, 8, 120, 1), centroids, labelset).flatten()
    assert torch.equal(labels, truth)


def test_shot_foreground_scope_keeps_the_models_background(tmp_path, target):
    from sfdabench.blocks.training import predict_target
    from sfdabench_methods.shot import clustering_pseudo_labels
    model = tiny_model(3)
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    images = TargetImages(target)
    argmax = np.concatenate(predict_target(model, images, ctx)["label"])
    cfg = dict(method_cfg("shot", centroid_pixels_per_slice=64))
    labels = {scope: np.concatenate(clustering_pseudo_labels(model, images, {**cfg, "cluster_scope": scope}, ctx,
                                                             torch.Generator().manual_seed(0)))
              for scope in ("all", "foreground")}
    assert (argmax == 0).any() and (argmax > 0).any()
    assert (labels["foreground"][argmax == 0] == 0).all()
    # organ pixels get the same clustering label in both scopes (same generator: same centroids)
    assert np.array_equal(labels["foreground"][argmax > 0], labels["all"][argmax > 0])
    with pytest.raises(ValueError, match="cluster_scope"):
        clustering_pseudo_labels(model, images, {**cfg, "cluster_scope": "organs"}, ctx, torch.Generator())


@pytest.mark.parametrize("cls_weight, diversity, variant", [(0.3, "source_prediction", "im+prior+cluster-fg"),
                                                          (0.0, "uniform", "im"), (0.0, "none", "ent")])
def test_shot_freezes_the_hypothesis_and_trains_the_features(tmp_path, target, cls_weight, diversity, variant):
    method = SHOT(method_cfg("shot", steps=4, pseudo_label_every=2, batch_size=2, cls_weight=cls_weight,
                             diversity=diversity, centroid_pixels_per_slice=64))
    assert method.variant() == variant
    assert SHOT(method_cfg("shot", diversity="uniform", cluster_scope="all")).variant() == "im+cluster"  # SHOT
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    after = method.adapt(model, TargetImages(target), ctx).state_dict()
    assert torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert not torch.equal(before["inc.0.weight"], after["inc.0.weight"])
    assert model.classifier.weight.requires_grad
    stages = set(ctx.diagnostics.get("pseudo_label_dice", {}))
    assert stages == ({"clustering_step0", "clustering_step2"} if cls_weight else set())
    assert math.isfinite(ctx.diagnostics["shot_loss"]["loss"]["last"])
    if cls_weight:
        share = ctx.diagnostics["shot_label_share"]["last"]
        assert set(share) == {"background", *ctx.organs} and sum(share.values()) == pytest.approx(1.0)
