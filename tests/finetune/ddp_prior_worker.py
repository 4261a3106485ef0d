"""Worker for test_prior_ddp.py, run as `torchrun --standalone --nproc_per_node=2 ddp_prior_worker.py OUT`.

Each case takes one optimiser step on a global batch of 8 examples spread over 2 CPU processes (gloo) and
rank 0 saves the resulting parameters to OUT/<case>.safetensors; the test compares them with one process
on the same global batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_models.py

from _models import TimmClassifier, bert_prior, timm_prior, tiny_bert
from finetune_helpers import image_examples, one_step_args, params_of, text_examples

N = 10
LR = 0.1


def trainer_args(out: Path, per_device: int, ga: int, **kw):
    return one_step_args(out / "trainer", per_device=per_device, ga=ga, lr=LR, **kw)


def case_callback_bert(out: Path, world: int) -> dict[str, torch.Tensor]:
    """PriorCallback on BERT; average_tokens_across_devices=False keeps the Trainer's data term a global mean
    (with True it multiplies BERT's mean loss by the world size: a transformers choice, not the prior's)."""
    from transformers import Trainer

    from priorzoo.finetune import PriorCallback

    model = tiny_bert()
    prior = bert_prior(model)
    args = trainer_args(out, per_device=8 // world, ga=1, average_tokens_across_devices=False)
    Trainer(model=model, args=args, train_dataset=text_examples(8), callbacks=[PriorCallback(prior, N)]).train()
    return params_of(model)


def case_mixin_timm(out: Path, world: int) -> dict[str, torch.Tensor]:
    """PriorTrainer on a timm model (no **kwargs: the Trainer divides by G) with G = 2 micro-batches."""
    from priorzoo.finetune import PriorTrainer

    model = TimmClassifier()
    prior = timm_prior(model, prefix="model.")
    args = trainer_args(out, per_device=4 // world, ga=2)
    PriorTrainer(model=model, args=args, train_dataset=image_examples(8), prior=prior, num_train_examples=N).train()
    return params_of(model)


def case_plain_loop(out: Path, world: int, rank: int) -> dict[str, torch.Tensor]:
    """A plain loop: DDP-wrapped timm model, loss = mean CE(local batch) + PriorRegularizer()."""
    from priorzoo.finetune import PriorRegularizer

    model = TimmClassifier().model
    prior = timm_prior(model)
    examples = image_examples(8)
    x = torch.stack([e["pixel_values"] for e in examples])
    y = torch.tensor([e["labels"] for e in examples])
    per = 8 // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    reg = PriorRegularizer(prior, net, num_train_examples=N)  # matched through DDP's `module.` prefix
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss = torch.nn.functional.cross_entropy(net(x), y) + reg()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return params_of(model)


def run_all(out: Path, world: int, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    results = {
        "callback_bert": case_callback_bert(out, world),
        "mixin_timm": case_mixin_timm(out, world),
    }
    if world > 1 and not torch.distributed.is_initialized():  # pragma: no cover - accelerate initialises it
        torch.distributed.init_process_group("gloo")
    results["plain_loop"] = case_plain_loop(out, world, rank)
    return results


def main() -> None:
    import transformers
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    out = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    results = run_all(out, world, rank)
    if rank == 0:
        for name, params in results.items():
            save_file({k: v.contiguous() for k, v in params.items()}, str(out / f"{name}.safetensors"))
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
