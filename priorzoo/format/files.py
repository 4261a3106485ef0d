"""The files of a prior folder (``docs/format.md``) and the one check of what a folder holds.

A prior folder holds ``config.json``, the tensors — ``prior.safetensors``, or the shard index
``prior.safetensors.index.json`` plus the shards ``prior-0000i-of-0000N.safetensors`` it names — and the
``README.md`` card. :func:`prior_files` is the single answer to "is this a prior folder, and which files are
its prior": loading (:mod:`priorzoo.format.serialization`), the Hub code (:mod:`priorzoo.hub`) and the CLI all ask it.

A save replaces a prior as a whole (see :func:`priorzoo.format.serialization.replace_prior_files`): the new files are
written into a staging folder inside the target, which is then renamed to :data:`COMMIT_DIR` — the commit
point — and its files are moved into place. A reader that finds :data:`COMMIT_DIR` (a save interrupted after
its commit) reads the new prior from it and the files already moved, so a folder always reads as the old
prior or the new one, never a mixture. This module imports nothing else of priorzoo but its errors.

Example:
    >>> is_prior_weights("prior-00001-of-00002.safetensors"), is_prior_weights("model.safetensors")
    (True, False)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

from priorzoo.errors import PriorFormatError, PriorNotFoundError

__all__ = [
    "CARD_NAME",
    "COMMIT_DIR",
    "CONFIG_NAME",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "SHARD_RE",
    "STAGING_PREFIX",
    "WEIGHTS_NAME",
    "clean_subfolder",
    "is_prior_weights",
    "prior_files",
    "read_shard_index",
]

CONFIG_NAME = "config.json"
"""The prior's configuration (format version, kind, rank, λ, parameter names and shapes, provenance)."""
WEIGHTS_NAME = "prior.safetensors"
"""The tensors of an unsharded prior."""
INDEX_NAME = "prior.safetensors.index.json"
"""The shard index of a sharded prior (the Hub's convention: ``weight_map`` tensor name → shard file)."""
CARD_NAME = "README.md"
"""The model card."""
SHARD_RE = re.compile(r"prior-\d{5}-of-\d{5}\.safetensors")
"""The names of a sharded prior's tensor files (match with ``fullmatch``)."""
STAGING_PREFIX = ".priorzoo-staging-"
"""Prefix of the folder (inside the target) a save writes the new files into before its commit."""
COMMIT_DIR = ".priorzoo-commit"
"""The staging folder once committed: it holds :data:`MANIFEST_NAME` and the new files not yet moved into place."""
MANIFEST_NAME = "manifest.json"
"""``{"files": [names]}``: the complete list of the committed prior's files."""


def is_prior_weights(name: str) -> bool:
    """Whether a file name is one of a prior's tensor files: the single file, the shard index or a shard.

    Example:
        >>> is_prior_weights(INDEX_NAME)
        True
    """
    return name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_RE.fullmatch(name) is not None


def clean_subfolder(subfolder: str | None) -> str | None:
    """``"a/b/"`` → ``"a/b"``; ``""``/``None`` → ``None``; refuse absolute paths and ``..``.

    Example:
        >>> clean_subfolder("priors/r18/")
        'priors/r18'
        >>> clean_subfolder("../other")
        Traceback (most recent call last):
        ...
        ValueError: `subfolder` must be a relative path inside the repo or folder, received '../other'
    """
    if subfolder is None:
        return None
    if not isinstance(subfolder, str):
        raise TypeError(f"`subfolder` must be a string, received {type(subfolder).__name__}")
    text = subfolder.replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if text.startswith("/") or ".." in parts or re.match(r"[A-Za-z]:", text):
        raise ValueError(f"`subfolder` must be a relative path inside the repo or folder, received {subfolder!r}")
    return "/".join(parts) or None


def read_shard_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name → shard file) of a ``prior.safetensors.index.json``, validated.

    Every shard must be a plain file name in the same folder matching ``prior-0000i-of-0000N.safetensors``,
    so an index can never make a reader open a file outside the prior (``../x``, ``/etc/passwd``).
    """
    try:
        index = json.loads(Path(path).read_text(encoding="utf-8"))
        weight_map = dict(index["weight_map"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise PriorFormatError(
            f"`{path}` is not a valid shard index: expected JSON with a `weight_map` of tensor name → "
            f"shard file ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    bad = sorted({repr(s) for s in weight_map.values() if not isinstance(s, str) or SHARD_RE.fullmatch(s) is None})
    keys = [k for k in weight_map if not isinstance(k, str)]
    if bad or keys or not weight_map:
        raise PriorFormatError(
            f"`{path}` names invalid shard files {bad[:5] or keys[:5] or '(none)'}: expected plain file names in "
            "the same folder like 'prior-00001-of-00002.safetensors'"
        )
    return weight_map


def _committed(folder: Path) -> list[str] | None:
    """The file names of a committed save that was interrupted before it finished, else ``None``."""
    manifest = folder / COMMIT_DIR / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        names = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) and PurePosixPath(n).name == n for n in names):
        return None
    return names


def _present(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".priorzoo-"))
    except OSError:
        return []


def prior_files(folder: str | os.PathLike, *, where: str | None = None, upload: bool = False) -> dict[str, Path]:
    """The files of the prior in ``folder``, ``name -> path``, in upload order (config, tensors, card).

    A save interrupted after its commit is read as the new prior (see the module docstring); staging
    folders of saves interrupted before it are ignored. A Hugging Face cache snapshot, whose files are
    links into ``blobs/``, is a prior folder like any other.

    Args:
        folder: the folder.
        where: how messages name the folder (default its path, quoted).
        upload: also require every file to be a regular file, or a link resolving inside ``folder``, so
            that nothing outside the prior (a ``README.md`` linked to a token file) can be uploaded.

    Raises:
        PriorNotFoundError: no ``config.json``, or no tensors.
        PriorFormatError: a malformed shard index, a shard it names is missing, or (``upload``) a file
            that resolves outside the folder.

    Example:
        >>> import tempfile, torch
        >>> from priorzoo import PriorModel
        >>> folder = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0).save_pretrained(tempfile.mkdtemp())
        >>> list(prior_files(folder))
        ['config.json', 'prior.safetensors', 'README.md']
    """
    folder = Path(folder)
    where = where or repr(str(folder))
    if not folder.is_dir():
        raise PriorNotFoundError(f"{where} is not a prior: not a directory")
    committed = _committed(folder)
    if committed is not None:
        pending = folder / COMMIT_DIR
        paths = {n: pending / n if (pending / n).exists() else folder / n for n in committed}
        paths = {n: p for n, p in paths.items() if p.is_file()}
    else:
        paths = {n: folder / n for n in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, CARD_NAME) if (folder / n).is_file()}
    if CONFIG_NAME not in paths:
        raise PriorNotFoundError(
            f"{where} is not a prior: no {CONFIG_NAME} there (files present: {_present(folder)[:10] or 'none'}); "
            "pass a folder written by `PriorModel.save_pretrained`, not a prior folder's parent or a model folder"
        )
    out = {CONFIG_NAME: paths[CONFIG_NAME]}
    if WEIGHTS_NAME in paths:
        out[WEIGHTS_NAME] = paths[WEIGHTS_NAME]
    elif INDEX_NAME in paths:
        out[INDEX_NAME] = paths[INDEX_NAME]
        shards = sorted(set(read_shard_index(paths[INDEX_NAME]).values()))
        for s in shards:
            if s not in paths and committed is None and (folder / s).is_file():
                paths[s] = folder / s
        missing = [s for s in shards if s not in paths]
        if missing:
            raise PriorFormatError(f"{where} lacks shard(s) {missing[:10]} listed in '{INDEX_NAME}'")
        out.update({s: paths[s] for s in shards})
    else:
        raise PriorNotFoundError(
            f"{where} has a '{CONFIG_NAME}' but neither '{WEIGHTS_NAME}' nor '{INDEX_NAME}': not a complete prior "
            f"(files present: {_present(folder)[:10]})"
        )
    if CARD_NAME in paths:
        out[CARD_NAME] = paths[CARD_NAME]
    if upload:
        root = folder.resolve()
        for name, path in out.items():
            real = path.resolve()
            if not real.is_file() or not real.is_relative_to(root):
                raise PriorFormatError(
                    f"{where} links `{name}` to {str(real)!r}, outside the prior folder: refusing to upload it "
                    "(only regular files inside the folder are uploaded); replace the link by the file itself"
                )
    return out
