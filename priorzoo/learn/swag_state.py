"""Resume state of a :class:`~priorzoo.learn.SWAGCollector`: ``state_dict``/``load_state_dict`` and one
safetensors file (``save``/``load``), so a long SWAG run can stop and continue exactly where it was.

The state holds the running mean w̄, Welford's M₂ and the last K deviations (oldest first, so it does not
depend on where the ring buffer wrapped), plus the batch-norm statistics collected so far; no pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from priorzoo.learn._common import atomic_save_safetensors, load_safetensors_with_meta

__all__ = ["SWAGStateMixin", "read_state_file", "write_state_file"]

_STATE_FORMAT = "priorzoo.swag_collector"
_STATE_VERSION = 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_state_file(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a collector's :meth:`~SWAGStateMixin.state_dict` as one safetensors file (tensors, the rest as
    metadata), atomically; returns the path."""
    state = dict(state)
    tensors = {k: state.pop(k) for k in list(state) if isinstance(state[k], Tensor)}
    return atomic_save_safetensors(tensors, path, state)


def read_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict :func:`write_state_file` wrote (metadata and tensors); refuses a file without the
    collector's tensors."""
    tensors, meta = load_safetensors_with_meta(path, what="SWAGCollector state")
    missing = [k for k in ("mean", "m2", "deviations") if k not in tensors]
    if missing:
        raise ValueError(f"{path}: SWAGCollector state lacks tensor(s) {missing}")
    return {**meta, **tensors}


class SWAGStateMixin:
    """The persistence half of :class:`~priorzoo.learn.SWAGCollector` (it inherits these methods)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: metadata (JSON-able) plus tensors ``mean``, ``m2``, ``deviations``.

        Deviations are stored oldest first (``[min(T, K), P]``), so the state is independent of where the
        ring buffer happened to wrap.

        Example:
            >>> import torch
            >>> from priorzoo.learn import SWAGCollector
            >>> c = SWAGCollector(torch.nn.Linear(2, 2), rank=3); c.collect()
            >>> sorted(k for k, v in c.state_dict().items() if isinstance(v, torch.Tensor))
            ['deviations', 'm2', 'mean']
        """
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "rank": self.rank,
            "num_collected": self._n,
            "min_var": self.min_var,
            "moment_dtype": _dtype_name(self.moment_dtype),
            "factor_dtype": _dtype_name(self.factor_dtype),
            "parameters": [{"name": n, "shape": list(self.shapes[n])} for n in self.names],
            "mean": self._mean.clone(),
            "m2": self._m2.clone(),
            "deviations": self.deviations(),
            "buffer_snapshots": self._buffer_n,
            **{f"buffer_sum.{n}": t.clone() for n, t in self._buffer_sum.items()},
            **{f"buffer_last.{n}": t.clone() for n, t in self._buffer_last.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the collector must select the same parameters with the same K.

        Raises:
            ValueError: another format, rank, parameter list or shapes, inconsistent tensors, or the state of
                one process of a sharded (FSDP2) collector.

        Example:
            >>> import torch
            >>> from priorzoo.learn import SWAGCollector
            >>> lin = torch.nn.Linear(2, 2)
            >>> a = SWAGCollector(lin, rank=3); a.collect()
            >>> b = SWAGCollector(lin, rank=3); b.load_state_dict(a.state_dict())
            >>> b.num_collected
            1
        """
        self._check_state(state)
        self._apply_state(state)

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError if ``state`` cannot be loaded into this collector; changes nothing."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a SWAGCollector state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        if int(state.get("version", 0)) > _STATE_VERSION:
            raise ValueError(
                f"SWAGCollector state version {state.get('version')} is newer than this priorzoo reads "
                f"({_STATE_VERSION}); upgrade priorzoo"
            )
        self._check_sharding(state)
        if state["rank"] != self.rank:
            raise ValueError(
                f"the saved state has rank K = {state['rank']} but this collector has rank {self.rank}; build "
                f"the collector with rank={state['rank']} to resume"
            )
        saved = [(p["name"], tuple(p["shape"])) for p in state["parameters"]]
        mine = [(n, self.shapes[n]) for n in self.names]
        if saved != mine:
            diff = [f"`{s[0]}` {s[1]}" for s in saved if s not in mine][:3] + [
                f"`{m[0]}` {m[1]} (here)" for m in mine if m not in saved
            ][:3]
            raise ValueError(
                f"the saved state covers {len(saved)} parameters and this collector {len(mine)}; they differ "
                f"in: {', '.join(diff) or 'order'}. Use the same model and include/exclude patterns"
            )
        m = min(int(state["num_collected"]), self.rank)
        P = self.num_parameters
        for key, shape in (("mean", (P,)), ("m2", (P,)), ("deviations", (m, P))):
            if tuple(state[key].shape) != shape:
                raise ValueError(f"saved `{key}` has shape {tuple(state[key].shape)}; expected {shape}")

    def _check_sharding(self, state: Mapping[str, Any]) -> None:
        """An unsharded collector refuses the state of one process of a sharded run (key ``shard``)."""
        shard = state.get("shard")
        if shard is not None:
            raise ValueError(
                f"the saved state is process {shard.get('process')}'s shard of a {shard.get('world_size')}-process "
                "sharded (FSDP2) SWAGCollector, but this collector is unsharded; resume it on "
                f"{shard.get('world_size')} processes with the same fully_shard layout"
            )

    @torch.no_grad()
    def _apply_state(self, state: Mapping[str, Any]) -> None:
        """Copy a checked state in (see :meth:`_check_state`)."""
        n = int(state["num_collected"])
        devs = state["deviations"]
        m = min(n, self.rank)
        self._mean.copy_(state["mean"])
        self._m2.copy_(state["m2"])
        self._ring.zero_()
        # snapshot j (1-based) lives in slot (j − 1) mod K, exactly as an uninterrupted run would have it
        for i in range(m):
            j = n - m + 1 + i
            self._ring[(j - 1) % self.rank].copy_(devs[i])
        self._n = n
        # batch-norm statistics (absent from states written before priorzoo carried them: start afresh)
        self._buffer_n = int(state.get("buffer_snapshots", 0))
        self._buffer_sum = {k[len("buffer_sum.") :]: v.clone() for k, v in state.items() if k.startswith("buffer_sum.")}
        self._buffer_last = {
            k[len("buffer_last.") :]: v.clone() for k, v in state.items() if k.startswith("buffer_last.")
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to one safetensors file (tensors + a JSON header entry), atomically; no pickle.

        Example:
            >>> import tempfile, os, torch
            >>> from priorzoo.learn import SWAGCollector
            >>> c = SWAGCollector(torch.nn.Linear(2, 2), rank=3); c.collect()
            >>> path = c.save(os.path.join(tempfile.mkdtemp(), "swag.safetensors"))
            >>> c2 = SWAGCollector(torch.nn.Linear(2, 2), rank=3); c2.load(path); c2.num_collected
            1
        """
        return write_state_file(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save` (see :meth:`load_state_dict` for the checks).

        Example:
            >>> collector.load("checkpoints/swag.safetensors")  # doctest: +SKIP
        """
        if Path(path).is_dir() and any(Path(path).glob("rank-*-of-*.safetensors")):
            files = sorted(f.name for f in Path(path).glob("rank-*-of-*.safetensors"))
            raise ValueError(
                f"{path} is the state of a sharded (FSDP2) SWAGCollector, one file per process ({', '.join(files)}), "
                "but this collector is unsharded; resume it on as many processes, with the same fully_shard layout"
            )
        self.load_state_dict(read_state_file(path))
