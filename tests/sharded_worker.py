"""Worker for test_sharded.py: `torchrun --standalone --nproc_per_node=W sharded_worker.py OUT CASE...`.

Each case builds the same seeded model and prior on every process, shards the model with FSDP2
(``fully_shard`` on a CPU mesh, gloo) and rank 0 writes what the test compares with one process to
OUT/<case>.safetensors (full tensors gathered with ``DTensor.full_tensor()``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

N = 10
LR = 0.1
SIZES_4 = {"hidden": 3, "inputs": 8}  # model_and_prior for 4 processes: 3 rows on 4, an empty shard


def model_and_prior(seed: int = 0, k: int = 3, factor_dtype=torch.float32, hidden: int = 7, inputs: int = 6):
    """A model with an uneven shard (7 rows on 2 processes: 4 and 3), empty shards (1 row on 2 processes)
    and a parameter the sharded cases put in Shard(1) (shape (4, 6)); the prior covers all but the head.

    The 4-process case (``hidden=3, inputs=8``): ``2.weight`` (3, 4) and ``2.bias`` have 3 rows on 4
    processes (1, 1, 1 and an empty shard), ``4.weight`` (1, 3) one row (three empty shards); the Shard(1)
    ``0.weight`` (4, 8) has 2 columns on each (FSDP2 refuses uneven shards on dimensions other than 0)."""
    from priorzoo import PriorModel

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(inputs, 4),  # 0.weight (4, 6): Shard(1) in the sharded cases
        torch.nn.Tanh(),
        torch.nn.Linear(4, hidden),  # 2.weight (7, 4): 4 + 3 rows
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 1),  # 4.weight (1, 7), 4.bias (1,): one row, the second process holds none
        torch.nn.Tanh(),
        torch.nn.Linear(1, 3),  # 6.*: the head, no prior
    )
    gen = torch.Generator().manual_seed(seed + 1)
    params = {n: p for n, p in model.named_parameters() if not n.startswith("6.")}
    mean = {n: p.detach() + 0.2 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
    var = {n: torch.rand(p.shape, generator=gen) + 0.3 for n, p in params.items()}
    fac = {n: (0.5 * torch.randn(k, *p.shape, generator=gen)).to(factor_dtype) for n, p in params.items()}
    return model, PriorModel.from_tensors(mean, var, fac, scale=1.5, exclude=["6.*"])


def batch(seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def shard(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))

    first = model[0].weight

    def placement(p):
        return Shard(1) if p is first else None

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


def check_placements(model, world: int) -> None:
    """The cases the comparison is about really occur: Shard(1), an uneven and an empty shard."""
    from torch.distributed.tensor import Shard

    params = dict(model.named_parameters())
    rank = torch.distributed.get_rank()
    assert params["0.weight"].placements == (Shard(1),), params["0.weight"].placements
    assert params["2.weight"].placements == (Shard(0),)
    if world == 2:
        assert tuple(params["2.weight"].to_local().shape) == ((4, 4) if rank == 0 else (3, 4))
        assert tuple(params["4.weight"].to_local().shape) == ((1, 7) if rank == 0 else (0, 7))
    if world == 4:  # the hidden=3, inputs=8 model: 3 rows on 4 processes, the last holds an empty shard
        assert tuple(params["2.weight"].shape) == (3, 4)
        assert tuple(params["2.weight"].to_local().shape) == ((1, 4) if rank < 3 else (0, 4))
        assert tuple(params["2.bias"].to_local().shape) == ((1,) if rank < 3 else (0,))
        assert tuple(params["4.weight"].to_local().shape) == ((1, 3) if rank == 0 else (0, 3))
        assert tuple(params["0.weight"].to_local().shape) == (4, 2)


def full(t):
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def case_value_and_grad(world: int, source=None, **sizes: int) -> dict[str, torch.Tensor]:
    """Value, log-density and gradient of the prior term on the sharded model: add_to_grad_ and the loss
    path."""
    from priorzoo.finetune import PriorRegularizer

    model, prior = model_and_prior(**sizes)
    if world > 1:
        shard(model, world)
        check_placements(model, world)
    read = []
    if source is not None:
        from priorzoo.binding.sharded import LazyTensor, open_prior

        prior = open_prior(source)
        original = LazyTensor.__getitem__

        def counting(self, index):
            t = original(self, index)
            read.append(t.numel())
            return t

        LazyTensor.__getitem__ = counting
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    out = {"value": reg().detach().reshape(1), "log_prob": reg.log_prob().detach().reshape(1)}
    if source is not None:
        out["elements_read"] = torch.tensor([sum(read)], dtype=torch.float64)
    reg().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            out[f"loss_grad.{n}"] = full(p.grad).detach().clone()
    model.zero_grad(set_to_none=True)
    out["add_value"] = reg.add_to_grad_().detach().reshape(1)  # creates the gradients
    reg.add_to_grad_()  # accumulates into them
    for n, p in model.named_parameters():
        if p.grad is not None:
            out[f"add_grad.{n}"] = full(p.grad).detach().clone()
    return out


def case_plain_loop(world: int, rank: int) -> dict[str, torch.Tensor]:
    """Two SGD steps on mean CE(local half of the batch) + PriorRegularizer() (the loss path), then two on
    mean CE + add_to_grad_() after backward (the callback's path)."""
    from priorzoo.finetune import PriorRegularizer

    model, prior = model_and_prior()
    if world > 1:
        shard(model, world)
    x, y = batch()
    per = 8 // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        data = torch.nn.functional.cross_entropy(model(x), y)
        if step < 2:
            (data + reg()).backward()
        else:
            data.backward()
            reg.add_to_grad_()
        opt.step()
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


def case_callback(world: int, rank: int) -> dict[str, torch.Tensor]:
    """PriorCallback's events driven by hand around a plain FSDP2 loop, as a Trainer with FSDP2 calls them:
    on_init_end with fsdp set (matches, binds nothing), on_train_begin after sharding (binds the shards),
    on_pre_optimizer_step after backward (adds into the local gradient shards), two steps."""
    from types import SimpleNamespace

    from priorzoo.finetune import PriorCallback

    model, prior = model_and_prior()
    args = SimpleNamespace(deepspeed=None, fsdp=world > 1, optim="sgd")
    cb = PriorCallback(prior, N, exclude=["6.*"])
    cb.on_init_end(args, None, None, model=model)
    assert (cb.regularizer is None) == (world > 1)
    if world > 1:
        shard(model, world)
    cb.on_train_begin(args, None, None, model=model)
    x, y = batch()
    per = 8 // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        cb.on_pre_optimizer_step(args, None, None, model=model, optimizer=opt)
        opt.step()
        cb.on_step_end(args, SimpleNamespace(global_step=step + 1), None)
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


def run(case: str, world: int, rank: int, source=None):
    if case == "plain_loop":
        return case_plain_loop(world, rank)
    if case == "callback":
        return case_callback(world, rank)
    if case == "value_and_grad_3rows":  # the model for 4 processes
        return case_value_and_grad(world, source, **SIZES_4)
    return case_value_and_grad(world, source)


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dist.init_process_group("gloo")
    for case in sys.argv[2:]:
        name, _, source = case.partition("=")
        result = run(name, world, rank, source or None)
        if rank == 0:
            target = out / f"{name}{'_lazy' if source else ''}.safetensors"
            save_file({k: v.contiguous() for k, v in result.items()}, str(target))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
