"""CIFAR ResNet-20 (He et al. 2016), named to load akamaster/pytorch_resnet_cifar10 checkpoints strictly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample and zero-pad channels; a Module so torch.fx traces the F.pad call."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _make_shortcut(in_planes: int, planes: int, stride: int, kind: str) -> nn.Module:
    """Build the downsampling shortcut: "A" has no weights (as the checkpoint), "B" projects with 1x1 conv + BN."""
    if kind == "A":
        if stride != 2 or planes != 2 * in_planes:
            raise ValueError("shortcut 'A' only supports stride 2 with doubled channels")
        return PadShortcut(planes // 4)
    if kind == "B":
        return nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )
    raise ValueError(f"unknown shortcut {kind!r}; use 'A' or 'B'")


class ResNetCifar(nn.Module):
    """Stem conv, three stages of BasicBlocks, global average pool, linear head."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10, width: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        planes = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.layer1 = _make_stage(planes[0], planes[0], num_blocks[0], 1, shortcut)
        self.layer2 = _make_stage(planes[0], planes[1], num_blocks[1], 2, shortcut)
        self.layer3 = _make_stage(planes[1], planes[2], num_blocks[2], 2, shortcut)
        self.linear = nn.Linear(planes[2], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs and linear, as the reference implementation."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
    """Stack `blocks` BasicBlocks; only the first one changes stride/width."""
    layers = [BasicBlock(in_planes, planes, stride, shortcut)]
    layers += [BasicBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet20(num_classes: int = 10, width: int = 1, shortcut: str = "A") -> nn.Module:
    """ResNet-20 for 32x32 inputs; `width` multiplies the 16/32/64 channels."""
    return ResNetCifar([3, 3, 3], num_classes=num_classes, width=width, shortcut=shortcut)
