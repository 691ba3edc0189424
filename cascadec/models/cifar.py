"""The small-input networks of the paper's CIFAR experiments (models only, no training code).

* ``cifar_resnet20`` / ``cifar_resnet56``: He et al. 2016 (Sec. 4.2) CIFAR ResNets, 6n+2
  layers in three stages of 16/32/64 channels. The paper's "option A" shortcut (stride-2
  subsampling plus zero-padded channels, usually a lambda) is replaced by a 1x1 conv + BN
  projection ("option B") wherever the shape changes: a lambda hides the channel
  coupling from Torch-Pruning's dependency tracer and does not export cleanly to ONNX.
  Accuracy is within noise of option A and it costs ~2% more parameters.
* ``cifar_resnet8``: the same family with one block per stage (n=1), fast enough for the
  Fashion-MNIST demo and the test-suite.
* ``cifar_vgg16_bn``: see :func:`cifar_vgg16_bn` for which CIFAR VGG variant.

Every ReLU is its own module (not ``inplace``) so that forward hooks installed on a
BatchNorm (channel masks) see and change the tensor the rest of the network uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "cifar_resnet8",
    "cifar_resnet20",
    "cifar_resnet56",
    "cifar_vgg16_bn",
]


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; projection shortcut only when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3-stage ResNet for 32x32-ish inputs; global pooling makes it input-size agnostic."""

    def __init__(
        self,
        blocks_per_stage: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages: list[nn.Sequential] = []
        for i, width in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class CifarVGG(nn.Module):
    """VGG feature stack (conv-BN-ReLU, max-pools) + global average pool + one Linear."""

    def __init__(self, cfg: list[int | str], *, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                width = int(item)
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _init_weights(model: nn.Module) -> None:
    """Kaiming (fan-out) convs as in the reference CIFAR code; BN starts as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def cifar_resnet8(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 (n=1, ~78k params): small enough to train in seconds on CPU."""
    return CifarResNet(1, num_classes=num_classes, in_channels=in_channels)


def cifar_resnet20(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3, ~0.27M params), the paper's small CIFAR-10 baseline."""
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels)


def cifar_resnet56(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (n=9, ~0.86M params), the usual CIFAR channel-pruning benchmark."""
    return CifarResNet(9, num_classes=num_classes, in_channels=in_channels)


def cifar_vgg16_bn(*, num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    """VGG-16 with BN for 32x32 inputs, the variant common in the pruning literature.

    The 13 conv layers of VGG-16 (config "D") each followed by BatchNorm, five 2x2
    max-pools (32 -> 1), then global average pooling and a *single*
    ``Linear(512, num_classes)``, as in the network-slimming / "Pruning Filters for
    Efficient ConvNets" CIFAR code, instead of ImageNet VGG's three 4096-wide FC layers,
    which would be ~90% of the parameters and dominate any channel-pruning result.
    Needs inputs of at least 32x32 (five halvings).
    """
    return CifarVGG(_VGG16_CFG, num_classes=num_classes, in_channels=in_channels)
