"""An architecture with no convolution, for the error Fine-Pruning gives it (issue 33)."""

from __future__ import annotations

import torch
from torch import nn


class LinearNet(nn.Module):
    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 10, height: int = 28, width: int = 28
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels * height * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(x.flatten(1))
        return logits
