"""``dpl``: denoised pseudo-labelling with MC-dropout uncertainty and class prototypes.

Chen, Liu, Jin, Dou, Heng, "Source-Free Domain Adaptive Fundus Image Segmentation with Denoised
Pseudo-Labeling", MICCAI 2021 (code: github.com/cchen-cc/SFDA-DPL).

Offline, with the source model (spec 9; DPL's ``generate_pseudo.py``):

1. **MC dropout**: ``mc_passes`` (10) stochastic forward passes with dropout active. Mean softmax ->
   pseudo-label (argmax; a foreground label whose mean probability is at most ``foreground_threshold`` (0.75)
   becomes background, DPL's binary "p > 0.75" rule per class). Uncertainty = standard deviation over the
   passes of the tempered softmax (logits / ``uncertainty_temperature`` = 2, as released) of the pixel's
   pseudo-class; certain if below ``uncertainty_threshold`` (0.05).
2. **Prototypes**: per class, the mean over certain pixels of that pseudo-class of the (MC-averaged) decoder
   features, weighted by the class's mean probability (DPL's foreground/background centroids).
3. **Denoising**: a pixel keeps its pseudo-label only if it is certain *and* its feature is closer (squared
   Euclidean) to its own class's prototype than to every other prototype; all other pixels are ignored.

Then the model is trained on the denoised pseudo-labels with CE over the kept pixels (DPL: BCE masked the
same way; softmax classes here), the ``dpl_train`` augmentation (brightness/contrast and gamma, p = 0.25 each,
no geometric transform; spec 1.5), Adam lr 2e-3, betas (0.9, 0.99), no weight decay, batch 8, 2 epochs (DPL
released), BN in train mode and dropout active as in DPL's trainer. Fixed budget, last model: DPL's trainer
evaluated on the target test split after each epoch and tracked the best, but saved every epoch.

Choices for the protocol's U-Net and multi-class labels:

- **Where the dropout is.** The protocol's U-Net has no dropout; DPL's DeepLab decoder has (0.5 and 0.1).
  Adaptation builds the same U-Net with ``nn.Dropout2d(dropout)`` after each decoder block
  (``build_segmenter(dropout=...)``, i.e. ``UNet(dropout=...)``) and loads the source weights into it (no
  dropout has weights, so the load is exact and the model without dropout is unchanged in eval mode). The
  rate 0.1 (config ``dropout``): channel dropout in all four decoder blocks of a network trained without
  dropout; larger rates shift the eval-mode BN statistics the later layers expect.
- **BN during MC passes**: eval mode (running statistics), dropout in train mode: the MC passes then differ only
  by their dropout masks. DPL's released script ran the passes with the whole model in train mode, i.e. also
  with batch statistics.
- **Prototypes over the whole split** instead of per batch of 8 as released: they do not depend on which
  slices share a batch. Two passes over target-train (accumulate prototypes, then compare distances); the
  second pass replays the first one's dropout masks (same seed per batch), so the features are identical.
- **Randomness**: dropout masks come from torch's global RNG seeded from the run's generator
  (:func:`sfdabench.self_training.seeded_torch_rng`), so a seed gives the same run.

The Dice of the MC pseudo-labels against the hidden target-train labels is recorded (``mc_mean``) with each
class's kept share after denoising.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.nets import build_segmenter
from sfdabench.nets.unet import UNet
from sfdabench.self_training import (class_keep_rates, new_volumes, seeded_torch_rng, target_batches,
                                     train_on_pseudo_labels, with_ignored)


# ------------------------------------------------------------------------------------------ dropout


def with_dropout(model: nn.Module, rate: float) -> nn.Module:
    """The same U-Net with ``nn.Dropout2d(rate)`` after each decoder block, carrying ``model``'s weights."""
    if not isinstance(model, UNet):
        raise ValueError(f"dpl: MC dropout is implemented for the protocol's U-Net, not {type(model).__name__}")
    arch = {"arch": "unet", "in_channels": model.inc[0].in_channels, "width": model.feature_dim,
            "depth": len(model.downs), "dropout": rate}
    dropout_model = build_segmenter(arch, model.num_classes)
    dropout_model.load_state_dict(model.state_dict())         # strict: the architectures must agree
    return dropout_model.to(next(model.parameters()).device)


def mc_dropout_mode(model: nn.Module) -> nn.Module:
    """Eval mode (BN with running statistics) except the dropout layers, which sample masks."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    return model


@torch.no_grad()
def mc_forward(model: nn.Module, images: torch.Tensor, passes: int, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``passes`` stochastic passes -> (mean softmax (B, K, H, W), std of the tempered softmax (B, K, H, W),
    mean features (B, C, H, W))."""
    probs, tempered, features = [], [], 0
    for _ in range(passes):
        f, logits = model(images)
        probs.append(logits.softmax(1))
        tempered.append((logits / temperature).softmax(1))
        features = features + f
    std = torch.stack(tempered).std(dim=0) if passes > 1 else torch.zeros_like(probs[0])
    return torch.stack(probs).mean(dim=0), std, features / passes


# ------------------------------------------------------------------------------------- pseudo-labels


def mc_pseudo_labels(mean_probs: torch.Tensor, std: torch.Tensor, foreground_threshold: float,
                     uncertainty_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) pseudo-labels and certainty masks from MC statistics (step 1 of the module docstring)."""
    prob, labels = mean_probs.max(dim=1)
    labels = torch.where((labels > 0) & (prob <= foreground_threshold), torch.zeros_like(labels), labels)
    own_std = std.gather(1, labels.unsqueeze(1)).squeeze(1)
    return labels, own_std < uncertainty_threshold


def prototype_sums(features: torch.Tensor, mean_probs: torch.Tensor, labels: torch.Tensor, certain: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class k, sum over certain pixels labelled k of p_k * feature, and of p_k: ((K, C), (K,)) float64."""
    num_classes = mean_probs.shape[1]
    onehot = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(mean_probs)
    weights = (onehot * mean_probs * certain.unsqueeze(1)).double()              # (B, K, H, W)
    sums = torch.einsum("bkhw,bchw->kc", weights, features.double())
    return sums, weights.sum(dim=(0, 2, 3))


def prototype_agreement(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                        has_prototype: torch.Tensor) -> torch.Tensor:
    """True where the nearest prototype (squared Euclidean) is the pixel's own class's. Classes without a
    prototype take no part; their pixels never agree."""
    f, c = features.double(), prototypes.double()
    # |f - c|^2 = |f|^2 - 2 f.c + |c|^2, without a (B, K, C, H, W) intermediate
    distances = ((f ** 2).sum(dim=1, keepdim=True) - 2 * torch.einsum("bchw,kc->bkhw", f, c)
                 + (c ** 2).sum(dim=1)[None, :, None, None])
    distances[:, ~has_prototype] = float("inf")
    return (distances.argmin(dim=1) == labels) & has_prototype[labels]


@torch.no_grad()
def denoised_pseudo_labels(model: nn.Module, target_train: TargetImages, cfg: Mapping, context: Context,
                           generator: torch.Generator) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """DPL's offline phase over target-train: (pseudo-label volumes, keep volumes, statistics)."""
    passes, temperature = int(cfg["mc_passes"]), float(cfg["uncertainty_temperature"])
    fg_threshold, u_threshold = float(cfg["foreground_threshold"]), float(cfg["uncertainty_threshold"])
    batch_size = int(cfg["predict_batch_size"])
    num_batches = -(-len(target_train) // batch_size)
    seeds = torch.randint(0, 2**62, (num_batches,), generator=generator).tolist()
    mc_dropout_mode(model.to(context.device))
    labels, certain_volumes, keep = new_volumes(target_train), new_volumes(target_train, bool), \
        new_volumes(target_train, bool)
    sums, weights = 0, 0
    with seeded_torch_rng(generator, context.device) as reseed:
        for b, (images, cases, slices) in enumerate(target_batches(target_train, batch_size, context, "MC dropout")):
            reseed(seeds[b])
            mean_probs, std, features = mc_forward(model, images, passes, temperature)
            pred, certain = mc_pseudo_labels(mean_probs, std, fg_threshold, u_threshold)
            s, w = prototype_sums(features, mean_probs, pred, certain)
            sums, weights = sums + s, weights + w
            for i, (ci, z) in enumerate(zip(cases, slices)):
                labels[ci][z] = pred[i].cpu().numpy()
                certain_volumes[ci][z] = certain[i].cpu().numpy()
        has_prototype = weights > 0
        prototypes = sums / weights.clamp(min=1e-12)[:, None]
        for b, (images, cases, slices) in enumerate(target_batches(target_train, batch_size, context, "prototypes")):
            reseed(seeds[b])                       # the same dropout masks as in the first pass
            _, _, features = mc_forward(model, images, passes, temperature)
            for i, (ci, z) in enumerate(zip(cases, slices)):
                pred = torch.from_numpy(labels[ci][z].astype(np.int64)).to(context.device)[None]
                agree = prototype_agreement(features[i:i + 1], pred, prototypes, has_prototype)[0]
                keep[ci][z] = agree.cpu().numpy() & certain_volumes[ci][z]
    stats = {"certain": sum(int(v.sum()) for v in certain_volumes) / sum(v.size for v in certain_volumes),
             "classes_with_prototype": int(has_prototype.sum())}
    return labels, keep, stats


class DPL(Method):
    """DPL (Chen et al., MICCAI 2021): MC-dropout + prototype-denoised pseudo-labels, then masked training."""

    name = "dpl"

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        cfg = self.cfg
        model = with_dropout(source_model.to(context.device), float(cfg["dropout"]))
        with context.phase("denoised_pseudo_labels"):
            labels, keep, stats = denoised_pseudo_labels(model, target_train, cfg, context, context.generator(1))
        context.pseudo_label_quality("mc_mean", labels)
        context.record("dpl", {**stats, "kept": class_keep_rates(labels, keep, context.organs)})
        with context.phase("training"), seeded_torch_rng(context.generator(2), context.device):
            losses = train_on_pseudo_labels(model, target_train, with_ignored(labels, keep), cfg["train"], context,
                                            generator=context.generator(3), desc="DPL training")
        context.record("dpl_loss", {"first": losses[0], "last": losses[-1]} if losses else {})
        return model


@hookimpl
def sfdabench_methods():
    return [DPL]
