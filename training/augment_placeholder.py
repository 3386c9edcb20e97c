"""Placeholder for ``training.augment`` (written on the ``augment`` branch): today's augmentation,
with the interface the DataLoader workers call. Removed when that branch is merged."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from training.data import JITTER_PX, window_crop


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training augmentations."""

    intensity_scale: tuple[float, float] = (0.85, 1.15)
    noise_sigma: float = 0.03
    slice_shift_p: tuple[float, float, float] = (0.15, 0.7, 0.15)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AugmentConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def augment_grader_crop(window: NDArray, *, condition_group: int, sigma_px: float, rng: np.random.Generator,
                        cfg: AugmentConfig) -> NDArray[np.float32]:
    """A training crop out of a cached window: jittered by the localiser's error, rescaled, noised."""
    dx, dy = np.clip(np.round(rng.normal(0, sigma_px, 2)), -JITTER_PX, JITTER_PX).astype(int)
    dz = int(rng.choice([-1, 0, 1], p=list(cfg.slice_shift_p)))
    crop = window_crop(window, dx, dy, dz).astype(np.float32)
    crop = crop * rng.uniform(*cfg.intensity_scale)
    return crop + rng.normal(0, cfg.noise_sigma, crop.shape).astype(np.float32)


def augment_localiser(image: NDArray, target: NDArray, rng: np.random.Generator,
                      cfg: AugmentConfig) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """A training localiser pair: the image rescaled, the target as it is."""
    return image.astype(np.float32) * np.float32(rng.uniform(*cfg.intensity_scale)), target.astype(np.float32)
