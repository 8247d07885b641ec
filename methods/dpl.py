"""``dpl``: denoised pseudo-labelling with MC-dropout uncertainty and class prototypes.

Chen, Liu, Jin, Dou, Heng, "Source-Free Domain Adaptive Fundus Image Segmentation with Denoised
Pseudo-Labeling", MICCAI 2021 (code: github.com/cchen-cc/SFDA-DPL).

Offline, with the source model (spec 9; DPL's ``generate_pseudo.py``):

1. **MC dropout**: ``mc_passes`` (10) stochastic forward passes with dropout active. Mean softmax ->
   pseudo-label (argmax). A foreground label whose mean probability is at most ``foreground_threshold`` (0.75)
   is left out of the loss (DPL's per-channel "p > 0.75" rule says "not this organ"; ``low_confidence:
   background`` relabels it background instead). Uncertainty = standard deviation over the passes of the
   tempered softmax (logits / ``uncertainty_temperature`` = 2, as released) of the pixel's pseudo-class;
   certain if below ``uncertainty_threshold`` (0.05).
2. **Prototypes**: per class k, over certain pixels, the p_k-weighted mean decoder feature of the pixels
   labelled k, and the (1 - p_k)-weighted mean of the pixels not labelled k (DPL's object and background
   centroids of each channel).
3. **Denoising**: a pixel keeps its pseudo-label y only if it is certain *and* its feature is closer (squared
   Euclidean) to y's prototype than to y's "rest" prototype (``prototype_test: one_vs_rest``, DPL);
   ``nearest`` asks instead that y's prototype be the nearest of all class prototypes, which is stricter for
   an organ lying between two others in feature space. All other pixels are ignored.

Then the model is trained on the denoised pseudo-labels with CE over the kept pixels (DPL: BCE masked the
same way; softmax classes here), the ``dpl_train`` augmentation (brightness/contrast and gamma, p = 0.25 each,
no geometric transform; spec 1.5), Adam lr 2e-3, betas (0.9, 0.99), no weight decay, batch 8, constant rate,
BN in train mode and dropout active as in DPL's trainer. Fixed budget, last model: DPL's trainer evaluated on
the target test split after each epoch and tracked the best, but saved every epoch.

**Budget**, in optimiser steps: DPL's 2 epochs counted over the paper protocol's target-train (~1404 slices
at batch 8: 350 steps), the convention of every sfdabench baseline (configs/method/dpl.yaml). On DPL's own
50-image fundus target the same 2 epochs were 14 steps; counting our 59-slice phantom's epochs would also give
14, so the scaling is stated in the config.

Choices for the protocol's U-Net and multi-class labels:

- **Where the dropout is.** The protocol's U-Net has no dropout; DPL's classifier input has an element-wise
  ``Dropout(0.1)``. Adaptation builds the same U-Net with that dropout (``UNet(classifier_dropout=0.1)``) and
  loads the source weights into it (dropout has no weights, so the load is exact and the model is unchanged in
  eval mode). The features the prototypes use are taken before it, as DPL's ``feature_last``.
  ``dropout_at: decoder_blocks`` puts ``Dropout2d`` after each of the four decoder blocks instead (our former
  placement): in a network trained without dropout it made 71% of the phantom's pixels "uncertain" and left
  under 4% of any organ's pixels for training, so the model learnt background (mean Dice 0.17 on
  phantom_mri2ct, seed 0).
- **BN during MC passes** (``mc_batchnorm``): DPL's released script ran the passes with the whole model in
  train mode, i.e. on the target batch's statistics. ``target`` (default) re-estimates the BN statistics over
  target-train once (AdaBN) and runs the passes with them, so no pass depends on which slices share a batch;
  ``source`` keeps the source statistics (our former setting).
- **Prototypes over the whole split** instead of per batch of 8 as released: they do not depend on which
  slices share a batch. Two passes over target-train (accumulate prototypes, then compare distances); the
  second pass replays the first one's dropout masks (same seed per batch), so the features are identical.
- **Randomness**: dropout masks come from torch's global RNG seeded from the run's generator
  (:func:`sfdabench.blocks.self_training.seeded_torch_rng`), so a seed gives the same run.

Diagnostics: the Dice of the MC pseudo-labels against the hidden target-train labels (``mc_mean``), and per
pseudo-class the share that is certain, the share that agrees with its prototype, the share kept, and the
class balance of the trained pixels (``dpl.trained_pixel_share``): a starved organ shows before it collapses.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.blocks.nets import build_segmenter
from sfdabench.blocks.nets.unet import UNet
from sfdabench.blocks.self_training import (class_keep_rates, class_shares, new_volumes, reestimate_bn_statistics,
                                     seeded_torch_rng, target_batches, train_on_pseudo_labels, with_ignored)

PROTOTYPE_TESTS = ("one_vs_rest", "nearest")


# ------------------------------------------------------------------------------------------ dropout


DROPOUT_AT = ("classifier_input", "decoder_blocks")


def with_dropout(model: nn.Module, rate: float, at: str = "classifier_input") -> nn.Module:
    """The same U-Net with dropout, carrying ``model``'s weights: element-wise ``nn.Dropout(rate)`` on the
    classifier input (``classifier_input``, DPL's placement) or ``nn.Dropout2d(rate)`` after each decoder block
    (``decoder_blocks``)."""
    if not isinstance(model, UNet):
        raise ValueError(f"dpl: MC dropout is implemented for the protocol's U-Net, not {type(model).__name__}")
    if at not in DROPOUT_AT:
        raise ValueError(f"dpl: dropout_at={at!r} unknown; use one of {', '.join(DROPOUT_AT)}")
    arch = {"arch": "unet", "in_channels": model.inc[0].in_channels, "width": model.feature_dim,
            "depth": len(model.downs), ("classifier_dropout" if at == "classifier_input" else "dropout"): rate}
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
                     uncertainty_threshold: float, low_confidence: str = "ignore"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) pseudo-labels and certainty masks from MC statistics (step 1 of the module docstring).

    A foreground argmax with mean probability <= ``foreground_threshold`` is left out (``ignore``: never
    certain, its label stays the argmax) or becomes background (``background``)."""
    prob, labels = mean_probs.max(dim=1)
    unsure = (labels > 0) & (prob <= foreground_threshold)
    if low_confidence == "background":
        labels = torch.where(unsure, torch.zeros_like(labels), labels)
    elif low_confidence != "ignore":
        raise ValueError(f"dpl: low_confidence={low_confidence!r} unknown; use ignore or background")
    own_std = std.gather(1, labels.unsqueeze(1)).squeeze(1)
    certain = own_std < uncertainty_threshold
    return labels, certain & ~unsure if low_confidence == "ignore" else certain


def prototype_sums(features: torch.Tensor, mean_probs: torch.Tensor, labels: torch.Tensor, certain: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class k, over the certain pixels: the sums of p_k * feature and of p_k over pixels labelled k (the
    class prototype), and of (1 - p_k) * feature and of (1 - p_k) over pixels not labelled k (DPL's "rest"
    prototype of k). ((K, C), (K,), (K, C), (K,)), float64."""
    num_classes = mean_probs.shape[1]
    onehot = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(mean_probs)
    mask = certain.unsqueeze(1).to(mean_probs)
    own = (onehot * mean_probs * mask).double()                                   # (B, K, H, W)
    rest = ((1 - onehot) * (1 - mean_probs) * mask).double()
    f = features.double()
    return (torch.einsum("bkhw,bchw->kc", own, f), own.sum(dim=(0, 2, 3)),
            torch.einsum("bkhw,bchw->kc", rest, f), rest.sum(dim=(0, 2, 3)))


def _squared_distances(features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) features, (K, C) centres -> (B, K, H, W) squared Euclidean distances, without a
    (B, K, C, H, W) intermediate."""
    f, c = features.double(), centres.double()
    return ((f ** 2).sum(dim=1, keepdim=True) - 2 * torch.einsum("bchw,kc->bkhw", f, c)
            + (c ** 2).sum(dim=1)[None, :, None, None])


def prototype_agreement(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                        has_prototype: torch.Tensor, rest: torch.Tensor | None = None) -> torch.Tensor:
    """True where the pixel's feature sides with its own class's prototype.

    ``rest`` given (DPL, one-vs-rest): closer to its class's prototype than to that class's "rest" prototype.
    ``rest`` None (``nearest``): the nearest of all class prototypes is its own. Classes without a prototype
    take no part; their pixels never agree."""
    own = _squared_distances(features, prototypes)
    if rest is not None:
        to_own = own.gather(1, labels.unsqueeze(1)).squeeze(1)
        to_rest = _squared_distances(features, rest).gather(1, labels.unsqueeze(1)).squeeze(1)
        return (to_own < to_rest) & has_prototype[labels]
    own[:, ~has_prototype] = float("inf")
    return (own.argmin(dim=1) == labels) & has_prototype[labels]


@torch.no_grad()
def denoised_pseudo_labels(model: nn.Module, target_train: TargetImages, cfg: Mapping, context: Context,
                           generator: torch.Generator) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """DPL's offline phase over target-train: (pseudo-label volumes, keep volumes, statistics)."""
    passes, temperature = int(cfg["mc_passes"]), float(cfg["uncertainty_temperature"])
    fg_threshold, u_threshold = float(cfg["foreground_threshold"]), float(cfg["uncertainty_threshold"])
    batch_size = int(cfg["predict_batch_size"])
    num_batches = -(-len(target_train) // batch_size)
    seeds = torch.randint(0, 2**62, (num_batches,), generator=generator).tolist()
    low_confidence, test = str(cfg.get("low_confidence", "ignore")), str(cfg.get("prototype_test", "one_vs_rest"))
    if test not in PROTOTYPE_TESTS:
        raise ValueError(f"dpl: prototype_test={test!r} unknown; use one of {', '.join(PROTOTYPE_TESTS)}")
    mc_dropout_mode(model.to(context.device))
    labels, certain_volumes, agree_volumes = (new_volumes(target_train), new_volumes(target_train, bool),
                                              new_volumes(target_train, bool))
    sums = None
    with seeded_torch_rng(generator, context.device) as reseed:
        for b, (images, cases, slices) in enumerate(target_batches(target_train, batch_size, context, "MC dropout")):
            reseed(seeds[b])
            mean_probs, std, features = mc_forward(model, images, passes, temperature)
            pred, certain = mc_pseudo_labels(mean_probs, std, fg_threshold, u_threshold, low_confidence)
            batch_sums = prototype_sums(features, mean_probs, pred, certain)
            sums = batch_sums if sums is None else tuple(a + b for a, b in zip(sums, batch_sums))
            for i, (ci, z) in enumerate(zip(cases, slices)):
                labels[ci][z] = pred[i].cpu().numpy()
                certain_volumes[ci][z] = certain[i].cpu().numpy()
        own_sums, own_weights, rest_sums, rest_weights = sums
        has_prototype = own_weights > 0
        prototypes = own_sums / own_weights.clamp(min=1e-12)[:, None]
        rest = rest_sums / rest_weights.clamp(min=1e-12)[:, None] if test == "one_vs_rest" else None
        for b, (images, cases, slices) in enumerate(target_batches(target_train, batch_size, context, "prototypes")):
            reseed(seeds[b])                       # the same dropout masks as in the first pass
            _, _, features = mc_forward(model, images, passes, temperature)
            for i, (ci, z) in enumerate(zip(cases, slices)):
                pred = torch.from_numpy(labels[ci][z].astype(np.int64)).to(context.device)[None]
                agree_volumes[ci][z] = prototype_agreement(features[i:i + 1], pred, prototypes, has_prototype,
                                                           rest)[0].cpu().numpy()
    keep = [c & a for c, a in zip(certain_volumes, agree_volumes)]
    names = ["background", *context.organs]
    stats = {"certain": sum(int(v.sum()) for v in certain_volumes) / sum(v.size for v in certain_volumes),
             "classes_with_prototype": int(has_prototype.sum()),
             # which filter drops what, per pseudo-class: a starved class shows here before it collapses
             "certain_by_class": class_keep_rates(labels, certain_volumes, context.organs),
             "prototype_agrees_by_class": class_keep_rates(labels, agree_volumes, context.organs),
             "trained_pixel_share": class_shares(labels, names, keep)}
    return labels, keep, stats


class DPL(Method):
    """DPL (Chen et al., MICCAI 2021): MC-dropout + prototype-denoised pseudo-labels, then masked training."""

    name = "dpl"
    stage_labels = {"mc_mean": "PL (MC-dropout mean)"}

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        cfg = self.cfg
        model = with_dropout(source_model.to(context.device), float(cfg["dropout"]),
                             str(cfg.get("dropout_at", "classifier_input")))
        if str(cfg.get("mc_batchnorm", "target")) == "target":
            # DPL runs its MC passes in train mode, i.e. with the target batch's BN statistics; we re-estimate
            # them once over target-train (AdaBN) so the passes do not depend on which slices share a batch.
            with context.phase("bn_statistics"):
                reestimate_bn_statistics(model, target_train, context, batch_size=int(cfg["predict_batch_size"]),
                                         generator=context.generator(4))
        elif str(cfg.get("mc_batchnorm")) != "source":
            raise ValueError(f"dpl: mc_batchnorm={cfg.get('mc_batchnorm')!r} unknown; use target or source")
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
