"""A compact 2-D UNET for binary lung segmentation.

Plain encoder-decoder with skip connections (Ronneberger et al. 2015): two 3x3 conv + BatchNorm + ReLU
per level, 2x2 max pooling down, 2x2 transposed convolution up, a 1x1 convolution to logits. BatchNorm
keeps it fast on CPU (it folds into the convolutions at inference) and stable to train at large batch.

Size at the defaults (base_width 16, depth 4): ~1.9 M parameters, ~3.9 MB as fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1  # input channels; 1 = grayscale X-ray in [0, 1]
    out_channels: int = 1  # output logit channels; 1 = lung vs background
    base_width: int = 16  # feature channels at full resolution; doubled at every level down
    depth: int = 4  # number of 2x downsamplings; the input side must be a multiple of 2**depth px
    dropout: float = 0.0  # dropout probability at the bottleneck (0 = off)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """float32 (N, in_channels, S, S) in [0, 1] -> logits float32 (N, out_channels, S, S); S % 2**depth == 0."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.depth < 1 or cfg.base_width < 1:
            raise ValueError(f"expected depth >= 1 and base_width >= 1, got {cfg}")
        self.cfg = cfg
        widths = [cfg.base_width * 2**i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList()
        c_in = cfg.in_channels
        for w in widths[:-1]:
            self.down.append(_double_conv(c_in, w))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(widths[-2], widths[-1])
        self.drop = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for w_deep, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_deep, w, 2, stride=2))
            self.up_conv.append(_double_conv(2 * w, w))
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.cfg.depth
        if x.ndim != 4 or x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"expected input (N, {self.cfg.in_channels}, S, S) with S a multiple of {multiple}, "
                f"got shape {tuple(x.shape)}"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.drop(self.bottleneck(x))
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips)):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def build_unet(cfg: UNetConfig) -> nn.Module:
    """A freshly initialised UNet for `cfg` (train mode)."""
    return UNet(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
