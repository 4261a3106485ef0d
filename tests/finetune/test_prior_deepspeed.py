"""DeepSpeed ZeRO stages 1 and 2, the loss path: two CPU processes (DS_ACCELERATOR=cpu, gloo, torchrun, fp32,
a client torch.optim.SGD) taking ``engine.backward(CE(local half batch) + PriorRegularizer(...)())`` and
``engine.step()`` end with the weights of one process taking the same steps on the whole batch without
DeepSpeed. DeepSpeed averages the gradients over the processes, so the prior term added on every process
enters once. DeepSpeed's default ``gradient_clipping`` (1.0 in deepspeed 0.19) clips the total gradient,
prior included, to norm 1: with it the steps are those of ``torch.nn.utils.clip_grad_norm_(params, 1.0)``.
(ZeRO-3 is refused by :func:`priorzoo.binding.sharded.check_parameters`; PriorCallback refuses DeepSpeed, whose
engine steps inside ``backward``.) Skipped without deepspeed, which CI does not install."""

from __future__ import annotations

from pathlib import Path

import deepspeed_prior_worker as worker
import pytest
from _torchrun import TORCHRUN, run_torchrun
from finetune_helpers import max_abs_diff


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch.distributed.run's launcher) is not on PATH")
def test_zero_1_and_2_loss_path_equals_one_process(tmp_path):
    pytest.importorskip("deepspeed")  # here, not at collection: importing deepspeed takes seconds
    from safetensors.torch import load_file

    cases = ("1", "2", "1-default", "2-default")  # gradient_clipping 0.0; DeepSpeed's default (1.0)
    run_torchrun(Path(worker.__file__), str(tmp_path), *cases)

    ref = {"": worker.reference(prior=True), "default": worker.reference(prior=True, clip=1.0)}
    for case in cases:
        zero = load_file(str(tmp_path / f"stage{case}.safetensors"))
        assert float(zero.pop("replication_diff")) == 0.0, case  # every process holds the full weights
        assert max_abs_diff(zero, ref[case.partition("-")[2]]) <= 1e-6, case
    # the comparison is sharp: the prior term moved the weights (clipped or not), and clipping is on by default
    assert max_abs_diff(worker.reference(prior=False), ref[""]) > 1e-3
    assert max_abs_diff(worker.reference(prior=False, clip=1.0), ref["default"]) > 1e-3
    assert max_abs_diff(ref[""], ref["default"]) > 1e-3
