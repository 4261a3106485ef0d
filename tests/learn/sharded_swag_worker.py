"""Worker for test_sharded_swag.py: `torchrun --standalone --nproc_per_node=2 sharded_swag_worker.py OUT`.

Every process builds the same seeded model, shards it with FSDP2 (uneven, empty and Shard(1) shards, a
batch-norm layer whose buffers stay plain tensors), sets its shards to the same snapshot sequence as
:func:`snapshots` gives one process, collects with ``SWAGCollector`` and saves the prior collectively.
Also: a NaN in one process's shard raises on both, and nothing is collected. Each process writes what it
saw to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

K = 3
SNAPSHOTS = 6


def model() -> torch.nn.Module:
    """0.weight (4, 6): Shard(1); 3.weight (7, 4): 4 + 3 rows; 5.* one row (the second process holds none);
    1.* batch norm; 7.*: the head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 4),
        torch.nn.BatchNorm1d(4),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 1),
        torch.nn.Tanh(),
        torch.nn.Linear(1, 3),
    )


def snapshots(net: torch.nn.Module):
    """The snapshot sequence: full weights and batch-norm statistics for step t (the same on every process)."""
    base = {n: p.detach().clone() for n, p in net.named_parameters()}
    for t in range(SNAPSHOTS):
        gen = torch.Generator().manual_seed(100 + t)
        weights = {n: w + 0.01 * (t + 1) * torch.randn(w.shape, generator=gen) for n, w in base.items()}
        stats = {
            "1.running_mean": 0.1 * t + torch.rand(4, generator=gen),
            "1.running_var": 1.0 + torch.rand(4, generator=gen),
        }
        yield weights, stats


@torch.no_grad()
def set_snapshot(net: torch.nn.Module, weights, stats) -> None:
    from priorzoo.binding.sharded import local_slices

    for n, p in net.named_parameters():
        local = p.to_local() if type(p).__name__ == "DTensor" else p
        local.copy_(weights[n][local_slices(p)])
    buffers = dict(net.named_buffers())
    for n, v in stats.items():
        buffers[n].copy_(v)
    buffers["1.num_batches_tracked"].add_(1)


def shard(net: torch.nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))

    def placement(p):
        return Shard(1) if tuple(p.shape) == (4, 6) else None

    for layer in net:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(net, mesh=mesh, shard_placement_fn=placement)


def main() -> None:
    import torch.distributed as dist

    from priorzoo.learn import SWAGCollector

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = model()
    shard(net, world)
    report: dict = {"placements": {n: str(p.placements) for n, p in net.named_parameters()}}
    report["local_rows"] = {n: list(p.to_local().shape) for n, p in net.named_parameters()}
    collector = SWAGCollector(net, rank=K, head="7.*")
    report["class"] = type(collector).__name__
    report["memory"] = [collector._mean.numel(), collector._m2.numel(), list(collector._ring.shape)]
    for weights, stats in snapshots(model()):
        set_snapshot(net, weights, stats)
        collector.collect()
    try:
        collector.to_prior()
    except RuntimeError as exc:
        report["to_prior"] = str(exc)
    report["folder"] = str(collector.save_prior(out / "sharded", source={"dataset": "toy"}))
    collector.save_prior(out / "sharded_multi", max_shard_size=300, source={"dataset": "toy"})
    # a NaN in the second process's shard: both raise, neither collects
    with torch.no_grad():
        if rank == 1:
            dict(net.named_parameters())["3.weight"].to_local()[0, 0] = float("nan")
    try:
        collector.collect()
        report["nan"] = None
    except FloatingPointError as exc:
        report["nan"] = str(exc)
    report["collected_after_nan"] = collector.num_collected
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
