"""``upl_sfda``: uncertainty-aware pseudo-labels from a rotated, dropout-perturbed multi-head ensemble.

Wu, Wang, Gu, Lu, Chen, Zhu, Vercauteren, Ourselin, Zhang, "UPL-SFDA: Uncertainty-aware Pseudo Label
guided Source-Free Domain Adaptation for Medical Image Segmentation", IEEE TMI 42(12), 2023
(code: github.com/HiLab-git/UPL-SFDA; the spec read from it is exp-2026-12-01/research/upl_sfda.md).

The algorithm, as released (``unet.py``, ``run_2d_upl.py``, ``loss.py``):

1. **Target domain growing (TDG)**: one shared encoder and ``heads`` (K = 4) decoders, all exact copies of the
   source decoder (U-Net up-path + 1x1 classifier). Each head gets element-wise ``nn.Dropout(dropout)``
   (0.5) between the two convolutions of its deepest up-block, and with ``perturbation: rot90`` (released)
   head k sees the input rotated by 90, 180, 270 and 0 degrees; its softmax is rotated back. The encoder runs
   once per rotation. Our default is ``perturbation: none`` (see the deviations).
2. **Twice forward pass supervision (TFS)**, at every step on the same batch, with the whole model in train
   mode (batch-statistic BatchNorm, dropout on):
   pass 1 (no gradient): the mean ``p`` of the K back-rotated head softmaxes; a pixel is reliable for class c
   where ``p_c > tau`` (0.95; at most one class since tau > 0.5), and per class channel, background
   included, only the largest connected component of the reliable pixels is kept (3D, 6-connectivity over
   the slab of consecutive slices). Unreliable pixels are zero in every channel.
   Pass 2 (fresh dropout masks, with gradient) is supervised by pass 1's labels.
3. **Loss** ``L = mean_k Dice_k + w * H``: ``Dice_k`` is UPL's Dice of head k's softmax masked by the
   pseudo-label (``s_k * y`` against ``y``) for every class including background, over the whole batch, with
   the squared prediction in the denominator and smooth 1e-4 (``loss.py``); a class without reliable pixels
   contributes 0 but still counts in the mean over classes. ``H`` is the entropy (in bits) of the mean
   prediction of the K heads over all pixels, divided by the number of classes; ``w = 1``.
4. Adam, encoder betas (0.9, 0.999), heads (0.5, 0.999), no weight decay, constant lr 1e-4 (the released
   StepLR objects are never stepped during adaptation), every parameter trains.
5. A batch is a random window of ``slab_slices`` (10) consecutive slices of one target-train case (batch size
   one volume, shuffled cases), randomly rotated by 90/180/270 degrees with probability 1/8 each
   (``k = randint(0, 8)``; k in 1..3 rotates, otherwise identity), UPL's only augmentation.
6. Inference: the same K-head rotation ensemble (mean of the back-rotated probabilities).

The returned model (:class:`UPLSegmenter`) keeps the source U-Net's module names: ``inc``/``downs`` are the
shared encoder and ``ups``/``classifier`` the identity-rotation head (UPL's ``aux_dec4``); the other heads
are in ``aux_heads``. Its state dict is therefore a superset of the source U-Net's, with the same meaning
for those keys. ``forward(x) -> (features, logits)`` in eval mode (running BN statistics, no dropout):
``inference: ensemble`` (default) averages the K back-rotated head probabilities and returns
``logits = log(mean probs)`` (so the harness's argmax is the ensemble's) and the identity head's decoder
features; ``inference: identity_head`` returns the identity head alone.

Deviations from the released code, and why:

- **Fixed budget, last model.** The released driver evaluates Dice on the labelled target *valid* split after
  every epoch and keeps the best checkpoint (the 3D driver even selects on the test loader). sfdabench methods
  see no target labels (``selection = "last"``): we train for ``train.steps`` optimiser steps and return the
  last model.
- **Budget in steps.** Released: 20 epochs x one step per target-train volume at lr 1e-4 (``train2d.cfg`` @
  f68882f) or 10 epochs at 1e-5 (@0cbaf89); the paper's text is not available to settle which. We keep lr
  1e-4 and count optimiser steps (``train.steps``, via :func:`sfdabench.blocks.training.fit` with ``lr_gamma: 1``):
  the released 20 epochs over the paper protocol's ~24 target volumes (480 steps), compressed 5x as DFG's
  retraining: 96 (``configs/method/upl_sfda.yaml`` has the measured seconds).
- **Our 2D single-slice input and preprocessing.** The protocol's U-Net sees one slice at a time (replicated
  3x, intensities in [0, 1] at the task's size) instead of UPL's one-channel slice clipped to the volume's
  1st/99th percentiles, scaled to [-1, 1] and resized to 256. As in UPL's 2D driver (not its 3D FeTA variant),
  the slab only forms the batch and the 3D connected components. Cases with fewer than ``slab_slices`` slices
  are used whole instead of zero-padded to 10 (blank slices would enter the BN statistics and the loss).
- **Our U-Net and source model.** ReLU/bias-free convs instead of LeakyReLU/biased convs; the dropout is
  inserted at adaptation time (our source model was trained without dropout; UPL's with the same dropout) by
  replacing the parameter-free ReLU after the first conv of ``ups[0]`` with ``ReLU -> Dropout``, so the state
  dict keys do not change. Our source model was trained with the protocol's +-15 degree rotations, not with
  UPL's random 90 degree slab rotations, so the rotated heads start out of distribution: fewer pixels pass
  tau (phantom, seed 0: under ``rot90`` no spleen or left-kidney pixel passes tau at the first step, so both
  organs get no Dice supervision and vanish). The default is therefore ``perturbation: none``, UPL's own
  rotation-free ``forwar_no_rotate`` (dropout only; the encoder runs once); ``rot90``, the released
  perturbation, is reported next to it. The choice rests on that label-free count, not on target Dice.
- **Pass 1 under ``torch.no_grad``** (released: numpy copies of a graph-building forward): same numbers, and
  BN running statistics are still updated by both passes (and by every rotation), as released.
- **One Adam with two parameter groups** instead of one Adam per module: identical updates.
- **Largest component ties**: the released ``get_largest_component`` is only well defined for a unique
  largest component; we keep the first of equally large ones (scipy label order).
- **Evaluation in eval mode.** The released ``test_run.py`` calls ``train()`` before testing (batch-statistic
  BN and active dropout, most likely unintended; its per-epoch validation used ``eval()``); the harness
  evaluates our model in ``eval()``.
- ``batching: shuffled`` (option, not UPL): batches of ``batch_size`` random target-train slices, 2D
  4-connectivity components per slice (slices of different cases are not neighbours).

Randomness comes from the run's generators: case order and windows (``context.generator(1)``), slab
rotations (2), dropout masks of training (3, via :func:`sfdabench.blocks.self_training.seeded_torch_rng`) and of the
pass-1 diagnostics before and after training (4); any device (``context.device``).

Diagnostics (``upl`` in the run summary): the share of batch pixels that pass tau and that stay reliable after
the component filter, per class, at the first and the last step; the loss (total, Dice and entropy parts) at
the first and last step and its history. The pass-1 pseudo-labels of the source-initialised model over every
target-train slice (train mode, slab windows, no augmentation; argmax where reliable, else background) are
scored as ``upl_init`` with the reliable share of each argmax class (``upl_init_reliable``); those of the
adapted model as ``upl_last``.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from sfdabench.api import Context, Method, TargetImages, slice_to_input
from sfdabench.hookspecs import hookimpl
from sfdabench.blocks.nets.unet import UNet
from sfdabench.blocks.self_training import class_keep_rates, new_volumes, seeded_torch_rng
from sfdabench.blocks.training import fit, loader, make_optimizer

PERTURBATIONS = ("rot90", "none")
BATCHINGS = ("slab", "shuffled")
INFERENCES = ("ensemble", "identity_head")
AUGMENTS = ("rot90_slab", "none")


# ---------------------------------------------------------------------------------------- network


def add_head_dropout(ups: nn.ModuleList, rate: float) -> nn.ModuleList:
    """Element-wise ``nn.Dropout(rate)`` between the two conv units of the deepest up-block (UPL's
    ``aux_Decoder``: ``dropout_p[1]`` in ``up_path[0]`` only), in place. The parameter-free ReLU after the first
    conv-BN becomes ``ReLU -> Dropout``, so the state-dict keys stay those of the source decoder."""
    if rate <= 0:
        return ups
    conv = ups[0].conv
    if not isinstance(conv[2], nn.ReLU):
        raise ValueError(f"upl_sfda: expected the U-Net's ReLU between the two convs of ups[0], found "
                         f"{type(conv[2]).__name__}")
    conv[2] = nn.Sequential(conv[2], nn.Dropout(rate))
    return ups


def head_rotations(num_heads: int, perturbation: str) -> list[int]:
    """Quarter turns of the input of each head: UPL's 90, 180, 270, 0 degrees; the last head is unrotated."""
    if perturbation == "none":
        return [0] * num_heads
    return [(k + 1) % 4 for k in range(num_heads - 1)] + [0]


class UPLSegmenter(nn.Module):
    """Shared U-Net encoder + K decoder heads, each on its own quarter turn of the input.

    ``inc``/``downs``: the encoder; ``ups``/``classifier``: the last head (no rotation; the source U-Net's
    names); ``aux_heads``: the other K - 1 heads. ``forward`` = the eval-time prediction (module docstring).
    """

    def __init__(self, source: UNet, *, num_heads: int = 4, dropout: float = 0.5, perturbation: str = "rot90",
                 inference: str = "ensemble"):
        super().__init__()
        if not isinstance(source, UNet):
            raise ValueError(f"upl_sfda is implemented for the protocol's U-Net, not {type(source).__name__}")
        if num_heads < 1 or perturbation not in PERTURBATIONS or inference not in INFERENCES:
            raise ValueError(f"upl_sfda: heads >= 1, perturbation in {PERTURBATIONS}, inference in {INFERENCES}; "
                             f"got {num_heads}, {perturbation!r}, {inference!r}")
        self.inc, self.downs = source.inc, source.downs
        self.ups, self.classifier = add_head_dropout(source.ups, dropout), source.classifier
        self.aux_heads = nn.ModuleList(
            nn.ModuleDict({"ups": copy.deepcopy(self.ups), "classifier": copy.deepcopy(self.classifier)})
            for _ in range(num_heads - 1))                     # exact copies, dropout included
        self.rotations = head_rotations(num_heads, perturbation)
        self.inference = inference
        self.num_classes, self.feature_dim = source.num_classes, source.feature_dim

    def heads(self) -> list[tuple[nn.ModuleList, nn.Module]]:
        return [(h["ups"], h["classifier"]) for h in self.aux_heads] + [(self.ups, self.classifier)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        return skips

    @staticmethod
    def decode(ups: nn.ModuleList, classifier: nn.Module, skips: Sequence[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        skips = list(skips)
        h = skips.pop()
        for up in ups:
            h = up(h, skips.pop())
        return h, classifier(h)

    def head_probs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(K back-rotated softmaxes (B, C, H, W), the last head's features). One encoder pass per rotation."""
        encoded: dict[int, list[torch.Tensor]] = {}
        probs, features = [], None
        for (ups, classifier), r in zip(self.heads(), self.rotations):
            if r not in encoded:
                encoded[r] = self.encode(torch.rot90(x, r, (2, 3)) if r else x)
            features, logits = self.decode(ups, classifier, encoded[r])
            probs.append(torch.rot90(logits.softmax(1), -r, (2, 3)) if r else logits.softmax(1))
        return probs, features   # the last head is unrotated: its features are in the input's frame

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inference == "identity_head":
            return self.decode(self.ups, self.classifier, self.encode(x))
        probs, features = self.head_probs(x)
        return features, torch.stack(probs).mean(0).clamp_min(1e-8).log()


# ------------------------------------------------------------------------------------ pseudo-labels


def largest_component(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """The largest connected component of a bool array (the first of equally large ones); empty stays empty."""
    labels, count = ndimage.label(mask, structure)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def largest_component_per_class(reliable: np.ndarray, volumetric: bool) -> np.ndarray:
    """(B, C, H, W) bool -> the same with, per class channel (background included), only the largest
    component kept: over the B slices as a 3D stack with 6-connectivity (``volumetric``, consecutive slices of
    one case), or per slice with 4-connectivity."""
    out = np.zeros_like(reliable)
    for c in range(reliable.shape[1]):
        if volumetric:
            out[:, c] = largest_component(reliable[:, c], ndimage.generate_binary_structure(3, 1))
        else:
            for b in range(reliable.shape[0]):
                out[b, c] = largest_component(reliable[b, c], ndimage.generate_binary_structure(2, 1))
    return out


def reliable_pseudo_labels(mean_probs: torch.Tensor, tau: float, *, largest_cc: bool, volumetric: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(above tau, reliable) bool (B, C, H, W) masks from the pass-1 mean probabilities: one-hot where the mean
    probability of a class exceeds ``tau``, all-zero elsewhere; ``reliable`` is after the component filter."""
    above = mean_probs > tau
    if not largest_cc:
        return above, above
    filtered = largest_component_per_class(above.cpu().numpy(), volumetric)
    return above, torch.from_numpy(filtered).to(above.device)


# ------------------------------------------------------------------------------------------- losses


def upl_dice_loss(probs: torch.Tensor, reliable: torch.Tensor, smooth: float = 1e-4) -> torch.Tensor:
    """UPL's masked Dice (``loss.py`` ``DiceLoss(one_hot=False)`` on ``s * y``): per class c, background included,
    over the whole batch, ``1 - (2 sum e y + smooth) / (sum y + sum e^2 + smooth)`` with ``e = s * y``; mean
    over the C classes."""
    y = reliable.to(probs.dtype)
    e = probs * y
    dims = (0, 2, 3)
    dice = (2 * (e * y).sum(dims) + smooth) / (y.sum(dims) + (e * e).sum(dims) + smooth)
    return (1 - dice).mean()


def mean_prediction_entropy(mean_probs: torch.Tensor) -> torch.Tensor:
    """``-sum m log2(m + 1e-10) / (C * B * H * W)``: mean per-pixel entropy in bits divided by C."""
    return -(mean_probs * torch.log2(mean_probs + 1e-10)).mean()


# ------------------------------------------------------------------------------------------ batches


class SlabBatches:
    """Epochs of one batch per target-train case, cases shuffled (UPL's volume loader, batch size 1): a random
    window of ``slices`` consecutive slices (the whole case if it is shorter), as ``{image, case_index,
    slice_index}``."""

    def __init__(self, target_train: TargetImages, slices: int, generator: torch.Generator):
        self.target, self.slices, self.g = target_train, int(slices), generator

    def __len__(self) -> int:
        return len(self.target.case_ids)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for ci in torch.randperm(len(self), generator=self.g).tolist():
            volume = self.target.volume(ci)
            start = int(torch.randint(0, max(volume.shape[0] - self.slices, 0) + 1, (1,), generator=self.g))
            z = list(range(start, min(start + self.slices, volume.shape[0])))
            yield {"image": torch.stack([slice_to_input(volume[i]) for i in z]), "case_index": ci,
                   "slice_index": z}


def slab_windows(num_slices: int, slices: int) -> list[range]:
    """Windows of ``slices`` consecutive slices covering a case (the last one shifted back to fit)."""
    if num_slices <= slices:
        return [range(num_slices)]
    starts = list(range(0, num_slices - slices + 1, slices))
    if starts[-1] + slices < num_slices:
        starts.append(num_slices - slices)
    return [range(s, s + slices) for s in starts]


def random_quarter_turns(generator: torch.Generator) -> int:
    """UPL's slab rotation (``utils.py``): k = randint(0, 8); k in 1..3 quarter turns (1/8 each), else none."""
    k = int(torch.randint(0, 8, (1,), generator=generator))
    return k if k in (1, 2, 3) else 0


# ------------------------------------------------------------------------------------------- method


def class_shares(mask: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Share of the batch's pixels that are marked for each class of a (B, C, H, W) bool mask."""
    shares = mask.float().mean(dim=(0, 2, 3)).tolist()
    return {**dict(zip(names, shares)), "any": float(mask.any(dim=1).float().mean())}


@torch.no_grad()
def pass1_pseudo_labels(model: UPLSegmenter, target_train: TargetImages, cfg: Mapping[str, Any], context: Context,
                        generator: torch.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(argmax label volumes, reliable volumes) of ``model``'s pass 1 over every target-train slice, as in
    training (train mode, slab windows or batches, component filter) but without augmentation. Runs on a copy,
    so the model's BN running statistics are left alone."""
    probe = copy.deepcopy(model).train()
    tau, largest_cc = float(cfg["tau"]), bool(cfg["largest_component"])
    labels, reliable = new_volumes(target_train), new_volumes(target_train, bool)
    if cfg["batching"] == "slab":
        groups = [(ci, list(w)) for ci in range(len(target_train.case_ids))
                  for w in slab_windows(target_train.shapes[ci][0], int(cfg["slab_slices"]))]
    else:
        index, size = target_train.index, int(cfg["batch_size"])
        groups = [(None, index[i:i + size]) for i in range(0, len(index), size)]
    with seeded_torch_rng(generator, context.device):
        for ci, members in context.progress(groups, desc="UPL pass-1 labels"):
            pairs = [(ci, z) for z in members] if ci is not None else members
            images = torch.stack([slice_to_input(target_train.volume(c)[z]) for c, z in pairs]).to(context.device)
            probs, _ = probe.head_probs(images)
            mean = torch.stack(probs).mean(0)
            _, keep = reliable_pseudo_labels(mean, tau, largest_cc=largest_cc, volumetric=ci is not None)
            pred, keep = mean.argmax(1).cpu().numpy(), keep.any(1).cpu().numpy()
            for i, (c, z) in enumerate(pairs):
                labels[c][z], reliable[c][z] = pred[i], keep[i]
    return labels, reliable


def score_pass1(stage: str, model: UPLSegmenter, target_train: TargetImages, cfg: Mapping[str, Any],
                context: Context, generator: torch.Generator) -> dict[str, float]:
    labels, reliable = pass1_pseudo_labels(model, target_train, cfg, context, generator)
    context.pseudo_label_quality(stage, [np.where(r, lab, 0).astype(np.uint8) for lab, r in zip(labels, reliable)])
    return class_keep_rates(labels, reliable, context.organs)


class UPLSFDA(Method):
    """UPL-SFDA (Wu et al., TMI 2023): K dropout-perturbed heads, twice-forward pseudo-label Dice + entropy."""

    name = "upl_sfda"
    stage_labels = {"upl_init": "PL at the start (reliable pixels)", "upl_last": "PL at the end (reliable pixels)"}

    def variant(self) -> str:
        cfg = self.cfg
        parts = ["rot90" if cfg["perturbation"] == "rot90" else "norot"]
        if cfg["batching"] != "slab":
            parts.append(str(cfg["batching"]))
        if cfg["augment"] != "rot90_slab":
            parts.append("noaug")
        if cfg["inference"] != "ensemble":
            parts.append("headonly")
        return "+".join(parts)

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        cfg, train = self.cfg, self.cfg["train"]
        if cfg["batching"] not in BATCHINGS or cfg["augment"] not in AUGMENTS:
            raise ValueError(f"upl_sfda: batching in {BATCHINGS}, augment in {AUGMENTS}; got "
                             f"{cfg['batching']!r}, {cfg['augment']!r}")
        model = UPLSegmenter(source_model, num_heads=int(cfg["heads"]), dropout=float(cfg["dropout"]),
                             perturbation=str(cfg["perturbation"]), inference=str(cfg["inference"]))
        model.to(context.device).train()
        names = ["background", *context.organs]
        tau, smooth, weight = float(cfg["tau"]), float(cfg["dice_smooth"]), float(cfg["entropy_weight"])
        largest_cc, slab = bool(cfg["largest_component"]), cfg["batching"] == "slab"

        with context.phase("initial_pseudo_labels"):
            init_rates = score_pass1("upl_init", model, target_train, cfg, context, context.generator(4))

        encoder = [*model.inc.parameters(), *model.downs.parameters()]
        heads = [p for n, p in model.named_parameters() if not n.startswith(("inc.", "downs."))]
        opt = make_optimizer([{"params": encoder, "betas": tuple(float(b) for b in train["encoder_betas"])},
                               {"params": heads, "betas": tuple(float(b) for b in train["head_betas"])}], train)
        data = SlabBatches(target_train, int(cfg["slab_slices"]), context.generator(1)) if slab else \
            loader(target_train, int(cfg["batch_size"]), context.generator(1))
        rotation_rng = context.generator(2)
        records: dict[str, dict[str, Any]] = {}                  # the first and the latest step

        def loss_of(batch: Mapping[str, Any]) -> torch.Tensor:
            x = batch["image"].to(context.device)
            if cfg["augment"] == "rot90_slab":
                k = random_quarter_turns(rotation_rng)
                x = torch.rot90(x, k, (2, 3)) if k else x
            with torch.no_grad():                                   # pass 1: pseudo-labels (train mode)
                probs, _ = model.head_probs(x)
                above, reliable = reliable_pseudo_labels(torch.stack(probs).mean(0), tau, largest_cc=largest_cc,
                                                         volumetric=slab)
            probs, _ = model.head_probs(x)                          # pass 2: fresh dropout masks, with grad
            dice = sum(upl_dice_loss(p, reliable, smooth) for p in probs) / len(probs)
            entropy = mean_prediction_entropy(torch.stack(probs).mean(0))
            loss = dice + weight * entropy
            records["last"] = {"dice": float(dice.detach()), "entropy": float(entropy.detach()),
                               "total": float(loss.detach()),
                               "above_tau": class_shares(above, names), "reliable": class_shares(reliable, names)}
            records.setdefault("first", records["last"])
            return loss

        with context.phase("training"), seeded_torch_rng(context.generator(3), context.device):
            history = fit(data, opt, train, loss_of, progress=context.progress, desc="UPL-SFDA")
        with context.phase("final_pseudo_labels"):
            last_rates = score_pass1("upl_last", model, target_train, cfg, context, context.generator(4))
        first, last = records["first"], records["last"]
        context.record("upl", {
            "rotations": model.rotations, "steps": int(train["steps"]),
            "above_tau_share": {"first": first["above_tau"], "last": last["above_tau"]},
            "reliable_share": {"first": first["reliable"], "last": last["reliable"]},
            "upl_init_reliable": init_rates, "upl_last_reliable": last_rates})
        context.record("upl_loss", {**{part: {"first": first[part], "last": last[part]}
                                       for part in ("total", "dice", "entropy")}, "history": history})
        return model.eval()


@hookimpl
def sfdabench_methods():
    return [UPLSFDA]
