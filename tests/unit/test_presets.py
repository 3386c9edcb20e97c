"""Crop geometry per model (ModelSpec), the presets and their networks, the cache per spec, and
``--init-weights``: shapes, JSON round trips, Grad-CAM against autograd, loading by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from inference.analyze import _Crop, _grade_crops
from inference.labels import CONDITIONS, LABELS, ConditionGroup
from inference.model import ModelError, ModelMetadata
from inference.preprocess import CropSpec
from inference.runtime import DEFAULT_MODEL_DIR
from inference.specs import GRADER_SPEC, SMALL_SPEC, ModelSpec
from training.cache import (
    CacheError,
    Manifest,
    PrepareSpec,
    StudyEntry,
    StudyStatus,
    open_cache,
    sample_arrays,
    write_entry,
)
from training.data import CACHE_SPEC, StudySamples, window_spec
from training.init_weights import InitWeightsError, init_grader
from training.loader import GraderDataset, GraderIndex, collate_grader
from training.models import GraderKind, GraderNet, Networks, ResNet, SequenceGrader, grader_logits
from training.presets import COMPETITION_SPEC, PRESETS, Preset, parse_grader_crop, resolve

TINY = GraderNet(kind=GraderKind.SEQUENCE, width=8, in_channels=1, blocks=(1, 1, 1, 1), last_stride=1, hidden=8)
THREE_SHAPES = ModelSpec(CropSpec(320.0, 64, 3), CropSpec(40.0, 24, 3), CropSpec(40.0, 24, 5), CropSpec(40.0, 32, 3))


# ---- ModelSpec and model.json ------------------------------------------------------------------------


def test_the_bundled_model_json_reads_as_the_small_spec() -> None:
    meta = ModelMetadata.read(DEFAULT_MODEL_DIR / "model.json")
    assert meta.spec == SMALL_SPEC and meta.preset is None and meta.networks is None
    assert Networks.from_json(meta.networks) == Networks() == PRESETS[Preset.SMALL].networks


def test_the_small_spec_keeps_todays_keys_and_a_spec_of_differing_groups_adds_graders() -> None:
    small = SMALL_SPEC.to_preprocessing()
    assert "graders" not in small and small["grader"] == {"size_mm": 44.0, "pixels": 48, "n_slices": 3}
    competition = COMPETITION_SPEC.to_preprocessing()
    assert set(competition["graders"]) == {g.value for g in ConditionGroup}
    for spec in (SMALL_SPEC, COMPETITION_SPEC, THREE_SHAPES):
        raw = json.loads(json.dumps(spec.to_preprocessing()))
        assert ModelSpec.from_preprocessing(raw) == spec
        assert ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert COMPETITION_SPEC.shapes() == [(7, 128, 128), (9, 128, 128), (5, 128, 128)]
    assert SMALL_SPEC.shapes() == [(3, 48, 48)]


def test_model_json_round_trips_a_competition_model_and_check_refuses_insane_crops(tmp_path: Path) -> None:
    meta = ModelMetadata("m", "1", "phantom", dict.fromkeys(ConditionGroup, (1.0, 2.0, 3.0)),
                         preprocessing=COMPETITION_SPEC.to_preprocessing(), preset="competition",
                         networks=PRESETS[Preset.COMPETITION].networks.to_json())
    meta.write(tmp_path / "model.json")
    back = ModelMetadata.read(tmp_path / "model.json")
    assert back.spec == COMPETITION_SPEC and Networks.from_json(back.networks) == PRESETS[Preset.COMPETITION].networks
    for bad in (CropSpec(44.0, 48, 4), CropSpec(-1.0, 48, 3), CropSpec(44.0, 4, 3), CropSpec(44.0, 4096, 3)):
        wrong = ModelMetadata("m", "1", "x", meta.offsets_mm, preprocessing=SMALL_SPEC.with_grader(
            ConditionGroup.FORAMINAL, bad).to_preprocessing())
        with pytest.raises(ModelError, match="neural_foraminal_narrowing grader crop"):
            wrong.check()


def test_grader_crop_overrides_are_parsed_and_checked() -> None:
    assert parse_grader_crop("spinal=60,96,9") == (ConditionGroup.SPINAL, CropSpec(60.0, 96, 9))
    config = resolve("competition", ("foraminal=70,96,11",))
    assert config.spec.foraminal == CropSpec(70.0, 96, 11) and config.spec.spinal == COMPETITION_SPEC.spinal
    for text, message in (("spine=1,2,3", "GROUP"), ("spinal=1,2", "three values"), ("spinal=a,2,3", "number")):
        with pytest.raises(ValueError, match=message):
            parse_grader_crop(text)
    with pytest.raises(ValueError, match="odd"):
        resolve("competition", ("spinal=64,128,8",))
    with pytest.raises(ValueError, match="one slice count"):  # the residual grader takes slices as channels
        resolve("small", ("spinal=44,48,5",))
    five = resolve("small", ("spinal=44,48,5", "foraminal=44,48,5", "subarticular=44,48,5"))
    assert five.networks.grader.in_channels == 5


# ---- the networks ------------------------------------------------------------------------------------


def test_the_competition_backbone_has_torchvisions_resnet34_names_and_size() -> None:
    backbone = ResNet()  # ResNet-34's BasicBlocks [3, 4, 6, 3], widths 64-512, one input channel
    names = backbone.state_dict()
    for name in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                 "layer2.0.downsample.1.running_var", "layer3.5.bn2.weight", "layer4.2.conv2.weight"):
        assert name in names
    assert names["conv1.weight"].shape == (64, 1, 7, 7) and names["layer4.2.conv2.weight"].shape == (512, 512, 3, 3)
    # torchvision's resnet34 has 21,797,672 parameters: less its fc (513,000) and conv1's two other channels (6,272)
    assert sum(p.numel() for p in backbone.parameters()) == 21_797_672 - 513_000 - 6_272


@pytest.mark.parametrize("shape", [(3, 32, 32), (7, 48, 48), (1, 64, 64)])
def test_the_sequence_grader_takes_any_slices_and_its_cam_is_the_attention_weighted_grad_cam(shape: tuple) -> None:
    torch.manual_seed(0)
    grader = SequenceGrader(TINY).eval()
    crops, conditions = torch.rand(4, *shape), torch.tensor([0, 1, 3, 4])
    own, cams = grader.class_maps(crops, conditions)
    h = shape[1] // 16  # stride-2 stem, max-pool, layer2 and layer3 at stride 2, layer4 (last_stride) at 1
    assert own.shape == (4, 3) and cams.shape == (4, 3, h, h)
    assert torch.allclose(own, grader.logits(crops)[torch.arange(4), grader.condition_group[conditions]], atol=1e-5)
    ref = grader.reference_cam(crops, conditions)
    predicted = cams[torch.arange(4), own.argmax(dim=1)].detach()
    assert torch.allclose(predicted, ref * h * h, rtol=1e-4, atol=1e-6)  # exact, up to the 1/(h w) of the mean
    probs, cam = grader(crops, conditions)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4)) and torch.equal(cam, predicted)


def test_a_batch_of_several_crop_shapes_is_graded_per_shape_and_concatenated() -> None:
    torch.manual_seed(0)
    grader = SequenceGrader(TINY).eval()
    items = [(np.random.default_rng(i).random((3 if i % 2 else 5, 24, 24), np.float32), i % 3, i % 5, i // 2)
             for i in range(6)]
    crops, targets, conditions, studies = collate_grader(items)
    assert studies.tolist() == [0, 1, 2, 0, 1, 2]
    assert [tuple(c.shape) for c in crops] == [(3, 5, 24, 24), (3, 3, 24, 24)]
    assert targets.tolist() == [0, 2, 1, 1, 0, 2] and conditions.tolist() == [0, 2, 4, 1, 3, 0]  # grouped, stable
    logits = grader_logits(grader, crops)
    alone = torch.cat([grader.logits(torch.from_numpy(items[j][0])[None]) for j in (0, 2, 4, 1, 3, 5)])
    assert torch.allclose(logits, alone, atol=1e-5)
    small = collate_grader([(np.zeros((3, 8, 8), np.float32), 1, 2, 3)] * 2)
    assert len(small[0]) == 1 and torch.equal(small[1], torch.tensor([1, 1]))


class _Recorder:
    """A runner that records the shapes it is called with (probabilities from the crops' means)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def grade(self, crops: np.ndarray, conditions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(crops.shape)
        m = crops.mean(axis=(1, 2, 3))
        return np.stack([m, 1 - m, np.zeros_like(m)], axis=1), np.ones((len(crops), 2, 2), np.float32)


def test_serving_calls_the_grader_once_per_crop_shape_and_keeps_the_labels_order() -> None:
    shapes = [(3, 24, 24), (5, 24, 24), (3, 24, 24), (3, 32, 32)]
    crops = [_Crop(LABELS[i], np.full(s, i / 10, np.float32), CONDITIONS.index(LABELS[i].condition), None)  # type: ignore[arg-type]  # no location: not read
             for i, s in enumerate(shapes)]
    runner = _Recorder()
    graded = _grade_crops(crops, runner)  # type: ignore[arg-type]  # a recorder, not a full Runner
    assert runner.calls == [(2, 3, 24, 24), (1, 5, 24, 24), (1, 3, 32, 32)]
    assert [g.label for g in graded] == list(LABELS[:4])
    assert [round(g.probabilities[0], 3) for g in graded] == [0.0, 0.1, 0.2, 0.3]


# ---- the cache per spec ------------------------------------------------------------------------------


def test_the_cache_spec_follows_the_model_spec_and_stores_one_array_per_window_shape(tmp_path: Path) -> None:
    small, three = PrepareSpec(), PrepareSpec(model=THREE_SHAPES)
    assert small.windows[ConditionGroup.SPINAL] == CACHE_SPEC == window_spec(GRADER_SPEC)
    assert small.window_shapes() == [(5, 64, 64)] and three.hash != small.hash
    assert three.window_shapes() == [(5, 40, 40), (7, 40, 40), (5, 48, 48)]
    assert PrepareSpec.from_json(json.loads(json.dumps(three.to_json()))) == three
    rng = np.random.default_rng(0)
    labelled = [0, 5, 6, 15, 16, 20]  # spinal L1/L2, foraminal, subarticular
    windows = {i: rng.random(three.window_shapes()[three.window_index(LABELS[i].condition.group)]).astype(np.float16)
               for i in labelled}
    targets = np.full(25, -1, np.int64)
    targets[labelled] = [0, 1, 2, 0, 1, 2]
    samples = StudySamples(3, targets, {LABELS[i]: np.zeros(3) for i in labelled}, [], windows)
    arrays = sample_arrays(samples, three)
    assert arrays["windows"].shape[1:] == (5, 40, 40) and arrays["windows_2"].shape[1:] == (5, 48, 48)
    cache = tmp_path / "cache"
    manifest = Manifest(three, str(tmp_path), {3: write_entry(cache, StudyEntry(3, StudyStatus.OK, three.hash, "f",
                                                                                   windows=6), arrays)}, complete=True)
    manifest.save(cache)
    index = GraderIndex.build(cache, [3], three)
    data = GraderDataset(cache, index, spec=three)
    for k, i in enumerate(labelled):
        crop, target, condition, _ = data[(0, k)]
        group = LABELS[i].condition.group
        assert crop.shape == (THREE_SHAPES.grader(group).n_slices, THREE_SHAPES.grader(group).pixels,
                              THREE_SHAPES.grader(group).pixels)
        m = (windows[i].shape[-1] - crop.shape[-1]) // 2
        assert np.array_equal(crop, windows[i][1:-1, m:m + crop.shape[1], m:m + crop.shape[2]].astype(np.float32))
        assert target == targets[i] and CONDITIONS[condition] == LABELS[i].condition
    assert open_cache(cache, three).ok() == [3]
    with pytest.raises(CacheError, match=r"for other crops .*--preset"):
        open_cache(cache, PrepareSpec())


# ---- --init-weights ------------------------------------------------------------------------------------


def _torchvision_layout() -> dict[str, torch.Tensor]:
    """A state dict in torchvision's resnet layout (3-channel conv1, an fc), as the test writes it."""
    torch.manual_seed(1)
    state = ResNet((1, 1, 1, 1), 8, in_channels=3).state_dict()
    return {**state, "fc.weight": torch.rand(1000, 64), "fc.bias": torch.rand(1000)}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_init_weights_loads_a_torchvision_state_dict_by_name(tmp_path: Path, suffix: str) -> None:
    state = _torchvision_layout()
    path = tmp_path / f"resnet{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    grader = SequenceGrader(TINY)
    loaded = init_grader(grader, path)
    own = grader.backbone.state_dict()
    assert loaded == len(own)  # every backbone tensor, nothing of fc
    assert torch.allclose(own["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(own["layer3.0.downsample.0.weight"], state["layer3.0.downsample.0.weight"])


def test_init_weights_refuses_a_file_that_matches_nothing(tmp_path: Path) -> None:
    torch.save({"encoder.whatever": torch.zeros(3), "fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(InitWeightsError, match="no tensor matches"):
        init_grader(SequenceGrader(TINY), tmp_path / "other.pth")
    with pytest.raises(InitWeightsError, match="ResNet backbone"):
        init_grader(Networks().build()[1], tmp_path / "other.pth")


def test_a_competition_cam_of_8_x_8_is_drawn_onto_the_source_image() -> None:
    """The results' heatmap drawing resamples any CAM size onto its crop's grid and then the image."""
    from dicom_node.results.sc import cam_on_image
    from inference.analyze import AssessedLabel, Location
    from inference.geometry import ImagePlane
    from inference.preprocess import CropFrame

    plane = ImagePlane.from_attributes((0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (0.5, 0.5), 256, 256)
    spec = COMPETITION_SPEC.spinal  # 64 mm, 128 px: the crop covers the image's 128 mm field from (32, 32) mm
    frame = CropFrame(np.array([64.0, 64.0, 0.0]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), spec)
    cam = np.zeros((8, 8), np.float32)
    cam[3:5, 3:5] = 1.0  # the centre of the crop
    location = Location("1.2", "1.2.1", "1.2.840.10008.5.1.4.1.1.4", 1, (128.0, 128.0), (64.0, 64.0, 0.0), frame)
    on_image = cam_on_image(AssessedLabel(LABELS[0], (0.2, 0.3, 0.5), location, cam), plane)
    assert on_image.shape == (256, 256)
    row, col = np.unravel_index(int(np.argmax(on_image)), on_image.shape)
    assert abs(row - 127.5) <= 8 and abs(col - 127.5) <= 8  # the crop's centre, mm 64 at 0.5 mm per pixel
    assert on_image[:60].max() == 0 and on_image[200:].max() == 0  # nothing outside the crop
