"""A small residual CNN (BatchNorm, identity and downsample shortcuts) for 3×H×W images.

Three stages of basic blocks (two 3×3 convs with BatchNorm, a residual add, ReLU); a stage that halves the
resolution or changes the width has a 1×1 conv + BatchNorm on its shortcut. Global average pooling feeds
a linear head. With the default widths (16, 32, 64) it has about 120k parameters and runs on CPU.

Example:
    >>> import torch
    >>> net = ResNet(num_classes=10, input_shape=(3, 32, 32))
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from wmark.errors import UsageError


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.down is None else self.down(x)
        return torch.relu(out + shortcut)


class ResNet(nn.Module):
    """Stem conv → stages of :class:`BasicBlock` → global average pool → linear head."""

    def __init__(self, *, num_classes: int, input_shape: tuple[int, ...], widths: tuple[int, ...] = (16, 32, 64),
                 blocks: tuple[int, ...] = (1, 1, 2)) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise UsageError(f"A ResNet needs inputs shaped C×H×W, got {tuple(input_shape)}.")
        self.stem = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride=2 if i > 0 and j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.pool(self.blocks(x))
        return self.fc(torch.flatten(x, 1))
