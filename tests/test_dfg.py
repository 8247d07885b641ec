"""DFG phases on tiny synthetic volumes with a fake, box-sensitive SAM backend (fast, no weights)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from helpers_methods import ORGANS, dfg_cfg, make_context, synthetic_cases
from sfdabench.api import TargetImages
from sfdabench.blocks.losses import bidirectional_transport_loss
from sfdabench_methods.dfg.feature_aggregation import feature_aggregation
from sfdabench_methods.dfg.method import DFG

def test_transport_loss_matches_the_formula():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 4, 4)
    protos = torch.randn(5, 3)
    log_prior = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2]))
    tau, rho = 0.5, 0.3
    loss, _ = bidirectional_transport_loss(feats, protos, tau=tau, rho=rho, log_prior=log_prior)
    f = feats.permute(0, 2, 3, 1).reshape(-1, 3)
    n = f.shape[0]
    t2p, p2t = 0.0, 0.0
    s = [[float(protos[k] @ f[i]) for i in range(n)] for k in range(5)]
    d = [[1 - float(torch.nn.functional.cosine_similarity(protos[k], f[i], dim=0)) for i in range(n)]
         for k in range(5)]
    prior = log_prior.exp().tolist()
    for i in range(n):
        z = [math.exp(s[k][i] / tau) * prior[k] for k in range(5)]
        t2p += sum(d[k][i] * z[k] / sum(z) for k in range(5)) / n
    for k in range(5):
        z = [math.exp(s[k][i] / tau) for i in range(n)]
        p2t += prior[k] * sum(d[k][i] * z[i] / sum(z) for i in range(n))
    assert float(loss) == pytest.approx(rho * t2p + (1 - rho) * p2t, rel=1e-5)


def test_fa_freezes_the_classifier_and_trains_the_rest(tmp_path, source_model):
    model = copy.deepcopy(source_model)
    before = copy.deepcopy(model.state_dict())
    target = synthetic_cases(2, 5)
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    fa_cfg = dfg_cfg().fa
    losses = feature_aggregation(model, TargetImages(target), fa_cfg, ctx)
    assert len(losses) == fa_cfg.iterations == 2 and all(np.isfinite(losses))
    after = model.state_dict()
    assert torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert not torch.equal(before["inc.0.weight"], after["inc.0.weight"])
    assert model.classifier.weight.requires_grad  # unfrozen again for retraining


@pytest.mark.parametrize("changes, variant", [
    ({}, "fa+dbs+cp"),
    ({"search.search": "naive"}, "fa+naive+cp"),
    ({"search.search": "tbs", "cp": False}, "fa+tbs+nocp"),
    ({"search.search": "mbs", "search.stage3": False}, "fa+mbs+nos3+cp"),
    ({"fa.enabled": False}, "nofa+dbs+cp"),
    ({"stop_after_fa": True}, "fa-only"),
])
def test_ablation_switches_run_and_name_their_variant(tmp_path, source_model, changes, variant):
    target = synthetic_cases(2, 7)
    ctx, sam = make_context(tmp_path, [c.label for c in target])
    method = DFG(dfg_cfg(**changes))
    assert method.variant() == variant
    model = method.adapt(copy.deepcopy(source_model), TargetImages(target), ctx)
    _, logits = model.eval()(torch.rand(1, 3, 48, 48))
    assert logits.shape == (1, 5, 48, 48)
    quality = ctx.diagnostics.get("pseudo_label_dice", {})
    if changes.get("stop_after_fa"):
        assert sam.calls == 0 and not method.uses_sam
        assert set(quality) == {"source_model", "target_model"}         # what FA did, measured
    else:
        assert sam.calls > 0
        stages = {"target_model", "sam"} | ({"cp"} if changes.get("cp", True) else set())
        # the source model's labels are scored before FA changes them (nothing to compare without FA)
        assert set(quality) == stages | ({"source_model"} if changes.get("fa.enabled", True) else set())
        assert ctx.diagnostics["box_search"]["slices"] == 6
        # per search outcome, the prediction the search started from and SAM's labels on the same slices
        by_group = ctx.diagnostics["pseudo_label_by_group"]
        assert set(by_group) == {"target_model", "sam"}
        for organ in ORGANS:
            outcomes = ctx.diagnostics["box_search"]["outcomes"][organ]
            assert {g: v["slices"] for g, v in by_group["sam"][organ].items()} == outcomes
            assert by_group["target_model"][organ].keys() == by_group["sam"][organ].keys()


def test_figures_are_written(tmp_path, source_model):
    target = synthetic_cases(1, 9)
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    DFG(dfg_cfg(**{"figures": 2, "fa.enabled": False})).adapt(copy.deepcopy(source_model), TargetImages(target), ctx)
    pngs = list((tmp_path / "run" / "figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_ground_truth_never_changes_a_decision(tmp_path, source_model):
    """Pseudo-labels and the adapted model are identical whatever the (hidden) target-train labels are."""
    target = synthetic_cases(2, 11)
    true_labels = [c.label for c in target]
    fake_labels = [np.random.default_rng(1).integers(0, 5, c.label.shape).astype(np.uint8) for c in target]
    models, diagnostics = [], []
    for labels in (true_labels, fake_labels):
        ctx, _ = make_context(tmp_path / str(len(models)), labels, images=[c.image for c in target])
        torch.manual_seed(0)
        models.append(DFG(dfg_cfg()).adapt(copy.deepcopy(source_model), TargetImages(target), ctx).state_dict())
        diagnostics.append(ctx.diagnostics["pseudo_label_dice"])
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key
    assert diagnostics[0]["sam"]["mean"] != diagnostics[1]["sam"]["mean"]  # the measurement did see them
    assert diagnostics[0]["gt_box_ceiling"]["mean"] != diagnostics[1]["gt_box_ceiling"]["mean"]


def test_source_free_methods_cannot_read_target_labels(tmp_path):
    ctx, _ = make_context(tmp_path, [np.zeros((1, 4, 4), np.uint8)])
    with pytest.raises(Exception, match="not available to source-free methods"):
        ctx.target_train_labels()


def test_fa_prior_is_uniform_or_the_source_models_mean_prediction(tmp_path, source_model):
    from sfdabench_methods.dfg.feature_aggregation import class_log_prior

    target = synthetic_cases(2, 13)
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    images = TargetImages(target)
    uniform = class_log_prior(source_model, images, {}, ctx, 5)
    assert torch.allclose(uniform, torch.full((5,), -math.log(5)))
    model = copy.deepcopy(source_model).train()
    prior = class_log_prior(model, images, {"prior": "source_prediction"}, ctx, 5)
    assert model.training                                           # mode restored
    with torch.no_grad():
        x = torch.cat([images[i]["image"][None] for i in range(len(images))])
        expected = model.eval()(x)[1].softmax(1).double().mean(dim=(0, 2, 3)).clamp_min(1e-6).log().float()
    assert torch.allclose(prior, expected, atol=1e-5)
    assert prior.exp().sum().item() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="fa.prior='flat' unknown; use one of uniform, source_prediction"):
        class_log_prior(model, images, {"prior": "flat"}, ctx, 5)
