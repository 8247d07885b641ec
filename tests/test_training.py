"""Shared training blocks: the protocol's losses and augmentations."""
from __future__ import annotations

import torch

from sfdabench.blocks.nets import build_segmenter
from sfdabench.blocks.losses import soft_dice_loss
from sfdabench.blocks.training import Augment, train_supervised


def test_soft_dice_is_zero_for_perfect_and_high_for_wrong_predictions():
    target = torch.randint(0, 5, (2, 16, 16))
    perfect = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, target) < 1e-3
    wrong = torch.nn.functional.one_hot((target + 1) % 5, 5).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(wrong, target) > 0.9


def test_augment_is_seeded_and_keeps_labels_valid():
    img = torch.rand(8, 3, 32, 32)
    lab = torch.randint(0, 5, (8, 32, 32))
    a1 = Augment({"p": 1.0}, torch.Generator().manual_seed(3))(img, lab)
    a2 = Augment({"p": 1.0}, torch.Generator().manual_seed(3))(img, lab)
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])
    assert not torch.equal(a1[0], img)
    assert set(a1[1].unique().tolist()) <= set(range(5))
    assert a1[0].min() >= 0 and a1[0].max() <= 1
    off = Augment({"enabled": False}, torch.Generator())(img, lab)
    assert off[0] is img


def test_train_supervised_learns_a_trivial_task():
    torch.manual_seed(0)
    n = 16
    images = torch.zeros(n, 3, 32, 32)
    labels = torch.zeros(n, 32, 32, dtype=torch.long)
    images[:, :, 8:24, 8:24] = 1.0
    labels[:, 8:24, 8:24] = 1
    data = [{"image": images[i], "label": labels[i]} for i in range(n)]
    model = build_segmenter({"width": 4, "depth": 2}, 2)
    cfg = {"epochs": 8, "batch_size": 8, "lr": 1e-2, "loss": "ce+dice", "augment": {"enabled": False}}
    losses = train_supervised(model, data, cfg, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert losses[-1] < losses[0] * 0.7


def _tiny_data(n=12):
    g = torch.Generator().manual_seed(5)
    images = torch.rand(n, 3, 16, 16, generator=g)
    labels = (images[:, 0] > 0.5).long()
    return [{"image": images[i], "label": labels[i]} for i in range(n)]


def _train(cfg):
    torch.manual_seed(0)
    model = build_segmenter({"width": 4, "depth": 2}, 2)
    losses = train_supervised(model, _tiny_data(), {"batch_size": 4, "lr": 1e-3, "augment": {"p": 0.5}, **cfg},
                              device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    return losses, model.state_dict()


def test_step_budget_equals_the_epoch_budget_it_spells_out():
    """12 slices at batch 4 = 3 steps an epoch: 5 epochs with lr x0.5 every 2 epochs is 15 steps with lr x0.5
    every 6 steps. Both budgets must train bit-identically."""
    by_epoch, sd_epoch = _train({"epochs": 5, "lr_step_epochs": 2, "lr_gamma": 0.5})
    _, sd_steps = _train({"steps": 15, "lr_step_every": 6, "lr_gamma": 0.5})
    assert len(by_epoch) == 5
    assert all(torch.equal(sd_epoch[k], sd_steps[k]) for k in sd_epoch)


def test_step_budget_does_not_shrink_with_the_dataset():
    """A step budget runs that many optimiser steps whatever the epoch length: 10 steps on 12 slices at
    batch 4 pass the data 3.3 times; the loss history has one entry per pass (3) plus the rest (1)."""
    losses, sd10 = _train({"steps": 10, "lr_step_every": 5, "lr_gamma": 0.8})
    assert len(losses) == 4
    _, sd9 = _train({"steps": 9, "lr_step_every": 5, "lr_gamma": 0.8})
    assert not all(torch.equal(sd10[k], sd9[k]) for k in sd10)   # the 10th step happened


def test_pseudo_label_training_shares_the_step_budget():
    """Self-training (SAM refinement, box ceiling, pseudo-labelling) runs through the same loop: its step
    budget equals the epoch budget it spells out."""
    import numpy as np

    from sfdabench.api import Case, Context, TargetImages
    from sfdabench.blocks.self_training import train_on_pseudo_labels

    rng = np.random.default_rng(0)
    cases = [Case(str(i), rng.random((4, 16, 16), dtype=np.float32), None, (1.0, 1.0, 1.0)) for i in range(3)]
    labels = [(rng.random((4, 16, 16)) * 3).astype(np.uint8) for _ in range(3)]   # 12 slices: 3 steps an epoch
    states = []
    for budget in ({"epochs": 5, "lr_step_epochs": 2}, {"steps": 15, "lr_step_every": 6}):
        torch.manual_seed(0)
        model = build_segmenter({"width": 4, "depth": 2}, 3)
        ctx = Context(device=torch.device("cpu"), seed=0, cache_dir="unused", run_dir="unused", organs=["a", "b"],
                      progress=False)
        train_on_pseudo_labels(model, TargetImages(cases), labels,
                               {"batch_size": 4, "lr": 1e-3, "lr_gamma": 0.5, "loss": "dice", **budget}, ctx,
                               generator=torch.Generator().manual_seed(1))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
