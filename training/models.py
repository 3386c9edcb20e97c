"""The two networks: a small U-Net level localiser and a small residual grader with Grad-CAM.

Both are written here (no torchvision). The grader ends in global average pooling and one linear
layer, so Grad-CAM for class c is ReLU(sum_k w_ck A_k) up to a positive scale: the exported graph
returns it next to the probabilities (see DESIGN.md, "Grad-CAM through ONNX").
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inference.labels import CONDITIONS, LEVELS, ConditionGroup

N_GROUPS = 3  # spinal, foraminal, subarticular
N_CLASSES = 3
# Condition index (CONDITIONS order) -> its group's head.
CONDITION_GROUP = [list(ConditionGroup).index(c.group) for c in CONDITIONS]


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Localiser(nn.Module):
    """U-Net: (B, 3, 128, 128) central sagittal slices -> (B, 5, 128, 128) disc heatmaps in [0, 1]."""

    def __init__(self, width: int = 12):
        super().__init__()
        w = [width, width * 2, width * 4, width * 6, width * 8]
        self.down = nn.ModuleList([nn.Sequential(_conv(3, w[0]), _conv(w[0], w[0]))])
        for a, b in itertools.pairwise(w):
            self.down.append(nn.Sequential(nn.MaxPool2d(2), _conv(a, b), _conv(b, b)))
        self.up = nn.ModuleList()
        for a, b in zip(w[::-1][:-1], w[::-1][1:], strict=True):
            self.up.append(nn.Sequential(_conv(a + b, b), _conv(b, b)))
        self.head = nn.Conv2d(w[0], len(LEVELS), 1)

    def logits(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))


class _Residual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv(c_in, c_out, stride), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Grader(nn.Module):
    """(B, 3, 48, 48) 2.5D crops -> logits (B, 3 groups, 3 classes) from one shared backbone.

    ``forward(crops, conditions)`` returns what is served: calibrated probabilities of each crop's
    own condition (B, 3) and the Grad-CAM map of its predicted class (B, 6, 6).
    """

    temperature: Tensor  # buffers (register_buffer): per condition, and each condition's group
    condition_group: Tensor

    def __init__(self, width: int = 24, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, width), _Residual(width, width * 3 // 2, 2), _Residual(width * 3 // 2, width * 2, 2),
            _Residual(width * 2, width * 4, 2), _Residual(width * 4, width * 4, 1),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width * 4, N_GROUPS * N_CLASSES)
        self.register_buffer("temperature", torch.ones(len(CONDITIONS)))
        self.register_buffer("condition_group", torch.tensor(CONDITION_GROUP, dtype=torch.long))

    def logits(self, crops: Tensor) -> Tensor:
        maps = self.features(crops)
        return self.head(self.dropout(maps.mean(dim=(2, 3)))).view(-1, N_GROUPS, N_CLASSES)

    def class_maps(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]:
        """Uncalibrated logits of each crop's own condition (B, 3) and the class activation map of
        each of its three classes (B, 3, h, w): the interface every grader network offers (the
        export's ensemble averages members through it)."""
        maps = self.features(crops)  # (B, K, h, w)
        logits = self.head(maps.mean(dim=(2, 3))).view(-1, N_GROUPS, N_CLASSES)
        group = self.condition_group[conditions]  # (B,)
        own = logits[torch.arange(logits.shape[0]), group]  # (B, 3)
        weights = self.head.weight.view(N_GROUPS, N_CLASSES, -1)[group]  # (B, 3, K)
        return own, F.relu(torch.einsum("bck,bkhw->bchw", weights, maps))

    def forward(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]:
        own, cams = self.class_maps(crops, conditions)
        return calibrated(own, cams, self.temperature[conditions])


def calibrated(own: Tensor, cams: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """What a grader serves from ``class_maps``: probabilities at each crop's temperature (B, 3) and
    the map of the predicted class (B, h, w)."""
    probs = torch.softmax(own / temperature.unsqueeze(1), dim=1)
    predicted = own.argmax(dim=1)
    return probs, cams[torch.arange(own.shape[0]), predicted]
