"""The ensemble's networks on small untrained members: mean probabilities calibrated after averaging,
the mean Grad-CAM of the predicted class, the mean heatmap, and the refusal of mixed preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from export.ensemble import EnsembleGrader, EnsembleLocaliser, Member, check_preprocessing, reference_gradcam
from export.onnx_export import ExportError, sample_inputs
from inference.model import ModelInfo, ModelMetadata, default_preprocessing
from training.models import Grader, Localiser
from training.runner import TorchRunner


def _members(n: int) -> list[Grader]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        grader = Grader(width=8).eval()
        with torch.no_grad():
            grader.head.bias.normal_(0, 1)  # members that disagree
            grader.head.weight.mul_(30)  # and that respond to their input
        out.append(grader)
    return out


def test_the_grader_averages_uncalibrated_probabilities_then_calibrates() -> None:
    graders = _members(3)
    temps = [0.5, 1.0, 2.0, 1.5, 0.7]
    crops, conditions, _ = sample_inputs(10)
    x, c = torch.from_numpy(crops), torch.from_numpy(conditions)
    with torch.no_grad():
        probs, cam = EnsembleGrader(graders, temps).eval()(x, c)
        own = [g.class_maps(x, c) for g in graders]
    mean = torch.stack([torch.softmax(o, dim=1) for o, _ in own]).mean(dim=0)
    t = torch.tensor(temps)[c].unsqueeze(1)
    expected = torch.softmax(torch.log(mean) / t, dim=1)
    assert torch.allclose(probs, expected, atol=1e-6)
    predicted = mean.argmax(dim=1)
    rows = torch.arange(len(c))
    mean_cam = torch.stack([maps[rows, predicted] for _, maps in own]).mean(dim=0)
    assert torch.allclose(cam, mean_cam, atol=1e-6)
    ref = reference_gradcam(list(graders), [x], c, predicted)  # autograd, up to a positive scale
    assert np.corrcoef(ref.flatten().numpy(), cam.flatten().numpy())[0, 1] > 0.999


class _Coarse(nn.Module):
    """A member whose maps are twice as coarse (another network of the same interface)."""

    def __init__(self, grader: Grader):
        super().__init__()
        self.grader = grader

    def class_maps(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]:
        own, maps = self.grader.class_maps(crops, conditions)
        return own, nn.functional.avg_pool2d(maps, 2)


def test_maps_of_different_sizes_are_resized_to_the_largest() -> None:
    fine, coarse = _members(2)
    crops, conditions, _ = sample_inputs(4)
    with torch.no_grad():
        probs, cam = EnsembleGrader([fine, _Coarse(coarse)], [1.0] * 5)(torch.from_numpy(crops),
                                                                         torch.from_numpy(conditions))
        _, own = fine.class_maps(torch.from_numpy(crops), torch.from_numpy(conditions))
    assert cam.shape == (4, *own.shape[-2:])
    assert torch.allclose(probs.sum(dim=1), torch.ones(4), atol=1e-6)


def test_the_localiser_is_the_mean_heatmap() -> None:
    torch.manual_seed(0)
    members = [Localiser(width=4).eval() for _ in range(2)]
    _, _, images = sample_inputs(2)
    x = torch.from_numpy(images)
    with torch.no_grad():
        assert torch.allclose(EnsembleLocaliser(members)(x), (members[0](x) + members[1](x)) / 2, atol=1e-6)


def test_members_with_other_preprocessing_are_refused(tmp_path: Path) -> None:
    def member(pre: dict) -> Member:
        meta = ModelMetadata(name="m", version="0", training_data="phantom", offsets_mm={}, preprocessing=pre)
        return Member(tmp_path, None, tmp_path / "model.pt", TorchRunner(Localiser(4), Grader(8), ModelInfo(meta, "")))

    same = default_preprocessing()
    check_preprocessing([member(same), member(default_preprocessing())])
    other = {**same, "grader": {**same["grader"], "pixels": 96}}
    with pytest.raises(ExportError, match=r"differ in preprocessing \(grader\)"):
        check_preprocessing([member(same), member(other)])


def test_flip_tta_mirrors_only_the_spinal_crops() -> None:
    graders = _members(2)
    crops, conditions, _ = sample_inputs(10)
    c = torch.from_numpy(conditions)
    x = torch.from_numpy(crops) * torch.tensor([4.0, 1.0, -2.0]).view(1, 3, 1, 1)  # slices unlike their mirror
    with torch.no_grad():
        plain, _ = EnsembleGrader(graders, [1.0] * 5)(x, c)
        tta, cam = EnsembleGrader(graders, [1.0] * 5, tta=True)(x, c)
        mirrored, _ = EnsembleGrader(graders, [1.0] * 5)(x.flip(1), c)
    spinal = c == 0  # CONDITIONS[0] is the spinal canal
    assert spinal.any() and (~spinal).any()
    assert torch.allclose(tta[~spinal], plain[~spinal], atol=1e-6)  # sided crops: unchanged
    both = torch.softmax(torch.log((plain + mirrored) / 2), dim=1)  # at T = 1: the mean of the two views
    assert torch.allclose(tta[spinal], both[spinal], atol=1e-6)
    assert (tta[spinal] - plain[spinal]).abs().max() > 1e-3
    grader = EnsembleGrader(graders, [1.0] * 5, tta=True)
    ref = reference_gradcam(list(graders), grader.views(x, c), c, tta.argmax(dim=1))
    assert np.corrcoef(ref.flatten().numpy(), cam.flatten().numpy())[0, 1] > 0.999


def test_model_json_carries_the_members_and_reads_without_them() -> None:
    meta = ModelMetadata(name="m", version="0", training_data="phantom", offsets_mm={},
                         members=({"run": "runs/cv", "fold": 0, "checkpoint_sha256": "ab", "cv_score": 0.5,
                                   "preset": "small"},))
    data = meta.to_json()
    assert data["members"][0]["fold"] == 0
    assert ModelMetadata.from_json(data) == meta
    del data["members"]
    assert ModelMetadata.from_json(data).members is None  # a model.json of one model
