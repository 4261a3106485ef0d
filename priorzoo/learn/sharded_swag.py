r"""Sharded SWAG: collect on an FSDP2 model, each process its own shards, and write one prior folder.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` of which process p
holds the slice w_p (``Shard(d)`` on a 1-D mesh; slices may be uneven or empty). Every SWAG statistic is
element-wise in the weights (Maddox et al., NeurIPS 2019; Welford's update, see :mod:`priorzoo.learn.swag`):

.. math::

    \bar w_p \leftarrow \bar w_p + \tfrac1n (w_p - \bar w_p), \qquad d_p = w_p - \bar w_p, \qquad
    M_{2,p} \leftarrow M_{2,p} + \tfrac{n}{n-1} d_p^2 ,

so process p keeps the mean, M₂ and the K deviations of its own shard only — memory (K + 2)·P/W for W
processes — and its slice of the prior (``v_p = ½·clamp(M₂,p/T, v_min)``, factor rows ``d_p/√(2(K−1))``)
is exactly the slice of the prior one process would compute from the same snapshots, bit for bit, with no
communication while collecting.

:meth:`ShardedSWAGCollector.save_prior` (collective) writes the prior in today's format
(``docs/format.md``), without gathering a tensor anywhere: process 0 lays out the safetensors file(s) —
header and size, from the global shapes alone — every process writes the bytes of its own slices into
them (a memory map over its byte ranges), process 0 writes the batch-norm buffers (plain tensors,
replicated under FSDP2), the index, ``config.json`` and the card, and commits the folder atomically
(:func:`priorzoo.format.serialization.replace_prior_files`). The folder must be on a file system every process
sees (one machine, or a shared mount). Non-finite weights on any process raise ``FloatingPointError`` on
every process (a flag is all-reduced first, so nobody hangs in a later collective).

Example:
    Under torchrun every process runs the same script; here one process (a world of one) shows the calls:

    >>> import tempfile, torch, torch.distributed as dist
    >>> from torch.distributed.fsdp import fully_shard
    >>> from priorzoo import PriorModel
    >>> from priorzoo.learn import SWAGCollector
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    >>> _ = fully_shard(net)  # parameters are now DTensors
    >>> collector = SWAGCollector(net, rank=2, head="2.*")
    >>> type(collector).__name__
    'ShardedSWAGCollector'
    >>> for step in range(3):
    ...     with torch.no_grad():
    ...         _ = net[0].weight.to_local().add_(0.1 * step)  # stands for an optimizer step
    ...     collector.collect()  # on every process
    >>> folder = collector.save_prior(tempfile.mkdtemp())  # collective: one prior folder
    >>> PriorModel.from_pretrained(folder).rank  # or priorzoo.binding.sharded.open_prior(folder): slices only
    2
    >>> dist.destroy_process_group()

**Resume.** Under FSDP2 each process holds only its slice of the SWAG statistics, so the state is per process:

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

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from priorzoo.binding.sharded import local_slices
from priorzoo.learn.provenance import describe_backbone
from priorzoo.learn.recommended_scale import median_stride, scale_rule
from priorzoo.learn.swag import SWAGCollector
from priorzoo.learn.swag_state import STATE_FILE_PATTERN, read_state_file, state_file_name, write_state_file

if TYPE_CHECKING:
    from priorzoo.prior import PriorModel

__all__ = ["ShardedSWAGCollector"]


def _group(model: torch.nn.Module) -> Any:
    for p in model.parameters():
        if type(p).__name__ == "DTensor":
            return p.device_mesh.get_group()
    return None  # pragma: no cover - the collector is only built for sharded models


class ShardedSWAGCollector(SWAGCollector):
    """:class:`~priorzoo.learn.SWAGCollector` on an FSDP2 model: what ``SWAGCollector(fsdp_model, ...)``
    builds. Same arguments and statistics; ``mean()``, ``raw_variance()``, ``deviations()`` and
    ``state_dict()`` are this process's shards. The prior is written, not held: call :meth:`save_prior` on
    every process (``to_prior`` refuses).

    To resume (see the module docstring): ``save(folder)`` on every process writes one file
    per process (``rank-00000-of-00002.safetensors``, …) recording the world size, the process and its
    local shard layout; ``load(folder)`` on every process, with the same world size and sharding, continues
    exactly where the run was (the prior is then bit for bit that of an uninterrupted run) and refuses a
    mismatch on every process, naming what differs.

    Example:
        >>> issubclass(ShardedSWAGCollector, SWAGCollector)
        True
        >>> collector.save("ckpt/swag")  # every process: ckpt/swag/rank-0000r-of-0000W.safetensors  # doctest: +SKIP
        >>> fresh = SWAGCollector(fsdp_model, rank=20); fresh.load("ckpt/swag")  # every process  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        super().__init__(model, *args, **kwargs)
        self.group = _group(model)
        self.world_rank = dist.get_rank(self.group)
        params = dict(model.named_parameters())
        plain = [n for n in self.names if type(params[n]).__name__ != "DTensor"]
        if plain:
            raise RuntimeError(
                f"SWAGCollector: some selected parameters are sharded (FSDP2 DTensors) and some are not (e.g. "
                f"`{plain[0]}`); apply fully_shard to the whole model (its root) so that every one is sharded"
            )
        self.slices: dict[str, tuple[slice, ...]] = {n: local_slices(params[n]) for n in self.names}

    @staticmethod
    def _local(p: Tensor) -> Tensor:
        return p.to_local() if type(p).__name__ == "DTensor" else p

    def _all_reduce(self, x: Tensor, op: Any = None) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=self.group)
        return x

    def _check_snapshot(self, current: Sequence[tuple[str, Tensor]]) -> None:
        import torch.distributed as dist

        error: FloatingPointError | None = None
        try:
            super()._check_snapshot(current)
        except FloatingPointError as exc:
            error = exc
        flag = self._all_reduce(torch.tensor([0 if error is None else 1], dtype=torch.int64), dist.ReduceOp.SUM)
        if error is not None:
            raise FloatingPointError(f"process {self.world_rank}: {error}") from None
        if int(flag):
            raise FloatingPointError(
                f"{int(flag)} other process(es) found NaN/±inf in their shards of the weights; this snapshot was "
                "not collected on any process and the SWAG statistics are unchanged. Training diverged: lower "
                "the learning rate (SWAG needs a stable SGD trajectory)"
            )

    def to_prior(self, **kwargs: Any) -> PriorModel:
        """Refused: each process holds only its shards. Use :meth:`save_prior` (collective), then
        ``PriorModel.from_pretrained(folder)`` or :func:`priorzoo.binding.sharded.open_prior` (reads only slices)."""
        raise RuntimeError(
            "SWAGCollector on an FSDP2 model holds only this process's shards, so it cannot return a whole prior; "
            "call collector.save_prior(folder, ...) on every process (it writes one prior folder), then load it "
            "with PriorModel.from_pretrained(folder) or priorzoo.binding.sharded.open_prior(folder)"
        )

    # ------------------------------------------------------------------ the prior, written from the shards
    def _recommend_scale(self, var_flat: Tensor, f_flat: Tensor | None, mean_flat: Tensor, floor: float) -> tuple:
        """:func:`priorzoo.learn.recommend_scale` over all processes: Σμ² and the floor count by
        all-reduce, the median over the same global stride of Σ⁽¹⁾ᵢᵢ = vᵢ + Σₖ F²ₖᵢ (gathered: ≤ 10⁶ values),
        then the one :func:`~priorzoo.learn.recommended_scale.scale_rule`."""
        import torch.distributed as dist

        total = sum(math.prod(s) for s in self.shapes.values())
        stride = median_stride(total)
        diag = var_flat.double()
        if f_flat is not None:
            diag = diag + f_flat.double().pow(2).sum(0)
        picked = []
        start = 0
        for n in self.names:  # the global flat index of each local element, in the unsharded layout
            a, b = self._offsets[n]
            shape = self.shapes[n]
            index = torch.arange(start, start + math.prod(shape)).view(shape)[self.slices[n]].reshape(-1)
            picked.append(diag[a:b][index % stride == 0])
            start += math.prod(shape)
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, torch.cat(picked).cpu(), group=self.group)
        flat = torch.cat(gathered)
        sums = torch.tensor([float(mean_flat.double().pow(2).sum()), float((var_flat <= floor * 1.001).sum())])
        num, hits = self._all_reduce(sums.double()).tolist()
        typical = float(flat.median()) if flat.numel() else 0.0
        return scale_rule(num, total, typical, hits / max(total, 1) if floor > 0 else 0.0)

    def save_prior(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "2GB",
        card: bool = True,
        rank: int | None = None,
        min_var: float | None = None,
        scale: float | None = None,
        eps: float = 0.0,
        backbone: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        learning: Mapping[str, Any] | None = None,
        exclude: str | Sequence[str] | None = None,
        recommended_scale: float | None = None,
        license: str | None = None,
        bn_data: Any = None,
        **unsupported: Any,
    ) -> Path:
        """Write the prior :meth:`SWAGCollector.to_prior <priorzoo.learn.SWAGCollector.to_prior>` would give
        (same arguments) as one prior folder, from every process's shards; collective, returns the folder.

        Each process writes the bytes of its own slices of ``<name>.mean``/``.variance``/``.cov_factor``
        into the file(s) process 0 laid out; nothing is gathered but the ≤ 10⁶ variances of
        ``recommended_scale``'s median (when it is not given). The tensors equal, bit for bit, those of
        ``to_prior().save_pretrained(...)`` on one process over the same snapshots.

        Raises:
            NotImplementedError: ``bn_data`` (recomputing batch-norm statistics for the SWA mean needs the
                whole weights: save without it, the prior then carries the averaged running statistics).
        """
        import torch.distributed as dist

        if bn_data is not None or unsupported:
            what = "`bn_data`" if bn_data is not None else f"`{sorted(unsupported)[0]}`"
            raise NotImplementedError(
                f"SWAGCollector.save_prior on an FSDP2 model does not support {what}: recomputing batch-norm "
                "statistics for the SWA mean needs the whole weights; the prior carries the running statistics "
                "averaged over the snapshots instead"
                if bn_data is not None
                else f"SWAGCollector.save_prior on an FSDP2 model: unexpected argument {what}"
            )
        self._require(2, "save_prior()")
        rank, floor, record = self._prior_plan(rank, min_var)
        mean_flat, var_flat, f_flat = self._prior_flats(rank, floor)
        buffers = self.running_statistics() if self.buffer_layers else {}
        if self.buffer_layers:
            record["buffers"] = f"batch-norm running statistics averaged over {self._buffer_n} snapshots"
        record.update(dict(learning or {}))
        if recommended_scale is None:
            recommended_scale, rule = self._recommend_scale(var_flat, f_flat, mean_flat, 0.5 * floor)
            record["recommended_scale_rule"] = rule
        local = {}
        for n, (a, b) in self._offsets.items():
            shape = self.block_shapes[n]
            local[f"{n}.mean"] = (mean_flat[a:b].view(shape), self.slices[n])
            local[f"{n}.variance"] = (var_flat[a:b].view(shape), self.slices[n])
            if f_flat is not None:
                local[f"{n}.cov_factor"] = (f_flat[:, a:b].reshape(rank, *shape), (slice(None), *self.slices[n]))
        if exclude is None:
            exclude = self._default_exclude()
        if backbone is None:
            backbone = _unwrapped_description(self.model)
        config = _config(self, rank, scale, eps, backbone, source, record, exclude, recommended_scale, license, buffers)
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}  # every tensor of the folder: dtype, global shape
        for n in self.names:
            specs[f"{n}.mean"] = specs[f"{n}.variance"] = (torch.float32, self.shapes[n])
            if rank > 0:
                specs[f"{n}.cov_factor"] = (torch.float32, (rank, *self.shapes[n]))
        specs.update({f"{n}.buffer": (b.dtype, tuple(b.shape)) for n, b in buffers.items()})
        return _write_folder(
            save_directory,
            config,
            specs,
            local,
            {f"{n}.buffer": b for n, b in buffers.items()},
            names=self.names,
            buffer_names=list(buffers),
            max_shard_size=max_shard_size,
            card=card,
            group=self.group,
            is_writer=dist.get_rank(self.group) == 0,
        )

    # ------------------------------------------------------------------ resume state, one file per process
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
                found = STATE_FILE_PATTERN.fullmatch(stale.name)
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
        worlds = sorted({int(m.group(2)) for m in map(STATE_FILE_PATTERN.fullmatch, found) if m})
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


def _unwrapped_description(model: torch.nn.Module) -> dict[str, Any]:
    """``describe_backbone`` of the model as it was before ``fully_shard`` renamed its class ``FSDP<cls>``."""
    out = describe_backbone(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return out
    inner = getattr(model, "module", model) if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    if isinstance(inner, FSDPModule) and out.get("architecture") == type(inner).__name__:
        original = next(c for c in type(inner).__mro__[1:] if not issubclass(c, FSDPModule))
        out["architecture"] = original.__name__
    return out


def _config(
    collector: SWAGCollector, rank, scale, eps, backbone, source, record, exclude, recommended, license, buffers
):
    """The ``PriorConfig`` that ``PriorModel.from_tensors`` builds for the same prior."""
    from priorzoo.format.config import ParameterSpec, PriorConfig, PriorKind

    return PriorConfig(
        kind=PriorKind.SWAG,
        rank=rank,
        parameters=[ParameterSpec(n, collector.shapes[n]) for n in collector.names],
        scale=scale,
        eps=eps,
        backbone=dict(backbone),
        source=dict(source or {}),
        learning=dict(record),
        exclude=[exclude] if isinstance(exclude, str) else list(exclude),
        recommended_scale=recommended,
        license=license,
        results=[],
        buffers=[ParameterSpec(n, tuple(b.shape)) for n, b in buffers.items()],
    )


def _write_slice(
    path: Path, start: int, dtype: torch.dtype, shape: tuple[int, ...], index: tuple, value: Tensor
) -> None:
    """Write ``value`` (this process's slice ``index`` of a tensor of global ``shape``) into its bytes."""
    if value.numel() == 0:
        return
    size = math.prod(shape) * dtype.itemsize
    raw = np.memmap(path, dtype=np.uint8, mode="r+", offset=start, shape=(size,))
    try:
        target = torch.from_numpy(raw).view(*shape, dtype.itemsize) if shape else torch.from_numpy(raw)
        data = value.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
        if shape:
            target[index] = data.view(*value.shape, dtype.itemsize)
        else:
            target.copy_(data)
        raw.flush()
    finally:
        del raw


def _write_folder(
    save_directory: str | os.PathLike,
    config: Any,
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    local: dict[str, tuple[Tensor, tuple]],
    whole: dict[str, Tensor],
    *,
    names: Sequence[str],
    buffer_names: Sequence[str],
    max_shard_size: int | str,
    card: bool,
    group: Any,
    is_writer: bool,
) -> Path:
    """Collective: process 0 lays the files out, every process writes its slices, process 0 commits."""
    import dataclasses

    import torch.distributed as dist

    from priorzoo._version import __version__
    from priorzoo.format.config import FORMAT_VERSION
    from priorzoo.format.files import CARD_NAME, CONFIG_NAME, INDEX_NAME, SAVE_ID_KEY, WEIGHTS_NAME, open_checked
    from priorzoo.format.serialization import parse_size, replace_prior_files, save_id_of
    from priorzoo.format.tensorfile import TensorFile, header_bytes

    limit = parse_size(max_shard_size)
    groups = [[k for k in (f"{n}.mean", f"{n}.variance", f"{n}.cov_factor") if k in specs] for n in names]
    groups += [[f"{n}.buffer"] for n in buffer_names]
    files: list[list[str]] = [[]]
    size = 0
    for keys in groups:  # save_prior's rule: parameters (then buffers) in order, a parameter's tensors together
        gsize = sum(math.prod(specs[k][1]) * specs[k][0].itemsize for k in keys)
        if files[-1] and size + gsize > limit:
            files.append([])
            size = 0
        files[-1].extend(keys)
        size += gsize
    fnames = (
        [WEIGHTS_NAME]
        if len(files) == 1
        else [f"prior-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    )
    # the save id hashes the written bytes (save_prior's id, see priorzoo.format.serialization.save_id_of): the files
    # are laid out with a placeholder of the same length, and process 0 writes the id in once every slice is in
    metadata = {
        "format": "pt",
        "priorzoo_version": __version__,
        "format_version": str(FORMAT_VERSION),
        SAVE_ID_KEY: "0" * 32,
    }
    layout = {}  # key -> (file name, absolute byte offset)
    headers = []
    for fname, keys in zip(fnames, files):
        head, ranges = header_bytes({k: specs[k] for k in keys}, metadata)
        headers.append((fname, head, ranges[keys[-1]][1] if keys else 0))
        layout.update({k: (fname, len(head) + ranges[k][0]) for k in keys})

    def write_mine(folder: Path) -> None:
        for key, (value, index) in local.items():
            fname, start = layout[key]
            _write_slice(folder / fname, start, *specs[key], index, value)
        if is_writer:
            for key, value in whole.items():
                fname, start = layout[key]
                _write_slice(folder / fname, start, *specs[key], tuple(slice(None) for _ in value.shape), value)

    # the collectives, in order: (1) process 0 broadcasts the staging folder (or its error); (2) all agree
    # that every slice was written (a flag all-reduced); (3) process 0 broadcasts the saved folder (or its error)
    root = dist.get_global_rank(group, 0)

    def agree(error: BaseException | None) -> None:
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=group)
        state["agreed"] = True
        state["failed"] = bool(int(flag))
        if error is not None:
            raise error
        if int(flag):
            raise RuntimeError("SWAGCollector.save_prior failed on another process (see its error); nothing was saved")

    def write_mine_and_agree(folder: Path) -> None:
        """(2): write this process's slices; an error is reported to every process, then raised here."""
        error = None
        try:
            write_mine(folder)
        except Exception as exc:
            error = exc
        agree(error)

    def receive() -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=root, group=group)
        if isinstance(box[0], BaseException):
            raise RuntimeError(f"SWAGCollector.save_prior failed on process 0: {box[0]}") from None
        return box[0]

    state = {"sent": False, "agreed": False, "failed": False}
    if not is_writer:
        staging = receive()  # a priorzoo.format.commit.Staging: `staging / name` is the temporary file of `name`
        write_mine_and_agree(staging)
        return Path(receive())

    cfg = dataclasses.replace(config, priorzoo_version=__version__, save_id=None)

    def write(tmp: Any) -> None:
        for fname, head, data_size in headers:
            with open(tmp / fname, "wb") as fh:
                fh.write(head)
                fh.truncate(len(head) + data_size)
        dist.broadcast_object_list([tmp], src=root, group=group)
        state["sent"] = True
        write_mine_and_agree(tmp)
        written = [TensorFile(open_checked(tmp / fname), fname) for fname in fnames]
        try:
            cfg.save_id = save_id_of(cfg, zip(fnames, written))
        finally:
            for f in written:
                f.close()
        for fname, keys in zip(fnames, files):
            head, _ = header_bytes({k: specs[k] for k in keys}, {**metadata, SAVE_ID_KEY: cfg.save_id})
            with open(tmp / fname, "r+b") as fh:
                fh.write(head)  # the same length: only the id's 32 digits change
        if len(fnames) > 1:
            total = sum(math.prod(s) * d.itemsize for d, s in specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": {k: layout[k][0] for k in specs}}
            tmp.write_text(INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
        if card:
            from priorzoo.format.cards import render_card

            tmp.write_text(CARD_NAME, render_card(cfg))
        tmp.write_text(CONFIG_NAME, cfg.to_json_string())

    try:
        path = replace_prior_files(save_directory, write, what="save_directory")
    except BaseException as exc:
        # the others wait for the staging folder (not sent yet), or for the result (all slices were written)
        if not state["sent"] or (state["agreed"] and not state["failed"]):
            dist.broadcast_object_list([exc], src=root, group=group)
        raise
    dist.broadcast_object_list([str(path)], src=root, group=group)
    return path


SWAGCollector.sharded_class = ShardedSWAGCollector
