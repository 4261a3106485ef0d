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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from priorzoo.errors import PriorFormatError
from priorzoo.format.config import FORMAT_VERSION, REQUIRED_KEYS, PriorConfig
from priorzoo.format.files import (
    CARD_NAME,
    COMMIT_DIR,
    CONFIG_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    STAGING_PREFIX,
    WEIGHTS_NAME,
    is_prior_weights,
    prior_files,
)

if TYPE_CHECKING:
    from priorzoo.prior import PriorModel

__all__ = [
    "BUFFER_SUFFIX",
    "FLOAT_DTYPES",
    "SUFFIXES",
    "as_dtype",
    "check_target",
    "finish_pending",
    "load_prior_folder",
    "parse_size",
    "replace_prior_files",
    "save_prior",
]

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


def _cast(name: str, tensor: Tensor, dtype: torch.dtype, *, variance: bool) -> Tensor:
    """``tensor`` on the CPU in ``dtype``, refusing a cast that would make the file unloadable or singular."""
    out = tensor.detach().to("cpu", dtype=dtype).contiguous()
    if dtype.itemsize >= tensor.element_size() or out.numel() == 0:
        return out
    finfo = torch.finfo(dtype)
    dname = str(dtype).removeprefix("torch.")
    if not bool(torch.isfinite(out).all()):
        top = float(tensor.detach().abs().max())
        raise PriorFormatError(
            f"`{name}` holds values up to {top:g} in absolute value, above {dname}'s largest finite value "
            f"{finfo.max:g}: stored as {dname} they would become inf and the prior would not load. Store it as "
            "bfloat16 (same size, float32's range) or float32"
        )
    if variance:
        flushed = (tensor.detach().cpu() > 0) & (out == 0)
        if bool(flushed.any()):
            low = float(tensor.detach().cpu()[flushed].min())
            raise PriorFormatError(
                f"`{name}` has {int(flushed.sum())} positive value(s) (the smallest {low:g}) below {dname}'s "
                f"smallest subnormal {finfo.smallest_normal * finfo.eps:g}: stored as {dname} they would become 0 "
                "and make the prior singular. Keep the variance in float32 (the default `dtype`)"
            )
    return out


def _tensor_dict(prior: PriorModel, factor_dtype: torch.dtype | None, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The tensors to write, cast (and range-checked) before anything is written."""
    out: dict[str, Tensor] = {}
    for n in prior.names:
        out[f"{n}.mean"] = _cast(f"{n}.mean", prior.mean[n], dtype or torch.float32, variance=False)
        out[f"{n}.variance"] = _cast(f"{n}.variance", prior.variance[n], dtype or torch.float32, variance=True)
        if prior.cov_factor is not None:
            fdt = factor_dtype or dtype or torch.float32
            out[f"{n}.cov_factor"] = _cast(f"{n}.cov_factor", prior.cov_factor[n], fdt, variance=False)
    for n, b in prior.buffers.items():  # stored as they are: float32 statistics, int64 counters
        out[f"{n}.{BUFFER_SUFFIX}"] = b.detach().to("cpu").contiguous()
    return out


# --------------------------------------------------------------------------------------------- atomic folders
def check_target(target: str | os.PathLike, what: str) -> Path:
    """Refuse a target folder a prior must not be written into; return it as a ``Path``.

    Refused: an empty path (it would mean the current folder), a path that is a file, and a folder whose
    ``config.json`` is not a priorzoo prior's (a model folder: its config and card would be replaced).
    """
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"`{what}` must be a folder path; received {type(target).__name__}")
    if os.fspath(target) == "":
        raise ValueError(f"`{what}` is empty: pass a folder path ('.' for the current folder)")
    path = Path(target)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"`{what}` {str(path)!r} exists and is not a directory")
    config = path / CONFIG_NAME
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            data = None
        if not (isinstance(data, dict) and all(k in data for k in REQUIRED_KEYS)):
            keys = sorted(data)[:6] if isinstance(data, dict) else "unreadable JSON"
            raise FileExistsError(
                f"`{what}` {str(path)!r} holds a {CONFIG_NAME} that is not a priorzoo prior's (keys: {keys}; a prior's "
                f"has {list(REQUIRED_KEYS)}), e.g. a model folder: refusing to replace its files. Write the prior into "
                f"a new or empty folder, or delete {str(config)!r} first if the folder is yours to overwrite"
            )
    return path


def finish_pending(target: Path) -> None:
    """Complete a save into ``target`` that was interrupted after its commit, and remove staging folders of
    saves interrupted before it (they hold nothing committed)."""
    for p in target.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    commit = target / COMMIT_DIR
    if not commit.exists():
        return
    manifest = commit / MANIFEST_NAME
    try:
        names = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        names = None  # no manifest: every file was moved in already (the folder was being removed)
    if names is not None:
        for name in names:
            if (commit / name).exists():
                os.replace(commit / name, target / name)
        for p in target.iterdir():
            if p.is_file() and is_prior_weights(p.name) and p.name not in names:
                p.unlink()
        manifest.unlink()
    shutil.rmtree(commit, ignore_errors=True)


def replace_prior_files(target: str | os.PathLike, write: Callable[[Path], None], *, what: str) -> Path:
    """Replace the prior in ``target`` (created if needed) by the files ``write(staging)`` writes, as a whole.

    ``write`` fills a staging folder created inside ``target`` (so no rename crosses a device, even when
    ``target`` is a mount point). The staging folder gets a manifest of its files and is renamed to
    ``.priorzoo-commit`` — the commit point — after which its files are moved into place and stale tensor
    files of the old prior (say its shards, after an unsharded save) are removed. A kill at any moment leaves
    a folder that loads as the old prior (before the commit) or the new one (after it: the loader reads a
    pending commit, see :func:`priorzoo.format.files.prior_files`); the next save finishes or discards what was left.
    Files get the mode of a newly created file (the umask), like ``config.json``.
    """
    path = check_target(target, what)
    path.mkdir(parents=True, exist_ok=True)
    finish_pending(path)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path))
    try:
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        probe = staging / MANIFEST_NAME
        probe.touch()
        mode = probe.stat().st_mode & 0o777  # what the umask gives a new file
        for name in names:
            os.chmod(staging / name, mode)
            with open(staging / name, "rb") as fh:
                os.fsync(fh.fileno())
        probe.write_text(json.dumps({"files": names}) + "\n", encoding="utf-8")
        os.replace(staging, path / COMMIT_DIR)  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_pending(path)
    return path


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
    check_target(save_directory, "save_directory")
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
    cfg = dataclasses.replace(prior.config)
    from priorzoo._version import __version__

    cfg.priorzoo_version = __version__

    def write(tmp: Path) -> None:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata=metadata)
            _canonicalize_header(tmp / WEIGHTS_NAME)
        else:
            total = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"prior-{i:05d}-of-{total:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=metadata)
                _canonicalize_header(tmp / fname)
                weight_map.update({k: fname for k in shard})
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": weight_map,
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_NAME).write_text(cfg.to_json_string(), encoding="utf-8")
        if card:
            from priorzoo.format.cards import render_card

            (tmp / CARD_NAME).write_text(render_card(cfg, repo_id=repo_id), encoding="utf-8")

    return replace_prior_files(save_directory, write, what="save_directory")


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
    paths = prior_files(folder)
    config = PriorConfig.from_json_file(paths[CONFIG_NAME])
    if WEIGHTS_NAME in paths:
        files = [paths[WEIGHTS_NAME]]
        expected_map = None
    else:
        from priorzoo.format.files import read_shard_index

        expected_map = read_shard_index(paths[INDEX_NAME])
        files = [paths[f] for f in sorted(set(expected_map.values()))]
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
