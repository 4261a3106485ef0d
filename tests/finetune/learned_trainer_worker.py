"""Worker for test_learned_scale_distributed.py's Trainer tests, run as
`torchrun --standalone --nproc_per_node=2 learned_trainer_worker.py OUT CASE PHASE` (CASE: ddp or fsdp; PHASE: run
or resume).

For each KIND (``callback``: ``Trainer`` + ``PriorCallback``; ``mixin``: ``PriorTrainer``) a Trainer with
``scale="learned"`` (per-block groups) takes STEPS AdamW steps on N examples (the whole data set every step: 4 per
process on 2 processes, 8 on one) and writes a checkpoint every 2 steps, learned_scale.safetensors included.
PHASE ``run`` trains from scratch; PHASE ``resume`` builds everything afresh and resumes from OUT/<kind>/checkpoint-2.
Every rank writes the full final weights to OUT/<kind>_<phase>_<rank>.safetensors, λ_g and σ to
OUT/<kind>_<phase>_<rank>.json and its whole learned-scale state (``save_learned_state``: ρ, σ's Adam, the noise
generator, ...) to OUT/<kind>_<phase>_<rank>/, so that the test can check that the processes agree.
CASE ``fsdp`` forces accelerate's FSDP2 on CPU (``fsdp_prior_worker.force_fsdp2_on_cpu``) and checks that the
model is sharded and every learned group bound to the shards. ``train(...)`` with world 1 (in the test's own
process) is the one-process reference.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_models.py

from _models import bert_prior, tiny_bert
from finetune_helpers import text_examples
from fsdp_prior_worker import force_fsdp2_on_cpu, full

N = 8
STEPS = 4
KINDS = ("callback", "mixin")


def train(out: Path, kind: str, world: int, *, fsdp: bool = False, resume: bool = False) -> tuple[dict, dict, Any]:
    """One Trainer run of ``kind``; returns the full final weights, {"scales": λ_g, "sigma": σ} and the
    ``LearnedScale``."""
    from transformers import Trainer, TrainingArguments

    from priorzoo.finetune import PriorCallback, PriorTrainer

    model = tiny_bert()
    prior = bert_prior(model)
    kw = {}
    if fsdp:  # as in fsdp_prior_worker.py: BertEmbeddings is not wrapped on its own
        kw = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
    args = TrainingArguments(
        output_dir=str(out / kind),
        use_cpu=True,
        report_to="none",
        max_steps=STEPS,
        per_device_train_batch_size=N // world,
        learning_rate=1e-2,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=2,
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        average_tokens_across_devices=False,  # the data term a global mean (see ddp_prior_worker.py)
        **kw,
    )
    learned = {"scale": "learned", "sigma_init": 1e-2, "sigma_lr": 0.1}
    data = text_examples(N)
    if kind == "callback":
        cb = PriorCallback(prior, N, groups="block", **learned)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    else:
        trainer = PriorTrainer(
            model=model, args=args, train_dataset=data, prior=prior, prior_groups="block",
            **{("prior_" + k if k != "scale" else k): v for k, v in learned.items()},
        )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(out / kind / "checkpoint-2") if resume else None)
    reg = cb.regularizer if kind == "callback" else trainer.prior_regularizer
    assert trainer.state.global_step == STEPS
    assert trainer.accelerator.is_fsdp2 == fsdp, trainer.accelerator.distributed_type
    if fsdp:
        from priorzoo.binding.sharded import ShardedBoundPrior

        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        assert all(isinstance(g.bound, ShardedBoundPrior) for g in reg.learned.groups if g.bound is not None)
    params = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    return params, {"scales": reg.scales, "sigma": reg.sigma}, reg.learned


def main() -> None:
    import transformers
    from safetensors.torch import save_file

    from priorzoo.finetune.learned_scale_checkpoint import save_learned_state

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    out, case, phase = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    assert world == 2, "run under torchrun with 2 processes"
    if case == "fsdp":
        force_fsdp2_on_cpu()
    for kind in KINDS:
        params, learned, state = train(out, kind, world, fsdp=case == "fsdp", resume=phase == "resume")
        name = f"{kind}_{phase}_{rank}"
        save_file({k: v.contiguous() for k, v in params.items()}, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(learned))
        save_learned_state(state, out / name)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
