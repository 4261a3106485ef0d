"""The resume-state file of a :class:`~priorzoo.learn.SWAGCollector` (one per process for a sharded one): one
safetensors file, tensors plus JSON metadata, written atomically, no pickle, so a long SWAG run can stop and continue
exactly where it was.

The state (:meth:`SWAGCollector.state_dict <priorzoo.learn.SWAGCollector.state_dict>`) holds the running mean w̄,
Welford's M₂ and the last K deviations (oldest first, so it does not depend on where the ring buffer wrapped), plus
the batch-norm statistics collected so far.

Example:
    >>> import os, tempfile, torch
    >>> from priorzoo.learn import SWAGCollector
    >>> c = SWAGCollector(torch.nn.Linear(2, 2), rank=3); c.collect()
    >>> path = write_state_file(c.state_dict(), os.path.join(tempfile.mkdtemp(), "swag.safetensors"))
    >>> read_state_file(path)["num_collected"]
    1
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from priorzoo.learn.checkpoint import atomic_save_safetensors, load_safetensors_with_meta

__all__ = [
    "STATE_FILE_PATTERN",
    "STATE_FORMAT",
    "STATE_VERSION",
    "check_state_values",
    "dtype_name",
    "read_state_file",
    "state_file_name",
    "write_state_file",
]

STATE_FORMAT = "priorzoo.swag_collector"
"""The ``format`` entry of a collector state."""
STATE_VERSION = 1
"""The newest state version this priorzoo reads and writes."""
STATE_FILE_PATTERN = re.compile(r"rank-(\d{5})-of-(\d{5})\.safetensors")
"""The name of one process's file in the state folder of a sharded collector (see :func:`state_file_name`)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (how a state records its dtypes)."""
    return str(dtype).removeprefix("torch.")


def write_state_file(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a collector's :meth:`~priorzoo.learn.SWAGCollector.state_dict` as one safetensors file (tensors, the
    rest as metadata), atomically; returns the path."""
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


def _count(state: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = state.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"saved `{key}` is {value!r}; expected an integer ≥ 0")
    return value


def _tensor(state: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> Tensor:
    value = state.get(key)
    if not isinstance(value, Tensor):
        raise ValueError(f"saved `{key}` is {type(value).__name__}; expected a floating tensor of shape {shape}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"saved `{key}` has dtype {value.dtype}; expected a floating dtype")
    if tuple(value.shape) != shape:
        raise ValueError(f"saved `{key}` has shape {tuple(value.shape)}; expected {shape}")
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"saved `{key}` holds {int(bad.sum())} non-finite value(s) (element {first}: "
            f"{value.flatten()[first].item()}); expected finite values"
        )
    return value


def check_state_values(
    state: Mapping[str, Any], *, rank: int, num_parameters: int, buffers: Mapping[str, tuple[int, ...]]
) -> None:
    """Refuse a resume state whose numbers no SWAG run can produce; reads only, changes nothing.

    With T = ``num_collected`` snapshots, K = ``rank`` and P parameters (Welford, as in ``collect``):

    - ``mean`` [P], ``m2`` [P] (M₂ = Σ_j (w_j − w̄_{j−1})(w_j − w̄_j), i.e. T·(E[w²] − w̄²)) and
      ``deviations`` [min(T, K), P] are finite floating tensors; ``m2`` ≥ 0 (a second moment below the
      squared mean is no variance);
    - M₂ = Σ_j j/(j−1)·d_j² over all snapshots, so M₂ ≥ the same sum over the stored deviations
      (oldest stored: snapshot T − min(T, K) + 1), with equality while T ≤ K;
    - the first snapshot's deviation is exactly 0 (w̄_1 = w_1): a stored all-zero oldest row next to
      non-zero ones says the state holds snapshot 1, i.e. T ≤ K (a ``num_collected`` raised above K);
    - ``buffer_snapshots`` ≤ T, and the batch-norm sums are this collector's statistics, finite, with
      non-negative variance sums.

    Raises:
        ValueError: naming the tensor or count, what was received and what is valid.

    Example:
        >>> import torch
        >>> state = {"num_collected": 10**9, "mean": torch.zeros(2), "m2": -torch.ones(2),
        ...          "deviations": torch.zeros(2, 2)}
        >>> check_state_values(state, rank=2, num_parameters=2, buffers={})
        Traceback (most recent call last):
        ...
        ValueError: saved `m2` (Welford's M₂ = T·(E[w²] − w̄²)) has 2 negative value(s), down to -1.0 (element 0); ...
    """
    n = _count(state, "num_collected")
    m = min(n, rank)
    _tensor(state, "mean", (num_parameters,))
    m2 = _tensor(state, "m2", (num_parameters,)).double()
    devs = _tensor(state, "deviations", (m, num_parameters))
    if n == 0 and bool(m2.ne(0).any()):
        raise ValueError("saved `m2` is non-zero but `num_collected` is 0; expected zeros before any snapshot")
    neg = m2 < 0
    if bool(neg.any()):
        first = int(neg.nonzero()[0])
        raise ValueError(
            f"saved `m2` (Welford's M₂ = T·(E[w²] − w̄²)) has {int(neg.sum())} negative value(s), down to "
            f"{m2.min().item()} (element {first}); a second moment below the squared mean is no variance: "
            "expected m2 ≥ 0"
        )
    if m:
        d2 = devs.double().square()
        first_j = n - m + 1
        gains = torch.tensor([j / (j - 1) if j > 1 else 0.0 for j in range(first_j, n + 1)], dtype=torch.float64)
        stored = (gains[:, None] * d2).sum(0)
        # M₂ and the rows are rounded to their dtypes: allow their relative precision, generously
        tol = 64 * (torch.finfo(devs.dtype).eps + torch.finfo(state["m2"].dtype).eps)
        short = stored - m2 > tol * stored + torch.finfo(devs.dtype).tiny
        if bool(short.any()):
            i = int(short.nonzero()[0])
            raise ValueError(
                f"saved `m2` is smaller than the stored `deviations` allow: element {i} has m2 {m2[i].item():.6g} "
                f"but the last {m} snapshot(s) alone add {stored[i].item():.6g} (Σ j/(j−1)·d_j², j = {first_j}…{n}); "
                "expected m2 ≥ that sum: `m2`, `deviations` or `num_collected` was altered"
            )
        zero_rows = [i for i in range(m) if not bool(devs[i].ne(0).any())]
        if n > rank and zero_rows == [0] and m > 1:
            raise ValueError(
                f"saved `num_collected` is {n} (> K = {rank}), but the oldest stored deviation is exactly zero, as "
                "only the first snapshot's is (w̄_1 = w_1): the state holds snapshots 1…K, so `num_collected` "
                f"must be ≤ {rank}; expected the count the state was saved with"
            )
        if n <= rank and bool(devs[0].ne(0).any()):
            raise ValueError(
                f"saved `deviations` row 0 is snapshot 1's (`num_collected` {n} ≤ K = {rank}), which is exactly "
                f"zero, but it holds {int(devs[0].ne(0).sum())} non-zero value(s): `num_collected` or "
                "`deviations` was altered"
            )
        if n <= rank:
            over = (m2 - stored).abs() > tol * stored.abs() + torch.finfo(devs.dtype).tiny
            if bool(over.any()):
                i = int(over.nonzero()[0])
                raise ValueError(
                    f"saved `m2` does not match the stored `deviations`: with all {n} snapshots stored, "
                    f"M₂ = Σ j/(j−1)·d_j², but element {i} has m2 {m2[i].item():.6g} and the deviations give "
                    f"{stored[i].item():.6g}: `m2`, `deviations` or `num_collected` was altered"
                )
    nb = _count(state, "buffer_snapshots", 0)
    if nb > n:
        raise ValueError(f"saved `buffer_snapshots` is {nb}; expected ≤ `num_collected` ({n})")
    for key in state:
        if not key.startswith(("buffer_sum.", "buffer_last.")):
            continue
        name = key.split(".", 1)[1]
        if name not in buffers:
            raise ValueError(
                f"saved `{key}` is not a batch-norm statistic of this collector; expected one of "
                f"{sorted(buffers)[:6] or 'none (no batch norm, or buffers=False)'}"
            )
        value = state[key]
        if key.startswith("buffer_last."):
            if not isinstance(value, Tensor) or tuple(value.shape) != buffers[name]:
                raise ValueError(f"saved `{key}` is not a tensor of shape {buffers[name]}")
            continue
        value = _tensor(state, key, buffers[name])
        if name.endswith("running_var") and bool((value < 0).any()):
            raise ValueError(f"saved `{key}` has negative values (down to {value.min().item()}); expected ≥ 0")
        if nb == 0:
            raise ValueError(f"saved `{key}` is present but `buffer_snapshots` is 0; expected ≥ 1")


def state_file_name(process: int, world_size: int) -> str:
    """The name of process ``process``'s file in a sharded state folder.

    Example:
        >>> state_file_name(1, 2)
        'rank-00001-of-00002.safetensors'
    """
    return f"rank-{process:05d}-of-{world_size:05d}.safetensors"
