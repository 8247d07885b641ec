"""The 2D U-Net of the DFG / ProtoContra protocol (spec section 2.1).

Encoder widths ``width * 2**i`` (64-128-256-512-1024 in the paper), each block two 3x3 conv (no bias) ->
BatchNorm -> ReLU, max-pool downsampling, transposed-conv upsampling with skip concatenation. The last
decoder output is a ``width``-channel feature map at full resolution; the classifier is a bias-free 1x1
conv whose weight rows are the class prototypes that FA / PFA align target features to.

``forward`` returns ``(features, logits)``: every segmenter in sfdabench follows that contract so that
feature-level methods (FA, ProtoContra, SHOT, DPL, the box search) need no special cases.
"""
from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            # Only DPL's MC-dropout needs this; the protocol's U-Net has no dropout (default 0).
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Up(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_ch, out_ch, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # Inputs whose size is not a multiple of 2**depth: pad to the skip's size (Pytorch-UNet does the same).
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:
            x = nn.functional.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net returning ``(features, logits)``; ``classifier`` is the bias-free 1x1 prototype layer."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, width: int = 64, depth: int = 4,
                 dropout: float = 0.0, classifier_dropout: float = 0.0):
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1])) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], dropout) for i in reversed(range(depth)))
        # Element-wise dropout on the classifier input, for MC-dropout methods (DPL's placement). Neither dropout
        # has weights, so state dicts load across all settings; the features returned are taken before it.
        self.classifier_dropout = nn.Dropout(classifier_dropout) if classifier_dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=1, bias=False)
        self.num_classes = num_classes
        self.feature_dim = widths[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.ups:
            h = up(h, skips.pop())
        return h, self.classifier(self.classifier_dropout(h))
