"""Convolutional building blocks shared by the 2D tokenizers (baseline, binary, multi-scale).

A compact VQGAN-style encoder/decoder (Esser et al., 2021): residual blocks with GroupNorm and SiLU, strided
downsampling, nearest-neighbour upsampling. Sized for 28x28 grayscale on CPU by default, but any channel widths,
depths and downsampling factors work; the input size only has to divide by the downsampling factor.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    groups = 8 if channels % 8 == 0 else 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(cin),
            nn.SiLU(),
            nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder2D(nn.Module):
    """(B, C, H, W) -> (B, z_channels, H / 2^(len(mults)-1), W / 2^(len(mults)-1))."""

    def __init__(self, in_channels: int, channels: int, channel_mults: list[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        cin = channels
        for level, mult in enumerate(channel_mults):
            cout = channels * mult
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, cout))
                cin = cout
            if level < len(channel_mults) - 1:
                layers.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        layers += [ResBlock(cin, cin), _norm(cin), nn.SiLU(), nn.Conv2d(cin, z_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder2D(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * 2^(len(mults)-1), w * 2^(len(mults)-1)).

    Each upsampling step convolves straight to the next (finer) level's width, so the costly full-resolution
    layers run at the narrowest width.
    """

    def __init__(
        self, out_channels: int, channels: int, channel_mults: list[int], num_res_blocks: int, z_channels: int
    ):
        super().__init__()
        cin = channels * channel_mults[-1]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, cin, 3, padding=1), ResBlock(cin, cin)]
        for level in reversed(range(len(channel_mults))):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, cin))
            if level > 0:
                cout = channels * channel_mults[level - 1]
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1)]
                cin = cout
        layers += [_norm(cin), nn.SiLU(), nn.Conv2d(cin, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def downsample_factor(channel_mults: list[int]) -> int:
    return 2 ** (len(channel_mults) - 1)
