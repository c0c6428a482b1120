"""The U-Net used for both stages (the paper's network, width and depth as parameters)."""

from __future__ import annotations

import torch
from torch import nn

ARCHITECTURES = ("unet",)


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU; convs carry no bias because BN follows."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` poolings and ``width`` base features; returns logits.

    With ``in_channels=3, width=32, depth=4`` this is the paper's network (about 7.76 M
    parameters): 32-64-128-256 encoder, 512 bottleneck, transposed-conv upsampling.
    Inputs must have sides divisible by ``2**depth``.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, depth: int = 4, out_channels: int = 1):
        super().__init__()
        if in_channels < 1 or width < 1 or depth < 1:
            raise ValueError("in_channels, width and depth must be positive")
        self.in_channels, self.width, self.depth = in_channels, width, depth
        feats = [width * 2**i for i in range(depth)]
        self.encoders = nn.ModuleList()
        cin = in_channels
        for f in feats:
            self.encoders.append(_block(cin, f))
            cin = f
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(feats[-1], feats[-1] * 2)
        self.upconvs = nn.ModuleList(nn.ConvTranspose2d(f * 2, f, 2, stride=2) for f in reversed(feats))
        self.decoders = nn.ModuleList(_block(f * 2, f) for f in reversed(feats))
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.upconvs, self.decoders, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    def architecture(self) -> dict:
        """What :func:`build_network` needs to rebuild this network."""
        return {"name": "unet", "in_channels": self.in_channels, "width": self.width, "depth": self.depth}


def build_network(arch: dict) -> UNet:
    """Rebuild a network from :meth:`UNet.architecture` output (validated, no code execution)."""
    if not isinstance(arch, dict) or arch.get("name") not in ARCHITECTURES:
        raise ValueError(f"unknown network architecture: {arch!r}")
    try:
        return UNet(int(arch["in_channels"]), int(arch["width"]), int(arch["depth"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"incomplete network architecture {arch!r}: {exc}") from exc


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
