"""Training augmentation that prepares the networks for real scanners: pure numpy (and cv2 for warps
and blur), no torch, no global state, so that DataLoader workers call it per item with their own
``numpy.random.Generator``.

Two kinds of sample:

- a grader window: the float16 crop window cached per labelled finding, (slices + 2, H + 2m, W + 2m)
  with an m-pixel jitter margin (``training.data.CACHE_SPEC``), cut to the network's input
  (``GRADER_SPEC``: 3 x 48 x 48) by ``augment_grader_crop``; the finding is the window's centre;
- a localiser pair: (image (3, 128, 128), heatmap target (5, 128, 128)) on the sagittal grid
  (``LOCALISER_SPEC``), by ``augment_localiser``.

Geometric augmentations move the target with the image. The grader crop is jittered by (dx, dy)
pixels drawn from the localiser's measured placement error (``sigma_px``) and by dz slices (today's
-1/0/+1 with p .15/.7/.15); rotation and scale turn about the finding (the window centre), so the
finding stays where the jitter put it. The localiser's image and heatmaps go through one affine
warp (rotation and scale about the image centre, then a shift). Intensity augmentations (gamma,
contrast, a smooth multiplicative bias field, blur, the intensity scale, Gaussian or Rician noise)
touch the image only, the same for every slice of a sample except the noise.

Mirroring (left-right, with the labels swapped), worked out for this project's side-shared grader.
A left-right mirror of a patient is another plausible patient whose left findings are the
original's right ones. ``inference.levels.crop_axes`` already cuts every right-sided crop in a
mirrored frame (lateral is +u for the axial subarticular crops, +across for the sagittal foraminal
ones), so that one grader serves both sides:

- foraminal and subarticular crops: the mirrored patient's left crop is, pixel for pixel, the
  original's right crop, and it carries the original's right severity (the swapped label). In the
  side-shared frame the whole-study mirror therefore yields exactly the samples the data already
  holds; flipping one crop alone (columns, or the slice order) would put the labelled side where
  the grader never looks, which is wrong. So sided crops are never flipped here.
- spinal canal crops (sagittal, unsided, channels ordered towards the patient's left): the mirror
  reverses the slice order and keeps the label. This is the one new sample, and ``mirror_p`` draws it.
- the localiser: the sagittal stack's slice order is reversed (its three channels run towards the
  patient's left) and the in-plane image is unchanged, so the heatmaps (the levels) stay as they are.

No per-sample label swap is ever needed; where a whole study is mirrored in the data (a mirrored
cache entry, a mirrored phantom), ``swap_sides`` maps its 25 targets (``inference.labels.LABELS``)
to the mirror image's, and ``mirrored_label`` one label.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from inference.labels import LABELS, Condition, ConditionGroup, Label, Side
from inference.levels import GRADER_SPEC
from inference.preprocess import CropSpec

Range = tuple[float, float]
SLICE_SHIFTS = (-1, 0, 1)  # the dz values of ``AugmentConfig.slice_shift_probs``


@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation with its probability (``*_p``, per sample) and its range; recorded in
    the run's training config (``to_dict``/``to_json``). ``off()`` changes nothing; ``legacy()`` is
    the grader augmentation training used before this module (jitter, slice shift, intensity scale,
    Gaussian noise 0.03), bit for bit for the same generator state."""

    # grader crop: translation jitter (sigma_px from the localiser's measured error) and slice shift
    jitter_p: float = 1.0
    slice_shift_probs: tuple[float, float, float] = (0.15, 0.7, 0.15)  # dz = -1, 0, +1
    # localiser: a shift of the image and its heatmaps, uniform in +-shift_px on each axis
    shift_p: float = 0.3
    shift_px: float = 6.0
    # in-plane affine, both samples (about the finding for grader crops, the image centre otherwise)
    rotate_p: float = 0.3
    rotate_deg: float = 8.0  # uniform in +-rotate_deg
    scale_p: float = 0.3
    scale_range: Range = (0.92, 1.08)  # >1 magnifies
    # left-right mirror: spinal crops' and localiser images' slice order reversed (module docstring)
    mirror_p: float = 0.5
    # intensity, image only
    gamma_p: float = 0.3
    gamma_range: Range = (0.8, 1.25)  # log-uniform; sign(x) |x|^gamma
    contrast_p: float = 0.3
    contrast_range: Range = (0.85, 1.15)  # about the sample's mean
    bias_field_p: float = 0.3
    bias_field_strength: float = 0.15  # max |log gain| of the smooth multiplicative field
    bias_field_order: int = 2  # degree of its Legendre polynomial (in log space)
    blur_p: float = 0.15
    blur_sigma: Range = (0.3, 0.8)  # in-plane Gaussian, pixels
    intensity_scale_p: float = 1.0
    intensity_scale_range: Range = (0.85, 1.15)
    noise_p: float = 1.0
    noise_sigma: Range = (0.01, 0.04)  # normalised intensity units (the volume's 1st-99.5th percentile is 0-1)
    rician_p: float = 0.25  # share of noisy samples whose noise is Rician (magnitude images) not Gaussian

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # from JSON, or a caller's list: stored as the tuple it means
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            items = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in items):
                raise ValueError(f"augment {f.name} must be a finite number or a tuple of them, got {value!r}")
            if isinstance(value, tuple) != (f.name in _TUPLES):
                raise ValueError(f"augment {f.name} must be {'a tuple' if f.name in _TUPLES else 'a number'}, "
                                 f"got {value!r}")
            if f.name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"augment {f.name} must be a probability in [0, 1], got {value}")
            if f.type == "Range" and not (len(value) == 2 and value[0] <= value[1]):
                raise ValueError(f"augment {f.name} must be a (low, high) range with low <= high, got {value}")
        probs = self.slice_shift_probs
        if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"augment slice_shift_probs must be 3 probabilities summing to 1, got {probs}")
        for name in ("scale_range", "gamma_range", "contrast_range", "intensity_scale_range"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"augment {name} must be positive, got {getattr(self, name)}")
        if min(self.blur_sigma) < 0 or min(self.noise_sigma) < 0:
            raise ValueError("augment blur_sigma and noise_sigma must not be negative")
        if self.shift_px < 0 or self.rotate_deg < 0 or self.bias_field_strength < 0:
            raise ValueError("augment shift_px, rotate_deg and bias_field_strength must not be negative")
        if not isinstance(self.bias_field_order, int) or self.bias_field_order < 1:
            raise ValueError(f"augment bias_field_order must be an integer >= 1, got {self.bias_field_order}")

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all: the centre crop, the cached localiser pair."""
        probabilities: dict[str, Any] = {f.name: 0.0 for f in fields(cls) if f.name.endswith("_p")}
        return cls(**probabilities, slice_shift_probs=(0.0, 1.0, 0.0))

    @classmethod
    def legacy(cls) -> AugmentConfig:
        """The augmentation before this module: grader jitter, dz -1/0/+1, intensity scale
        0.85-1.15 and Gaussian noise 0.03 (exactly, for the grader); the localiser had only the
        intensity scale (here it gets the same noise too)."""
        return replace_fields(cls.off(), jitter_p=1.0, slice_shift_probs=(0.15, 0.7, 0.15),
                              intensity_scale_p=1.0, intensity_scale_range=(0.85, 1.15),
                              noise_p=1.0, noise_sigma=(0.03, 0.03), rician_p=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """From ``to_dict``'s output; missing keys take their defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AugmentConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("augmentation settings must be a JSON object")
        return cls.from_dict(data)


_TUPLES = frozenset(f.name for f in fields(AugmentConfig) if f.type == "Range" or f.name == "slice_shift_probs")


def replace_fields(cfg: AugmentConfig, **changes: Any) -> AugmentConfig:
    """``dataclasses.replace`` for an ``AugmentConfig`` (validated again)."""
    return AugmentConfig(**{**asdict(cfg), **changes})


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item of one epoch: the same draws whichever DataLoader worker gets
    the item and however many there are (no state shared between workers or kept in a module)."""
    return np.random.default_rng((seed, epoch, index))


# ---- drawing -----------------------------------------------------------------------------------------
# A probability of 0 or 1, or a range of one value, draws nothing from the generator: switching an
# augmentation off leaves every other draw (and so ``legacy()``) exactly as it was.


def _happens(rng: np.random.Generator, p: float) -> bool:
    if p <= 0.0:
        return False
    return p >= 1.0 or bool(rng.random() < p)


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(r[0]) if r[0] == r[1] else rng.uniform(r[0], r[1])


def _log_uniform(rng: np.random.Generator, r: Range) -> float:
    return float(r[0]) if r[0] == r[1] else math.exp(rng.uniform(math.log(r[0]), math.log(r[1])))


@dataclass(frozen=True)
class Affine:
    """An in-plane similarity: rotation (degrees) and scale about a centre, then a shift (pixels,
    x along columns, y along rows). The identity is ``Affine()``."""

    angle_deg: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)

    @property
    def is_identity(self) -> bool:
        return self.angle_deg == 0.0 and self.scale == 1.0 and self.shift == (0.0, 0.0)

    def forward(self, xy: NDArray, center: tuple[float, float]) -> NDArray:
        """Where source pixels (..., 2) as (x, y) land in the output."""
        c = np.asarray(center, np.float64)
        return c + (np.asarray(xy, np.float64) - c) @ self._linear().T + np.asarray(self.shift)

    def inverse_matrix(self, center: tuple[float, float]) -> NDArray[np.float64]:
        """The 2x3 matrix from output pixel to source pixel (cv2's WARP_INVERSE_MAP)."""
        inv = np.linalg.inv(self._linear())
        c = np.asarray(center, np.float64)
        return np.hstack([inv, (c - inv @ (c + np.asarray(self.shift)))[:, None]])

    def _linear(self) -> NDArray[np.float64]:
        a = math.radians(self.angle_deg)
        return self.scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _draw_affine(rng: np.random.Generator, cfg: AugmentConfig, shift_px: float = 0.0) -> Affine:
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg) if _happens(rng, cfg.rotate_p) else 0.0
    scale = _uniform(rng, cfg.scale_range) if _happens(rng, cfg.scale_p) else 1.0
    shift = (0.0, 0.0)
    if shift_px > 0 and _happens(rng, cfg.shift_p):
        dx, dy = rng.uniform(-shift_px, shift_px, 2)
        shift = (float(dx), float(dy))
    return Affine(float(angle), float(scale), shift)


def _warp(plane: NDArray[np.float32], affine: Affine, center: tuple[float, float], out_hw: tuple[int, int],
          border: int, offset: tuple[float, float] = (0.0, 0.0)) -> NDArray[np.float32]:
    """``plane`` resampled (bilinear) so that output pixel p shows source pixel
    ``center + A^-1 (p - center - shift) + offset`` (A: the affine's rotation and scale)."""
    m = affine.inverse_matrix(center)
    m[:, 2] += offset
    warped = cv2.warpAffine(plane, m, (out_hw[1], out_hw[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=border, borderValue=0.0)
    return warped.astype(np.float32, copy=False)


# ---- intensity (image only) ----------------------------------------------------------------------------


def bias_field(shape: tuple[int, int], rng: np.random.Generator, strength: float,
               order: int = 2) -> NDArray[np.float32]:
    """A smooth multiplicative field (H, W): exp of a random Legendre polynomial of degree ``order``
    (no constant term: the intensity scale is the global gain), with max |log field| drawn in
    [0, ``strength``]."""
    h, w = shape
    y, x = np.linspace(-1.0, 1.0, h), np.linspace(-1.0, 1.0, w)
    log_field = np.zeros(shape)
    for i in range(order + 1):
        for j in range(order + 1 - i):
            if i == j == 0:
                continue
            py = np.polynomial.legendre.legval(y, [0] * i + [1])
            px = np.polynomial.legendre.legval(x, [0] * j + [1])
            log_field += rng.uniform(-1.0, 1.0) * py[:, None] * px[None, :]
    peak = float(np.abs(log_field).max())
    if peak > 0:
        log_field *= rng.uniform(0.0, strength) / peak
    return np.exp(log_field).astype(np.float32)


def augment_intensity(image: NDArray[np.float32], rng: np.random.Generator, cfg: AugmentConfig) -> NDArray[np.float32]:
    """Gamma, contrast, bias field, blur, intensity scale and noise on a (slices, H, W) float32
    image, each with its probability; the same transform on every slice except the noise."""
    x = image
    if _happens(rng, cfg.gamma_p):
        g = _log_uniform(rng, cfg.gamma_range)
        x = (np.sign(x) * np.abs(x) ** g).astype(np.float32)
    if _happens(rng, cfg.contrast_p):
        mean = float(x.mean())
        x = ((x - mean) * _uniform(rng, cfg.contrast_range) + mean).astype(np.float32)
    if _happens(rng, cfg.bias_field_p):
        x = x * bias_field(x.shape[-2:], rng, cfg.bias_field_strength, cfg.bias_field_order)
    if _happens(rng, cfg.blur_p):
        s = _uniform(rng, cfg.blur_sigma)
        if s > 0:
            x = np.stack([cv2.GaussianBlur(sl, (0, 0), s, borderType=cv2.BORDER_REFLECT_101) for sl in x])
    if _happens(rng, cfg.intensity_scale_p):
        x = x * _uniform(rng, cfg.intensity_scale_range)
    if _happens(rng, cfg.noise_p):
        sigma = _uniform(rng, cfg.noise_sigma)
        if _happens(rng, cfg.rician_p):
            re = x + rng.normal(0, sigma, x.shape).astype(np.float32)
            x = np.sqrt(re * re + rng.normal(0, sigma, x.shape).astype(np.float32) ** 2)
        else:
            x = x + rng.normal(0, sigma, x.shape).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---- the grader's crops ----------------------------------------------------------------------------


def _margins(window: NDArray, spec: CropSpec) -> tuple[int, int]:
    """(slice margin, pixel margin) of a cached window around the network's input."""
    if window.ndim != 3 or window.shape[1] != window.shape[2]:
        raise ValueError(f"a grader window must be (slices, n, n), got shape {window.shape}")
    mz, mod_z = divmod(window.shape[0] - spec.n_slices, 2)
    mp, mod_p = divmod(window.shape[1] - spec.pixels, 2)
    if mz < 0 or mp < 0 or mod_z or mod_p:
        raise ValueError(f"a grader window {window.shape} does not hold a {spec.n_slices} x {spec.pixels} "
                         f"x {spec.pixels} crop with equal margins")
    return mz, mp


def grader_crop(window: NDArray, dx: int = 0, dy: int = 0, dz: int = 0,
                spec: CropSpec = GRADER_SPEC) -> NDArray[np.float32]:
    """The network's input cut out of a cached window, shifted by (dx, dy) pixels and dz slices
    (what ``training.data.window_crop`` cuts, margins read from the shape); float32."""
    mz, mp = _margins(window, spec)
    if abs(dz) > mz or abs(dx) > mp or abs(dy) > mp:
        raise ValueError(f"shift ({dx}, {dy}, {dz}) is beyond the window's margins ({mp} px, {mz} slices)")
    n, z0 = spec.pixels, mz + dz
    return window[z0: z0 + spec.n_slices, mp + dy: mp + dy + n, mp + dx: mp + dx + n].astype(np.float32)


def mirror_grader_window(window: NDArray, group: ConditionGroup) -> NDArray:
    """A window of the left-right mirrored patient, same label: spinal crops' slice order reversed;
    sided crops unchanged (their mirror is the other side's crop, see the module docstring)."""
    return np.ascontiguousarray(window[::-1]) if group is ConditionGroup.SPINAL else window


def augment_grader_crop(window: NDArray, *, group: ConditionGroup, sigma_px: float, rng: np.random.Generator,
                        cfg: AugmentConfig, spec: CropSpec = GRADER_SPEC) -> NDArray[np.float32]:
    """One training input (spec.n_slices, spec.pixels, spec.pixels) float32 from a cached window
    whose centre is the finding. ``sigma_px``: the localiser's measured placement error for the
    finding's group, in grader pixels. The label never changes (no augmentation here swaps sides)."""
    mz, mp = _margins(window, spec)
    dx = dy = dz = 0
    if _happens(rng, cfg.jitter_p):
        dx, dy = np.clip(np.round(rng.normal(0, sigma_px, 2)), -mp, mp).astype(int)
    if cfg.slice_shift_probs[1] < 1.0:
        dz = int(np.clip(rng.choice(SLICE_SHIFTS, p=cfg.slice_shift_probs), -mz, mz))
    affine = _draw_affine(rng, cfg)
    if affine.is_identity:
        crop = grader_crop(window, int(dx), int(dy), dz, spec)
    else:
        n, z0 = spec.pixels, mz + dz
        # output pixel p shows window pixel c_w + A^-1 (p - (c_w - offset)): the finding (the window
        # centre c_w) stays where the jitter puts it, and the crop turns and scales about it
        center = ((n - 1) / 2 - dx, (n - 1) / 2 - dy)
        offset = (mp + float(dx), mp + float(dy))
        crop = np.stack([_warp(np.asarray(sl, np.float32), affine, center, (n, n), cv2.BORDER_REFLECT_101, offset)
                         for sl in window[z0: z0 + spec.n_slices]])
    if group is ConditionGroup.SPINAL and _happens(rng, cfg.mirror_p):
        crop = crop[::-1]
    return augment_intensity(np.ascontiguousarray(crop, dtype=np.float32), rng, cfg)


# ---- the localiser's pairs ----------------------------------------------------------------------------


def warp_localiser(image: NDArray, target: NDArray, affine: Affine) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Image (slices, n, n) and heatmaps (levels, n, n) through the same affine about the image
    centre; outside the field of view is 0 (the normalised background, as serving pads)."""
    n_rows, n_cols = image.shape[-2:]
    if target.shape[-2:] != (n_rows, n_cols):
        raise ValueError(f"localiser image {image.shape} and target {target.shape} differ in size")
    center = ((n_cols - 1) / 2, (n_rows - 1) / 2)

    def warp(stack: NDArray) -> NDArray[np.float32]:
        return np.stack([_warp(np.asarray(p, np.float32), affine, center, (n_rows, n_cols), cv2.BORDER_CONSTANT)
                         for p in stack])

    return warp(image), warp(target)


def augment_localiser(image: NDArray, target: NDArray, *, rng: np.random.Generator,
                      cfg: AugmentConfig) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """One localiser training pair: image (slices, n, n) and heatmap target (levels, n, n), float32.
    Rotation, scale and shift warp both alike; the mirror reverses the slice order and keeps the
    heatmaps; intensity augmentations touch the image only."""
    if image.ndim != 3 or target.ndim != 3:
        raise ValueError(f"a localiser pair is two (channels, n, n) arrays, got {image.shape} and {target.shape}")
    affine = _draw_affine(rng, cfg, cfg.shift_px)
    if affine.is_identity:
        img, tgt = image.astype(np.float32), target.astype(np.float32)
    else:
        img, tgt = warp_localiser(image, target, affine)
    if _happens(rng, cfg.mirror_p):
        img = img[::-1]
    return augment_intensity(np.ascontiguousarray(img, dtype=np.float32), rng, cfg), np.ascontiguousarray(tgt)


# ---- whole-study mirror: the labels' sides swapped -----------------------------------------------------


def mirrored_label(label: Label) -> Label:
    """The label of the same finding in the left-right mirrored patient (spinal labels are their own)."""
    side = label.condition.side
    if side is None:
        return label
    other = Side.RIGHT if side is Side.LEFT else Side.LEFT
    return Label(Condition(label.condition.group, other), label.level)


#: label index -> the index of its mirror image (``LABELS`` order).
MIRRORED_LABEL_INDEX: tuple[int, ...] = tuple(LABELS.index(mirrored_label(lb)) for lb in LABELS)


def swap_sides(targets: NDArray) -> NDArray:
    """Per-label values (..., 25) in ``LABELS`` order -> those of the mirrored study (left and
    right swapped, spinal kept)."""
    targets = np.asarray(targets)
    if targets.shape[-1] != len(LABELS):
        raise ValueError(f"expected {len(LABELS)} label values on the last axis, got shape {targets.shape}")
    return targets[..., list(MIRRORED_LABEL_INDEX)]
