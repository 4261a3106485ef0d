"""Trainer + FSDP2 + PriorCallback takes the same steps as Trainer + DDP + PriorCallback (2 CPU processes,
gloo, torchrun).

On CPU accelerate runs ``fsdp=...`` as plain DDP: ``AcceleratorState`` switches to ``DistributedType.FSDP``
only for multi-accelerator process groups (``MULTI_GPU``, ``MULTI_XPU``, ...), not ``MULTI_CPU``. The FSDP2
worker forces that one decision (``fsdp_prior_worker.force_fsdp2_on_cpu``) and leaves the rest to
accelerate and the Trainer: ``_prepare_fsdp2`` and ``fsdp2_prepare_model`` call ``fully_shard`` (per
``BertLayer``, the embeddings, the tail and the root) on a CPU mesh, and the optimiser built before sharding
has its parameters swapped for the sharded ones (by ``data_ptr``). The worker checks at every optimiser step
that the optimiser steps exactly the model's ``DTensor`` parameters and that the callback bound a
``ShardedBoundPrior`` to them, so a stale optimiser (weights that do not move) or a silent fallback to DDP
fails there.

Measured here: FSDP2 and DDP final weights agree to ~1e-7 after two steps of gradient accumulation 2; the
prior moves the weights by ~0.19 (FSDP2 with vs without PriorCallback).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_helpers import max_abs_diff

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fsdp_prior_worker as worker
from _torchrun import TORCHRUN, run_torchrun


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch.distributed.run's launcher) is not on PATH")
def test_trainer_fsdp2_with_prior_callback_equals_trainer_ddp(tmp_path):
    from safetensors.torch import load_file

    run_torchrun(Path(worker.__file__), str(tmp_path), "fsdp")
    run_torchrun(Path(worker.__file__), str(tmp_path), "ddp")
    fsdp = load_file(str(tmp_path / "fsdp_prior.safetensors"))
    ddp = load_file(str(tmp_path / "ddp_prior.safetensors"))
    assert max_abs_diff(fsdp, ddp) < 1e-6

    # the comparison is sharp: without the prior the same FSDP2 run ends elsewhere
    none = load_file(str(tmp_path / "fsdp_none.safetensors"))
    assert max_abs_diff(fsdp, none) > 1e-2
