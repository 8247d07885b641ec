"""DFG phase 1, feature aggregation (FA, spec section 3).

Target features are pulled towards the frozen source classifier weights (the class prototypes) with the
bi-directional conditional-transport loss (tau = 1, rho = 0.5, uniform prior). This partially adapts the
model and makes target features cluster per class, which the affinity-guided box search relies on.

Schedule (spec 3.2): Adam, StepLR x``lr_gamma`` every ``lr_step_every`` iterations, the first step taken at
iteration 0 as in the released trainer (it steps at each evaluation, including the one before training).
DFG picked its FA checkpoint by target *test* Dice (iteration 160); sfdabench trains a fixed number of
iterations and keeps the last model (``selection = last``). With lr x0.8 every 5 iterations the rate is
below 1% of its start after 100 iterations, so the default budget keeps the effective schedule.

Class prior (``prior``): ``uniform`` (the paper, pi_k = 1/K) or ``source_prediction`` (not in the paper): the
source model's mean softmax over every target-train pixel, computed once before FA (eval mode, no labels).
With the uniform prior the prototype->target term weighs a small organ as much as the background.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from sfdabench.api import Context, TargetImages
from sfdabench.blocks.losses import bidirectional_transport_loss
from sfdabench.blocks.self_training import mean_target_prediction
from sfdabench.blocks.training import Augment, forever, loader, make_optimizer


def feature_aggregation(model: nn.Module, target_train: TargetImages, cfg: Mapping[str, Any],
                        context: Context) -> list[float]:
    """Train ``model`` in place with the FA loss; returns the loss per iteration."""
    model.to(context.device).train()
    prototypes = model.classifier.weight                      # (K, C, 1, 1), bias-free
    prototypes.requires_grad_(False)                          # truly frozen (unlike ProtoContra as released)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    generator = context.generator(offset=1)
    augment = Augment(cfg.get("augment"), generator)
    batches = forever(loader(target_train, int(cfg["batch_size"]), generator))
    num_classes = prototypes.shape[0]
    log_prior = class_log_prior(model, target_train, cfg, context, num_classes)
    tau, rho, every = float(cfg["tau"]), float(cfg["rho"]), int(cfg["lr_step_every"])
    base_lr, gamma = float(cfg["lr"]), float(cfg["lr_gamma"])
    losses = []
    for it in context.progress(range(int(cfg["iterations"])), desc="feature aggregation"):
        for group in opt.param_groups:  # StepLR(1, gamma) stepped at iterations 0, every, 2*every, ...
            group["lr"] = base_lr * gamma ** (it // every + 1)
        image, _ = augment(next(batches)["image"].to(context.device))
        features, _ = model(image)
        loss, _ = bidirectional_transport_loss(features, prototypes.flatten(1), tau=tau, rho=rho,
                                               log_prior=log_prior)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    prototypes.requires_grad_(True)                           # the retraining phase trains the classifier
    return losses


PRIORS = ("uniform", "source_prediction")


@torch.no_grad()
def class_log_prior(model: nn.Module, target_train: TargetImages, cfg: Mapping[str, Any], context: Context,
                    num_classes: int) -> torch.Tensor:
    """log pi (K,) of the transport loss: uniform, or the model's mean softmax over the target-train pixels."""
    prior = str(cfg.get("prior", "uniform"))
    if prior not in PRIORS:
        raise ValueError(f"fa.prior={prior!r} unknown; use one of {', '.join(PRIORS)}")
    if prior == "uniform":
        return torch.full((num_classes,), -math.log(num_classes), device=context.device)
    mean = mean_target_prediction(model, target_train, context, batch_size=16, desc="FA prior")
    # a class the model never predicts keeps a small mass, so log pi stays finite
    return mean.clamp_min(1e-6).log().to(context.device)
