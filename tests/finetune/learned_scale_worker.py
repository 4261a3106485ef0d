"""Worker for test_learned_scale_distributed.py, run as
`torchrun --standalone --nproc_per_node=2 learned_scale_worker.py OUT CASE` (CASE: ddp or fsdp).

A plain loop with PriorRegularizer(scale="learned") takes STEPS optimiser steps on a global batch of 8 examples,
4 per process (gloo), on a DDP-wrapped or FSDP2-sharded (``fully_shard`` on a CPU mesh) MLP with a low-rank prior
over its first two layers; rank 0 writes the full weights to OUT/<case>.safetensors and the learned scales and σ
to OUT/<case>.json. ``run(case, world=1, rank=0)`` is the one-process reference on the whole batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_models.py

STEPS = 3
N = 8


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))


def make_prior(model: torch.nn.Module):
    from _models import random_prior

    named = {n: p for n, p in model.named_parameters() if not n.startswith("3.")}
    return random_prior(named, rank=2, offset=0.3, variance=0.05, exclude=["3.*"])


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone()


def run(case: str, world: int, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    from priorzoo.finetune import PriorRegularizer, train_step

    model = make_model()
    prior = make_prior(model)
    x, y = batch()
    per = 8 // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    net = model
    if world > 1 and case == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    elif world > 1 and case == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    reg = PriorRegularizer(prior, net, num_train_examples=N, scale="learned", groups="layer", sigma_init=0.05)
    if world > 1 and case == "fsdp":
        from priorzoo.binding.sharded import ShardedBoundPrior

        assert all(isinstance(g.bound, ShardedBoundPrior) for g in reg.learned.groups if g.bound is not None)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(STEPS):
        train_step(net, (x, y), opt, regularizer=reg)
    params = {n.removeprefix("module."): full(p) for n, p in net.named_parameters()}
    return params, {"scales": reg.scales, "sigma": reg.sigma}


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out, case = Path(sys.argv[1]), sys.argv[2]
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    params, learned = run(case, world, rank)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in params.items()}, str(out / f"{case}.safetensors"))
        (out / f"{case}.json").write_text(json.dumps(learned))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
