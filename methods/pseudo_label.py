"""``pseudo_label``: self-training on entropy-filtered pseudo-labels of the source model.

The classic pseudo-label baseline (Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning
Method for Deep Neural Networks", ICML workshop 2013), with the per-class entropy filter of U2PL (Wang et al.,
"Semi-Supervised Semantic Segmentation Using Unreliable Pseudo-Labels", CVPR 2022) that DFG's code
(``PseudoLabel_Loss``) and ProtoContra's use:

1. the source model (eval mode, no augmentation) labels every target-train pixel with its argmax;
2. per pseudo-class k, the pixels whose prediction entropy is above the ``percentile``-th percentile of the
   entropies of all target-train pixels labelled k are dropped (``percentile: 80`` keeps each class's 80% most
   confident pixels; a list gives one value per class, background first). Per class, so that the small,
   less confident organs are not dropped wholesale by a threshold set by the background;
3. the source model is trained with cross-entropy on the kept pixels (dropped ones are ignored), protocol
   train augmentations, for a fixed budget in optimiser steps; the last model is returned.

The pseudo-labels are computed once (offline), like DFG's and DPL's. The percentiles are over the whole
split, computed in two passes with a per-class histogram of entropies (``entropy_bins`` bins over
[0, log K]) so memory does not grow with the dataset; a pixel is kept if its bin is at or below the
percentile's bin, so each class keeps at least its share (more only by ties within one bin, < 1e-4 nats wide).
Retraining recipe: DFG's retraining (configs/recipe/dfg_retrain.yaml: Adam 1e-4, wd 5e-4, batch 8, 700 steps,
lr x0.8 every 35) with CE instead of its Dice, so pseudo_label and DFG differ in their pseudo-labels and loss
only. (Until the step budgets it counted 30 epochs of its own: 210 steps, ~5x less training than DFG's.)
The pseudo-labels' Dice against the hidden target-train labels is recorded (``source_model``) with each
class's kept share.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.blocks.self_training import (class_keep_rates, new_volumes, softmax_entropy, target_batches,
                                     train_on_pseudo_labels, with_ignored)


def entropy_bin(entropy: torch.Tensor, num_classes: int, bins: int) -> torch.Tensor:
    """Histogram bin of each entropy value, ``bins`` equal bins over [0, log K]."""
    scaled = entropy / math.log(num_classes) * bins
    return scaled.floor().long().clamp(0, bins - 1)


def class_histograms(labels: torch.Tensor, bin_index: torch.Tensor, num_classes: int, bins: int) -> torch.Tensor:
    """(K, bins) counts of the entropy bins per pseudo-class."""
    flat = labels.flatten().long() * bins + bin_index.flatten()
    return torch.bincount(flat, minlength=num_classes * bins).view(num_classes, bins)


def percentile_bins(histograms: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """(K,) per class the first bin at which the cumulative count reaches ``percentile`` % of the class."""
    cumulative = histograms.cumsum(dim=1).double()
    total = cumulative[:, -1:]
    need = total * torch.tensor([float(p) / 100 for p in percentiles], dtype=torch.float64)[:, None]
    return (cumulative < need).sum(dim=1)        # bins before the one that reaches the share


def keep_mask(labels: torch.Tensor, bin_index: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """True where a pixel's entropy bin is at or below its pseudo-class's percentile bin."""
    return bin_index <= thresholds.to(labels.device)[labels.long()]


def percentile_list(value: Any, num_classes: int) -> list[float]:
    values = [float(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) \
        else [float(value)] * num_classes
    if len(values) != num_classes or not all(0 <= v <= 100 for v in values):
        raise ValueError(f"pseudo_label: percentile must be a number in [0, 100] or {num_classes} of them "
                         f"(background first), got {value!r}")
    return values


@torch.no_grad()
def entropy_filtered_pseudo_labels(model: nn.Module, target_train: TargetImages, context: Context, *,
                                   percentiles: Sequence[float], bins: int, batch_size: int
                                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(argmax pseudo-label volumes, bool keep volumes) of ``model`` over target-train."""
    was_training = model.training
    model.eval().to(context.device)
    k = context.num_classes
    labels = new_volumes(target_train)
    keep = new_volumes(target_train, dtype=bool)
    histograms = torch.zeros(k, bins, dtype=torch.long)

    def predict(desc):
        for images, cases, slices in target_batches(target_train, batch_size, context, desc):
            _, logits = model(images)
            yield cases, slices, logits.argmax(1), entropy_bin(softmax_entropy(logits), k, bins)

    for cases, slices, pred, bin_index in predict("pseudo-labels"):          # pass 1: labels, histograms
        histograms += class_histograms(pred, bin_index, k, bins).cpu()
        for i, (ci, z) in enumerate(zip(cases, slices)):
            labels[ci][z] = pred[i].cpu().numpy()
    thresholds = percentile_bins(histograms, percentiles)
    for cases, slices, pred, bin_index in predict("entropy filter"):          # pass 2: the same, filtered
        kept = keep_mask(pred, bin_index, thresholds).cpu().numpy()
        for i, (ci, z) in enumerate(zip(cases, slices)):
            keep[ci][z] = kept[i]
    model.train(was_training)
    return labels, keep


class PseudoLabel(Method):
    """Self-training with CE on the source model's pseudo-labels, per-class entropy-percentile filtered."""

    name = "pseudo_label"
    stage_labels = {"source_model": "PL of the source model"}

    def variant(self) -> str:
        p = self.cfg["percentile"]
        return f"p{p:g}" if isinstance(p, (int, float)) else "p" + "-".join(f"{float(v):g}" for v in p)

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        cfg = self.cfg
        percentiles = percentile_list(cfg["percentile"], context.num_classes)
        with context.phase("pseudo_labels"):
            labels, keep = entropy_filtered_pseudo_labels(source_model, target_train, context,
                                                          percentiles=percentiles, bins=int(cfg["entropy_bins"]),
                                                          batch_size=int(cfg["predict_batch_size"]))
        context.pseudo_label_quality("source_model", labels)
        context.record("pseudo_label_kept", class_keep_rates(labels, keep, context.organs))
        with context.phase("self_training"):
            losses = train_on_pseudo_labels(source_model, target_train, with_ignored(labels, keep), cfg["train"],
                                            context, generator=context.generator(1), desc="pseudo-label training")
        context.record("pseudo_label_loss", {"first": losses[0], "last": losses[-1]} if losses else {})
        return source_model


@hookimpl
def sfdabench_methods():
    return [PseudoLabel]
