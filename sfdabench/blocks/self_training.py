"""Building blocks shared by the entropy / BatchNorm / pseudo-label baselines (``adabn``, ``tent``, ``adami``,
``dpl``, ``pseudo_label``, ``sam_refine``).

- :func:`softmax_entropy`: per-pixel Shannon entropy of the softmax (Tent's numerically stable form).
- :func:`bn_layers`, :func:`reestimate_bn_statistics`: AdaBN's target statistics (also Tent's final statistics).
- :func:`mean_target_prediction`: the model's mean softmax over every target-train pixel, the weights-only class
  prior of AdaMI, SHOT's segmentation diversity term and DFG's FA prior option.
- :func:`target_batches`, :func:`new_volumes`: streaming over the target-train slices and writing per-case
  pseudo-label volumes (memory grows with uint8 volumes only, never with probabilities or features).
- :func:`train_on_pseudo_labels`: supervised training on pseudo-label volumes in which :data:`IGNORE` marks
  the pixels a method dropped (they contribute neither CE nor Dice).
- :func:`seeded_torch_rng`: dropout draws from torch's global RNG; this seeds it from the run's generator
  (and restores it afterwards) so MC-dropout and training with dropout are reproducible for a seed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfdabench.api import Context, SliceDataset, TargetImages
from sfdabench.blocks.losses import soft_dice_loss
from sfdabench.blocks.training import Augment, fit, loader, make_optimizer

#: Label value of pixels excluded from the loss (pseudo-labels are uint8; organ labels are small integers).
IGNORE = 255


# ------------------------------------------------------------------------------------------- entropy


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, H, W) entropy of the softmax, in nats (``-sum p log p``, via log_softmax)."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


# ---------------------------------------------------------------------------------------- BatchNorm


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_bn_statistics(model: nn.Module, target_train: TargetImages, context: Context, *, batch_size: int,
                             passes: int = 1, generator: torch.Generator) -> int:
    """AdaBN: replace every BatchNorm's running mean/variance by statistics of the target-train images.

    The statistics are reset and accumulated as PyTorch's cumulative average (``momentum=None``): the mean over
    batches of the batch mean and of the (unbiased) batch variance, over ``passes`` shuffled passes. Only the
    BatchNorm layers run in train mode (dropout and the like stay off) and no gradient is taken, so nothing but
    the running statistics changes. Returns the number of batches seen.
    """
    layers = bn_layers(model)
    momenta = [m.momentum for m in layers]
    was_training = model.training
    model.to(context.device).eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None            # cumulative average instead of an exponential one
        m.train()
    # Shuffled, equal-size batches: consecutive slices of one volume would make every batch's variance small.
    data = loader(target_train, batch_size, generator, shuffle=True, drop_last=True)
    seen = 0
    try:
        for _ in range(passes):
            for batch in context.progress(data, desc="BN statistics"):
                model(batch["image"].to(context.device))
                seen += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


# ------------------------------------------------------------------------------- target-train passes


def target_batches(target_train: TargetImages, batch_size: int, context: Context, desc: str
                   ) -> Iterator[tuple[torch.Tensor, list[int], list[int]]]:
    """(images on the device, case indices, slice indices) of every target-train slice, in dataset order."""
    data = torch.utils.data.DataLoader(target_train, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in context.progress(data, desc=desc):
        yield batch["image"].to(context.device), batch["case_index"].tolist(), batch["slice_index"].tolist()


@torch.no_grad()
def mean_target_prediction(model: nn.Module, target_train: TargetImages, context: Context, batch_size: int = 16,
                           desc: str = "class prior") -> torch.Tensor:
    """Mean softmax of ``model`` (eval mode) over every target-train pixel: a (K,) probability vector on the CPU.

    A class-ratio prior that needs nothing but the source weights and the unlabelled target images (no source
    data, no target labels). Summed in float64 so the result does not depend on the batch size beyond rounding.
    """
    was_training = model.training
    model.eval()
    total, pixels = None, 0
    for images, _, _ in target_batches(target_train, batch_size, context, desc):
        _, logits = model(images)
        sums = logits.softmax(1).double().sum(dim=(0, 2, 3)).cpu()
        total = sums if total is None else total + sums
        pixels += images.shape[0] * images.shape[2] * images.shape[3]
    model.train(was_training)
    return (total / pixels).float()


def new_volumes(target_train: TargetImages, dtype=np.uint8, fill: int = 0) -> list[np.ndarray]:
    """One (Z, H, W) array per target-train case, to be filled slice by slice."""
    return [np.full(shape, fill, dtype=dtype) for shape in target_train.shapes]


# ------------------------------------------------------------------------------ pseudo-label training


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE averaged over the pixels not marked :data:`IGNORE` (0, not NaN, if a batch has none)."""
    valid = (target != IGNORE).sum()
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") / valid.clamp(min=1)


def pseudo_label_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``ce``, ``dice`` or ``ce+dice``, each leaving :data:`IGNORE` pixels out."""
    def dice(logits, target):
        return soft_dice_loss(logits, target, ignore_index=IGNORE)

    losses = {"ce": masked_cross_entropy, "dice": dice,
              "ce+dice": lambda logits, target: masked_cross_entropy(logits, target) + dice(logits, target)}
    if kind not in losses:
        raise ValueError(f"unknown pseudo-label loss '{kind}': use {', '.join(losses)}")
    return losses[kind]


def pseudo_label_dataset(target_train: TargetImages, labels: Sequence[np.ndarray]) -> SliceDataset:
    """Target-train slices paired with pseudo-label volumes (in TargetImages order)."""
    return target_train.labelled(labels)


def train_on_pseudo_labels(model: nn.Module, target_train: TargetImages, labels: Sequence[np.ndarray],
                           cfg: Mapping[str, Any], context: Context, *, generator: torch.Generator,
                           desc: str = "pseudo-label training") -> list[float]:
    """Train ``model`` (all parameters, train mode) on pseudo-label volumes; :data:`IGNORE` pixels are left out.

    ``cfg``: ``batch_size``, ``lr``, ``weight_decay``, ``optimizer``/``betas``/``momentum`` (see
    :func:`~sfdabench.blocks.training.make_optimizer`), ``loss`` (ce | dice | ce+dice), the budget of
    :func:`~sfdabench.blocks.training.fit` (``epochs`` with ``lr_step_epochs``/``lr_gamma``, default: constant
    rate; or ``steps``), ``augment`` (:class:`~sfdabench.blocks.training.Augment`; geometric transforms move the
    label with the image). A fixed budget; the last model is kept. Returns per-epoch mean losses.
    """
    model.to(context.device).train()
    loss_fn = pseudo_label_loss(str(cfg.get("loss", "ce")))
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    augment = Augment(cfg.get("augment"), generator)
    data = loader(pseudo_label_dataset(target_train, labels), int(cfg["batch_size"]), generator)

    def loss_of(batch):
        image, target = augment(batch["image"].to(context.device), batch["label"].to(context.device))
        return loss_fn(model(image)[1], target)

    return fit(data, opt, cfg, loss_of, progress=context.progress, desc=desc, default_step_epochs=1,
               default_gamma=1.0)


def class_keep_rates(labels: Sequence[np.ndarray], keep: Sequence[np.ndarray], organs: Sequence[str]
                     ) -> dict[str, float]:
    """Share of each pseudo-class's pixels that a filter kept (``keep`` bool volumes), for the run summary."""
    names = ["background", *organs]
    counts = np.zeros((len(names), 2))
    for lab, k in zip(labels, keep):
        counts[:, 0] += np.bincount(lab.ravel(), minlength=len(names))[:len(names)]
        counts[:, 1] += np.bincount(lab[k].ravel(), minlength=len(names))[:len(names)]
    return {n: (float(kept / total) if total else float("nan")) for n, (total, kept) in zip(names, counts)}


def class_shares(labels: Sequence[np.ndarray], names: Sequence[str], keep: Sequence[np.ndarray] | None = None
                 ) -> dict[str, float]:
    """Share of each class among the pixels of label volumes (of the ``keep`` pixels only, when given): the
    class balance a loss is exposed to, or how much of the image a prediction gives each class. NaN if no
    pixel counts."""
    counts = np.zeros(len(names))
    for i, lab in enumerate(labels):
        values = lab[keep[i]] if keep is not None else lab
        counts += np.bincount(values.ravel(), minlength=len(names))[:len(names)]
    total = counts.sum()
    return {n: (float(c / total) if total else float("nan")) for n, c in zip(names, counts)}


def with_ignored(labels: Sequence[np.ndarray], keep: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Pseudo-label volumes with the pixels not kept set to :data:`IGNORE`."""
    return [np.where(k, lab, IGNORE).astype(np.uint8) for lab, k in zip(labels, keep)]


# ------------------------------------------------------------------------------------------ randomness


@contextlib.contextmanager
def seeded_torch_rng(generator: torch.Generator, device: torch.device) -> Iterator[Callable[[int], Any]]:
    """Run a block with torch's global RNG (CPU and the CUDA device) seeded from ``generator``, restoring the
    caller's RNG state afterwards. Yields ``reseed(seed)`` to set a specific seed inside the block (MC-dropout
    replays the same masks in two passes)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        yield torch.manual_seed
