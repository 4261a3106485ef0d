"""Worker for test_prior_deepspeed.py: `torchrun --standalone --nproc_per_node=2 deepspeed_prior_worker.py OUT CASE...`.

For each ZeRO stage (1 or 2) every process builds the same seeded model and prior, wraps the model with
``deepspeed.initialize`` (CPU accelerator, gloo, fp32, a ``torch.optim.SGD`` client optimiser: no op is
built) and takes two steps of ``loss = mean CE(local half of the batch) + PriorRegularizer(...)()`` with
``engine.backward(loss); engine.step()``. Under ZeRO-1/2 the parameters stay replicated (only the optimiser
state, and in stage 2 the gradients, are partitioned): after each step DeepSpeed copies the updated fp32
partitions back into the model's parameters and all-gathers them, so the module's parameters are the full
weights. Rank 0 writes them to OUT/stage<S>.safetensors, with the largest difference between the processes'
copies (``replication_diff``); the test compares them with :func:`reference` (one process, no DeepSpeed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_models.py

N = 10
LR = 0.1
STEPS = 2
BATCH = 8


def model_and_prior():
    """A 3-layer MLP (seeded) and a random SWAG-shaped prior (K = 3) over all but the head ``4.*``."""
    from _models import random_prior

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3),  # the head: no prior
    )
    named = {n: p for n, p in model.named_parameters() if not n.startswith("4.")}
    return model, random_prior(named, exclude=["4.*"], offset=0.2)


def batch():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, 6, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)


def reference(prior: bool = True, clip: float = 0.0) -> dict[str, torch.Tensor]:
    """One process, no DeepSpeed: the same steps on the whole batch (``prior=False``: without the term;
    ``clip > 0``: the total gradient clipped to that norm, as DeepSpeed's ``gradient_clipping`` does)."""
    from priorzoo.finetune import PriorRegularizer

    model, p = model_and_prior()
    x, y = batch()
    reg = PriorRegularizer(p, model, num_train_examples=N)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if prior:
            loss = loss + reg()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: t.detach().clone() for n, t in model.named_parameters()}


def config(stage: int, world: int, clip: float | None) -> dict:
    """``clip=None`` leaves DeepSpeed's default ``gradient_clipping`` (1.0 in deepspeed 0.19: the total
    gradient, prior term included, is clipped to norm 1); 0.0 turns clipping off."""
    extra = {} if clip is None else {"gradient_clipping": clip}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the client torch.optim.SGD
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def run_stage(stage: int, world: int, rank: int, clip: float | None) -> dict[str, torch.Tensor]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from priorzoo.finetune import PriorRegularizer

    model, prior = model_and_prior()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, world, clip))
    assert engine.zero_optimization_stage() == stage
    assert engine.gradient_clipping() == (1.0 if clip is None else clip)
    assert isinstance(optimizer, DeepSpeedZeroOptimizer), type(optimizer)
    total = sum(p.numel() for p in model.parameters())
    local = sum(t.numel() for t in optimizer.single_partition_of_fp32_groups)
    assert local < total, (local, total)  # the optimiser state really is partitioned
    # the prior is matched through the engine's `module.` prefix, on the parameters DeepSpeed flattened
    reg = PriorRegularizer(prior, engine, num_train_examples=N)
    assert len(reg.parameters) == 4
    x, y = batch()
    per = BATCH // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    for _ in range(STEPS):
        # every process adds the whole term: DeepSpeed averages the gradients over the processes, so the
        # prior's (the same on each) enters once and the data term is the mean CE of the global batch
        loss = torch.nn.functional.cross_entropy(engine(x), y) + reg()
        engine.backward(loss)
        engine.step()
    out = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    worst = torch.zeros(())
    for t in out.values():  # ZeRO-1/2: every process holds the same full weights
        r0 = t.clone()
        dist.broadcast(r0, 0)
        worst = torch.maximum(worst, (t - r0).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    out["replication_diff"] = worst.reshape(1)
    engine.destroy()
    return out


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: its CPU accelerator, gloo
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    deepspeed.init_distributed(dist_backend="gloo")
    for case in sys.argv[2:]:  # "1", "2": clipping off; "2-default": DeepSpeed's default clipping
        stage, _, default = case.partition("-")
        result = run_stage(int(stage), world, rank, clip=None if default else 0.0)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"stage{case}.safetensors"))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
