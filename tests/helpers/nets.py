"""Tiny networks shared by the pruning tests."""

from __future__ import annotations

import torch
import torch.nn as nn


class Chain(nn.Module):
    """conv1-BN-ReLU -> conv2-BN-ReLU -> conv3-BN-ReLU -> pool -> Linear."""

    def __init__(self, in_channels: int = 1, widths=(8, 12, 16), num_classes: int = 10) -> None:
        super().__init__()
        a, b, c = widths
        self.conv1 = nn.Conv2d(in_channels, a, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(a)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(a, b, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(b)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(b, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class MixedNet(nn.Module):
    """Mask points of every kind: BN, a biased conv without BN, a depthwise pair, a hidden Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=True)  # no BN: masked at the conv output
        self.pw = nn.Conv2d(12, 16, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)  # depthwise: coupled with pw
        self.dw_bn = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 12, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12 * 8 * 8, 20)  # flatten without pooling: 64 inputs per channel
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.pw_bn(self.pw(x)))
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)
