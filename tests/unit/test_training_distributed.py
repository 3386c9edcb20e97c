"""training.distributed: sharding the global batches over ranks, the environment, the relaunch's
arguments, and the step helper inside DistributedDataParallel (a one-process gloo group)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from tests.support.nets import LinearNet
from training.cli import _without
from training.distributed import World, shard
from training.loader import StudyBatchSampler, localiser_batches
from training.models import Grader
from training.precision import Stepper
from training.train import grader_loss


def test_the_shards_of_a_global_batch_are_disjoint_and_cover_it() -> None:
    items = list(range(10, 17))
    shards = [shard(items, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == items and shards[0] == [10, 13, 16]
    assert shard(items, 0, 1) == items
    assert [shard([5], r, 3) for r in range(3)] == [[5], [5], [5]]  # too few: padded by repeats
    assert [shard([5, 6], r, 3) for r in range(3)] == [[5], [6], [5]]
    assert shard([], 1, 2) == []


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_the_global_batches_of_one_process(world: int) -> None:
    starts = np.cumsum([0, 3, 1, 4, 2, 5, 2, 3]).astype(np.int64)  # 7 studies of 1 to 5 samples
    one = StudyBatchSampler(starts, 3, seed=4)
    ranks = [StudyBatchSampler(starts, 3, seed=4, rank=r, world=world) for r in range(world)]
    for sampler in (one, *ranks):
        sampler.set_epoch(2)
    assert all(len(r) == len(one) for r in ranks)
    for batch, *shards in zip(one, *ranks, strict=True):
        assert set(batch) == {key for s in shards for key in s}
        for keys in shards:  # each rank's share is whole studies (the loss's any-severe term is per study)
            studies = {int(np.searchsorted(starts, i, side="right")) - 1 for _, i in keys}
            assert sorted(i for _, i in keys) == sorted(i for st in studies for i in range(starts[st], starts[st + 1]))
    loc = [list(localiser_batches(11, 4, 0, True, rank=r, world=world)) for r in range(world)]
    whole = list(localiser_batches(11, 4, 0, True))
    for b, batch in enumerate(whole):
        assert sorted(batch) == sorted({k for r in range(world) for k in loc[r][b]})


def test_the_world_comes_from_torchruns_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World(0, 1, 0) and not World.from_env().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_env()
    assert world == World(3, 4, 1) and world.distributed and not world.main
    assert world.device("cpu") == torch.device("cpu")


def test_the_relaunch_drops_nproc_and_data() -> None:
    args = ["train", "--data", "d", "--nproc", "2", "--out", "r", "--nproc=4", "--compile", "--data=x"]
    assert _without(_without(args, "--nproc"), "--data") == ["train", "--out", "r", "--compile"]




@pytest.fixture
def gloo_group(tmp_path: Path):  # noqa: ANN201 - a generator fixture
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_accumulation_inside_ddp_steps_as_without_it(gloo_group: None) -> None:
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)
    nets = [LinearNet(), LinearNet()]
    steps = [Stepper(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.device("cpu"), accumulate=2, wrap=wrap)
             for net, wrap in zip(nets, (None, DistributedDataParallel), strict=True)]
    assert isinstance(steps[1].ddp, DistributedDataParallel)
    for step in steps:
        step.begin_epoch(4)  # 3 micro-batches come: the last is left to end_epoch (reduced by hand)
        for part in (slice(0, 4), slice(4, 8), slice(8, 12)):
            with step.forward():
                out = step.net(x[part])
            step.backward(((out - y[part]) ** 2).mean())
        step.end_epoch()
    assert torch.allclose(nets[0].fc.weight, nets[1].fc.weight, atol=1e-6)
    assert not torch.equal(nets[0].fc.weight, LinearNet().fc.weight)


def _study_batch(n_studies: int = 5, per_study: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    n = n_studies * per_study
    return (torch.randn(n, 3, 48, 48, generator=g), torch.randint(0, 3, (n,), generator=g),
            torch.randint(0, 5, (n,), generator=g), torch.arange(n) // per_study)


def _rank_gradients(rank: int, world: int, store: str, out: str) -> None:
    """One rank of ``test_ddp_gradients_of_the_shards_are_the_global_batchs``: its loss and gradients."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ranks = World(rank, world, rank)
        torch.manual_seed(0)
        net = Grader(width=8).eval()  # BatchNorm's running statistics, no dropout: nothing per rank
        step = Stepper(net, torch.optim.SGD(net.parameters(), lr=0.0), torch.device("cpu"), wrap=ranks.wrap)
        x, t, c, s = _study_batch()
        rows = torch.cat([torch.nonzero(s == study).flatten() for study in shard(list(range(5)), rank, world)])
        step.begin_epoch(1)
        with step.forward():
            logits = step.net(x[rows])
        loss = grader_loss(logits, t[rows], c[rows], s[rows], ranks)
        loss.backward()  # DDP averages the gradients here
        losses, _ = ranks.mean_sum([loss.item()], 0)
        torch.save({"loss": losses[0], "grads": [p.grad for p in net.parameters()]}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_gradients_of_the_shards_are_the_global_batchs(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_rank_gradients, args=(2, str(tmp_path / "store"), str(tmp_path / "rank.pt")),
                                nprocs=2)
    got = torch.load(tmp_path / "rank.pt")  # rank 1 wrote last or first: the values are the same on both
    torch.manual_seed(0)
    net = Grader(width=8).eval()
    loss = grader_loss(net.logits(_study_batch()[0]), *_study_batch()[1:])
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for mine, theirs in zip((p.grad for p in net.parameters()), got["grads"], strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6)


def test_under_torchrun_train_takes_a_cache_and_no_nproc(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from training.cli import train_command

    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    data = CliRunner().invoke(train_command, ["--data", str(tmp_path), "--out", str(tmp_path / "run")], env=env)
    assert data.exit_code == 2 and "--cache" in data.output and "torchrun" in data.output
    nproc = CliRunner().invoke(train_command, ["--cache", str(tmp_path), "--out", str(tmp_path / "run"),
                                               "--nproc", "2"], env=env)
    assert nproc.exit_code == 2 and "--nproc starts torchrun itself" in nproc.output
    fp16 = CliRunner().invoke(train_command, ["--cache", str(tmp_path), "--out", str(tmp_path / "run"),
                                              "--device", "cpu", "--precision", "fp16"])
    assert fp16.exit_code == 2 and "fp16 training needs CUDA" in fp16.output
