"""Training augmentation (training/augment.py): determinism, identity when off, today's grader
augmentation exactly, geometry that moves the target with the image, the bias field, mirroring
checked against the real crop geometry, the config's JSON."""

from __future__ import annotations

import json
from dataclasses import fields

import cv2
import numpy as np
import pytest

from inference.geometry import ImagePlane
from inference.labels import (
    LABELS,
    LEFT_FORAMINAL,
    LEFT_SUBARTICULAR,
    RIGHT_FORAMINAL,
    RIGHT_SUBARTICULAR,
    SPINAL,
    ConditionGroup,
    Label,
    Level,
    SeriesRole,
)
from inference.levels import GRADER_SPEC, LOCALISER_SPEC, crop_axes, localiser_input
from inference.preprocess import CropSpec, Intensity, crop_25d
from inference.volume import Slice, Volume
from training.augment import (
    MIRRORED_LABEL_INDEX,
    Affine,
    AugmentConfig,
    augment_grader_crop,
    augment_intensity,
    augment_localiser,
    bias_field,
    grader_crop,
    mirror_grader_window,
    mirrored_label,
    replace_fields,
    sample_rng,
    swap_sides,
    warp_localiser,
)
from training.data import CACHE_SPEC, JITTER_PX, window_crop

N = GRADER_SPEC.pixels
W = CACHE_SPEC.pixels  # 64: the cached window, 8 px of jitter margin on each side
C_W = (W - 1) / 2  # the finding: the window's centre
C_N = (N - 1) / 2
GROUPS = list(ConditionGroup)
OFF = AugmentConfig.off()
ALL_ON = AugmentConfig(**{f.name: 1.0 for f in fields(AugmentConfig) if f.name.endswith("_p")})


def _window(seed: int = 0) -> np.ndarray:
    """A cached window as training keeps it: float16 (5, 64, 64), smooth random content in 0-1."""
    noise = np.random.default_rng(seed).random((CACHE_SPEC.n_slices, W, W)).astype(np.float32)
    return np.stack([cv2.GaussianBlur(s, (0, 0), 2.0) for s in noise]).astype(np.float16)


def _blob(shape: tuple[int, int], x: float, y: float, sigma: float = 1.5) -> np.ndarray:
    rows, cols = np.mgrid[0: shape[0], 0: shape[1]]
    return np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2)).astype(np.float32)


def _centroid(img: np.ndarray, x: float, y: float, radius: int = 6) -> np.ndarray:
    """Intensity-weighted (x, y) of ``img`` within ``radius`` of (x, y)."""
    rows, cols = np.mgrid[0: img.shape[0], 0: img.shape[1]]
    m = ((cols - x) ** 2 + (rows - y) ** 2 <= radius**2) * np.clip(img, 0, None)
    return np.array([(m * cols).sum(), (m * rows).sum()]) / m.sum()


def _today(window: np.ndarray, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """Today's grader augmentation, as training/train.py ``_grader_batch`` does it before this module."""
    dx, dy = np.clip(np.round(rng.normal(0, sigma_px, 2)), -JITTER_PX, JITTER_PX).astype(int)
    dz = int(rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15]))
    crop = window_crop(window, dx, dy, dz).astype(np.float32)
    return crop * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, crop.shape).astype(np.float32)


# ---- the config ---------------------------------------------------------------------------------------


def test_config_round_trips_json_and_rejects_what_it_cannot_mean() -> None:
    for cfg in (AugmentConfig(), OFF, AugmentConfig.legacy(), replace_fields(AugmentConfig(), rotate_deg=12.5,
                                                                            scale_range=(0.8, 1.2))):
        assert AugmentConfig.from_json(cfg.to_json()) == cfg
        assert AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert AugmentConfig.from_dict({"gamma_p": 0.5}) == replace_fields(AugmentConfig(), gamma_p=0.5)
    with pytest.raises(ValueError, match="unknown augmentation setting"):
        AugmentConfig.from_dict({"gama_p": 0.5})
    for bad in ({"gamma_p": 1.5}, {"scale_range": [1.2, 0.8]}, {"gamma_range": [0.0, 1.0]},
                {"slice_shift_probs": [0.5, 0.5, 0.5]}, {"noise_sigma": [-0.1, 0.1]}, {"rotate_p": "often"},
                {"rotate_deg": [1, 2]}, {"blur_sigma": 0.5}, {"bias_field_order": 0}, {"mirror_p": True}):
        with pytest.raises(ValueError, match="augment"):
            AugmentConfig.from_dict(bad)
    with pytest.raises(ValueError, match="JSON object"):
        AugmentConfig.from_json("[1, 2]")


# ---- identity, today's augmentation, determinism, shapes --------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
def test_off_is_the_centre_crop_and_the_cached_localiser_pair(group: ConditionGroup) -> None:
    window = _window()
    out = augment_grader_crop(window, group=group, sigma_px=3.0, rng=np.random.default_rng(0), cfg=OFF)
    assert np.array_equal(out, window_crop(window, 0, 0, 0).astype(np.float32))
    image, target = _window(1)[:3], _window(2)
    img, tgt = augment_localiser(image, target, rng=np.random.default_rng(0), cfg=OFF)
    assert np.array_equal(img, image.astype(np.float32)) and np.array_equal(tgt, target.astype(np.float32))


@pytest.mark.parametrize("seed", range(5))
def test_legacy_is_todays_grader_augmentation_bit_for_bit(seed: int) -> None:
    window = _window(seed)
    for group in GROUPS:
        expected = _today(window, 2.5, np.random.default_rng(seed))
        got = augment_grader_crop(window, group=group, sigma_px=2.5, rng=np.random.default_rng(seed),
                                  cfg=AugmentConfig.legacy())
        assert np.array_equal(got, expected)


NEW_AUGMENTATIONS = {  # each new augmentation, switched on with a range that surely changes the crop
    "gamma": {"gamma_p": 1.0, "gamma_range": (0.6, 0.7)},
    "contrast": {"contrast_p": 1.0, "contrast_range": (1.3, 1.4)},
    "bias_field": {"bias_field_p": 1.0, "bias_field_strength": 0.5},
    "blur": {"blur_p": 1.0, "blur_sigma": (1.0, 1.5)},
    "rotate": {"rotate_p": 1.0, "rotate_deg": 20.0},
    "scale": {"scale_p": 1.0, "scale_range": (1.2, 1.3)},
    "mirror": {"mirror_p": 1.0},
    "rician": {"rician_p": 1.0},
}


@pytest.mark.parametrize("name", NEW_AUGMENTATIONS)
def test_each_new_augmentation_at_p0_leaves_todays_output_exactly(name: str) -> None:
    window, changes = _window(3), NEW_AUGMENTATIONS[name]
    off = {k: (0.0 if k.endswith("_p") else v) for k, v in changes.items()}
    expected = _today(window, 2.0, np.random.default_rng(7))
    at_p0 = augment_grader_crop(window, group=ConditionGroup.SPINAL, sigma_px=2.0, rng=np.random.default_rng(7),
                                cfg=replace_fields(AugmentConfig.legacy(), **off))
    assert np.array_equal(at_p0, expected)
    at_p1 = augment_grader_crop(window, group=ConditionGroup.SPINAL, sigma_px=2.0, rng=np.random.default_rng(7),
                                cfg=replace_fields(AugmentConfig.legacy(), **changes))
    assert not np.allclose(at_p1, expected, atol=1e-3)  # the knob is live


def test_same_seed_same_sample_other_seed_another() -> None:
    window, image, target = _window(), _window(1)[:3], _window(2)
    for cfg in (AugmentConfig(), ALL_ON):
        def grader(seed: int, c: AugmentConfig = cfg) -> np.ndarray:
            return augment_grader_crop(window, group=ConditionGroup.SPINAL, sigma_px=2.0,
                                       rng=np.random.default_rng(seed), cfg=c)

        def localiser(seed: int, c: AugmentConfig = cfg) -> tuple[np.ndarray, np.ndarray]:
            return augment_localiser(image, target, rng=np.random.default_rng(seed), cfg=c)

        assert np.array_equal(grader(11), grader(11)) and not np.array_equal(grader(11), grader(12))
        (a, b), (c, d) = localiser(11), localiser(11)
        assert np.array_equal(a, c) and np.array_equal(b, d)
        assert not np.array_equal(a, localiser(12)[0])


def test_an_items_generator_depends_on_seed_epoch_and_index_only() -> None:
    def draw(seed: int, epoch: int, index: int) -> np.ndarray:
        return augment_grader_crop(_window(), group=ConditionGroup.FORAMINAL, sigma_px=2.0,
                                   rng=sample_rng(seed, epoch, index), cfg=ALL_ON)

    assert np.array_equal(draw(0, 3, 17), draw(0, 3, 17))
    assert len({draw(*key).tobytes() for key in ((0, 3, 17), (1, 3, 17), (0, 4, 17), (0, 3, 18))}) == 4


@pytest.mark.parametrize("spec", [GRADER_SPEC, CropSpec(88.0, 96, 5)])
def test_shapes_and_dtype_whatever_is_drawn(spec: CropSpec) -> None:
    margin = 8
    window = np.random.default_rng(0).random((spec.n_slices + 2, spec.pixels + 2 * margin,
                                              spec.pixels + 2 * margin)).astype(np.float16)
    image = np.random.default_rng(1).random((3, 128, 128)).astype(np.float16)
    target = np.zeros((5, 128, 128), np.float16)
    rng = np.random.default_rng(0)
    for cfg in (AugmentConfig(), ALL_ON, OFF):
        for group in GROUPS:
            for _ in range(10):
                out = augment_grader_crop(window, group=group, sigma_px=20.0, rng=rng, cfg=cfg, spec=spec)
                assert out.shape == (spec.n_slices, spec.pixels, spec.pixels)
                assert out.dtype == np.float32 and out.flags.c_contiguous and np.isfinite(out).all()
        img, tgt = augment_localiser(image, target, rng=rng, cfg=cfg)
        assert img.shape == (3, 128, 128) and tgt.shape == (5, 128, 128)
        assert img.dtype == tgt.dtype == np.float32 and img.flags.c_contiguous and tgt.flags.c_contiguous


def test_a_window_that_does_not_fit_the_network_is_a_clear_error() -> None:
    rng = np.random.default_rng(0)
    for shape in ((5, 64, 60), (5, 40, 40), (2, 64, 64), (64, 64), (5, 63, 63)):
        with pytest.raises(ValueError, match="window"):
            augment_grader_crop(np.zeros(shape, np.float16), group=ConditionGroup.SPINAL, sigma_px=1.0, rng=rng,
                                cfg=AugmentConfig())
    with pytest.raises(ValueError, match="differ in size"):
        augment_localiser(np.zeros((3, 128, 128)), np.zeros((5, 64, 64)), rng=rng, cfg=ALL_ON)
    with pytest.raises(ValueError, match="margins"):
        grader_crop(_window(), dx=9)


def test_grader_crop_cuts_what_window_crop_cuts() -> None:
    window = _window()
    for dx, dy, dz in ((0, 0, 0), (8, -8, 1), (-3, 5, -1)):
        assert np.array_equal(grader_crop(window, dx, dy, dz), window_crop(window, dx, dy, dz).astype(np.float32))


# ---- geometry: the target moves with the image ------------------------------------------------------------


def _marked_window() -> np.ndarray:
    """A bright dot at the finding (the window centre) and a bar elsewhere (that rotation moves)."""
    plane = _blob((W, W), C_W, C_W)
    plane[6:10, 20:44] = 1.0
    return np.stack([plane] * CACHE_SPEC.n_slices).astype(np.float16)


@pytest.mark.parametrize("seed", range(6))
def test_rotation_and_scale_keep_the_finding_where_the_jitter_put_it(seed: int) -> None:
    window = _marked_window()
    geometry = replace_fields(OFF, rotate_p=1.0, rotate_deg=30.0, scale_p=1.0, scale_range=(0.8, 1.25))
    centred = augment_grader_crop(window, group=ConditionGroup.FORAMINAL, sigma_px=0.0,
                                  rng=np.random.default_rng(seed), cfg=geometry)
    assert not np.allclose(centred, grader_crop(window), atol=0.05)  # it did rotate/scale
    for sl in centred:
        assert np.allclose(_centroid(sl, C_N, C_N), (C_N, C_N), atol=0.05)
    # with jitter: the dot is where the jitter alone puts it (its draws come first), rotated and scaled about it
    dx, dy = np.clip(np.round(np.random.default_rng(seed).normal(0, 3.0, 2)), -JITTER_PX, JITTER_PX)
    moved = augment_grader_crop(window, group=ConditionGroup.FORAMINAL, sigma_px=3.0,
                                rng=np.random.default_rng(seed), cfg=replace_fields(geometry, jitter_p=1.0))
    for sl in moved:
        assert np.allclose(_centroid(sl, C_N - dx, C_N - dy), (C_N - dx, C_N - dy), atol=0.05)


def test_a_known_warp_moves_every_heatmap_peak_where_the_transform_sends_it() -> None:
    n = LOCALISER_SPEC.pixels
    points = [(40.0, 30.0), (64.0, 50.0), (70.3, 66.6), (60.0, 82.0), (52.0, 96.0)]
    target = np.stack([_blob((n, n), x, y, 2.0) for x, y in points])
    image = np.stack([target.sum(0)] * 3)
    center = ((n - 1) / 2, (n - 1) / 2)
    for affine in (Affine(shift=(7.0, -4.5)), Affine(angle_deg=15.0), Affine(scale=1.1),
                   Affine(angle_deg=-10.0, scale=0.9, shift=(-3.0, 5.0))):
        img, tgt = warp_localiser(image, target, affine)
        for k, p in enumerate(points):
            expected = affine.forward(np.array(p), center)
            assert np.allclose(_centroid(tgt[k], *expected, radius=1000), expected, atol=0.05)
            assert np.allclose(_centroid(img[0], *expected), expected, atol=0.15)


@pytest.mark.parametrize("seed", range(6))
def test_the_localiser_target_moves_with_its_image(seed: int) -> None:
    n = LOCALISER_SPEC.pixels
    points = [(50.0, 28.0), (58.0, 46.0), (63.0, 64.0), (61.0, 82.0), (55.0, 100.0)]
    target = np.stack([_blob((n, n), x, y, 2.0) for x, y in points]).astype(np.float16)
    image = np.stack([target.astype(np.float32).sum(0)] * 3).astype(np.float16)
    geometry = replace_fields(OFF, rotate_p=1.0, rotate_deg=15.0, scale_p=1.0, scale_range=(0.85, 1.15),
                              shift_p=1.0, shift_px=10.0)
    img, tgt = augment_localiser(image, target, rng=np.random.default_rng(seed), cfg=geometry)
    moved = []
    for k in range(5):
        where = _centroid(tgt[k], 0.0, 0.0, radius=1000)
        assert np.allclose(_centroid(img[1], *where), where, atol=0.15)
        moved.append(np.linalg.norm(where - points[k]))
    assert max(moved) > 1.0  # it did move


# ---- intensity ----------------------------------------------------------------------------------------------


def test_the_bias_field_is_smooth_and_within_its_strength() -> None:
    rng = np.random.default_rng(0)
    strength, biggest = 0.3, 0.0
    rows, cols = np.mgrid[-1:1:64j, -1:1:96j]
    basis = np.stack([rows**i * cols**j for i in range(3) for j in range(3 - i)], axis=-1).reshape(-1, 6)
    for _ in range(50):
        log_field = np.log(bias_field((64, 96), rng, strength, order=2).astype(np.float64))
        assert np.abs(log_field).max() <= strength + 1e-5
        biggest = max(biggest, float(np.abs(log_field).max()))
        # smooth: a quadratic in space, no step between neighbours larger than a few % of the strength
        coef, *_ = np.linalg.lstsq(basis, log_field.ravel(), rcond=None)
        assert np.abs(basis @ coef - log_field.ravel()).max() < 1e-5
        assert max(np.abs(np.diff(log_field, axis=0)).max(), np.abs(np.diff(log_field, axis=1)).max()) < 0.15 * strength
    assert biggest > 0.8 * strength
    # through the intensity augmentation: the same field on every slice, image only
    only = replace_fields(OFF, bias_field_p=1.0, bias_field_strength=strength)
    out = augment_intensity(np.ones((3, 48, 48), np.float32), np.random.default_rng(1), only)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    assert np.abs(np.log(out)).max() <= strength + 1e-5 and not np.allclose(out, 1.0)


def test_noise_gaussian_by_default_rician_when_drawn() -> None:
    zeros = np.zeros((3, 128, 128), np.float32)
    gauss = augment_intensity(zeros, np.random.default_rng(0), replace_fields(OFF, noise_p=1.0,
                                                                               noise_sigma=(0.05, 0.05)))
    assert abs(float(gauss.mean())) < 0.002 and abs(float(gauss.std()) - 0.05) < 0.002
    rician = augment_intensity(zeros, np.random.default_rng(0), replace_fields(OFF, noise_p=1.0, rician_p=1.0,
                                                                                noise_sigma=(0.05, 0.05)))
    assert (rician >= 0).all() and abs(float(rician.mean()) - 0.05 * np.sqrt(np.pi / 2)) < 0.002


# ---- mirroring ----------------------------------------------------------------------------------------------


def test_swap_sides_exchanges_left_and_right_and_keeps_the_canal() -> None:
    targets = np.arange(25)
    swapped = swap_sides(targets)
    for i, label in enumerate(LABELS):
        other = LABELS[swapped[i]]
        assert other.level is label.level and other.condition.group is label.condition.group
        if label.condition.side is None:
            assert other == label
        else:
            assert other.condition.side is not label.condition.side
    assert np.array_equal(swap_sides(swapped), targets)
    cols = {lb.column: i for i, lb in enumerate(LABELS)}
    assert swapped[cols["left_neural_foraminal_narrowing_l4_l5"]] == cols["right_neural_foraminal_narrowing_l4_l5"]
    assert swapped[cols["right_subarticular_stenosis_l5_s1"]] == cols["left_subarticular_stenosis_l5_s1"]
    assert swapped[cols["spinal_canal_stenosis_l3_l4"]] == cols["spinal_canal_stenosis_l3_l4"]
    assert mirrored_label(Label(LEFT_FORAMINAL, Level.L1_L2)) == Label(RIGHT_FORAMINAL, Level.L1_L2)
    batch = np.stack([targets, targets[::-1]])  # (studies, 25) at once
    assert np.array_equal(swap_sides(batch)[1], targets[::-1][list(MIRRORED_LABEL_INDEX)])
    with pytest.raises(ValueError, match="25"):
        swap_sides(np.zeros(24))


def _smooth(seed: int, n: int) -> np.ndarray:
    noise = np.random.default_rng(seed).random((n, n)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), 4.0) * 4


def _stack(orientation: list[float], offsets: np.ndarray, normal_axis: int, role: SeriesRole, seed: int,
           mirror: bool) -> Volume:
    """A stack of 80 x 80 slices (0.8 mm) centred on the origin, one per offset along ``normal_axis``;
    ``mirror``: the left-right mirror image of the same patient (x -> -x)."""
    n, spacing = 80, 0.8
    plane0 = ImagePlane.from_attributes([0, 0, 0], orientation, [spacing, spacing], n, n)
    corner = -plane0.to_patient((n - 1) / 2, (n - 1) / 2)
    pixels = [_smooth(seed + k, n) for k in range(len(offsets))]
    slices = []
    for k, off in enumerate(offsets):
        position = corner.copy()
        position[normal_axis] += off
        plane = ImagePlane.from_attributes(position, orientation, [spacing, spacing], n, n)
        if mirror and normal_axis == 0:  # sagittal: the slice at -x shows what the one at +x showed
            img = pixels[len(offsets) - 1 - k]
        elif mirror:  # axial: columns run along x, mirrored about the centre
            img = pixels[k][:, ::-1]
        else:
            img = pixels[k]
        slices.append(Slice(plane, np.ascontiguousarray(img), "1.2", f"1.2.{k}", "1.2.840.10008.5.1.4.1.1.4", k))
    slices.sort(key=lambda s: float(s.plane.position @ s.plane.normal))
    return Volume(role, slices)


def _reflect(p: np.ndarray) -> np.ndarray:
    return p * np.array([-1.0, 1.0, 1.0])


def _crop(volume: Volume, point: np.ndarray, condition: object) -> np.ndarray:
    return crop_25d(volume, point, *crop_axes(condition), CACHE_SPEC, Intensity(0.0, 1.0))  # type: ignore[arg-type]  # the test passes conditions untyped


def test_the_mirror_against_the_real_crop_geometry() -> None:
    """What the module docstring claims, on crops cut by inference.preprocess: in the mirrored
    patient, a sided crop is the original's other side's crop (same pixels: no new sample, the
    label is the other side's), and the spinal crop is the original's with its slice order reversed."""
    sagittal, axial = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    offsets = 4.0 * np.arange(-3, 4)
    sag = _stack(sagittal, offsets, 0, SeriesRole.SAG_T1, 0, mirror=False)
    sag_m = _stack(sagittal, offsets, 0, SeriesRole.SAG_T1, 0, mirror=True)
    canal, right_foramen = np.array([0.9, 3.0, 5.0]), np.array([-7.0, 5.0, -3.0])
    spinal = _crop(sag, canal, SPINAL)
    assert np.allclose(_crop(sag_m, _reflect(canal), SPINAL), mirror_grader_window(spinal, ConditionGroup.SPINAL),
                       atol=1e-5)
    assert not np.allclose(spinal, spinal[::-1], atol=0.05)
    right = _crop(sag, right_foramen, RIGHT_FORAMINAL)
    assert np.allclose(_crop(sag_m, _reflect(right_foramen), LEFT_FORAMINAL), right, atol=1e-5)
    assert np.array_equal(mirror_grader_window(right, ConditionGroup.FORAMINAL), right)
    # the localiser: the slice order reversed, the in-plane image (and so every level) unchanged
    assert np.allclose(localiser_input(sag_m, Intensity(0.0, 1.0)).image,
                       localiser_input(sag, Intensity(0.0, 1.0)).image[::-1], atol=1e-5)

    ax = _stack(axial, 4.0 * np.arange(-2, 3), 2, SeriesRole.AX_T2, 10, mirror=False)
    ax_m = _stack(axial, 4.0 * np.arange(-2, 3), 2, SeriesRole.AX_T2, 10, mirror=True)
    canal = np.array([1.3, 2.0, 0.7])
    right, left = _crop(ax, canal, RIGHT_SUBARTICULAR), _crop(ax, canal, LEFT_SUBARTICULAR)
    assert np.allclose(_crop(ax_m, _reflect(canal), LEFT_SUBARTICULAR), right, atol=0.02)
    assert np.allclose(_crop(ax_m, _reflect(canal), RIGHT_SUBARTICULAR), left, atol=0.02)
    assert not np.allclose(left, right, atol=0.05)
    assert np.array_equal(mirror_grader_window(right, ConditionGroup.SUBARTICULAR), right)


def test_the_mirror_reverses_spinal_crops_and_localiser_slices_only() -> None:
    window, mirror = _window(), replace_fields(OFF, mirror_p=1.0)
    spinal = augment_grader_crop(window, group=ConditionGroup.SPINAL, sigma_px=0.0, rng=np.random.default_rng(0),
                                 cfg=mirror)
    assert np.array_equal(spinal, grader_crop(window)[::-1])
    for group in (ConditionGroup.FORAMINAL, ConditionGroup.SUBARTICULAR):
        sided = augment_grader_crop(window, group=group, sigma_px=0.0, rng=np.random.default_rng(0), cfg=mirror)
        assert np.array_equal(sided, grader_crop(window))
    image, target = _window(1)[:3], _window(2)
    img, tgt = augment_localiser(image, target, rng=np.random.default_rng(0), cfg=mirror)
    assert np.array_equal(img, image[::-1].astype(np.float32)) and np.array_equal(tgt, target.astype(np.float32))
