"""Learned scales on two processes (torchrun, gloo): DDP and FSDP2 take the same steps, and learn the same λ_g and σ,
as one process on the whole batch (group sums all-reduced over FSDP2's shards; the same noise on every process)."""

from __future__ import annotations

import json
from pathlib import Path

import learned_scale_worker as worker
import pytest
from _torchrun import TORCHRUN, run_torchrun
from finetune_helpers import max_abs_diff


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch.distributed.run's launcher) is not on PATH")
@pytest.mark.parametrize("case", ["ddp", "fsdp"])
def test_two_processes_learn_the_scales_of_one_process(case, tmp_path):
    from safetensors.torch import load_file

    run_torchrun(Path(worker.__file__), str(tmp_path), case)
    params, learned = worker.run(case, world=1, rank=0)
    assert max_abs_diff(load_file(str(tmp_path / f"{case}.safetensors")), params) < 1e-6
    got = json.loads((tmp_path / f"{case}.json").read_text())
    assert sorted(got["scales"]) == ["0", "2", "head"]
    assert got["scales"] == pytest.approx(learned["scales"], rel=1e-5)
    assert got["sigma"] == pytest.approx(learned["sigma"], rel=1e-6)
    assert learned["sigma"] != pytest.approx(0.05, rel=1e-3)  # σ moved: its gradient entered
