"""The networks: a U-Net level localiser, and two graders with Grad-CAM in the graph: a small
residual 2.5D grader (the ``small`` preset) and a per-slice ResNet with a sequence head across the
slices (the ``competition`` preset). ``Networks`` says which, and with what widths.

All are written here (no torchvision). The residual grader ends in global average pooling and one
linear layer, so Grad-CAM for class c is ReLU(sum_k w_ck A_k) up to a positive scale: the exported
graph returns it next to the probabilities (see DESIGN.md, "Grad-CAM through ONNX"). The sequence
grader pools each slice, weighs the slices by attention (a bidirectional GRU over the pooled
features scores them) and applies one linear layer to the weighted mean: with the attention
weights a_s held fixed, Grad-CAM for class c is ReLU(sum_s a_s sum_k w_ck A_{s,k}), exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

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


class GraderKind(StrEnum):
    """The grader architectures."""

    RESIDUAL = "residual"  # small 2.5D residual network, slices as channels
    SEQUENCE = "sequence"  # per-slice ResNet, attention from a bidirectional GRU across slices


@dataclass(frozen=True)
class LocaliserNet:
    """The localiser's configuration: U-Net base width and input slices."""

    width: int = 12
    in_channels: int = 3


@dataclass(frozen=True)
class GraderNet:
    """The grader's configuration. RESIDUAL: ``width``, ``in_channels`` (the crop's slices).
    SEQUENCE: a ResNet of BasicBlocks ``blocks`` with widths ``width`` x (1, 2, 4, 8), the stem's
    max-pool (``stem_pool``) and the last stage's stride (``last_stride``: 1 doubles the Grad-CAM
    resolution), then a GRU of ``hidden`` units per direction."""

    kind: GraderKind = GraderKind.RESIDUAL
    width: int = 24
    in_channels: int = 3
    dropout: float = 0.2
    blocks: tuple[int, ...] = (3, 4, 6, 3)
    stem_pool: bool = True
    last_stride: int = 2
    hidden: int = 128


@dataclass(frozen=True)
class Networks:
    """Both networks' configuration, as model.pt's and model.json's ``networks`` record it."""

    localiser: LocaliserNet = field(default_factory=LocaliserNet)
    grader: GraderNet = field(default_factory=GraderNet)

    def to_json(self) -> dict[str, Any]:
        return {"localiser": asdict(self.localiser),
                "grader": {**asdict(self.grader), "kind": self.grader.kind.value, "blocks": list(self.grader.blocks)}}

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> Networks:
        """From ``to_json``'s output; None (a model written before presets): the small networks."""
        if not raw:
            return cls()
        grader = dict(raw["grader"])
        grader["kind"] = GraderKind(grader["kind"])
        grader["blocks"] = tuple(grader["blocks"])
        return cls(LocaliserNet(**raw["localiser"]), GraderNet(**grader))

    def build(self) -> tuple[Localiser, GraderNetwork]:
        """New networks of this configuration (random weights)."""
        g = self.grader
        localiser = Localiser(self.localiser.width, self.localiser.in_channels)  # first: the seeded draws as before
        grader: GraderNetwork = (Grader(g.width, g.dropout, g.in_channels) if g.kind is GraderKind.RESIDUAL
                                 else SequenceGrader(g))
        return localiser, grader


class Localiser(nn.Module):
    """U-Net: (B, 3, n, n) central sagittal slices -> (B, 5, n, n) disc heatmaps in [0, 1]."""

    def __init__(self, width: int = 12, in_channels: int = 3):
        super().__init__()
        w = [width, width * 2, width * 4, width * 6, width * 8]
        self.down = nn.ModuleList([nn.Sequential(_conv(in_channels, w[0]), _conv(w[0], w[0]))])
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

    def __init__(self, width: int = 24, dropout: float = 0.2, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            _conv(in_channels, width), _Residual(width, width * 3 // 2, 2), _Residual(width * 3 // 2, width * 2, 2),
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

    def reference_cam(self, crops: Tensor, conditions: Tensor, classes: Tensor | None = None) -> Tensor:
        """Grad-CAM by autograd (the export's check of ``class_maps``): ReLU(sum_k mean(d logit_c /
        d A_k) * A_k) for class c of ``classes`` (default: the predicted class), (B, h, w)."""
        maps = self.features(crops).detach().requires_grad_(True)
        logits = self.head(maps.mean(dim=(2, 3))).view(-1, N_GROUPS, N_CLASSES)
        own = logits[torch.arange(len(crops)), self.condition_group[conditions]]
        chosen = own.gather(1, (own.argmax(dim=1) if classes is None else classes).view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(chosen, maps)
        return torch.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1)).detach()

    def forward(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]:
        own, cams = self.class_maps(crops, conditions)
        return calibrated(own, cams, self.temperature[conditions])


# ---- the competition grader: per-slice ResNet (torchvision's names), sequence head -----------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, parameter for parameter (``conv1, bn1, conv2, bn2, downsample``)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (None if stride == 1 and c_in == c_out else
                           nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """A torchvision-layout ResNet trunk (no ``fc``): ``conv1, bn1, layer1 .. layer4``, one input
    channel; (N, 1, H, W) -> feature maps (N, 8 * width, h, w). A torchvision state dict loads by name."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), width: int = 64, stem_pool: bool = True,
                 last_stride: int = 2, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            stride = 1 if i == 0 else (last_stride if i == len(blocks) - 1 else 2)
            layer = nn.Sequential(*(BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
                                    for j in range(n)))
            self.add_module(f"layer{i + 1}", layer)
            c_in = c_out
        self.n_layers = len(blocks)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class SequenceGrader(nn.Module):
    """(B, S, n, n) 2.5D crops, any S and n -> logits (B, 3 groups, 3 classes): each slice through
    one ResNet (1 channel), its maps pooled per slice; a bidirectional GRU over the S pooled vectors
    scores each slice, the softmax of the scores (the attention a_s) weighs the slices' pooled
    vectors, and one linear layer maps their weighted mean to the logits.

    ``class_maps`` gives, for class c, ReLU(sum_s a_s sum_k w_ck A_{s,k}): the Grad-CAM of the
    logit with the attention held fixed (``reference_cam`` computes it by autograd)."""

    temperature: Tensor
    condition_group: Tensor

    def __init__(self, cfg: GraderNet):
        super().__init__()
        self.backbone = ResNet(cfg.blocks, cfg.width, cfg.stem_pool, cfg.last_stride)
        k = self.backbone.out_channels
        self.gru = nn.GRU(k, cfg.hidden, batch_first=True, bidirectional=True)
        self.attention = nn.Linear(2 * cfg.hidden, 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(k, N_GROUPS * N_CLASSES)
        self.register_buffer("temperature", torch.ones(len(CONDITIONS)))
        self.register_buffer("condition_group", torch.tensor(CONDITION_GROUP, dtype=torch.long))

    def slice_maps(self, crops: Tensor) -> Tensor:
        """(B, S, n, n) -> every slice's feature maps (B, S, K, h, w)."""
        b, s, h, w = crops.shape
        maps = self.backbone(crops.reshape(b * s, 1, h, w))
        return maps.view(b, s, *maps.shape[1:])

    def attention_weights(self, pooled: Tensor) -> Tensor:
        """Pooled per-slice features (B, S, K) -> attention over the slices (B, S), summing to 1."""
        scores, _ = self.gru(pooled)
        return torch.softmax(self.attention(scores).squeeze(-1), dim=1)

    def _pooled(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        pooled = maps.mean(dim=(3, 4))  # (B, S, K)
        a = self.attention_weights(pooled)
        return (a.unsqueeze(-1) * pooled).sum(dim=1), a

    def logits(self, crops: Tensor) -> Tensor:
        vector, _ = self._pooled(self.slice_maps(crops))
        return self.head(self.dropout(vector)).view(-1, N_GROUPS, N_CLASSES)

    def class_maps(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]:
        """Uncalibrated logits of each crop's own condition (B, 3) and each class's attention-weighted
        class activation map (B, 3, h, w) (see the class docstring)."""
        maps = self.slice_maps(crops)
        vector, a = self._pooled(maps)
        logits = self.head(vector).view(-1, N_GROUPS, N_CLASSES)
        group = self.condition_group[conditions]
        own = logits[torch.arange(logits.shape[0]), group]
        weights = self.head.weight.view(N_GROUPS, N_CLASSES, -1)[group]  # (B, 3, K)
        weighted = (a[:, :, None, None, None] * maps).sum(dim=1)  # sum_s a_s A_s: (B, K, h, w)
        return own, F.relu(torch.einsum("bck,bkhw->bchw", weights, weighted))

    def reference_cam(self, crops: Tensor, conditions: Tensor, classes: Tensor | None = None) -> Tensor:
        """Grad-CAM by autograd with the attention held fixed, for class c of ``classes`` (default: the
        predicted class), (B, h, w):
        ReLU(sum_s sum_k mean_hw(d logit_c / d A_{s,k}) * A_{s,k})."""
        maps = self.slice_maps(crops).detach().requires_grad_(True)
        pooled = maps.mean(dim=(3, 4))
        a = self.attention_weights(pooled).detach()
        logits = self.head((a.unsqueeze(-1) * pooled).sum(dim=1)).view(-1, N_GROUPS, N_CLASSES)
        own = logits[torch.arange(len(crops)), self.condition_group[conditions]]
        chosen = own.gather(1, (own.argmax(dim=1) if classes is None else classes).view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(chosen, maps)
        return torch.relu((grads.mean(dim=(3, 4), keepdim=True) * maps).sum(dim=(1, 2))).detach()

    def forward(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]:
        own, cams = self.class_maps(crops, conditions)
        return calibrated(own, cams, self.temperature[conditions])


GraderNetwork = Grader | SequenceGrader


def grader_logits(grader: GraderNetwork, crops: list[Tensor]) -> Tensor:
    """Logits (B, 3, 3) of a batch given as one tensor per crop shape, concatenated in that order."""
    return torch.cat([grader.logits(x) for x in crops]) if len(crops) != 1 else grader.logits(crops[0])


def calibrated(own: Tensor, cams: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """What a grader serves from ``class_maps``: probabilities at each crop's temperature (B, 3) and
    the map of the predicted class (B, h, w)."""
    probs = torch.softmax(own / temperature.unsqueeze(1), dim=1)
    predicted = own.argmax(dim=1)
    return probs, cams[torch.arange(own.shape[0]), predicted]
