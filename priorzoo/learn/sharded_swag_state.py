"""Resume state of a sharded SWAG run (:class:`~priorzoo.learn.sharded_swag.ShardedSWAGCollector`): one
file per process, each tagged with the world size, the process and its shard layout.

Under FSDP2 each process holds only its slice of the SWAG statistics, so the state is per process:

* ``state_dict()`` is this process's state — the unsharded collector's keys over its own shards, plus
  ``shard = {"world_size", "process", "layout"}`` where ``layout`` lists every parameter's local ``offset``
  (the slice's start in the global shape) and local ``shape``;
* ``save(path)`` (collective) writes the folder ``path`` with ``rank-00000-of-00002.safetensors``, … —
  each file through a temporary file and a rename — all tagged with one ``save_id``;
* ``load(path)`` / ``load_state_dict(state)`` (collective) check on every process that the state is
  this process's (same world size, process and local offsets/shapes; the message names what differs,
  received vs expected) and that all processes' states come from one save (same ``save_id`` and
  snapshot count), then restore all of them or none.

A failure on one process (a missing or corrupt file, a mismatch, a full disk) is all-gathered before
anything changes, so every process raises and none waits in a later collective. An unsharded collector
refuses a sharded state and vice versa (even with one process: the files differ), and an interrupted save
leaves a folder whose files disagree, which ``load`` refuses rather than mixing two checkpoints: save to a
new folder per checkpoint (as ``checkpoint-<step>/`` does) to always keep the previous one.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from priorzoo.learn.swag_state import read_state_file, write_state_file

__all__ = ["ShardedSWAGStateMixin", "state_file_name"]

_FILE = re.compile(r"rank-(\d{5})-of-(\d{5})\.safetensors")


def state_file_name(process: int, world_size: int) -> str:
    """The name of process ``process``'s file in a sharded state folder.

    Example:
        >>> state_file_name(1, 2)
        'rank-00001-of-00002.safetensors'
    """
    return f"rank-{process:05d}-of-{world_size:05d}.safetensors"


class ShardedSWAGStateMixin:
    """The persistence half of :class:`~priorzoo.learn.sharded_swag.ShardedSWAGCollector` (see the module)."""

    group: Any
    world_rank: int

    def _world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    def _layout(self) -> list[dict[str, Any]]:
        """Every parameter's local slice: its offset in the global shape and its local shape."""
        return [
            {"name": n, "offset": [s.start for s in self.slices[n]], "shape": list(self.block_shapes[n])}  # type: ignore[attr-defined]
            for n in self.names  # type: ignore[attr-defined]
        ]

    def state_dict(self) -> dict[str, Any]:
        """This process's state: the unsharded keys over its shards, plus ``shard`` (world size, process,
        each parameter's local offset and shape). Not collective.

        Example:
            >>> state = collector.state_dict()  # doctest: +SKIP
            >>> state["shard"]["world_size"], state["shard"]["process"]  # doctest: +SKIP
            (2, 1)
        """
        state = super().state_dict()  # type: ignore[misc]
        state["shard"] = {"world_size": self._world_size(), "process": self.world_rank, "layout": self._layout()}
        return state

    def _check_sharding(self, state: Mapping[str, Any]) -> None:
        world, me = self._world_size(), self.world_rank
        shard = state.get("shard")
        if shard is None:
            raise ValueError(
                f"process {me}: the saved state is an unsharded SWAGCollector's, but this collector is process "
                f"{me} of a {world}-process sharded (FSDP2) run; load it into a collector on the same model "
                "without fully_shard, or resume from a state saved by this sharded run"
            )
        differs = []
        if shard.get("world_size") != world:
            differs.append(f"world size: received {shard.get('world_size')}, expected {world}")
        if shard.get("process") != me:
            differs.append(f"process: received {shard.get('process')}, expected {me}")
        saved = {p["name"]: (list(p["offset"]), list(p["shape"])) for p in shard.get("layout", [])}
        for entry in self._layout():
            got = saved.get(entry["name"])
            if got != (entry["offset"], entry["shape"]) and len(differs) < 5:
                received = "absent" if got is None else f"offset {got[0]} shape {got[1]}"
                differs.append(
                    f"`{entry['name']}`'s local shard: received {received}, expected offset {entry['offset']} "
                    f"shape {entry['shape']}"
                )
        if differs:
            raise ValueError(
                f"process {me}: the saved state is not this process's shard ({'; '.join(differs)}); resume with "
                "the same number of processes and the same fully_shard sharding the state was saved with"
            )

    def _agree(self, error: BaseException | None, info: Any = None) -> list[Any]:
        """Collective: every process's ``info``, or raise on every process if one of them failed."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self._world_size()
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(gathered, (mine, info), group=self.group)
        if error is not None:
            raise error
        failed = [(p, e) for p, (e, _) in enumerate(gathered) if e is not None]
        if failed:
            raise RuntimeError(
                f"SWAGCollector: the state could not be saved/loaded on process(es) "
                f"{', '.join(str(p) for p, _ in failed)} (process {failed[0][0]}: {failed[0][1]}); nothing "
                "changed on this process"
            )
        return [i for _, i in gathered]

    def _finish_load(self, state: Mapping[str, Any] | None, error: BaseException | None) -> None:
        info = None
        if error is None and state is not None:
            info = (int(state["num_collected"]), state.get("save_id"))
        infos = self._agree(error, info)
        if len(set(infos)) > 1:
            which = ", ".join(f"process {p}: {n} snapshots, save {sid}" for p, (n, sid) in enumerate(infos))
            raise ValueError(
                f"the processes' saved states come from different saves ({which}); each process must load its "
                "file of one save (an interrupted save leaves such a folder: resume from the previous one)"
            )
        assert state is not None
        self._apply_state(state)  # type: ignore[attr-defined]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Collective: restore this process's :meth:`state_dict` on every process, or raise on every process
        (a mismatch — world size, process, local offsets/shapes, K, parameters — named received vs expected,
        or states of different saves) and change nothing.

        Example:
            >>> collector.load_state_dict(state)  # on every process  # doctest: +SKIP
        """
        error = None
        try:
            self._check_state(state)  # type: ignore[attr-defined]
        except Exception as exc:  # reported to every process, then raised here
            error = exc
        self._finish_load(state if error is None else None, error)

    def save(self, path: str | os.PathLike) -> Path:
        """Collective: write the folder ``path`` with one state file per process,
        ``rank-<process>-of-<world>.safetensors`` (each atomically), all tagged with one ``save_id``;
        returns the folder. State files of another world size left in it are removed.

        Example:
            >>> folder = collector.save("checkpoints/swag-step-1000")  # on every process  # doctest: +SKIP
            >>> sorted(p.name for p in folder.iterdir())  # doctest: +SKIP
            ['rank-00000-of-00002.safetensors', 'rank-00001-of-00002.safetensors']
        """
        import torch.distributed as dist

        world, me = self._world_size(), self.world_rank
        box = [uuid.uuid4().hex if me == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        folder = Path(path)
        error = None
        try:
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(
                    f"{folder} is a file; a sharded SWAGCollector state is a folder (one file per process)"
                )
            write_state_file({**self.state_dict(), "save_id": box[0]}, folder / state_file_name(me, world))
        except Exception as exc:  # reported to every process, then raised here
            error = exc
        self._agree(error)
        if me == 0:
            for stale in folder.glob("rank-*-of-*.safetensors"):
                found = _FILE.fullmatch(stale.name)
                if found and int(found.group(2)) != world:
                    stale.unlink(missing_ok=True)
        return folder

    def _read(self, path: str | os.PathLike) -> dict[str, Any]:
        world, me = self._world_size(), self.world_rank
        folder = Path(path)
        file = folder / state_file_name(me, world)
        if file.is_file():
            return read_state_file(file)
        if folder.is_file():
            raise ValueError(
                f"process {me}: {folder} is one file (an unsharded SWAGCollector's state), but this collector is "
                f"process {me} of a {world}-process sharded (FSDP2) run, whose state is a folder with one file "
                "per process; load the file into a collector on the same model without fully_shard"
            )
        found = sorted(f.name for f in folder.glob("rank-*-of-*.safetensors")) if folder.is_dir() else []
        worlds = sorted({int(m.group(2)) for m in map(_FILE.fullmatch, found) if m})
        if worlds and world not in worlds:
            raise ValueError(
                f"process {me}: {folder} holds the state of a {'/'.join(map(str, worlds))}-process sharded run "
                f"({', '.join(found[:4])}); world size: received {'/'.join(map(str, worlds))}, expected {world}. "
                "Resume with the number of processes and the fully_shard sharding it was saved with"
            )
        raise FileNotFoundError(f"process {me}: no SWAGCollector state at {str(file)!r}")

    def load(self, path: str | os.PathLike) -> None:
        """Collective: restore the folder :meth:`save` wrote, each process its own file (see
        :meth:`load_state_dict` for the checks); on every process, or on none.

        Example:
            >>> collector.load("checkpoints/swag-step-1000")  # on every process  # doctest: +SKIP
        """
        state, error = None, None
        try:
            state = self._read(path)
            self._check_state(state)  # type: ignore[attr-defined]
        except Exception as exc:  # reported to every process, then raised here
            state, error = None, exc
        self._finish_load(state, error)
