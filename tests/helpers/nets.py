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
