"""The files of a prior folder (``docs/format.md``), which of them a reader may open, and how it opens them.

A prior folder holds ``config.json``, the tensors — ``prior.safetensors``, or the shard index
``prior.safetensors.index.json`` plus the shards ``prior-0000i-of-0000N.safetensors`` it names — and the
``README.md`` card. :func:`prior_files` is the single answer to "is this a prior folder, and which files are
its prior": loading (:mod:`priorzoo.format.serialization`), the sharded reader
(:mod:`priorzoo.binding.sharded`), the Hub code and the CLI all ask it, and :func:`open_checked` is the one way
they open a file of it.

A folder is untrusted input (it may come from the Hub, a tarball, a git clone). Only these visible names are
ever read; a name read from inside the folder (an index entry) is accepted only when it is one of them. Every
file must be a regular file, or a link resolving to one inside the folder (or, in a Hugging Face cache
snapshot ``…/snapshots/<commit>/``, inside that repo's ``blobs/``); a FIFO, a device, a directory or a link
leading elsewhere is refused before it is opened.

A save (:func:`priorzoo.format.serialization.replace_prior_files`) writes its files under temporary names
``.priorzoo-tmp-<16 hex>-<final name>`` (:data:`TMP_RE`) and holds the advisory lock :data:`LOCK_NAME`; the
tensor files of one save all carry its id :data:`SAVE_ID_KEY` in their header metadata, which ``config.json``
names as ``save_id``. This module imports nothing else of priorzoo but its errors.

Example:
    >>> is_prior_weights("prior-00001-of-00002.safetensors"), is_prior_weights("model.safetensors")
    (True, False)
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from pathlib import Path

from priorzoo.errors import PriorFormatError, PriorNotFoundError

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "INDEX_NAME",
    "LOCK_NAME",
    "MAX_JSON_BYTES",
    "SAVE_ID_KEY",
    "SHARD_RE",
    "TMP_PREFIX",
    "TMP_RE",
    "WEIGHTS_NAME",
    "clean_subfolder",
    "file_save_id",
    "is_prior_file",
    "is_prior_weights",
    "link_roots",
    "open_checked",
    "prior_files",
    "read_json",
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
SAVE_ID_KEY = "priorzoo_save_id"
"""The header-metadata key of every tensor file of a save; ``config.json``'s ``save_id`` names the same id."""
TMP_PREFIX = ".priorzoo-tmp-"
"""Prefix of the temporary name a save writes a file under, inside the target, before renaming it into place."""
TMP_RE = re.compile(
    r"\.priorzoo-tmp-[0-9a-f]{16}-(config\.json|README\.md|prior\.safetensors(\.index\.json)?"
    r"|prior-\d{5}-of-\d{5}\.safetensors)"
)
"""The temporary names of a save (``fullmatch``): the only names the cleanup of an interrupted save removes."""
LOCK_NAME = ".priorzoo-lock"
"""The advisory lock (``flock``) a save holds on its target folder; removed when the save ends."""
MAX_JSON_BYTES = 64 * 2**20
"""The largest ``config.json`` or shard index read (a larger one is refused, not read into memory)."""


def is_prior_weights(name: str) -> bool:
    """Whether a file name is one of a prior's tensor files: the single file, the shard index or a shard.

    Example:
        >>> is_prior_weights(INDEX_NAME)
        True
    """
    return name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_RE.fullmatch(name) is not None


def is_prior_file(name: str) -> bool:
    """Whether a file name is one a prior folder may hold: config, card, or a tensor file (:func:`is_prior_weights`).

    Example:
        >>> is_prior_file("README.md"), is_prior_file("../README.md")
        (True, False)
    """
    return name in (CONFIG_NAME, CARD_NAME) or is_prior_weights(name)


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


# --------------------------------------------------------------------------------------------- opening files
def link_roots(folder: str | os.PathLike) -> list[Path]:
    """Where a link inside ``folder`` may lead: the folder itself and, when the folder is (inside) a Hugging Face
    cache snapshot ``<repo>/snapshots/<commit>/``, that repo's ``blobs/`` folder.

    Example:
        >>> [p.name for p in link_roots("/cache/models--org--x/snapshots/" + "a" * 40)]
        ['aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'blobs']
    """
    folder = Path(os.path.abspath(folder))
    roots = [Path(os.path.realpath(folder))]
    for node in (folder, *folder.parents):
        if node.parent.name == "snapshots":
            roots.append(Path(os.path.realpath(node.parent.parent / "blobs")))
            break
    return roots


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "a device or special file"


def _resolve(path: Path, roots: list[Path], where: str, action: str = "read") -> Path:
    """``path`` itself when it is a regular file; the file a link leads to when that is a regular file inside
    ``roots``; anything else refused (nothing is opened). A missing file raises ``FileNotFoundError``."""
    st = os.lstat(path)
    target = path
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(path))
        if not any(target.is_relative_to(r) for r in roots):
            raise PriorFormatError(
                f"{where} links `{path.name}` to {str(target)!r}, outside the prior folder: refusing to {action} it "
                "(a prior's files are regular files in its folder; replace the link by the file itself)"
            )
        st = os.stat(target)
    if not stat.S_ISREG(st.st_mode):
        raise PriorFormatError(
            f"{where} holds `{path.name}` as {_kind(st.st_mode)}, not a regular file: refusing to {action} it"
        )
    return target


def open_checked(path: str | os.PathLike, *, roots: list[Path] | None = None, where: str | None = None) -> int:
    """A read-only file descriptor of ``path``, a prior's file: refused unless it is a regular file (or a link to
    one inside ``roots``, default :func:`link_roots` of its folder). Checked before opening, opened without
    following a link or blocking, and checked again on the open descriptor. The caller closes it.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = path.write_text("{}")
        >>> fd = open_checked(path)
        >>> os.read(fd, 2), os.close(fd)
        (b'{}', None)
    """
    path = Path(path)
    where = where or repr(str(path.parent))
    target = _resolve(path, link_roots(path.parent) if roots is None else roots, where)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise PriorFormatError(f"{where}: cannot open `{path.name}` ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the check
        os.close(fd)
        raise PriorFormatError(f"{where} holds `{path.name}`, not a regular file: refusing to read it")
    return fd


def _read_fd(fd: int, limit: int, name: str, where: str) -> bytes:
    size = os.fstat(fd).st_size
    if size > limit:
        raise PriorFormatError(f"{where}: `{name}` is {size} bytes, above the {limit}-byte limit for a JSON file")
    chunks, total = [], 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise PriorFormatError(f"{where}: `{name}` is above the {limit}-byte limit for a JSON file")


def read_json(path: str | os.PathLike, *, roots: list[Path] | None = None, where: str | None = None) -> object:
    """The parsed JSON of a prior's file, opened with :func:`open_checked`; also returns nothing else.

    Raises:
        PriorFormatError: not a regular file, above :data:`MAX_JSON_BYTES`, or not valid JSON.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = path.write_text('{"rank": 2}')
        >>> read_json(path)
        {'rank': 2}
    """
    path = Path(path)
    where = where or str(path)
    fd = open_checked(path, roots=roots, where=where)
    try:
        data = _read_fd(fd, MAX_JSON_BYTES, path.name, where)
    finally:
        os.close(fd)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise PriorFormatError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise PriorFormatError(f"{path}: not a prior config (JSON nested too deeply to read)") from None


def file_save_id(path: str | os.PathLike, *, roots: list[Path] | None = None) -> str | None:
    """The :data:`SAVE_ID_KEY` in a safetensors file's header metadata (``None`` when absent or unreadable).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "prior.safetensors"
        >>> save_file({"x": torch.zeros(1)}, str(path), metadata={SAVE_ID_KEY: "ab12"})
        >>> file_save_id(path)
        'ab12'
    """
    try:
        fd = open_checked(path, roots=roots)
    except (OSError, PriorFormatError):
        return None
    try:
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > MAX_JSON_BYTES:
            return None
        header = json.loads(os.pread(fd, n, 8))
        value = header.get("__metadata__", {}).get(SAVE_ID_KEY)
        return value if isinstance(value, str) else None
    except (ValueError, AttributeError, RecursionError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- the prior's files
def read_shard_index(path: Path, *, roots: list[Path] | None = None) -> dict[str, str]:
    """The ``weight_map`` (tensor name → shard file) of a ``prior.safetensors.index.json``, validated.

    Every shard must be a plain file name in the same folder matching ``prior-0000i-of-0000N.safetensors``,
    so an index can never make a reader open a file outside the prior (``../x``, ``/etc/passwd``).
    """
    try:
        index = read_json(path, roots=roots)
        weight_map = dict(index["weight_map"])  # type: ignore[index]
    except (PriorFormatError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
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


def _present(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".priorzoo-"))
    except OSError:
        return []


def _config_save_id(path: Path, roots: list[Path]) -> str | None:
    try:
        data = read_json(path, roots=roots)
    except (OSError, PriorFormatError):
        return None
    value = data.get("save_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def prior_files(folder: str | os.PathLike, *, where: str | None = None, upload: bool = False) -> dict[str, Path]:
    """The files of the prior in ``folder``, ``name -> path``, in upload order (config, tensors, card).

    Only the visible files are read: ``config.json``, then ``prior.safetensors`` or the shard index and its
    shards, then ``README.md``. Each is checked before anything opens it: a regular file, or a link to one
    inside the folder (or a Hugging Face cache snapshot's ``blobs/``). When both tensor layouts are present (a
    save that changed the layout was interrupted before removing the old one), the one whose files carry the
    config's ``save_id`` is the prior.

    Args:
        folder: the folder.
        where: how messages name the folder (default its path, quoted).
        upload: links are accepted only when they resolve inside ``folder`` itself, so that nothing outside
            the prior (a ``README.md`` linked to a token file) can be uploaded.

    Raises:
        PriorNotFoundError: no ``config.json``, or no tensors.
        PriorFormatError: a malformed shard index, a shard it names is missing, or a file that is not a
            regular file in the folder (a FIFO, a directory, a link leading outside).

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
    roots = [Path(os.path.realpath(folder))] if upload else link_roots(folder)

    def checked(name: str) -> Path | None:
        path = folder / name
        try:
            _resolve(path, roots, where, "upload" if upload else "read")
        except FileNotFoundError:
            return None
        return path

    config = checked(CONFIG_NAME)
    if config is None:
        raise PriorNotFoundError(
            f"{where} is not a prior: no {CONFIG_NAME} there (files present: {_present(folder)[:10] or 'none'}); "
            "pass a folder written by `PriorModel.save_pretrained`, not a prior folder's parent or a model folder"
        )
    layouts: list[dict[str, Path]] = []
    single = checked(WEIGHTS_NAME)
    if single is not None:
        layouts.append({WEIGHTS_NAME: single})
    index = checked(INDEX_NAME)
    missing: list[str] = []
    if index is not None:
        shards = sorted(set(read_shard_index(index, roots=roots).values()))
        found = {s: checked(s) for s in shards}
        missing = [s for s, p in found.items() if p is None]
        if not missing:
            layouts.append({INDEX_NAME: index, **found})  # type: ignore[dict-item]
    if not layouts:
        if missing:
            raise PriorFormatError(f"{where} lacks shard(s) {missing[:10]} listed in '{INDEX_NAME}'")
        raise PriorNotFoundError(
            f"{where} has a '{CONFIG_NAME}' but neither '{WEIGHTS_NAME}' nor '{INDEX_NAME}': not a complete prior "
            f"(files present: {_present(folder)[:10]})"
        )
    chosen = layouts[0]
    save_id = _config_save_id(config, roots) if len(layouts) > 1 else None
    if save_id is not None:
        for layout in layouts:
            tensor_files = [p for n, p in layout.items() if n != INDEX_NAME]
            if all(file_save_id(p, roots=roots) == save_id for p in tensor_files):
                chosen = layout
                break
    out = {CONFIG_NAME: config, **chosen}
    card = checked(CARD_NAME)
    if card is not None:
        out[CARD_NAME] = card
    return out
