"""Worker for test_sharded_swag_resume.py: `torchrun --standalone --nproc_per_node=2 sharded_swag_resume_worker.py OUT`.

Every process shards the model of :mod:`sharded_swag_worker` (uneven, empty and Shard(1) shards, batch
norm) and runs the same snapshot sequence three ways: 6 snapshots uninterrupted (OUT/full); 3 snapshots,
``save``, then a fresh model and collector in the same processes that ``load`` and collect the other 3
(OUT/resumed); then states it must refuse on every process (an unsharded state, the processes' files
swapped, one corrupt file, files of two saves, a file as target), after which the collector is unchanged
(OUT/after, and the collectives still work). Each process writes what it saw to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from sharded_swag_worker import K, model, set_snapshot, shard, snapshots


def collector_on(net: torch.nn.Module):
    from priorzoo.learn import SWAGCollector

    return SWAGCollector(net, rank=K, head="7.*")


def refused(call) -> str | None:
    """Run ``call``; the ``Type: message`` it raised (None: it did not raise)."""
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main() -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    snaps = list(snapshots(model()))
    report: dict = {}

    net = model()
    shard(net, world)
    full = collector_on(net)
    for weights, stats in snaps:
        set_snapshot(net, weights, stats)
        full.collect()
    full.save_prior(out / "full")

    net = model()
    shard(net, world)
    first = collector_on(net)
    for weights, stats in snaps[:3]:
        set_snapshot(net, weights, stats)
        first.collect()
    report["saved"] = str(first.save(out / "state"))
    report["files"] = sorted(p.name for p in (out / "state").iterdir())
    report["shard"] = first.state_dict()["shard"]
    del first, net

    # a fresh model (its batch-norm counter restored, as a model checkpoint would) and a fresh collector
    net = model()
    shard(net, world)
    with torch.no_grad():
        dict(net.named_buffers())["1.num_batches_tracked"].fill_(3)
    resumed = collector_on(net)
    resumed.load(out / "state")
    report["loaded"] = resumed.num_collected
    for weights, stats in snaps[3:]:
        set_snapshot(net, weights, stats)
        resumed.collect()
    resumed.save_prior(out / "resumed")
    resumed.save(out / "later")

    # states to refuse, on every process
    plain_net = model()
    plain = collector_on(plain_net)
    for weights, stats in snaps[:3]:
        set_snapshot(plain_net, weights, stats)
        plain.collect()
    plain_file = plain.save(out / f"plain{rank}.safetensors")
    if rank == 0:
        shutil.copytree(out / "state", out / "swapped")
        a, b = (out / "swapped" / f"rank-0000{r}-of-00002.safetensors" for r in (0, 1))
        a.rename(out / "swapped" / "tmp")
        b.rename(a)
        (out / "swapped" / "tmp").rename(b)
        shutil.copytree(out / "state", out / "corrupt")
        (out / "corrupt" / "rank-00001-of-00002.safetensors").write_bytes(b"not a safetensors file")
        shutil.copytree(out / "state", out / "mixed")
        shutil.copy(out / "later" / "rank-00001-of-00002.safetensors", out / "mixed")
        (out / "a_file").write_text("x")
    dist.barrier()
    report["refused"] = {
        "plain_file": refused(lambda: resumed.load(plain_file)),
        "plain_state": refused(lambda: resumed.load_state_dict(plain.state_dict())),
        "swapped": refused(lambda: resumed.load(out / "swapped")),
        "corrupt": refused(lambda: resumed.load(out / "corrupt")),
        "mixed": refused(lambda: resumed.load(out / "mixed")),
        "missing": refused(lambda: resumed.load(out / "missing")),
        "a_file": refused(lambda: resumed.save(out / "a_file")),
    }
    report["collected_after"] = resumed.num_collected
    resumed.save_prior(out / "after")  # unchanged, and no process is stuck in a collective
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
