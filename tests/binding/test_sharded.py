"""FSDP2: a prior bound to a model sharded over 2 (and 4) CPU processes (gloo, torchrun) gives the value and
gradient of one process, for uneven shards, empty shards and Shard(1); a plain FSDP2 loop takes the same
steps; binding a prior folder opened with open_prior reads only each process's slices."""

from __future__ import annotations

from pathlib import Path

import pytest
import sharded_worker as worker
import torch
from _torchrun import TORCHRUN, run_torchrun

from priorzoo import PriorModel
from priorzoo.binding.sharded import LazyTensor, check_parameters, is_sharded, local_slices, open_prior


def _torchrun(tmp_path: Path, *cases: str, nproc: int = 2) -> None:
    run_torchrun(Path(worker.__file__), str(tmp_path), *cases, nproc=nproc)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch.distributed.run's launcher) is not on PATH")
def test_sharded_prior_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    folder = worker.model_and_prior()[1].save_pretrained(tmp_path / "prior")
    _torchrun(tmp_path, "value_and_grad", "plain_loop", "callback", f"value_and_grad={folder}")

    one = worker.run("value_and_grad", 1, 0)
    for name in ("value_and_grad", "value_and_grad_lazy"):
        sharded = load_file(str(tmp_path / f"{name}.safetensors"))
        read = sharded.pop("elements_read", None)
        assert sharded.keys() == one.keys()
        for key in one:
            assert _rel(sharded[key], one[key]) < 1e-6, (name, key)
    # rank 0 read only its slices: (K + 2) values per weight of its shards, not the whole prior
    p_total = sum(t.numel() for t in worker.model_and_prior()[1].mean.values())
    p_rank0 = 4 * 3 + 2 + 4 * 4 + 4 + 1 * 7 + 1  # 0.weight cols 0-2, 0.bias 0-1, 2.* rows 0-3, 4.* all
    assert float(read) == (3 + 2) * p_rank0 < (3 + 2) * p_total

    for case in ("plain_loop", "callback"):  # plain FSDP2 loop; PriorCallback's events on an FSDP2 model
        steps = load_file(str(tmp_path / f"{case}.safetensors"))
        ref = worker.run(case, 1, 0)
        assert steps.keys() == ref.keys()
        for key in ref:
            assert float((steps[key] - ref[key]).abs().max()) <= 1e-6, (case, key)
    # the comparison is sharp: the prior's gradient moved the weights
    model, _ = worker.model_and_prior()
    assert float((ref["2.weight"] - dict(model.named_parameters())["2.weight"].detach()).abs().max()) > 1e-3


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch.distributed.run's launcher) is not on PATH")
def test_sharded_prior_with_an_empty_shard_on_four_processes_equals_one_process(tmp_path):
    """3 rows on 4 processes: the last process holds an empty shard of ``2.weight``/``2.bias``, three hold
    empty shards of ``4.*``, ``0.weight`` is Shard(1); the eager and the lazily read prior give one process's
    value and gradient (the placements are asserted in the worker)."""
    from safetensors.torch import load_file

    folder = worker.model_and_prior(**worker.SIZES_4)[1].save_pretrained(tmp_path / "prior")
    _torchrun(tmp_path, "value_and_grad_3rows", f"value_and_grad_3rows={folder}", nproc=4)

    one = worker.run("value_and_grad_3rows", 1, 0)
    assert tuple(one["add_grad.2.weight"].shape) == (3, 4)
    for name in ("value_and_grad_3rows", "value_and_grad_3rows_lazy"):
        sharded = load_file(str(tmp_path / f"{name}.safetensors"))
        read = sharded.pop("elements_read", None)
        assert sharded.keys() == one.keys()
        for key in one:
            assert _rel(sharded[key], one[key]) < 1e-6, (name, key)
    # rank 0 read (K + 2) values per weight of its shards: 0.weight cols 0-1, 0.bias 0, 2.* row 0, 4.* all
    assert float(read) == (3 + 2) * (4 * 2 + 1 + 1 * 4 + 1 + 1 * 3 + 1)


def test_plain_models_are_not_sharded_and_have_full_slices():
    lin = torch.nn.Linear(3, 2)
    assert not is_sharded(list(lin.parameters()))
    assert local_slices(lin.weight) == (slice(0, 2), slice(0, 3))
    check_parameters(lin)


def test_fsdp1_and_zero3_parameters_are_refused():
    class FullyShardedDataParallel(torch.nn.Module):  # what FSDP1 wraps modules in (by class name)
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="FSDP1"):
        check_parameters(torch.nn.Sequential(FullyShardedDataParallel()), where="PriorRegularizer")
    zero3 = torch.nn.Linear(2, 2)
    zero3.weight.ds_id = 0  # DeepSpeed ZeRO-3 tags each partitioned parameter
    zero3.weight.ds_numel = 4
    with pytest.raises(RuntimeError, match=r"`weight` is partitioned by DeepSpeed ZeRO-3"):
        check_parameters(zero3)
    prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0)
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        prior.bind(zero3)


def test_open_prior_reads_lazily_and_binds_an_unsharded_model_like_the_loaded_prior(tmp_path):
    model, prior = worker.model_and_prior()
    folder = prior.save_pretrained(tmp_path / "p", max_shard_size=400)  # several shard files
    lazy = open_prior(folder)
    assert all(isinstance(t, LazyTensor) for t in lazy.mean.values())
    assert lazy.mean["2.weight"][1:3].shape == (2, 4)
    a = lazy.bind(model).value_and_grad()
    b = PriorModel.from_pretrained(folder).bind(model).value_and_grad()
    assert torch.allclose(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_open_prior_of_a_folder_without_a_prior_fails_clearly(tmp_path):
    from priorzoo.errors import PriorNotFoundError

    with pytest.raises(PriorNotFoundError, match=r"no config\.json"):
        open_prior(tmp_path)
