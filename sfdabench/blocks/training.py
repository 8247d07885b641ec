"""Building blocks shared by the source model, the oracle and methods that train: losses, the protocol's
augmentations, a supervised training loop, batched prediction.

Everything takes a ``device`` and a seeded ``torch.Generator`` so runs are reproducible on CPU and the
same code runs on CUDA.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfdabench.api import Context, SliceDataset, TargetImages
from sfdabench.blocks.losses import segmentation_loss


# ----------------------------------------------------------------------------------- augmentation


class Augment:
    """The protocol's ``train`` augmentations (spec 1.5), applied to a batch on its device.

    Each transform fires with probability ``p`` per sample: random resized crop (scale and ratio in
    [0.9, 1.1]), shift-scale-rotate (shift 0.0625, scale 0.05, rotate 15 degrees), brightness/contrast
    (+-0.2) and gamma (60-140). Labels get the geometric transforms with nearest interpolation. Random
    numbers come from a CPU generator so a seed gives the same augmentations on CPU and CUDA.
    """

    def __init__(self, cfg: Mapping[str, Any] | None, generator: torch.Generator):
        cfg = dict(cfg or {})
        self.enabled = bool(cfg.get("enabled", True))
        self.p = float(cfg.get("p", 0.25))
        self.geometric = bool(cfg.get("geometric", True))
        self.intensity = bool(cfg.get("intensity", True))
        self.g = generator

    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.g)

    def _fire(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.g) < self.p

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None):
        if not self.enabled:
            return image, label
        n = image.shape[0]
        if self.geometric:
            theta = self._affine(n).to(image.device, image.dtype)
            grid = F.affine_grid(theta, list(image.shape), align_corners=False)
            image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            if label is not None:
                lab = F.grid_sample(label.unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros",
                                    align_corners=False)
                label = lab.squeeze(1).round().long()
        if self.intensity:
            image = self._intensity(image)
        return image, label

    def _affine(self, n: int) -> torch.Tensor:
        """Per-sample 2x3 matrices mapping output to input coordinates (identity where nothing fires)."""
        sx = torch.ones(n)
        sy = torch.ones(n)
        tx = torch.zeros(n)
        ty = torch.zeros(n)
        rot = torch.zeros(n)
        crop = self._fire(n)
        area, ratio = self._u(n, 0.9, 1.1), torch.exp(self._u(n, math.log(0.9), math.log(1.1)))
        cw, ch = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
        cx, cy = self._u(n, -1, 1) * (1 - cw), self._u(n, -1, 1) * (1 - ch)
        sx, sy = torch.where(crop, cw, sx), torch.where(crop, ch, sy)
        tx, ty = torch.where(crop, cx, tx), torch.where(crop, cy, ty)
        ssr = self._fire(n)
        scale = torch.where(ssr, self._u(n, 0.95, 1.05), torch.ones(n))
        rot = torch.where(ssr, self._u(n, -15, 15) * math.pi / 180, rot)
        tx = tx + torch.where(ssr, self._u(n, -0.0625, 0.0625) * 2, torch.zeros(n))
        ty = ty + torch.where(ssr, self._u(n, -0.0625, 0.0625) * 2, torch.zeros(n))
        cos, sin = torch.cos(rot) / scale, torch.sin(rot) / scale
        theta = torch.stack([
            torch.stack([cos * sx, -sin * sy, tx], 1),
            torch.stack([sin * sx, cos * sy, ty], 1)], 1)
        return theta

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        shape = (n, 1, 1, 1)
        bc = self._fire(n)
        alpha = torch.where(bc, self._u(n, 0.8, 1.2), torch.ones(n)).view(shape).to(image)
        beta = torch.where(bc, self._u(n, -0.2, 0.2), torch.zeros(n)).view(shape).to(image)
        gm = self._fire(n)
        gamma = torch.where(gm, self._u(n, 0.6, 1.4), torch.ones(n)).view(shape).to(image)
        image = (image * alpha + beta).clamp(0, 1)
        return image.pow(gamma)


# ----------------------------------------------------------------------------------- training loop


def training_recipe(cfg: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(name, recipe) of a method config that offers several training recipes: ``cfg.recipe`` names one of
    ``cfg.recipes`` (e.g. ``dfg``: DFG's retraining, ``source``: the source model's recipe)."""
    recipes = cfg.get("recipes") or {}
    name = str(cfg.get("recipe"))   # the method's config file names its default
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; use method.recipe={' or method.recipe='.join(sorted(recipes))}")
    return name, recipes[name]


def make_optimizer(params: Iterable[Any], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The one optimizer factory: ``optimizer: adam`` (default; ``betas``, default (0.9, 0.999)) or ``sgd``
    (``momentum``, default 0.9), with ``lr`` and ``weight_decay`` (default 5e-4, the protocol's). ``params``
    may be parameter groups (dicts with their own ``betas``/``lr``)."""
    kind = str(cfg.get("optimizer", "adam")).lower()
    lr, weight_decay = float(cfg["lr"]), float(cfg.get("weight_decay", 5e-4))
    if kind == "adam":
        betas = tuple(float(b) for b in cfg.get("betas", (0.9, 0.999)))
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{kind}': use adam or sgd")


def loader(dataset: torch.utils.data.Dataset, batch_size: int, generator: torch.Generator, *,
           shuffle: bool = True, drop_last: bool = True) -> torch.utils.data.DataLoader:
    # drop_last would drop everything on tiny test datasets: keep at least one batch.
    drop_last = drop_last and len(dataset) >= batch_size
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       generator=generator, num_workers=0)


def forever(data: torch.utils.data.DataLoader):
    """Batches of ``data`` without end, reshuffled each pass (``itertools.cycle`` would replay one order)."""
    while True:
        yield from data


def fit(data: torch.utils.data.DataLoader, opt: torch.optim.Optimizer, cfg: Mapping[str, Any],
        loss_of: Callable[[dict], torch.Tensor], *, progress: Callable | None = None, desc: str = "train",
        default_step_epochs: int = 2, default_gamma: float = 0.95) -> list[float]:
    """The one optimisation loop of the project: ``loss_of(batch)`` per step, under a budget that is either
    - in epochs: ``epochs``, the lr times ``lr_gamma`` every ``lr_step_epochs`` epochs (StepLR per epoch), or
    - in optimiser steps (``steps`` set): ``steps`` iterations, the lr times ``lr_gamma`` every
      ``lr_step_every`` steps. A paper's schedule then keeps its length in steps whatever our dataset size
      (an epoch of a 59-slice target set at batch 8 is 7 steps, of the paper's 1400 slices 175: counting
      epochs silently cuts such a budget 25x).
    Returns the mean loss per pass over ``data`` (the last entry: the steps since the last full pass).
    """
    steps = cfg.get("steps")
    if steps is not None:
        total, period = int(steps), int(cfg.get("lr_step_every", len(data)))
    else:
        total = int(cfg["epochs"]) * len(data)
        period = len(data) * int(cfg.get("lr_step_epochs", default_step_epochs))
    report_every = len(data)           # one pass over the data: a loss curve whatever the lr schedule
    gamma = float(cfg.get("lr_gamma", default_gamma))
    history, window = [], []
    bar = progress(total=total, desc=desc) if progress else None
    batches = forever(data)
    for step in range(1, total + 1):
        loss = loss_of(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        window.append(value)
        if step % period == 0:  # the same float operation as StepLR's chainable form
            for group in opt.param_groups:
                group["lr"] *= gamma
        if step % report_every == 0 or step == total:
            history.append(sum(window) / len(window))
            window = []
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
    if bar is not None:
        bar.close()
    return history


def train_supervised(model: nn.Module, dataset: torch.utils.data.Dataset, cfg: Mapping[str, Any], *,
                     device: torch.device, generator: torch.Generator, progress: Callable = None,
                     desc: str = "train") -> list[float]:
    """Train ``model`` on a labelled slice dataset (items with ``image`` and ``label``).

    ``cfg``: ``batch_size``, ``lr``, ``weight_decay``, ``loss`` (ce+dice | dice | ce), ``augment`` (see
    :class:`Augment`) and the budget of :func:`fit` (``epochs`` or ``steps``; StepLR default every 2 epochs
    x0.95). The last model is returned (no checkpoint is chosen by any test metric).
    """
    model.to(device).train()
    loss_fn = segmentation_loss(cfg.get("loss", "ce+dice"))
    opt = make_optimizer(model.parameters(), cfg)
    augment = Augment(cfg.get("augment"), generator)
    data = loader(dataset, int(cfg["batch_size"]), generator)

    def loss_of(batch):
        x, y = augment(batch["image"].to(device), batch["label"].to(device))
        return loss_fn(model(x)[1], y)

    return fit(data, opt, cfg, loss_of, progress=progress, desc=desc)


@torch.no_grad()
def predict(model: nn.Module, dataset: SliceDataset, *, device: torch.device, batch_size: int = 16,
            want: tuple[str, ...] = ("label",), progress: Callable | None = None, desc: str = "predict"
            ) -> dict[str, list[np.ndarray]]:
    """Run ``model`` (eval mode) over every slice of ``dataset`` and rebuild per-case volumes.

    ``want`` chooses outputs: ``label`` (Z, H, W) uint8 argmax, ``probs`` (Z, K, H, W) float32 softmax,
    ``features`` (Z, C, H, W) float32. Returns ``{output: [volume per case]}`` in case order.
    """
    was_training = model.training
    model.eval().to(device)
    per_case: dict[str, dict[int, list]] = {w: {} for w in want}
    data = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    it = progress(data, desc=desc) if progress else data
    for batch in it:
        feats, logits = model(batch["image"].to(device))
        outs = {"label": lambda: logits.argmax(1).to(torch.uint8),
                "probs": lambda: logits.softmax(1).float(),
                "features": lambda: feats.float()}
        computed = {w: outs[w]().cpu().numpy() for w in want}
        for i, ci in enumerate(batch["case_index"].tolist()):
            for w in want:
                per_case[w].setdefault(ci, []).append(computed[w][i])
    model.train(was_training)
    return {w: [np.stack(per_case[w][ci]) for ci in sorted(per_case[w])] for w in want}


def predict_target(model: nn.Module, target: TargetImages, context: Context, want=("label",),
                   batch_size: int = 16) -> dict[str, list[np.ndarray]]:
    """:func:`predict` with the context's device and progress bar (for methods)."""
    return predict(model, target, device=context.device, batch_size=batch_size, want=want,
                   progress=context.progress, desc="predict target")
