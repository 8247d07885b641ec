"""Shared training blocks: the protocol's losses and augmentations."""
from __future__ import annotations

import torch

from sfdabench.nets import build_segmenter
from sfdabench.training import Augment, soft_dice_loss, train_supervised


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
