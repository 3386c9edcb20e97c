"""A tiny network for the training-step tests: one linear layer, no BatchNorm or dropout (accumulated
micro-batches then equal one batch), seeded, with the ``logits`` method the training step calls."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(6, 3)

    def logits(self, x: Tensor) -> Tensor:
        return self.fc(x)
