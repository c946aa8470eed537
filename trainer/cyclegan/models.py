"""CycleGAN networks after NNoculation Appendix A.3 (Veldanda et al., AISec'21) and Zhu et al.

Generator (ResNet): c7s1-ngf, d(2 ngf), d(4 ngf), R residual blocks R(4 ngf), u(2 ngf),
u(ngf), c7s1-C, tanh; c7s1-k is a 7x7 stride-1 convolution with k filters, instance norm
and ReLU, d-k a 3x3 stride-2 convolution, u-k a 3x3 stride-1/2 transposed convolution.
Discriminator (PatchGAN): C(ndf)-C(2 ndf)-...-1, 4x4 convolutions with leaky ReLU, each
output scoring one receptive-field patch. Sizes are parameters so that 28x28 grey and
32x32 colour both fit (two downsamplings need H and W divisible by 4).
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResidualBlock(nn.Module):
    """R-k: two reflect-padded 3x3 convolutions with instance norm, added to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


class ResnetGenerator(nn.Module):
    """Maps images in [-1, 1] (B, C, H, W) to images in [-1, 1] of the same shape."""

    def __init__(self, channels: int = 1, ngf: int = 32, n_blocks: int = 3) -> None:
        super().__init__()
        self.channels, self.ngf, self.n_blocks = channels, ngf, n_blocks
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, 7),
            _norm(ngf),
            nn.ReLU(inplace=True),
        ]
        for mult in (1, 2):  # two downsamplings: ngf -> 2 ngf -> 4 ngf
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                _norm(ngf * mult * 2),
                nn.ReLU(inplace=True),
            ]
        layers += [ResidualBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):  # two upsamplings: 4 ngf -> 2 ngf -> ngf
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1
                ),
                _norm(ngf * mult // 2),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class PatchDiscriminator(nn.Module):
    """PatchGAN: one real/fake score per receptive-field patch, (B, 1, h, w), no sigmoid (LSGAN)."""

    def __init__(self, channels: int = 1, ndf: int = 32, n_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = ndf
        for _ in range(1, n_layers):
            layers += [
                nn.Conv2d(width, width * 2, 4, stride=2, padding=1),
                _norm(width * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width *= 2
        layers += [
            nn.Conv2d(width, width * 2, 4, stride=1, padding=1),
            _norm(width * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width * 2, 1, 4, stride=1, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out
