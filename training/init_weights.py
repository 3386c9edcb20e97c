"""``lumbar-node train --init-weights FILE``: start the grader's backbone from a state dict the user
brings (nothing is ever downloaded).

FILE is a PyTorch state dict (``.pth``/``.pt``, read with ``torch.load(weights_only=True)``; a dict
holding it under ``state_dict`` or ``model`` also works) or a ``.safetensors`` file, in torchvision's
ResNet layout (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...; a ``backbone.`` or
``module.`` prefix is dropped). Tensors are matched by name and shape; ``conv1.weight`` with three
input channels (ImageNet RGB) is summed to the backbone's one channel; ``fc.*`` is ignored.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
from torch import Tensor, nn

log = structlog.stdlib.get_logger(__name__)

_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


class InitWeightsError(ValueError):
    """The file cannot be read, or none of its tensors fits the backbone."""


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file or a PyTorch state dict file."""
    if not path.is_file():
        raise InitWeightsError(f"--init-weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load and safetensors raise many kinds
        raise InitWeightsError(f"--init-weights {path}: cannot read it: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict):
        raise InitWeightsError(f"--init-weights {path}: not a state dict (a {type(raw).__name__})")
    return {k: v for k, v in raw.items() if isinstance(v, Tensor)}


def _strip(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def load_into(module: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy the tensors of ``state`` whose name and shape fit ``module`` (``conv1.weight`` with 3
    input channels summed to 1 when the module takes 1; ``fc.*`` ignored). Returns (loaded names,
    names of the module's parameters and buffers left as they were)."""
    own = module.state_dict()
    matched: dict[str, Tensor] = {}
    for name, tensor in state.items():
        key = _strip(name)
        if key.startswith("fc.") or key not in own:
            continue
        if key == "conv1.weight" and tensor.ndim == 4 and tensor.shape[1] == 3 and own[key].shape[1] == 1:
            tensor = tensor.sum(dim=1, keepdim=True)
        if tuple(tensor.shape) == tuple(own[key].shape):
            matched[key] = tensor.to(own[key].dtype)
    module.load_state_dict(matched, strict=False)
    return sorted(matched), sorted(k for k in own if k not in matched)


def init_grader(grader: nn.Module, path: Path) -> int:
    """Start ``grader``'s backbone (the competition grader's ResNet) from the file at ``path``;
    how many tensors were loaded. InitWeightsError when the grader has no backbone or none fits."""
    backbone = getattr(grader, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise InitWeightsError("--init-weights needs a grader with a ResNet backbone (--preset competition)")
    loaded, left = load_into(backbone, read_state_dict(path))
    if not loaded:
        raise InitWeightsError(f"--init-weights {path}: no tensor matches the grader's backbone by name and shape "
                               "(torchvision's ResNet layout: conv1.weight, bn1.*, layer1.0.conv1.weight, ...)")
    log.info("grader backbone initialised from a state dict", path=str(path), loaded=len(loaded),
             not_loaded=len(left), left_as_initialised=[k for k in left if not k.endswith("num_batches_tracked")][:20])
    return len(loaded)
