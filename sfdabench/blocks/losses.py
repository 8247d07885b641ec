"""Losses shared by the harness and several methods.

``soft_dice_loss`` / ``segmentation_loss``: the protocol's segmentation losses (spec 2.2, 6.1).
``bidirectional_transport_loss``: the conditional-transport feature alignment of PCT (Tanwisuth et al.,
NeurIPS 2021) as used by DFG's feature aggregation (spec 3.1) and ProtoContra's PFA (spec 8.2); the two
methods differ only in temperature, prior and whether the prototypes are frozen.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F



def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   ignore_index: int | None = None) -> torch.Tensor:
    """Multi-class soft Dice of the protocol (spec 2.2): per foreground class a Dice over the whole batch
    flattened (softmax probabilities, smooth 1), loss = 1 - Dice, averaged over foreground classes."""
    probs = logits.softmax(dim=1)
    num_classes = logits.shape[1]
    valid = torch.ones_like(target, dtype=probs.dtype)
    if ignore_index is not None:
        valid = (target != ignore_index).to(probs.dtype)
        target = target.masked_fill(target == ignore_index, 0)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    p = probs[:, 1:] * valid.unsqueeze(1)
    g = onehot[:, 1:] * valid.unsqueeze(1)
    dice = (2 * (p * g).sum(dims) + smooth) / (p.sum(dims) + g.sum(dims) + smooth)
    return (1 - dice).mean()


def segmentation_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``"ce+dice"`` (source training, spec 2.2) or ``"dice"`` (DFG retraining, spec 6.1)."""
    if kind == "ce+dice":
        return lambda logits, y: F.cross_entropy(logits, y) + soft_dice_loss(logits, y)
    if kind == "dice":
        return soft_dice_loss
    if kind == "ce":
        return F.cross_entropy
    raise ValueError(f"unknown loss '{kind}': use ce+dice, dice or ce")


def bidirectional_transport_loss(features: torch.Tensor, prototypes: torch.Tensor, *, tau: float, rho: float,
                                 log_prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCT bi-directional conditional transport between pixel features and class prototypes (spec 3.1).

    ``features`` (B, C, H, W) raw decoder features; ``prototypes`` (K, C) the bias-free classifier
    weights, so similarities s_ki = <c_k, f_i> are the logits; ``log_prior`` (K,) log class prior.
    Cost d_ki = 1 - cos(c_k, f_i).
      target->prototype: P(k|i) = softmax_k(s_ki / tau + log pi_k);  L_t2p = rho * mean_i sum_k d_ki P(k|i)
      prototype->target: Q(i|k) = softmax_i(s_ki / tau) over all N pixels of the batch;
                         L_p2t = (1 - rho) * sum_k pi_k sum_i d_ki Q(i|k)
    Returns (loss, P) where P (K, N) is the soft assignment, detached (ProtoContra's EMA prior uses it).
    """
    k, c = prototypes.shape
    f = features.permute(1, 0, 2, 3).reshape(c, -1)                     # (C, N)
    sim = prototypes @ f                                                 # (K, N) = logits
    cost = 1 - F.normalize(prototypes, dim=1) @ F.normalize(f, dim=0)    # (K, N)
    p_t2p = torch.softmax(sim / tau + log_prior[:, None], dim=0)
    q_p2t = torch.softmax(sim / tau, dim=1)
    loss_t2p = rho * (cost * p_t2p).sum(0).mean()
    loss_p2t = (1 - rho) * (log_prior.exp() * (cost * q_p2t).sum(1)).sum()
    return loss_t2p + loss_p2t, p_t2p.detach()
