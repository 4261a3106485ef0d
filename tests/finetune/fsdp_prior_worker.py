"""Worker for test_prior_fsdp.py: `torchrun --standalone --nproc_per_node=2 fsdp_prior_worker.py OUT MODE`.

MODE ``fsdp`` runs the Trainer with ``fsdp=True, fsdp_config={'fsdp_version': 2}`` on CPU/gloo with
accelerate forced to FSDP2 (:func:`force_fsdp2_on_cpu`), twice: with ``PriorCallback`` (``fsdp_prior``) and
without (``fsdp_none``, the sharpness control). MODE ``ddp`` runs the same Trainer as plain DDP with
``PriorCallback`` (``ddp_prior``). Every run takes two SGD steps of gradient accumulation 2 on the same 16
examples and rank 0 saves the full final weights (``DTensor.full_tensor()``) to OUT/<run>.safetensors.

Each run also checks, on every process, that it really ran the way the test claims: under FSDP2 the
parameters the callback bound and the optimiser steps are the model's own ``DTensor`` s (accelerate swaps
the optimiser's parameters for the sharded ones after ``fully_shard``), the callback's bound prior is a
``ShardedBoundPrior``; under DDP the model is wrapped in ``DistributedDataParallel`` and nothing is sharded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_models.py

from _models import bert_prior, tiny_bert
from finetune_helpers import one_step_args, text_examples

N = 10
LR = 0.1
STEPS = 2
GA = 2
EXAMPLES = 16  # STEPS optimiser steps x GA micro-batches x 2 processes x 2 examples


def force_fsdp2_on_cpu() -> None:
    """Make accelerate honour the Trainer's FSDP plugin on CPU/gloo, as it does on a GPU.

    accelerate 1.15 decides in ``AcceleratorState.__init__`` (``accelerate/state.py``): the branch that sets
    ``distributed_type = DistributedType.FSDP`` and ``fsdp_plugin`` runs only when the process group's
    distributed type is one of the multi-accelerator types (``MULTI_GPU``, ``MULTI_XPU``, ...); on CPU it is
    ``MULTI_CPU``, the plugin is dropped and the model is wrapped in DDP. This applies the same two
    assignments (and the ``PartialState`` copy of the type) when accelerate would have skipped them; the rest
    (``Accelerator.is_fsdp2``, ``_prepare_fsdp2``, ``fsdp2_prepare_model``'s ``fully_shard`` calls, the
    optimiser parameter swap) is accelerate's own code path, unchanged. ``fully_shard`` itself runs on a CPU
    device mesh with gloo.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_forces_fsdp2", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._forces_fsdp2 = True
    AcceleratorState.__init__ = init


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def train(out: Path, world: int, *, fsdp: bool, prior: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor
    from transformers import Trainer, TrainerCallback

    from priorzoo.binding.sharded import ShardedBoundPrior
    from priorzoo.finetune import PriorCallback

    model = tiny_bert()
    names = [n for n, _ in model.named_parameters()]
    kw = {}
    if fsdp:
        # BertEmbeddings (in BERT's _no_split_modules) is not wrapped on its own: accelerate then also
        # fully_shards its word_embeddings, whose weight is already a DTensor (torch 2.13 refuses that)
        kw = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
    args = one_step_args(
        out / "trainer",
        per_device=EXAMPLES // (STEPS * GA * world),
        ga=GA,
        lr=LR,
        max_steps=STEPS,
        average_tokens_across_devices=False,  # keep the data term a global mean (see ddp_prior_worker.py)
        **kw,
    )
    callback = PriorCallback(bert_prior(model), N) if prior else None
    seen = {}

    class Probe(TrainerCallback):
        """Record what the optimiser steps, at every step (the failure mode: it holds stale parameters)."""

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            stepped = [p for g in optimizer.param_groups for p in g["params"]]
            own = list(model.parameters())
            # the optimiser steps exactly the model's parameters (in the Trainer's own group order)
            assert sorted(map(id, stepped)) == sorted(map(id, own)), "the optimiser holds other tensors"
            assert all(p.grad is not None for p in own)
            seen["sharded"] = all(isinstance(p, DTensor) for p in own)

    callbacks = [Probe()] + ([callback] if callback is not None else [])
    trainer = Trainer(model=model, args=args, train_dataset=text_examples(EXAMPLES), callbacks=callbacks)
    trainer.train()

    assert trainer.accelerator.is_fsdp2 == fsdp, trainer.accelerator.distributed_type
    assert seen["sharded"] == fsdp
    if fsdp:
        assert trainer.model is model  # fully_shard works in place
    else:
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    if callback is not None:
        bound = callback.regularizer.bound
        assert isinstance(bound, ShardedBoundPrior) == fsdp, type(bound)
        own = {id(p) for p in model.parameters()}
        assert len(bound.parameters) > 0 and all(id(p) in own for p in bound.parameters)  # bound to the shards
    params = dict(model.named_parameters())
    assert list(params) == names
    return {n: full(p).detach().clone() for n, p in params.items()}


def main() -> None:
    import transformers
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    out = Path(sys.argv[1])
    mode = sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    assert world == 2, "run under torchrun with 2 processes"
    if mode == "fsdp":
        force_fsdp2_on_cpu()
        runs = {"fsdp_prior": {"fsdp": True, "prior": True}, "fsdp_none": {"fsdp": True, "prior": False}}
    else:
        runs = {"ddp_prior": {"fsdp": False, "prior": True}}
    for name, kw in runs.items():
        params = train(out / name, world, **kw)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in params.items()}, str(out / f"{name}.safetensors"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
