"""SHOT: source hypothesis transfer with information maximisation and clustering-based self-labels.

Liang, Hu, Feng, "Do We Really Need to Access the Source Data? Source Hypothesis Transfer for Unsupervised
Domain Adaptation", ICML 2020.

The source classifier (the hypothesis; here the bias-free 1x1 prototype layer of the U-Net) is frozen and the
feature extractor (encoder, decoder, BatchNorm in train mode) is trained with

    L = ent_w * (mean_i H(p_i) - H(mean_i p_i)) + beta * CE(p, y_hat),   beta = 0.3,

the information-maximisation loss (per-pixel entropy minus the diversity term, the entropy of the batch's mean
prediction; SHOT's epsilon 1e-5 inside the logs) plus cross-entropy on clustering-based pseudo-labels y_hat.
The pseudo-labels are recomputed from the current model (eval mode, unaugmented slices) at the start of every
``pseudo_label_every_epochs`` epochs, as SHOT recomputes them once per epoch:

1. features are extended with a constant 1 and L2-normalised (SHOT's cosine distance);
2. soft centroids c_k = sum_i p_ik f_i / sum_i p_ik; classes that the argmax never predicts get no centroid;
3. each pixel takes the class of the nearest centroid (cosine distance); ``clustering_rounds`` (1, as SHOT)
   times the centroids are recomputed from these hard labels and the pixels relabelled.

SHOT is a classification method; its pixel-level adaptation needs choices the paper does not make:

- **Pixels for the centroids**: the centroids are estimated on at most ``centroid_pixels_per_slice`` pixels
  per target-train slice, drawn uniformly without replacement from the run's seeded generator, so memory is
  bounded (slices x N x (C + 1) floats) whatever the dataset size. A second pass labels *every* pixel of every
  slice by its nearest centroid; the label volumes (uint8) are kept for the epoch's training, and their Dice
  against the hidden target-train labels is recorded as a diagnostic (measurement only).
- **Augmentation**: training batches get the protocol's train augmentations; the geometric ones move the
  pseudo-label with the image (nearest interpolation), as in supervised training.
- **Optimiser**: Adam with the matched protocol's lr 1e-4 and weight decay 5e-4 (as FA, PFA, CL) instead of
  SHOT's SGD (lr 1e-2, backbone x0.1, momentum 0.9, weight decay 1e-3), with SHOT's annealing
  lr = lr0 (1 + 10 p)^-0.75 over the training progress p.
- **Budget**: SHOT's 15 epochs, a fixed budget, last model (``selection = last``); SHOT itself reports the
  last model too.
- **Diversity**: the mean prediction is over all pixels of the batch, and its entropy is pushed towards a
  uniform class distribution. With a background-dominated segmentation that prior is wrong (organs cover a few
  percent of the pixels), which can push pixels into foreground classes; this is SHOT as specified, kept as
  the baseline (``diversity: false`` switches it off; AdaMI replaces it with a class-ratio prior).
- Input: the matched single-slice input of the shared protocol (slice replicated 3x), as every method.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfdabench.api import Case, Context, Method, SliceDataset, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.training import Augment, loader, make_optimizer


def information_maximisation(logits: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-pixel entropy, entropy of the mean prediction) of (B, K, H, W) logits; L_IM = first - second."""
    probs = logits.softmax(dim=1)
    entropy = -(probs * torch.log(probs + eps)).sum(dim=1).mean()
    mean = probs.mean(dim=(0, 2, 3))
    diversity = -(mean * torch.log(mean + eps)).sum()
    return entropy, diversity


def _extend_normalise(features: torch.Tensor, dim: int) -> torch.Tensor:
    """Append a constant 1 along ``dim`` and L2-normalise (SHOT's features for the cosine distance)."""
    shape = list(features.shape)
    shape[dim] = 1
    return F.normalize(torch.cat([features, features.new_ones(shape)], dim=dim), dim=dim)


def cluster_centroids(features: torch.Tensor, probs: torch.Tensor, *, rounds: int = 1, min_count: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """SHOT's clustering on (N, C) features and (N, K) softmax predictions.

    Returns (centroids (L, C + 1), L2-normalised, in the extended feature space; labelset (L,) the classes
    that have a centroid: those the argmax predicts on more than ``min_count`` samples).
    """
    f = _extend_normalise(features, dim=1)
    num_classes = probs.shape[1]
    counts = torch.bincount(probs.argmax(1), minlength=num_classes)
    labelset = (counts > min_count).nonzero().flatten()
    weights = probs
    for _ in range(rounds + 1):
        centroids = weights.T @ f / (1e-8 + weights.sum(0)[:, None])                   # (K, C + 1)
        centroids = F.normalize(centroids[labelset], dim=1)
        labels = labelset[(f @ centroids.T).argmax(1)]
        weights = F.one_hot(labels, num_classes).to(f.dtype)                            # hard, next round
    return centroids, labelset


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor, labelset: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) features -> (B, H, W) class of the nearest centroid (cosine distance)."""
    f = _extend_normalise(features, dim=1)
    return labelset[torch.einsum("bchw,lc->blhw", f, centroids).argmax(1)]


@torch.no_grad()
def clustering_pseudo_labels(model: nn.Module, target_train: TargetImages, cfg: Mapping[str, Any],
                             context: Context, generator: torch.Generator) -> list[np.ndarray]:
    """Pseudo-label volumes (one uint8 (Z, H, W) per case) from SHOT's clustering of the current model."""
    was_training = model.training
    model.eval()
    device = context.device
    data = torch.utils.data.DataLoader(target_train, batch_size=int(cfg["predict_batch_size"]), shuffle=False)
    per_slice = int(cfg["centroid_pixels_per_slice"])
    sampled_features, sampled_probs = [], []
    for batch in data:                                          # pass 1: sampled pixels for the centroids
        features, logits = model(batch["image"].to(device))
        features, probs = features.flatten(2), logits.softmax(1).flatten(2)             # (B, C|K, HW)
        for i in range(features.shape[0]):
            pick = torch.randperm(features.shape[2], generator=generator)[:per_slice].to(device)
            sampled_features.append(features[i][:, pick].T)
            sampled_probs.append(probs[i][:, pick].T)
    centroids, labelset = cluster_centroids(torch.cat(sampled_features), torch.cat(sampled_probs),
                                            rounds=int(cfg["clustering_rounds"]),
                                            min_count=int(cfg["min_class_count"]))
    del sampled_features, sampled_probs
    volumes: dict[int, list[np.ndarray]] = {}
    for batch in data:                                          # pass 2: every pixel, nearest centroid
        features, _ = model(batch["image"].to(device))
        labels = nearest_centroid(features, centroids, labelset).to(torch.uint8).cpu().numpy()
        for i, ci in enumerate(batch["case_index"].tolist()):
            volumes.setdefault(ci, []).append(labels[i])
    model.train(was_training)
    return [np.stack(volumes[ci]) for ci in sorted(volumes)]


class SHOT(Method):
    """SHOT (Liang et al., ICML 2020): frozen source classifier, information maximisation + clustering self-labels."""

    name = "shot"

    def variant(self) -> str:
        parts = ["im" if self.cfg["diversity"] else "ent"]
        if float(self.cfg["cls_weight"]) > 0:
            parts.append("cluster")
        return "+".join(parts)

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        model = source_model.to(context.device).train()
        hypothesis = model.classifier.weight
        hypothesis.requires_grad_(False)                       # the source hypothesis stays fixed
        try:
            self._train(model, target_train, context)
        finally:
            hypothesis.requires_grad_(True)
        return model

    def _train(self, model: nn.Module, target_train: TargetImages, context: Context) -> None:
        cfg, device = self.cfg, context.device
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        data_gen, pixel_gen = context.generator(offset=1), context.generator(offset=2)
        augment = Augment(cfg.get("augment"), data_gen)
        batch_size, epochs = int(cfg["batch_size"]), int(cfg["epochs"])
        cls_weight, ent_weight = float(cfg["cls_weight"]), float(cfg["entropy_weight"])
        every, eps = int(cfg["pseudo_label_every_epochs"]), float(cfg["epsilon"])
        data = loader(target_train, batch_size, data_gen)       # unlabelled; replaced once pseudo-labels exist
        total = epochs * len(data)                              # the dataset size never changes
        base_lr, it, history = float(cfg["lr"]), 0, []
        bar = context.progress(total=total, desc="SHOT")
        for epoch in range(epochs):
            if cls_weight > 0 and epoch % every == 0:
                with context.phase("clustering"):
                    labels = clustering_pseudo_labels(model, target_train, cfg, context, pixel_gen)
                context.pseudo_label_quality(f"clustering_epoch{epoch}", labels)
                cases = [Case(cid, target_train.volume(i), labels[i], target_train.spacings[i])
                         for i, cid in enumerate(target_train.case_ids)]
                data = loader(SliceDataset(cases, labels=True), batch_size, data_gen)
            model.train()
            for batch in data:
                lr = base_lr * (1 + float(cfg["lr_decay_gamma"]) * it / total) ** -float(cfg["lr_decay_power"])
                for group in opt.param_groups:
                    group["lr"] = lr
                label = batch["label"].to(device) if "label" in batch else None
                image, label = augment(batch["image"].to(device), label)
                _, logits = model(image)
                entropy, diversity = information_maximisation(logits, eps)
                loss = ent_weight * (entropy - diversity if cfg["diversity"] else entropy)
                if label is not None:
                    loss = loss + cls_weight * F.cross_entropy(logits, label)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(float(loss.detach()))
                it += 1
                bar.update(1)
        bar.close()
        context.record("shot_loss", {"first": history[0], "last": history[-1]} if history else {})


@hookimpl
def sfdabench_methods():
    return [SHOT]
