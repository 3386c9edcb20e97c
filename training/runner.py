"""The PyTorch networks behind ``inference.analyze.Runner``, and their checkpoint files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from inference.model import ModelInfo, ModelMetadata, file_sha256
from training.models import GraderNetwork, Localiser, Networks

MODEL_NAME = "lumbar-node-grader"


def device_of(name: str = "auto") -> torch.device:
    """CUDA when present (``auto``), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchRunner:
    """Localiser and grader in PyTorch eager mode, evaluation mode, no gradients."""

    def __init__(self, localiser: Localiser, grader: GraderNetwork, info: ModelInfo,
                 device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.localiser = localiser.to(self.device).eval()
        self.grader = grader.to(self.device).eval()
        self.info = info

    @property
    def metadata(self) -> ModelMetadata:
        return self.info.metadata

    @torch.no_grad()
    def localise(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        self.localiser.eval()  # the training loop shares these modules and switches them to train()
        return self.localiser(torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device)).cpu().numpy()

    @torch.no_grad()
    def grade(self, crops: NDArray[np.float32], conditions: NDArray[np.int64]) -> tuple[NDArray, NDArray]:
        self.grader.eval()
        probs, cam = self.grader(torch.from_numpy(np.ascontiguousarray(crops, np.float32)).to(self.device),
                                 torch.from_numpy(conditions).to(self.device))
        return probs.cpu().numpy(), cam.cpu().numpy()


def save_model(path: Path, localiser: Localiser, grader: GraderNetwork, meta: ModelMetadata) -> str:
    """Write the final checkpoint (both networks and their metadata); returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"localiser": localiser.state_dict(), "grader": grader.state_dict(), "meta": meta.to_json()}, path)
    return file_sha256(path)


def load_model(path: Path, device: torch.device | None = None) -> TorchRunner:
    """A TorchRunner from a final checkpoint (``RUN/model.pt``); its metadata is ``runner.metadata``.
    The networks are rebuilt from the metadata's ``networks`` (none: a checkpoint from before the
    presets, the small networks)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    meta = ModelMetadata.from_json(state["meta"])
    localiser, grader = Networks.from_json(meta.networks).build()
    localiser.load_state_dict(state["localiser"])
    grader.load_state_dict(state["grader"])
    return TorchRunner(localiser, grader, ModelInfo(meta, file_sha256(path)), device)
