"""training.precision: the training step helper on CPU (fp32 as before, bf16 autocast, accumulation)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tests.support.nets import LinearNet
from training.models import Grader
from training.precision import Precision, Stepper, resolve_precision
from training.train import grader_loss


def _batch(seed: int, n: int = 12) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 48, 48, generator=g)
    targets = torch.randint(0, 3, (n,), generator=g)
    conditions = torch.randint(0, 5, (n,), generator=g)
    studies = torch.arange(n) // 4
    return x, targets, conditions, studies


def test_a_cpu_step_with_the_helper_is_the_plain_step() -> None:
    torch.manual_seed(0)
    plain, helped = Grader(width=8), Grader(width=8)
    helped.load_state_dict(plain.state_dict())
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=1e-4)
    opt_helped = torch.optim.AdamW(helped.parameters(), lr=1e-2, weight_decay=1e-4)
    step = Stepper(helped, opt_helped, torch.device("cpu"))
    assert step.settings() == {"precision": "fp32", "accumulate": 1, "channels_last": False, "compiled": False}
    for seed in range(3):
        x, t, c, s = _batch(seed)
        torch.manual_seed(100 + seed)  # the same dropout masks
        loss = grader_loss(plain.logits(x), t, c, s)
        opt_plain.zero_grad()
        loss.backward()
        opt_plain.step()

        torch.manual_seed(100 + seed)
        step.begin_epoch(1)
        with step.forward():
            logits = step.net(step.input(x))
        helped_loss = grader_loss(logits, t, c, s)
        step.backward(helped_loss)
        step.end_epoch()
        assert helped_loss.item() == loss.item()
    for a, b in zip(plain.state_dict().values(), helped.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_accumulated_micro_batches_step_as_their_union_does() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    whole, accumulated = LinearNet(), LinearNet()
    opt = torch.optim.SGD(whole.parameters(), lr=0.1)
    loss = ((whole.logits(x) - y) ** 2).mean()
    loss.backward()
    opt.step()

    step = Stepper(accumulated, torch.optim.SGD(accumulated.parameters(), lr=0.1), torch.device("cpu"), accumulate=2)
    step.begin_epoch(3)  # two micro-batches make a step, the third is a group of its own
    for part in (slice(0, 4), slice(4, 8)):
        with step.forward():
            out = step.net(x[part])
        step.backward(((out - y[part]) ** 2).mean())
    assert torch.allclose(accumulated.fc.weight, whole.fc.weight, atol=1e-6)
    single = LinearNet()
    single.load_state_dict(accumulated.state_dict())
    with step.forward():
        out = step.net(x[:4])
    step.backward(((out - y[:4]) ** 2).mean())  # the epoch's last: a group of one steps with its own mean
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1)
    ((single.logits(x[:4]) - y[:4]) ** 2).mean().backward()
    opt_single.step()
    assert torch.allclose(accumulated.fc.weight, single.fc.weight, atol=1e-6)


def test_bf16_autocast_on_cpu_trains_and_hands_the_loss_fp32_logits() -> None:
    net = Grader(width=8)
    before = [p.detach().clone() for p in net.parameters()]
    step = Stepper(net, torch.optim.AdamW(net.parameters(), lr=1e-2), torch.device("cpu"), precision="bf16")
    x, t, c, s = _batch(0)
    step.begin_epoch(1)
    with step.forward():
        logits = step.net(step.input(x))
    assert logits.dtype == torch.float32
    loss = grader_loss(logits, t, c, s)
    step.backward(loss)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_precision_resolves_per_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is Precision.FP32
    assert resolve_precision("bf16", cpu) is Precision.BF16
    with pytest.raises(ValueError, match="fp16 training needs CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="accumulate"):
        Stepper(LinearNet(), torch.optim.SGD(LinearNet().parameters(), lr=0.1), cpu, accumulate=0)
