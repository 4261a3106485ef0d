"""Writing and reading prior folders (``docs/format.md``): sharding, canonical headers, atomic save, loading.

:class:`~priorzoo.prior.PriorModel` keeps thin ``save_pretrained`` / ``from_pretrained`` methods that call
:func:`save_prior` and :func:`load_prior_folder`; the Hub side lives in :mod:`priorzoo.hub`. Nothing here
unpickles anything: the tensors are safetensors, the configuration is JSON.

Example:
    >>> import tempfile, torch
    >>> from priorzoo import PriorModel
    >>> folder = save_prior(PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0), tempfile.mkdtemp())
    >>> config, mean, variance, cov_factor, buffers = load_prior_folder(folder)
    >>> config.kind.value, mean["w"].tolist(), cov_factor
    ('isotropic', [0.0, 0.0], None)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from priorzoo.config import FORMAT_VERSION, PriorConfig
from priorzoo.errors import PriorFormatError, PriorNotFoundError
from priorzoo.files import CARD_NAME, CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, is_prior_weights

if TYPE_CHECKING:
    from priorzoo.prior import PriorModel

__all__ = ["BUFFER_SUFFIX", "FLOAT_DTYPES", "SUFFIXES", "as_dtype", "load_prior_folder", "parse_size", "save_prior"]

SUFFIXES = ("mean", "variance", "cov_factor")
BUFFER_SUFFIX = "buffer"
"""``<buffer name>.buffer``: running statistics a prior carries (``config.buffers``), not part of the density."""
"""The tensors stored per parameter ``name``: ``name.mean``, ``name.variance``, ``name.cov_factor``."""
FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
"""The storage dtypes ``save_pretrained`` accepts, by name."""


def parse_size(size: int | str) -> int:
    """``"2GB"``/``"500MB"``/``"10KB"``/int bytes → bytes (decimal units, as the Hub uses).

    Example:
        >>> parse_size("500MB"), parse_size("1KiB")
        (500000000, 1024)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"`max_shard_size` must be > 0 bytes; received {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"`max_shard_size` must be bytes (int) or like '2GB', '500MB'; received {size!r}")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[m[2]]
    return int(float(m[1]) * unit)


def as_dtype(value: torch.dtype | str | None, what: str) -> torch.dtype | None:
    """A storage dtype given as a ``torch.dtype`` or its name (see :data:`FLOAT_DTYPES`), or ``None``.

    Example:
        >>> as_dtype("bfloat16", "factor_dtype")
        torch.bfloat16
    """
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in FLOAT_DTYPES.values():
            raise ValueError(f"`{what}` must be one of {sorted(FLOAT_DTYPES)}; received {value}")
        return value
    if value not in FLOAT_DTYPES:
        raise ValueError(f"`{what}` must be one of {sorted(FLOAT_DTYPES)}; received {value!r}")
    return FLOAT_DTYPES[value]


def _canonicalize_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted JSON keys, in place and at the same length.

    safetensors writes ``__metadata__`` keys in an arbitrary order, so two saves of the same prior could
    differ byte for byte; canonical bytes let re-uploads of an unchanged prior make no new Hub commit.
    """
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen: same content, no whitespace added
            return
        fh.seek(8)
        fh.write(text.ljust(n))


def _tensor_dict(prior: PriorModel, factor_dtype: torch.dtype | None, dtype: torch.dtype | None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for n in prior.names:
        out[f"{n}.mean"] = prior.mean[n].detach().to("cpu", dtype=dtype or torch.float32).contiguous()
        out[f"{n}.variance"] = prior.variance[n].detach().to("cpu", dtype=dtype or torch.float32).contiguous()
        if prior.cov_factor is not None:
            f = prior.cov_factor[n].detach().to("cpu")
            out[f"{n}.cov_factor"] = f.to(factor_dtype or dtype or torch.float32).contiguous()
    for n, b in prior.buffers.items():  # stored as they are: float32 statistics, int64 counters
        out[f"{n}.{BUFFER_SUFFIX}"] = b.detach().to("cpu").contiguous()
    return out


def save_prior(
    prior: PriorModel,
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "2GB",
    factor_dtype: torch.dtype | str | None = None,
    dtype: torch.dtype | str | None = None,
    card: bool = True,
    repo_id: str | None = None,
) -> Path:
    """Write ``prior`` as a prior folder; the implementation of :meth:`PriorModel.save_pretrained
    <priorzoo.prior.PriorModel.save_pretrained>` (see there for the arguments)."""
    from safetensors.torch import save_file

    factor_dtype = as_dtype(factor_dtype, "factor_dtype")
    dtype = as_dtype(dtype, "dtype")
    limit = parse_size(max_shard_size)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"`save_directory` {str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = _tensor_dict(prior, factor_dtype, dtype)

    # shards: parameters (then buffers) in order, a parameter's tensors kept together
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    groups = [[f"{n}.{s}" for s in SUFFIXES] for n in prior.names]
    groups += [[f"{n}.{BUFFER_SUFFIX}"] for n in prior.buffers]
    for keys in groups:
        group = {k: tensors[k] for k in keys if k in tensors}
        gsize = sum(t.numel() * t.element_size() for t in group.values())
        if shards[-1] and size + gsize > limit:
            shards.append({})
            size = 0
        shards[-1].update(group)
        size += gsize
    metadata = {
        "format": "pt",
        "priorzoo_version": prior.config.priorzoo_version,
        "format_version": str(FORMAT_VERSION),
    }

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        written: list[str] = []
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata=metadata)
            _canonicalize_header(tmp / WEIGHTS_NAME)
            written.append(WEIGHTS_NAME)
        else:
            total = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"prior-{i:05d}-of-{total:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=metadata)
                _canonicalize_header(tmp / fname)
                weight_map.update({k: fname for k in shard})
                written.append(fname)
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": weight_map,
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.append(INDEX_NAME)
        cfg = dataclasses.replace(prior.config)
        from priorzoo import __version__

        cfg.priorzoo_version = __version__
        (tmp / CONFIG_NAME).write_text(cfg.to_json_string(), encoding="utf-8")
        written.append(CONFIG_NAME)
        if card:
            from priorzoo.cards import render_card

            (tmp / CARD_NAME).write_text(render_card(cfg, repo_id=repo_id), encoding="utf-8")
            written.append(CARD_NAME)

        if not target.exists():
            os.replace(tmp, target)
            return target
        # existing folder: remove stale prior files, then move the new ones in (config last)
        stale = [p for p in target.iterdir() if is_prior_weights(p.name) and p.name not in written]
        for name in sorted(written, key=lambda n: n == CONFIG_NAME):
            os.replace(tmp / name, target / name)
        for p in stale:
            p.unlink()
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_prior_folder(
    folder: str | os.PathLike, *, device: torch.device | str | None = None
) -> tuple[PriorConfig, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor] | None, dict[str, Tensor]]:
    """Read a local prior folder: ``(config, mean, variance, cov_factor or None, buffers)``, tensors on
    ``device`` (``buffers``: ``name -> tensor``, empty for a prior without ``config.buffers``).

    The tensors' values are validated by :class:`~priorzoo.prior.PriorModel` (finite, variance ≥ 0,
    shapes as in the config); this checks the files: a config, the tensors (single file or index + shards),
    each tensor in the shard the index names, no tensor the config does not describe.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
        raise PriorNotFoundError(f"{str(folder)!r} is not a prior: no {CONFIG_NAME} there (files: {present or 'none'})")
    config = PriorConfig.from_json_file(config_path)
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
        expected_map = None
    elif (folder / INDEX_NAME).is_file():
        try:
            index = json.loads((folder / INDEX_NAME).read_text())
            expected_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PriorFormatError(f"{folder / INDEX_NAME}: not a valid shard index ({err})") from None
        files = [folder / f for f in sorted(set(expected_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise PriorFormatError(f"{folder}: shard(s) listed in {INDEX_NAME} are missing: {absent}")
    else:
        raise PriorNotFoundError(
            f"{str(folder)!r} has a {CONFIG_NAME} but no {WEIGHTS_NAME} or {INDEX_NAME}: not a complete prior"
        )
    tensors: dict[str, Tensor] = {}
    dev = str(device) if device is not None else "cpu"
    for f in files:
        try:
            part = load_file(str(f), device=dev)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise PriorFormatError(f"{f}: corrupted or truncated safetensors file ({err})") from None
        if expected_map is not None:
            wrong = [k for k in part if expected_map.get(k) != f.name]
            if wrong:
                raise PriorFormatError(f"{f}: holds tensors the index assigns elsewhere: {wrong[:5]}")
        tensors.update(part)
    store: dict[str, dict[str, Tensor]] = {s: {} for s in (*SUFFIXES, BUFFER_SUFFIX)}
    unexpected = []
    for key, t in tensors.items():
        name, _, suffix = key.rpartition(".")
        if suffix in store and name:
            store[suffix][name] = t
        else:
            unexpected.append(key)
    known = set(config.names)
    unexpected += [f"{n}.{s}" for s in SUFFIXES for n in store[s] if n not in known]
    known_buffers = {b.name for b in config.buffers}
    unexpected += [f"{n}.{BUFFER_SUFFIX}" for n in store[BUFFER_SUFFIX] if n not in known_buffers]
    absent = sorted(known_buffers - set(store[BUFFER_SUFFIX]))
    if absent:
        raise PriorFormatError(f"{folder}: buffer tensor(s) listed in {CONFIG_NAME} are missing: {absent[:5]}")
    if unexpected:
        raise PriorFormatError(f"{folder}: tensors not described by {CONFIG_NAME}: {sorted(unexpected)[:5]}")
    if config.rank == 0 and store["cov_factor"]:
        raise PriorFormatError(f"{folder}: config rank is 0 but the file holds cov_factor tensors")
    return config, store["mean"], store["variance"], store["cov_factor"] or None, store[BUFFER_SUFFIX]
