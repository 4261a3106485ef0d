"""Sharded SWAG: SWAGCollector on an FSDP2 model (2 CPU processes, gloo, torchrun) keeps only each process's
shards and writes one prior folder whose tensors equal, bit for bit, the unsharded collector's on the same
snapshots (uneven, empty and Shard(1) shards, batch-norm buffers, one file and several); a NaN on one
process raises on both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sharded_swag_worker as worker
import torch
from _models import prior_folder_tensors
from _torchrun import TORCHRUN, run_torchrun

from priorzoo import PriorModel
from priorzoo.binding.sharded import LazyTensor, open_prior
from priorzoo.format.files import prior_files
from priorzoo.learn import SWAGCollector


def _unsharded(tmp_path: Path) -> tuple[Path, Path]:
    net = worker.model()
    collector = SWAGCollector(net, rank=worker.K, head="7.*")
    for weights, stats in worker.snapshots(worker.model()):
        worker.set_snapshot(net, weights, stats)
        collector.collect()
    one = collector.save_prior(tmp_path / "one", source={"dataset": "toy"})
    multi = collector.save_prior(tmp_path / "one_multi", max_shard_size=300, source={"dataset": "toy"})
    return one, multi


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch.distributed.run's launcher) is not on PATH")
def test_sharded_swag_writes_the_unsharded_prior_bit_for_bit(tmp_path):
    run_torchrun(Path(worker.__file__), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the cases the comparison is about really occur: Shard(1), an uneven and an empty shard
    assert reports[0]["placements"]["0.weight"] == "(Shard(dim=1),)"
    assert [r["local_rows"]["3.weight"] for r in reports] == [[4, 4], [3, 4]]
    assert [r["local_rows"]["5.weight"] for r in reports] == [[1, 7], [0, 7]]
    assert all(r["class"] == "ShardedSWAGCollector" for r in reports)
    # memory: each process holds (K + 2) values per weight of its own shards only
    one, multi = _unsharded(tmp_path)
    total = sum(int(t.numel()) for k, t in prior_folder_tensors(one).items() if k.endswith(".mean"))
    locals_ = [r["memory"][0] for r in reports]
    assert sum(locals_) == total and all(n < total for n in locals_)
    assert all(r["memory"][1] == r["memory"][0] and r["memory"][2] == [worker.K, r["memory"][0]] for r in reports)
    assert all("save_prior" in r["to_prior"] for r in reports)

    for sharded, reference in ((tmp_path / "sharded", one), (tmp_path / "sharded_multi", multi)):
        got, want = prior_folder_tensors(sharded), prior_folder_tensors(reference)
        assert got.keys() == want.keys()
        assert "1.running_mean.buffer" in want and "1.num_batches_tracked.buffer" in want
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
        for name in ("config.json", "README.md"):
            assert (sharded / name).read_text() == (reference / name).read_text(), name
        files = sorted(prior_files(sharded))
        assert files == sorted(prior_files(reference))
    assert len([f for f in prior_files(tmp_path / "sharded_multi") if f.endswith(".safetensors")]) > 1

    # the saved prior loads whole and lazily
    loaded = PriorModel.from_pretrained(tmp_path / "sharded")
    assert loaded.rank == worker.K and loaded.config.source == {"dataset": "toy"}
    assert loaded.config.backbone["architecture"] == "Sequential"  # not fully_shard's FSDPSequential
    lazy = open_prior(tmp_path / "sharded_multi")
    assert isinstance(lazy.mean["3.weight"], LazyTensor)
    assert torch.equal(lazy.cov_factor["3.weight"][:, 4:7], loaded.cov_factor["3.weight"][:, 4:7])

    # a NaN in process 1's shard raised on both processes, and neither collected it
    assert "holds 1 non-finite value" in reports[1]["nan"] and "process 1" in reports[1]["nan"]
    assert "other process" in reports[0]["nan"]
    assert [r["collected_after_nan"] for r in reports] == [worker.SNAPSHOTS] * 2


def test_an_unsharded_model_gets_the_plain_collector_and_save_prior_equals_to_prior(tmp_path):
    net = worker.model()
    collector = SWAGCollector(net, rank=2, head="7.*")
    assert type(collector) is SWAGCollector
    for weights, stats in worker.snapshots(worker.model()):
        worker.set_snapshot(net, weights, stats)
        collector.collect()
    folder = collector.save_prior(tmp_path / "p")
    prior = collector.to_prior()
    loaded = PriorModel.from_pretrained(folder)
    assert all(torch.equal(loaded.mean[n], prior.mean[n]) for n in prior.names)
    assert all(torch.equal(loaded.cov_factor[n], prior.cov_factor[n]) for n in prior.names)


@pytest.fixture
def world_of_one():
    """A one-process gloo group: FSDP2 parameters are DTensors (Shard(0) over one process)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_one(n: int = 3):
    net = worker.model()
    worker.shard(net, 1)
    collector = SWAGCollector(net, rank=worker.K, head="7.*")
    for weights, stats in list(worker.snapshots(worker.model()))[:n]:
        worker.set_snapshot(net, weights, stats)
        collector.collect()
    return net, collector


def test_one_process_sharded_collector_equals_the_plain_one(tmp_path, world_of_one):
    _, collector = _sharded_one(worker.SNAPSHOTS)
    got = prior_folder_tensors(collector.save_prior(tmp_path / "s", source={"dataset": "toy"}))
    want = prior_folder_tensors(_unsharded(tmp_path)[0])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_sharded_save_prior_refuses_bn_data_and_a_file_target_and_a_nan_snapshot(tmp_path, world_of_one):
    net, collector = _sharded_one()
    with pytest.raises(NotImplementedError, match="`bn_data`"):
        collector.save_prior(tmp_path / "p", bn_data=[torch.zeros(2, 6)])
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="save_directory"):
        collector.save_prior(target)
    with pytest.raises(RuntimeError, match=r"needs at least 2"):
        SWAGCollector(net, rank=2, head="7.*").save_prior(tmp_path / "q")
    with torch.no_grad():
        dict(net.named_parameters())["3.weight"].to_local()[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match=r"process 0: parameter `3.weight` holds 1 non-finite"):
        collector.collect()
    assert collector.num_collected == 3
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
