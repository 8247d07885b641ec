"""Segmentation networks shared by the harness and the methods (``forward -> (features, logits)``)."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from sfdabench.blocks.nets.unet import UNet

ARCHITECTURES = {"unet": UNet}


def build_segmenter(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """Build the network named by ``cfg.arch`` with the architecture keys of the ``source`` config group."""
    arch = cfg.get("arch", "unet")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}'; available: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](in_channels=int(cfg.get("in_channels", 3)), num_classes=num_classes,
                               width=int(cfg.get("width", 64)), depth=int(cfg.get("depth", 4)),
                               dropout=float(cfg.get("dropout", 0.0)),
                               classifier_dropout=float(cfg.get("classifier_dropout", 0.0)))
