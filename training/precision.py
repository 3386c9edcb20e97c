"""How a training step runs on its device: the numeric precision (mixed precision on CUDA, fp32 on
CPU), channels-last memory, gradient accumulation and optional ``torch.compile``, in one helper
(``Stepper``) that both stages' epoch loops use in place of ``loss.backward(); opt.step()``.

    with step.forward():                       # autocast; DDP's gradient sync only on the last micro-batch
        loss = loss_fn(step.net(x), y)         # step.net: compiled / DDP-wrapped / channels-last logits
    step.backward(loss)                        # scaled backward; an optimiser step every ``accumulate``

On CPU in fp32 with ``accumulate=1`` and no compile this is exactly ``opt.zero_grad();
loss.backward(); opt.step()`` (a unit test checks it). The unwrapped network stays what validation,
checkpoints and export use: ``step.net`` shares its parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any

import structlog
import torch
from torch import Tensor, nn

log = structlog.stdlib.get_logger(__name__)


class Precision(StrEnum):
    """The numeric precision of the training forward pass (``--precision``)."""

    AUTO = "auto"  # CUDA: bf16 where the GPU supports it, else fp16; CPU: fp32
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def resolve_precision(precision: Precision | str, device: torch.device) -> Precision:
    """The precision ``precision`` means on ``device`` (``auto`` resolved); fp16 needs CUDA."""
    precision = Precision(precision)
    if precision is Precision.AUTO:
        if device.type != "cuda":
            return Precision.FP32
        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
    if precision is Precision.FP16 and device.type != "cuda":
        raise ValueError("fp16 training needs CUDA (on CPU use fp32, or bf16)")
    if precision is Precision.BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16: use fp16 or auto")
    return precision


_DTYPE = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


class Logits(nn.Module):
    """A network's ``logits`` as its ``forward``, in fp32: what DDP and ``torch.compile`` wrap (DDP
    synchronises gradients only of calls through ``forward``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *crops: Tensor) -> Tensor:
        """The logits of a batch given as one tensor per crop shape, concatenated in that order
        (``training.models.grader_logits``; a localiser batch is one tensor)."""
        logits: list[Tensor] = [self.net.logits(x) for x in crops]  # type: ignore[operator]  # nets define it
        return (logits[0] if len(logits) == 1 else torch.cat(logits)).float()


class Stepper:
    """One network's training steps: ``forward()`` around the forward pass, ``backward(loss)`` after it.

    ``wrap`` (``training.distributed.World.wrap``) puts the network in DDP when training runs in
    several processes. With ``accumulate`` N, the optimiser steps after every N micro-batches (and
    after the epoch's last one, ``begin_epoch`` says how many there are), the loss scaled by 1/N so
    that N micro-batches of B samples step as one batch of N*B would.
    """

    def __init__(self, net: nn.Module, optimiser: torch.optim.Optimizer, device: torch.device,
                 precision: Precision | str = Precision.AUTO, accumulate: int = 1, compile: bool = False,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, not {accumulate}")
        self.precision = resolve_precision(precision, device)
        self.device, self.optimiser, self.accumulate = device, optimiser, accumulate
        self.channels_last = device.type == "cuda"
        if self.channels_last:
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # accepted, not in the stubs
        module: nn.Module = Logits(net)
        self.ddp = wrap(module) if wrap is not None else module
        self.net: Callable[..., Tensor] = torch.compile(self.ddp) if compile else self.ddp
        self.scaler = torch.amp.GradScaler("cuda") if self.precision is Precision.FP16 else None
        self._params = [p for p in net.parameters() if p.requires_grad]
        self._in_epoch, self._seen, self._pending = 0, 0, 0

    def begin_epoch(self, micro_batches: int) -> None:
        """Start an epoch of ``micro_batches`` forward passes (``len(loader)``)."""
        self._in_epoch, self._seen, self._pending = micro_batches, 0, 0
        self.optimiser.zero_grad(set_to_none=True)

    def input(self, x: Tensor) -> Tensor:
        """A batch on the device, channels-last on CUDA."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def _syncs(self) -> bool:
        """Whether this micro-batch ends an accumulation group (DDP then reduces the gradients)."""
        n = self._seen + 1
        return n % self.accumulate == 0 or n >= self._in_epoch

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around one micro-batch's forward pass: autocast, and DDP's ``no_sync`` when gradients
        accumulate past it."""
        with contextlib.ExitStack() as stack:
            if self.precision in _DTYPE:
                stack.enter_context(torch.autocast(self.device.type, dtype=_DTYPE[self.precision]))
            no_sync = getattr(self.ddp, "no_sync", None)
            if no_sync is not None and not self._syncs():
                stack.enter_context(no_sync())
            yield

    def backward(self, loss: Tensor) -> None:
        """Backward of one micro-batch's loss; an optimiser step at the end of its group."""
        syncs = self._syncs()
        self._seen += 1
        self._pending += 1
        scaled = loss / self.accumulate if self.accumulate > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if syncs:
            self._step()

    def end_epoch(self) -> None:
        """Step with what is left (the epoch had fewer micro-batches than ``begin_epoch`` said)."""
        if self._pending:
            if hasattr(self.ddp, "no_sync"):
                _all_reduce_mean([p.grad for p in self._params if p.grad is not None])
            self._step()

    def _step(self) -> None:
        if self._pending != self.accumulate and self.accumulate > 1:  # a short last group: the mean of its own
            for p in self._params:
                if p.grad is not None:
                    p.grad.mul_(self.accumulate / self._pending)
        if self.scaler is not None:
            self.scaler.step(self.optimiser)
            self.scaler.update()
        else:
            self.optimiser.step()
        self.optimiser.zero_grad(set_to_none=True)
        self._pending = 0

    def settings(self) -> dict[str, Any]:
        """What the steps run with (for the log)."""
        return {"precision": self.precision.value, "accumulate": self.accumulate,
                "channels_last": self.channels_last, "compiled": self.net is not self.ddp}


def _all_reduce_mean(grads: list[Tensor]) -> None:
    """Average gradients over the processes by hand (DDP did not: they accumulated under no_sync)."""
    world = torch.distributed.get_world_size()
    for g in grads:
        torch.distributed.all_reduce(g)
        g.div_(world)
