"""``sam_refine``: the source model's prediction refined by one SAM box prompt per class, then retraining.

The naive SAM refinement that DFG improves upon: Huai et al., "SAM-based Source-Free Domain Adaptation for
Medical Image Segmentation via Dual Feature Guided Auto-Prompting", IEEE TMI 2025, Fig. 1b (a box around the
adapted model's prediction often makes MedSAM return a wrong mask, because the prediction is wrong in
the domain-shifted target). No feature aggregation, no box search, no connectivity post-processing.

Per target-train slice, with the source model in eval mode:

1. class c (each organ) is *present* if at least ``min_pixels`` pixels have P_c > ``threshold``;
2. for a present class, one box around those pixels (``box_margin`` pixels wider on each side; with
   ``largest_contour: true`` around their largest contour only) is sent to ``context.sam``, once; the
   largest contour of SAM's mask is the class's refined mask;
3. classes are merged as DFG does (spec 4.4): a score map with background 0.5 everywhere, 2 on a class's SAM
   mask, 1 on the source argmax of a class that is absent or whose SAM mask is empty (the fallback); argmax,
   ties to the lower class index. SAM embeds a slice only if some class is present there.

The source model is then retrained on these pseudo-labels with DFG's retraining recipe (spec 6.1: Dice loss
only, as DFG's released code; Adam 1e-4, wd 5e-4, lr x0.8 per epoch, batch 8, train augmentations; ``loss:
ce+dice`` possible), for a fixed ``train.epochs`` budget; last model. So ``sam_refine`` differs from DFG by the
missing FA, box search and CP only. Pixel values (``min_pixels``, ``box_margin``) are for 256x256 slices and
scale with the slice's area / side, as DFG's (``reference_size``). The pseudo-labels' Dice against the hidden
target-train labels is recorded before (``source_model``) and after SAM (``sam``).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from sfdabench.api import Context, Method, SamBackend, SamEmbedding, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.sam.masks import box_around, largest_contour, scale_pixels
from sfdabench.blocks.self_training import new_volumes, target_batches, train_on_pseudo_labels

SCORE_BACKGROUND, SCORE_SAM, SCORE_FALLBACK = 0.5, 2.0, 1.0      # DFG's merge (spec 4.4)


def scaled_settings(cfg: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """(min_pixels, box_margin) for slices of ``size``: counts scale with area, lengths with side (>= 1)."""
    ref = cfg["reference_size"]
    return (scale_pixels(cfg["min_pixels"], size, ref, "area"), scale_pixels(cfg["box_margin"], size, ref, "length"))


def refine_slice(probs: np.ndarray, sam: SamBackend, embed: Callable[[], SamEmbedding], *, threshold: float,
                 min_pixels: int, margin: int, use_largest_contour: bool) -> tuple[np.ndarray, dict[int, str]]:
    """One slice: (K, H, W) source probabilities -> (merged uint8 pseudo-label, outcome per foreground class:
    ``sam`` | ``fallback`` (SAM mask empty) | ``absent``). ``embed`` is called at most once, when needed."""
    num_classes = probs.shape[0]
    prediction = probs.argmax(axis=0)
    scores = np.zeros(probs.shape, dtype=np.float32)
    scores[0] = SCORE_BACKGROUND
    outcomes, embedding = {}, None
    for c in range(1, num_classes):
        candidates = probs[c] > threshold
        if use_largest_contour and candidates.any():
            candidates = largest_contour(candidates)
        if candidates.sum() < min_pixels:
            outcomes[c] = "absent"
        else:
            if embedding is None:
                embedding = embed()
            mask = largest_contour(np.asarray(sam.decode(embedding, box_around(candidates, margin))))
            if mask is not None and mask.any():
                scores[c][mask] = SCORE_SAM
                outcomes[c] = "sam"
                continue
            outcomes[c] = "fallback"
        scores[c][prediction == c] = SCORE_FALLBACK
    return scores.argmax(axis=0).astype(np.uint8), outcomes


@torch.no_grad()
def sam_pseudo_labels(model: nn.Module, target_train: TargetImages, cfg: Mapping[str, Any], context: Context
                      ) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """(source argmax volumes, SAM-refined volumes, statistics) over target-train."""
    was_training = model.training
    model.eval().to(context.device)
    sam = context.sam
    raw, refined = new_volumes(target_train), new_volumes(target_train)
    min_pixels, margin = scaled_settings(cfg, target_train.shapes[0][1:])
    outcomes = {organ: collections.Counter() for organ in context.organs}
    embedded = 0
    for images, cases, slices in target_batches(target_train, int(cfg["predict_batch_size"]), context,
                                                "SAM refinement"):
        _, logits = model(images)
        probs = logits.softmax(1).float().cpu().numpy()
        for i, (ci, z) in enumerate(zip(cases, slices)):
            image = target_train.volume(ci)[z]
            calls = []

            def embed():
                calls.append(1)
                return sam.embed(image)

            refined[ci][z], result = refine_slice(
                probs[i], sam, embed, threshold=float(cfg["threshold"]), min_pixels=min_pixels, margin=margin,
                use_largest_contour=bool(cfg["largest_contour"]))
            raw[ci][z] = probs[i].argmax(axis=0)
            embedded += len(calls)
            for c, outcome in result.items():
                outcomes[context.organs[c - 1]][outcome] += 1
    model.train(was_training)
    stats = {"slices": len(target_train), "slices_embedded": embedded, "min_pixels": min_pixels,
             "box_margin": margin, "outcomes": {o: dict(c) for o, c in outcomes.items()},
             "decoder_calls": sum(c["sam"] + c["fallback"] for c in outcomes.values())}
    return raw, refined, stats


class SamRefine(Method):
    """Naive SAM refinement (DFG Fig. 1b): one box per class around the source prediction, then retraining."""

    name = "sam_refine"
    stage_labels = {"source_model": "PL of the source model", "sam": "PL after SAM"}
    uses_sam = True

    def variant(self) -> str:
        return ("contour-box" if self.cfg["largest_contour"] else "box") + f"+{self.cfg['train']['loss']}"

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        with context.phase("sam_pseudo_labels"):
            raw, refined, stats = sam_pseudo_labels(source_model, target_train, self.cfg, context)
        context.record("sam_refine", stats)
        context.pseudo_label_quality("source_model", raw)
        context.pseudo_label_quality("sam", refined)
        with context.phase("retrain"):
            losses = train_on_pseudo_labels(source_model, target_train, refined, self.cfg["train"], context,
                                            generator=context.generator(1), desc="retraining")
        context.record("sam_refine_loss", {"first": losses[0], "last": losses[-1]} if losses else {})
        return source_model


@hookimpl
def sfdabench_methods():
    return [SamRefine]
