"""Resuming a sharded SWAG run (FSDP2, 2 CPU processes, gloo, torchrun): 3 snapshots, ``save`` (one file
per process), a fresh model and collector ``load`` and collect 3 more, and ``save_prior`` writes, bit for
bit, the prior of an uninterrupted 6-snapshot sharded run and of the unsharded collector. States that do
not belong to a process (another world size, the other process's file, an unsharded state, one corrupt
file, files of two saves) are refused on every process, naming what differs, and change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sharded_swag_resume_worker as resume_worker
import sharded_swag_worker as worker
import torch
from _models import prior_folder_tensors
from _torchrun import TORCHRUN, run_torchrun

from priorzoo.learn import SWAGCollector
from priorzoo.learn.checkpoint import load_safetensors_with_meta

FILES = ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One torchrun of the worker (about 10 s), shared by the tests below."""
    if TORCHRUN is None:
        pytest.skip("torchrun (torch.distributed.run's launcher) is not on PATH")
    out = tmp_path_factory.mktemp("resume")
    run_torchrun(Path(resume_worker.__file__), str(out))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_resumed_sharded_run_writes_the_uninterrupted_prior_bit_for_bit(run, tmp_path):
    out, reports = run
    assert [r["files"] for r in reports] == [FILES, FILES]
    assert [(r["shard"]["world_size"], r["shard"]["process"]) for r in reports] == [(2, 0), (2, 1)]
    layout = [{p["name"]: (p["offset"], p["shape"]) for p in r["shard"]["layout"]} for r in reports]
    assert [x["0.weight"] for x in layout] == [([0, 0], [4, 3]), ([0, 3], [4, 3])]  # Shard(1)
    assert [x["5.weight"][1] for x in layout] == [[1, 7], [0, 7]]  # an empty shard
    assert [r["loaded"] for r in reports] == [3, 3]

    net = worker.model()
    plain = SWAGCollector(net, rank=worker.K, head="7.*")
    for weights, stats in worker.snapshots(worker.model()):
        worker.set_snapshot(net, weights, stats)
        plain.collect()
    unsharded = plain.save_prior(tmp_path / "unsharded")
    want = prior_folder_tensors(unsharded)
    assert "1.num_batches_tracked.buffer" in want and any(k.endswith(".cov_factor") for k in want)
    for folder in ("full", "resumed", "after"):
        got = prior_folder_tensors(out / folder)
        assert got.keys() == want.keys(), folder
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (folder, key)
        assert (out / folder / "config.json").read_text() == (unsharded / "config.json").read_text(), folder


def test_sharded_load_refuses_a_state_of_another_process_or_save_on_every_process(run):
    _, reports = run
    refused = [r["refused"] for r in reports]
    for r, got in enumerate(refused):
        assert got["plain_file"].startswith("ValueError: process ") and "is one file (an unsharded" in got["plain_file"]
        assert "state is an unsharded SWAGCollector's, but this collector is process" in got["plain_state"]
        other = 1 - r
        assert f"process: received {other}, expected {r}" in got["swapped"]
        want = f"`0.weight`'s local shard: received offset [0, {3 * other}] shape [4, 3], expected offset [0, {3 * r}]"
        assert want in got["swapped"]
        assert (
            "different saves (process 0: 3 snapshots, save " in got["mixed"]
            and "process 1: 6 snapshots" in got["mixed"]
        )
        assert got["missing"].startswith("FileNotFoundError") and FILES[r] in got["missing"]
        assert got["a_file"].startswith("NotADirectoryError")
    # the corrupt file is process 1's: it says why, process 0 says where
    assert "not a readable safetensors SWAGCollector state" in refused[1]["corrupt"]
    assert refused[0]["corrupt"].startswith("RuntimeError") and "on process(es) 1" in refused[0]["corrupt"]
    assert [r["collected_after"] for r in reports] == [6, 6]


@pytest.fixture
def world_of_one():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_two_process_state_is_refused_by_one_process_and_by_the_unsharded_collector(run, tmp_path, world_of_one):
    out, _ = run
    net = worker.model()
    worker.shard(net, 1)
    one = SWAGCollector(net, rank=worker.K, head="7.*")
    with pytest.raises(ValueError, match=r"world size: received 2, expected 1"):
        one.load(out / "state")
    plain = SWAGCollector(worker.model(), rank=worker.K, head="7.*")
    with pytest.raises(ValueError, match=r"sharded \(FSDP2\) SWAGCollector, one file per process"):
        plain.load(out / "state")
    tensors, meta = load_safetensors_with_meta(out / "state" / FILES[1], what="state")
    with pytest.raises(ValueError, match=r"process 1's shard of a 2-process sharded \(FSDP2\) SWAGCollector"):
        plain.load_state_dict({**meta, **tensors})
    assert one.num_collected == plain.num_collected == 0

    # one process: save and load round-trip (one file), and the unsharded state is refused the other way
    for weights, stats in list(worker.snapshots(worker.model()))[:3]:
        worker.set_snapshot(net, weights, stats)
        one.collect()
    folder = one.save(tmp_path / "one")
    assert sorted(p.name for p in folder.iterdir()) == ["rank-00000-of-00001.safetensors"]
    again = SWAGCollector(net, rank=worker.K, head="7.*")
    again.load(folder)
    assert again.num_collected == 3 and torch.equal(again._mean, one._mean) and torch.equal(again._m2, one._m2)
    assert torch.equal(again.deviations(), one.deviations())
    with pytest.raises(ValueError, match=r"is one file \(an unsharded SWAGCollector's state\)"):
        again.load(plain.save(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="sharded"):
        plain.load(folder)


def test_swag_callback_saves_and_restores_a_sharded_collector_on_every_process(tmp_path, world_of_one):
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from priorzoo.learn.callbacks import COLLECTOR_STATE_NAME, SWAGCallback

    net = worker.model()
    worker.shard(net, 1)
    collector = SWAGCollector(net, rank=worker.K, head="7.*")
    for weights, stats in list(worker.snapshots(worker.model()))[:3]:
        worker.set_snapshot(net, weights, stats)
        collector.collect()
    args = SimpleNamespace(output_dir=str(tmp_path))
    # not process 0 of the Trainer's world: a sharded collector still saves its own shard (save is collective)
    SWAGCallback(collector, every_n_steps=1).on_save(
        args, SimpleNamespace(global_step=3, is_world_process_zero=False), None
    )
    state_dir = tmp_path / "checkpoint-3" / COLLECTOR_STATE_NAME
    assert sorted(p.name for p in state_dir.iterdir()) == ["rank-00000-of-00001.safetensors"]
    fresh = SWAGCollector(net, rank=worker.K, head="7.*")
    callback = SWAGCallback(fresh, every_n_steps=1)
    callback.on_train_begin(args, SimpleNamespace(global_step=3), None)
    assert fresh.num_collected == 3 and torch.equal(fresh._mean, collector._mean)
