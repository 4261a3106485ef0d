"""Writing and reading prior folders (``docs/format.md``): sharding, the save id, the one reader.

:class:`~priorzoo.prior.PriorModel` keeps thin ``save_pretrained`` / ``from_pretrained`` methods that call
:func:`save_prior` and :func:`load_prior_folder`; the Hub side lives in :mod:`priorzoo.hub`; the commit (lock,
temporary names, ``config.json`` renamed last) in :mod:`priorzoo.format.commit`. Nothing here unpickles anything: the
tensors are safetensors, the configuration is JSON.

Every save has an id, a hash of its content (:func:`save_id_of`: the config, and every tensor's file, name,
dtype, shape and bytes), so saving the same prior twice gives the same bytes. Each tensor file carries it in
its header metadata (``priorzoo_save_id``) and ``config.json`` names it (``save_id``). Every reader goes
through :func:`open_prior_folder`, which reads ``config.json``, opens the tensor files it points to and checks
that each carries that id: files of two saves (a save landed between the reads, or was killed between its
renames) are re-read while a save is under way, then refused with :class:`~priorzoo.errors.MixedPriorError`.
A folder written before save ids (no ``save_id``) is read without the check.

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
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from priorzoo.errors import MixedPriorError, PriorFormatError, PriorNotFoundError
from priorzoo.format.commit import Staging, check_target, replace_prior_files, save_in_progress
from priorzoo.format.config import FORMAT_VERSION, PriorConfig
from priorzoo.format.files import (
    CARD_NAME,
    CONFIG_NAME,
    INDEX_NAME,
    SAVE_ID_KEY,
    WEIGHTS_NAME,
    link_roots,
    open_checked,
    prior_files,
    read_json,
    read_shard_index,
)
from priorzoo.format.record import PriorRecord
from priorzoo.format.tensorfile import ST_NAMES, TensorFile

__all__ = [
    "BUFFER_SUFFIX",
    "FLOAT_DTYPES",
    "RETRY_S",
    "SUFFIXES",
    "OpenedPrior",
    "as_dtype",
    "check_target",
    "load_prior_folder",
    "open_prior_folder",
    "parse_size",
    "replace_prior_files",
    "save_id_of",
    "save_prior",
]

SUFFIXES = ("mean", "variance", "cov_factor")
"""The tensors stored per parameter ``name``: ``name.mean``, ``name.variance``, ``name.cov_factor``."""
BUFFER_SUFFIX = "buffer"
"""``<buffer name>.buffer``: running statistics a prior carries (``config.buffers``), not part of the density."""
RETRY_S = 2.0
"""How long a reader re-reads a folder whose files belong to different saves while a save is under way there."""
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


def _tensor_dict(prior: PriorRecord, factor_dtype: torch.dtype | None, dtype: torch.dtype | None) -> dict[str, Tensor]:
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


# --------------------------------------------------------------------------------------------- writing
def save_id_of(config: PriorConfig, files: Iterable[tuple[str, Mapping[str, Tensor]]]) -> str:
    """The id of a save: sha256 over the config (without ``save_id``) and, per tensor file in order, its name
    and each tensor's name, dtype, shape and bytes; 32 hex digits. The same prior saved the same way gets the
    same id (and the same bytes); anything that changes a file changes it. Each tensor is read once, in name
    order (``files`` may map to :class:`~priorzoo.format.tensorfile.TensorFile` s, read one tensor at a time).

    Example:
        >>> from priorzoo.format.config import ParameterSpec
        >>> cfg = PriorConfig(kind="diagonal", rank=0, parameters=[ParameterSpec("w", (2,))])
        >>> len(save_id_of(cfg, [("prior.safetensors", {"w.mean": torch.zeros(2)})]))
        32
    """
    h = hashlib.sha256(b"priorzoo-save-id-1\0")
    h.update(dataclasses.replace(config, save_id=None).to_json_string().encode())
    for fname, tensors in files:
        h.update(f"\0file {fname}".encode())
        for key in sorted(tensors):
            t = tensors[key].detach().contiguous()
            h.update(f"\0{key} {ST_NAMES[t.dtype]} {list(t.shape)}\0".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


def _layout(prior: PriorRecord, tensors: dict[str, Tensor], limit: int) -> list[tuple[str, dict[str, Tensor]]]:
    """``[(file name, tensors)]``: parameters (then buffers) in order, a parameter's tensors kept together, a new
    shard when ``limit`` bytes would be exceeded; one file is ``prior.safetensors``."""
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
    if len(shards) == 1:
        return [(WEIGHTS_NAME, shards[0])]
    return [(f"prior-{i:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards, start=1)]


def save_prior(
    prior: PriorRecord,
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "2GB",
    factor_dtype: torch.dtype | str | None = None,
    dtype: torch.dtype | str | None = None,
    card: bool = True,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``prior`` as a prior folder; the implementation of :meth:`PriorModel.save_pretrained
    <priorzoo.prior.PriorModel.save_pretrained>` (see there for the arguments)."""
    from priorzoo._version import __version__

    factor_dtype = as_dtype(factor_dtype, "factor_dtype")
    dtype = as_dtype(dtype, "dtype")
    limit = parse_size(max_shard_size)
    check_target(save_directory, "save_directory", overwrite=overwrite)  # before any work
    tensors = _tensor_dict(prior, factor_dtype, dtype)
    files = _layout(prior, tensors, limit)
    cfg = dataclasses.replace(prior.config, priorzoo_version=__version__, save_id=None)
    cfg.save_id = save_id_of(cfg, files)
    metadata = {
        "format": "pt",
        "priorzoo_version": cfg.priorzoo_version,
        "format_version": str(FORMAT_VERSION),
        SAVE_ID_KEY: cfg.save_id,
    }

    def write(staging: Staging) -> None:
        for fname, part in files:
            staging.write_tensors(fname, part, metadata)
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {k: fname for fname, part in files for k in part},
            }
            staging.write_text(INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
        if card:
            from priorzoo.format.cards import render_card

            staging.write_text(CARD_NAME, render_card(cfg, repo_id=repo_id))
        staging.write_text(CONFIG_NAME, cfg.to_json_string())

    return replace_prior_files(save_directory, write, what="save_directory", overwrite=overwrite)


# --------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass
class OpenedPrior:
    """A prior folder opened by :func:`open_prior_folder`: its config and, per suffix (``mean``, ``variance``,
    ``cov_factor``, ``buffer``), ``name -> (file, tensor key)``; every file belongs to the config's save.
    Tensors are read from the files as opened, whatever happens to the folder meanwhile."""

    config: PriorConfig
    tensors: dict[str, dict[str, tuple[TensorFile, str]]]
    files: list[TensorFile]

    def read(self, suffix: str, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Every tensor of ``suffix``, read whole: ``name -> tensor``."""
        out = {n: f.read(key) for n, (f, key) in self.tensors[suffix].items()}
        return {n: t.to(device) for n, t in out.items()} if device is not None else out

    def prior_config(self) -> PriorConfig:
        """The config without its ``save_id``: the id belongs to the folder's files (checked when they were
        opened), not to the prior read from them, whose next save gets its own."""
        config = dataclasses.replace(self.config)
        config.save_id = None
        return config

    def close(self) -> None:
        """Unmap the files (tensors already read stay valid)."""
        for f in self.files:
            f.close()


def _check_save_ids(where: str, config: PriorConfig, files: list[tuple[str, TensorFile]]) -> None:
    got = {name: f.metadata.get(SAVE_ID_KEY) for name, f in files}
    if all(v == config.save_id for v in got.values()):
        return
    shown = ", ".join(f"`{n}`: {v or 'none'}" for n, v in got.items())
    raise MixedPriorError(
        f"{where}: its files belong to different saves: {CONFIG_NAME} names save id {config.save_id or 'none'}, "
        f"the tensor files carry {shown}. A save into this folder was interrupted between its tensor files and "
        f"{CONFIG_NAME} (or another program changed a file). Save the prior into it again, or fetch it again"
    )


def _open_once(folder: Path, where: str) -> OpenedPrior:
    paths = prior_files(folder, where=where)
    roots = link_roots(folder)
    data = read_json(paths[CONFIG_NAME], roots=roots)
    config = PriorConfig.from_dict(data, source=str(paths[CONFIG_NAME]))  # type: ignore[arg-type]
    opened: list[tuple[str, TensorFile]] = []
    try:
        for name, path in paths.items():
            if name not in (CONFIG_NAME, INDEX_NAME, CARD_NAME):
                opened.append((name, TensorFile(open_checked(path, roots=roots, where=where), str(path))))
        _check_save_ids(where, config, opened)
        expected = read_shard_index(paths[INDEX_NAME], roots=roots) if INDEX_NAME in paths else None
        store: dict[str, dict[str, tuple[TensorFile, str]]] = {s: {} for s in (*SUFFIXES, BUFFER_SUFFIX)}
        unexpected = []
        for fname, f in opened:
            wrong = [k for k in f.entries if expected is not None and expected.get(k) != fname]
            if wrong:
                raise PriorFormatError(f"{folder / fname}: holds tensors the index assigns elsewhere: {wrong[:5]}")
            for key in f.entries:
                name, _, suffix = key.rpartition(".")
                if suffix in store and name and name not in store[suffix]:
                    store[suffix][name] = (f, key)
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
    except BaseException:
        for _, f in opened:
            f.close()
        raise
    return OpenedPrior(config, store, [f for _, f in opened])


def _config_identity(folder: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(folder / CONFIG_NAME)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def open_prior_folder(folder: str | os.PathLike, *, where: str | None = None) -> OpenedPrior:
    """Open a local prior folder for reading: the one path of every reader (``from_pretrained``, the sharded
    reader, the CLI). Reads ``config.json``, opens the tensor files :func:`priorzoo.format.files.prior_files` names
    (regular files in the folder only), checks their headers (dtypes safetensors defines, offsets, sizes), that
    each belongs to the config's save, that each tensor sits in the shard the index names, and that no tensor is
    missing from or foreign to the config. The values are checked by the caller
    (:func:`priorzoo.format.checks.check_prior_tensors`).

    While a save into the folder is under way (its lock is held, or ``config.json`` changed since it was read)
    a failed read is retried, for up to :data:`RETRY_S` seconds; any failure is retried twice.

    Raises:
        MixedPriorError: the files still belong to different saves (naming each file's save id).
        PriorNotFoundError, PriorFormatError: not a prior, or a broken one.
    """
    folder = Path(folder)
    where = where or repr(str(folder))
    deadline = time.monotonic() + RETRY_S
    attempt = 0
    while True:
        before = _config_identity(folder)
        try:
            return _open_once(folder, where)
        except (PriorFormatError, PriorNotFoundError, FileNotFoundError):
            attempt += 1
            busy = save_in_progress(folder) or _config_identity(folder) != before
            if time.monotonic() > deadline or not (busy or attempt < 3):
                raise
            time.sleep(0.01 * attempt)


def load_prior_folder(
    folder: str | os.PathLike, *, device: torch.device | str | None = None
) -> tuple[PriorConfig, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor] | None, dict[str, Tensor]]:
    """Read a local prior folder: ``(config, mean, variance, cov_factor or None, buffers)``, tensors on
    ``device`` (``buffers``: ``name -> tensor``, empty for a prior without ``config.buffers``).

    The files are checked by :func:`open_prior_folder`; the values (finite, variance ≥ 0, shapes and dtypes as
    in the config) by :class:`~priorzoo.prior.PriorModel`. The config's ``save_id`` is checked and dropped.
    """
    opened = open_prior_folder(folder)
    try:
        mean, variance = opened.read("mean", device), opened.read("variance", device)
        cov_factor = opened.read("cov_factor", device) or None
        return opened.prior_config(), mean, variance, cov_factor, opened.read(BUFFER_SUFFIX, device)
    finally:
        opened.close()
