"""ONNX Runtime sessions for the exported model: created once, CUDA first when present, CPU else.

A model folder holds ``localiser.onnx``, ``grader.onnx`` and ``model.json`` (label order,
preprocessing, version, training data, metrics, checkpoint hash, crop offsets). The default model
ships inside this package, in ``inference/models/default``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from inference.model import ModelError, ModelInfo, ModelMetadata, file_sha256

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "default"
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def usable_providers(wanted: tuple[str, ...] = DEFAULT_PROVIDERS) -> list[str]:
    """The wanted execution providers this machine can run, in order; CPU always last.

    onnxruntime-gpu lists CUDA even where no GPU or driver is present (it then fails noisily at
    session creation), so CUDA is only asked for when an NVIDIA device node is there."""
    available = set(ort.get_available_providers())
    has_gpu = Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None
    out = [p for p in wanted if p in available and (p == "CPUExecutionProvider" or has_gpu)]
    return out if "CPUExecutionProvider" in out else [*out, "CPUExecutionProvider"]


def _session(path: Path, providers: tuple[str, ...]) -> ort.InferenceSession:
    if not path.is_file():
        raise ModelError(f"missing model file {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Do not let idle worker threads spin between runs: the node's own preprocessing needs the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=usable_providers(providers))


class OnnxRunner:
    """The localiser and grader as ONNX Runtime sessions (see ``inference.analyze.Runner``)."""

    def __init__(self, model_dir: Path | None = None, providers: tuple[str, ...] = DEFAULT_PROVIDERS,
                 precision: str = "fp32"):
        self.model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
        self.metadata = ModelMetadata.read(self.model_dir / "model.json")
        suffix = "" if precision == "fp32" else f".{precision}"
        self.localiser = _session(self.model_dir / f"localiser{suffix}.onnx", providers)
        self.grader = _session(self.model_dir / f"grader{suffix}.onnx", providers)
        self.providers = self.grader.get_providers()
        self.dtype = np.float16 if precision == "fp16" else np.float32
        self.info = ModelInfo(self.metadata, file_sha256(self.model_dir / f"grader{suffix}.onnx"))

    def localise(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        heatmaps = self.localiser.run(None, {"images": images.astype(self.dtype)})[0]
        return np.asarray(heatmaps, np.float32)

    def grade(self, crops: NDArray[np.float32],
              conditions: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        probs, cam = self.grader.run(None, {"crops": crops.astype(self.dtype), "conditions": conditions})
        return np.asarray(probs, np.float32), np.asarray(cam, np.float32)
