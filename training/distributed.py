"""Distributed data parallel training through PyTorch's own launcher (``torch.distributed.run``,
i.e. ``torchrun``).

``lumbar-node train --nproc N`` re-executes the same command under ``torch.distributed.run`` with N
local processes (``launch``); a user's own ``torchrun`` across machines runs the same code: each
process finds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment (``World.from_env``).
NCCL on CUDA (one GPU per process: ``cuda:LOCAL_RANK``), gloo on CPU.

What each process does (``training.train``): every rank trains its share of every global batch
(``training.loader``'s batch samplers shard it) in a DistributedDataParallel wrapper, which averages
the gradients; rank 0 alone validates (through the serving pipeline), writes config.json, the
checkpoints, history.json and model.pt, and logs; the validation number is broadcast so that every
rank keeps the same best weights and stops early at the same epoch. state.pt holds the unwrapped
networks, so a run resumes under any number of processes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
import torch
from torch import Tensor, nn

log = structlog.stdlib.get_logger(__name__)

#: How long a rank waits for the others at a collective: rank 0's validation through the serving
#: pipeline (the other ranks wait for its number) can take many minutes on the real validation split.
TIMEOUT = timedelta(hours=2)
#: The module ``launch`` runs under torchrun: the ``lumbar-node`` command itself.
COMMAND_MODULE = "dicom_node.cli"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """The torchrun environment's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (absent: one process)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0: the process that validates, writes and logs."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of this process for ``--device name``: with several processes on CUDA,
        ``cuda:LOCAL_RANK`` (made the current device)."""
        from training.runner import device_of

        device = device_of(name)
        if self.distributed and device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"process {self.local_rank} of this machine has no GPU of its own "
                                   f"({torch.cuda.device_count()} GPUs): start at most one process per GPU")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL on CUDA, gloo on CPU); quiet the logs of ranks other than 0."""
        if not self.distributed:
            return
        if not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, timeout=TIMEOUT,
                                                 device_id=device if device.type == "cuda" else None)
        if not self.main:
            logging.getLogger().setLevel(logging.WARNING)
        log.info("distributed training", world_size=self.size, backend=torch.distributed.get_backend())

    def stop(self) -> None:
        """Leave the process group."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel with several processes, else itself."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean_of_parts(self, numerators: Tensor, denominators: Tensor) -> Tensor:
        """The mean over a loss's parts of numerator / denominator (a part whose denominator is 0 is
        absent), over the global batch from this rank's share: the denominators are summed over the
        ranks and the result multiplied by the number of ranks, so that the ranks' values average to
        the global batch's loss and their gradients, which DDP averages, to its gradient."""
        den = denominators.detach()
        if self.distributed:
            den = den.clone()
            torch.distributed.all_reduce(den)
        present = den > 0
        mean = (numerators[present] / den[present]).mean()
        return mean * self.size if self.distributed else mean

    def mean_sum(self, losses: list[float], samples: int) -> tuple[list[float], int]:
        """Per-batch losses averaged over the ranks (every rank ran the same number of batches)
        and samples summed: the epoch as one process training the global batches reports it."""
        if not self.distributed:
            return losses, samples
        t = torch.tensor([*losses, float(samples)], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        values = t.cpu().tolist()
        return [v / self.size for v in values[:-1]], round(values[-1])


def shard(items: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of a global batch's ``items``: every ``world``-th from ``rank`` (as
    ``DistributedSampler`` shards a data set). A batch with fewer items than ranks gives a rank
    without its own share a repeat of one (as ``DistributedSampler`` pads), so that every rank runs
    the batch (DDP needs every rank in every step)."""
    if world == 1:
        return list(items)
    if not len(items):
        return []
    own = list(items[rank::world])
    return own or [items[rank % len(items)]]


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``lumbar-node ARGS`` in ``nproc`` processes on this machine under torch.distributed.run;
    the exit status (a failed process fails the launch)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--module", COMMAND_MODULE, *args]
    log.info("starting training processes", nproc=nproc, launcher="torch.distributed.run")
    try:
        torchrun.main(argv)
    except ChildFailedError as exc:
        print(f"training failed in {len(exc.failures)} process(es) of {nproc}", file=sys.stderr)
        return 1
    return 0
