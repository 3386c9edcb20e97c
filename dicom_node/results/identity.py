"""Who wrote the node's outputs: the product's name, manufacturer, device UID and the one
disclaimer that goes on every result (SR, SC, table, JSON)."""

from __future__ import annotations

from pydicom.uid import generate_uid

from inference import __version__

MANUFACTURER = "Lumbar Node"
DEVICE_NAME = "lumbar-node"
DEVICE_UID = generate_uid(entropy_srcs=[DEVICE_NAME])  # stable: the same device in every report
MODEL_NAME = f"{DEVICE_NAME} {__version__}"

#: The disclaimer, in two lines (the Secondary Captures burn in one per band line).
DISCLAIMER_LINES = (
    "AI result - not for diagnosis.",
    "Model trained on synthetic phantom data, not a clinical model.",
)
DISCLAIMER = " ".join(DISCLAIMER_LINES)


def model_device_uid(sha256: str) -> str:
    """The Device UID of a model in the Contributing Equipment Sequence: one per set of weights, so
    that a retrained model is a new device (IHE AI Results)."""
    return generate_uid(entropy_srcs=[DEVICE_NAME, "model", sha256])
